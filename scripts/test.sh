#!/usr/bin/env bash
# Sets up everything (Debian packages, .venv) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh ".[test]"
exec .venv/bin/python -m pytest -p no:cacheprovider -q tests "$@"
