"""A private, plaintext Dovecot IMAP/POP3 server in a directory of its own, for tests and demos.

The sandbox shares nothing with the system's Dovecot: configuration, sockets,
state, logs, password file and Maildirs all live under one directory, and the
master process is a child of this process, so that :meth:`DovecotSandbox.stop`
stops exactly the server that :meth:`DovecotSandbox.start` started.

It needs root: Dovecot's master must start as root, and the sandbox hands the
Maildirs to the unprivileged ``mail`` account because Dovecot refuses to run
mail processes as uid 0.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time

from gateway.testing.host import ServerSandbox, accepts, check_searchable, free_ports, gid, uid

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0
_POLL_INTERVAL = 0.02
_LOG_TAIL_BYTES = 4096

# Dovecot creates unix sockets as deep as base_dir + "/token-login/imap-urlauth"
# (25 bytes); sun_path holds 107 bytes plus the terminating NUL.
_MAX_BASE_DIR_BYTES = 107 - 32

_FORBIDDEN_IN_NAMES = frozenset("/:\r\n\0")
_FORBIDDEN_IN_PASSWORDS = frozenset(":\r\n\0")


class DovecotNotInstalled(RuntimeError):
    """The ``dovecot`` binary is not on ``PATH``; the message names the Debian packages."""

    def __init__(self) -> None:
        """Build the exception with its fixed message."""
        super().__init__(
            "dovecot is not installed: "
            "apt-get install dovecot-imapd dovecot-pop3d dovecot-submissiond"
        )


class DovecotSandbox(ServerSandbox):
    """A Dovecot instance serving plaintext IMAP and POP3 for a fixed set of users.

    Layout under ``directory``: ``dovecot.conf``, ``users.passwd`` (PLAIN
    passwords, mode 0640, group ``dovecot``), ``run/`` (Dovecot's ``base_dir``),
    ``state/``, ``dovecot.log`` (warnings and errors, plus anything the master
    writes to stderr), ``dovecot-info.log`` (info lines such as
    ``imap-login: Login: user=<u>, method=PLAIN, rip=..., lip=...``) and
    ``home/<user>/Maildir``.

    Mail processes run as the ``mail`` account, login processes as
    ``dovenull`` and internal ones as ``dovecot``. User names are used verbatim
    (case-sensitive). Clients in ``trusted_networks`` may set their original
    address with IMAP ``ID ("x-originating-ip" ...)``. IMAP offers
    ``COMPRESS=DEFLATE`` after login. Tests are not throttled: a failed login
    is answered within about half a second (no 2 s failure delay, no growing
    per-address penalty) and each user may hold up to 1000 concurrent
    sessions per client address.

    Ports given as 0 are chosen when the sandbox is built, by
    :func:`~gateway.testing.host.free_ports` (below the ephemeral range, so no
    outgoing connection takes them); another process may still take one
    before :meth:`start` binds it, in which case :meth:`start` fails.

    :ivar imap_port: the IMAP port, never 0.
    :ivar pop3_port: the POP3 port, never 0.
    :ivar config_path: the Dovecot configuration file, e.g. for ``doveadm -c``.
    """

    _name = "dovecot"

    def __init__(
        self,
        directory: str,
        users: dict[str, str],
        *,
        host: str = "127.0.0.1",
        imap_port: int = 0,
        pop3_port: int = 0,
        trusted_networks: str = "127.0.0.0/8",
        extra_config: str = "",
    ) -> None:
        """Describe a sandbox; nothing is written or started until :meth:`start`.

        :param directory: where everything lives; created if missing and made mode 0755.
            Every directory above it must be searchable by other users (o+x).
        :param users: user name to password.
        :param host: the single address Dovecot listens on.
        :param imap_port: IMAP port, or 0 to pick a free one.
        :param pop3_port: POP3 port, or 0 to pick a free one.
        :param trusted_networks: Dovecot ``login_trusted_networks`` (space-separated CIDRs).
        :param extra_config: Dovecot configuration appended last, so it overrides the defaults.
        :raises DovecotNotInstalled: if ``dovecot`` is not on ``PATH``.
        :raises ValueError: if a user name or password cannot be stored in a passwd-file,
            or ``directory`` is too long for Dovecot's unix sockets.
        :raises RuntimeError: if the ``mail`` or ``dovecot`` account is missing.
        """
        binary = shutil.which("dovecot")
        if binary is None:
            raise DovecotNotInstalled()
        self._binary = binary
        self._directory = os.path.abspath(directory)
        base_dir = os.path.join(self._directory, "run")
        if len(os.fsencode(base_dir)) > _MAX_BASE_DIR_BYTES:
            raise ValueError(
                f"sandbox directory {self._directory!r} is too long: Dovecot's unix sockets "
                "under it would exceed the 107-byte socket path limit"
            )
        for user, password in users.items():
            if not user or user in (".", "..") or _FORBIDDEN_IN_NAMES.intersection(user):
                raise ValueError(f"user name {user!r} cannot be used in a Dovecot passwd-file")
            if _FORBIDDEN_IN_PASSWORDS.intersection(password):
                raise ValueError(
                    f"the password of user {user!r} contains ':' or a control character "
                    "that a Dovecot passwd-file cannot hold"
                )
        self._users = dict(users)
        self._mail_uid = uid("mail", "dovecot-core")
        self._mail_gid = gid("mail", "dovecot-core")
        self._dovecot_gid = gid("dovecot", "dovecot-core")
        self._host = host
        self._trusted_networks = trusted_networks
        self._extra_config = extra_config
        self._instance_name = f"mailgateway-{secrets.token_hex(4)}"
        free = iter(free_ports(host, [imap_port, pop3_port].count(0)))
        self.imap_port: int = imap_port or next(free)
        self.pop3_port: int = pop3_port or next(free)
        self.config_path: str = os.path.join(self._directory, "dovecot.conf")
        self._base_dir = base_dir
        self._passwd_path = os.path.join(self._directory, "users.passwd")
        self._process: subprocess.Popen[bytes] | None = None
        self._delivered = 0

    @property
    def log_path(self) -> str:
        """Path of Dovecot's main log (warnings, errors, and the master's stderr)."""
        return os.path.join(self._directory, "dovecot.log")

    @property
    def info_log_path(self) -> str:
        """Path of Dovecot's info log, which holds the ``Login:`` lines."""
        return os.path.join(self._directory, "dovecot-info.log")

    def start(self) -> None:
        """Write the configuration, start Dovecot and wait until both ports greet.

        Existing Maildirs are kept, so :meth:`stop` followed by :meth:`start`
        serves the same mail on the same ports.

        :raises RuntimeError: if the sandbox is already running, a directory above
            ``directory`` is not searchable by other users, or Dovecot exits or
            does not greet on both ports within 10 seconds; the message then ends
            with the tail of :attr:`log_path`.
        """
        if self._process is not None:
            if self._process.poll() is None:
                raise RuntimeError("this Dovecot sandbox is already running")
            # The master died on its own; it has been reaped, so start afresh.
            self._process = None
        self._prepare()
        with open(self.log_path, "ab") as log:
            # -F keeps the master in the foreground as our child, so that its
            # PID is known without a pid file and stop() can reap it.
            self._process = subprocess.Popen(
                [self._binary, "-F", "-c", self.config_path],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        self._await_greetings({self.imap_port: b"* OK", self.pop3_port: b"+OK"}, _START_TIMEOUT, _POLL_INTERVAL)

    def stop(self) -> None:
        """Stop the Dovecot master this sandbox started and wait until both ports are closed.

        The master gets SIGTERM, and SIGKILL if it has not exited after 10
        seconds. Stopping a sandbox that is not running does nothing.

        :raises RuntimeError: if a port still accepts connections 10 seconds after the
            master exited.
        """
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        deadline = time.monotonic() + _STOP_TIMEOUT
        while accepts(self._host, self.imap_port) or accepts(self._host, self.pop3_port):
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"dovecot ports {self.imap_port}/{self.pop3_port} on {self._host} "
                    f"still accept connections {_STOP_TIMEOUT:g} s after the master exited"
                )
            time.sleep(_POLL_INTERVAL)

    def maildir(self, user: str) -> str:
        """Return the path of ``user``'s Maildir (which exists once started or delivered to).

        :raises KeyError: if ``user`` is not one of the sandbox's users.
        """
        if user not in self._users:
            raise KeyError(user)
        return os.path.join(self._directory, "home", user, "Maildir")

    def message_files(self, user: str, folder: str = "INBOX") -> list[str]:
        """Return the paths of the messages stored in one of ``user``'s folders.

        Both ``new/`` and ``cur/`` are listed, sorted by file name (which starts
        with the delivery time). Folders other than INBOX are looked up in
        Maildir++ layout, i.e. ``Maildir/.<folder>`` with the name as Dovecot
        stores it (``.`` as hierarchy separator, modified UTF-7). A folder that
        does not exist yet holds no messages.

        :raises KeyError: if ``user`` is not one of the sandbox's users.
        """
        root = self.maildir(user)
        if folder != "INBOX":
            root = os.path.join(root, f".{folder}")
        found: list[tuple[str, str]] = []
        for sub in ("new", "cur"):
            path = os.path.join(root, sub)
            if os.path.isdir(path):
                found.extend(
                    (name, os.path.join(path, name))
                    for name in os.listdir(path)
                    if not name.startswith(".")
                )
        return [path for _, path in sorted(found)]

    def deliver(self, user: str, message: bytes) -> str:
        """Store ``message`` in ``user``'s INBOX as is, without going through Dovecot.

        The file is written to ``Maildir/tmp``, owned by the mail account, then
        renamed into ``Maildir/new``, so Dovecot never sees a partial message.
        Dovecot serves a stored message with CRLF line endings, so byte-for-byte
        comparisons over IMAP want ``message`` to use CRLF already.

        :returns: the path of the message in ``Maildir/new``.
        :raises KeyError: if ``user`` is not one of the sandbox's users.
        """
        maildir = self._make_maildir(user)
        self._delivered += 1
        now = time.time()
        host = socket.gethostname().replace("/", r"\057").replace(":", r"\072")
        name = f"{int(now)}.M{int(now % 1 * 1_000_000)}P{os.getpid()}Q{self._delivered}.{host}"
        tmp_path = os.path.join(maildir, "tmp", name)
        new_path = os.path.join(maildir, "new", name)
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            os.fchown(f.fileno(), self._mail_uid, self._mail_gid)
            f.write(message)
        os.rename(tmp_path, new_path)
        return new_path

    def _prepare(self) -> None:
        """Create the directory tree, the password file and the configuration."""
        os.makedirs(self._directory, exist_ok=True)
        os.chmod(self._directory, 0o755)
        check_searchable(os.path.dirname(self._directory), "Dovecot's mail and auth processes")
        for sub in ("run", "state", "home"):
            path = os.path.join(self._directory, sub)
            os.makedirs(path, exist_ok=True)
            os.chmod(path, 0o755)
        for user in self._users:
            self._make_maildir(user)

        lines = [
            f"{user}:{{PLAIN}}{password}:{self._mail_uid}:{self._mail_gid}::"
            f"{os.path.dirname(self.maildir(user))}::\n"
            for user, password in self._users.items()
        ]
        fd = os.open(self._passwd_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            # The auth process runs as the dovecot account and reads this file.
            os.fchown(f.fileno(), 0, self._dovecot_gid)
            os.fchmod(f.fileno(), 0o640)
            f.writelines(lines)

        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(self._config())

    def _make_maildir(self, user: str) -> str:
        """Create ``user``'s home and Maildir owned by the mail account; return the Maildir."""
        maildir = self.maildir(user)
        subdirs = [os.path.join(maildir, sub) for sub in ("cur", "new", "tmp")]
        for path in [os.path.dirname(maildir), maildir, *subdirs]:
            os.makedirs(path, exist_ok=True)
            os.chown(path, self._mail_uid, self._mail_gid)
            os.chmod(path, 0o700)
        return maildir

    def _config(self) -> str:
        """Return the text of ``dovecot.conf``."""
        return f"""\
# Generated by gateway.testing.dovecot; rewritten on every start.
instance_name = {self._instance_name}
base_dir = {self._base_dir}
state_dir = {os.path.join(self._directory, "state")}
log_path = {self.log_path}
info_log_path = {self.info_log_path}
protocols = imap pop3
listen = {self._host}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_username_format = %u
login_trusted_networks = {self._trusted_networks}
# Tests make many failed logins from one address; Dovecot's 2 s failure
# delay plus per-IP penalty (up to 15 s) would only slow them down. Failures
# still wait for the auth process's next 0.5 s flush.
auth_failure_delay = 0
mail_location = maildir:~/Maildir
default_login_user = dovenull
default_internal_user = dovecot
first_valid_uid = {self._mail_uid}
shutdown_clients = yes

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self._passwd_path}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {self._passwd_path}
}}

# No auth penalty socket means no per-IP penalty (see auth_failure_delay).
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}

# High-performance login mode: a long-lived login process serves many
# clients, so a login does not wait for a fork.
service imap-login {{
  service_count = 0
  process_min_avail = 1
  inet_listener imap {{
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  service_count = 0
  process_min_avail = 1
  inet_listener pop3 {{
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}

protocol imap {{
  mail_plugins = $mail_plugins imap_zlib
  mail_max_userip_connections = 1000
}}
protocol pop3 {{
  mail_max_userip_connections = 1000
}}

{self._extra_config}
"""

    def _log_tail(self) -> str:
        """Return the last few kilobytes of the main log, or a note that it is missing."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - _LOG_TAIL_BYTES))
                return f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log written)"
