"""
The real gateway as a child process, for integration tests, the demo and the benchmark.

It writes a configuration and a users file into a directory, runs
C{python -m twisted mailgateway --config ...} (from this source tree), and learns the ports it
listens on from its own C{listening} log lines, so every listener can use port 0.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping

from gateway.testing.host import end_process
from gateway.userdb import hash_password

SOURCE_TREE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The supervisor's line when there are workers (which log their own, inherited, ones too).
SESSION_NAME = r"[A-Za-z0-9_-]{12}"
"""A session's name, as every log line about a connection ends with it (see L{gateway.backend.new_session_id})."""
_WORKER_STARTED = re.compile(r"worker_started worker=(\d+) pid=(\d+)")
_LISTENING = re.compile(r"listening protocol=(\w+) tls=(\w+) (?:held_for=workers )?endpoint=\S+ address=(\S+):(\d+)")


class GatewayProcess:
    """
    One gateway child process with its own configuration.

    :ivar ports: (protocol, "implicit_tls" | "starttls") -> port, once started.
    :ivar config_path: the configuration file written by L{start}.
    :ivar log_path: everything the gateway logged (text format).
    """

    def __init__(
        self,
        directory: str,
        *,
        imap_backend_port: int | None,
        users: Mapping[str, str] | None,
        pop3_backend_port: int | None = None,
        certificate: str | None = None,
        private_key: str | None = None,
        host: str = "127.0.0.1",
        settings: str = "",
        imap_backend: str = "",
        pop3_backend: str = "",
        submission_backend_port: int | None = None,
        submission_backend: str = "",
        submission: str = "",
        proxy: bool = False,
        workers: int = 1,
        auth: str = "",
        listeners: tuple[str, ...] = (),
        backend_host: str = "127.0.0.1",
    ) -> None:
        """
        :param imap_backend_port: the plaintext IMAP store; None serves no IMAP.
        :param pop3_backend_port: the plaintext POP3 store; None serves no POP3.
        :param users: user name to password for the local users file; None for auth mode "backend".
        :param certificate: chain file; with C{private_key}. None means C{self_signed = true}.
        :param settings: extra TOML tables appended to the configuration (e.g. C{[limits]}).
        :param imap_backend: extra keys for the C{[imap.backend]} table.
        :param pop3_backend: extra keys for the C{[pop3.backend]} table.
        :param submission_backend_port: the MTA's plaintext submission port; None serves no submission.
        :param submission_backend: extra keys for the C{[submission.backend]} table.
        :param submission: extra keys for the C{[submission]} table (senders_file, max_message_size, ...).
        :param proxy: listeners expect a PROXY header (C{haproxy:}); give C{[limits] proxy_sources} in C{settings}.
        :param workers: C{[gateway] workers}.
        :param auth: extra keys for the C{[auth]} table.
        :param host: the address every listener binds, unless C{listeners} are given.
        :param listeners: endpoint descriptions for every protocol's C{implicit_tls} and
            C{starttls} lists (e.g. C{tcp6:0:interface=\\:\\:1}); by default C{tcp:0:interface=HOST}.
        :param backend_host: the C{host} of every backend.
        """
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self._imap_backend_port = imap_backend_port
        self._users = users
        self._certificate = certificate
        self._private_key = private_key
        self._host = host
        self._settings = settings
        self._imap_backend = imap_backend
        self._pop3_backend_port = pop3_backend_port
        self._pop3_backend = pop3_backend
        self._submission_backend_port = submission_backend_port
        self._submission_backend = submission_backend
        self._submission = submission
        self._proxy = proxy
        self._workers = workers
        self._auth = auth
        self._listeners = listeners or (f"tcp:0:interface={host}",)
        self._backend_host = backend_host
        self.config_path = os.path.join(self.directory, "mailgateway.toml")
        self.log_path = os.path.join(self.directory, "mailgateway.log")
        self.users_path = os.path.join(self.directory, "users")
        self.ports: dict[tuple[str, str], int] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._run_start = 0  # where the latest run's lines begin in the log

    @property
    def pid(self) -> int | None:
        """The child's process id once started, until stopped."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """True while the child process is alive."""
        return self._process is not None and self._process.poll() is None

    def worker_pids(self) -> dict[int, int]:
        """Worker number -> process id of its latest start, from the supervisor's log (empty with one process)."""
        return {int(n): int(pid) for n, pid in _WORKER_STARTED.findall(self.log())}

    def port(self, protocol: str, tls: str) -> int:
        """The port of one listener, e.g. C{port("imap", "implicit_tls")}."""
        if len(self._listeners) > 1:
            raise AssertionError("several listeners of each kind: which one? (listener_port)")
        return self.ports[(protocol, tls)]

    def listener_port(self, protocol: str, tls: str, address: str) -> int:
        """The port of the listener of C{protocol} and C{tls} bound to C{address}, where there are several."""
        for found in _LISTENING.finditer(self._this_run_log()):
            if (found[1], found[2], found[3].strip("[]")) == (protocol, tls, address):
                return int(found[4])
        raise AssertionError(f"no {protocol} {tls} listener on {address}; the log ends with:\n{self.log()[-3000:]}")

    def write_config(self) -> None:
        """Write the users file (argon2id hashes) and the configuration."""
        if self._users is not None:
            with open(self.users_path, "w", encoding="utf-8") as f:
                for user, password in self._users.items():
                    f.write(f"{user}:{hash_password(password.encode('utf-8'))}\n")
            os.chmod(self.users_path, 0o600)
        if self._certificate is None:
            tls = "self_signed = true"
        else:
            tls = f'certificate = "{self._certificate}"\nprivate_key = "{self._private_key}"'
        auth = f'mode = "local"\nusers_file = "{self.users_path}"' if self._users is not None else 'mode = "backend"'
        # JSON strings are TOML basic strings: an IPv6 interface's escaping backslashes stay.
        listen = ", ".join(json.dumps(("haproxy:" if self._proxy else "") + listener) for listener in self._listeners)
        protocols = ""
        for name, port, table, backend in self._protocols():
            if port is not None:
                protocols += (f'[{name}]\nimplicit_tls = [{listen}]\nstarttls = [{listen}]\n{table}\n\n'
                              f'[{name}.backend]\nhost = "{self._backend_host}"\nport = {port}\n{backend}\n\n')
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(f"""\
[gateway]
hostname = "localhost"
state_dir = "{self.directory}/state"
workers = {self._workers}

[tls]
{tls}

[auth]
{auth}
failure_delay = 0.2
# Flat: tests make many failures from 127.0.0.1; escalation is covered by unit tests.
failure_delay_max = 0.2
{self._auth}

{protocols}
{self._settings}
""")

    def _protocols(self) -> tuple[tuple[str, int | None, str, str], ...]:
        return (("imap", self._imap_backend_port, "", self._imap_backend),
                ("pop3", self._pop3_backend_port, "", self._pop3_backend),
                ("submission", self._submission_backend_port, self._submission, self._submission_backend))

    def start(self, timeout: float = 30.0) -> None:
        """
        Start the gateway and wait until every listener is up.

        :raises RuntimeError: with the end of the gateway's log if it exits or does not listen in time.
        """
        self.write_config()
        log = open(self.log_path, "ab")
        self._run_start = len(self.log())  # a restart's log goes on after an earlier run's: only its own lines tell
        self._process = subprocess.Popen(
            [sys.executable, "-m", "twisted", "--log-format=text", "mailgateway", "--config", self.config_path],
            cwd=SOURCE_TREE, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log_text = self._this_run_log()
            self.ports = {(m[1], m[2]): int(m[4]) for m in _LISTENING.finditer(log_text)}
            expected = 2 * sum(port is not None for _, port, _, _ in self._protocols())
            ready = "Starting reactor" in log_text and (self._workers == 1 or log_text.count("worker_ready") >= self._workers)
            if len(self.ports) >= expected and ready:
                return
            if self._process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the gateway did not start; its log ends with:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        """Stop the child (SIGTERM, then SIGKILL after 10 s) and wait for it."""
        process, self._process = self._process, None
        end_process(process)

    def log(self) -> str:
        """Everything the gateway has logged so far."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def _this_run_log(self) -> str:
        """What the gateway has logged since its latest start."""
        return self.log()[self._run_start:]

    def wait_for_log(self, pattern: str, timeout: float = 10.0, count: int = 1) -> re.Match[str]:
        """
        Wait until C{count} log lines match the regular expression C{pattern}; return the last
        of those matches.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = list(itertools.islice(re.finditer(pattern, self.log()), count))
            if len(found) == count:
                return found[-1]
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {count} log lines match {pattern!r}; the log ends with:\n"
                                     f"{self.log()[-2000:]}")
            time.sleep(0.05)
