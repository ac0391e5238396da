"""``mailgateway-passwd``: add, change, remove and list the users in the gateway's user file.

Run it as ``mailgateway-passwd`` or ``python -m gateway.passwd``. Passwords are never taken on
the command line, where other local users could read them: the tool prompts twice, or with
``--stdin`` reads one line from standard input.

Changes are written in Dovecot passwd-file form (``user:{ARGON2ID}$argon2id$...``) to a
temporary file in the same directory, which is synced and then renamed over the old file, so
the gateway, which re-reads the file when it changes, sees either the old or the new version.
Runs that change the same file take turns, so that none loses another's change.
The new file keeps the old file's owner, group and group-read bit, so the documented
root:mailgateway 0640 stays readable by the gateway; it never gets group-write or any bit for
others (a 0644 file becomes 0640). A file that ``add`` creates has mode 0600, belongs to
whoever runs the tool and must be made readable by the gateway's user.
Comments and other users' lines are kept byte for byte.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import getpass
import os
import sys
import tempfile
from collections.abc import Iterator

from gateway.userdb import (
    SCHEMES,
    UserDatabase,
    UserFileError,
    check_user_name,
    hash_password,
    parse_user_file,
)

PROG = "mailgateway-passwd"
DEFAULT_FILE = "/etc/mailgateway/users"
DEFAULT_SCHEME = "argon2id"
FILE_MODE = 0o600
# The only bit of the old file's mode that the new file keeps: the gateway reads the file as a
# member of its group.
KEPT_MODE = 0o040


class _Refusal(Exception):
    """The request cannot be carried out; the message is shown and never holds a password."""


def _add_options(parser: argparse.ArgumentParser, *, password: bool, defaults: bool) -> None:
    """Add the options to the main parser (with defaults) or to a subcommand (without, so that
    an option given before the subcommand is not overwritten by the subcommand's default)."""
    parser.add_argument(
        "--file",
        metavar="PATH",
        default=DEFAULT_FILE if defaults else argparse.SUPPRESS,
        help=f"the user file (default {DEFAULT_FILE})",
    )
    if password:
        parser.add_argument(
            "--stdin",
            action="store_true",
            default=False if defaults else argparse.SUPPRESS,
            help="read the password from one line of standard input instead of prompting",
        )
        parser.add_argument(
            "--scheme",
            choices=list(SCHEMES),
            default=DEFAULT_SCHEME if defaults else argparse.SUPPRESS,
            help=f"how to hash the new password (default {DEFAULT_SCHEME})",
        )


def _build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Manage the users of the mail gateway. Passwords are prompted for, or read "
        "from standard input with --stdin, never taken as arguments.",
    )
    _add_options(parser, password=True, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary in (
        ("add", "add a user, asking for the password"),
        ("change", "change a user's password"),
        ("remove", "remove a user"),
        ("list", "list the users"),
    ):
        command = commands.add_parser(name, help=summary, description=f"{summary.capitalize()}.")
        if name != "list":
            command.add_argument("user", metavar="USER", help="the user name as clients send it")
        _add_options(command, password=name in ("add", "change"), defaults=False)
    return parser


def _read_password(from_stdin: bool) -> bytes:
    """Return a new password from one line of stdin, or typed twice at the terminal."""
    if from_stdin:
        line = sys.stdin.buffer.readline()
        password = line.removesuffix(b"\n").removesuffix(b"\r")
    else:
        try:
            first = getpass.getpass("New password: ")
            second = getpass.getpass("Retype new password: ")
        except EOFError:
            raise _Refusal("no password given") from None
        if first != second:
            raise _Refusal("the passwords do not match")
        password = first.encode("utf-8")
    if not password:
        raise _Refusal("empty password refused")
    return password


def _new_hash(from_stdin: bool, scheme: str) -> str:
    """Read a new password and return its stored form."""
    password = _read_password(from_stdin)
    try:
        return hash_password(password, scheme)
    except ValueError:
        raise _Refusal(
            f"the {scheme} scheme cannot take this password (too long, or it contains a NUL byte)"
        ) from None


def _read(path: str) -> tuple[bytes, os.stat_result | None]:
    """Return the file's contents and status, or no contents and None if it does not exist."""
    try:
        with open(path, "rb") as file:
            return file.read(), os.fstat(file.fileno())
    except FileNotFoundError:
        return b"", None
    except OSError as e:
        raise _Refusal(f"cannot read {path}: {e.strerror}") from None


def _find(lines: list[bytes], user: str) -> list[int]:
    """Return the indexes of the lines that define *user*."""
    key = user.encode("utf-8")
    return [index for index, line in enumerate(lines) if line.partition(b":")[0] == key]


def _edit(command: str, data: bytes, exists: bool, path: str, user: str, stored: str) -> bytes:
    """Return the file's new contents, or refuse if the file does not allow *command*.

    :param stored: the new password field; ignored by ``remove``.
    """
    lines = data.split(b"\n")
    found = _find(lines, user) if exists else []
    if command == "add":
        if found:
            raise _Refusal(f"{path}: user {user} already exists")
        entry = f"{user}:{stored}\n".encode()
        return data + entry if not data or data.endswith(b"\n") else data + b"\n" + entry
    if not exists:
        raise _Refusal(f"{path} does not exist")
    if not found:
        raise _Refusal(f"{path}: no user {user}")
    if len(found) > 1:
        numbers = ", ".join(str(index + 1) for index in found)
        raise _Refusal(f"{path}: user {user} is on lines {numbers}; fix the file by hand")
    index = found[0]
    if command == "remove":
        del lines[index]
    else:
        line = lines[index]
        ending = b"\r" if line.endswith(b"\r") else b""
        _, colon, extra = line.removesuffix(ending).partition(b":")[2].partition(b":")
        lines[index] = f"{user}:{stored}".encode() + colon + extra + ending
    return b"\n".join(lines)


def _fsync_directory(directory: str) -> None:
    """Make a rename in *directory* durable."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def _edit_lock(path: str) -> Iterator[None]:
    """Hold, while the block runs, the lock that runs of this tool take to change *path*.

    It waits for as long as another run holds the lock.
    """
    # The lock is on the directory that holds the file (through a symlink, its target's), not
    # on the file: the rename replaces the file, so a run that waited on the old one would
    # get a lock that the next run does not ask for. The directory stays the same object for
    # as long as the file is in it. A side file "users.lock" would work too, but it must never
    # be deleted (a run that created a new one while another held the old one would race
    # again), and a tidy-up or a configuration manager that purges unknown files in
    # /etc/mailgateway would delete it; the directory leaves nothing behind. The lock is
    # advisory: it orders runs of this tool, not other editors. flock on a directory fails on
    # NFS, and the tool then refuses to edit rather than edit without the lock.
    directory = os.path.dirname(os.path.realpath(path))
    try:
        descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise _Refusal(f"cannot write {path}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError as e:
            raise _Refusal(f"cannot lock {directory} to change {path}: {e.strerror}") from None
        yield
    finally:
        # Closing the descriptor releases the lock.
        os.close(descriptor)


def _write(path: str, data: bytes, old: os.stat_result | None) -> None:
    """Replace the file (through a symlink, if it is one) with *data*, atomically.

    :param old: the status of the file being replaced, whose owner, group and group-read bit
        the new one keeps; None for a new file, which gets mode 0600.
    """
    mode = FILE_MODE | (old.st_mode & KEPT_MODE) if old is not None else FILE_MODE
    target = os.path.realpath(path)
    directory = os.path.dirname(target)
    try:
        descriptor, temporary = tempfile.mkstemp(
            dir=directory, prefix=f".{os.path.basename(target)}.", suffix=".tmp"
        )
    except OSError as e:
        raise _Refusal(f"cannot write {path}: {e.strerror}") from None
    try:
        with open(descriptor, "wb") as file:
            # mkstemp made the file 0600 (or less, by the umask). The owner and group change
            # first and the mode second, so that the group bit never opens the file to the
            # creator's group; both happen while the file is still empty, because a descriptor
            # opened while the file was readable would go on reading it.
            created = os.fstat(descriptor)
            if old is not None and (old.st_uid, old.st_gid) != (created.st_uid, created.st_gid):
                os.fchown(descriptor, old.st_uid, old.st_gid)
            os.fchmod(descriptor, mode)
            file.write(data)
            file.flush()
            os.fsync(descriptor)
        os.replace(temporary, target)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(e, OSError):
            raise _Refusal(f"cannot write {path}: {e.strerror}") from None
        raise
    try:
        _fsync_directory(directory)
    except OSError as e:
        raise _Refusal(f"{path} is replaced, but may not survive a crash: {e.strerror}") from None


def _change_file(args: argparse.Namespace) -> str:
    """Carry out add, change or remove; return what was done."""
    try:
        check_user_name(args.user)
    except ValueError as e:
        raise _Refusal(str(e)) from None
    path: str = args.file
    # Check before asking for a password, so a typo in the name is reported at once.
    data, old = _read(path)
    _edit(args.command, data, old is not None, path, args.user, "")
    stored = "" if args.command == "remove" else _new_hash(args.stdin, args.scheme)
    # The lock is not held while the password is typed and hashed, which can take long. Read
    # again under it: the file may have changed meanwhile, or while another run held the lock.
    with _edit_lock(path):
        data, old = _read(path)
        new = _edit(args.command, data, old is not None, path, args.user, stored)
        _write(path, new, old)
    try:
        parse_user_file(new, path)
    except UserFileError as e:
        print(f"{PROG}: warning: {e}; the gateway keeps its previous users", file=sys.stderr)
    done = {
        "add": f"added user {args.user} to {path}",
        "change": f"changed the password of user {args.user} in {path}",
        "remove": f"removed user {args.user} from {path}",
    }
    return done[args.command]


def _list(args: argparse.Namespace) -> None:
    """Print the user names, one a line."""
    try:
        users = UserDatabase(args.file).users()
    except UserFileError as e:
        raise _Refusal(str(e)) from None
    for user in users:
        print(user)


def main(argv: list[str] | None = None) -> int:
    """Run ``mailgateway-passwd``.

    :param argv: the arguments after the program name; ``sys.argv[1:]`` if None.
    :returns: the exit status: 0 on success, 1 if the request was refused or failed, 2 for a
        usage error (including any extra argument, which is taken to be a password and is not
        echoed), 130 if interrupted.
    """
    parser = _build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as e:
        # argparse has printed the help or the usage error.
        return e.code if isinstance(e.code, int) else 2
    if extra:
        parser.print_usage(sys.stderr)
        print(
            f"{PROG}: unexpected arguments (not shown); passwords are never taken on the command "
            "line: type it when prompted, or use --stdin",
            file=sys.stderr,
        )
        return 2
    try:
        if args.command == "list":
            _list(args)
        else:
            print(_change_file(args))
    except _Refusal as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
