"""A private, plaintext Postfix MTA in a directory of its own, for tests and demos.

The sandbox shares nothing with the system's Postfix: configuration, queue,
data directory, log and Maildirs all live under one directory, and
``postfix -c DIR start-fg`` runs as a child of this process, so that
:meth:`PostfixSandbox.stop` stops exactly the instance that
:meth:`PostfixSandbox.start` started.

It needs root: the Postfix master must start as root. The default
``/etc/postfix/main.cf`` is left alone and need not even exist (as after
Debian's "No configuration" install): Postfix wants a ``-c`` directory listed
in that file's ``alternate_config_directories`` only when one of its set-gid
commands (``postqueue``, ``postdrop``, hence ``sendmail``) runs for an
unprivileged user. The sandbox runs its Postfix commands as root and inspects
the queue by listing its directories.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import time

from gateway.testing.host import ServerSandbox, accepts, check_searchable, free_ports, gid, uid

_START_TIMEOUT = 20.0
_STOP_TIMEOUT = 15.0
_POLL_INTERVAL = 0.05
_LOG_TAIL_BYTES = 4096

# Postfix's administrative commands live in /usr/sbin, which an unprivileged
# user's PATH often lacks.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/sbin"])

MAIL_DOMAIN = "example.org"
"""The domain whose recipients the sandbox accepts; all others are refused."""

HOSTNAME = "mail.example.org"
"""The sandbox's ``myhostname``, which names it in the ``Received:`` headers it adds."""

# Postfix names Maildir files "<seconds>.V<dev>I<inode>M<microseconds>.<host>".
_MAILDIR_NAME_RE = re.compile(r"(\d+)\.V[0-9a-f]+I[0-9a-f]+M(\d+)\.")

# The headers virtual(8) prepends to every delivered message, in order; the last
# one is the Received: header that this Postfix's cleanup(8) added on receipt.
_PREPENDED = (b"Return-Path:", b"X-Original-To:", b"Delivered-To:", b"Received:")
_RECEIVED_BY = f"by {HOSTNAME} (Postfix) with ".encode()

# A main.cf line that sets a parameter (continuation lines start with white space).
_PARAMETER_RE = re.compile(r"^([A-Za-z0-9_]+)\s*=", re.MULTILINE)

# The queue directories that hold mail not yet delivered or bounced.
_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


class PostfixNotInstalled(RuntimeError):
    """The ``postfix`` binary is missing; the message names the Debian package."""

    def __init__(self) -> None:
        """Build the exception with its fixed message."""
        super().__init__("postfix is not installed: apt-get install postfix")


class PostfixSandbox(ServerSandbox):
    """A Postfix instance that accepts plaintext SMTP for ``@example.org`` and delivers it.

    Layout under ``directory``: ``etc/`` (``main.cf`` and ``master.cf``,
    rewritten on every start), ``queue/`` (``queue_directory``), ``data/``
    (``data_directory``, owned by the ``postfix`` account), ``postfix.log``
    (everything this instance logs, through its ``postlog`` service, plus the
    output of the ``postfix`` command) and, without LMTP, ``mail/Maildir/``,
    owned by the ``mail`` account, which receives every recipient's copy.

    The SMTP port speaks plain ESMTP with 8BITMIME, SMTPUTF8 and SIZE, and
    no TLS and no AUTH (``503``): the gateway authenticates clients and then
    names them with ``XCLIENT ADDR=... PORT=... PROTO=ESMTP LOGIN=user``, which
    clients in ``xclient_hosts`` may send after EHLO (Postfix answers with a
    new ``220`` greeting, so EHLO follows again). ``PROTO`` takes only ``SMTP``
    or ``ESMTP``; ``PROTO=ESMTPA`` is refused with ``501 5.5.4``. After
    ``LOGIN=`` the session counts as authenticated: Postfix logs
    ``client=unknown[ADDR], sasl_method=XCLIENT, sasl_username=user`` and
    its ``Received:`` header says ``with ESMTPA``.

    Mail is accepted from clients in ``127.0.0.0/8`` and ``::1`` and from
    authenticated ones, for any recipient in ``example.org`` (without LMTP,
    every local part exists; with LMTP, the LMTP server decides). Other
    domains are refused at RCPT TO with ``554 5.7.1 Relay access denied``,
    even for authenticated clients, because the sandbox relays nowhere;
    bounces to senders outside ``example.org`` fail at once (error(8)), so
    the queue never keeps mail it cannot deliver.

    Postfix keeps what the client sent, except that it prepends headers (see
    :func:`body_as_sent`): unlike a production setup, the sandbox does not
    drop ``Bcc:``, ``Return-Path:`` or ``Content-Length:`` headers
    (``message_drop_headers`` is empty), nor add or rewrite headers for local
    clients (``local_header_rewrite_clients`` is empty).

    Deferred mail is retried every second or so, so a test that stops and
    restarts the LMTP backend sees the queue drain promptly. Clients are not
    slowed down after errors.

    A port given as 0 is chosen when the sandbox is built, by
    :func:`~gateway.testing.host.free_ports` (below the ephemeral range, so no
    outgoing connection takes it); another process may still take it before
    :meth:`start` binds it, in which case :meth:`start` fails.

    :ivar smtp_port: the SMTP port, never 0.
    :ivar config_directory: the Postfix configuration directory, e.g. for ``postconf -c``.
    """

    _name = "postfix"

    def __init__(
        self,
        directory: str,
        *,
        host: str = "127.0.0.1",
        smtp_port: int = 0,
        lmtp: tuple[str, int] | None = None,
        xclient_hosts: str = "127.0.0.0/8",
        message_size_limit: int = 50 * 1024 * 1024,
        extra_main_cf: str = "",
    ) -> None:
        """Describe a sandbox; nothing is written or started until :meth:`start`.

        :param directory: where everything lives; created if missing and made mode 0755.
            Every directory above it must be searchable by other users (o+x).
        :param host: the single address Postfix listens on (IPv4 or IPv6 loopback).
        :param smtp_port: the SMTP port, or 0 to pick a free one.
        :param lmtp: ``(host, port)`` of an LMTP server (e.g. Dovecot's) that receives all
            mail for ``example.org``, or None to deliver into Maildirs under ``directory``.
        :param xclient_hosts: Postfix ``smtpd_authorized_xclient_hosts``: the clients
            allowed to send XCLIENT.
        :param message_size_limit: the largest message accepted, in bytes; larger ones get
            ``552 5.3.4``.
        :param extra_main_cf: ``main.cf`` text appended to the defaults; a parameter it sets
            replaces the default setting of that parameter.
        :raises PostfixNotInstalled: if ``postfix`` is not on ``PATH`` or in ``/usr/sbin``.
        :raises RuntimeError: if the ``postfix`` or ``mail`` account or the ``postdrop``
            group is missing.
        """
        binary = shutil.which("postfix", path=_SEARCH_PATH)
        if binary is None:
            raise PostfixNotInstalled()
        self._binary = binary
        self._postmap = os.path.join(os.path.dirname(binary), "postmap")
        self._directory = os.path.abspath(directory)
        self._postfix_uid = uid("postfix", "postfix")
        self._postfix_gid = gid("postfix", "postfix")
        self._mail_uid = uid("mail", "postfix")
        self._mail_gid = gid("mail", "postfix")
        gid("postdrop", "postfix")
        self._host = host
        self._lmtp = lmtp
        self._xclient_hosts = xclient_hosts
        self._message_size_limit = message_size_limit
        self._extra_main_cf = extra_main_cf
        self._syslog_name = f"mailgateway-postfix-{secrets.token_hex(4)}"
        self.smtp_port: int = smtp_port or free_ports(host, 1)[0]
        self.config_directory: str = os.path.join(self._directory, "etc")
        self._queue_directory = os.path.join(self._directory, "queue")
        self._mail_directory = os.path.join(self._directory, "mail")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> str:
        """Path of the Postfix log; each line carries this sandbox's unique ``syslog_name``."""
        return os.path.join(self._directory, "postfix.log")

    @property
    def syslog_name(self) -> str:
        """The ``syslog_name`` that prefixes this instance's log lines, e.g. ``NAME/smtpd[42]``."""
        return self._syslog_name

    def start(self) -> None:
        """Write the configuration, start Postfix and wait until the SMTP port greets with 220.

        The queue and the Maildirs are kept, so :meth:`stop` followed by
        :meth:`start` delivers what was queued and serves on the same port.

        :raises RuntimeError: if the sandbox is already running, a directory above
            ``directory`` is not searchable by other users, or Postfix refuses the
            configuration, exits, or does not greet within 20 seconds; the message
            then ends with the tail of :attr:`log_path`.
        """
        if self._process is not None:
            if self._process.poll() is None:
                raise RuntimeError("this Postfix sandbox is already running")
            # The master died on its own and has been reaped: start afresh.
            self._process = None
        self._prepare()
        with open(self.log_path, "ab") as log:
            # The postfix command reports a malformed main.cf only to syslog
            # (absent here) or a terminal; postmap parses main.cf the same way
            # and always reports to stderr.
            check = subprocess.run(
                [self._postmap, "-c", self.config_directory, "-q", "check", "static:ok"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                timeout=_START_TIMEOUT,
                check=False,
            )
        if check.returncode != 0:
            raise RuntimeError(
                f"postfix refuses the configuration in {self.config_directory}; "
                f"end of {self.log_path}:\n{self._log_tail()}"
            )
        with open(self.log_path, "ab") as log:
            # start-fg keeps the master (a child of the postfix-script shell
            # that this Popen runs) in the foreground, so the Popen exits
            # exactly when this instance's master does.
            self._process = subprocess.Popen(
                [self._binary, "-c", self.config_directory, "start-fg"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self._await_greetings({self.smtp_port: b"220 "}, _START_TIMEOUT, _POLL_INTERVAL)

    def stop(self) -> None:
        """Stop this sandbox's Postfix and wait until its master has exited and the port is closed.

        ``postfix -c DIR stop`` signals the master named in this instance's own
        ``master.pid``; the master takes its children with it. If the master is
        still there after 15 seconds, its process group and that of the
        ``postfix start-fg`` command (which hold only this instance's processes)
        get SIGKILL. Stopping a sandbox that is not running does nothing.

        :raises RuntimeError: if the port still accepts connections 15 seconds after
            the master exited.
        """
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            try:
                subprocess.run(
                    [self._binary, "-c", self.config_directory, "stop"],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=_STOP_TIMEOUT,
                    check=False,
                )
                process.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._kill_master()
                # The start-fg shell leads a process group of its own (see start()).
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        deadline = time.monotonic() + _STOP_TIMEOUT
        while accepts(self._host, self.smtp_port):
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"postfix port {self.smtp_port} on {self._host} still accepts "
                    f"connections {_STOP_TIMEOUT:g} s after the master exited"
                )
            time.sleep(_POLL_INTERVAL)

    @property
    def maildir(self) -> str:
        """Path of the one Maildir that receives all mail when the sandbox does not use LMTP.

        Each recipient's copy is a file of its own, whose ``Delivered-To:`` header
        names the recipient; the directory exists once a message has been delivered.
        """
        return os.path.join(self._mail_directory, "Maildir")

    def delivered(self, recipient_localpart: str) -> list[bytes]:
        """Return the messages delivered to ``<recipient_localpart>@example.org``, oldest first.

        Each message is the raw Maildir file, which begins with the headers
        Postfix prepends and has LF line endings; :func:`body_as_sent` turns it
        back into what the client sent. The recipient is matched against the
        ``Delivered-To:`` header regardless of case, as Postfix matches addresses.

        :raises ValueError: if the sandbox delivers over LMTP.
        """
        if self._lmtp is not None:
            raise ValueError("this Postfix sandbox delivers over LMTP, not into its Maildir")
        wanted = f"{recipient_localpart}@{MAIL_DOMAIN}".encode().lower()
        found: list[tuple[tuple[int, int, int], str]] = []
        for sub in ("new", "cur"):
            path = os.path.join(self.maildir, sub)
            if not os.path.isdir(path):
                continue
            for name in os.listdir(path):
                if not name.startswith("."):
                    file_path = os.path.join(path, name)
                    found.append((_delivery_time(name, file_path), file_path))
        messages = []
        for _, file_path in sorted(found):
            with open(file_path, "rb") as f:
                message = f.read()
            if _delivered_to(message).lower() == wanted:
                messages.append(message)
        return messages

    def wait_for_delivered(self, localpart: str, count: int, timeout: float = 30) -> list[bytes]:
        """Wait until ``count`` or more messages have been delivered to ``localpart``; return them.

        :returns: what :meth:`delivered` returns once it holds ``count`` messages or more.
        :raises ValueError: if the sandbox delivers over LMTP.
        :raises TimeoutError: if fewer arrive within ``timeout`` seconds; the message ends
            with the tail of :attr:`log_path`.
        """
        deadline = time.monotonic() + timeout
        while True:
            messages = self.delivered(localpart)
            if len(messages) >= count:
                return messages
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{len(messages)} of {count} messages delivered to {localpart!r} "
                    f"after {timeout:g} s; end of {self.log_path}:\n{self._log_tail()}"
                )
            time.sleep(_POLL_INTERVAL)

    def queue_is_empty(self) -> bool:
        """Return whether no message waits in the queue.

        The queue is the maildrop, incoming, active, deferred and hold directories.
        A message leaves it only once its delivery has been recorded, a moment
        after it appears in the Maildir.
        """
        for queue in _QUEUES:
            for _, _, files in os.walk(os.path.join(self._queue_directory, queue)):
                if files:
                    return False
        return True

    def _prepare(self) -> None:
        """Create the directory tree and write the configuration."""
        os.makedirs(self._directory, exist_ok=True)
        os.chmod(self._directory, 0o755)
        check_searchable(os.path.dirname(self._directory), "Postfix's delivery and queue processes")
        # Postfix wants its configuration and queue directories owned by root
        # and not writable by others; the postfix-script start-up check
        # creates the queue's subdirectories with their owners and modes.
        for path in (self.config_directory, self._queue_directory):
            os.makedirs(path, exist_ok=True)
            os.chown(path, 0, 0)
            os.chmod(path, 0o755)
        data_directory = os.path.join(self._directory, "data")
        os.makedirs(data_directory, exist_ok=True)
        os.chown(data_directory, self._postfix_uid, self._postfix_gid)
        os.chmod(data_directory, 0o700)
        if self._lmtp is None:
            # virtual(8) runs as the mail account and creates the Maildirs here.
            os.makedirs(self._mail_directory, exist_ok=True)
            os.chown(self._mail_directory, self._mail_uid, self._mail_gid)
            os.chmod(self._mail_directory, 0o755)
        for name, text in (("main.cf", self._main_cf()), ("master.cf", self._master_cf())):
            with open(os.path.join(self.config_directory, name), "w", encoding="utf-8") as f:
                f.write(text)

    def _main_cf(self) -> str:
        """Return the text of ``main.cf``."""
        if self._lmtp is None:
            transport = "virtual"
        else:
            lmtp_host, lmtp_port = self._lmtp
            transport = f"lmtp:inet:[{lmtp_host}]:{lmtp_port}"
        directory = self._directory
        defaults = f"""\
# Generated by gateway.testing.postfix; rewritten on every start.
compatibility_level = 3.6
queue_directory = {self._queue_directory}
data_directory = {os.path.join(directory, "data")}
mail_owner = postfix
setgid_group = postdrop
syslog_name = {self._syslog_name}
# There is no syslog: postlogd (the postlog service in master.cf) writes here.
maillog_file = {self.log_path}
maillog_file_prefixes = {directory}
biff = no

inet_interfaces = {self._host}
inet_protocols = {"all" if ":" in self._host else "ipv4"}
myhostname = {HOSTNAME}
mydomain = {MAIL_DOMAIN}
myorigin = $mydomain
# example.org is a virtual mailbox domain, which must not also be listed
# here; local(8) delivery would reach the machine's own accounts and spool.
mydestination =
relay_domains =
mynetworks = 127.0.0.0/8 [::1]/128
alias_maps =
alias_database =

smtpd_banner = $myhostname ESMTP
# No DNS: clients are logged and named in Received: as unknown[address].
smtpd_peername_lookup = no
smtpd_authorized_xclient_hosts = {self._xclient_hosts}
# XCLIENT LOGIN= counts only while SASL is enabled; AUTH itself stays hidden
# and refused, since the gateway authenticates clients. smtpd exits unless
# Cyrus SASL offers at least one mechanism (Debian: libsasl2-modules).
smtpd_sasl_auth_enable = yes
smtpd_discard_ehlo_keywords = silent-discard, auth
smtpd_client_restrictions = permit_mynetworks, permit_sasl_authenticated, reject
smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject
smtpd_recipient_restrictions = reject_unauth_destination
smtpd_error_sleep_time = 0
smtputf8_enable = yes
message_size_limit = {self._message_size_limit}
# Both default to about 49 MiB and must not be below message_size_limit.
mailbox_size_limit = 0
virtual_mailbox_limit = 0
# Keep what the client sent, so tests can compare it byte for byte.
message_drop_headers =
local_header_rewrite_clients =
in_flow_delay = 0

virtual_mailbox_domains = {MAIL_DOMAIN}
virtual_mailbox_maps = static:Maildir/
virtual_mailbox_base = {self._mail_directory}
virtual_uid_maps = static:{self._mail_uid}
virtual_gid_maps = static:{self._mail_gid}
virtual_minimum_uid = {self._mail_uid}
virtual_transport = {transport}
default_transport = error:5.7.1 the sandbox delivers to {MAIL_DOMAIN} only
relay_transport = $default_transport

# Retry deferred mail soon, e.g. after a test restarts the LMTP backend.
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
"""
        # Postfix warns in every process about a parameter set twice, so the
        # defaults that extra_main_cf sets are left out rather than overridden.
        replaced = set(_PARAMETER_RE.findall(self._extra_main_cf))
        kept = []
        for line in defaults.splitlines(keepends=True):
            match = _PARAMETER_RE.match(line)
            if match is None or match[1] not in replaced:
                kept.append(line)
        return "".join(kept) + self._extra_main_cf

    def _master_cf(self) -> str:
        """Return the text of ``master.cf``: one SMTP listener and the internal services."""
        listen = f"[{self._host}]" if ":" in self._host else self._host
        # No service is chrooted, so that every path in main.cf works as written.
        return f"""\
# Generated by gateway.testing.postfix; rewritten on every start.
# service type  private unpriv  chroot  wakeup  maxproc command
{listen}:{self.smtp_port} inet n - n - - smtpd
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

    def _kill_master(self) -> None:
        """Send SIGKILL to the process group of the master named in this instance's pid file."""
        try:
            with open(os.path.join(self._queue_directory, "pid", "master.pid")) as f:
                pid = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return
        # The master is a session leader, so its group holds only its own children.
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _log_tail(self) -> str:
        """Return the last few kilobytes of the log, or a note that it is missing."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - _LOG_TAIL_BYTES))
                return f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log written)"


def body_as_sent(delivered: bytes) -> bytes:
    """Return the message a client sent, given the Maildir file Postfix delivered it as.

    Postfix's virtual(8) delivery prepends ``Return-Path: <sender>``,
    ``X-Original-To: recipient`` and ``Delivered-To: recipient``, in that
    order, above the ``Received:`` header (folded over several lines) that
    this Postfix added on receipt (``by mail.example.org (Postfix) with
    ESMTP``, or ``ESMTPA`` after ``XCLIENT LOGIN=``), and stores lines with
    LF endings. This removes exactly those four headers and turns every LF
    back into CRLF.

    The result is what the client sent after dot-unstuffing (a line sent as
    ``..x`` is ``.x``), provided the client ended every line with CRLF: a
    bare LF, too, comes back as CRLF. Postfix changes nothing else in the
    sandbox's setup; 8-bit bytes, header order and folding are kept.

    :raises ValueError: if ``delivered`` does not start with those four headers.
    """
    lines = delivered.split(b"\n")
    header: list[bytes] = []
    for name in _PREPENDED:
        if not lines or not lines[0].startswith(name):
            raise ValueError(f"the delivered message does not start with {name.decode()!r}")
        header = [lines.pop(0)]
        while lines and lines[0][:1] in (b" ", b"\t"):
            header.append(lines.pop(0))
    # The loop leaves the Received: header, unfolded below, in ``header``.
    if _RECEIVED_BY not in b" ".join(line.strip() for line in header):
        raise ValueError(f"the first Received: header was not added by {HOSTNAME}")
    return b"\r\n".join(lines)


def _delivered_to(message: bytes) -> bytes:
    """Return the address in the ``Delivered-To:`` header that Postfix prepended, or ``b""``."""
    for line in message.split(b"\n", len(_PREPENDED))[: len(_PREPENDED)]:
        if line.startswith(b"Delivered-To:"):
            return line[len(b"Delivered-To:") :].strip()
    return b""


def _delivery_time(name: str, path: str) -> tuple[int, int, int]:
    """Return a sort key for a Maildir file: its delivery time from its name, else its mtime."""
    match = _MAILDIR_NAME_RE.match(name)
    if match:
        return (int(match.group(1)), int(match.group(2)), 0)
    mtime = os.stat(path).st_mtime_ns
    return (mtime // 1_000_000_000, mtime // 1000 % 1_000_000, 1)
