"""
The twistd entry point: C{twistd mailgateway --config FILE}.

Kept small: options, then the settings are loaded and handed to L{gateway.service}. A bad
configuration ends start-up with a non-zero exit and one line on stderr.
"""

from __future__ import annotations

import signal

from twisted.application.service import IService
from twisted.python import usage

DEFAULT_CONFIG = "/etc/mailgateway/mailgateway.toml"


class Options(usage.Options):
    """Command line of C{twistd mailgateway}."""

    synopsis = "[--config FILE]"
    longdesc = ("A TLS front end for IMAP (and later POP3 and submission) that authenticates clients "
                "and relays them to a plaintext mail store. Everything else is in the configuration file.")
    optParameters = [["config", "c", DEFAULT_CONFIG, "The configuration file (TOML)."]]

    def postOptions(self) -> None:
        """Have the runner (twistd or twist) write its text log lines the gateway's faster way."""
        from gateway.text_log import use_for

        use_for(self.parent)


def makeService(options: Options) -> IService:
    """
    Load the configuration and build the service tree; exit with one line if it is wrong.

    SIGHUP is held (blocked) from here on, until the L{gateway.service.Reloader} takes it once
    the gateway runs; a reload asked for meanwhile happens then.
    """
    # SIGHUP's default action ends the process, with a status that systemd's Restart=on-failure
    # leaves alone, and certbot's deploy hook may ask for a reload right after a start. Blocked,
    # not ignored: the reload asked for must not be lost, as the files may have been read before.
    # First, before the imports below, which take most of the start-up.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    from twisted.internet import reactor  # twistd has installed the reactor by now

    from gateway.config import ConfigError, load_settings
    from gateway.event_loop import streamline
    from gateway.service import build_service

    streamline(reactor)
    try:
        return build_service(load_settings(options["config"]), reactor)
    except ConfigError as e:
        raise SystemExit(f"mailgateway: {e}") from None
