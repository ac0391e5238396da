"""Tests for gateway.passwd, the mailgateway-passwd admin tool."""

from __future__ import annotations

import errno
import fcntl
import getpass
import io
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from typing import Any

from twisted.python.monkey import MonkeyPatcher
from twisted.trial.unittest import SynchronousTestCase

from gateway.passwd import main
from gateway.userdb import SCHEMES, UserDatabase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSWORD = "Tr0ub4dor&3-unique"
OTHER_PASSWORD = "another-Secret-77"
# A valid sha256-crypt hash of "x", cheap to write into fixtures.
OTHER_HASH = "{SHA256-CRYPT}$5$rounds=1000$mgwTestSaltX1234$c5WJ3GoGIQWXra0VQx8Y2goDYUQ4K7l66T80/zuZ81A"
# How many runs test_parallel_adds_all_kept starts at once. Without the lock, 20 runs lost
# users in every trial (8 to 12 of 20 kept on two CPUs); 10 did too, with less margin.
PARALLEL_RUNS = 20


class PasswdTestCase(SynchronousTestCase):
    """Runs the tool on a user file in a private temporary directory."""

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="mailgateway-passwd-")
        self.addCleanup(shutil.rmtree, self.directory)
        self.path = os.path.join(self.directory, "users")

    def run_tool(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        """
        Run main() with the given arguments and standard input, and check that no password
        used in these tests shows up in its output.

        :param argv: the arguments after the program name.
        :param stdin: the text on standard input.
        :returns: the exit status, standard output and standard error.
        """
        out, err = io.StringIO(), io.StringIO()
        patcher = MonkeyPatcher(
            (sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode("utf-8")))),
            (sys, "stdout", out),
            (sys, "stderr", err),
        )
        code = patcher.runWithPatches(main, list(argv))
        for secret in (PASSWORD, OTHER_PASSWORD):
            self.assertNotIn(secret, out.getvalue())
            self.assertNotIn(secret, err.getvalue())
        return code, out.getvalue(), err.getvalue()

    def add(self, user: str, password: str = PASSWORD, *options: str) -> tuple[int, str, str]:
        """Add a user with --stdin and return what run_tool returns."""
        return self.run_tool("add", user, "--file", self.path, "--stdin", *options, stdin=password + "\n")

    def read(self) -> bytes:
        """Return the user file's contents."""
        with open(self.path, "rb") as file:
            return file.read()

    def write(self, data: bytes, mode: int = 0o600) -> None:
        """Create the user file with the given contents and mode."""
        with open(self.path, "wb") as file:
            file.write(data)
        os.chmod(self.path, mode)

    def assert_verifies(self, user: str, password: str) -> None:
        """Fail unless the user file loads and accepts the user's password."""
        self.assertTrue(UserDatabase(self.path).verify(user, password.encode()), user)

    def assert_mode(self, mode: int) -> None:
        """Fail unless the user file's permission bits are *mode*."""
        self.assertEqual(oct(stat.S_IMODE(os.stat(self.path).st_mode)), oct(mode))

    def assert_only_user_file(self) -> None:
        """Fail unless the directory holds the user file and nothing else."""
        self.assertEqual(os.listdir(self.directory), ["users"])


class AddTests(PasswdTestCase):
    """mailgateway-passwd add."""

    def test_add_creates_file(self) -> None:
        """add creates a missing file, mode 0600, with the user in Dovecot argon2id form."""
        code, out, err = self.add("alice")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("alice", out)
        data = self.read()
        self.assertTrue(data.startswith(b"alice:{ARGON2ID}$argon2id$"), data)
        self.assertTrue(data.endswith(b"\n"))
        self.assertEqual(data.count(b"\n"), 1)
        self.assert_mode(0o600)
        self.assert_only_user_file()
        self.assert_verifies("alice", PASSWORD)

    def test_stdin_newline_is_stripped(self) -> None:
        """The password read with --stdin is the line without its newline (LF or CRLF)."""
        self.add("alice", PASSWORD + "\r")
        db = UserDatabase(self.path)
        self.assertTrue(db.verify("alice", PASSWORD.encode()))
        self.assertFalse(db.verify("alice", PASSWORD.encode() + b"\n"))
        self.assertFalse(db.verify("alice", PASSWORD.encode() + b"\r"))

    def test_add_keeps_other_lines(self) -> None:
        """add appends one line and keeps every other byte, even without a final newline."""
        before = b"# users\r\n\n   # indented\nbob:" + OTHER_HASH.encode() + b":1000:1000::/home/bob"
        self.write(before, 0o644)
        self.assertEqual(self.add("alice")[0], 0)
        after = self.read()
        self.assertTrue(after.startswith(before + b"\nalice:{ARGON2ID}$"), after)
        self.assert_mode(0o640)
        self.assert_verifies("alice", PASSWORD)
        self.assert_verifies("bob", "x")

    def test_add_existing_user_refused(self) -> None:
        """add refuses a user who exists, with a message and status 1, and leaves the file."""
        self.write(b"alice:" + OTHER_HASH.encode() + b"\n")
        before = self.read()
        code, out, err = self.add("alice")
        self.assertEqual(code, 1)
        self.assertIn("already exists", err)
        self.assertEqual(self.read(), before)

    def test_each_scheme(self) -> None:
        """--scheme selects each enabled scheme, written in its Dovecot form."""
        for index, (name, scheme) in enumerate(SCHEMES.items()):
            self.assertEqual(self.add(f"user{index}", PASSWORD, "--scheme", name)[0], 0)
            self.assertIn(f"user{index}:{{{scheme.dovecot}}}{scheme.prefixes[0]}".encode(), self.read())
        db = UserDatabase(self.path)
        for index in range(len(SCHEMES)):
            self.assertTrue(db.verify(f"user{index}", PASSWORD.encode()))

    def test_options_before_command(self) -> None:
        """Options are accepted before the command too."""
        code, _, _ = self.run_tool(
            "--file", self.path, "--stdin", "--scheme", "sha256-crypt", "add", "alice", stdin=PASSWORD
        )
        self.assertEqual(code, 0)
        self.assertTrue(self.read().startswith(b"alice:{SHA256-CRYPT}$5$"))

    def test_bad_user_names_refused(self) -> None:
        """Names that are empty, too long, comment-like, or hold ':', spaces or controls are refused."""
        for name in ("", "a:b", "a b", "a\tb", "a\nb", "a\x07b", "#alice", "x" * 256):
            code, _, err = self.add(name)
            self.assertEqual(code, 1, repr(name))
            self.assertIn("user name", err)
        self.assertFalse(os.path.exists(self.path))

    def test_empty_password_refused(self) -> None:
        """An empty password is refused."""
        code, _, err = self.add("alice", "")
        self.assertEqual(code, 1)
        self.assertIn("empty", err)
        self.assertFalse(os.path.exists(self.path))

    def test_long_bcrypt_password_refused(self) -> None:
        """A password bcrypt cannot take is refused, and the file is not written."""
        code, _, err = self.add("alice", PASSWORD * 5, "--scheme", "bcrypt")
        self.assertEqual(code, 1)
        self.assertIn("bcrypt", err)
        self.assertFalse(os.path.exists(self.path))

    def test_missing_directory(self) -> None:
        """A user file in a missing directory is a clear failure."""
        self.path = os.path.join(self.directory, "nonexistent", "users")
        code, _, err = self.add("alice")
        self.assertEqual(code, 1)
        self.assertIn("cannot write", err)

    def test_warns_when_file_will_not_load(self) -> None:
        """A change to a file the gateway cannot load is made, with a warning naming the line."""
        self.write(b"# old\nbob:{PLAIN}x\n")
        code, _, err = self.add("alice")
        self.assertEqual(code, 0)
        self.assertIn(f"{self.path}:2:", err)
        self.assertIn(b"alice:{ARGON2ID}", self.read())


class PromptTests(PasswdTestCase):
    """Without --stdin the password is typed twice."""

    def fake_getpass(self, *answers: str | BaseException) -> list[str]:
        """
        Make getpass.getpass return (or raise) the answers in turn.

        :returns: the prompts shown, filled in as they are asked.
        """
        prompts: list[str] = []
        pending = list(answers)

        def fake(prompt: str = "Password: ", stream: Any = None) -> str:
            prompts.append(prompt)
            answer = pending.pop(0)
            if isinstance(answer, BaseException):
                raise answer
            return answer

        self.patch(getpass, "getpass", fake)
        return prompts

    def test_matching_passwords(self) -> None:
        """Two matching entries set the password."""
        prompts = self.fake_getpass(PASSWORD, PASSWORD)
        self.assertEqual(self.run_tool("add", "alice", "--file", self.path)[0], 0)
        self.assertEqual(len(prompts), 2)
        self.assert_verifies("alice", PASSWORD)

    def test_mismatch_refused(self) -> None:
        """Two different entries are refused and nothing is written."""
        self.fake_getpass(PASSWORD, OTHER_PASSWORD)
        code, _, err = self.run_tool("add", "alice", "--file", self.path)
        self.assertEqual(code, 1)
        self.assertIn("do not match", err)
        self.assertFalse(os.path.exists(self.path))

    def test_end_of_input_refused(self) -> None:
        """End of input at the prompt is refused."""
        self.fake_getpass(EOFError())
        self.assertEqual(self.run_tool("add", "alice", "--file", self.path)[0], 1)
        self.assertFalse(os.path.exists(self.path))

    def test_interrupt(self) -> None:
        """Ctrl-C at the prompt exits with status 130 and writes nothing."""
        self.fake_getpass(KeyboardInterrupt())
        self.assertEqual(self.run_tool("add", "alice", "--file", self.path)[0], 130)
        self.assertFalse(os.path.exists(self.path))

    def test_no_prompt_for_existing_user(self) -> None:
        """add refuses an existing user before asking for a password."""
        self.write(b"alice:" + OTHER_HASH.encode() + b"\n")
        prompts = self.fake_getpass()
        self.assertEqual(self.run_tool("add", "alice", "--file", self.path)[0], 1)
        self.assertEqual(prompts, [])


class ChangeRemoveTests(PasswdTestCase):
    """mailgateway-passwd change and remove."""

    def setUp(self) -> None:
        super().setUp()
        self.before = (
            b"# mail users\n\n"
            b"alice:" + OTHER_HASH.encode() + b":1000:1000::/home/alice::userdb_quota_rule=*:1G\n"
            b"  # bob is away\r\n"
            b"bob:" + OTHER_HASH.encode() + b"\r\n"
            b"carol:" + OTHER_HASH.encode() + b"\n"
        )
        self.write(self.before, 0o640)

    def lines(self) -> list[bytes]:
        """Return the user file's lines, split on LF only."""
        return self.read().split(b"\n")

    def test_change(self) -> None:
        """change replaces only the password field of the user's line."""
        code, out, err = self.run_tool(
            "change", "alice", "--file", self.path, "--stdin", stdin=PASSWORD + "\n"
        )
        self.assertEqual((code, err), (0, ""))
        old, new = self.before.split(b"\n"), self.lines()
        self.assertEqual(len(new), len(old))
        for index in (0, 1, 3, 4, 5, 6):
            self.assertEqual(new[index], old[index])
        self.assertTrue(new[2].startswith(b"alice:{ARGON2ID}$argon2id$"), new[2])
        self.assertTrue(new[2].endswith(b":1000:1000::/home/alice::userdb_quota_rule=*:1G"))
        self.assert_mode(0o640)
        self.assert_only_user_file()
        db = UserDatabase(self.path)
        self.assertTrue(db.verify("alice", PASSWORD.encode()))
        self.assertFalse(db.verify("alice", b"x"))
        self.assertTrue(db.verify("bob", b"x"))

    def test_change_keeps_crlf(self) -> None:
        """change keeps a CRLF line end on the changed line."""
        self.run_tool("change", "bob", "--file", self.path, "--stdin", stdin=PASSWORD)
        bob = self.lines()[4]
        self.assertTrue(bob.startswith(b"bob:{ARGON2ID}$") and bob.endswith(b"\r"), bob)
        self.assert_verifies("bob", PASSWORD)

    def test_remove(self) -> None:
        """remove deletes the user's line and keeps every other byte."""
        code, out, err = self.run_tool("remove", "alice", "--file", self.path)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(self.read(), self.before.replace(self.before.split(b"\n")[2] + b"\n", b""))
        self.assertEqual(UserDatabase(self.path).users(), ["bob", "carol"])
        self.assert_mode(0o640)
        self.assert_only_user_file()

    def test_absent_user_refused(self) -> None:
        """change and remove refuse a user who does not exist, and leave the file."""
        for command in ("change", "remove"):
            code, _, err = self.run_tool("--stdin", command, "dave", "--file", self.path, stdin="x")
            self.assertEqual(code, 1, command)
            self.assertIn("no user dave", err)
            self.assertEqual(self.read(), self.before)

    def test_comment_is_not_a_user(self) -> None:
        """A commented-out line does not count as a user."""
        self.write(b"#dave:" + OTHER_HASH.encode() + b"\n")
        self.assertEqual(self.run_tool("remove", "dave", "--file", self.path)[0], 1)
        self.assertEqual(self.run_tool("remove", "#dave", "--file", self.path)[0], 1)

    def test_missing_file(self) -> None:
        """change and remove on a missing file fail without creating it."""
        os.unlink(self.path)
        for command in ("change", "remove"):
            code, _, err = self.run_tool("--stdin", command, "alice", "--file", self.path, stdin="x")
            self.assertEqual(code, 1, command)
            self.assertIn("does not exist", err)
        self.assertFalse(os.path.exists(self.path))

    def test_duplicate_refused(self) -> None:
        """A user on two lines is not edited; the message names the lines."""
        self.write(self.before + b"alice:" + OTHER_HASH.encode() + b"\n")
        code, _, err = self.run_tool("remove", "alice", "--file", self.path)
        self.assertEqual(code, 1)
        self.assertIn("3, 7", err)

    def test_change_fixes_weak_entry(self) -> None:
        """A user stored with a refused scheme can be given a new password."""
        self.write(self.before + b"dave:{PLAIN}x\n")
        code, _, err = self.run_tool("change", "dave", "--file", self.path, "--stdin", stdin=PASSWORD)
        self.assertEqual((code, err), (0, ""))
        self.assert_verifies("dave", PASSWORD)

    def test_symlink_is_kept(self) -> None:
        """A user file reached through a symlink is replaced at its target; the link stays."""
        target = os.path.join(self.directory, "real-users")
        os.rename(self.path, target)
        os.symlink("real-users", self.path)
        self.assertEqual(self.run_tool("remove", "bob", "--file", self.path)[0], 0)
        self.assertTrue(os.path.islink(self.path))
        self.assertEqual(UserDatabase(target).users(), ["alice", "carol"])
        self.assertEqual(sorted(os.listdir(self.directory)), ["real-users", "users"])

    def test_owner_is_kept(self) -> None:
        """The new file keeps the old file's owner and group."""
        if os.geteuid() != 0:
            self.skipTest("only root can give a file to another owner")
        os.chown(self.path, 4321, 4322)
        self.assertEqual(self.run_tool("remove", "bob", "--file", self.path)[0], 0)
        status = os.stat(self.path)
        self.assertEqual((status.st_uid, status.st_gid), (4321, 4322))


class AtomicWriteTests(PasswdTestCase):
    """The file is replaced in one rename by a file that already has its final mode, or not at all."""

    def setUp(self) -> None:
        super().setUp()
        self.before = b"# users\nbob:" + OTHER_HASH.encode() + b"\n"
        self.write(self.before, 0o644)

    def test_temporary_file_is_private(self) -> None:
        """The temporary file that replaces a 0644 user file is 0640 in the same directory."""
        seen: list[tuple[str, int]] = []
        real_replace = os.replace

        def recording_replace(source: str, destination: str) -> None:
            seen.append((os.path.dirname(source), stat.S_IMODE(os.stat(source).st_mode)))
            real_replace(source, destination)

        self.patch(os, "replace", recording_replace)
        self.assertEqual(self.add("alice")[0], 0)
        self.assertEqual(seen, [(self.directory, 0o640)])
        self.assert_only_user_file()

    def test_failed_replace_leaves_nothing(self) -> None:
        """If the rename fails, the old file is untouched and no temporary file is left."""

        def failing_replace(source: str, destination: str) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        self.patch(os, "replace", failing_replace)
        code, _, err = self.add("alice")
        self.assertEqual(code, 1)
        self.assertIn("cannot write", err)
        self.assertEqual(self.read(), self.before)
        self.assert_only_user_file()

    def test_failed_write_leaves_nothing(self) -> None:
        """If syncing the data fails, the old file is untouched and no temporary file is left."""

        def failing_fsync(descriptor: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.patch(os, "fsync", failing_fsync)
        self.assertEqual(self.add("alice")[0], 1)
        self.assertEqual(self.read(), self.before)
        self.assert_only_user_file()


class ModeTests(PasswdTestCase):
    """The new file keeps the old one's owner, group and group-read bit, and gives others nothing."""

    def setUp(self) -> None:
        super().setUp()
        # As root the file is given to another owner and group, as root:mailgateway is, so that
        # keeping them takes a chown; otherwise it keeps the tester's own.
        self.owner = (4321, 4322) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
        self.write_owned(0o640)

    def write_owned(self, mode: int) -> None:
        """Create the user file with alice and bob, the given mode and the owner self.owner."""
        self.write(b"alice:" + OTHER_HASH.encode() + b"\nbob:" + OTHER_HASH.encode() + b"\n", mode)
        os.chown(self.path, *self.owner)

    def assert_owner(self) -> None:
        """Fail unless the user file still has the owner and group that setUp gave it."""
        status = os.stat(self.path)
        self.assertEqual((status.st_uid, status.st_gid), self.owner)

    def test_group_read_kept(self) -> None:
        """A 0640 file stays 0640, with its owner and group, after add, change and remove."""
        self.assertEqual(self.add("carol")[0], 0)
        self.assert_mode(0o640)
        self.assert_owner()
        change = self.run_tool("change", "alice", "--file", self.path, "--stdin", stdin=PASSWORD)
        self.assertEqual(change[0], 0)
        self.assert_mode(0o640)
        self.assert_owner()
        self.assertEqual(self.run_tool("remove", "bob", "--file", self.path)[0], 0)
        self.assert_mode(0o640)
        self.assert_owner()
        self.assertEqual(UserDatabase(self.path).users(), ["alice", "carol"])

    def test_only_owner_bits_and_group_read(self) -> None:
        """The new file is 0600 plus the old group-read bit: no group write, execute or other bits."""
        for before, after in (
            (0o644, 0o640),
            (0o666, 0o640),
            (0o660, 0o640),
            (0o777, 0o640),
            (0o604, 0o600),
            (0o620, 0o600),
            (0o400, 0o600),
            (0o600, 0o600),
        ):
            self.write_owned(before)
            self.assertEqual(self.run_tool("remove", "bob", "--file", self.path)[0], 0, oct(before))
            self.assert_mode(after)
            self.assert_owner()

    def test_no_group_bit_before_group(self) -> None:
        """The temporary file gets its group before the group-read bit, both before any data."""
        changes: list[tuple[str, int, int, int]] = []
        real_fchmod = os.fchmod

        def recording_fchmod(descriptor: int, mode: int) -> None:
            status = os.fstat(descriptor)
            changes.append((oct(mode), status.st_uid, status.st_gid, status.st_size))
            real_fchmod(descriptor, mode)

        self.patch(os, "fchmod", recording_fchmod)
        self.assertEqual(self.add("carol")[0], 0)
        self.assertEqual(changes, [(oct(0o640), *self.owner, 0)])


class LockTests(PasswdTestCase):
    """Runs that change the same file take turns, each reading the file once it has its turn."""

    def lock_is_free(self) -> bool:
        """Return whether another run could take the lock on the user file's directory now."""
        descriptor = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(descriptor)
        return True

    def test_lock_held_at_rename(self) -> None:
        """The lock is held when the new file is renamed into place, and released afterwards."""
        free_at_rename: list[bool] = []
        real_replace = os.replace

        def checking_replace(source: str, destination: str) -> None:
            free_at_rename.append(self.lock_is_free())
            real_replace(source, destination)

        self.patch(os, "replace", checking_replace)
        self.assertEqual(self.add("alice")[0], 0)
        self.assertEqual(free_at_rename, [False])
        self.assertTrue(self.lock_is_free())
        self.assert_only_user_file()

    def test_change_made_while_waiting_is_kept(self) -> None:
        """A user that another run adds while this one waits for the lock is in the result."""
        self.write(b"alice:" + OTHER_HASH.encode() + b"\n")
        real_flock = fcntl.flock

        def flock_after_other_run(descriptor: int, operation: int) -> None:
            # Another run gets the lock first and adds bob, after this run's first read.
            with open(self.path, "ab") as file:
                file.write(b"bob:" + OTHER_HASH.encode() + b"\n")
            real_flock(descriptor, operation)

        self.patch(fcntl, "flock", flock_after_other_run)
        self.assertEqual(self.add("carol")[0], 0)
        self.assertEqual(UserDatabase(self.path).users(), ["alice", "bob", "carol"])

    def test_parallel_adds_all_kept(self) -> None:
        """Twenty runs of the tool that each add a user at the same time leave all twenty in the file."""
        names = [f"user{index}" for index in range(PARALLEL_RUNS)]
        runs: list[subprocess.Popen[bytes]] = []
        for name in names:
            run = subprocess.Popen(
                [sys.executable, "-m", "gateway.passwd", "--file", self.path, "add", name, "--stdin"],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            self.addCleanup(_stop, run)
            runs.append(run)
        # The passwords go out only once every run has started, so that the runs hash and then
        # write at about the same time, which is when edits without the lock overwrite each other.
        for run in runs:
            assert run.stdin is not None
            run.stdin.write(PASSWORD.encode() + b"\n")
            run.stdin.flush()
        for name, run in zip(names, runs):
            _, err = run.communicate(timeout=120)
            self.assertEqual(run.returncode, 0, f"{name}: {err.decode(errors='replace')}")
        self.assertEqual(UserDatabase(self.path).users(), sorted(names))
        self.assert_only_user_file()


def _stop(run: subprocess.Popen[bytes]) -> None:
    """Kill *run* if it is still going, and close its pipes."""
    if run.poll() is None:
        run.kill()
        run.wait()
    for pipe in (run.stdin, run.stdout, run.stderr):
        if pipe is not None:
            pipe.close()


class ListTests(PasswdTestCase):
    """mailgateway-passwd list."""

    def test_list(self) -> None:
        """list prints the user names sorted, one a line."""
        self.write(b"# users\ncarol:" + OTHER_HASH.encode() + b"\nalice:" + OTHER_HASH.encode() + b"\n")
        self.assertEqual(self.run_tool("list", "--file", self.path), (0, "alice\ncarol\n", ""))

    def test_list_broken_file(self) -> None:
        """list on a file that does not load fails with the load error."""
        self.write(b"# users\nalice:{PLAIN}x\n")
        code, out, err = self.run_tool("list", "--file", self.path)
        self.assertEqual((code, out), (1, ""))
        self.assertIn(f"{self.path}:2:", err)

    def test_list_missing_file(self) -> None:
        """list on a missing file fails naming it."""
        code, _, err = self.run_tool("list", "--file", self.path)
        self.assertEqual(code, 1)
        self.assertIn(self.path, err)


class CommandLineTests(PasswdTestCase):
    """The command line never carries a password."""

    def test_password_argument_refused(self) -> None:
        """A password given as an argument is refused, without echoing it, and nothing is written."""
        for argv in (
            ["add", "alice", PASSWORD],
            ["add", "alice", f"--password={PASSWORD}"],
            ["add", "alice", "-p", PASSWORD],
            ["change", "alice", PASSWORD],
        ):
            code, out, err = self.run_tool(*argv, "--file", self.path)
            self.assertEqual(code, 2, argv)
            self.assertIn("never taken on the command line", err)
        self.assertFalse(os.path.exists(self.path))

    def test_missing_command(self) -> None:
        """No command is a usage error with status 2."""
        code, _, err = self.run_tool("--file", self.path)
        self.assertEqual(code, 2)
        self.assertIn("usage", err)

    def test_help_as_module(self) -> None:
        """`python -m gateway.passwd --help` prints the usage and exits 0."""
        result = subprocess.run(
            [sys.executable, "-m", "gateway.passwd", "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("mailgateway-passwd", result.stdout)
        for command in ("add", "change", "remove", "list", "--stdin", "--scheme", "--file"):
            self.assertIn(command, result.stdout)
