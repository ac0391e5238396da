"""Tests for gateway.senders: who may use which envelope sender, and the senders file."""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from gateway import senders
from gateway.senders import SenderPolicy, SendersFileError, parse_senders

SENDERS = """\
# user: addresses, or @domain for every address of a domain
alice@example.org: a.smith@example.org, Postmaster@Example.org

bob: bob@example.net,@Lists.Example.NET  bob.b@example.com
"""
MIB = 1024 * 1024


class SendersFileTestCase(SynchronousTestCase):
    """A test with its own senders file in a temporary directory."""

    def setUp(self) -> None:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        self.path = os.path.join(directory, "senders")
        self.generation = 0

    def write(self, data: str | bytes) -> None:
        """
        Replace the senders file by rename, as an editor does, with a modification time that
        differs from every earlier version's.
        """
        self.generation += 1
        temporary = self.path + ".new"
        with open(temporary, "wb") as file:
            file.write(data.encode() if isinstance(data, str) else data)
        self.touch(temporary)
        os.replace(temporary, self.path)

    def overwrite(self, data: str) -> None:
        """Rewrite the senders file in place (same inode), with a new modification time."""
        self.generation += 1
        with open(self.path, "r+b") as file:
            file.truncate(0)
            file.write(data.encode())
        self.touch(self.path)

    def touch(self, path: str) -> None:
        """Give C{path} a modification time that differs from every earlier version's."""
        os.utime(path, ns=(1_700_000_000_000_000_000 + self.generation * 1_000_000_000,) * 2)

    def capture_log(self) -> EventLoggingObserver:
        """Return an observer that receives everything gateway.senders logs during the test."""
        observer = EventLoggingObserver()
        self.patch(senders, "log", Logger(namespace="gateway.senders", observer=observer))
        return observer

    def load_error(self, data: str | bytes) -> str:
        """Write a senders file that must not load, and return the load error's message."""
        self.write(data)
        return str(self.assertRaises(SendersFileError, SenderPolicy, self.path))


class LoginNameTests(SynchronousTestCase):
    """Without a senders file, a user may send only as its login name."""

    def setUp(self) -> None:
        self.policy = SenderPolicy(None)

    def test_login_name(self) -> None:
        """A login name that is an address may be used as the sender."""
        self.assertTrue(self.policy.allowed("alice@example.org", "alice@example.org"))

    def test_case_insensitive(self) -> None:
        """The login name matches the sender without regard to case, either way."""
        self.assertTrue(self.policy.allowed("Alice@Example.ORG", "alice@example.org"))
        self.assertTrue(self.policy.allowed("alice@example.org", "ALICE@EXAMPLE.ORG"))

    def test_other_address(self) -> None:
        """Any other address is refused, including one in the same domain."""
        self.assertFalse(self.policy.allowed("alice@example.org", "bob@example.org"))
        self.assertFalse(self.policy.allowed("alice@example.org", "alice@example.org.evil.example"))

    def test_not_an_address(self) -> None:
        """A login name that is not an address allows no sender, not even itself."""
        self.assertFalse(self.policy.allowed("alice", "alice"))
        self.assertFalse(self.policy.allowed("alice", "alice@example.org"))

    def test_null_sender(self) -> None:
        """The null sender is refused."""
        self.assertFalse(self.policy.allowed("alice@example.org", ""))


class FilePolicyTests(SendersFileTestCase):
    """The senders file adds addresses and domains per user."""

    def setUp(self) -> None:
        super().setUp()
        self.write(SENDERS)
        self.policy = SenderPolicy(self.path)

    def test_listed_addresses(self) -> None:
        """Addresses listed for a user are allowed, without regard to case."""
        self.assertTrue(self.policy.allowed("alice@example.org", "a.smith@example.org"))
        self.assertTrue(self.policy.allowed("alice@example.org", "postmaster@example.org"))
        self.assertTrue(self.policy.allowed("alice@example.org", "A.Smith@EXAMPLE.org"))

    def test_login_name_still_allowed(self) -> None:
        """A user in the file may still send as its login name."""
        self.assertTrue(self.policy.allowed("alice@example.org", "alice@example.org"))

    def test_other_users_addresses(self) -> None:
        """One user's addresses are not another's."""
        self.assertFalse(self.policy.allowed("alice@example.org", "bob@example.net"))
        self.assertFalse(self.policy.allowed("bob", "a.smith@example.org"))

    def test_not_an_address_user(self) -> None:
        """A user whose name is not an address has exactly the file's entries."""
        self.assertTrue(self.policy.allowed("bob", "bob@example.net"))
        self.assertTrue(self.policy.allowed("bob", "bob.b@example.com"))
        self.assertFalse(self.policy.allowed("bob", "bob"))
        self.assertFalse(self.policy.allowed("bob", "bob@example.org"))

    def test_domain_wildcard(self) -> None:
        """@domain allows every address of that domain, without regard to case, and no other domain."""
        self.assertTrue(self.policy.allowed("bob", "announce@lists.example.net"))
        self.assertTrue(self.policy.allowed("bob", "Anything@LISTS.example.net"))
        self.assertFalse(self.policy.allowed("bob", "announce@sub.lists.example.net"))
        self.assertFalse(self.policy.allowed("bob", "announce@example.net"))
        self.assertFalse(self.policy.allowed("bob", "lists.example.net"))

    def test_domain_wildcard_not_routed_onwards(self) -> None:
        """
        @domain does not cover a local part an MTA may route to another domain ("%", "!"), nor one
        that must be quoted; an address listed whole still passes.
        """
        for sender in ("ceo%gmail.com@lists.example.net", "gmail.com!ceo@lists.example.net",
                       '"ceo%gmail.com"@lists.example.net', '"ceo\\%gmail.com"@lists.example.net',
                       '"ceo@gmail.com"@lists.example.net', '"c e o"@lists.example.net',
                       '"ceo."@lists.example.net'):
            self.assertFalse(self.policy.allowed("bob", sender), sender)
        self.write(SENDERS + "carol: odd%name@example.com\n")
        self.assertTrue(SenderPolicy(self.path).allowed("carol", "odd%name@example.com"))

    def test_needless_quotes(self) -> None:
        """
        A quoted local part that needs no quotes is the address written plain, as the MTA reads
        it, escaped characters included: in a sender matched to the login name, a listed address
        or a domain, and in the file's entries and the login name themselves.
        """
        for user, sender in (("alice@example.org", '"alice"@example.org'),
                             ("alice@example.org", '"Al\\ice"@example.org'),
                             ("alice@example.org", '"a.smith"@example.org'),
                             ("bob", '"announce"@lists.example.net'),
                             ("bob", '"b\u00e9a.t"@lists.example.net')):
            self.assertTrue(self.policy.allowed(user, sender), sender)
        self.write(SENDERS + 'carol: "info"@example.com\n')
        self.assertTrue(SenderPolicy(self.path).allowed("carol", "info@example.com"))
        self.assertTrue(SenderPolicy(self.path).allowed("carol", '"info"@example.com'))
        self.assertTrue(self.policy.allowed('"dave"@example.org', "dave@example.org"))
        for user, sender in (("alice@example.org", '"alice\\"@example.org'),
                             ("alice@example.org", '"alice"x@example.org'),
                             ("alice@example.org", '"alice@example.org"'),
                             ("alice@example.org", '"bob"@example.org')):
            self.assertFalse(self.policy.allowed(user, sender), sender)

    def test_null_sender(self) -> None:
        """The null sender is refused even for users in the file."""
        self.assertFalse(self.policy.allowed("bob", ""))
        self.assertFalse(self.policy.allowed("alice@example.org", ""))

    def test_unlisted_user(self) -> None:
        """A user not in the file has only its login name."""
        self.assertTrue(self.policy.allowed("carol@example.org", "carol@example.org"))
        self.assertFalse(self.policy.allowed("carol@example.org", "a.smith@example.org"))


class ReloadTests(SendersFileTestCase):
    """Changes to the senders file while the gateway runs."""

    def setUp(self) -> None:
        super().setUp()
        self.write("bob: bob@example.net\n")
        self.policy = SenderPolicy(self.path)

    def test_reload_when_changed(self) -> None:
        """A new version of the file is used at the next check."""
        self.assertTrue(self.policy.allowed("bob", "bob@example.net"))
        self.write("bob: robert@example.net, @example.com\n")
        self.assertTrue(self.policy.allowed("bob", "robert@example.net"))
        self.assertTrue(self.policy.allowed("bob", "any@example.com"))
        self.assertFalse(self.policy.allowed("bob", "bob@example.net"))

    def test_same_size_rewrite(self) -> None:
        """A new version of the same size, written in place, is noticed by its modification time."""
        inode = os.stat(self.path).st_ino
        self.overwrite("bob: bob@example.com\n")
        self.assertEqual(os.stat(self.path).st_ino, inode)
        self.assertTrue(self.policy.allowed("bob", "bob@example.com"))
        self.assertFalse(self.policy.allowed("bob", "bob@example.net"))

    def test_broken_rewrite_keeps_old(self) -> None:
        """A broken new version keeps the previous contents and logs one warning naming the problem."""
        observer = self.capture_log()
        self.write("bob: bob@example.net\nbob robert@example.net\n")
        self.assertTrue(self.policy.allowed("bob", "bob@example.net"))
        self.assertFalse(self.policy.allowed("bob", "robert@example.net"))
        self.assertTrue(self.policy.allowed("bob", "bob@example.net"))
        self.assertEqual([event["log_level"] for event in observer], [LogLevel.warn])
        event = observer[0]
        self.assertEqual(event["log_format"], "senders_file_not_reloaded problem={problem}")
        self.assertIn(f"{self.path}:2:", formatEvent(event))

    def test_fixed_after_broken(self) -> None:
        """A good version after a broken one is used."""
        self.capture_log()
        self.write("bob robert@example.net\n")
        self.policy.allowed("bob", "bob@example.net")
        self.write("bob: robert@example.net\n")
        self.assertTrue(self.policy.allowed("bob", "robert@example.net"))
        self.assertFalse(self.policy.allowed("bob", "bob@example.net"))

    def test_deleted_file_keeps_old(self) -> None:
        """A file that is gone keeps the previous contents, silently, until it comes back."""
        observer = self.capture_log()
        os.remove(self.path)
        self.assertTrue(self.policy.allowed("bob", "bob@example.net"))
        self.assertEqual(list(observer), [])
        self.write("bob: robert@example.net\n")
        self.assertTrue(self.policy.allowed("bob", "robert@example.net"))
        self.assertFalse(self.policy.allowed("bob", "bob@example.net"))

    def test_oversized_rewrite_keeps_old(self) -> None:
        """A new version over 1 MiB keeps the previous contents and logs a warning."""
        observer = self.capture_log()
        self.write("bob: robert@example.net\n" + "#" * MIB + "\n")
        self.assertTrue(self.policy.allowed("bob", "bob@example.net"))
        self.assertFalse(self.policy.allowed("bob", "robert@example.net"))
        self.assertEqual(len(list(observer)), 1)
        self.assertIn("larger than 1 MiB", formatEvent(observer[0]))


class FileErrorTests(SendersFileTestCase):
    """Senders files that do not load at start."""

    def test_missing_file(self) -> None:
        """A file that cannot be read is refused with its name."""
        message = str(self.assertRaises(SendersFileError, SenderPolicy, self.path))
        self.assertIn(self.path, message)
        self.assertIn("cannot read", message)

    def test_parse_errors_name_file_and_line(self) -> None:
        """Each malformed line is reported with the file and its line number."""
        for bad in ("bob bob@example.net", "bob:", ": bob@example.net", "bob: bob", "bob: bob@example.net, robert"):
            message = self.load_error(f"# senders\n\n{bad}\n")
            self.assertTrue(message.startswith(f"{self.path}:3: "), message)

    def test_duplicate_user(self) -> None:
        """A user listed twice is refused at its second line."""
        message = self.load_error("bob: bob@example.net\nalice: alice@example.org\nbob: robert@example.net\n")
        self.assertEqual(message, f"{self.path}:3: user listed twice")

    def test_line_numbers_count_newlines_only(self) -> None:
        """
        Line numbers count line feeds only: a form feed line (an editor's page break) or a U+2028 in a
        comment does not shift them.
        """
        for text, line in (("# senders\n\x0c\nbob bob@example.net\n", 3),
                           ("# senders \u2028 # more\nbob bob@example.net\n", 2)):
            message = self.load_error(text)
            self.assertTrue(message.startswith(f"{self.path}:{line}: "), message)

    def test_over_one_mib(self) -> None:
        """A file larger than 1 MiB is refused."""
        message = self.load_error("bob: bob@example.net\n" + "#" * MIB + "\n")
        self.assertEqual(message, f"{self.path}: larger than 1 MiB")

    def test_exactly_one_mib(self) -> None:
        """A file of exactly 1 MiB loads."""
        line = "bob: bob@example.net\n"
        self.write(line + "#" * (MIB - len(line) - 1) + "\n")
        self.assertEqual(os.path.getsize(self.path), MIB)
        self.assertTrue(SenderPolicy(self.path).allowed("bob", "bob@example.net"))


class ParseSendersTests(SynchronousTestCase):
    """The senders file format."""

    def test_parse(self) -> None:
        """
        Users map to lower-cased addresses and domains; commas and spaces separate; comments and
        blank lines are skipped.
        """
        self.assertEqual(parse_senders(SENDERS.encode(), "senders"), {
            "alice@example.org": frozenset({"a.smith@example.org", "postmaster@example.org"}),
            "bob": frozenset({"bob@example.net", "@lists.example.net", "bob.b@example.com"}),
        })

    def test_crlf_and_indentation(self) -> None:
        """CRLF line ends and surrounding spaces are accepted."""
        self.assertEqual(parse_senders(b"  bob :  bob@example.net ,\r\n", "senders"),
                         {"bob": frozenset({"bob@example.net"})})

    def test_empty(self) -> None:
        """An empty file or one of comments only allows nothing extra."""
        self.assertEqual(parse_senders(b"", "senders"), {})
        self.assertEqual(parse_senders(b"# nothing\n\n   \n", "senders"), {})
