"""End to end: a modality (storescu) sends a phantom study to the node; the results
(SR, SEG, key images, heatmaps) arrive in a real Orthanc, over DIMSE and over STOW-RS,
as series of the CT's study."""

from __future__ import annotations

import io
import os
import subprocess

import highdicom as hd
import pydicom
import pytest
from highdicom.sr.utils import find_content_items

from config import load_config
from inference.engine import Engine
from inference.sr import CLASS_CODES, DIAGNOSIS
from pacs_node.node import Node
from store.models import DeliveryState, JobState

from conftest import eventually, require_tool
from doubles import hotspot_model
from orthanc import Orthanc, free_port


@pytest.fixture(scope="module")
def engine():
    """A model that always finds lesions, so that every result object is made."""
    return Engine(hotspot_model(), device="cpu")


@pytest.fixture
def orthanc(tmp_path):
    pacs = Orthanc(tmp_path / "orthanc").start()
    yield pacs
    pacs.stop()


def make_node(tmp_path, engine, destination: str, stow_port: int = 0, **assembly) -> Node:
    toml = tmp_path / "node.toml"
    stable = assembly.get("stable_seconds", 30)
    toml.write_text(
        f'[node]\nae_title = "LUNGSYS"\nhost = "127.0.0.1"\nport = {free_port()}\n'
        f'data_dir = "{tmp_path / "var"}"\nmin_free_disk_mb = 1\n'
        f'[dicomweb]\nport = {stow_port or free_port()}\n'
        f'[store]\nurl = "sqlite:///{tmp_path / "var" / "lungsys.db"}"\n'
        f'[assembly]\nstable_seconds = {stable}\nmin_slices = 20\n'
        f'[delivery]\ninitial_backoff_seconds = 1\nmax_backoff_seconds = 2\n' + destination)
    node = Node(load_config(toml, environ={}), engine)
    node.start()
    return node


def send(port: int, files, called: str = "LUNGSYS") -> None:
    proc = subprocess.run([require_tool("storescu"), "-aet", "CT1", "-aec", called,
                           "127.0.0.1", str(port), *map(str, files)], capture_output=True,
                          text=True, env={**os.environ, "TCP_NODELAY": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr




def delivered(node: Node):
    jobs = node.store.jobs()
    return jobs and jobs[0].deliveries and all(
        d.state == DeliveryState.done for d in jobs[0].deliveries) and jobs[0]


def check_orthanc(pacs: Orthanc, study, origin: str) -> None:
    """One study in the PACS: the CT and every result series, each dated, described
    ("AI ..."), numbered apart; the SR's diagnosis readable."""
    ct = pydicom.dcmread(study.files[0])
    studies = pacs.get("/studies?expand")
    [s] = [x for x in studies if x["MainDicomTags"]["StudyInstanceUID"] == ct.StudyInstanceUID]
    series = [pacs.get(f"/series/{sid}") for sid in s["Series"]]
    modalities = sorted(x["MainDicomTags"].get("Modality", "") for x in series)
    # the CT, key images (KO), heatmaps (SC: modality OT), the SEG and the SR
    assert modalities == ["CT", "KO", "OT", "SEG", "SR"], modalities
    results = [x["MainDicomTags"] for x in series if x["MainDicomTags"]["Modality"] != "CT"]
    for tags in results:
        assert len(tags.get("SeriesDate", "")) == 8 and tags.get("SeriesTime"), tags
        assert tags["SeriesDescription"].startswith("AI ") and \
            tags["SeriesDescription"].endswith("(lungsys)"), tags
    assert len({tags["SeriesNumber"] for tags in results}) == len(results)
    [sr_series] = [x for x in series if x["MainDicomTags"].get("Modality") == "SR"]
    sr_id = sr_series["Instances"][0]
    sr = hd.sr.ComprehensiveSR.from_dataset(
        pydicom.dcmread(io.BytesIO(pacs.get(f"/instances/{sr_id}/file"))))
    [diagnosis] = find_content_items(sr, name=DIAGNOSIS, recursive=True)
    assert diagnosis.ConceptCodeSequence[0].CodeValue in {c.value for c in CLASS_CODES}
    meta = pacs.get(f"/instances/{sr_id}/metadata?expand")
    assert meta["Origin"] == origin
    if origin == "DicomProtocol":
        assert meta["RemoteAET"] == "LUNGSYS"


def test_dimse_delivery_to_orthanc(tmp_path, engine, orthanc, study_factory):
    study = study_factory("covid", 1, 24)
    node = make_node(tmp_path, engine,
                     f'[[destinations]]\nname = "pacs"\nkind = "dimse"\nae_title = "ORTHANC"\n'
                     f'host = "127.0.0.1"\nport = {orthanc.dicom_port}\n')
    try:
        send(orthanc.dicom_port, study.files, "ORTHANC")   # the modality sends to PACS ...
        send(node.port, study.files)                       # ... and to the node
        job = eventually(lambda: delivered(node))
        assert job.state == JobState.done and job.diagnosis
        assert {r.kind for r in job.results} >= {"sr"}
        check_orthanc(orthanc, study, "DicomProtocol")
    finally:
        node.stop()


def test_stow_delivery_to_orthanc(tmp_path, engine, orthanc, study_factory):
    study = study_factory("covid", 1, 24)
    node = make_node(tmp_path, engine,
                     f'[[destinations]]\nname = "web"\nkind = "dicomweb"\n'
                     f'url = "{orthanc.url}/dicom-web"\n')
    try:
        send(orthanc.dicom_port, study.files, "ORTHANC")
        send(node.port, study.files)
        eventually(lambda: delivered(node))
        check_orthanc(orthanc, study, "Plugins")
    finally:
        node.stop()


def test_a_pacs_that_sends_over_stow_rs_gets_the_results_back(tmp_path, engine, study_factory):
    """Orthanc's DICOMweb client pushes the study to the node with STOW-RS; the
    results come back to Orthanc over DIMSE."""
    from store.api import JobStore

    study = study_factory("covid", 1, 24)
    stow_port = free_port()
    # the PACS sends with a sender token, as HTTP Basic's password (all Orthanc can send)
    token = JobStore(f"sqlite:///{tmp_path / 'var' / 'lungsys.db'}").create_token(
        "orthanc", "sender")
    pacs = Orthanc(tmp_path / "orthanc", dicomweb_servers={
        "lungsys": [f"http://127.0.0.1:{stow_port}/dicom-web/", "orthanc", token]})
    pacs.start()
    node = make_node(tmp_path, engine,
                     f'[[destinations]]\nname = "pacs"\nkind = "dimse"\nae_title = "ORTHANC"\n'
                     f'host = "127.0.0.1"\nport = {pacs.dicom_port}\n', stow_port=stow_port,
                     stable_seconds=2)
    try:
        send(pacs.dicom_port, study.files, "ORTHANC")
        [orthanc_study] = pacs.get("/studies")
        pacs.post("/dicom-web/servers/lungsys/stow",
                  {"Resources": [orthanc_study], "Synchronous": True})
        job = eventually(lambda: delivered(node))
        assert job.series.calling_aet == "STOW-RS" and job.series.instance_count == 24
        check_orthanc(pacs, study, "DicomProtocol")
    finally:
        node.stop()
        pacs.stop()


def _series_copy(study, dest, edit, count=None):
    """The study's files (or the first ``count``) as another series, edited."""
    dest.mkdir(parents=True)
    series_uid = pydicom.uid.generate_uid()
    paths = []
    for f in study.files[:count]:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        edit(ds)
        ds.save_as(dest / f.name)
        paths.append(dest / f.name)
    return paths


def test_series_that_are_not_chest_ct_are_skipped_with_reasons(tmp_path, engine,
                                                               study_factory):
    from pydicom.uid import MRImageStorage

    study = study_factory("covid", 1, 24)

    def localizer(ds):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]

    def mr(ds):
        ds.Modality, ds.SOPClassUID = "MR", MRImageStorage
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage

    def nothing(ds):
        del ds.ImagesInAcquisition

    node = make_node(tmp_path, engine, "", stable_seconds=2)
    try:
        send(node.port, _series_copy(study, tmp_path / "loc", localizer, 3))
        send(node.port, _series_copy(study, tmp_path / "mr", mr, 21))
        send(node.port, _series_copy(study, tmp_path / "few", nothing, 5))
        skipped = eventually(lambda: len(node.store.series("skipped")) == 3
                           and node.store.series("skipped"), timeout=60)
        reasons = sorted(s.reason for s in skipped)
        assert reasons == ["5 slices, fewer than the minimum of 20",
                           "localizer (scout) image", "modality MR, not CT"], reasons
        assert node.store.jobs() == []
    finally:
        node.stop()


def test_a_destination_down_at_first_gets_the_results_when_it_is_up(tmp_path, engine,
                                                                    study_factory):
    study = study_factory("covid", 1, 24)
    pacs = Orthanc(tmp_path / "orthanc")          # configured, not started yet
    node = make_node(tmp_path, engine,
                     f'[[destinations]]\nname = "pacs"\nkind = "dimse"\nae_title = "ORTHANC"\n'
                     f'host = "127.0.0.1"\nport = {pacs.dicom_port}\n')
    try:
        send(node.port, study.files)
        eventually(lambda: node.store.jobs() and node.store.jobs()[0].deliveries
                 and node.store.jobs()[0].deliveries[0].attempts >= 1)
        d = node.store.jobs()[0].deliveries[0]
        assert d.state == DeliveryState.pending and "not established" in d.last_error
        pacs.start()
        job = eventually(lambda: delivered(node))
        assert job.deliveries[0].attempts >= 2
        assert len(pacs.get("/instances")) == len(job.results)
    finally:
        node.stop()
        pacs.stop()


def test_a_node_killed_mid_study_finishes_it_after_a_restart(tmp_path, study_factory):
    import signal
    import sys
    from pathlib import Path

    from pacs_node.worker_process import NICENESS
    from store.api import JobStore

    study = study_factory("covid", 1, 24)
    port = free_port()
    toml = tmp_path / "node.toml"
    toml.write_text(f'[node]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{tmp_path / "var"}"\n'
                    f'min_free_disk_mb = 1\n[dicomweb]\nport = 0\n'
                    f'[store]\nurl = "sqlite:///{tmp_path / "var" / "db"}"\n'
                    f'[assembly]\nstable_seconds = 3\n[model]\ndevice = "cpu"\n')  # shipped model
    exe = str(Path(sys.executable).with_name("lungsys"))

    def serve():
        proc = subprocess.Popen([exe, "serve", "--config", str(toml)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # it answers once its worker (at the lower priority) has loaded the model: under a
        # busy CPU that is slow (60 s were not enough once beside another test's inference)
        eventually(lambda: subprocess.run([exe, "echo", "127.0.0.1", str(port), "--aet",
                                         "LUNGSYS"], capture_output=True).returncode == 0)
        return proc

    def stat(pid: int) -> list[str]:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()

    def worker_of(pid: int) -> int:
        """The model's process: the child at the worker's lower priority."""
        [worker] = [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                    for c in (task / "children").read_text().split()
                    if int(stat(int(c))[16]) == os.getpriority(os.PRIO_PROCESS, 0) + NICENESS]
        return worker

    files = sorted(study.files)
    first = serve()
    worker = worker_of(first.pid)
    send(port, files[:12])
    first.send_signal(signal.SIGKILL)          # mid-study
    first.wait(timeout=30)
    eventually(lambda: not Path(f"/proc/{worker}").exists() or stat(worker)[0] == "Z",
             timeout=30)                       # the worker died with the node
    second = serve()
    try:
        send(port, files[12:])
        store = JobStore(f"sqlite:///{tmp_path / 'var' / 'db'}")
        job = eventually(lambda: store.jobs("done") and store.jobs("done")[0], timeout=240)
        assert job.series.instance_count == 24 and job.diagnosis
    finally:
        second.terminate()
        second.wait(timeout=30)
    assert second.returncode == 0


def test_a_job_left_running_by_a_crash_runs_again(tmp_path, engine, study_factory):
    import datetime as dt

    from store.api import JobStore, ReceivedInstance
    from store.models import utcnow

    study = study_factory("covid", 1, 24)
    store = JobStore(f"sqlite:///{tmp_path / 'var' / 'lungsys.db'}")
    for f in study.files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        store.record_instance(ReceivedInstance(
            str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.SeriesInstanceUID),
            str(ds.StudyInstanceUID), "CT", str(f), f.stat().st_size, "1.2.840.10008.1.2.1"))
    [series] = store.complete_ready(0, now=utcnow() + dt.timedelta(seconds=1))
    store.queue_job(series.id)
    assert store.claim_job().state == JobState.running      # ... and then the node died
    node = make_node(tmp_path, engine, "")
    try:
        job = eventually(lambda: node.store.jobs("done") and node.store.jobs("done")[0])
        assert job.attempts == 2 and job.diagnosis
    finally:
        node.stop()
