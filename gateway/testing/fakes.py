"""
In-memory stand-ins for the gateway's collaborators, for unit tests with C{StringTransport}
and C{Clock}: an authenticator, a backend connector, and a transport that records STARTTLS.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from gateway.addresses import host_port
from gateway.auth import IAuthenticator
from gateway.backend import BackendLogin, BackendRejected, LoginRequest
from gateway.config import BackendSettings

BACKEND_SETTINGS = BackendSettings(
    host="127.0.0.1", port=143, tls="none", ca_file=None, server_name="127.0.0.1", timeout=10.0,
    login="replay", master_user=None, master_password=None, forward_client_ip=False,
)


@implementer(IAuthenticator)
class MemoryAuthenticator:
    """
    Good passwords in a dict, answered at once.

    :ivar checked: the user names verified so far, in order.
    :ivar hold: when True, checks wait (as hashes on a busy pool run) until L{finish} ends them.
    """

    def __init__(self, passwords: dict[str, bytes], backend_decides: bool = False) -> None:
        self.passwords = passwords
        self.backend_decides = backend_decides
        self.checked: list[str] = []
        self.hold = False
        self._held: list[tuple[Deferred[bool], bool, Callable[[], None]]] = []

    def verify(self, user: str, password: bytes, wrong_after_all: Callable[[], None]) -> Deferred[bool]:
        self.checked.append(user)
        good = self.backend_decides or self.passwords.get(user) == password
        if not self.hold:
            return succeed(good)
        waiting: Deferred[bool] = Deferred()
        self._held.append((waiting, good, wrong_after_all))
        return waiting

    def finish(self) -> None:
        """End the held checks as running hashes end: answered, or for a cancelled wrong one, C{wrong_after_all}."""
        held, self._held = self._held, []
        for waiting, good, wrong_after_all in held:
            if not waiting.called:
                waiting.callback(good)
            elif not good:
                wrong_after_all()


class MemoryBackend:
    """
    A backend connector whose sessions live on C{StringTransport}s.

    :ivar passwords: when set, logins with other credentials are refused (BackendRejected).
    :ivar error: when set, every login fails with it.
    :ivar hold: when True, logins wait in C{held} until the test fires them.
    :ivar cancelled: how many held logins were cancelled.
    :ivar requests: every login request, in order.
    :ivar sessions: the logged-in backend protocols, in order.
    :ivar announced: what the backend offers before login, as L{BackendConnector.announced}.
    :ivar notices: what a plain session says for the user at login (L{BackendLogin.notices}).
    """

    def __init__(self, capabilities: tuple[bytes, ...] = (b"IMAP4rev1", b"IDLE"),
                 settings: BackendSettings = BACKEND_SETTINGS,
                 make_session: Callable[[LoginRequest], BackendLogin] | None = None) -> None:
        """
        :param make_session: builds a logged-in session for a request (default: a plain
            L{BackendLogin} with C{capabilities}); protocols whose front end keeps talking to
            the backend after login pass their own.
        """
        self.settings = settings
        self._make_session = make_session
        self.announced: tuple[bytes, ...] | None = None
        self.address = host_port(settings.host, settings.port)
        self.capabilities = capabilities
        self.notices: tuple[bytes, ...] = ()
        self.passwords: dict[str, bytes] | None = None
        self.error: Exception | None = None
        self.hold = False
        self.held: list[Deferred[BackendLogin]] = []
        self.cancelled = 0
        self.requests: list[LoginRequest] = []
        self.sessions: list[BackendLogin] = []

    def login(self, request: LoginRequest) -> Deferred[BackendLogin]:
        self.requests.append(request)
        if self.hold:
            waiting: Deferred[BackendLogin] = Deferred(self._cancelled)
            self.held.append(waiting)
            return waiting
        if self.error is not None:
            return fail(self.error)
        if self.passwords is not None and self.passwords.get(request.user) != request.password:
            return fail(BackendRejected("memory backend refused the login"))
        return succeed(self.session(request))

    def _cancelled(self, waiting: Deferred[BackendLogin]) -> None:
        self.cancelled += 1

    def session(self, request: LoginRequest) -> BackendLogin:
        """A logged-in backend session on a fresh StringTransport."""
        if self._make_session is not None:
            session = self._make_session(request)
        else:
            session = BackendLogin(request, self.settings, None)
            session.capabilities = self.capabilities
            session.notices = self.notices
            session.makeConnection(StringTransport())
            session.succeed()
        self.sessions.append(session)
        return session


class TLSStringTransport(StringTransport):
    """
    A StringTransport that records C{startTLS}.

    :ivar tls_options: what C{startTLS} was called with, or None.
    """

    tls_options: object = None

    def startTLS(self, options: object) -> None:
        self.tls_options = options
