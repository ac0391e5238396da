"""
C{python -m gateway.demo}: try the gateway in a minute.

Starts a throwaway plaintext Dovecot on loopback with one demo user and a welcome message, then
the gateway in front of it with a self-signed certificate, prints how to log in, and shows the
gateway's log until Ctrl-C, which stops both. Everything lives in one temporary directory.
Production use is the configuration file and the systemd unit, not this.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time

from gateway.testing.dovecot import DovecotSandbox
from gateway.testing.gateway import GatewayProcess

WELCOME = (b"From: mailgateway <postmaster@localhost>\r\nTo: demo@localhost\r\nSubject: Welcome\r\n\r\n"
           b"This message reached you through the gateway, over TLS.\r\n")


def main(argv: list[str] | None = None) -> int:
    """Run the demo until interrupted; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m gateway.demo", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory afterwards")
    args = parser.parse_args(argv)

    directory = tempfile.mkdtemp(prefix="mailgateway-demo-")
    os.chmod(directory, 0o755)  # Dovecot's unprivileged processes must reach their files
    password = secrets.token_urlsafe(9)
    dovecot = DovecotSandbox(os.path.join(directory, "dovecot"), {"demo": password})
    gateway: GatewayProcess | None = None
    stop = False

    def interrupted(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        dovecot.start()
        dovecot.deliver("demo", WELCOME)
        gateway = GatewayProcess(os.path.join(directory, "gateway"), imap_backend_port=dovecot.imap_port,
                                 users={"demo": password})
        gateway.start()
        certificate = os.path.join(gateway.directory, "state", "selfsigned-localhost.crt")
        imaps, starttls = gateway.port("imap", "implicit_tls"), gateway.port("imap", "starttls")
        print(f"""
mailgateway demo is running (directory {directory}).

  IMAPS (implicit TLS):  localhost:{imaps}
  IMAP with STARTTLS:    localhost:{starttls}
  user: demo   password: {password}
  backend: plaintext Dovecot on 127.0.0.1:{dovecot.imap_port} (never exposed to clients)

Try:
  curl --cacert {certificate} 'imaps://localhost:{imaps}/INBOX;UID=1' -u 'demo:{password}'
  curl --ssl-reqd --cacert {certificate} 'imap://localhost:{starttls}/INBOX;UID=1' -u 'demo:{password}'
  openssl s_client -quiet -connect localhost:{imaps} -CAfile {certificate}

The gateway's log follows. Ctrl-C stops the gateway and Dovecot.
""", flush=True)
        shown = 0
        while not stop:
            log = gateway.log()
            sys.stdout.write(log[shown:])
            sys.stdout.flush()
            shown = len(log)
            if not gateway.running:
                print("the gateway has exited.")
                break
            time.sleep(0.3)
    finally:
        if gateway is not None:
            gateway.stop()
        dovecot.stop()
        if args.keep:
            print(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    print("stopped.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
