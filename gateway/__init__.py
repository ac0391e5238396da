"""mailgateway: a TLS front end for IMAP, POP3 and submission in front of a plaintext mail store."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mailgateway")
except PackageNotFoundError:  # a source tree run without an install
    __version__ = "unknown"
