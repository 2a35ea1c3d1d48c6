"""Data sets that lie, refused before they cost the node anything.

A deflated data set of a megabyte can hold a gigabyte of zeros: pydicom inflates a
deflated data set whole, and so would every reader of the stored file after the node
acknowledged it. And a C-STORE whose command announces one instance while its data set
is another leaves the sender's bookkeeping and the node's in disagreement; a Series
Instance UID sent again under another study (and patient) would put that patient's slice
into this patient's analysis. A message sent on a presentation context negotiated for
another SOP Class, or a command whose UIDs are not UIDs, lies about what it carries. Each
is refused, nothing is stored, and the next honest instance is.
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

from pacs_node.dimse import parse_command
from pacs_node.header import MAX_INFLATED_BYTES, refuse_inflation_bomb
from pacs_node.receiver import Receiver

from conftest import require_tool
from raw_peer import (CT_ID, EXPLICIT, IMPLICIT, SC_ID, VERIFICATION_ID, associate,
                      associate_rq, c_echo_rq, c_store_rq, command, data_set, ending, p_data,
                      read_pdu, status_of)

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
    bomb_uid = _deflated_instance(bomb, MAX_INFLATED_BYTES + 2**20)
    assert bomb.stat().st_size < MAX_INFLATED_BYTES // 100      # what travels is small
    kept = _deflated_instance(honest, 2**20)
    storescu = [require_tool("storescu"), "-v", "-xd", "-aet", "CT1", "-aec", "LUNGSYS",
                "127.0.0.1", str(receiver.port)]
    proc = subprocess.run([*storescu, str(bomb)], capture_output=True, text=True, env=ENV,
                          timeout=120)
    assert "Refused: OutOfResources" in proc.stderr, proc.stderr
    assert store.counts()["instances"] == 0 and _stored(receiver) == []
    [incident] = store.incidents()            # the admin sees which instance, and why
    assert "inflates past 64 MiB" in incident.detail and incident.origin == "CT1"
    assert incident.sop_instance_uid == bomb_uid
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
        assert associate(s, associate_rq(secondary_capture=True))["contexts"][SC_ID] == 0
        for context, sop_class, sop_instance in (
                (CT_ID, ds.SOPClassUID, "1.2.3.4.5.6.7.8.9"),
                (SC_ID, "1.2.840.10008.5.1.4.1.1.7", ds.SOPInstanceUID)):
            s.sendall(p_data(context, 0x03, c_store_rq(sop_class, sop_instance)))
            s.sendall(p_data(context, 0x02, body))
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


def test_a_message_on_a_context_negotiated_for_another_sop_class_is_refused(
        node, covid_study, caplog, tmp_path):
    """A presentation context says what its messages are about (PS3.8 7.1.1.13): a CT
    image sent on the Verification context, or on Secondary Capture's, is not stored; nor
    is an "instance" of the Verification SOP Class itself (C-ECHO's alone: PS3.4 A)."""
    receiver, store = node
    path = covid_study.files[0]
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    body = data_set(path)
    echo_instance = pydicom.dcmread(path)
    echo_instance.SOPClassUID = echo_instance.file_meta.MediaStorageSOPClassUID = \
        "1.2.840.10008.1.1"
    echo_instance.file_meta.TransferSyntaxUID = IMPLICIT   # the Verification context's
    echo_instance.save_as(tmp_path / "echo.dcm", enforce_file_format=True)
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as s:
        associate(s, associate_rq(secondary_capture=True))
        for message_id, context, sop_class, data in (
                (1, VERIFICATION_ID, ds.SOPClassUID, body), (2, SC_ID, ds.SOPClassUID, body),
                (7, VERIFICATION_ID, "1.2.840.10008.1.1", data_set(tmp_path / "echo.dcm"))):
            s.sendall(p_data(context, 0x03, c_store_rq(sop_class, ds.SOPInstanceUID,
                                                       message_id)))
            s.sendall(p_data(context, 0x02, data))
            assert status_of(s) == 0x0122        # Refused: SOP Class Not Supported
        s.sendall(p_data(CT_ID, 0x03, c_echo_rq(3)))
        assert status_of(s) == 0x0122
        s.sendall(p_data(VERIFICATION_ID, 0x03, command([(0x0100, b"\x30\x00"),
                                                         (0x0110, b"\x04\x00"),
                                                         (0x0800, b"\x01\x01")])))
        assert status_of(s) == 0x0122                # a C-ECHO naming no SOP Class
        assert store.counts()["instances"] == 0 and _stored(receiver) == []
        assert "sent on the presentation context negotiated for 1.2.840.10008.1.1" in caplog.text
        assert [i.sop_instance_uid for i in store.incidents()] == [ds.SOPInstanceUID] * 3
        s.sendall(p_data(VERIFICATION_ID, 0x03, c_echo_rq(5)))
        assert status_of(s) == 0x0000
        s.sendall(p_data(CT_ID, 0x03, c_store_rq(ds.SOPClassUID, ds.SOPInstanceUID, 6)))
        s.sendall(p_data(CT_ID, 0x02, body))
        assert status_of(s) == 0x0000
    assert len(_stored(receiver)) == 1


def _response(sock) -> dict[int, bytes]:
    """The next DIMSE response's command elements."""
    pdu = read_pdu(sock, 10)
    assert pdu is not None and pdu[0] == 0x04, f"no response: {pdu!r}"
    return parse_command(pdu[1][6:])


@pytest.mark.parametrize("element, value", [
    (0x1000, b"1.2.\xc3\xa9.3"), (0x1000, b"1.2.3\x07"), (0x1000, b"1." + b"2" * 70),
    (0x1000, b""), (0x1000, None), (0x0002, b"1.2.840.10008.5.1.4.1.1.\xb2"), (0x0002, None)],
    ids=["non-ascii", "control", "too-long", "empty", "absent", "class-non-ascii",
         "class-absent"])
def test_a_c_store_whose_command_uid_is_not_a_uid_is_refused_and_recorded(
        node, covid_study, caplog, element, value):
    """The node can neither file it nor name it in its answer, which leaves the UID out
    (it is optional there: PS3.7 9.3.1.2); the association goes on."""
    receiver, store = node
    path = covid_study.files[0]
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    elements = {0x0002: ds.SOPClassUID.encode(), 0x0100: b"\x01\x00", 0x0110: b"\x01\x00",
                0x0800: b"\x00\x00", 0x1000: ds.SOPInstanceUID.encode()}
    if value is None:
        del elements[element]
    else:
        elements[element] = value
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as s:
        associate(s)
        s.sendall(p_data(CT_ID, 0x03, command(sorted(elements.items()))))
        s.sendall(p_data(CT_ID, 0x02, data_set(path)))
        response = _response(s)
        assert response[0x0900] == b"\x00\xc0"              # 0xC000 Cannot Understand
        assert element not in response                    # what is not a UID is left out
        s.sendall(p_data(VERIFICATION_ID, 0x03, c_echo_rq(2)))
        assert status_of(s) == 0x0000                     # the association goes on
    [line] = [r.getMessage() for r in caplog.records if "refusing a C-STORE" in r.getMessage()]
    what = "Affected SOP Instance UID" if element == 0x1000 else "Affected SOP Class UID"
    assert f"the command's {what}" in line and "codec" not in line, line
    assert not any(r.exc_info for r in caplog.records)
    [incident] = store.incidents()
    assert what in incident.detail and incident.origin == "CT1"
    assert store.counts()["instances"] == 0 and _stored(receiver) == []


def test_a_c_store_that_says_no_data_set_follows_is_aborted_at_once(node, covid_study, caplog):
    """Its data set would never come (or come unannounced): the node once waited for it
    until the association's timeout, and answered nothing."""
    receiver, store = node
    ds = pydicom.dcmread(covid_study.files[0], stop_before_pixels=True)
    rq = command([(0x0002, ds.SOPClassUID.encode()), (0x0100, b"\x01\x00"),
                  (0x0110, b"\x01\x00"), (0x0800, b"\x01\x01"),
                  (0x1000, ds.SOPInstanceUID.encode())])
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as s:
        associate(s)
        s.sendall(p_data(CT_ID, 0x03, rq))
        assert ending(s, 2.0) == "abort"
    assert "a C-STORE-RQ whose command says no data set follows" in caplog.text
    assert store.counts()["instances"] == 0


def test_a_sender_refused_again_and_again_fills_no_table(tmp_path):
    """Each refusal is an incident for the admin, up to IncidentBudget's rate per sender;
    the refusals beyond are counted and said in the next incident recorded."""
    from pacs_node.storage import IncidentBudget, InstanceStorage
    from store.api import JobStore

    now = [0.0]
    storage = InstanceStorage(JobStore(f"sqlite:///{tmp_path}/db"), tmp_path / "data",
                              min_free_disk_mb=1)
    storage.incident_budget = IncidentBudget(per_minute=3, clock=lambda: now[0])
    for i in range(10):
        storage.record_refusal("FLOOD", f"refusal {i}")
    storage.record_refusal("CT1", "another sender's")
    assert [i.detail for i in storage.store.incidents()][::-1] == [
        "refusal 0", "refusal 1", "refusal 2", "another sender's"]
    now[0] = 61.0
    storage.record_refusal("FLOOD", "refusal 10")
    newest = storage.store.incidents()[0]
    assert newest.detail.startswith("refusal 10 (and 7 refusals of this sender before it")


@pytest.mark.parametrize("negotiated, sent", [(IMPLICIT, EXPLICIT), (EXPLICIT, IMPLICIT)])
def test_a_data_set_in_another_vr_than_its_context_says_is_refused(
        node, covid_study, tmp_path, negotiated, sent):
    """Stored under the transfer syntax it came on, it was a file DCMTK cannot read and
    pydicom reads by guessing (with a warning at every later reading)."""
    receiver, store = node
    ds = pydicom.dcmread(covid_study.files[0])
    ds.file_meta.TransferSyntaxUID = sent
    ds.save_as(tmp_path / "sent.dcm", enforce_file_format=True)
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as s:
        assert associate(s, associate_rq(ct_syntax=negotiated))["contexts"][CT_ID] == 0
        s.sendall(p_data(CT_ID, 0x03, c_store_rq(ds.SOPClassUID, ds.SOPInstanceUID)))
        s.sendall(p_data(CT_ID, 0x02, data_set(tmp_path / "sent.dcm")))
        assert status_of(s) == 0xC000
    assert store.counts()["instances"] == 0 and _stored(receiver) == []
    [incident] = store.incidents()
    assert incident.sop_instance_uid == ds.SOPInstanceUID
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as s:
        associate(s, associate_rq(ct_syntax=sent))            # the same, as it says
        s.sendall(p_data(CT_ID, 0x03, c_store_rq(ds.SOPClassUID, ds.SOPInstanceUID)))
        s.sendall(p_data(CT_ID, 0x02, data_set(tmp_path / "sent.dcm")))
        assert status_of(s) == 0x0000


def test_a_c_store_naming_its_instance_twice_is_aborted(node, covid_study, caplog):
    """PS3.5 7.1: an element at most once. Two Affected SOP Instance UIDs (the data set's,
    and another's after it) were read as the last one: a C-STORE the node filed under
    one UID while whatever read the first saw another."""
    receiver, store = node
    ds = pydicom.dcmread(covid_study.files[0], stop_before_pixels=True)
    rq = command([(0x0002, ds.SOPClassUID.encode()), (0x0100, b"\x01\x00"),
                  (0x0110, b"\x01\x00"), (0x0800, b"\x00\x00"),
                  (0x1000, ds.SOPInstanceUID.encode()), (0x1000, generate_uid().encode())])
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as s:
        associate(s)
        s.sendall(p_data(CT_ID, 0x03, rq))             # aborted before its data set
        assert ending(s, 5.0) == "abort"
    assert "command element (0000,1000) given twice" in caplog.text
    assert store.counts()["instances"] == 0 and _stored(receiver) == []
    # elements out of order are no lie: the same instance, its elements reversed, is stored
    rq = command([(0x0800, b"\x00\x00"), (0x1000, ds.SOPInstanceUID.encode()),
                  (0x0110, b"\x01\x00"), (0x0100, b"\x01\x00"),
                  (0x0002, ds.SOPClassUID.encode())])
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as s:
        associate(s)
        s.sendall(p_data(CT_ID, 0x03, rq))
        s.sendall(p_data(CT_ID, 0x02, data_set(covid_study.files[0])))
        assert status_of(s) == 0x0000
    assert store.counts()["instances"] == 1
