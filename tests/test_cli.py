"""Tests for gateway.cli: `mailgateway dns-records`, its output and its exit codes."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from gateway import cli
from gateway.tap import DEFAULT_CONFIG

PROJECT = Path(__file__).resolve().parent.parent


class CLITestCase(SynchronousTestCase):
    """Writes configuration files in a directory of its own and runs the command in process."""

    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="mailgateway-cli-"))
        self.addCleanup(shutil.rmtree, self.directory)

    def config(self, sections: str) -> str:
        """
        Write a configuration with a self-signed certificate, backend logins and the given tables.

        :param sections: TOML text with the protocol (and other) tables.
        :returns: the file's path.
        """
        path = self.directory / f"mailgateway-{len(list(self.directory.iterdir()))}.toml"
        path.write_text(
            f'[gateway]\nhostname = "mail.example.org"\nstate_dir = "{self.directory}"\n'
            '[tls]\nself_signed = true\n[auth]\nmode = "backend"\n' + sections
        )
        return str(path)

    def run_main(self, *argv: str) -> tuple[int, str, str]:
        """
        Run L{cli.main} with the given arguments.

        :returns: the exit status, standard output and standard error.
        """
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli.main(list(argv))
        return status, out.getvalue(), err.getvalue()


class DNSRecordsCommandTests(CLITestCase):
    """`mailgateway dns-records DOMAIN --config FILE`."""

    def test_records(self) -> None:
        """The records are printed one per line, derived from the configured listeners."""
        path = self.config('[imap]\nimplicit_tls = ["tcp:993"]\nstarttls = ["tcp:143"]\n'
                           '[imap.backend]\nport = 10143\n'
                           '[submission]\nimplicit_tls = ["tcp:465"]\n'
                           '[web]\nhttps = ["tcp:443"]\npublic_host = "gw.example.net"\n')
        status, out, err = self.run_main("dns-records", "example.org", "--config", path)
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(out.splitlines(), [
            "_imaps._tcp.example.org. IN SRV 0 1 993 gw.example.net.",
            "_imap._tcp.example.org. IN SRV 10 1 143 gw.example.net.",
            "_pop3s._tcp.example.org. IN SRV 0 0 0 .",
            "_pop3._tcp.example.org. IN SRV 0 0 0 .",
            "_submissions._tcp.example.org. IN SRV 0 1 465 gw.example.net.",
            "_submission._tcp.example.org. IN SRV 0 0 0 .",
            "autoconfig.example.org. IN CNAME gw.example.net.",
            "autodiscover.example.org. IN CNAME gw.example.net.",
            "_autodiscover._tcp.example.org. IN SRV 0 1 443 gw.example.net.",
        ])

    def test_other_configuration(self) -> None:
        """Another configuration gives other records: STARTTLS POP3 only, on [gateway] hostname."""
        path = self.config('[pop3]\nstarttls = ["tcp6:1110:interface=\\\\:\\\\:"]\n')
        status, out, _ = self.run_main("dns-records", "example.com", "-c", path)
        self.assertEqual(status, 0)
        self.assertEqual(out.splitlines(), [
            "_imaps._tcp.example.com. IN SRV 0 0 0 .",
            "_imap._tcp.example.com. IN SRV 0 0 0 .",
            "_pop3s._tcp.example.com. IN SRV 0 0 0 .",
            "_pop3._tcp.example.com. IN SRV 30 1 1110 mail.example.org.",
            "_submissions._tcp.example.com. IN SRV 0 0 0 .",
            "_submission._tcp.example.com. IN SRV 0 0 0 .",
        ])

    def test_config_error(self) -> None:
        """A configuration error is one line on standard error, naming the file, and exit status 1."""
        missing = str(self.directory / "missing.toml")
        bad = self.config('[imap]\nimplicit_tls = ["ssl:993"]\n')
        for path in (missing, bad):
            status, out, err = self.run_main("dns-records", "example.org", "--config", path)
            self.assertEqual((status, out), (1, ""))
            self.assertEqual(len(err.splitlines()), 1, err)
            self.assertTrue(err.startswith(f"mailgateway: {path}: "), err)

    def test_bad_domain(self) -> None:
        """A domain that is not a host name is one line on standard error and exit status 1."""
        path = self.config('[imap]\nimplicit_tls = ["tcp:993"]\n')
        status, out, err = self.run_main("dns-records", "not a domain", "--config", path)
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(err, "mailgateway: not a domain name: 'not a domain'\n")

    def test_usage_errors(self) -> None:
        """No subcommand, an unknown one, a missing domain or an unknown option is exit status 2."""
        for argv in ((), ("frobnicate",), ("dns-records",), ("dns-records", "example.org", "--bogus")):
            status, out, err = self.run_main(*argv)
            self.assertEqual((status, out), (2, ""), argv)
            self.assertIn("usage: mailgateway", err)

    def test_version(self) -> None:
        """--version prints the installed release and exits 0."""
        status, out, _ = self.run_main("--version")
        self.assertEqual((status, out), (0, f"mailgateway {importlib.metadata.version('mailgateway')}\n"))

    def test_help(self) -> None:
        """--help prints the subcommand's usage, with the default configuration file, and exits 0."""
        status, out, _ = self.run_main("dns-records", "--help")
        self.assertEqual(status, 0)
        self.assertIn("DOMAIN", out)
        self.assertIn(DEFAULT_CONFIG, out)

    def test_default_config(self) -> None:
        """Without --config the service's default configuration file is read."""
        self.assertEqual(DEFAULT_CONFIG, "/etc/mailgateway/mailgateway.toml")
        read: list[str] = []

        def load_settings(path: str) -> object:
            read.append(path)
            raise cli.ConfigError(f"{path}: stand-in")

        self.patch(cli, "load_settings", load_settings)
        status, _, err = self.run_main("dns-records", "example.org")
        self.assertEqual((status, read), (1, [DEFAULT_CONFIG]))
        self.assertEqual(err, f"mailgateway: {DEFAULT_CONFIG}: stand-in\n")


class ModuleTests(CLITestCase):
    """`python -m gateway.cli` is the same command."""

    def run_module(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run C{python -m gateway.cli} from the source tree."""
        return subprocess.run([sys.executable, "-m", "gateway.cli", *argv], cwd=PROJECT, capture_output=True,
                              text=True, timeout=60)

    def test_module(self) -> None:
        """The module prints the records and exits 0, or 1 with one line for a bad configuration."""
        path = self.config('[submission]\nstarttls = ["tcp:587"]\n[submission.backend]\nport = 10587\n')
        result = self.run_module("dns-records", "example.org", "--config", path)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("_submission._tcp.example.org. IN SRV 10 1 587 mail.example.org.", result.stdout.splitlines())
        result = self.run_module("dns-records", "example.org", "--config", str(self.directory / "missing.toml"))
        self.assertEqual((result.returncode, result.stdout), (1, ""))
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
