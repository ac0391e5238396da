"""
Print the software the gateway's column of a benchmark ran on, as one line for the results.

The harness names the anchors' software (Dovecot, nginx, stunnel, the system's OpenSSL); the
gateway brings its own OpenSSL in the ``cryptography`` wheel, which is what its TLS costs depend
on, and the commit says which code was measured. Run with the virtualenv's Python.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

from OpenSSL import SSL

_PROJECT = Path(__file__).resolve().parent.parent


def _commit() -> str:
    """The checked-out commit, marked when the gateway's code differs from it."""
    try:
        commit = subprocess.run(["git", "-C", str(_PROJECT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(_PROJECT), "status", "--porcelain", "--", "gateway"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "an unknown commit"
    return f"{commit} with uncommitted changes" if changed else commit


def stack_line() -> str:
    """The line: the commit, then the versions of the libraries the gateway's speed depends on."""
    version = importlib.metadata.version
    openssl = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    return (f"gateway: mailgateway at {_commit()}; Twisted {version('twisted')}, pyOpenSSL {version('pyOpenSSL')}, "
            f"cryptography {version('cryptography')} with {openssl}; Python {platform.python_version()}")


if __name__ == "__main__":
    print(stack_line())
