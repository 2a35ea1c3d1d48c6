#!/usr/bin/env bash
# Set up everything the tests need on a fresh Debian machine, then run them.
# Extra arguments go to pytest (e.g. scripts/test.sh -k phantom).
# Two test processes (pytest-xdist), each taking whole files: many tests wait on child
# processes and timers, so two of them share two cores well (17 minutes instead of 23 on
# the 2-core CI machine), each with its share of the cores for PyTorch's threads
# (tests/conftest.py: two of two threads each on two cores ran 2.5 times slower).
# LUNGSYS_TEST_PROCESSES=0 runs them in this one process.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
exec .venv/bin/python -m pytest -n "${LUNGSYS_TEST_PROCESSES:-2}" --dist loadfile "$@"
