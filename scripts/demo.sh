#!/usr/bin/env bash
# Sets up everything (Debian packages, .venv) and runs the gateway in the foreground with a
# self-signed certificate, in front of a throwaway plaintext Dovecot with a demo user.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec .venv/bin/python -m gateway.demo "$@"
