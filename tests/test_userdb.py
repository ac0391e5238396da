"""Tests for gateway.userdb: loading user files, checking passwords, reloading, the self-test."""

from __future__ import annotations

import builtins
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import argon2
import bcrypt
from passlib.exc import MissingBackendError
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogEvent, LogLevel, Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from gateway import userdb
from gateway.userdb import (
    CONTEXT,
    SCHEMES,
    UserDatabase,
    UserFileError,
    check_user_name,
    hash_password,
    parse_user_file,
    self_test,
)

PASSWORD = b"correct horse \xc3\xa9 battery"
WRONG = b"correct horse \xc3\xa9 batterz"

# Minimal costs keep the suite fast; the gateway itself always hashes at the defaults.
_FAST_HANDLERS: dict[str, Any] = {
    "argon2id": CONTEXT.handler("argon2").using(memory_cost=64, rounds=1, parallelism=1),
    "bcrypt": CONTEXT.handler("bcrypt").using(rounds=4),
    "sha512-crypt": CONTEXT.handler("sha512_crypt").using(rounds=1000),
    "sha256-crypt": CONTEXT.handler("sha256_crypt").using(rounds=1000),
}
_fast_cache: dict[tuple[str, bytes], str] = {}


def fast_hash(scheme: str, password: bytes = PASSWORD) -> str:
    """
    Return a cheap bare hash of a password, computed once per scheme and password.

    :param scheme: a key of SCHEMES.
    :param password: the password.
    :returns: the hash without a Dovecot prefix.
    """
    key = (scheme, password)
    if key not in _fast_cache:
        _fast_cache[key] = str(_FAST_HANDLERS[scheme].hash(password))
    return _fast_cache[key]


def argon2_parameters(hash_: str) -> str:
    """
    Return the variant and cost part of an argon2 hash.

    :param hash_: a ``$argon2id$v=19$m=...,t=...,p=...$salt$digest`` hash.
    :returns: ``$argon2id$v=19$m=...,t=...,p=...``.
    """
    return "$".join(hash_.split("$")[:4])


class RecordingContext:
    """Stands in for the passlib context: records each verified hash, then delegates."""

    def __init__(self, fail: Callable[[str], Exception | None] = lambda hash_: None) -> None:
        """
        :param fail: returns an exception to raise instead of verifying a hash, or None.
        """
        self.hashes: list[str] = []
        self._fail = fail

    def verify(self, secret: object, hash_: str) -> bool:
        """Record *hash_*, then raise what *fail* says or verify with the real context."""
        self.hashes.append(hash_)
        error = self._fail(hash_)
        if error is not None:
            raise error
        return bool(CONTEXT.verify(secret, hash_))  # type: ignore[arg-type]

    def handler(self, name: str) -> Any:
        """Return the real context's handler."""
        return CONTEXT.handler(name)


class UserFileTestCase(SynchronousTestCase):
    """Writes user files into a private temporary directory."""

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="mailgateway-userdb-")
        self.addCleanup(shutil.rmtree, self.directory)
        self.path = os.path.join(self.directory, "users")

    def write(self, text: str, path: str | None = None) -> str:
        """
        Write a user file, replacing any old one by rename as an editor or the passwd tool does.

        :param text: the contents.
        :param path: the file, by default the test's user file.
        :returns: the path written.
        """
        path = path or self.path
        temporary = path + ".new"
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
        return path

    def load_error(self, text: str) -> str:
        """
        Write a user file that must not load, and return the load error's message.

        :param text: the contents.
        :returns: the UserFileError message.
        """
        self.write(text)
        return str(self.assertRaises(UserFileError, UserDatabase, self.path))

    def capture_log(self) -> EventLoggingObserver:
        """Return an observer that receives everything gateway.userdb logs during the test."""
        observer = EventLoggingObserver()
        self.patch(userdb, "log", Logger(namespace="gateway.userdb", observer=observer))
        return observer


def levels(observer: EventLoggingObserver) -> list[LogLevel]:
    """Return the level of each event an observer received."""
    return [event["log_level"] for event in observer]


def formatted(observer: EventLoggingObserver) -> str:
    """Return all events an observer received as text."""
    events: list[LogEvent] = list(observer)
    return "\n".join(formatEvent(event) or "" for event in events)


class VerifyTests(UserFileTestCase):
    """Checking passwords of each scheme, in both file forms."""

    def assert_checks(self, line: str, scheme: str) -> None:
        """Fail unless a file holding *line* for alice accepts PASSWORD and refuses WRONG."""
        self.write(f"# users\n\n{line}\n")
        db = UserDatabase(self.path)
        self.assertTrue(db.verify("alice", PASSWORD), f"{scheme}: {line[:20]}... refused")
        self.assertFalse(db.verify("alice", WRONG), f"{scheme}: wrong password accepted")

    def test_dovecot_form(self) -> None:
        """Each enabled scheme verifies in Dovecot form, with and without the extra fields."""
        for name, scheme in SCHEMES.items():
            hash_ = fast_hash(name)
            self.assert_checks(f"alice:{{{scheme.dovecot}}}{hash_}", name)
            self.assert_checks(
                f"alice:{{{scheme.dovecot}}}{hash_}:1000:1000::/home/alice::userdb_quota_rule=*:10G",
                name,
            )

    def test_dovecot_scheme_names_are_case_insensitive(self) -> None:
        """Dovecot scheme names are recognised in any case, as Dovecot does."""
        self.assert_checks("alice:{blf-crypt}" + fast_hash("bcrypt"), "bcrypt")

    def test_dovecot_crypt(self) -> None:
        """{CRYPT} takes a hash of any enabled scheme."""
        for name in SCHEMES:
            self.assert_checks(f"alice:{{CRYPT}}{fast_hash(name)}", name)

    def test_htpasswd_form(self) -> None:
        """Each enabled scheme verifies in htpasswd form, bcrypt with each of its prefixes."""
        for name in SCHEMES:
            self.assert_checks(f"alice:{fast_hash(name)}", name)
        bare = fast_hash("bcrypt").removeprefix("$2y$")
        for prefix in ("$2a$", "$2b$"):
            self.assert_checks(f"alice:{prefix}{bare}", f"bcrypt {prefix}")

    def test_crlf_line_ends(self) -> None:
        """A file with CRLF line ends loads and verifies."""
        self.write(f"# users\r\nalice:{fast_hash('sha256-crypt')}\r\n")
        self.assertTrue(UserDatabase(self.path).verify("alice", PASSWORD))

    def test_user_names_compare_exactly(self) -> None:
        """User names are compared exactly: no case folding, no trimming."""
        self.write(f"Alice@example.org:{fast_hash('sha256-crypt')}\n")
        db = UserDatabase(self.path)
        self.assertTrue(db.verify("Alice@example.org", PASSWORD))
        for other in ("alice@example.org", "Alice@example.org ", "Alice", "ALICE@EXAMPLE.ORG"):
            self.assertFalse(db.verify(other, PASSWORD), other)

    def test_hash_password_round_trip(self) -> None:
        """hash_password writes each scheme's Dovecot form at default cost, which verifies."""
        lines = []
        for index, (name, scheme) in enumerate(SCHEMES.items()):
            stored = hash_password(PASSWORD, name)
            self.assertTrue(stored.startswith(f"{{{scheme.dovecot}}}{scheme.prefixes[0]}"), stored)
            lines.append(f"user{index}:{stored}")
        self.write("\n".join(lines) + "\n")
        db = UserDatabase(self.path)
        for index, name in enumerate(SCHEMES):
            self.assertTrue(db.verify(f"user{index}", PASSWORD), name)

    def test_hash_password_default_is_argon2id(self) -> None:
        """hash_password uses argon2id at passlib's default cost unless told otherwise."""
        stored = hash_password(PASSWORD)
        self.assertTrue(stored.startswith("{ARGON2ID}$argon2id$"), stored)
        default = CONTEXT.handler("argon2")
        self.assertIn(
            f"m={default.memory_cost},t={default.default_rounds},p={default.parallelism}$", stored
        )

    def test_hash_password_refuses_unknown_scheme(self) -> None:
        """hash_password raises KeyError for a scheme that is not enabled."""
        self.assertRaises(KeyError, hash_password, PASSWORD, "md5-crypt")

    def test_users_and_contains(self) -> None:
        """users() lists the names sorted; `in` tells whether a user exists."""
        hash_ = fast_hash("sha256-crypt")
        self.write(f"carol:{hash_}\n# zed:{hash_}\nalice:{hash_}\nbob:{hash_}\n")
        db = UserDatabase(self.path)
        self.assertEqual(db.users(), ["alice", "bob", "carol"])
        self.assertIn("bob", db)
        self.assertNotIn("zed", db)
        self.assertNotIn("# zed", db)


class UnknownUserTests(UserFileTestCase):
    """Unknown users cost as much as known ones."""

    def test_unknown_user_checks_a_users_hash(self) -> None:
        """
        An unknown user is refused after one check against one of the file's own hashes, so it
        costs what the file's users cost, whatever their schemes: each name always the same
        hash, and the names spread over all of them.
        """
        hashes = {fast_hash("argon2id"), fast_hash("bcrypt"), fast_hash("sha512-crypt")}
        self.write("".join(f"user{n}:{hash_}\n" for n, hash_ in enumerate(sorted(hashes))))
        db = UserDatabase(self.path)
        recorder = RecordingContext()
        self.patch(userdb, "CONTEXT", recorder)
        self.assertFalse(db.verify("mallory", PASSWORD))
        self.assertEqual(len(recorder.hashes), 1)
        self.assertIn(recorder.hashes[0], hashes)
        self.assertFalse(db.verify("mallory", WRONG))
        self.assertEqual(recorder.hashes[1], recorder.hashes[0])
        for n in range(60):
            self.assertFalse(db.verify(f"nobody{n}", PASSWORD))
        self.assertEqual(set(recorder.hashes), hashes)

    def test_unknown_user_stand_in_is_the_same_in_every_process(self) -> None:
        """
        Workers load the file each on its own, and a restart loads it again: a name keeps its
        stand-in hash, or repeating an unknown name would show it changing.
        """
        self.write("".join(f"user{n}:{fast_hash('sha256-crypt', b'%d' % n)}\n" for n in range(20)))
        recorders = []
        for _ in range(2):
            db = UserDatabase(self.path)
            recorders.append(RecordingContext())
            self.patch(userdb, "CONTEXT", recorders[-1])
            for n in range(10):
                db.verify(f"nobody{n}", PASSWORD)
        self.assertEqual(recorders[0].hashes, recorders[1].hashes)
        self.assertGreater(len(set(recorders[0].hashes)), 1)

    def test_known_user_checks_own_hash(self) -> None:
        """A known user is checked once, against that user's own hash."""
        self.write(f"alice:{fast_hash('argon2id')}\n")
        db = UserDatabase(self.path)
        recorder = RecordingContext()
        self.patch(userdb, "CONTEXT", recorder)
        self.assertTrue(db.verify("alice", PASSWORD))
        self.assertEqual(recorder.hashes, [fast_hash("argon2id")])

    def test_unknown_user_with_empty_file(self) -> None:
        """
        A file with no users loads, and every user is refused, after a check against a
        default-cost argon2id hash.
        """
        self.write("# nobody yet\n")
        db = UserDatabase(self.path)
        self.assertEqual(db.users(), [])
        recorder = RecordingContext()
        self.patch(userdb, "CONTEXT", recorder)
        self.assertFalse(db.verify("alice", PASSWORD))
        self.assertEqual(len(recorder.hashes), 1)
        self.assertEqual(
            argon2_parameters(recorder.hashes[0]),
            argon2_parameters(hash_password(b"x").removeprefix("{ARGON2ID}")),
        )


class FailedCheckTests(UserFileTestCase):
    """Passwords a scheme cannot take, and errors inside passlib, are failed logins."""

    def test_long_bcrypt_password(self) -> None:
        """A bcrypt password over 72 bytes is a failed login that logs no error."""
        observer = self.capture_log()
        seventy_two = b"p" * 72
        self.write(f"alice:{fast_hash('bcrypt', seventy_two)}\n")
        db = UserDatabase(self.path)
        self.assertTrue(db.verify("alice", seventy_two))
        recorder = RecordingContext()
        self.patch(userdb, "CONTEXT", recorder)
        # bcrypt itself would ignore everything past byte 72 and accept this one.
        self.assertFalse(db.verify("alice", seventy_two + b"!"))
        self.assertNotIn(LogLevel.error, levels(observer))
        # The refusal still costs a full check of alice's own hash after the failed one.
        self.assertEqual(recorder.hashes, [fast_hash("bcrypt", seventy_two)] * 2)

    def test_nul_byte_in_bcrypt_password(self) -> None:
        """
        A bcrypt password with a NUL byte is a failed login, which costs a full bcrypt check,
        for a known user as for an unknown one checked against a bcrypt stand-in.
        """
        self.write(f"alice:{fast_hash('bcrypt')}\n")
        db = UserDatabase(self.path)
        recorder = RecordingContext()
        self.patch(userdb, "CONTEXT", recorder)
        self.assertFalse(db.verify("alice", PASSWORD + b"\x00"))
        self.assertFalse(db.verify("mallory", PASSWORD + b"\x00"))
        self.assertEqual(recorder.hashes, [fast_hash("bcrypt")] * 4)

    def test_passlib_error_is_logged_without_password(self) -> None:
        """An unexpected passlib error is a failed login, logged as an error without the password.
        """
        observer = self.capture_log()
        self.write(f"alice:{fast_hash('sha512-crypt')}\n")
        db = UserDatabase(self.path)
        self.patch(
            userdb,
            "CONTEXT",
            RecordingContext(lambda hash_: MissingBackendError("sha512_crypt: no backend")),
        )
        self.assertFalse(db.verify("alice", PASSWORD))
        self.assertEqual(levels(observer), [LogLevel.error])
        text = formatted(observer)
        self.assertIn("alice", text)
        self.assertIn("MissingBackendError", text)
        self.assertNotIn(PASSWORD.decode("utf-8"), text)

    def test_odd_input_never_raises(self) -> None:
        """verify returns False, never raises, for inputs of the wrong kind."""
        self.write(f"alice:{fast_hash('sha256-crypt')}\n")
        db = UserDatabase(self.path)
        odd: list[tuple[Any, Any]] = [
            ("alice", None),
            ("alice", 12),
            (None, PASSWORD),
            (["alice"], PASSWORD),
            ("", b""),
            ("alice", b"\xff" * 10000),
        ]
        for user, password in odd:
            self.assertFalse(db.verify(user, password), repr((user, password))[:40])


class LoadErrorTests(UserFileTestCase):
    """Weak schemes and malformed lines stop the file from loading, naming the line."""

    def test_weak_schemes_refused(self) -> None:
        """Weak or unknown schemes are load errors naming the path and line, never the hash."""
        argon2i = CONTEXT.handler("argon2").using(type="I", memory_cost=64, rounds=1, parallelism=1)
        weak = [
            "{PLAIN}hunter2",
            "{CLEARTEXT}hunter2",
            "{MD5}$1$hunter2$abcdefghijklmnopqrstuv",
            "{SSHA}aHVudGVyMmh1bnRlcjJodW50ZXIy",
            "{SHA512-CRYPT.B64}JDYkaHVudGVyMg==",
            "{ARGON2I}" + str(argon2i.hash(b"hunter2")),
            "{ARGON2ID}" + str(argon2i.hash(b"hunter2")),
            "{NOSUCH}hunter2",
            "hunter2",
            "$1$hunter2$abcdefghijklmnopqrstuv",
            "$apr1$hunter2$abcdefghijklmnopqrstuv",
            "$y$j9T$hunter2$abcdefghijklmnopqrstuvwxyz0123456789ABCDEF",
            str(argon2i.hash(b"hunter2")),
        ]
        for field in weak:
            message = self.load_error(f"# users\n\nbob:{fast_hash('bcrypt')}\nalice:{field}\n")
            self.assertIn(f"{self.path}:4:", message, field)
            self.assertNotIn("hunter2", message, field)
            self.assertNotIn(field, message)
            self.assertEqual(len(message.splitlines()), 1, message)

    def test_refused_scheme_is_named(self) -> None:
        """A known but refused Dovecot scheme is named in the load error."""
        self.assertIn("{PLAIN}", self.load_error("alice:{plain}hunter2\n"))

    def test_scheme_and_hash_must_agree(self) -> None:
        """A Dovecot scheme followed by a hash of another enabled scheme is a load error."""
        message = self.load_error(f"alice:{{BLF-CRYPT}}{fast_hash('sha512-crypt')}\n")
        self.assertIn(f"{self.path}:1:", message)
        self.assertIn("BLF-CRYPT", message)

    def test_malformed_lines(self) -> None:
        """Malformed lines are load errors naming the path and the line."""
        hash_ = fast_hash("sha256-crypt")
        malformed = {
            "no colon": "alice",
            "empty user": f":{hash_}",
            "empty password": "alice:",
            "empty after scheme": "alice:{SHA256-CRYPT}",
            "unclosed scheme": "alice:{SHA256-CRYPT" + hash_,
            "truncated hash": f"alice:{hash_[:-5]}",
            "bad bcrypt cost": "alice:$2y$xx$" + fast_hash("bcrypt")[7:],
            "space in user": f"al ice:{hash_}",
            "leading space": f"  alice:{hash_}",
            "control character": f"al\x7fice:{hash_}",
        }
        for what, line in malformed.items():
            message = self.load_error(f"# header\nbob:{hash_}\n{line}\n")
            self.assertIn(f"{self.path}:3:", message, what)
            self.assertNotIn(hash_, message, what)

    def test_hash_cut_at_its_last_dollar(self) -> None:
        """
        A hash cut short at its last "$" (a salt and settings, no checksum: passlib reads it as a
        setting that no password matches) is a load error, for each scheme.
        """
        for scheme in ("sha256-crypt", "sha512-crypt", "bcrypt", "argon2id"):
            hash_ = fast_hash(scheme)
            cut = hash_[:29] if scheme == "bcrypt" else hash_[: hash_.rindex("$")]  # bcrypt: "$2y$NN$" and the salt
            message = self.load_error(f"bob:{fast_hash('sha256-crypt')}\nalice:{cut}\n")
            self.assertIn(f"{self.path}:2:", message, scheme)

    def test_nologin_refused(self) -> None:
        """A user with Dovecot's nologin extra field cannot log in, even with the right password."""
        hash_ = fast_hash("sha256-crypt")
        self.write(f"alice:{hash_}::::::nologin\nbob:{hash_}:1000:1000::/home/bob::userdb_quota_rule=*:storage=1G\n")
        users = UserDatabase(self.path)
        self.assertFalse(users.verify("alice", PASSWORD))
        self.assertTrue(users.verify("bob", PASSWORD))

    def test_unenforced_restriction_refused(self) -> None:
        """allow_nets and allow_real_nets, which the gateway would not check, make the file fail to load."""
        hash_ = fast_hash("sha256-crypt")
        for field in ("allow_nets=192.0.2.0/24", "ALLOW_REAL_NETS=10.0.0.0/8", "nodelay allow_nets=::1"):
            message = self.load_error(f"bob:{hash_}\nalice:{hash_}::::::{field}\n")
            self.assertIn(f"{self.path}:2: extra field allow_", message, field)

    def test_invalid_utf8(self) -> None:
        """A line that is not UTF-8 is a load error naming the line."""
        with open(self.path, "wb") as file:
            file.write(b"# ok\nal\xffice:" + fast_hash("sha256-crypt").encode() + b"\n")
        message = str(self.assertRaises(UserFileError, UserDatabase, self.path))
        self.assertIn(f"{self.path}:2:", message)

    def test_duplicate_user(self) -> None:
        """A user defined twice is a load error naming both lines."""
        hash_ = fast_hash("sha256-crypt")
        message = self.load_error(f"alice:{hash_}\nbob:{hash_}\n\nalice:{hash_}\n")
        self.assertIn(f"{self.path}:4:", message)
        self.assertIn("line 1", message)

    def test_missing_file(self) -> None:
        """A missing file is a load error naming the path."""
        message = str(self.assertRaises(UserFileError, UserDatabase, self.path))
        self.assertIn(self.path, message)

    def test_parse_user_file(self) -> None:
        """parse_user_file returns the bare hash of each user, ignoring comments and blanks."""
        hash_ = fast_hash("bcrypt")
        data = f"# c\n   # indented comment\n\n \nalice:{{BLF-CRYPT}}{hash_}:1:1\nbob:{hash_}"
        self.assertEqual(parse_user_file(data.encode(), "x"), {"alice": hash_, "bob": hash_})


class UserNameTests(SynchronousTestCase):
    """The rules for user names."""

    def test_accepted(self) -> None:
        """Ordinary names, addresses and non-ASCII names up to 255 bytes are accepted."""
        for name in ("alice", "alice@example.org", "j\u00f6rg+tag", "a" * 255, "a#b"):
            check_user_name(name)

    def test_refused(self) -> None:
        """Empty, over-long, comment-like names and names with ':', spaces or controls are refused."""
        for name in ("", "a:b", "a b", "a\tb", "a\u00a0b", "a\x00b", "a\x1bb", "#a", "\u00e9" * 128,
                     "a\udcffb"):
            self.assertRaises(ValueError, check_user_name, name)


class ReloadTests(UserFileTestCase):
    """The file is re-read when it changes, and a bad version does not replace a good one."""

    def setUp(self) -> None:
        super().setUp()
        self.observer = self.capture_log()
        self.write(f"alice:{fast_hash('sha256-crypt')}\n")
        self.db = UserDatabase(self.path)

    def test_replaced_file_is_picked_up(self) -> None:
        """A file replaced by rename is used at the next check."""
        self.write(f"alice:{fast_hash('sha256-crypt', WRONG)}\nbob:{fast_hash('sha256-crypt')}\n")
        self.assertTrue(self.db.verify("alice", WRONG))
        self.assertFalse(self.db.verify("alice", PASSWORD))
        self.assertTrue(self.db.verify("bob", PASSWORD))
        self.assertEqual(self.db.users(), ["alice", "bob"])

    def test_file_rewritten_in_place_is_picked_up(self) -> None:
        """A file rewritten in place, same inode, is used at the next check."""
        inode = os.stat(self.path).st_ino
        with open(self.path, "w") as file:
            file.write(f"bob:{fast_hash('sha256-crypt')}\n")
        self.assertEqual(os.stat(self.path).st_ino, inode)
        self.assertTrue(self.db.verify("bob", PASSWORD))
        self.assertFalse(self.db.verify("alice", PASSWORD))

    def test_broken_rewrite_keeps_old_contents(self) -> None:
        """A rewrite that does not load leaves the old users in service, with one warning."""
        self.write(f"alice:{fast_hash('sha256-crypt', WRONG)}\nbob:{{PLAIN}}secret\n")
        self.assertTrue(self.db.verify("alice", PASSWORD))
        self.assertFalse(self.db.verify("alice", WRONG))
        self.assertFalse(self.db.verify("bob", b"secret"))
        self.assertEqual(levels(self.observer), [LogLevel.warn])
        text = formatted(self.observer)
        self.assertIn(f"{self.path}:2:", text)
        self.assertNotIn("secret", text)

    def test_fixed_file_is_picked_up_after_broken_one(self) -> None:
        """After a broken version, the next good version is loaded."""
        self.write("alice:{PLAIN}secret\n")
        self.assertTrue(self.db.verify("alice", PASSWORD))
        self.write(f"alice:{fast_hash('sha256-crypt', WRONG)}\n")
        self.assertTrue(self.db.verify("alice", WRONG))
        self.assertEqual(levels(self.observer), [LogLevel.warn, LogLevel.info])

    def test_deleted_file_keeps_old_contents(self) -> None:
        """A deleted file leaves the old users in service with one warning, until it returns."""
        os.unlink(self.path)
        self.assertTrue(self.db.verify("alice", PASSWORD))
        self.assertTrue(self.db.verify("alice", PASSWORD))
        self.assertEqual(levels(self.observer), [LogLevel.warn])
        self.write(f"bob:{fast_hash('sha256-crypt')}\n")
        self.assertTrue(self.db.verify("bob", PASSWORD))
        self.assertFalse(self.db.verify("alice", PASSWORD))

    def test_unchanged_file_is_not_reread(self) -> None:
        """While the file does not change, checks do not read it again."""
        self.assertTrue(self.db.verify("alice", PASSWORD))
        opened: list[object] = []
        real_open = open

        def recording_open(*args: Any, **kwargs: Any) -> Any:
            opened.append(args[0])
            return real_open(*args, **kwargs)

        self.patch(builtins, "open", recording_open)
        self.assertTrue(self.db.verify("alice", PASSWORD))
        self.assertEqual(opened, [])
        os.utime(self.path, ns=(0, 0))
        self.assertTrue(self.db.verify("alice", PASSWORD))
        self.assertEqual(opened, [self.path])


class SelfTestTests(SynchronousTestCase):
    """The startup self-test."""

    def test_passes(self) -> None:
        """self_test passes with the installed passlib and backends."""
        self_test()

    def test_vectors_are_standard(self) -> None:
        """The self-test's known hashes verify with argon2-cffi and bcrypt directly."""
        vectors = userdb._SELF_TEST_VECTORS
        password = userdb._SELF_TEST_PASSWORD
        self.assertEqual(set(vectors), set(SCHEMES))
        self.assertTrue(argon2.PasswordHasher().verify(vectors["argon2id"], password))
        self.assertTrue(bcrypt.checkpw(password, vectors["bcrypt"].encode()))

    def test_names_broken_scheme(self) -> None:
        """A scheme whose backend fails makes self_test raise RuntimeError naming it."""
        self.patch(
            userdb,
            "CONTEXT",
            RecordingContext(
                lambda hash_: MissingBackendError("no backend") if hash_.startswith("$2") else None
            ),
        )
        error = self.assertRaises(RuntimeError, self_test)
        self.assertIn("bcrypt", str(error))

    def test_detects_wrong_results(self) -> None:
        """A backend that accepts any password fails the self-test, naming the scheme."""

        class Gullible(RecordingContext):
            """A context that accepts every password."""

            def verify(self, secret: object, hash_: str) -> bool:
                return True

        self.patch(userdb, "CONTEXT", Gullible())
        error = self.assertRaises(RuntimeError, self_test)
        self.assertIn("argon2id", str(error))
