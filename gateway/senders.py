"""
Which envelope senders an authenticated user may use (anti-spoofing for submission).

A user may always send as its login name when that is an address. The optional senders file
adds more, one user per line::

    # user: addresses, or @domain for every address of a domain
    alice@example.org: a.smith@example.org, postmaster@example.org
    bob: bob@example.net, @lists.example.net

An @domain entry covers local parts without the routing characters "%" and "!" and without quotes.
Addresses and user names compare ignoring ASCII case only, and a quoted local part that needs no
quotes as the MTA reads it: "alice"@example.org is alice@example.org. The file is small and re-read when it changes (a stat per
check); a broken rewrite keeps the previous contents and logs a warning.
"""

from __future__ import annotations

import os
import re

from twisted.logger import Logger

log = Logger()


def ascii_lower(text: str) -> str:
    """
    Lower-case A-Z only: Unicode case folding would make U+212A KELVIN SIGN equal "k", letting a
    look-alike address pass as the user's own.
    """
    return text.translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

# RFC 5321's Dot-string, with RFC 6531's non-ASCII: what a local part may be without quotes.
_DOT_STRING = re.compile(r'[^\x00-\x20"(),.:;<>@\[\\\]\x7f]+(?:\.[^\x00-\x20"(),.:;<>@\[\\\]\x7f]+)*')
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)


def _plain(address: str) -> str:
    """
    C{address} with a quoted local part written plain where it needs no quotes (RFC 5321 4.1.2):
    Postfix, for one, reads the two forms as one address, so one may not pass where the other fails.
    """
    local, at, domain = address.rpartition("@")
    if len(local) < 2 or local[0] != '"' or local[-1] != '"':
        return address
    content = _QUOTED_PAIR.sub(r"\1", local[1:-1])
    return content + at + domain if _DOT_STRING.fullmatch(content) else address


class SendersFileError(Exception):
    """The senders file cannot be read or parsed; the message names the file and line."""


def parse_senders(data: bytes, path: str) -> dict[str, frozenset[str]]:
    """Parse a senders file into user -> allowed addresses and C{@domain} patterns (lower-case)."""
    senders: dict[str, frozenset[str]] = {}
    # Split on LF only: str.splitlines() also breaks at form feeds and U+2028, shifting line numbers.
    for number, raw in enumerate(data.split(b"\n"), 1):
        line = raw.decode("utf-8", "replace").strip()
        if not line or line.startswith("#"):
            continue
        user, colon, addresses = line.partition(":")
        allowed = [ascii_lower(_plain(a.strip())) for a in addresses.replace(",", " ").split()]
        if not colon or not user.strip() or not allowed or any("@" not in a for a in allowed):
            raise SendersFileError(f"{path}:{number}: expected 'user: address, @domain, ...'")
        if ascii_lower(user.strip()) in senders:
            raise SendersFileError(f"{path}:{number}: user listed twice")
        senders[ascii_lower(user.strip())] = frozenset(allowed)
    return senders


class SenderPolicy:
    """
    Decides whether a user may use an envelope sender.

    :param path: the senders file, or None for "the login name only".
    :raises SendersFileError: if the file is unusable at start.
    """

    def __init__(self, path: str | None) -> None:
        self._path = path
        self._signature: tuple[int, int, int] | None = None
        self._senders: dict[str, frozenset[str]] = {}
        if path is not None:
            self._signature, self._senders = self._load(path)

    def allowed(self, user: str, sender: str) -> bool:
        """True when C{user} may send as C{sender}; never for the null sender."""
        address = ascii_lower(_plain(sender))
        if address.count("@") != 1:
            return False
        if ascii_lower(_plain(user)) == address:
            return True
        self._refresh()
        allowed = self._senders.get(ascii_lower(user), frozenset())
        local, _, domain = address.rpartition("@")
        # An MTA may route "x%other.example@domain" (Postfix's allow_percent_hack), "x!y@domain" or
        # a quoted local part onwards to another domain: a domain's rule covers plain local parts only.
        return address in allowed or ("@" + domain in allowed and not any(c in local for c in '%!"'))

    def _refresh(self) -> None:
        if self._path is None:
            return
        try:
            status = os.stat(self._path)
        except OSError:
            return  # gone for a moment (an editor's rename): keep what we have
        if (status.st_ino, status.st_size, status.st_mtime_ns) == self._signature:
            return
        try:
            self._signature, self._senders = self._load(self._path)
        except SendersFileError as e:
            log.warn("senders_file_not_reloaded problem={problem}", problem=str(e))
            self._signature = (status.st_ino, status.st_size, status.st_mtime_ns)

    @staticmethod
    def _load(path: str) -> tuple[tuple[int, int, int], dict[str, frozenset[str]]]:
        try:
            with open(path, "rb") as f:
                status = os.fstat(f.fileno())
                data = f.read(1024 * 1024 + 1)
        except OSError as e:
            raise SendersFileError(f"{path}: cannot read: {e.strerror}") from None
        if len(data) > 1024 * 1024:
            raise SendersFileError(f"{path}: larger than 1 MiB")
        return (status.st_ino, status.st_size, status.st_mtime_ns), parse_senders(data, path)
