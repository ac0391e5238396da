"""Tests for etc/: the example configuration stays valid and complete, and the systemd unit verifies."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from gateway import config
from gateway.config import MAX_WORKERS, Settings, parse_settings
from gateway.tap import DEFAULT_CONFIG, EX_CONFIG

PROJECT = Path(__file__).resolve().parent.parent
EXAMPLE = PROJECT / "etc" / "mailgateway.toml"
UNIT = PROJECT / "etc" / "mailgateway.service"
INSTALLED_TWISTD = "/opt/mailgateway/venv/bin/twistd"

# Keys whose value is a file the validator opens; the example's production paths do not exist here.
FILE_KEYS = frozenset({"certificate", "private_key", "users_file", "ca_file", "master_password_file",
                       "senders_file"})
DIRECTORY_KEYS = frozenset({"acme_webroot"})
MASTER_PASSWORD = b"example-master-password"

_HEADER = re.compile(r"^\[([\w.]+)\]\s*$")
_ACTIVE = re.compile(r"^(\w+)\s*=")
_ALTERNATIVE = re.compile(r"^# (\w+) = (.+)$")


def example_lines() -> list[tuple[str, str, str | None]]:
    """
    Return the example's key lines with their table.

    :returns: (table, key, value) for active lines, where value is None, and for commented-out
        alternatives ("# key = value"), where value is the TOML text of the alternative value.
    """
    table = ""
    found: list[tuple[str, str, str | None]] = []
    for line in EXAMPLE.read_text().splitlines():
        if header := _HEADER.match(line):
            table = header[1]
        elif active := _ACTIVE.match(line):
            found.append((table, active[1], None))
        elif alternative := _ALTERNATIVE.match(line):
            found.append((table, alternative[1], alternative[2]))
    return found


def section(data: dict[str, Any], table: str) -> dict[str, Any]:
    """
    Return one table of decoded TOML data, by its dotted name.

    :param data: the decoded document.
    :param table: e.g. C{"imap.backend"}.
    :returns: the table itself (not a copy).
    """
    for part in table.split("."):
        data = data[part]
    return data


def settings_section(settings: Settings, table: str) -> object:
    """
    Return the part of the settings that one table becomes.

    :param settings: validated settings.
    :param table: a table name of the configuration.
    :returns: the settings object holding that table's values as attributes.
    """
    assert settings.imap is not None and settings.pop3 is not None and settings.submission is not None
    return {"gateway": settings, "tls": settings.tls, "auth": settings.auth, "limits": settings.limits,
            "imap": settings.imap, "imap.backend": settings.imap.backend,
            "pop3": settings.pop3, "pop3.backend": settings.pop3.backend,
            "submission": settings.submission, "submission.backend": settings.submission.backend,
            "web": settings.web, "metrics": settings.metrics}[table]


class ExampleTests(SynchronousTestCase):
    """etc/mailgateway.toml is accepted by the validator as it is, alternatives included."""

    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="mailgateway-etc-"))
        self.addCleanup(shutil.rmtree, self.directory)
        with EXAMPLE.open("rb") as f:
            self.example = tomllib.load(f)

    def with_files(self, data: dict[str, Any]) -> dict[str, Any]:
        """
        Replace every file and directory path in the data by one created for the test.

        :param data: decoded configuration; not changed.
        :returns: a copy whose file keys name existing files (a master password file of mode 0600),
            and whose directory keys existing directories.
        """
        data = copy.deepcopy(data)
        tables = [("", data)]
        while tables:
            name, table = tables.pop()
            for key, value in table.items():
                if isinstance(value, dict):
                    tables.append((f"{name}.{key}".lstrip("."), value))
                elif isinstance(value, list) and all(isinstance(item, dict) for item in value):
                    tables.extend((f"{name}.{key}{number}".lstrip("."), item) for number, item in enumerate(value))
                elif key in FILE_KEYS:
                    path = self.directory / f"{name}.{key}"
                    path.write_bytes(MASTER_PASSWORD + b"\n" if key == "master_password_file" else b"")
                    path.chmod(0o600)
                    table[key] = str(path)
                elif key in DIRECTORY_KEYS:
                    path = self.directory / f"{name}.{key}"
                    path.mkdir(exist_ok=True)
                    table[key] = str(path)
        return data

    def parse(self, data: dict[str, Any]) -> Settings:
        """
        Validate the data as if it were the example file.

        :param data: decoded configuration with usable file paths.
        :returns: the settings.
        """
        return parse_settings(str(EXAMPLE), data)

    def assert_values(self, settings: Settings, data: dict[str, Any], keys: list[tuple[str, str]]) -> None:
        """
        Assert that each key's value in the data is the value in the settings.

        :param settings: what the data validated into.
        :param data: the decoded configuration.
        :param keys: (table, key) pairs to compare.
        """
        for table, key in keys:
            value = section(data, table)[key]
            part = settings_section(settings, table)
            if key == "master_password_file":
                self.assertEqual(getattr(part, "master_password"), MASTER_PASSWORD)
            elif key == "sni":
                named = [{"names": list(n.names), "certificate": n.certificate, "private_key": n.private_key}
                         for n in getattr(part, key)]
                self.assertEqual(named, value)
            elif key in ("trusted_networks", "proxy_sources"):
                self.assertEqual(tuple(str(network) for network in getattr(part, key)), tuple(value))
            elif key == "workers" and value == "auto":
                self.assertEqual(getattr(part, key), min(os.cpu_count() or 1, MAX_WORKERS))
            else:
                expected = tuple(value) if isinstance(value, list) else value
                self.assertEqual(getattr(part, key), expected, f"[{table}] {key}")

    def test_example_is_valid(self) -> None:
        """The example, with its files present, validates and every value it sets is used as written."""
        data = self.with_files(self.example)
        settings = self.parse(data)
        self.assert_values(settings, data, [(t, k) for t, k, v in example_lines() if v is None])

    def test_alternatives_are_valid(self) -> None:
        """The commented-out alternatives of each table, applied together, validate and are used."""
        alternatives: dict[str, list[tuple[str, str]]] = {}
        for table, key, value in example_lines():
            if value is not None:
                alternatives.setdefault(table, []).append((key, value))
        self.assertEqual(sorted(alternatives), ["auth", "gateway", "imap", "imap.backend", "limits", "pop3.backend",
                                                 "submission", "submission.backend", "tls", "web"])
        for table, lines in alternatives.items():
            data = copy.deepcopy(self.example)
            for key, value in lines:
                section(data, table)[key] = tomllib.loads(f"{key} = {value}")[key]
            if section(data, table).get("mode") == "backend":
                # As the example says: the backend deciding means no users file.
                del section(data, table)["users_file"]
            data = self.with_files(data)
            self.assert_values(self.parse(data), data, [(table, key) for key, _ in lines])

    def test_every_key_documented(self) -> None:
        """Every key the validator reads, in every table, appears in the example, active or as an alternative."""
        known: dict[str, set[str]] = {}
        finish = config._Table.finish

        def record(table: config._Table) -> None:
            # Each table is read completely before finish(), so its read keys are all the keys it knows.
            known[table.name] = set(table._read)
            finish(table)

        self.patch(config._Table, "finish", record)
        self.parse(self.with_files(self.example))
        documented: dict[str, set[str]] = {table: set() for table in known}
        for table, key, _ in example_lines():
            documented.setdefault(table, set()).add(key)
        for table in known:
            # A table's sub-tables are its keys too, documented by their own headers.
            parent, _, child = table.rpartition(".")
            if table:
                documented.setdefault(parent, set()).add(child)
        self.assertEqual(set(known), {"", "gateway", "tls", "auth", "limits", "imap", "imap.backend", "pop3", "pop3.backend",
                                           "submission", "submission.backend", "web", "metrics"})
        self.assertEqual(documented, known)

    def test_listeners_take_every_address(self) -> None:
        """The example listens on "::" (IPv6, and IPv4 on Linux) on the standard ports, with TLS and STARTTLS."""
        settings = self.parse(self.with_files(self.example))
        assert settings.imap is not None and settings.pop3 is not None and settings.submission is not None
        for descriptions, port in ((settings.imap.implicit_tls, 993), (settings.imap.starttls, 143),
                                   (settings.pop3.implicit_tls, 995), (settings.pop3.starttls, 110),
                                   (settings.submission.implicit_tls, 465), (settings.submission.starttls, 587)):
            reactor = MemoryReactor()
            for description in descriptions:
                serverFromString(reactor, description).listen(Factory())
            self.assertEqual([(p, interface) for p, _, _, interface in reactor.tcpServers], [(port, "::")])

    def test_backends_beside_the_listeners(self) -> None:
        """
        The example's backends on this machine use ports its listeners leave free: the listeners
        take "::", IPv4 included, so a backend on a standard port could not start beside them.
        """
        settings = self.parse(self.with_files(self.example))
        assert settings.imap is not None and settings.pop3 is not None and settings.submission is not None
        assert settings.web is not None and settings.metrics is not None
        reactor = MemoryReactor()
        for descriptions in (settings.imap.implicit_tls, settings.imap.starttls, settings.pop3.implicit_tls,
                             settings.pop3.starttls, settings.submission.implicit_tls, settings.submission.starttls,
                             settings.web.https, settings.web.http, settings.metrics.listen):
            for description in descriptions:
                serverFromString(reactor, description).listen(Factory())
        taken = {port for port, _, _, _ in reactor.tcpServers}
        self.assertEqual(len(taken), 9)
        for backend in (settings.imap.backend, settings.pop3.backend, settings.submission.backend):
            self.assertEqual(backend.host, "127.0.0.1")
            self.assertNotIn(backend.port, taken)
        # The ports the comments tell Dovecot and Postfix to move to.
        self.assertEqual([settings.imap.backend.port, settings.pop3.backend.port, settings.submission.backend.port],
                         [10143, 10110, 10587])
        text = EXAMPLE.read_text()
        for port in (10143, 10110, 10587):
            self.assertIn(f"port = {port}\n", text)
        self.assertIn("127.0.0.1:10587 inet n - y - - smtpd", text)


class UnitTests(SynchronousTestCase):
    """etc/mailgateway.service is a valid, hardened systemd unit."""

    def directives(self) -> dict[str, list[str]]:
        """
        Return the unit's directives.

        :returns: each key to its values, in order.
        """
        found: dict[str, list[str]] = {}
        for line in UNIT.read_text().splitlines():
            if line and not line.startswith(("#", "[")):
                key, _, value = line.partition("=")
                found.setdefault(key, []).append(value)
        return found

    def test_verify(self) -> None:
        """systemd-analyze verify accepts the unit without a warning, with ExecStart pointed at this venv's twistd."""
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            self.fail("systemd-analyze is missing: apt-get install systemd")
        twistd = Path(sys.executable).parent / "twistd"
        if not twistd.exists():
            found = shutil.which("twistd")
            if found is None:
                self.fail(f"no twistd next to {sys.executable} or on PATH: pip install twisted into the venv")
            twistd = Path(found)
        text = UNIT.read_text()
        self.assertEqual(text.count(INSTALLED_TWISTD), 2)  # the start, and the check before a reload
        directory = Path(tempfile.mkdtemp(prefix="mailgateway-unit-"))
        self.addCleanup(shutil.rmtree, directory)
        # verify requires ExecStart's binary to exist; it does not require the User= account.
        unit = directory / UNIT.name
        unit.write_text(text.replace(INSTALLED_TWISTD, str(twistd)))
        result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120)
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, output)
        # Unknown keys are only warnings (exit status 0), so any line about this unit is a failure.
        self.assertEqual([line for line in output.splitlines() if UNIT.name in line], [])

    def test_exec_start(self) -> None:
        """The unit runs the installed twistd in the foreground, without a pid file, on the default configuration."""
        self.assertEqual(self.directives()["ExecStart"],
                         [f"{INSTALLED_TWISTD} --nodaemon --pidfile= mailgateway --config {DEFAULT_CONFIG}"])

    def test_hardening(self) -> None:
        """The unit runs as its own user, may only bind low ports, and sees a read-only system."""
        directives = self.directives()
        for key, value in (
            ("User", "mailgateway"), ("Group", "mailgateway"),
            ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"), ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
            ("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"), ("PrivateDevices", "yes"), ("ProtectKernelTunables", "yes"),
            ("ProtectKernelModules", "yes"), ("ProtectKernelLogs", "yes"), ("ProtectControlGroups", "yes"),
            ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"), ("RestrictNamespaces", "yes"),
            ("LockPersonality", "yes"), ("SystemCallArchitectures", "native"),
            ("StateDirectory", "mailgateway"), ("Restart", "on-failure"), ("Type", "notify"),
        ):
            self.assertEqual(directives.get(key), [value], key)

    def test_reload_and_no_write_execute_ban(self) -> None:
        """
        A reload checks the configuration, and only then sends SIGHUP (systemd stops at the first
        ExecReload= that fails); no MemoryDenyWriteExecute (cffi needs W+X memory).
        """
        directives = self.directives()
        self.assertEqual(directives.get("ExecReload"),
                         [f"{INSTALLED_TWISTD} mailgateway --config {DEFAULT_CONFIG} --check", "/bin/kill -HUP $MAINPID"])
        self.assertNotIn("MemoryDenyWriteExecute", directives)

    def test_configuration_error_not_restarted(self) -> None:
        """
        A configuration error (78) is not restarted every RestartSec= for ever; no_ready_worker
        (69) still is. No ExecStartPre=, whose failure RestartPreventExitStatus= would not see.
        """
        directives = self.directives()
        self.assertEqual(directives.get("RestartPreventExitStatus"), [str(EX_CONFIG)])
        self.assertNotIn("69", directives["RestartPreventExitStatus"][0].split())
        self.assertNotIn("ExecStartPre", directives)

    def test_description(self) -> None:
        """The description names every kind of service the gateway offers."""
        [description] = self.directives()["Description"]
        for served in ("IMAP", "POP3", "submission", "web"):
            self.assertIn(served, description)
