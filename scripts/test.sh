#!/usr/bin/env bash
# Set up everything the tests need on a fresh Debian machine, then run them.
# Extra arguments go to pytest (e.g. scripts/test.sh -k phantom).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
exec .venv/bin/python -m pytest "$@"
