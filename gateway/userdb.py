"""The local user database: checks passwords against a Dovecot passwd-file or an htpasswd file.

One user per line; ``#`` comments and blank lines are ignored. Two forms are read:

- Dovecot passwd-file: ``user:{SCHEME}hash[:uid:gid:gecos:home:shell:extra...]``, where
  SCHEME is ``ARGON2ID``, ``BLF-CRYPT``, ``SHA512-CRYPT``, ``SHA256-CRYPT`` or ``CRYPT``
  (case-insensitive, as in Dovecot). With ``CRYPT``, or with no ``{SCHEME}`` at all (Dovecot's
  default), the hash itself must be of an enabled scheme. Of the extra fields, ``nologin``
  refuses the user's logins, as Dovecot does; ``allow_nets`` and ``allow_real_nets`` make the
  file fail to load, since the gateway would not check them; the rest are the backend's.
- htpasswd: ``user:hash`` with a ``$argon2id$``, ``$2y$``/``$2b$``/``$2a$`` (bcrypt), ``$6$``
  (SHA-512 crypt) or ``$5$`` (SHA-256 crypt) hash.

Every other scheme (PLAIN, MD5, SSHA, argon2i, DES crypt, ...) makes the whole file fail to load:
a gateway that faces the Internet must not accept weak hashes silently.

New hashes use the passlib defaults. For argon2id these are argon2-cffi's RFC 9106 low-memory
profile: 64 MiB of memory, 3 passes, 4 lanes, about 0.1 s of CPU on one core per check, so the
thread pool that runs :meth:`UserDatabase.verify` needs up to 64 MiB per thread. bcrypt uses
cost 12 (about 0.25 s), SHA-512 crypt 656,000 rounds and SHA-256 crypt 535,000 rounds.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from passlib.context import CryptContext
from twisted.logger import Logger

from gateway.text_log import loggable_text

log = Logger()


@dataclass(frozen=True)
class Scheme:
    """One enabled password scheme.

    :ivar name: the name used by :func:`hash_password` and ``mailgateway-passwd --scheme``.
    :ivar handler: the passlib handler that implements it, as named in :data:`CONTEXT`.
    :ivar dovecot: the Dovecot scheme name written between braces before the hash.
    :ivar prefixes: the hash prefixes that identify it; the first is the one written.
    """

    name: str
    handler: str
    dovecot: str
    prefixes: tuple[str, ...]


SCHEMES: Mapping[str, Scheme] = MappingProxyType(
    {
        scheme.name: scheme
        for scheme in (
            Scheme("argon2id", "argon2", "ARGON2ID", ("$argon2id$",)),
            Scheme("bcrypt", "bcrypt", "BLF-CRYPT", ("$2y$", "$2b$", "$2a$")),
            Scheme("sha512-crypt", "sha512_crypt", "SHA512-CRYPT", ("$6$",)),
            Scheme("sha256-crypt", "sha256_crypt", "SHA256-CRYPT", ("$5$",)),
        )
    }
)
"""The enabled schemes by name; the first (argon2id) is the default."""

# $2y$ is what Dovecot's "doveadm pw -s BLF-CRYPT" writes and what every bcrypt reader accepts.
CONTEXT = CryptContext(
    schemes=[scheme.handler for scheme in SCHEMES.values()],
    default=SCHEMES["argon2id"].handler,
    bcrypt__ident="2y",
)
"""The one passlib context that hashes and verifies every enabled scheme."""

MAX_USER_NAME_BYTES = 255

_BY_DOVECOT_NAME: Mapping[str, Scheme] = {scheme.dovecot: scheme for scheme in SCHEMES.values()}

# Dovecot scheme names that are refused by policy; they are named in load errors, other text
# between braces is not echoed because it could be part of a cleartext password.
_REFUSED_DOVECOT_NAMES = frozenset(
    """ARGON2 ARGON2I CLEAR CLEARTEXT CRAM-MD5 DES-CRYPT DIGEST-MD5 HMAC-MD5 LANMAN LDAP-MD5 MD5
    MD5-CRYPT NTLM OTP PBKDF2 PLAIN PLAIN-MD4 PLAIN-MD5 PLAIN-TRUNC RPA SCRAM-SHA-1 SCRAM-SHA-256
    SHA SHA1 SHA256 SHA512 SKEY SMD5 SSHA SSHA256 SSHA512 SYSTEM""".split()
)

_ACCEPTED = (
    "accepted: argon2id, bcrypt, sha512-crypt and sha256-crypt hashes, bare or after"
    " {ARGON2ID}, {BLF-CRYPT}, {SHA512-CRYPT}, {SHA256-CRYPT} or {CRYPT}"
)

_SELF_TEST_PASSWORD = b"mailgateway self-test"

# Computed once with minimal costs and checked against argon2-cffi, the bcrypt module and glibc
# crypt(3), so a passlib or backend that computes wrong results fails the self-test.
_SELF_TEST_VECTORS: Mapping[str, str] = {
    "argon2id": "$argon2id$v=19$m=64,t=1,p=1$VWpNKaV0DsEY45zT+t9bKw$"
    "fMfy+80m9z5kdjsos6E5Z2SYCgJ/HKGWThvbQOCFZOM",
    "bcrypt": "$2y$04$ayqtYqvNPZC4irOR.NZg3OIRVF4opM5V3pYTN.yCmqvr4/2u2dx.e",
    "sha512-crypt": "$6$rounds=1000$66/kr9JjsXBmAtme$R5s3E8s3bShH0GRf.1kWqI7whtCJxY5I1JeD8GNFGPrbd"
    "Gd1jAhGYB8.3ZskFjY3J/8UisHi88jL/EBoWh3zl.",
    "sha256-crypt": "$5$rounds=1000$yiFDz/rEZijpYEb2$qi0nPcuJtvWxUE.laeea7U.OadXD8bRGsDMWPZ91X56",
}

_Signature = tuple[int, int, int, int, int]


class UserFileError(Exception):
    """The user file cannot be read or is malformed.

    The message is one line naming the path (and the line number when one line is at fault);
    it never contains a hash or a password.
    """


def check_user_name(name: str) -> None:
    """Check that *name* can be stored as a user name in a user file.

    :param name: the candidate user name.
    :raises ValueError: with a message saying what is wrong (it does not repeat the name) if the
        name is empty, longer than 255 bytes in UTF-8, starts with ``#``, or contains ``:``,
        whitespace or a control character.
    """
    if not name:
        raise ValueError("user name is empty")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("user name is not valid UTF-8") from None
    if size > MAX_USER_NAME_BYTES:
        raise ValueError(f"user name is longer than {MAX_USER_NAME_BYTES} bytes")
    if name.startswith("#"):
        raise ValueError("user name starts with '#', which marks a comment")
    if ":" in name:
        raise ValueError("user name contains ':'")
    for char in name:
        if char.isspace():
            raise ValueError("user name contains whitespace")
        if unicodedata.category(char) == "Cc":
            raise ValueError("user name contains a control character")


def _scheme_of(hash_: str) -> Scheme | None:
    """Return the enabled scheme whose prefix *hash_* carries, or None."""
    for scheme in SCHEMES.values():
        if hash_.startswith(scheme.prefixes):
            return scheme
    return None


def _parse_password(field: str, where: str) -> str:
    """Return the bare hash of a password field, or raise UserFileError naming *where*."""
    allowed: Scheme | None = None
    hash_ = field
    if field.startswith("{"):
        name, closed, hash_ = field[1:].partition("}")
        if not closed:
            raise UserFileError(f"{where}: password field has '{{' without a closing '}}'")
        name = name.upper()
        if name != "CRYPT":
            allowed = _BY_DOVECOT_NAME.get(name)
            if allowed is None:
                if name.partition(".")[0] in _REFUSED_DOVECOT_NAMES:
                    raise UserFileError(
                        f"{where}: password scheme {{{name}}} is refused ({_ACCEPTED})"
                    )
                raise UserFileError(f"{where}: unknown password scheme ({_ACCEPTED})")
    if not hash_:
        raise UserFileError(f"{where}: empty password field")
    scheme = _scheme_of(hash_)
    if scheme is None:
        raise UserFileError(f"{where}: password hash of a refused or unknown scheme ({_ACCEPTED})")
    if allowed is not None and scheme is not allowed:
        raise UserFileError(f"{where}: {{{allowed.dovecot}}} is followed by a {scheme.name} hash")
    try:
        parsed = CONTEXT.handler(scheme.handler).from_string(hash_)
    except (ValueError, TypeError):
        raise UserFileError(f"{where}: malformed {scheme.name} hash") from None
    if not getattr(parsed, "checksum", None):
        # passlib takes a bare salt ("$6$salt", cut at the last "$") for a setting: no password matches it.
        raise UserFileError(f"{where}: {scheme.name} hash without its checksum (cut short?)")
    return hash_


# Dovecot passdb extra fields that restrict a login, which the gateway does not check: a file
# that has them is refused rather than read as if they were not there. (nologin is obeyed.)
_UNENFORCED_FIELDS = frozenset({"allow_nets", "allow_real_nets"})


def parse_user_file(data: bytes, path: str) -> dict[str, str]:
    """Parse the contents of a user file.

    :param data: the file's contents, UTF-8 text with ``\\n`` (or ``\\r\\n``) line ends.
    :param path: the file's name, used only in error messages.
    :returns: the bare hash (without the ``{SCHEME}`` prefix) of each user who may log in: a
        user with Dovecot's ``nologin`` extra field is left out, as if unknown.
    :raises UserFileError: naming *path* and the line number of the first bad line: invalid
        UTF-8, no ``:``, a bad user name, a duplicate user, a refused scheme, a malformed hash,
        or an extra field that restricts logins in a way the gateway does not check
        (``allow_nets``, ``allow_real_nets``).
    """
    users: dict[str, str] = {}
    defined_on: dict[str, int] = {}
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8").rstrip()
        except UnicodeDecodeError:
            raise UserFileError(f"{where}: not valid UTF-8") from None
        if not line or line.lstrip().startswith("#"):
            continue
        user, colon, rest = line.partition(":")
        if not colon:
            raise UserFileError(f"{where}: expected user:password")
        try:
            check_user_name(user)
        except ValueError as e:
            raise UserFileError(f"{where}: {e}") from None
        if user in defined_on:
            first = defined_on[user]
            raise UserFileError(f"{where}: duplicate user, first defined on line {first}")
        defined_on[user] = number
        fields = rest.split(":", 6)  # password, uid, gid, gecos, home, shell, extra fields
        hash_ = _parse_password(fields[0], where)
        extra = {field.partition("=")[0].lower() for field in fields[6].split()} if len(fields) > 6 else set()
        unenforced = extra & _UNENFORCED_FIELDS
        if unenforced:
            raise UserFileError(f"{where}: extra field {min(unenforced)} is not enforced by the gateway: "
                                "remove it (or the user)")
        if "nologin" not in extra:  # Dovecot refuses such a user's login, whatever the password
            users[user] = hash_
    return users


def _bare_hash(password: bytes, scheme: str) -> str:
    """Hash *password* with the named scheme at its default cost, without a Dovecot prefix."""
    return str(CONTEXT.handler(SCHEMES[scheme].handler).hash(password))


def hash_password(password: bytes, scheme: str = "argon2id") -> str:
    """Hash a password for storage in a user file, at the scheme's default cost.

    :param password: the password.
    :param scheme: a key of :data:`SCHEMES`.
    :returns: the Dovecot form, e.g. ``{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$...``.
    :raises KeyError: if *scheme* is not enabled.
    :raises ValueError: if the scheme cannot take this password (bcrypt: over 72 bytes or a NUL
        byte); the message does not contain the password.
    """
    return "{" + SCHEMES[scheme].dovecot + "}" + _bare_hash(password, scheme)


def self_test() -> None:
    """Check at startup that passlib and its backends verify each enabled scheme correctly.

    A known hash of each scheme must accept its password and refuse another one.

    :raises RuntimeError: naming the first scheme that fails.
    """
    for name in SCHEMES:
        known = _SELF_TEST_VECTORS[name]
        try:
            accepted = CONTEXT.verify(_SELF_TEST_PASSWORD, known)
            refused = not CONTEXT.verify(_SELF_TEST_PASSWORD + b"!", known)
        except Exception as e:
            raise RuntimeError(f"password scheme {name} is broken: {type(e).__name__}: {e}") from e
        if not (accepted and refused):
            raise RuntimeError(f"password scheme {name} is broken: a known hash verifies wrongly")


def _signature(status: os.stat_result) -> _Signature:
    """Return what tells one version of a file from the next."""
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)


_SPARE_PASSWORD = b"spare"
"""A password every scheme takes, for a check made only to take the time."""


class _StandIns:
    """
    The hashes an unknown user is checked against: the file's own, one picked for each name.

    A fixed dummy hash would cost what its scheme costs, and a file's users may have others
    (bcrypt, SHA-crypt, argon2id at other costs): the time of a refusal would then tell which
    names exist. Picked this way, unknown names take the times of the file's users, in their
    proportions, and each name always the same one.
    """

    __slots__ = ("_key", "_hashes")

    def __init__(self, data: bytes, users: Mapping[str, str]) -> None:
        """
        :param data: the file's contents: the key, which no client knows (the hashes are salted),
            and which every worker process and every restart derives alike, so that a name never
            changes its stand-in while the file stays the same.
        :param users: the users parsed from it.
        """
        self._key = hashlib.sha256(data).digest()
        self._hashes = tuple(users.values())

    def pick(self, user: str) -> str | None:
        """Return the stand-in hash for *user*, or None if the file holds no users."""
        if not self._hashes:
            return None
        digest = hmac.digest(self._key, str(user).encode("utf-8", "surrogatepass"), "sha256")
        return self._hashes[int.from_bytes(digest[:8], "big") % len(self._hashes)]


class UserDatabase:
    """Users and password hashes read from a file, re-read whenever the file changes.

    All methods are thread-safe. :meth:`verify` blocks for the duration of one hash check and is
    meant to run on a thread pool.
    """

    def __init__(self, path: str) -> None:
        """Load the user file.

        :param path: the user file.
        :raises UserFileError: if the file cannot be read or is malformed.
        """
        self._path = path
        self._lock = threading.Lock()
        self._signature, self._users, self._stand_ins = self._load()
        # The last reload problem that was logged, so a broken file warns once, not per login.
        self._reported: tuple[_Signature | None, str] | None = None
        # What an unknown user is checked against while the file holds no users.
        self._dummy_hash = _bare_hash(secrets.token_bytes(32), "argon2id")

    def _load(self) -> tuple[_Signature, dict[str, str], _StandIns]:
        """Read and parse the file, and return its signature, its users and their stand-ins.

        The signature is taken before reading, so a write that races with the read changes the
        file's signature again and is picked up by the next refresh.
        """
        try:
            with open(self._path, "rb") as file:
                status = os.fstat(file.fileno())
                data = file.read()
        except OSError as e:
            raise UserFileError(f"{self._path}: cannot read: {e.strerror}") from None
        users = parse_user_file(data, self._path)
        return _signature(status), users, _StandIns(data, users)

    def _report(self, signature: _Signature | None, problem: str) -> None:
        """Warn that the file is not reloaded, once per file version and problem."""
        if self._reported != (signature, problem):
            self._reported = (signature, problem)
            log.warn(
                "user_file_not_reloaded path={path} problem={problem}: keeping the previous users",
                path=self._path,
                problem=problem,
            )

    def _refresh(self) -> None:
        """Reload the file if it changed; on failure keep the current users and warn."""
        try:
            status = os.stat(self._path)
        except OSError as e:
            with self._lock:
                self._report(None, f"{self._path}: cannot stat: {e.strerror}")
            return
        current = _signature(status)
        if current == self._signature:
            return
        with self._lock:
            if current == self._signature:
                return
            try:
                signature, users, stand_ins = self._load()
            except UserFileError as e:
                self._report(current, str(e))
                return
            # Users first: a thread that sees the new signature early must not keep old users.
            self._users = users
            self._stand_ins = stand_ins
            self._signature = signature
            self._reported = None
            log.info(
                "user_file_reloaded path={path} users={count}",
                path=self._path,
                count=len(self._users),
            )

    def version(self) -> tuple[int, ...] | None:
        """
        What identifies the file's current contents (a stat, no read), or None if it cannot be
        had: anything remembered about the users is valid only while this stays the same.
        """
        try:
            return _signature(os.stat(self._path))
        except OSError:
            return None

    def verify(self, user: str, password: bytes) -> bool:
        """Check a user's password, re-reading the file first if it changed; see L{check}.

        :returns: True only if the user exists and the password matches.
        """
        return self.check(user, password)[0]

    def check(self, user: str, password: bytes) -> tuple[bool, _Signature | None]:
        """Check a user's password, re-reading the file first if it changed.

        Never raises: an unknown user, a password the scheme cannot take (such as a bcrypt
        password over 72 bytes) and any error inside passlib are all a failed check.

        :param user: the user name, compared exactly.
        :param password: the password as the client sent it.
        :returns: whether the user exists and the password matches, and the L{version} of the
            file whose users gave the answer (after a reload that failed, the earlier file's);
            None for no answer but an error.
        """
        try:
            self._refresh()
            # Signature first: a reload sets the users before it, so these users are at least as new.
            signature, users = self._signature, self._users
            stored = users.get(user)
            if stored is None:
                # An unknown user costs what a known one costs, so timing does not tell them apart.
                self._spend_time(password, self._stand_ins.pick(user) or self._dummy_hash)
                return False, signature
            try:
                return bool(CONTEXT.verify(password, stored)), signature
            except ValueError:
                # The scheme cannot take this password (bcrypt over 72 bytes, a NUL byte), so it
                # cannot match; spend the usual time so the refusal is not faster.
                self._spend_time(_SPARE_PASSWORD, stored)
                return False, signature
        except Exception as e:
            log.error(
                "password_check_failed user={user} error={error}",
                user=loggable_text(user),
                error=type(e).__qualname__,
            )
            return False, None

    @staticmethod
    def _spend_time(password: bytes, hash_: str) -> None:
        """Run one check against *hash_*, at its full cost, and ignore its result."""
        try:
            CONTEXT.verify(password, hash_)
        except ValueError:
            CONTEXT.verify(_SPARE_PASSWORD, hash_)  # a password its scheme cannot take

    def __contains__(self, user: object) -> bool:
        """Say whether the user exists, re-reading the file first if it changed."""
        self._refresh()
        return user in self._users

    def users(self) -> list[str]:
        """Return the user names, sorted, re-reading the file first if it changed."""
        self._refresh()
        return sorted(self._users)
