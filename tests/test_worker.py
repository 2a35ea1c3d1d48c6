"""The node's worker process: the model loaded there, at lower CPU priority, or a clear
error before anything is received."""

from __future__ import annotations

import logging
import os
import socket

import pytest

from config import load_config
from pacs_node.node import Node
from pacs_node.worker_process import NICENESS

from orthanc import free_port


def _config(tmp_path, model: str = ""):
    toml = tmp_path / "node.toml"
    toml.write_text(f'[node]\nhost = "127.0.0.1"\nport = {free_port()}\n'
                    f'data_dir = "{tmp_path / "var"}"\nmin_free_disk_mb = 1\n'
                    f'[dicomweb]\nport = 0\n'
                    f'[store]\nurl = "sqlite:///{tmp_path / "var" / "lungsys.db"}"\n'
                    f'[model]\ndevice = "cpu"\n{model}')
    return load_config(toml, environ={})


def test_the_model_runs_in_a_process_of_lower_priority(tmp_path):
    node = Node(_config(tmp_path))
    node.start()
    try:
        worker = node.worker.pid
        assert worker != os.getpid()
        fields = open(f"/proc/{worker}/stat").read().rsplit(")", 1)[1].split()
        assert int(fields[16]) == os.getpriority(os.PRIO_PROCESS, 0) + NICENESS  # nice
        assert node.model.version.startswith("small-")
        assert "not a clinical model" in node.model.intended_use
    finally:
        node.stop()
    assert not os.path.exists(f"/proc/{worker}")


def test_a_model_that_cannot_load_stops_the_start_with_its_reason(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    config = _config(tmp_path, f'checkpoint = "{bad}"\n')
    node = Node(config)
    with pytest.raises(ValueError, match="broken.safetensors"):
        node.start()
    with socket.socket() as s:                   # nothing was accepted meanwhile
        assert s.connect_ex(("127.0.0.1", config.node.port)) != 0


def test_the_systemd_unit_is_valid_and_runs_the_node(tmp_path):
    """deploy/lungsys.service, with the paths of this checkout, passes systemd's checks."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the unit is checked where it is)")
    unit = (Path(__file__).parents[1] / "deploy" / "lungsys.service").read_text()
    exe = Path(sys.executable).with_name("lungsys")
    assert "ExecStart=/opt/lungsys/.venv/bin/lungsys serve --config " in unit
    here = tmp_path / "lungsys.service"
    here.write_text(unit.replace("/opt/lungsys/.venv/bin/lungsys", str(exe)))
    proc = subprocess.run([analyze, "verify", str(here)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr  # warnings too


def test_the_model_threads_setting_limits_the_process(tmp_path):
    """``[model] threads``: several workers on one machine each take their share of the
    cores instead of all of them; 0 leaves PyTorch's default."""
    import torch

    from pacs_node.worker import load_engine

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)              # (the test processes may run on one thread)
        load_engine(_config(tmp_path, "threads = 1\n"))
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        load_engine(_config(tmp_path))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads"):
        _config(tmp_path, "threads = -1\n")


def test_a_finished_jobs_log_is_recorded_with_its_outcome(tmp_path, covid_study, caplog):
    """The job's log goes into the job store in the same transaction as its outcome: a job
    the console shows done or failed has its log, even when the job store refuses the write
    after it (the lines that come later, such as "done in", are then all that is lost)."""
    import threading
    import time

    from inference.engine import Engine
    from pacs_node.worker import JobRunner
    from store.api import JobStore

    from doubles import hotspot_model, send_series

    class Refusing(JobStore):
        def set_job_log(self, *args, **kwargs):
            raise RuntimeError("the job store is away")

    class Exploding:
        def analyze(self, data):
            raise ValueError("no such thing")

    caplog.set_level(logging.INFO)                  # as `lungsys serve` logs
    config = _config(tmp_path, '[assembly]\nmin_slices = 1\nstable_seconds = 0.01\n')
    store = Refusing(config.store.url)
    for engine, state in ((Engine(hotspot_model(), device="cpu"), "done"),
                          (Exploding(), "failed")):
        send_series(store, covid_study.files, "CT1", tmp_path)
        time.sleep(0.05)
        Node(config, engine=object()).assembly_sweep()          # complete: a job queued
        stop, wake = threading.Event(), threading.Event()
        runner = threading.Thread(target=JobRunner(config, store, engine).loop,
                                  args=(stop, wake), daemon=True)
        runner.start()
        deadline = time.monotonic() + 120
        while not store.jobs(state) and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        wake.set()
        runner.join(timeout=30)
        [job] = store.jobs(state)
        assert f"job {job.id}: series" in job.log, (state, job.log)
        assert ("slices loaded" if state == "done" else f"job {job.id} failed: ValueError") \
            in job.log


def test_a_rerun_with_an_untrained_model_says_so_wherever_its_result_is_read(
        tmp_path, covid_study, caplog):
    """The node's own model is checked when it starts (its log, the dashboard); a re-run
    may choose another. Chosen untrained, the job's log (on its console page) says so and
    what to do; its reader is told in the SR's comment, on the heatmaps, in the job's
    record (the console, `jobs show --json`) and in the webhook's body. The node's own
    trained model's job says nothing of the kind."""
    import json
    import subprocess
    import sys
    import threading
    import time
    from pathlib import Path

    from conftest import require_tool
    from config import Notification, NotificationEvent
    from doubles import hotspot_model, send_series
    from inference.checkpoint import LungSysModel, save_checkpoint
    from inference.engine import Engine
    from inference.model_info import UNTRAINED
    from pacs_node.notify import payload
    from pacs_node.worker import JobRunner
    from store.api import JobStore

    caplog.set_level(logging.INFO)                  # as `lungsys serve` logs
    config = _config(tmp_path, 'mirror = false\n[assembly]\nmin_slices = 1\n'
                               'stable_seconds = 0.01\n')
    store = JobStore(config.store.url)
    trained = hotspot_model()
    trained.metadata["provenance"] = {"kind": "trained"}
    save_checkpoint(LungSysModel.create("small", seed=3), tmp_path / "untrained.safetensors")
    send_series(store, covid_study.files, "CT1", tmp_path)
    time.sleep(0.05)
    Node(config, engine=object()).assembly_sweep()
    stop, wake = threading.Event(), threading.Event()
    runner = threading.Thread(target=JobRunner(config, store, Engine(
        trained, device="cpu", mirror=False)).loop, args=(stop, wake), daemon=True)
    runner.start()

    def done(count: int) -> list:
        deadline = time.monotonic() + 180
        while len(store.jobs("done")) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return store.jobs("done")

    def comment(job) -> str:
        [sr] = [r.path for r in job.results if r.kind == "sr"]
        proc = subprocess.run([require_tool("dsrdump"), "+Pl", sr], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return next(line for line in proc.stdout.splitlines()
                    if '"Comment")=' in line and "primary" in line)

    def webhook(job) -> dict:
        return payload(NotificationEvent.job_done, job, "node",
                       Notification(name="ris", url="http://127.0.0.1:9/hook"))

    try:
        [first] = done(1)
        store.rerun_job(first.id, str(tmp_path / "untrained.safetensors"))
        wake.set()
        rerun = done(2)[0]
    finally:
        stop.set()
        wake.set()
        runner.join(timeout=60)
    assert rerun.id != first.id
    assert f"job {first.id}: " in first.log and "slices loaded" in first.log
    assert "WARNING" not in first.log and first.caution == ""
    assert "Warning" not in comment(first) and webhook(first)["caution"] is None

    said = UNTRAINED["model"]
    assert f"WARNING pacs_node.worker: job {rerun.id}: model small-" in rerun.log
    assert said.caution in rerun.log and "lungsys model init" in rerun.log  # what to do
    assert rerun.caution == said.caution and webhook(rerun)["caution"] == said.caution
    assert f"Warning: {said.caution}." in comment(rerun)
    assert "lungsys" not in comment(rerun).split("Produced by")[0]   # no commands for a reader
    exe = str(Path(sys.executable).with_name("lungsys"))
    shown = subprocess.run([exe, "jobs", "show", str(rerun.id), "--config",
                            str(tmp_path / "node.toml"), "--json"], capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["caution"] == said.caution
