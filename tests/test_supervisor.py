"""`lungsys serve` and its worker, however they are signalled or killed: a dead worker is
seen, its job counted and run again, the worker restarted; the node always stops; one node
per data folder."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from pacs_node.worker_process import NICENESS
from store.api import JobStore

from conftest import eventually, require_tool
from orthanc import free_port

EXE = str(Path(sys.executable).with_name("lungsys"))


wait_for = functools.partial(eventually, timeout=120.0, every=0.2)


class Served:
    """One `lungsys serve` in its own process group, with its log in a file."""

    def __init__(self, tmp_path: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.toml = tmp_path / "node.toml"
        self.toml.write_text(
            f'[node]\nhost = "127.0.0.1"\nport = {self.port}\ndata_dir = "{tmp_path / "var"}"\n'
            f'min_free_disk_mb = 1\n[dicomweb]\nport = 0\n'
            f'[store]\nurl = "sqlite:///{tmp_path / "var" / "db"}"\n'
            f'[assembly]\nstable_seconds = 2\n[model]\ndevice = "cpu"\nmirror = false\n')
        self.log = tmp_path / f"serve-{time.monotonic_ns()}.log"
        self.store = JobStore(f"sqlite:///{tmp_path / 'var' / 'db'}")
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "Served":
        self.proc = subprocess.Popen([EXE, "-v", "serve", "--config", str(self.toml)],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "w"),
                                     start_new_session=True)
        if wait:
            wait_for(self.answers, timeout=90)
        return self

    def answers(self) -> bool:
        return subprocess.run([EXE, "echo", "127.0.0.1", str(self.port), "--aet", "LUNGSYS"],
                              capture_output=True).returncode == 0

    def worker(self) -> int | None:
        """The model's process: the child at the worker's lower priority."""
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                try:
                    fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[16]) == os.getpriority(os.PRIO_PROCESS, 0) + NICENESS \
                        and fields[0] != "Z":
                    return int(child)
        return None

    def send(self, files) -> None:
        proc = subprocess.run([require_tool("storescu"), "-aet", "CT1", "-aec", "LUNGSYS",
                               "127.0.0.1", str(self.port), *map(str, files)],
                              capture_output=True, text=True,
                              env={**os.environ, "TCP_NODELAY": "1"}, timeout=120)
        assert proc.returncode == 0, proc.stderr

    def stopped_within(self, seconds: float) -> int:
        return self.proc.wait(timeout=seconds)

    def text(self) -> str:
        return self.log.read_text()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture
def served(tmp_path):
    node = Served(tmp_path)
    yield node
    node.kill()


def _copy_series(study, folder: Path) -> list[Path]:
    """The study's files as a new series (new Series and SOP Instance UIDs)."""
    folder.mkdir(parents=True)
    series = pydicom.uid.generate_uid()
    out = []
    for f in study.files:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(folder / f.name)
        out.append(folder / f.name)
    return out


def _running_job(store: JobStore):
    jobs = store.jobs("running")
    return jobs[0] if jobs else None


def test_a_worker_killed_mid_job_and_between_jobs_is_restarted(served, study_factory,
                                                               tmp_path):
    study = study_factory("covid", 1, 24)
    served.start()
    first_worker = served.worker()
    served.send(study.files)
    wait_for(lambda: _running_job(served.store), timeout=60, every=0.05)
    os.kill(served.worker(), signal.SIGKILL)                 # the OOM killer, say
    job = wait_for(lambda: served.store.jobs("done") and served.store.jobs("done")[0],
                   timeout=120)
    assert job.attempts == 2 and job.diagnosis
    assert "the worker died (killed by SIGKILL" in job.error or job.error == ""
    second_worker = wait_for(served.worker)
    assert second_worker != first_worker
    [incident] = served.store.incidents("worker died")
    assert incident.job_id == job.id and "queued again" in incident.detail
    assert "died (killed by SIGKILL" in served.text()

    os.kill(second_worker, signal.SIGKILL)                   # idle, between jobs
    served.send(_copy_series(study, tmp_path / "second"))
    wait_for(lambda: len(served.store.jobs("done")) == 2, timeout=120)
    assert served.worker() not in (None, first_worker, second_worker)


def test_a_job_that_kills_its_worker_again_and_again_fails_with_that_reason(served,
                                                                             study_factory):
    served.start()
    served.send(study_factory("covid", 1, 24).files)
    for attempt in range(3):
        job = wait_for(lambda: _running_job(served.store), timeout=60, every=0.05)
        assert job.attempts == attempt + 1
        os.kill(wait_for(served.worker), signal.SIGKILL)
        wait_for(lambda: not _running_job(served.store), timeout=30, every=0.05)
    [job] = wait_for(lambda: served.store.jobs("failed"), timeout=30)
    assert "the worker died (killed by SIGKILL" in job.error and "given up" in job.error
    assert served.answers()                                  # the node itself goes on
    wait_for(served.worker, timeout=30)                      # with a worker for the next


def test_sigterm_to_the_whole_process_group_stops_node_and_worker(served):
    served.start()
    worker = served.worker()
    os.killpg(served.proc.pid, signal.SIGTERM)               # systemd's default, `timeout`
    assert served.stopped_within(45) == 0
    wait_for(lambda: not Path(f"/proc/{worker}").exists(), timeout=10)


def test_a_signal_during_start_up_stops_the_node(served):
    served.start(wait=False)
    time.sleep(1.0)                                          # the worker is loading the model
    served.proc.send_signal(signal.SIGTERM)
    assert served.stopped_within(30) != 0
    assert not served.answers()
    assert "Traceback" not in served.text()


def test_a_failed_start_ends_the_process_with_one_line(served):
    with socket.create_server(("127.0.0.1", served.port)):    # the port is taken
        served.start(wait=False)
        assert served.stopped_within(60) == 1
    text = served.text()
    assert f"lungsys: error: node.port {served.port} on 127.0.0.1: Address already in use" \
        in text
    assert "Traceback" not in text


def test_a_second_signal_forces_the_stop(served, study_factory):
    served.start()
    worker = served.worker()
    os.kill(worker, signal.SIGSTOP)                          # a worker that will not finish
    try:
        served.proc.send_signal(signal.SIGTERM)
        time.sleep(2.0)
        assert served.proc.poll() is None                    # waiting for the worker ...
        served.proc.send_signal(signal.SIGTERM)
        assert served.stopped_within(10) != 0                # ... until told again
        wait_for(lambda: not Path(f"/proc/{worker}").exists()
                 or Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0]
                 == "Z", timeout=10)
    finally:
        try:
            os.kill(worker, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_second_node_on_the_same_data_folder_refuses_and_changes_nothing(
        served, study_factory, tmp_path):
    served.start()
    served.send(study_factory("covid", 1, 24).files)
    wait_for(lambda: _running_job(served.store), timeout=60, every=0.05)
    os.kill(served.worker(), signal.SIGSTOP)                 # hold the job running
    try:
        second = Served(tmp_path, port=free_port())
        proc = subprocess.run([EXE, "serve", "--config", str(second.toml)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1
        assert f"in use by process {served.proc.pid}" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert _running_job(served.store) is not None        # not reset by the second
    finally:
        os.kill(served.worker(), signal.SIGCONT)
    job = wait_for(lambda: served.store.jobs("done") and served.store.jobs("done")[0])
    assert job.attempts == 1
