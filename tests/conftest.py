"""Shared fixtures: phantom studies written once per session, DICOM tools."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _share_the_cores() -> None:
    """Under pytest-xdist each test process (and every process it starts: the node, its
    workers, the command line) takes its share of the cores for PyTorch, not all of them:
    two processes of two threads each on two cores ran a model 2.5 times slower than two
    of one thread. An OMP_NUM_THREADS already set is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // workers))
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


_share_the_cores()

import pytest  # noqa: E402

from training.phantom import WrittenStudy, generate_study  # noqa: E402

from hostile import with_uids  # noqa: F401,E402 (the tests take it from here)
from stow_client import stow_node  # noqa: F401,E402


#: The test files that take longest, longest first (seconds of test time each, measured on
#: the 2-core machine with `--durations=0`, 2026-12-02): collected first, so that under
#: ``--dist loadfile`` the two processes take them early and end together, rather than
#: one running a long file alone at the end. The other files follow in their usual order.
SLOWEST_FILES = ("test_training.py", "test_node_e2e.py", "test_remote_workers.py",
                 "test_console.py", "test_supervisor.py", "test_cli.py", "test_viewer.py",
                 "test_shipped_model.py", "test_result_objects.py", "test_ladnn.py",
                 "test_http_auth.py", "test_dualsampling.py", "test_engine.py",
                 "test_own_studies.py", "test_wado_workers.py")


def pytest_collection_modifyitems(items) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))     # (stable)


@pytest.fixture(scope="session")
def study_factory(tmp_path_factory):
    """Write (and cache) a phantom study: factory(label, seed, slices, **kw)."""
    cache: dict[tuple, WrittenStudy] = {}

    def make(label: str = "covid", seed: int = 1, slices: int = 24, **kw) -> WrittenStudy:
        key = (label, seed, slices, tuple(sorted(kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{label}-{seed}-{slices}")
            cache[key] = generate_study(out, label, seed, slices, **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def covid_study(study_factory) -> WrittenStudy:
    return study_factory("covid", 1, 24)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """A phantom dataset of 5 patients a class, 5-6 slices each: what training tests train on
    (its preprocessed slices cached beside it, once per input size)."""
    from training.phantom_set import generate_phantom_set

    out = tmp_path_factory.mktemp("tiny")
    generate_phantom_set(out, per_class=5, seed=4, slices_range=(5, 6), workers=2)
    return out


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL server for the session (``.new_database()`` gives a URL)."""
    from postgres import Postgres

    server = Postgres().start()
    yield server
    server.stop()


@pytest.fixture
def start_node(tmp_path):
    """start_node(tls=context or None, **Receiver's options) -> (receiver, store): a DICOM
    receiver on loopback with a job store of its own, stopped after the test."""
    from pacs_node.receiver import Receiver
    from store.api import JobStore

    started = []

    def start(tls=None, **kw):
        folder = tmp_path / f"node{len(started)}"
        store = JobStore(f"sqlite:///{tmp_path}/lungsys{len(started)}.db")
        kw.setdefault("min_free_disk_mb", 1)
        receiver = Receiver(store, folder / "data", tls=tls, **kw)
        receiver.start("127.0.0.1", 0)
        started.append(receiver)
        return receiver, store

    yield start
    for receiver in started:
        receiver.stop()


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; run scripts/setup.sh (it installs the Debian "
                    f"DICOM tools)")
    return path


def dciodvfy_errors(path: Path) -> list[str]:
    """The Error lines dciodvfy prints for a file (it writes to stderr)."""
    tool = require_tool("dciodvfy")
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def wait_for(condition, timeout: float = 5.0) -> bool:
    """Whether ``condition()`` comes true within ``timeout`` seconds, asked every 20 ms
    (a server's reaction to a hostile peer, which must come quickly or not at all)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def eventually(predicate, timeout: float = 180.0, every: float = 0.5):
    """The first true value of ``predicate()``, asked every ``every`` seconds; AssertionError
    after ``timeout`` seconds (what a user waits for: a job done, a delivery made)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not so after {timeout:.0f} s")


# The TLS peers' fixtures (pki, ct_files), for test_tls.py and test_user_identity.py:
# imported last, since tls_peer takes require_tool from here.
from tls_peer import ct_files, pki  # noqa: F401,E402
