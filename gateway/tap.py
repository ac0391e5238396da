"""
The twistd entry point: C{twistd mailgateway --config FILE}, and C{--check} to check a configuration.

Kept small: options, then the settings are loaded and handed to L{gateway.service}. A bad
configuration ends start-up with one line on stderr and the exit status C{EX_CONFIG} (78), which
the systemd unit's C{RestartPreventExitStatus=} does not restart.
"""

from __future__ import annotations

import os
import signal
import sys

from twisted.application.service import IService
from twisted.python import usage

DEFAULT_CONFIG = "/etc/mailgateway/mailgateway.toml"

EX_CONFIG = os.EX_CONFIG
"""The exit status of a configuration error (sysexits.h), at start and from C{--check}: 78."""


class Options(usage.Options):
    """Command line of C{twistd mailgateway}."""

    synopsis = "[--config FILE] [--check]"
    longdesc = ("A TLS front end for IMAP, POP3 and submission that authenticates clients and relays them to "
                "a plaintext mail store, with a web side (client autoconfiguration, a proxy to webmail). "
                "Everything else is in the configuration file.")
    optParameters = [["config", "c", DEFAULT_CONFIG, "The configuration file (TOML)."]]
    optFlags = [["check", None, "Check the configuration and every file it names as a start would, without "
                                "listening; print one line and exit: 0 if a start would succeed (warnings, "
                                "such as an expired certificate, on stderr), 78 if not."]]

    def postOptions(self) -> None:
        """
        With C{--check}, check and exit here: before twistd's runner looks for or writes a pid
        file, so the check needs no C{--pidfile=} and works beside a running gateway.
        Otherwise have the runner (twistd or twist) write its text log lines the gateway's faster way.
        """
        if self["check"]:
            raise SystemExit(check(self["config"]))
        from gateway.text_log import use_for

        use_for(self.parent)


def check(path: str, reactor: object = None) -> int:
    """
    Load the configuration at C{path} and everything it names, as a start would
    (L{gateway.service.check_service}), and say what a start would: C{configuration ok: PATH}
    on stdout, and each warning on stderr; or else the one-line error on stderr.

    An expired certificate is a warning, not a failure: a start serves it (see
    L{gateway.tls.warn_of_validity}), and the unit runs this check before each reload.

    :param reactor: what the unstarted service tree is given; the global reactor if None.
    :returns: the exit status: 0, or L{EX_CONFIG}.
    """
    from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
    from zope.interface import provider

    from gateway.config import ConfigError, load_settings
    from gateway.service import check_service

    if reactor is None:
        from twisted.internet import reactor as installed  # twistd's, or the default, as a start would

        reactor = installed

    @provider(ILogObserver)
    def report(event: dict[str, object]) -> None:
        if event.get("log_level") in (LogLevel.warn, LogLevel.error, LogLevel.critical):
            print(f"mailgateway: warning: {formatEvent(event)}", file=sys.stderr, flush=True)

    globalLogPublisher.addObserver(report)  # logging has not begun: these would stay in its buffer
    try:
        check_service(load_settings(path), reactor)
    except ConfigError as e:
        return _refused(e)
    finally:
        globalLogPublisher.removeObserver(report)
    print(f"configuration ok: {path}", flush=True)
    return 0


def makeService(options: Options) -> IService:
    """
    Load the configuration and build the service tree; exit with one line and L{EX_CONFIG} if it is wrong.

    SIGHUP is held (blocked) from here on, until the L{gateway.service.Reloader} takes it once
    the gateway runs; a reload asked for meanwhile happens then.
    """
    # SIGHUP's default action ends the process, with a status that systemd's Restart=on-failure
    # leaves alone, and certbot's deploy hook may ask for a reload right after a start. Blocked,
    # not ignored: the reload asked for must not be lost, as the files may have been read before.
    # First, before the imports below, which take most of the start-up.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    from twisted.internet import reactor  # twistd has installed the reactor by now
    from twisted.logger import Logger

    from gateway import __version__
    from gateway.config import ConfigError, load_settings
    from gateway.event_loop import streamline
    from gateway.service import build_service
    from gateway.shutdown import sigterm_once

    streamline(reactor)
    try:
        service = build_service(load_settings(options["config"]), reactor)
    except ConfigError as e:
        # twistd and twist let a SystemExit from here end the process with its status; a message
        # as the SystemExit's code would exit with 1, which systemd would restart every 5 s.
        raise SystemExit(_refused(e)) from None
    Logger().info("starting version={version} config={path}", version=__version__, path=options["config"])
    reactor.callWhenRunning(sigterm_once, reactor)
    return service


def _refused(error: Exception) -> int:
    """Say on stderr, in one line, why the configuration cannot be used; the exit status for it."""
    print(f"mailgateway: {error}", file=sys.stderr, flush=True)
    return EX_CONFIG
