"""Workers beside the node: ``lungsys worker`` processes on a PostgreSQL job store run the
node's jobs, reading its data folder (shared) or, each with a folder of its own, over
WADO-RS; one killed with SIGKILL in the middle of a job has it taken back once its lease
expires and finished by another; every study gets exactly one SR in the PACS (Orthanc),
none twice, none missing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pydicom

from conftest import eventually, require_tool
from orthanc import Orthanc, free_port

EXE = str(Path(sys.executable).with_name("lungsys"))
SEEDS = (("covid", 31), ("cap", 32), ("healthy", 33), ("h1n1", 34), ("covid", 35),
         ("cap", 36))


def storescu(port: int, files) -> None:
    proc = subprocess.run([require_tool("storescu"), "-aet", "CT1", "-aec", "LUNGSYS",
                           "127.0.0.1", str(port), *map(str, files)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "TCP_NODELAY": "1"})
    assert proc.returncode == 0, proc.stderr


@contextmanager
def fleet(tmp_path, url: str, pacs: Orthanc, workers: int, wado: bool):
    """A node that runs no jobs itself (``[worker] local = false``) and ``workers``
    ``lungsys worker`` processes: the node, its port and the workers."""
    port, http = free_port(), free_port()
    node_toml = tmp_path / "node.toml"
    # one view of each slice: half the model's time; these tests are about the workers
    common = (f'min_free_disk_mb = 1\n[store]\nurl = "{url}"\n'
              f'[model]\ndevice = "cpu"\nmirror = false\n'
              f'[worker]\nlocal = false\nlease_seconds = 3\nmax_attempts = 3\n')
    node_toml.write_text(
        f'[node]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{tmp_path / "node"}"\n'
        f'{common}[http]\nport = {http if wado else 0}\n[assembly]\nstable_seconds = 2\n'
        f'[[destinations]]\nname = "pacs"\nkind = "dimse"\nae_title = "ORTHANC"\n'
        f'host = "127.0.0.1"\nport = {pacs.dicom_port}\n')
    logs = tmp_path / "logs"
    logs.mkdir()
    node = subprocess.Popen([EXE, "serve", "--config", str(node_toml)],
                            stdout=subprocess.DEVNULL, stderr=open(logs / "node.log", "w"))
    running: list[subprocess.Popen] = []
    try:
        eventually(lambda: subprocess.run([EXE, "echo", "127.0.0.1", str(port), "--aet",
                                           "LUNGSYS"], capture_output=True).returncode == 0
                   or node.poll() is not None, timeout=120)
        assert node.poll() is None, (logs / "node.log").read_text()
        for i in range(workers):
            toml = node_toml
            if wado:                # a folder of its own; the node's series over WADO-RS
                token = subprocess.run([EXE, "tokens", "create", f"worker-{i}", "--role",
                                        "worker", "--config", str(node_toml)],
                                       capture_output=True, text=True, check=True).stdout
                toml = tmp_path / f"worker{i}.toml"
                toml.write_text(f'[node]\ndata_dir = "{tmp_path / f"worker{i}"}"\n{common}'
                                f'instances = "wado"\nnode_url = "http://127.0.0.1:{http}"\n'
                                f'token = "{token.strip()}"\n')
            running.append(subprocess.Popen([EXE, "worker", "--config", str(toml)],
                                            stdout=subprocess.DEVNULL,
                                            stderr=open(logs / f"worker{i}.log", "w")))
        yield node, port, running
    finally:
        for process in [*running, node]:
            if process.poll() is None:
                process.terminate()
        for process in [*running, node]:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


def kill_one_in_a_job_and_check_the_pacs(store, port, workers, studies, pacs):
    """Send the studies, SIGKILL the worker of the first job running, and check that its
    job was finished by another after its lease expired and that the PACS holds exactly
    one SR of each study."""
    from store.models import IncidentKind, JobState

    eventually(lambda: len(store.workers()) == len(workers), timeout=120)
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

    eventually(lambda: len(store.jobs("done")) == len(studies) and all(
        j.deliveries and all(d.attempts for d in j.deliveries) for j in store.jobs("done")),
        timeout=300)
    [taken_over] = [j for j in store.jobs() if j.id == running.id]
    assert taken_over.state == JobState.done and taken_over.attempts == 2
    assert taken_over.worker != running.worker and taken_over.worker in names
    assert any(i.job_id == running.id for i in store.incidents(IncidentKind.worker_died))
    for study in studies:       # each in the PACS with one SR, from the job that finished it
        uid = pydicom.dcmread(study.files[0]).StudyInstanceUID
        [found] = pacs.post("/tools/find", {"Level": "Study",
                                            "Query": {"StudyInstanceUID": uid}})
        srs = [i for s in pacs.get(f"/studies/{found}/series")
               if s["MainDicomTags"].get("Modality") == "SR" for i in s["Instances"]]
        assert len(srs) == 1, (uid, srs)
    return taken_over


def test_a_killed_worker_s_job_is_finished_by_another_and_each_study_has_one_sr(
        tmp_path, postgres, study_factory):
    from store.api import JobStore

    url = postgres.new_database()
    pacs = Orthanc(tmp_path / "orthanc").start()
    studies = [study_factory(label, seed, 24) for label, seed in SEEDS[:3]]
    try:
        with fleet(tmp_path, url, pacs, 2, wado=False) as (node, port, workers):
            kill_one_in_a_job_and_check_the_pacs(JobStore(url), port, workers, studies, pacs)
    finally:
        pacs.stop()


def test_workers_with_folders_of_their_own_take_series_over_wado_rs(
        tmp_path, postgres, study_factory):
    """Three workers, each with its own data folder (``instances = "wado"``), six studies."""
    from store.api import JobStore

    url = postgres.new_database()
    pacs = Orthanc(tmp_path / "orthanc").start()
    studies = [study_factory(label, seed, 24) for label, seed in SEEDS]
    store = JobStore(url)
    try:
        with fleet(tmp_path, url, pacs, 3, wado=True) as (node, port, workers):
            taken_over = kill_one_in_a_job_and_check_the_pacs(store, port, workers, studies,
                                                              pacs)
            jobs = store.jobs("done")
            assert len({j.worker for j in jobs}) >= 2        # the queue was shared
            assert all("retrieved over WADO-RS" in j.log for j in jobs)
            # results lie in the node's folder, under the claim that recorded them
            node_results = (tmp_path / "node" / "results").resolve()
            for job in jobs:
                assert job.results and all(
                    Path(r.path).parent.name == f"a{job.attempts}"
                    and node_results in Path(r.path).parents for r in job.results)
            assert taken_over.attempts == 2
        # the workers that stopped cleanly left nothing in their folders: no instances
        # received, no results kept, no work left
        for i, worker in enumerate(workers):
            if worker.returncode != -signal.SIGKILL:
                folder = tmp_path / f"worker{i}"
                assert not [p for p in folder.rglob("*") if p.is_file()
                            and p.name != ".lock"], i
                assert not (folder / "incoming").exists()
    finally:
        pacs.stop()


def test_an_idle_worker_hears_of_a_queued_job_at_once(postgres):
    """PostgreSQL's NOTIFY wakes a worker listening (it need not wait for its next look)."""
    import threading

    from pacs_node.lease import JobBell
    from store.api import JobStore

    store = JobStore(postgres.new_database())
    wake = threading.Event()
    bell = JobBell(store.url, wake).start()
    try:
        store.announce_jobs()                   # before it listens: not heard, no harm
        eventually(lambda: (store.announce_jobs(), wake.is_set())[1], timeout=10, every=0.2)
        wake.clear()
        store.announce_jobs()
        assert wake.wait(3)
    finally:
        bell.stop()
