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

With ``--fetch K``, every user's INBOX holds K messages of 5 KB and every session fetches them
before it goes IDLE, as a mail client syncs before it waits: the figure then includes whatever a
burst of traffic leaves behind in an idle session. This script's own asyncio client opens those
sessions (the harness's generator only logs in and idles).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import ssl
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
# A 5 KB message, like those the harness seeds its mailbox with (CRLF, as Dovecot serves it).
MESSAGE = b"From: bench@example.com\r\nTo: user@example.com\r\nSubject: sync\r\n\r\n" + (b"x" * 78 + b"\r\n") * 63
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


def measure(gateway: GatewayProcess, sessions: int, hold: float, fetch: int) -> dict[str, object]:
    """Open C{sessions} IDLE sessions (after fetching C{fetch} messages each), measure, release them; the row's figures."""
    assert gateway.pid is not None
    pids = [gateway.pid, *gateway.worker_pids().values()]
    baseline = pss_kib(pids)
    port = gateway.port("imap", "implicit_tls")
    if fetch:
        counts, loaded = asyncio.run(synced_sessions(port, sessions, fetch, hold, pids))
    else:
        counts, loaded = idle_sessions(port, sessions, hold, pids)
    held = int(counts.get("ok", 0))  # type: ignore[call-overload]
    return {"sessions": sessions, "held": held, "alive": counts.get("alive"), "errors": counts.get("errors"),
            "err_sample": counts.get("err_sample"), "kib_per_session": (loaded - baseline) / held if held else None,
            "baseline_mib": baseline / 1024, "setup_s": counts.get("setup_s"), "loadgen_cpu_s": counts.get("gen_cpu_s"),
            "processes": len(pids)}


def idle_sessions(port: int, sessions: int, hold: float, pids: list[int]) -> tuple[dict[str, object], int]:
    """The harness's generator opens the sessions; its counts, and the PSS while they are held."""
    generator = subprocess.Popen(
        [sys.executable, LOADGEN, "imap-idle", "--port", str(port), "--tls", "implicit",
         "--users", f"1-{USERS}", "--password", PASSWORD, "--conns", str(sessions)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert generator.stdin is not None and generator.stdout is not None
    counts: dict[str, object] = {}
    for line in generator.stdout:
        if line.startswith("READY "):
            counts = json.loads(line[len("READY "):])
            break
    time.sleep(hold)
    loaded = pss_kib(pids)
    generator.stdin.write("\n")
    generator.stdin.flush()
    counts["alive"] = json.loads(generator.stdout.read().strip().splitlines()[-1]).get("alive")
    generator.wait()
    return counts, loaded


async def synced_sessions(port: int, sessions: int, fetch: int, hold: float,
                          pids: list[int]) -> tuple[dict[str, object], int]:
    """Open sessions that fetch C{fetch} messages, then IDLE; the counts, and the PSS while they are held."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the bench's self-signed certificate
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    failures: list[str] = []
    at_once = asyncio.Semaphore(32)

    async def open_one(number: int) -> None:
        async with at_once:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, limit=2**20)
                await reader.readline()
                await command(reader, writer, b"a", f"LOGIN user{1 + number % USERS} {PASSWORD}".encode())
                await command(reader, writer, b"b", b"SELECT INBOX")
                await command(reader, writer, b"c", f"FETCH 1:{fetch} BODY.PEEK[]".encode())
                writer.write(b"d IDLE\r\n")
                if not (await reader.readline()).startswith(b"+"):
                    raise ConnectionError("IDLE refused")
                opened.append((reader, writer))
            except (OSError, ConnectionError, asyncio.IncompleteReadError) as error:
                failures.append(repr(error))

    async def still_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"DONE\r\n")
        try:
            await asyncio.wait_for(tagged_reply(reader, b"d", b"IDLE"), 10)
            return True
        except (OSError, ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            return False
        finally:
            writer.close()

    cpu, start = time.process_time(), time.monotonic()
    await asyncio.gather(*(open_one(number) for number in range(sessions)))
    counts: dict[str, object] = {"ok": len(opened), "errors": len(failures), "err_sample": failures[:1],
                                 "setup_s": time.monotonic() - start, "gen_cpu_s": time.process_time() - cpu}
    await asyncio.sleep(hold)
    loaded = pss_kib(pids)
    counts["alive"] = sum(await asyncio.gather(*(still_alive(*session) for session in opened)))
    return counts, loaded


async def command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tag: bytes, line: bytes) -> None:
    """Send one IMAP command and read through its tagged OK."""
    writer.write(tag + b" " + line + b"\r\n")
    await tagged_reply(reader, tag, line)


async def tagged_reply(reader: asyncio.StreamReader, tag: bytes, line: bytes) -> None:
    """Read through the tagged OK of the command C{line} (untagged replies and literals included)."""
    while True:
        reply = await reader.readline()
        if not reply:
            raise ConnectionError(f"closed during {line.split()[0].decode()}")
        literal = re.search(rb"\{(\d+)\}\r\n$", reply)
        if literal:
            await reader.readexactly(int(literal.group(1)))
        elif reply.startswith(tag + b" "):
            if not reply.startswith(tag + b" OK"):
                raise ConnectionError(reply.decode(errors="replace").strip())
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", default="2000,5000,10000")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hold", type=float, default=5.0)
    parser.add_argument("--fetch", type=int, default=0, help="messages each session fetches before IDLE")
    options = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    directory = tempfile.mkdtemp(prefix="gw-idle-")
    os.chmod(directory, 0o755)
    users = {f"user{n}": PASSWORD for n in range(1, USERS + 1)}
    dovecot = DovecotSandbox(os.path.join(directory, "dovecot"), users, extra_config=DOVECOT)
    for user in users if options.fetch else ():
        for _ in range(options.fetch):
            dovecot.deliver(user, MESSAGE)
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
                rows.append(measure(gateway, sessions, options.hold, options.fetch))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        finally:
            gateway.stop()
    finally:
        dovecot.stop()
    synced = f", each after fetching {options.fetch} messages of 5 KB" if options.fetch else ""
    print(f"IMAPS IDLE sessions through mailgateway ({options.workers} worker(s), fd limit {hard}){synced}, "
          f"PSS over {rows[0]['processes'] if rows else '?'} processes minus the idle baseline\n")
    print("| sessions | held | alive at end | errors | KiB/session (PSS) | setup s | loadgen CPU s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        per = row["kib_per_session"]
        print(f"| {row['sessions']} | {row['held']} | {row['alive']} | {row['errors']} | "
              f"{'-' if per is None else f'{per:.1f}'} | {row['setup_s']:.1f} | {row['loadgen_cpu_s']:.1f} |")


if __name__ == "__main__":
    main()
