"""
How many IMAPS sessions in IDLE the gateway holds, and its memory per session, beyond what the
anchor harness's backend allows (its Dovecot stops at 7,000 mail processes).

    .venv/bin/python bench/idle_capacity.py --sessions 2000,5000,10000 --workers 2

Starts a private plaintext Dovecot (mail processes serving many clients each) and the gateway
in front of it, then for each N opens N sessions with the harness's load generator (LOGIN,
SELECT INBOX, IDLE), measures the proportional set size (PSS) summed over the gateway's
processes against its idle baseline, and counts the sessions still alive after a hold. Prints
one Markdown table. Needs root (Dovecot drops to its own users) and an fd limit above
N + a few hundred per worker: each session holds a client and a backend socket.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gateway.testing.dovecot import DovecotSandbox  # noqa: E402
from gateway.testing.gateway import GatewayProcess  # noqa: E402

LOADGEN = os.environ.get("ANCHOR_LOADGEN", os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                         "anchor-bench", "loadgen.py"))
USERS = 1000
PASSWORD = "benchpw"
# Mail processes that each serve many clients (one mail uid for all users makes that possible).
DOVECOT = """\
default_client_limit = 30000
default_vsz_limit = 1G
service imap {
  service_count = 0
  client_limit = 250
  process_limit = 200
}
service imap-login {
  client_limit = 12000
  process_limit = 8
}
service anvil {
  client_limit = 30000
}
service auth {
  client_limit = 30000
}
"""


def pss_kib(pids: list[int]) -> int:
    """PSS summed over C{pids}, in KiB."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            total += sum(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    return total


def measure(gateway: GatewayProcess, sessions: int, hold: float) -> dict[str, object]:
    """Open C{sessions} IDLE sessions, measure, release them; the row's figures."""
    assert gateway.pid is not None
    pids = [gateway.pid, *gateway.worker_pids().values()]
    baseline = pss_kib(pids)
    generator = subprocess.Popen(
        [sys.executable, LOADGEN, "imap-idle", "--port", str(gateway.port("imap", "implicit_tls")), "--tls", "implicit",
         "--users", f"1-{USERS}", "--password", PASSWORD, "--conns", str(sessions)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert generator.stdin is not None and generator.stdout is not None
    ready: dict[str, object] = {}
    for line in generator.stdout:
        if line.startswith("READY "):
            ready = json.loads(line[len("READY "):])
            break
    time.sleep(hold)
    loaded = pss_kib(pids)
    generator.stdin.write("\n")
    generator.stdin.flush()
    done = json.loads(generator.stdout.read().strip().splitlines()[-1])
    generator.wait()
    held = int(ready.get("ok", 0))  # type: ignore[call-overload]
    return {"sessions": sessions, "held": held, "alive": done.get("alive"), "errors": ready.get("errors"),
            "err_sample": ready.get("err_sample"), "kib_per_session": (loaded - baseline) / held if held else None,
            "baseline_mib": baseline / 1024, "setup_s": ready.get("setup_s"), "loadgen_cpu_s": ready.get("gen_cpu_s"),
            "processes": len(pids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", default="2000,5000,10000")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hold", type=float, default=5.0)
    options = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    directory = tempfile.mkdtemp(prefix="gw-idle-")
    os.chmod(directory, 0o755)
    users = {f"user{n}": PASSWORD for n in range(1, USERS + 1)}
    dovecot = DovecotSandbox(os.path.join(directory, "dovecot"), users, extra_config=DOVECOT)
    gateway = GatewayProcess(os.path.join(directory, "gateway"), imap_backend_port=dovecot.imap_port, users=None,
                             workers=options.workers,
                             settings="[limits]\nmax_connections = 30000\nmax_connections_per_ip = 30000\n"
                                      'trusted_networks = ["127.0.0.0/8"]\n')
    rows = []
    dovecot.start()
    try:
        gateway.start()
        try:
            for sessions in (int(n) for n in options.sessions.split(",")):
                rows.append(measure(gateway, sessions, options.hold))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        finally:
            gateway.stop()
    finally:
        dovecot.stop()
    print(f"IMAPS IDLE sessions through mailgateway ({options.workers} worker(s), fd limit {hard}), "
          f"PSS over {rows[0]['processes'] if rows else '?'} processes minus the idle baseline\n")
    print("| sessions | held | alive at end | errors | KiB/session (PSS) | setup s | loadgen CPU s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        per = row["kib_per_session"]
        print(f"| {row['sessions']} | {row['held']} | {row['alive']} | {row['errors']} | "
              f"{'-' if per is None else f'{per:.1f}'} | {row['setup_s']:.1f} | {row['loadgen_cpu_s']:.1f} |")


if __name__ == "__main__":
    main()
