"""The Storage SCP, driven by DCMTK's storescu and echoscu as a modality would (and by a raw
peer where a modality may do what DCMTK does not)."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess

import pydicom
import pytest

from pacs_node.dimse import iter_elements
from store.models import SeriesState

from conftest import require_tool
from raw_peer import CT_ID, associate, c_store_rq, data_set, p_data, status_of

ENV = {**os.environ, "TCP_NODELAY": "1"}  # DCMTK leaves Nagle on otherwise


@pytest.fixture
def node(start_node):
    return start_node(allowed_calling_aets=["CT1", "CT2"])


def storescu(port: int, files, aet: str = "CT1", *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("storescu"), "-v", *options, "-aet", aet, "-aec",
                           "LUNGSYS", "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, env=ENV, timeout=120)


def test_echo(node):
    receiver, _ = node
    proc = subprocess.run([require_tool("echoscu"), "-aet", "CT1", "-aec", "LUNGSYS",
                           "127.0.0.1", str(receiver.port)], capture_output=True, env=ENV,
                          timeout=30)
    assert proc.returncode == 0


def test_instances_are_on_disk_and_recorded_when_acknowledged(node, study_factory):
    receiver, store = node
    study = study_factory("covid", 1, 24)
    proc = storescu(receiver.port, study.files[:6])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("Received Store Response (Success)") == 6
    [series] = store.series()     # acknowledged, so recorded ...
    assert series.instance_count == 6 and series.state == SeriesState.receiving
    stored = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in store.instance_paths(series.id)}
    for f in study.files[:6]:     # ... and on disk, pixels as sent
        original = pydicom.dcmread(f)
        copy = pydicom.dcmread(stored[str(original.SOPInstanceUID)])
        assert copy.PixelData == original.PixelData
        assert copy.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert not list(receiver.storage.incoming.rglob("*.tmp"))


def test_duplicates_are_stored_once_and_shuffled_associations_make_one_series(node,
                                                                             study_factory):
    receiver, store = node
    study = study_factory("covid", 1, 24)
    files = list(study.files)
    random.Random(1).shuffle(files)
    for part in (files[:8], files[8:16], files[16:] + files[:3]):   # three associations
        assert storescu(receiver.port, part).returncode == 0
    [series] = store.series()
    assert series.instance_count == 24 and series.expected_instances == 24
    assert store.counts()["instances"] == 24


def test_calling_aet_outside_the_allow_list_is_rejected(node, study_factory):
    receiver, store = node
    proc = storescu(receiver.port, study_factory("covid", 1, 24).files[:1], aet="INTRUDER")
    assert proc.returncode != 0
    assert "Association Rejected" in proc.stderr + proc.stdout
    assert store.counts()["instances"] == 0


def test_low_disk_is_out_of_resources(tmp_path, start_node, study_factory):
    free_mb = shutil.disk_usage(tmp_path).free // (1024 * 1024)
    receiver, store = start_node(min_free_disk_mb=free_mb + 10_000)
    proc = storescu(receiver.port, study_factory("covid", 1, 24).files[:1])
    assert "Refused: OutOfResources" in proc.stderr  # DCMTK's name for 0xA700
    assert store.counts()["instances"] == 0


@pytest.mark.parametrize("calling, sop_uid", [("CT1", "1.2.3.4"), ("", "1.2.3.45"),
                                              ("MODALITY_LONG_AE", "1.2.840.113619.2.55.3.1")])
def test_the_hand_written_file_meta_matches_pydicoms(calling, sop_uid):
    """The Part-10 header the SCP writes, byte for byte what pydicom would write."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

    from pacs_node.scp import _file_header

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.70"
    meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
    if calling:
        meta.SourceApplicationEntityTitle = calling
    expected = DicomBytesIO()
    expected.is_little_endian, expected.is_implicit_VR = True, False
    expected.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(expected, meta, enforce_standard=True)
    pad = b"\x00" if len(sop_uid) % 2 else b""
    command = {0x0002: b"1.2.840.10008.5.1.4.1.1.2\x00", 0x1000: sop_uid.encode() + pad}
    assert _file_header(command, "1.2.840.10008.1.2.4.70", calling) == expected.getvalue()


def test_fsync_mode_stores_the_same(start_node, study_factory):
    receiver, store = start_node(sync=True)
    assert storescu(receiver.port, study_factory("covid", 1, 24).files[:3]).returncode == 0
    assert store.counts()["instances"] == 3
    assert not list(receiver.storage.partial.iterdir())


@pytest.mark.parametrize("tool, flag, propose", [
    ("dcmconv", "+ti", "-xi"), ("dcmconv", "+tb", "-xb"), ("dcmconv", "+td", "-xd"),
    ("dcmcjpls", None, "-xt")])
def test_every_encoding_is_stored_as_sent_and_recorded(node, study_factory, tmp_path, tool,
                                                       flag, propose):
    """Implicit, big endian, deflated and JPEG-LS instances: the header is read
    from the first fragment, or from the file where it cannot be."""
    receiver, store = node
    source = study_factory("covid", 1, 24).files[0]
    sent = tmp_path / "sent.dcm"
    args = [require_tool(tool), *([flag] if flag else []), str(source), str(sent)]
    subprocess.run(args, check=True, capture_output=True, timeout=60)
    proc = storescu(receiver.port, [sent], "CT1", propose)   # sent as encoded, no conversion
    assert proc.returncode == 0 and "Success" in proc.stderr, proc.stderr
    [series] = store.series()
    [path] = store.instance_paths(series.id)
    original = pydicom.dcmread(sent)
    assert series.series_instance_uid == original.SeriesInstanceUID
    copy = pydicom.dcmread(path)
    assert copy.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert (copy.pixel_array == pydicom.dcmread(source).pixel_array).all()


@pytest.mark.parametrize("cut_in", ["SeriesInstanceUID", "ImagesInAcquisition"])
def test_a_data_set_split_inside_a_value_is_filed_under_the_whole_value(
        node, study_factory, cut_in):
    """PS3.8 E.2 lets a sender end a PDV at any byte: one ending inside the Series Instance
    UID once filed the instance under half of it (and Images in Acquisition 300 as 3)."""
    receiver, store = node
    path = study_factory("covid", 1, 24).files[0]
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ds_body = data_set(path)
    tag = pydicom.tag.Tag(cut_in)
    [at] = [pos + 1 for element, pos, _ in iter_elements(ds_body, implicit_vr=False)
            if element == tag]                      # one byte into the value
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as s:
        associate(s)
        s.sendall(p_data(CT_ID, 0x03, c_store_rq(ds.SOPClassUID, ds.SOPInstanceUID)))
        s.sendall(p_data(CT_ID, 0x00, ds_body[:at]))
        s.sendall(p_data(CT_ID, 0x02, ds_body[at:]))
        assert status_of(s) == 0x0000
    [series] = store.series()
    assert series.series_instance_uid == ds.SeriesInstanceUID
    assert series.expected_instances == ds.ImagesInAcquisition == 24
    [stored] = [p for p in receiver.storage.incoming.rglob("*.dcm")]
    assert stored.parent.name == ds.SeriesInstanceUID


def test_spaces_around_the_uids_of_a_command_and_its_data_set_are_padding(
        node, study_factory, tmp_path):
    """pydicom reads ' 1.2.3 ' as '1.2.3'; so do the node's command and header readers,
    so the command and the data set agree and the instance is filed under '1.2.3'."""
    receiver, store = node
    ds = pydicom.dcmread(study_factory("covid", 1, 24).files[0])
    uid = ds.SOPInstanceUID
    ds.SOPInstanceUID = f"9{uid}"                 # as long as " UID", which pydicom would
    ds.save_as(tmp_path / "sent.dcm")             # not write
    body = data_set(tmp_path / "sent.dcm").replace(f"9{uid}".encode(), f" {uid}".encode())
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as s:
        associate(s)
        s.sendall(p_data(CT_ID, 0x03, c_store_rq(ds.SOPClassUID, f" {uid}")))
        s.sendall(p_data(CT_ID, 0x02, body))
        assert status_of(s) == 0x0000
    [stored] = receiver.storage.incoming.rglob("*.dcm")
    assert stored.name == f"{uid}.dcm" and pydicom.dcmread(stored).SOPInstanceUID == uid


def test_the_largest_request_a_pacs_makes_is_accepted_and_a_larger_one_aborted(node):
    """128 presentation contexts with every transfer syntax pydicom knows (134 KiB) are
    negotiated; a request above MAX_ASSOCIATE_RQ (160 KiB), whose decoding alone held a
    CPU for a third of a second, is aborted before it is read."""
    from pydicom.uid import AllTransferSyntaxes
    from pynetdicom import AllStoragePresentationContexts, build_context
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification

    from pacs_node.acse import MAX_ASSOCIATE_RQ
    from raw_peer import ending

    def request(syntaxes: list[str]) -> bytes:
        primitive = A_ASSOCIATE()
        primitive.application_context_name = "1.2.840.10008.3.1.1.1"
        primitive.calling_ae_title, primitive.called_ae_title = "CT1", "LUNGSYS"
        contexts = []
        for i, cx in enumerate(AllStoragePresentationContexts[:128]):
            contexts.append(build_context(cx.abstract_syntax, syntaxes))
            contexts[-1].context_id = 2 * i + 1
        primitive.presentation_context_definition_list = contexts
        length = MaximumLengthNotification()
        length.maximum_length_received = 16384
        primitive.user_information = [length]
        pdu = A_ASSOCIATE_RQ()
        pdu.from_primitive(primitive)
        return pdu.encode()

    receiver, _ = node
    everything = request(list(AllTransferSyntaxes))
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as s:
        accepted = associate(s, everything)["contexts"]
        assert len(accepted) == 128 and set(accepted.values()) == {0}
    private = [f"1.2.826.0.1.3680043.9.9999.{n}" for n in range(8)]
    too_large = request(list(AllTransferSyntaxes) + private)
    assert len(everything) < MAX_ASSOCIATE_RQ < len(too_large) < 2 * MAX_ASSOCIATE_RQ
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as s:
        s.sendall(too_large)
        assert ending(s, 5.0) == "abort"


def test_a_presentation_context_id_proposed_twice_is_aborted(node):
    """PS3.8 7.1.1.13: the requestor gives each context an unused id. Context 3 proposed as
    CT and again as Secondary Capture was accepted twice, the node taking the second: a
    CT instance the peer sent on context 3 was then answered as one of another class."""
    from raw_peer import SC_ID, associate_rq, ending, pdu_items

    receiver, store = node
    request = bytearray(associate_rq(secondary_capture=True))
    contexts = [pos for pos, item, _ in pdu_items(bytes(request), 74, len(request))
                if item == 0x20]
    assert request[contexts[-1] + 4] == SC_ID
    request[contexts[-1] + 4] = 3
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as s:
        s.sendall(bytes(request))
        assert ending(s, 5.0) == "abort"
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as s:
        assert set(associate(s, associate_rq(secondary_capture=True))["contexts"]) == {1, 3, 5}
