"""
The C{mailgateway} command: tools an operator runs beside the service.

C{mailgateway dns-records DOMAIN [--config FILE]} prints the DNS records to publish for a mail
domain (L{gateway.autoconfig.dns_records}), one zone-file line each. C{python -m gateway.cli}
is the same command.
"""

from __future__ import annotations

import argparse
import sys

from gateway import __version__
from gateway.autoconfig import dns_records
from gateway.config import ConfigError, load_settings
from gateway.tap import DEFAULT_CONFIG

PROG = "mailgateway"


def _build_parser() -> argparse.ArgumentParser:
    """Return the parser of the command line and its subcommands."""
    parser = argparse.ArgumentParser(prog=PROG, description="Tools for the mail access gateway.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    records = commands.add_parser(
        "dns-records",
        help="print the DNS records to publish for a mail domain",
        description="Print the SRV records (RFC 6186, RFC 8314) and the autoconfig and autodiscover "
                    "names that a mail domain should publish, derived from the configured listeners.",
    )
    records.add_argument("domain", metavar="DOMAIN", help="the mail domain, the part after @ (e.g. example.org)")
    records.add_argument("--config", "-c", metavar="FILE", default=DEFAULT_CONFIG,
                         help=f"the configuration file (default {DEFAULT_CONFIG})")
    return parser


def main(argv: list[str] | None = None) -> int:
    """
    Run the C{mailgateway} command.

    :param argv: the arguments after the program name; C{sys.argv[1:]} if C{None}.
    :returns: the exit status: 0 on success, 1 when the configuration or the domain is refused
        (with one line on standard error), 2 for a usage error.
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        # argparse has printed the help or the usage error.
        return e.code if isinstance(e.code, int) else 2
    try:
        lines = dns_records(load_settings(args.config), args.domain)
    except (ConfigError, ValueError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
