#!/usr/bin/env bash
# Set up everything the tests need on a fresh Debian machine, then run them.
# Extra arguments go to pytest (e.g. scripts/test.sh -k phantom).
# Two test processes (pytest-xdist), each taking whole files, the longest first: many
# tests wait on child processes and timers, so two of them share two cores well, each with
# its share of the cores for PyTorch's threads (tests/conftest.py: two processes of two
# threads each on two cores ran a model 2.5 times slower). 19 min 41 s on the 2-core CI
# machine for 488 tests (2026-12-02; 25 minutes with a thread per core in each process).
# LUNGSYS_TEST_PROCESSES=0 runs them in this one process.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
exec .venv/bin/python -m pytest -n "${LUNGSYS_TEST_PROCESSES:-2}" --dist loadfile "$@"
