#!/usr/bin/env bash
# The gateway's benchmark, side by side with the anchors (Dovecot terminating TLS, Dovecot's login
# proxy, nginx's mail proxy, stunnel) in one run on this machine. It drives the workplace's anchor
# harness (../shared/anchor-bench, or $ANCHOR_BENCH) with the gateway as one more column:
#
#   bench/run.sh                     # full run, about 25 minutes
#   BENCH_QUICK=1 bench/run.sh       # smoke run, a few minutes
#   GATEWAY_WORKERS=2 bench/run.sh   # the gateway with [gateway] workers = 2 (default 1)
#
# bench/idle_capacity.py measures 10,000 IDLE sessions, which the harness's backend cannot hold.
#
# The table goes to stdout and bench/results/, with the gateway's own software (bench/stack_versions.py)
# under the anchors'; copy the one worth keeping to bench/RESULTS.md.
# Not part of the test command. Needs root (Dovecot drops to its own users).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
harness=${ANCHOR_BENCH:-$(cd .. && pwd)/shared/anchor-bench}
[ -x "$harness/run-anchors.sh" ] || { echo "bench: no anchor harness at $harness (set ANCHOR_BENCH)" >&2; exit 2; }
missing=()
for package in nginx libnginx-mod-mail stunnel4; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  # The harness runs private instances; do not leave the packages' system services running.
  if [ -d /run/systemd/system ]; then
    systemctl disable --now nginx.service stunnel4.service >/dev/null 2>&1 || true
  fi
fi
export GATEWAY_IMAPS=127.0.0.1:26993 GATEWAY_IMAP_STARTTLS=127.0.0.1:26143
export GATEWAY_POP3S=127.0.0.1:26995 GATEWAY_POP3_STLS=127.0.0.1:26110
export GATEWAY_SMTPS=127.0.0.1:26465 GATEWAY_SUBMISSION=127.0.0.1:26587
export GATEWAY_NAME=mailgateway
export GATEWAY_CMD="$PWD/.venv/bin/python $PWD/bench/gateway_for_bench.py"
export BENCH_RESULTS_DIR="$PWD/bench/results"
mkdir -p "$BENCH_RESULTS_DIR"
started=$(mktemp)
trap 'rm -f "$started"' EXIT
bash "$harness/run-anchors.sh"
# The harness names the anchors' software; the gateway's own stack goes on the line after it.
table=$(find "$BENCH_RESULTS_DIR" -maxdepth 1 -name '*.md' -newer "$started" | sort | tail -n 1)
if [ -n "$table" ]; then
  stack=$(.venv/bin/python bench/stack_versions.py)
  sed -i "/^software: /a\\$stack" "$table"
  echo "$stack"
fi
