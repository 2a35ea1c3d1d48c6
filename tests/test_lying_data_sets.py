"""Data sets that lie, refused before they cost the node anything.

A deflated data set of a megabyte can hold a gigabyte of zeros: pydicom inflates a
deflated data set whole, and so would every reader of the stored file after the node
acknowledged it. And a C-STORE whose command announces one instance while its data set
is another leaves the sender's bookkeeping and the node's in disagreement; a Series
Instance UID sent again under another study (and patient) would put that patient's slice
into this patient's analysis. Each is refused, nothing is stored, and the next honest
instance is.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, generate_uid

from pacs_node.header import MAX_INFLATED_BYTES, refuse_inflation_bomb
from pacs_node.receiver import Receiver

from conftest import require_tool
from raw_peer import CT_ID, associate, c_store_rq, data_set, p_data, status_of

ENV = {**os.environ, "TCP_NODELAY": "1"}


@pytest.fixture
def node(start_node):
    return start_node(allowed_calling_aets=["CT1"])


def _stored(receiver: Receiver) -> list:
    return [p for p in receiver.storage.incoming.rglob("*") if p.is_file()]


def _deflated_instance(path, zeros: int) -> str:
    """A CT instance written deflated, carrying ``zeros`` bytes of zeros in a private
    element; its SOP Instance UID."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "CT", "BOMB"
    ds.private_block(0x0009, "LUNGSYS TEST", create=True).add_new(0x00, "OB", bytes(zeros))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def test_a_deflate_bomb_is_refused_and_a_deflated_instance_within_bounds_is_stored(
        node, tmp_path):
    receiver, store = node
    bomb, honest = tmp_path / "bomb.dcm", tmp_path / "honest.dcm"
    _deflated_instance(bomb, MAX_INFLATED_BYTES + 2**20)
    assert bomb.stat().st_size < MAX_INFLATED_BYTES // 100      # what travels is small
    kept = _deflated_instance(honest, 2**20)
    storescu = [require_tool("storescu"), "-v", "-xd", "-aet", "CT1", "-aec", "LUNGSYS",
                "127.0.0.1", str(receiver.port)]
    proc = subprocess.run([*storescu, str(bomb)], capture_output=True, text=True, env=ENV,
                          timeout=120)
    assert "Refused: OutOfResources" in proc.stderr, proc.stderr
    assert store.counts()["instances"] == 0 and _stored(receiver) == []
    proc = subprocess.run([*storescu, str(honest)], capture_output=True, text=True, env=ENV,
                          timeout=120)
    assert proc.returncode == 0 and "(Success)" in proc.stderr, proc.stderr
    [path] = _stored(receiver)
    assert pydicom.dcmread(path).SOPInstanceUID == kept


def test_a_data_set_that_is_not_the_instance_its_command_announced_is_refused(
        node, covid_study):
    receiver, store = node
    path = covid_study.files[0]
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    body = data_set(path)
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as s:
        assert associate(s)["contexts"][CT_ID] == 0
        for sop_class, sop_instance in ((ds.SOPClassUID, "1.2.3.4.5.6.7.8.9"),
                                        ("1.2.840.10008.5.1.4.1.1.7", ds.SOPInstanceUID)):
            s.sendall(p_data(CT_ID, 0x03, c_store_rq(sop_class, sop_instance)))
            s.sendall(p_data(CT_ID, 0x02, body))
            assert status_of(s) == 0xA900        # Data Set does not match SOP Class
        assert store.counts()["instances"] == 0 and _stored(receiver) == []
        s.sendall(p_data(CT_ID, 0x03, c_store_rq(ds.SOPClassUID, ds.SOPInstanceUID, 2)))
        s.sendall(p_data(CT_ID, 0x02, body))
        assert status_of(s) == 0x0000
    [stored] = _stored(receiver)
    assert pydicom.dcmread(stored).file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_a_deflated_data_set_with_bytes_after_its_end_is_read_to_its_end(tmp_path):
    """A sender pads a deflated data set of odd length with a byte (DCMTK does): the check
    stops at the deflate stream's end (it once went round for ever there)."""
    path = tmp_path / "padded.dcm"
    _deflated_instance(path, 2**20)
    with open(path, "ab") as f:
        f.write(b"\0")
    outcome: list = []

    def check() -> None:
        try:
            refuse_inflation_bomb(path, None)
            outcome.append("passed")
        except ValueError as exc:
            outcome.append(str(exc))

    thread = threading.Thread(target=check, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert outcome == ["passed"]
    with pytest.raises(ValueError, match="inflates past 0.5 MiB"):
        refuse_inflation_bomb(path, None, limit=2**19)


def test_a_series_uid_sent_again_under_another_study_is_refused_not_merged(
        node, covid_study, tmp_path):
    receiver, store = node
    first, second = covid_study.files[:2]
    study_uid = pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID
    other = pydicom.dcmread(second)
    other.StudyInstanceUID, other.PatientID = generate_uid(), "ANOTHER-PATIENT"
    other.save_as(tmp_path / "other.dcm")
    storescu = [require_tool("storescu"), "-v", "-aet", "CT1", "-aec", "LUNGSYS",
                "127.0.0.1", str(receiver.port)]
    proc = subprocess.run([*storescu, str(first), str(tmp_path / "other.dcm")],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.stderr.count("Received Store Response (Success)") == 1, proc.stderr
    assert "Error: CannotUnderstand" in proc.stderr, proc.stderr
    [series] = store.series()
    assert series.instance_count == 1 and series.study_instance_uid == study_uid
    assert len(_stored(receiver)) == 1
    [incident] = store.incidents()
    assert "Series Instance UID is recorded already, in another study" in incident.detail
    assert incident.sop_instance_uid == other.SOPInstanceUID
    proc = subprocess.run([*storescu, str(second)], capture_output=True, text=True, env=ENV,
                          timeout=120)                 # the same slice, in its own study
    assert "(Success)" in proc.stderr and store.series()[0].instance_count == 2
