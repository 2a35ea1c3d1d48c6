"""A worker with a data folder of its own: the node serves a job's series over WADO-RS to a
token of the worker role alone, takes the results back only from the worker holding the
claim, files them in its own results folder and delivers them as its own worker's."""

from __future__ import annotations

import email.parser
import io
import logging
import email.policy
import threading
import uuid
from pathlib import Path

import pydicom
import pytest
import requests

from config import load_config
from conftest import eventually
from console import lungsys
from doubles import hotspot_model
from orthanc import free_port
from test_remote_workers import storescu


@pytest.fixture
def node(tmp_path):
    from pacs_node.node import Node

    toml = tmp_path / "node.toml"
    toml.write_text(
        f'[node]\nhost = "127.0.0.1"\nport = {free_port()}\ndata_dir = "{tmp_path / "node"}"\n'
        f'min_free_disk_mb = 1\n[http]\nport = {free_port()}\n'
        f'[store]\nurl = "sqlite:///{tmp_path / "node" / "lungsys.db"}"\n'
        f'[assembly]\nstable_seconds = 1\n[worker]\nlocal = false\n')
    tokens = {role: lungsys("tokens", "create", f"{role}-1", "--role", role,
                            "--config", str(toml)) for role in ("worker", "sender", "operator")}
    node = Node(load_config(toml, environ={}))
    node.start()
    try:
        yield node, tokens, f"http://127.0.0.1:{node.stow_port}"
    finally:
        node.stop()


def queued_job(node, files):
    storescu(node.port, files)
    return eventually(lambda: node.store.jobs("queued"), timeout=60)[0]


def uids(study) -> tuple[str, str]:
    ds = pydicom.dcmread(study.files[0], stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def parts(answer: requests.Response) -> list[bytes]:
    """The bodies of a multipart/related answer."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + answer.headers["content-type"].encode() + b"\r\n\r\n"
        + answer.content)
    assert message.is_multipart()
    for part in message.iter_parts():
        assert part.get_content_type() == "application/dicom"
        assert part.get_param("transfer-syntax")
    return [part.get_payload(decode=True) for part in message.iter_parts()]


def test_a_worker_over_wado_rs_runs_the_job_and_the_node_files_the_results(
        node, covid_study, tmp_path, caplog):
    from inference.engine import Engine
    from pacs_node.exchange import NodeClient, OverHttp
    from pacs_node.layout import DataLayout
    from pacs_node.worker import JobRunner
    from store.models import JobState

    caplog.set_level(logging.INFO)          # as lungsys worker logs (the job's log: INFO)
    node, tokens, base = node
    job = queued_job(node, covid_study.files)
    mine = DataLayout(tmp_path / "worker")
    client = NodeClient(base, tokens["worker"])
    assert client.node_id() == node.node_id
    config = load_config(None, environ={"LUNGSYS_NODE_DATA_DIR": str(mine.root)})
    runner = JobRunner(config, node.store, Engine(hotspot_model(), device="cpu"), name="w1",
                       node_id=client.node_id(), exchange=OverHttp(client, mine), remote=True)
    stop = threading.Event()
    thread = threading.Thread(target=runner.loop, args=(stop, threading.Event()), daemon=True)
    thread.start()
    try:
        eventually(lambda: node.store.job(job.id).state == JobState.done
                   and node.store.job(job.id).log, timeout=120)       # (its log: recorded after)
    finally:
        stop.set()
        thread.join(30)
    done = node.store.job(job.id)
    assert done.worker == "w1" and done.diagnosis
    assert "retrieved over WADO-RS" in done.log
    study_uid, series_uid = uids(covid_study)
    folder = node.layout.results_folder(study_uid, series_uid, 1, 1)
    assert done.results and {Path(r.path).parent for r in done.results} == {folder}
    for r in done.results:                       # the node's copy is the object recorded
        ds = pydicom.dcmread(r.path)
        assert ds.SOPInstanceUID == r.sop_instance_uid
        assert ds.StudyInstanceUID == study_uid
    # the worker's own folder keeps nothing: no instances, no results
    assert not [p for p in mine.root.rglob("*") if p.is_file() and p.name != ".lock"]


def test_wado_rs_serves_a_series_only_to_the_worker_holding_its_job(node, covid_study):
    node, tokens, base = node
    job = queued_job(node, covid_study.files)
    study_uid, series_uid = uids(covid_study)
    url = f"{base}/dicom-web/studies/{study_uid}/series/{series_uid}"

    def get(token: str | None, key: str = "", **headers) -> requests.Response:
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return requests.get(url, headers={**headers, "X-Lungsys-Claim": key}, timeout=60)

    assert get(tokens["worker"]).status_code == 404          # a token alone: no series
    key = node.store.claim_job(node.node_id, "w1", 60).claim_key
    assert len(key) == 32
    assert get(None, key).status_code == 401
    assert get(tokens["sender"], key).status_code == 403
    assert get(tokens["operator"], key).status_code == 403     # no role but worker's
    assert get(tokens["worker"], "0" * 32).status_code == 404   # another claim's key
    answer = get(tokens["worker"], key)
    assert answer.status_code == 200
    got = parts(answer)           # the files as the node stored them, each instance once
    assert sorted(got) == sorted(Path(p).read_bytes()
                                 for p in node.store.instance_paths(job.series_id))
    assert sorted(pydicom.dcmread(io.BytesIO(b)).SOPInstanceUID for b in got) == sorted(
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in covid_study.files)
    assert get(tokens["worker"], key, Accept='multipart/related; type="application/dicom"; '
                                             'transfer-syntax=*').status_code == 200
    assert get(tokens["worker"], key, Accept='multipart/related; type="application/dicom"; '
               'transfer-syntax=1.2.840.10008.1.2.4.50').status_code == 406
    worker = {"Authorization": f"Bearer {tokens['worker']}", "X-Lungsys-Claim": key}
    other = f"{base}/dicom-web/studies/{study_uid}/series/1.2.3.4"
    assert requests.get(other, headers=worker, timeout=30).status_code == 404
    long = f"{base}/dicom-web/studies/{'1.' * 40}1/series/{series_uid}"
    assert requests.get(long, headers=worker, timeout=30).status_code == 400
    node.store.fail_job(job.id, "stopped", worker="w1")        # the claim ends: so does it
    assert get(tokens["worker"], key).status_code == 404


def _put(base: str, token: str, job: int, attempt: int, key: str, payloads: list[bytes]
         ) -> requests.Response:
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p
                    + b"\r\n" for p in payloads) + f"--{boundary}--\r\n".encode()
    return requests.put(f"{base}/worker/jobs/{job}/attempts/{attempt}/results", data=body,
                        timeout=60, headers={
                            "Authorization": f"Bearer {token}", "X-Lungsys-Claim": key,
                            "Content-Type": f'multipart/related; type="application/dicom"; '
                                            f'boundary={boundary}'})


def _object(source, syntax=None, **changes) -> bytes:
    """A result object as a worker writes one (here: a copy of a source slice)."""
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_results_are_taken_once_all_or_none_and_only_under_the_claim(
        node, covid_study, study_factory):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    node, tokens, base = node
    job = queued_job(node, covid_study.files)
    claimed = node.store.claim_job(node.node_id, "w1", 60)
    assert claimed.id == job.id and claimed.attempts == 1
    key, w = claimed.claim_key, tokens["worker"]
    result, second = (_object(covid_study.files[i]) for i in (0, 1))
    foreign = study_factory("cap", 77, 24).files[0].read_bytes()
    folder = node.layout.results_folder(*uids(covid_study), 1, 1)

    def nothing_filed() -> bool:
        return not folder.exists() or not list(folder.iterdir())

    assert _put(base, tokens["operator"], job.id, 1, key, [result]).status_code == 403
    assert _put(base, w, job.id, 1, "", [result]).status_code == 410       # no claim shown
    assert _put(base, w, job.id, 1, "0" * 32, [result]).status_code == 410  # not its claim
    assert _put(base, w, job.id, 2, key, [result]).status_code == 410      # not this claim
    assert _put(base, w, 99999, 1, key, [result]).status_code == 404
    assert _put(base, w, job.id, 1, key, [foreign]).status_code == 409     # another study
    assert _put(base, w, job.id, 1, key, [result, b"not DICOM"]).status_code == 400
    deflated = _object(covid_study.files[2], DeflatedExplicitVRLittleEndian)
    assert _put(base, w, job.id, 1, key, [deflated]).status_code == 400    # never inflated
    assert _put(base, w, job.id, 1, key, [result, result]).status_code == 400
    assert nothing_filed()                    # all or none: no part of those was kept
    answer = _put(base, w, job.id, 1, key, [result, second])
    assert answer.status_code == 200
    stored = answer.json()["stored"]
    assert len(stored) == 2 and {Path(p).parent for p in stored.values()} == {folder}
    assert sorted(Path(p).read_bytes() for p in stored.values()) == sorted([result, second])
    # once: a second hand-back (another object under a SOP UID) changes nothing
    assert _put(base, w, job.id, 1, key, [_object(covid_study.files[3])]).status_code == 409
    assert sorted(Path(p).read_bytes() for p in folder.iterdir()) == sorted([result, second])

    def delete(key: str) -> int:
        return requests.delete(f"{base}/worker/jobs/{job.id}/attempts/1/results", timeout=30,
                               headers={"Authorization": f"Bearer {w}",
                                        "X-Lungsys-Claim": key}).status_code

    assert delete("0" * 32) == 410 and delete("") == 410 and folder.exists()
    assert delete(key) == 200 and not folder.exists()     # its own claim: removed


def test_a_worker_with_a_wrong_token_or_no_node_url_says_so_in_one_line(node, tmp_path):
    import subprocess

    from test_remote_workers import EXE

    node, tokens, base = node
    toml = tmp_path / "worker.toml"
    for worker, expected in (
            (f'node_url = "{base}"\ntoken = "lsy_not-a-token"', "HTTP 401"),
            (f'node_url = "{base}"\ntoken = "{tokens["sender"]}"', "HTTP 403"),
            ('token = "lsy_x"', "worker.node_url")):
        toml.write_text(f'[node]\ndata_dir = "{tmp_path / "w"}"\n[store]\n'
                        f'url = "sqlite:///{tmp_path / "node" / "lungsys.db"}"\n'
                        f'[worker]\ninstances = "wado"\n{worker}\n')
        proc = subprocess.run([EXE, "worker", "--config", str(toml)], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode != 0 and expected in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
