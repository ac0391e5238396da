"""
Starts the gateway as the anchor harness's "gateway" column (run by bench/run.sh, never alone):
writes a configuration in front of the harness's private backend and runs twistd in the
foreground. Users are the harness's user1..userN; the backend checks their passwords (auth mode
"backend"), so that 5000 argon2 hashes need not be made first.
"""

from __future__ import annotations

import os
import sys

STATE = os.environ["BENCH_STATE"]
CERTS = os.environ["BENCH_CERT_DIR"]
USERS = int(os.environ.get("BENCH_USERS", "5000"))
WORKERS = os.environ.get("GATEWAY_WORKERS", "1")  # a count, or "auto" (one per CPU); 1 as the configuration
PORTS = {name: os.environ[f"GATEWAY_{name}"].rsplit(":", 1)[1]
         for name in ("IMAPS", "IMAP_STARTTLS", "POP3S", "POP3_STLS", "SMTPS", "SUBMISSION")}


def main() -> None:
    senders = os.path.join(STATE, "gateway-senders")
    with open(senders, "w") as f:
        f.writelines(f"user{n}: @bench.test\n" for n in range(1, USERS + 1))
    config = os.path.join(STATE, "gateway.toml")
    with open(config, "w") as f:
        f.write(f"""\
[gateway]
hostname = "localhost"
state_dir = "{STATE}/gateway-state"
workers = {WORKERS if WORKERS.isdigit() else '"auto"'}

[tls]
certificate = "{CERTS}/ecdsa.crt"
private_key = "{CERTS}/ecdsa.key"

[auth]
mode = "backend"

[limits]
# Every load-generator connection comes from 127.0.0.1.
max_connections = 30000
max_connections_per_ip = 30000
trusted_networks = ["127.0.0.0/8"]

[imap]
implicit_tls = ["tcp:{PORTS['IMAPS']}:interface=127.0.0.1"]
starttls = ["tcp:{PORTS['IMAP_STARTTLS']}:interface=127.0.0.1"]
[imap.backend]
port = 11143

[pop3]
implicit_tls = ["tcp:{PORTS['POP3S']}:interface=127.0.0.1"]
starttls = ["tcp:{PORTS['POP3_STLS']}:interface=127.0.0.1"]
[pop3.backend]
port = 11110

[submission]
implicit_tls = ["tcp:{PORTS['SMTPS']}:interface=127.0.0.1"]
starttls = ["tcp:{PORTS['SUBMISSION']}:interface=127.0.0.1"]
senders_file = "{senders}"
[submission.backend]
port = 11587
""")
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    os.execv(twistd, [twistd, "--nodaemon", "--pidfile=", "mailgateway", "--config", config])


if __name__ == "__main__":
    main()
