"""Workers beside the node: ``lungsys worker`` processes on a shared PostgreSQL job store and
data folder run the node's jobs; one killed with SIGKILL in the middle of a job has it
taken back once its lease expires and finished by another; every study gets exactly one
SR in the PACS (Orthanc), none twice, none missing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pydicom

from conftest import eventually, require_tool
from orthanc import Orthanc, free_port

EXE = str(Path(sys.executable).with_name("lungsys"))


def storescu(port: int, files) -> None:
    proc = subprocess.run([require_tool("storescu"), "-aet", "CT1", "-aec", "LUNGSYS",
                           "127.0.0.1", str(port), *map(str, files)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "TCP_NODELAY": "1"})
    assert proc.returncode == 0, proc.stderr


def test_a_killed_worker_s_job_is_finished_by_another_and_each_study_has_one_sr(
        tmp_path, postgres, study_factory):
    from store.api import JobStore
    from store.models import IncidentKind, JobState

    url = postgres.new_database()
    pacs = Orthanc(tmp_path / "orthanc").start()
    port = free_port()
    toml = tmp_path / "node.toml"
    toml.write_text(
        f'[node]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{tmp_path / "shared"}"\n'
        f'min_free_disk_mb = 1\n[http]\nport = 0\n[store]\nurl = "{url}"\n'
        f'[assembly]\nstable_seconds = 2\n[model]\ndevice = "cpu"\n'
        f'[worker]\nlocal = false\nlease_seconds = 3\nmax_attempts = 3\n'
        f'[[destinations]]\nname = "pacs"\nkind = "dimse"\nae_title = "ORTHANC"\n'
        f'host = "127.0.0.1"\nport = {pacs.dicom_port}\n')
    studies = [study_factory(label, seed, 24)
               for label, seed in (("covid", 31), ("cap", 32), ("healthy", 33))]
    logs = tmp_path / "logs"
    logs.mkdir()
    node = subprocess.Popen([EXE, "serve", "--config", str(toml)], stdout=subprocess.DEVNULL,
                            stderr=open(logs / "node.log", "w"))
    workers: list[subprocess.Popen] = []
    store = JobStore(url)
    try:
        eventually(lambda: subprocess.run([EXE, "echo", "127.0.0.1", str(port), "--aet",
                                           "LUNGSYS"], capture_output=True).returncode == 0
                   or node.poll() is not None, timeout=120)
        assert node.poll() is None, (logs / "node.log").read_text()
        for i in range(2):
            workers.append(subprocess.Popen([EXE, "worker", "--config", str(toml)],
                                            stdout=subprocess.DEVNULL,
                                            stderr=open(logs / f"worker{i}.log", "w")))
        eventually(lambda: len(store.workers()) == 2, timeout=120)
        names = {w.name for w in store.workers()}
        assert all(n.rsplit(":", 1)[1].isdigit() for n in names)      # host:pid
        assert {w.device for w in store.workers()} == {"cpu"}

        for study in studies:
            storescu(port, study.files)
        running = eventually(lambda: [j for j in store.jobs("running") if j.worker],
                             timeout=120, every=0.05)[0]
        victim = next(w for w in workers if running.worker.endswith(f":{w.pid}"))
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)

        eventually(lambda: len(store.jobs("done")) == 3 and all(
            d.attempts for j in store.jobs("done") for d in j.deliveries), timeout=240)
        [taken_over] = [j for j in store.jobs() if j.id == running.id]
        assert taken_over.state == JobState.done and taken_over.attempts == 2
        assert taken_over.worker != running.worker and taken_over.worker in names
        assert any(i.job_id == running.id for i in store.incidents(IncidentKind.worker_died))
        # every study in the PACS with exactly one SR, from the job that finished it
        for study in studies:
            uid = pydicom.dcmread(study.files[0]).StudyInstanceUID
            [found] = pacs.post("/tools/find", {"Level": "Study",
                                                "Query": {"StudyInstanceUID": uid}})
            srs = [i for s in pacs.get(f"/studies/{found}/series")
                   if s["MainDicomTags"].get("Modality") == "SR" for i in s["Instances"]]
            assert len(srs) == 1, (uid, srs)
    finally:
        for process in [*workers, node]:
            if process.poll() is None:
                process.terminate()
        for process in [*workers, node]:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
        pacs.stop()
