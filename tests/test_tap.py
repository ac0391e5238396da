"""
Tests for gateway.tap: C{twistd mailgateway --check}, and the exit status of a start that a
configuration error ends (78, EX_CONFIG), in process and through the real twistd.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from gateway.config import ConfigError, load_settings
from gateway.tap import EX_CONFIG, Options, check
from test_service import GatewayFiles, expiring_in

SOURCE_TREE = str(Path(__file__).resolve().parent.parent)


def twistd() -> list[str]:
    """The command that runs this venv's twistd on the gateway of this source tree."""
    script = Path(sys.executable).parent / "twistd"
    if script.exists():
        return [sys.executable, str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class CheckTests(SynchronousTestCase):
    """check() says what a start would say about a configuration, and exits as it would."""

    def setUp(self) -> None:
        self.files = GatewayFiles(self)
        os.chmod(self.files.key, 0o600)  # no warnings but those a test is about
        self.reactor = MemoryReactorClock()

    def write(self, **config: str) -> str:
        """Write the configuration, with few enough connections for any descriptor limit."""
        return self.files.write(limits="max_connections = 100", **config)

    def run_check(self, path: str) -> tuple[int, str, str]:
        """Run the check; its status, stdout and stderr."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = check(path, self.reactor)
        return status, out.getvalue(), err.getvalue()

    def test_ok(self) -> None:
        """A usable configuration: status 0, one line naming the file, nothing bound."""
        path = self.write()
        self.assertEqual(self.run_check(path), (0, f"configuration ok: {path}\n", ""))
        self.assertEqual(self.reactor.tcpServers, [])

    def test_config_error(self) -> None:
        """A configuration error: status 78 and the one line a start ends with."""
        path = self.write(extra="[limits]\n")  # a table defined twice
        with self.assertRaises(ConfigError) as raised:
            load_settings(path)
        self.assertEqual(self.run_check(path), (EX_CONFIG, "", f"mailgateway: {raised.exception}\n"))
        self.assertEqual(EX_CONFIG, 78)

    def test_file_error(self) -> None:
        """A file the configuration names that a start could not use is an error too."""
        self.files.renew_certificate_only()
        status, out, err = self.run_check(self.write())
        self.assertEqual((status, out), (EX_CONFIG, ""))
        self.assertTrue(err.startswith(f"mailgateway: {self.files.path}: [tls]: {self.files.key}: "), err)
        self.assertEqual(err.count("\n"), 1)

    def test_expired_certificate(self) -> None:
        """An expired certificate is reported as a warning, and the configuration is still ok (a start serves it)."""
        expiring_in(-1, self.files.chain, self.files.key)
        path = self.files.write()
        status, out, err = self.run_check(path)
        self.assertEqual((status, out), (0, f"configuration ok: {path}\n"))
        [warning] = [line for line in err.splitlines() if "certificate_" in line]
        self.assertTrue(warning.startswith(f"mailgateway: warning: certificate_expired path={self.files.chain} "),
                        warning)

    def test_option(self) -> None:
        """--check checks while the options are parsed, and exits with the check's status."""
        for path, status in ((self.files.write(), 0), (os.path.join(self.files.directory, "missing.toml"), EX_CONFIG)):
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                with self.assertRaises(SystemExit) as raised:
                    Options().parseOptions(["--config", path, "--check"])
            self.assertEqual(raised.exception.code, status)


class TwistdTests(SynchronousTestCase):
    """The real twistd: exit statuses, and a check that leaves a running gateway's pid file alone."""

    def setUp(self) -> None:
        self.files = GatewayFiles(self)
        # twistd writes twistd.pid into its working directory unless told --pidfile=.
        self.cwd = tempfile.mkdtemp(prefix="mailgateway-tap-")
        self.addCleanup(shutil.rmtree, self.cwd, True)
        self.environment = dict(os.environ, PYTHONPATH=SOURCE_TREE)

    def run_twistd(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*twistd(), *arguments], cwd=self.cwd, env=self.environment, capture_output=True,
                              text=True, timeout=60)

    def test_start_with_config_error(self) -> None:
        """A start that a configuration error ends exits with 78 and one line, and leaves no pid file."""
        path = os.path.join(self.files.directory, "missing.toml")
        result = self.run_twistd("--nodaemon", "mailgateway", "--config", path)
        self.assertEqual((result.returncode, result.stderr.splitlines()[-1:]),
                         (EX_CONFIG, [f"mailgateway: {path}: cannot read the configuration file (No such file or "
                                      "directory)"]), result.stderr)
        self.assertEqual(os.listdir(self.cwd), [])

    def test_check_beside_running_gateway(self) -> None:
        """
        The check runs beside a gateway started from the same directory without --pidfile=, and
        leaves its pid file alone; a broken configuration fails the check the same way.
        """
        path = self.files.write()
        gateway = subprocess.Popen([*twistd(), "--nodaemon", "mailgateway", "--config", path], cwd=self.cwd,
                                   env=self.environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(gateway.wait, 30)
        self.addCleanup(gateway.send_signal, signal.SIGTERM)
        pid_file = os.path.join(self.cwd, "twistd.pid")
        deadline = time.monotonic() + 30
        while not os.path.exists(pid_file) and gateway.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with open(pid_file, encoding="ascii") as f:
            self.assertEqual(f.read().strip(), str(gateway.pid))
        result = self.run_twistd("mailgateway", "--config", path, "--check")
        self.assertEqual((result.returncode, result.stdout), (0, f"configuration ok: {path}\n"), result.stderr)
        self.files.renew_certificate_only()
        result = self.run_twistd("mailgateway", "--config", path, "--check")
        self.assertEqual((result.returncode, result.stdout), (EX_CONFIG, ""))
        self.assertIn(f"mailgateway: {path}: [tls]: {self.files.key}: ", result.stderr)
        self.assertIsNone(gateway.poll())
        self.assertEqual(sorted(os.listdir(self.cwd)), ["twistd.pid"])
