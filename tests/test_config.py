"""Tests for gateway.config: defaults, every validation path and its one-line message, and twistd start-up."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from gateway.addresses import in_networks, plain_address
from gateway import config
from gateway.config import (
    AuthSettings,
    BackendSettings,
    ConfigError,
    Limits,
    ProtocolSettings,
    Settings,
    TLSSettings,
    clear_text_backends,
    load_settings,
)
from gateway.tls import ensure_self_signed

PROJECT = Path(__file__).resolve().parent.parent
SECRET = "Master-Pa55word-9f3e1c"

# One table name (as written in a TOML header) to its keys, each a TOML literal.
Tables = dict[str, dict[str, str]]


def toml_string(value: str) -> str:
    """
    Return a TOML basic string holding C{value}.

    :param value: any text.
    :returns: a quoted TOML literal (JSON's escapes are a subset of TOML's).
    """
    return json.dumps(value)


def render(tables: Tables) -> str:
    """
    Return TOML text with one header per table, in the given order.

    :param tables: table names such as C{"imap.backend"} to their keys and TOML literals.
    :returns: the document.
    """
    lines: list[str] = []
    for name, keys in tables.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {literal}" for key, literal in keys.items())
    return "\n".join(lines) + "\n"


class ConfigTestCase(SynchronousTestCase):
    """Writes readable certificate, key, users, CA and secret files, and configurations that name them."""

    def setUp(self) -> None:
        # Unlike trial's mktemp under pytest, this stays out of the working tree.
        self.directory = Path(tempfile.mkdtemp(prefix="mailgateway-config-"))
        self.addCleanup(shutil.rmtree, self.directory)
        self.certificate = self.file("fullchain.pem", "certificate\n")
        self.private_key = self.file("privkey.pem", "key\n", 0o600)
        self.users = self.file("users", "")
        self.ca_file = self.file("ca.pem", "ca\n")
        self.master_password = self.file("master-password", SECRET + "\n", 0o600)

    def file(self, name: str, content: str, mode: int = 0o644) -> str:
        """
        Create a file in the test's directory.

        :param name: the file name.
        :param content: what it holds.
        :param mode: its permission bits.
        :returns: its path.
        """
        path = self.directory / name
        path.write_text(content)
        path.chmod(mode)
        return str(path)

    def minimal(self) -> Tables:
        """
        Return the smallest valid configuration: a certificate, a users file and one listener.

        :returns: tables ready to be changed and rendered.
        """
        return {
            "tls": {"certificate": toml_string(self.certificate), "private_key": toml_string(self.private_key)},
            "auth": {"users_file": toml_string(self.users)},
            "imap": {"implicit_tls": '["tcp:993"]'},
        }

    def write(self, text: str) -> str:
        """
        Write a configuration file.

        :param text: its TOML text.
        :returns: its path.
        """
        path = self.directory / f"gateway-{len(list(self.directory.iterdir()))}.toml"
        path.write_text(text)
        return str(path)

    def load(self, tables: Tables) -> Settings:
        """
        Render, write and load a configuration.

        :param tables: the configuration.
        :returns: the validated settings.
        """
        return load_settings(self.write(render(tables)))

    def assert_error(self, text: str, where: str, expected: str) -> str:
        """
        Assert that a configuration is refused with one line naming the file, the key and the expected form.

        :param text: the TOML text.
        :param where: the key as the message names it, e.g. C{"[imap.backend] port"}.
        :param expected: a part of the message saying what was expected.
        :returns: the message.
        """
        path = self.write(text)
        message = str(self.assertRaises(ConfigError, load_settings, path))
        self.assertEqual(message.splitlines(), [message], f"not one line: {message!r}")
        self.assertTrue(message.startswith(f"{path}: "), f"the file is not named first: {message!r}")
        self.assertIn(f"{where}:", message)
        self.assertIn(expected, message)
        return message

    def assert_tables_error(self, tables: Tables, where: str, expected: str) -> str:
        """
        L{assert_error} for a configuration given as tables.

        :returns: the message.
        """
        return self.assert_error(render(tables), where, expected)


class DefaultTests(ConfigTestCase):
    """A minimal configuration is completed with documented defaults."""

    def test_minimal(self) -> None:
        """A certificate, a users file and one listener make complete settings; everything else has its default."""
        path = self.write(render(self.minimal()))
        self.assertEqual(
            load_settings(path),
            Settings(
                path=path,
                hostname=socket.gethostname(),
                state_dir="/var/lib/mailgateway",
                tls=TLSSettings(self.certificate, self.private_key, False),
                auth=AuthSettings(mode="local", users_file=self.users, failure_delay=2.0, hash_threads=2),
                limits=Limits(line_length=8192, literal_size=8192, idle_timeout=180.0, login_timeout=180.0,
                              login_attempts=3, errors=5),
                imap=ProtocolSettings(
                    implicit_tls=("tcp:993",),
                    starttls=(),
                    backend=BackendSettings(
                        host="127.0.0.1", port=143, tls="none", ca_file=None, server_name="127.0.0.1",
                        timeout=30.0, login="replay", master_user=None, master_password=None,
                        forward_client_ip=False,
                    ),
                ),
                pop3=None,
                submission=None,
            ),
        )

    def test_server_name_follows_host(self) -> None:
        """Without server_name, the backend's certificate is checked against the backend host."""
        tables = self.minimal()
        tables["imap.backend"] = {"host": '"store.example.org"'}
        self.assertEqual(self.load(tables).imap.backend.server_name, "store.example.org")  # type: ignore[union-attr]

    def test_workers(self) -> None:
        """workers is one by default, a count as given, and "auto" is one per CPU."""
        tables = self.minimal()
        self.assertEqual(self.load(tables).workers, 1)
        tables["gateway"] = {"workers": "3"}
        self.assertEqual(self.load(tables).workers, 3)
        tables["gateway"] = {"workers": '"auto"'}
        self.assertEqual(self.load(tables).workers, os.cpu_count())

    def test_workers_need_tcp_listeners(self) -> None:
        """Workers share TCP listeners only: a UNIX socket listener with workers is refused, named."""
        for description in ("unix:/run/gw/imap.sock", "systemd:domain=UNIX:index=0", "haproxy:unix:/run/gw.sock"):
            tables = self.minimal()
            tables["gateway"] = {"workers": "2"}
            tables["imap"] = {"implicit_tls": f'["tcp:993", "{description}"]'}
            self.assert_tables_error(tables, "[gateway] workers", f"expected 1 while [imap] listens on the UNIX socket '{description}'")
        tables["imap"] = {"implicit_tls": '["tcp:993", "systemd:domain=INET:index=0"]'}
        self.assertEqual(self.load(tables).workers, 2)

    def test_integers_are_seconds(self) -> None:
        """A whole number of seconds is accepted and kept as a float."""
        tables = self.minimal()
        tables["limits"] = {"idle_timeout": "30"}
        idle_timeout = self.load(tables).limits.idle_timeout
        self.assertEqual((idle_timeout, type(idle_timeout)), (30.0, float))

    def test_self_signed_alone(self) -> None:
        """self_signed = true needs no certificate or key."""
        tables = self.minimal()
        tables["tls"] = {"self_signed": "true"}
        self.assertEqual(self.load(tables).tls, TLSSettings(None, None, True))

    def test_backend_mode_needs_no_users_file(self) -> None:
        """With [auth] mode "backend" no users file is needed."""
        tables = self.minimal()
        tables["auth"] = {"mode": '"backend"'}
        self.assertEqual(self.load(tables).auth.users_file, None)


class UnknownKeyTests(ConfigTestCase):
    """A misspelt key is refused wherever it is, never ignored."""

    def test_every_table(self) -> None:
        """An unknown key in each table is named with its table."""
        for table in ("gateway", "tls", "auth", "limits", "imap", "imap.backend"):
            tables = self.minimal()
            tables.setdefault(table, {})["colour"] = '"blue"'
            self.assert_tables_error(tables, f"[{table}] colour", "unknown key")

    def test_top_level(self) -> None:
        """An unknown top-level key is named without a table."""
        message = self.assert_error('colour = "blue"\n' + render(self.minimal()), "colour", "unknown key")
        self.assertIn(": colour: unknown key", message)

    def test_unknown_table(self) -> None:
        """An unknown table, such as a protocol not yet supported, is an unknown top-level key."""
        tables = self.minimal()
        tables["nntp"] = {"implicit_tls": '["tcp:563"]'}
        self.assert_tables_error(tables, "nntp", "unknown key")

    def test_unknown_table_lists_every_section(self) -> None:
        """
        A misspelt table's message lists every section the gateway knows, those the file leaves
        out included, so that the right spelling is there to see.
        """
        tables = self.minimal()
        tables["auth2"] = {"mode": '"local"'}
        self.assert_tables_error(tables, "auth2", "unknown key (known here: auth, gateway, imap, limits, metrics, "
                                                  "pop3, submission, tls, web)")

    def test_unknown_subtable(self) -> None:
        """An unknown table under a known one is an unknown key of that table."""
        tables = self.minimal()
        tables["imap.frontend"] = {"port": "993"}
        self.assert_tables_error(tables, "[imap] frontend", "unknown key")


class TypeTests(ConfigTestCase):
    """A value of the wrong type is refused with the expected form."""

    # (table, key, TOML literal, the expected form the message gives)
    cases: list[tuple[str, str, str, str]] = [
        ("gateway", "hostname", "1", "a host name such as mail.example.org"),
        ("gateway", "hostname", '"  "', "a host name such as mail.example.org"),
        ("gateway", "state_dir", "true", "the path of a directory"),
        ("gateway", "workers", '"all"', 'an integer from 1 to 64 or "auto"'),
        ("gateway", "workers", "0", 'an integer from 1 to 64 or "auto"'),
        ("gateway", "workers", "65", 'an integer from 1 to 64 or "auto"'),
        ("gateway", "workers", "true", 'an integer from 1 to 64 or "auto"'),
        ("tls", "self_signed", '"yes"', "true or false"),
        ("tls", "certificate", "1", "the path of a readable file"),
        ("tls", "private_key", '""', "the path of a readable file"),
        ("auth", "mode", "1", 'one of "local", "backend"'),
        ("auth", "users_file", "[]", "the path of a readable file"),
        ("auth", "failure_delay", "true", "a number of seconds from 0 to 60"),
        ("auth", "failure_delay", '"2"', "a number of seconds from 0 to 60"),
        ("auth", "hash_threads", "true", "an integer from 1 to 64"),
        ("auth", "hash_threads", "2.0", "an integer from 1 to 64"),
        ("limits", "line_length", '"8192"', "an integer from 512 to 65536"),
        ("limits", "literal_size", "false", "an integer from 512 to 65536"),
        ("limits", "idle_timeout", "true", "a number of seconds from 1 to 3600"),
        ("limits", "login_timeout", "1979-05-27", "a number of seconds from 1 to 3600"),
        ("limits", "login_attempts", "true", "an integer from 1 to 100"),
        ("limits", "errors", "5.5", "an integer from 1 to 100"),
        ("imap", "implicit_tls", '"tcp:993"', 'a list of endpoint descriptions such as ["tcp:993"]'),
        ("imap", "starttls", "[143]", "a list of endpoint descriptions"),
        ("imap.backend", "host", '""', "a host name or address"),
        ("imap.backend", "port", "true", "an integer from 1 to 65535"),
        ("imap.backend", "port", '"143"', "an integer from 1 to 65535"),
        ("imap.backend", "tls", "false", 'one of "none", "starttls", "implicit"'),
        ("imap.backend", "server_name", "1", "a host name"),
        ("imap.backend", "timeout", "true", "a number of seconds from 0.1 to 300"),
        ("imap.backend", "login", "true", 'one of "replay", "master"'),
        ("imap.backend", "master_user", "1", "a user name"),
        ("imap.backend", "forward_client_ip", "1", "true or false"),
        ("imap.backend", "forward_client_ip", '"yes"', "true or false"),
    ]

    def test_wrong_types(self) -> None:
        """Each key refuses a value of another type, true where a number is expected included."""
        for table, key, literal, expected in self.cases:
            tables = self.minimal()
            tables.setdefault(table, {})[key] = literal
            message = self.assert_tables_error(tables, f"[{table}] {key}", f"expected {expected}")
            self.assertIn(", got ", message)

    def test_not_a_table(self) -> None:
        """A table given as a plain value is refused as such."""
        tables = self.minimal()
        del tables["tls"]
        self.assert_error('tls = "x"\n' + render(tables), "[tls]", "expected a table, got 'x'")
        tables = self.minimal()
        tables["imap"]["backend"] = "1"
        self.assert_tables_error(tables, "[imap.backend]", "expected a table, got 1")


class RangeTests(ConfigTestCase):
    """Numbers outside their range are refused, and the bounds themselves are accepted."""

    # (table, key, lowest, highest, the expected form)
    bounds: list[tuple[str, str, float, float, str]] = [
        ("auth", "failure_delay", 0, 60, "a number of seconds from 0 to 60"),
        ("auth", "hash_threads", 1, 64, "an integer from 1 to 64"),
        ("limits", "line_length", 512, 65536, "an integer from 512 to 65536"),
        ("limits", "literal_size", 512, 65536, "an integer from 512 to 65536"),
        ("limits", "idle_timeout", 1, 3600, "a number of seconds from 1 to 3600"),
        ("limits", "login_timeout", 1, 3600, "a number of seconds from 1 to 3600"),
        ("limits", "login_attempts", 1, 100, "an integer from 1 to 100"),
        ("limits", "errors", 1, 100, "an integer from 1 to 100"),
        ("imap.backend", "port", 1, 65535, "an integer from 1 to 65535"),
        ("imap.backend", "timeout", 0.1, 300, "a number of seconds from 0.1 to 300"),
    ]

    def test_outside(self) -> None:
        """One below the lowest and one above the highest value are refused."""
        for table, key, low, high, expected in self.bounds:
            step = 1 if isinstance(low, int) and isinstance(high, int) else 0.05
            for value in (low - step, high + step):
                tables = self.minimal()
                tables.setdefault(table, {})[key] = repr(value)
                self.assert_tables_error(tables, f"[{table}] {key}", f"expected {expected}, got {value!r}")

    def test_bounds(self) -> None:
        """The lowest and the highest value are accepted as given."""
        for table, key, low, high, _ in self.bounds:
            for value in (low, high):
                tables = self.minimal()
                tables.setdefault(table, {})[key] = repr(value)
                settings = self.load(tables)
                section = {"auth": settings.auth, "limits": settings.limits,
                           "imap.backend": settings.imap.backend}[table]  # type: ignore[union-attr]
                self.assertEqual(getattr(section, key), value, f"[{table}] {key} = {value!r}")

    def test_not_a_number(self) -> None:
        """nan and inf are not a number of seconds."""
        for literal in ("nan", "inf", "-inf"):
            tables = self.minimal()
            tables["limits"] = {"idle_timeout": literal}
            self.assert_tables_error(tables, "[limits] idle_timeout", "a number of seconds from 1 to 3600")


class ChoiceTests(ConfigTestCase):
    """A value outside a fixed set is refused with the set."""

    def test_bad_choices(self) -> None:
        """Unknown auth mode, backend TLS and login values are refused, listing the choices."""
        for table, key, literal, expected in (
            ("auth", "mode", '"ldap"', 'expected one of "local", "backend", got \'ldap\''),
            ("imap.backend", "tls", '"ssl"', 'expected one of "none", "starttls", "implicit", got \'ssl\''),
            ("imap.backend", "tls", '"STARTTLS"', 'expected one of "none", "starttls", "implicit"'),
            ("imap.backend", "login", '"plain"', 'expected one of "replay", "master", got \'plain\''),
        ):
            tables = self.minimal()
            tables.setdefault(table, {})[key] = literal
            self.assert_tables_error(tables, f"[{table}] {key}", expected)


class FileTests(ConfigTestCase):
    """Every file the configuration names is opened once at start."""

    def test_unreadable(self) -> None:
        """A missing file or a directory is refused for each key that names a file."""
        missing = str(self.directory / "missing.pem")
        for bad in (missing, str(self.directory)):
            for table, key, extra in (
                ("tls", "certificate", {}),
                ("tls", "private_key", {}),
                ("auth", "users_file", {}),
                ("imap.backend", "ca_file", {"tls": '"starttls"'}),
                ("imap.backend", "master_password_file", {"login": '"master"', "master_user": '"gateway"'}),
            ):
                tables = self.minimal()
                tables.setdefault(table, {}).update(extra)
                tables[table][key] = toml_string(bad)
                # Long paths are shortened in the message, so only their start is compared.
                self.assert_tables_error(tables, f"[{table}] {key}",
                                         f"expected the path of a readable file, got {bad!r}"[:80])

    def test_missing_certificate(self) -> None:
        """Without self_signed, a missing certificate or key is named."""
        for absent in ("certificate", "private_key"):
            tables = self.minimal()
            del tables["tls"][absent]
            self.assert_tables_error(tables, f"[tls] {absent}",
                                     "expected the path of a PEM file (or self_signed = true for a trial)")

    def test_self_signed_and_certificate(self) -> None:
        """self_signed together with a certificate is refused: which one is meant is unclear."""
        tables = self.minimal()
        tables["tls"]["self_signed"] = "true"
        self.assert_tables_error(tables, "[tls] self_signed",
                                 "expected either self_signed = true or certificate and private_key, not both")

    def test_sni_name_in_one_table_only(self) -> None:
        """A name in two [[tls.sni]] tables is refused (one would silently win), whatever its case or dot."""
        entry = ('[[tls.sni]]\nnames = [{names}]\ncertificate = ' + toml_string(self.certificate) +
                 '\nprivate_key = ' + toml_string(self.private_key) + '\n')
        text = (render(self.minimal()) + entry.format(names='"mail.example.net", "*.example.com"')
                + entry.format(names='"other.example.net"') + entry.format(names='"MAIL.example.net."'))
        message = self.assert_error(text, "[tls.sni#3] names", "each name once, in one [[tls.sni]] table")
        self.assertIn("'mail.example.net' is in table 1 too", message)
        message = self.assert_error(render(self.minimal()) + entry.format(names='"a.example.net", "A.example.net"'),
                                    "[tls.sni#1] names", "each name once")
        self.assertIn("'a.example.net' is twice in this table", message)
        apart = render(self.minimal()) + entry.format(names='"mail.example.net"') + entry.format(names='"www.example.net"')
        self.assertEqual(len(load_settings(self.write(apart)).tls.sni), 2)

    def test_local_needs_users_file(self) -> None:
        """[auth] mode "local" without a users file is refused."""
        tables = self.minimal()
        tables["auth"] = {"mode": '"local"'}
        self.assert_tables_error(tables, "[auth] users_file", 'expected the path of a users file when mode is "local"')

    def test_ca_file_with_tls_none(self) -> None:
        """A ca_file is refused when the backend connection has no TLS, rather than silently unused."""
        tables = self.minimal()
        tables["imap.backend"] = {"ca_file": toml_string(self.ca_file)}
        self.assert_tables_error(tables, "[imap.backend] ca_file",
                                 'expected nothing unless tls is "starttls" or "implicit"')

    def test_ca_file_with_tls(self) -> None:
        """A ca_file and server_name are kept when the backend connection uses TLS."""
        for tls in ("starttls", "implicit"):
            tables = self.minimal()
            tables["imap.backend"] = {"tls": toml_string(tls), "ca_file": toml_string(self.ca_file),
                                      "server_name": '"store.example.org"'}
            backend = self.load(tables).imap.backend  # type: ignore[union-attr]
            self.assertEqual((backend.tls, backend.ca_file, backend.server_name),
                             (tls, self.ca_file, "store.example.org"))


class MasterLoginTests(ConfigTestCase):
    """A Dovecot master login needs a user and a private password file."""

    def master(self, **backend: str) -> Tables:
        """
        Return the minimal configuration with a master login.

        :param backend: keys of [imap.backend] to set or replace, as TOML literals.
        :returns: the tables.
        """
        tables = self.minimal()
        tables["imap.backend"] = {"login": '"master"', "master_user": '"gateway"',
                                  "master_password_file": toml_string(self.master_password), **backend}
        return tables

    def test_private_file(self) -> None:
        """A password file of mode 0600 is read, without its line end, and kept out of the settings' repr."""
        settings = self.load(self.master())
        backend = settings.imap.backend  # type: ignore[union-attr]
        self.assertEqual((backend.login, backend.master_user, backend.master_password),
                         ("master", "gateway", SECRET.encode()))
        self.assertNotIn(SECRET, repr(settings))
        self.assertNotIn(SECRET, str(settings))

    def test_readable_by_others(self) -> None:
        """A password file that others (0644) or the group (0640) may read is refused, without showing the password."""
        for mode in (0o644, 0o640, 0o604):
            os.chmod(self.master_password, mode)
            message = self.assert_tables_error(self.master(), "[imap.backend] master_password_file",
                                               "expected a file readable by its owner only (chmod 600)")
            self.assertNotIn(SECRET, message)

    def test_not_one_line(self) -> None:
        """
        An empty password file, one of several lines, or one holding a NUL (which would shift the
        fields of the SASL message that carries it) is refused, without showing its content.
        """
        for content in ("", "\n", SECRET + "\nsecond line\n", SECRET + "\0\n"):
            Path(self.master_password).write_text(content)
            message = self.assert_tables_error(self.master(), "[imap.backend] master_password_file",
                                               "expected a file holding the password on one line, without NUL")
            self.assertNotIn(SECRET, message)

    def test_needs_user_and_password(self) -> None:
        """login "master" without master_user or without master_password_file is refused."""
        for absent, expected in (("master_user", 'expected a user name when login is "master"'),
                                 ("master_password_file", 'expected a readable file when login is "master"')):
            tables = self.master()
            del tables["imap.backend"][absent]
            self.assert_tables_error(tables, f"[imap.backend] {absent}", expected)

    def test_not_with_backend_auth(self) -> None:
        """[auth] mode "backend" refuses a master login: the backend must see the client's password."""
        tables = self.master()
        tables["auth"] = {"mode": '"backend"'}
        self.assert_tables_error(tables, "[imap.backend] login", 'expected "replay" when [auth] mode is "backend"')


class ListenerTests(ConfigTestCase):
    """Listeners are plain stream endpoints; the gateway adds TLS itself."""

    def test_accepted(self) -> None:
        """tcp, tcp6 (with escaped colons), systemd and unix endpoints are kept as written."""
        accepted = ("tcp:993", r"tcp6:993:interface=\:\:", "systemd:domain=INET:index=0", "unix:/run/mailgateway.sock")
        for key in ("implicit_tls", "starttls"):
            tables = self.minimal()
            # Literal strings: a backslash is itself in TOML's single quotes.
            tables["imap"] = {key: "[" + ", ".join(f"'{d}'" for d in accepted) + "]"}
            imap = self.load(tables).imap
            assert imap is not None
            self.assertEqual(getattr(imap, key), accepted)

    def test_ssl_refused(self) -> None:
        """An "ssl:" endpoint is refused: TLS on top of the gateway's own TLS cannot work."""
        for key in ("implicit_tls", "starttls"):
            tables = self.minimal()
            tables["imap"] = {key: '["tcp:143", "ssl:993"]'}
            self.assert_tables_error(tables, f"[imap] {key}",
                                     "expected a list of endpoint descriptions such as [\"tcp:993\"] "
                                     "(tcp/tcp6/unix/systemd, optionally behind \"haproxy:\"), got 'ssl:993'")

    def test_no_listener(self) -> None:
        """An [imap] section without any listener is refused."""
        tables = self.minimal()
        tables["imap"] = {"implicit_tls": "[]", "starttls": "[]"}
        self.assert_tables_error(tables, "[imap] implicit_tls",
                                 "expected at least one listener in implicit_tls or starttls")

    def test_no_protocol(self) -> None:
        """A configuration without a protocol section is refused."""
        tables = self.minimal()
        del tables["imap"]
        self.assert_tables_error(tables, "[imap], [pop3] or [submission]",
                                 "expected at least one protocol section with a listener")

    def test_pop3_only(self) -> None:
        """POP3 alone is a valid configuration; its backend port defaults to 110."""
        tables = self.minimal()
        del tables["imap"]
        tables["pop3"] = {"implicit_tls": '["tcp:995"]', "starttls": '["tcp:110:interface=192.0.2.1"]'}
        settings = self.load(tables)
        self.assertIsNone(settings.imap)
        assert settings.pop3 is not None
        self.assertEqual((settings.pop3.implicit_tls, settings.pop3.starttls, settings.pop3.backend.port),
                         (("tcp:995",), ("tcp:110:interface=192.0.2.1",), 110))

    def test_backend_is_not_the_gateway(self) -> None:
        """
        A backend that is one of the gateway's own listeners (a default port left where the
        gateway took it) is refused at start, naming both; another address or port is not.
        """
        for listener, host in (("tcp:143", "127.0.0.1"), (r"tcp6:143:interface=\:\:", "127.0.0.1"),
                               (r"tcp6:143:interface=\:\:", "::1"), ("tcp:143:interface=127.0.0.1", "localhost"),
                               ("haproxy:tcp:143", "127.0.0.1"), ("tcp:143:interface=192.0.2.1", "192.0.2.1"),
                               ("tcp6:143:interface=::1", "localhost")):
            tables = self.minimal()
            tables["imap"] = {"implicit_tls": '["tcp:993"]', "starttls": f"[{toml_string(listener)}]"}
            tables["imap.backend"] = {"host": toml_string(host)}
            message = self.assert_tables_error(tables, "[imap.backend] port", "the mail store's port, got 143")
            self.assertIn(f"[imap] starttls {listener!r}", message)
        for listener, host in (("tcp:143", "::1"), ("tcp:143:interface=192.0.2.1", "127.0.0.1"),
                               ("tcp:10143", "127.0.0.1"), ("tcp:143", "192.0.2.7"), ("unix:/run/gw.sock", "127.0.0.1")):
            tables = self.minimal()
            tables["imap"] = {"implicit_tls": '["tcp:993"]', "starttls": f"[{toml_string(listener)}]"}
            tables["imap.backend"] = {"host": toml_string(host)}
            self.assertEqual(self.load(tables).imap.backend.host, host)  # type: ignore[union-attr]
        # Where "::" takes IPv6 alone (net.ipv6.bindv6only = 1), a store on 127.0.0.1:143 is another socket.
        self.patch(config, "_v6_only", lambda: True)
        tables = self.minimal()
        tables["imap"] = {"implicit_tls": '["tcp:993"]', "starttls": f"[{toml_string('tcp6:143')}]"}
        self.assertEqual(self.load(tables).imap.backend.port, 143)  # type: ignore[union-attr]
        tables["imap.backend"] = {"host": '"::1"'}
        self.assert_tables_error(tables, "[imap.backend] port", "the mail store's port, got 143")


class FileFormatTests(ConfigTestCase):
    """The configuration file itself must exist and be TOML."""

    def test_invalid_toml(self) -> None:
        """A TOML syntax error is one line naming the file and the position."""
        text = render(self.minimal()) + "[limits\n"
        path = self.write(text)
        message = str(self.assertRaises(ConfigError, load_settings, path))
        self.assertEqual(message.splitlines(), [message])
        self.assertTrue(message.startswith(f"{path}: not valid TOML ("), message)
        self.assertIn(f"line {text.count(chr(10))}", message)

    def test_missing_file(self) -> None:
        """A missing configuration file is one line naming it and the reason."""
        path = str(self.directory / "absent.toml")
        message = str(self.assertRaises(ConfigError, load_settings, path))
        self.assertEqual(message, f"{path}: cannot read the configuration file (No such file or directory)")


class StartupTests(ConfigTestCase):
    """twistd refuses a bad configuration before it starts anything."""

    def test_bad_config_one_line(self) -> None:
        """`python -m twisted mailgateway --config BAD` exits non-zero with one line naming the file and key."""
        tables = self.minimal()
        tables["imap.backend"] = {"port": "0"}
        path = self.write(render(tables))
        result = subprocess.run(
            [sys.executable, "-m", "twisted", "mailgateway", "--config", path],
            cwd=PROJECT, capture_output=True, text=True, timeout=120,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(
            result.stderr.splitlines(),
            [f"mailgateway: {path}: [imap.backend] port: expected an integer from 1 to 65535, got 0"],
        )


class HardeningTests(ConfigTestCase):
    """Inputs that once crashed or hung start-up, or were silently ignored, give one clear line."""

    def test_nul_in_path(self) -> None:
        """A NUL byte in a path, of a file or of state_dir, is a configuration error, not a ValueError traceback."""
        for table, key, expected in (("auth", "users_file", "the path of a readable file"),
                                     ("tls", "private_key", "the path of a readable file"),
                                     ("gateway", "state_dir", "the path of a directory")):
            tables = self.minimal()
            tables.setdefault(table, {})[key] = toml_string("/var/lib/a\0b")
            self.assert_tables_error(tables, f"[{table}] {key}", expected)

    def test_unknown_key_with_newline(self) -> None:
        """An unknown key holding a newline is shown escaped, so the message stays one line."""
        self.assert_error('"a\\nb" = 1\n' + render(self.minimal()), "'a\\nb'", "unknown key")

    def test_bad_hostname(self) -> None:
        """A host name with a space is refused before any certificate is made for it."""
        tables = self.minimal()
        tables["gateway"] = {"hostname": toml_string("bad host")}
        self.assert_tables_error(tables, "[gateway] hostname", "a host name")

    def test_device_as_password_file(self) -> None:
        """/dev/zero as master_password_file is refused at once instead of read forever."""
        tables = self.minimal()
        tables["imap.backend"] = {"login": '"master"', "master_user": '"gw"', "master_password_file": '"/dev/zero"'}
        self.assert_tables_error(tables, "[imap.backend] master_password_file", "readable file")

    def test_fifo_as_users_file(self) -> None:
        """A FIFO as users_file is refused instead of blocking start-up."""
        fifo = str(self.directory / "fifo")
        os.mkfifo(fifo)
        tables = self.minimal()
        tables["auth"]["users_file"] = toml_string(fifo)
        message = self.assert_tables_error(tables, "[auth] users_file", "the path of a readable file")
        self.assertTrue(message.endswith(" (not a regular file)"), message)

    def test_why_a_file_cannot_be_read(self) -> None:
        """The line says why a file cannot be used: a missing file is not told from a forbidden one by guessing."""
        tables = self.minimal()
        tables["auth"]["users_file"] = toml_string(str(self.directory / "missing"))
        message = self.assert_tables_error(tables, "[auth] users_file", "the path of a readable file")
        self.assertTrue(message.endswith(" (No such file or directory)"), message)

    def test_keys_that_would_be_ignored(self) -> None:
        """Keys that would have no effect in the chosen mode are errors, not silently ignored."""
        tables = self.minimal()
        tables["imap.backend"] = {"master_user": '"gw"'}
        self.assert_tables_error(tables, "[imap.backend] master_user", 'unless login is "master"')
        tables = self.minimal()
        tables["imap.backend"] = {"server_name": '"store.example.org"'}
        self.assert_tables_error(tables, "[imap.backend] server_name", 'unless tls is "starttls"')
        tables = self.minimal()
        tables["auth"]["mode"] = '"backend"'
        self.assert_tables_error(tables, "[auth] users_file", 'when mode is "backend"')

    def test_unusable_endpoint(self) -> None:
        """An endpoint description that only looks right is refused with one line at start-up."""
        tables = self.minimal()
        tables["tls"] = {"self_signed": "true"}
        tables["gateway"] = {"hostname": '"localhost"', "state_dir": toml_string(str(self.directory / "state"))}
        tables["imap"]["implicit_tls"] = '["tcp:abc"]'
        path = self.write(render(tables))
        result = subprocess.run([sys.executable, "-m", "twisted", "mailgateway", "--config", path],
                                cwd=PROJECT, capture_output=True, text=True, timeout=60)
        self.assertNotEqual(result.returncode, 0)
        [line] = result.stderr.splitlines()
        self.assertIn(f"{path}: [imap] implicit_tls: 'tcp:abc' is not a usable endpoint description", line)

    def test_server_name_not_a_host_name(self) -> None:
        """With backend TLS, a server_name (or the host it defaults to) that TLS cannot ask for is refused."""
        for name in ("[::1]", "bad name", "a..b", "a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 63):
            tables = self.minimal()
            tables["imap.backend"] = {"tls": '"starttls"', "server_name": toml_string(name)}
            self.assert_tables_error(tables, "[imap.backend] server_name", "a host name such as mail.example.org "
                                     "or an IP address")
            tables["imap.backend"] = {"tls": '"implicit"', "host": toml_string(name)}
            self.assert_tables_error(tables, "[imap.backend] host", "or an IP address")
        for name, kept in (("::1", "::1"), ("192.0.2.7", "192.0.2.7"), ("store.example.org.", "store.example.org")):
            tables = self.minimal()
            tables["imap.backend"] = {"tls": '"starttls"', "server_name": toml_string(name)}
            self.assertEqual(self.load(tables).imap.backend.server_name, kept)  # type: ignore[union-attr]

    def test_networks_are_strings(self) -> None:
        """A number or a boolean in a network list is refused, not taken as the address 0.0.0.1."""
        for key in ("trusted_networks", "proxy_sources"):
            for literal in ("[1]", "[true]", '["192.0.2.0/24", 3232235520]'):
                tables = self.minimal()
                tables["limits"] = {key: literal}
                self.assert_tables_error(tables, f"[limits] {key}", "a list of networks")

    def test_ipv4_mapped_networks(self) -> None:
        """
        An IPv4-mapped IPv6 network is taken as the IPv4 network it maps, which a client's address
        (compared in its IPv4 form) can match; one with a prefix below 96 is refused.
        """
        for key in ("trusted_networks", "proxy_sources"):
            tables = self.minimal()
            tables["limits"] = {key: '["::ffff:10.0.0.0/104", "::ffff:192.0.2.7", "::ffff:0:0/96", "2001:db8::/48"]'}
            networks = getattr(self.load(tables).limits, key)
            self.assertEqual([str(network) for network in networks],
                             ["10.0.0.0/8", "192.0.2.7/32", "0.0.0.0/0", "2001:db8::/48"])
            self.assertTrue(in_networks(plain_address("::ffff:10.1.2.3"), networks[:1]))
            tables["limits"] = {key: '["::ffff:10.0.0.0/95"]'}
            self.assert_tables_error(tables, f"[limits] {key}", "an IPv4 network in its IPv4 form")

    def test_networks_without_host_bits(self) -> None:
        """
        An address with bits set past its prefix is refused, naming the network and the host it
        may have meant, rather than silently trusting the whole network; a bare address is one host.
        """
        for key in ("trusted_networks", "proxy_sources"):
            for written, meant in (("10.0.0.5/24", "did you mean 10.0.0.0/24 (or 10.0.0.5 for that host alone)?"),
                                   ("2001:db8::1/64", "did you mean 2001:db8::/64 (or 2001:db8::1 for that host alone)?"),
                                   ("::ffff:10.0.0.5/104", "did you mean 10.0.0.0/8 (or 10.0.0.5 for that host alone)?")):
                tables = self.minimal()
                tables["limits"] = {key: f'["192.0.2.0/24", "{written}"]'}
                message = self.assert_tables_error(tables, f"[limits] {key}", meant)
                self.assertIn(repr(written), message)
            tables = self.minimal()
            tables["limits"] = {key: '["10.0.0.5", "10.0.0.5/32", "2001:db8::1", "10.0.0.0/24"]'}
            self.assertEqual([str(network) for network in getattr(self.load(tables).limits, key)],
                             ["10.0.0.5/32", "10.0.0.5/32", "2001:db8::1/128", "10.0.0.0/24"])
            for scoped in ("fe80::%eth0/64", "fe80::1%eth0"):  # fe80::1%eth1 would match as well
                tables["limits"] = {key: f'["{scoped}"]'}
                self.assert_tables_error(tables, f"[limits] {key}", "a network without an interface")

    def test_upstream_port_in_range(self) -> None:
        """A webmail upstream's port is from 1 to 65535."""
        for upstream in ("http://127.0.0.1:99999", "http://127.0.0.1:0", "http://[::1]:65536/"):
            tables = self.minimal()
            tables["web"] = {"https": '["tcp:443"]', "upstream": toml_string(upstream)}
            self.assert_tables_error(tables, "[web] upstream", "a port from 1 to 65535")
        tables["web"]["upstream"] = '"http://[::1]:65535/"'
        self.assertEqual(self.load(tables).web.upstream, "http://[::1]:65535/")  # type: ignore[union-attr]

    def test_acme_webroot(self) -> None:
        """An ACME webroot must be a directory, found at start, and needs a plain HTTP listener to serve it."""
        tables = self.minimal()
        tables["web"] = {"https": '["tcp:443"]', "http": '["tcp:80"]',
                         "acme_webroot": toml_string(str(self.directory / "missing"))}
        self.assert_tables_error(tables, "[web] acme_webroot", "the path of a directory")
        tables["web"]["acme_webroot"] = toml_string(str(self.directory))
        self.assertEqual(self.load(tables).web.acme_webroot, str(self.directory))  # type: ignore[union-attr]
        del tables["web"]["http"]
        self.assert_tables_error(tables, "[web] http", "a plain HTTP listener")

    def test_hostname_trailing_dot(self) -> None:
        """An absolute host name loses its trailing dot, so that a certificate can be made for it."""
        tables = self.minimal()
        tables["gateway"] = {"hostname": '"mail.example.org."', "state_dir": toml_string(str(self.directory / "state"))}
        tables["web"] = {"https": '["tcp:443"]'}
        settings = self.load(tables)
        self.assertEqual((settings.hostname, settings.web.public_host),  # type: ignore[union-attr]
                         ("mail.example.org", "mail.example.org"))
        certificate, _ = ensure_self_signed(settings.state_dir, settings.hostname)
        self.assertEqual(os.path.basename(certificate), "selfsigned-mail.example.org.crt")
        for bad in ("mail.example.org..", "."):
            tables["gateway"]["hostname"] = toml_string(bad)
            self.assert_tables_error(tables, "[gateway] hostname", "a host name")


class ClearTextBackendTests(ConfigTestCase):
    """A backend sent passwords in clear across a network is named in a warning, not refused."""

    def test_warned(self) -> None:
        """A replayed or master login over tls = "none" to a host that is not loopback gives one warning line."""
        tables = self.minimal()
        tables["imap.backend"] = {"host": '"192.0.2.7"'}
        tables["pop3"] = {"implicit_tls": '["tcp:995"]'}
        tables["pop3.backend"] = {"host": '"store.example.org"', "login": '"master"', "master_user": '"gw"',
                                  "master_password_file": toml_string(self.master_password)}
        settings = self.load(tables)
        warnings = clear_text_backends(settings)
        self.assertEqual(len(warnings), 2)
        imap, pop3 = warnings
        for line, where, what in ((imap, "[imap.backend] tls", "the clients' passwords"),
                                  (pop3, "[pop3.backend] tls", "the master password")):
            self.assertTrue(line.startswith(f"{settings.path}: {where}: "), line)
            self.assertIn(what, line)
            self.assertEqual(line.splitlines(), [line])
            self.assertNotIn(SECRET, line)

    def test_not_warned(self) -> None:
        """Loopback hosts, backend TLS and XCLIENT (no password sent) give no warning."""
        for host in ("127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1", "localhost", "LOCALHOST.", "db.localhost"):
            tables = self.minimal()
            tables["imap.backend"] = {"host": toml_string(host)}
            self.assertEqual(clear_text_backends(self.load(tables)), [], host)
        tables = self.minimal()
        tables["imap.backend"] = {"host": '"192.0.2.7"', "tls": '"implicit"', "port": "993"}
        tables["submission"] = {"implicit_tls": '["tcp:465"]'}
        tables["submission.backend"] = {"host": '"192.0.2.8"', "login": '"xclient"'}
        self.assertEqual(clear_text_backends(self.load(tables)), [])
