"""Data sets whose elements are read one way by the node and another by every later reader.

The node files an instance by the UIDs near the start of its data set; pydicom (the
worker, the console, a PACS) reads the whole and keeps the last of an element given twice;
and it takes group 0002 elements at the start of a data set for file meta. A second Study
Instance UID after the pixel data, or a "(0002,0010) deflated" heading an explicit VR data
set, each acknowledged, had the node file one thing and analyse (or inflate) another.
Each is refused with 0xC000 (PS3.5 7.1; PS3.10 7.1), nothing stored; honest nesting is
stored.
"""

from __future__ import annotations

import re
import struct
import zlib

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from pacs_node.structure import MAX_DEPTH

from elements import element, implicit, part10, tag
from raw_peer import data_set, store_raw
from stow_client import refused_then_stored


@pytest.fixture
def node(start_node):
    return start_node(allowed_calling_aets=["CT1"])


def _deflated(body: bytes) -> bytes:
    """(0002,0010) Deflated, then ``body`` and 8 MiB of zeros deflated (8 KiB)."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    inner = body + element(0x7FE1, 0x1000, b"OB", bytes(8 << 20))
    return (element(0x0002, 0x0010, b"UI", DeflatedExplicitVRLittleEndian.encode())
            + deflate.compress(inner) + deflate.flush())


def _store(receiver, ds: Dataset, body: bytes) -> int:
    return store_raw(receiver.port, ds.SOPClassUID, ds.SOPInstanceUID, body)


def _stored(receiver) -> list:
    return [p for p in receiver.storage.incoming.rglob("*") if p.is_file()]


@pytest.mark.parametrize("lie", ["study after pixels", "pixel data repeated",
                                 "out of order", "meta saying deflated"])
def test_a_data_set_whose_elements_lie_is_refused(node, covid_study, lie, caplog):
    receiver, store = node
    path = covid_study.files[0]
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    body = data_set(path)                                    # explicit VR little endian
    other = generate_uid().encode()
    if lie == "study after pixels":             # pydicom keeps the last: another study
        body += element(0x7FE1, 0x0010, b"LO", b"X") + element(0x0020, 0x000D, b"UI", other)
    elif lie == "pixel data repeated":
        body += element(0x7FE0, 0x0010, b"OB", b"")         # a second Pixel Data, empty
    elif lie == "out of order":
        body = element(0x0020, 0x000D, b"UI", other) + body
    else:                                       # every reader would inflate what follows
        body = _deflated(body)
    assert _store(receiver, ds, body) == 0xC000
    assert store.counts()["instances"] == 0 and _stored(receiver) == []
    [incident] = store.incidents()
    assert "PS3" in incident.detail and incident.origin == "CT1"
    assert _store(receiver, ds, data_set(path)) == 0x0000     # the honest one after it


def test_a_stow_part_with_file_meta_after_its_group_length_is_refused(tmp_path, covid_study):
    """The group length bounds the file meta the node reads; pydicom reads on while the
    group is 0002: a (0002,0010) just after it made the part "deflated" to every reader."""
    raw = covid_study.files[0].read_bytes()
    meta_end = 144 + int.from_bytes(raw[140:144], "little")
    refused_then_stored(tmp_path, raw[:meta_end] + _deflated(raw[meta_end:]), raw)


def _nested(ds: Dataset, depth: int) -> None:
    """``depth`` Content Sequences, each in the one before, all of undefined length (as
    DCMTK writes them), with items of undefined length."""
    item = Dataset()
    item.CodeMeaning = "innermost"
    for level in range(depth):
        outer = ds if level == depth - 1 else Dataset()
        outer.ContentSequence = Sequence([item])
        outer["ContentSequence"].is_undefined_length = True
        item.is_undefined_length_sequence_item = True
        item = outer


@pytest.mark.parametrize("depth, status", [(MAX_DEPTH, 0x0000), (MAX_DEPTH + 1, 0xC000)])
def test_sequences_of_undefined_length_are_walked_to_a_depth(node, covid_study, depth,
                                                               status):
    """Sequences and items of undefined length (as DCMTK writes them) are walked item by
    item to find the element after them; deeper than MAX_DEPTH is refused."""
    receiver, store = node
    ds = pydicom.dcmread(covid_study.files[0])
    _nested(ds, depth)
    ds.SOPInstanceUID = generate_uid()
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    body = buffer.getvalue()
    assert body.count(b"\xfe\xff\xdd\xe0") == depth           # one delimiter a sequence
    assert _store(receiver, ds, body) == status
    assert store.counts()["instances"] == (status == 0)


@pytest.mark.parametrize("lie", ["study", "instance"])
def test_a_job_whose_files_read_as_other_uids_is_skipped(tmp_path, study_factory, lie):
    """The second lock: should a data set ever be filed under UIDs pydicom reads otherwise
    (its study, or its SOP Instance UID), the worker, reading as pydicom does, skips the
    series instead of sending results about one patient's study into another's, or
    results that reference instances the node never received."""
    import datetime as dt
    import shutil

    from config import load_config
    from pacs_node.worker import JobRunner
    from store.api import JobStore, ReceivedInstance
    from store.models import utcnow

    class NeverCalled:
        def analyze(self, data):
            raise AssertionError("a series read as other UIDs was analysed")

    toml = tmp_path / "node.toml"
    toml.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n[assembly]\nmin_slices = 1\n'
                    f'[store]\nurl = "sqlite:///{tmp_path / "db"}"\n')
    config = load_config(toml, environ={})
    store = JobStore(config.store.url)
    filed_under = generate_uid()                # what a fooled receiver would have read
    for k, f in enumerate(study_factory("covid", 1, 12).files):
        copy = tmp_path / f.name
        shutil.copy(f, copy)
        ds = pydicom.dcmread(copy, stop_before_pixels=True)
        assert ds.StudyInstanceUID != filed_under
        study, instance = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
        if lie == "study":
            study = filed_under
        elif k == 5:                            # one instance filed under another UID
            instance = filed_under
        store.record_instance(ReceivedInstance(
            instance, str(ds.SOPClassUID), str(ds.SeriesInstanceUID), study, "CT",
            str(copy), 1, "1.2.840.10008.1.2.1"))
    [series] = store.complete_ready(0, now=utcnow() + dt.timedelta(seconds=1))
    store.queue_job(series.id)
    JobRunner(config, store, NeverCalled()).run_job(store.claim_job())
    [job] = store.jobs("failed")
    assert job.error == {
        "study": "skipped: its instances read as another study than the one they were "
                 "received as",
        "instance": "skipped: its instances read as SOP instances other than the ones they "
                    "were received as"}[lie]


# --- the walk reads where pydicom reads ----------------------------------------------------
_HEAD = (element(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.2")
         + element(0x0008, 0x0018, b"UI", b"1.2.3"))
_TAIL = (element(0x0020, 0x000D, b"UI", b"1.1.1") + element(0x0020, 0x000E, b"UI", b"1.1.2")
         + element(0x7FE0, 0x0010, b"OB", bytes(8)) + element(0x7FE1, 0x0010, b"LO", b"X")
         + element(0x0020, 0x000D, b"UI", b"9.9.9.9"))        # pydicom's study: the last


def _group_length_into_a_value() -> bytes:
    """The group length ends inside a Manufacturer whose value spells an OB element
    covering the rest: a walk from there saw one element; pydicom reads two studies."""
    hidden = struct.pack("<HH2sHL", 0x0009, 0x0010, b"OB", 0, len(_TAIL))
    manufacturer = struct.pack("<HH2sH", 0x0008, 0x0070, b"LO", len(hidden)) + hidden
    meta = len(element(0x0002, 0x0010, b"UI", b"1.2.840.10008.1.2.1"))
    return part10(_HEAD + manufacturer + _TAIL, group_length=meta + len(_HEAD) + 8)


def _un_item_read_as_pydicom_reads_it() -> bytes:
    """A private UN of undefined length whose item pydicom reads in explicit VR (its first
    element's bytes 4-5 spell SH): read as implicit, as PS3.5 6.2.2 says, (0009,1011) SH
    of length 0 was a length of 0x4853, and the walk landed in an OB value holding fake
    delimiters and an element covering the rest."""
    rest = tag(0xFFFE, 0xE00D, 0) + tag(0xFFFE, 0xE0DD, 0) + _TAIL
    fake = (tag(0xFFFE, 0xE00D, 0) + tag(0xFFFE, 0xE0DD, 0)
            + struct.pack("<HH2sHL", 0x7FE1, 0x1000, b"OB", 0, 1 + len(rest)) + b"\0")
    ob_value = b"\0" * (8 + 0x4853 - 20) + fake
    item = (struct.pack("<HH2sH", 0x0009, 0x1011, b"SH", 0)
            + struct.pack("<HH2sHL", 0x0009, 0x1012, b"OB", 0, len(ob_value)) + ob_value)
    return part10(_HEAD + element(0x0008, 0x0060, b"CS", b"CT")
                   + element(0x0009, 0x0010, b"LO", b"ACME")
                   + struct.pack("<HH2sHL", 0x0009, 0x1010, b"UN", 0, 0xFFFFFFFF)
                   + tag(0xFFFE, 0xE000, 0xFFFFFFFF) + item + rest)


def _many_empty_elements_deflated() -> bytes:
    inner = struct.pack("<HH2sH", 0x0008, 0x0100, b"SH", 0) * 200_000
    data = (struct.pack("<HH2sHL", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF)
            + tag(0xFFFE, 0xE000, 0xFFFFFFFF) + inner + tag(0xFFFE, 0xE00D, 0)
            + tag(0xFFFE, 0xE0DD, 0))
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return part10(deflate.compress(data) + deflate.flush(), DeflatedExplicitVRLittleEndian)


def _an_element_without_a_vr() -> bytes:
    """VR bytes 0C 00: pydicom reads the element as implicit (length 12), skips the next
    element's header and reads its OB value as top-level elements: another study."""
    hidden = element(0x0020, 0x000D, b"UI", b"9.9.9")
    return part10(_HEAD + element(0x0020, 0x000D, b"UI", b"1.1")
                   + struct.pack("<HH2sH", 0x0029, 0x0010, b"\x0c\x00", 0)
                   + element(0x0029, 0x1000, b"OB", hidden))


def _an_item_of_an_implicit_data_set_spelling_ob() -> bytes:
    """In implicit VR pydicom reads every item as implicit; an item whose first length is
    'OB\0\0' had been read by the walk as an explicit OB swallowing a later study."""
    hidden = implicit(0x0020000D, b"9.9.9\0")
    value = struct.pack("<L", 0x424F + 12 + len(hidden)) + b"\0" * (0x424F - 4)
    item = (struct.pack("<HH", 0x0008, 0x0100) + b"OB\0\0" + value
            + tag(0xFFFE, 0xE00D, 0) + tag(0xFFFE, 0xE0DD, 0) + hidden
            + tag(0xFFFE, 0xE00D, 0) + tag(0xFFFE, 0xE0DD, 0))
    return part10(implicit(0x00080016, b"1.2.840.10008.5.1.4.1.1.2\0")
                   + implicit(0x0020000D, b"1.1\0")
                   + implicit(0x00400275, length=0xFFFFFFFF) + tag(0xFFFE, 0xE000, 0xFFFFFFFF)
                   + item, "1.2.840.10008.1.2")


def _pixel_data_with_an_item_of_undefined_length() -> bytes:
    """pydicom scans such an encapsulated value for the first delimiter's bytes."""
    nested = element(0x0008, 0x0100, b"OB", tag(0xFFFE, 0xE0DD, 0)
                      + element(0x0020, 0x000D, b"UI", b"9.9.9"))
    return part10(_HEAD + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
                   + tag(0xFFFE, 0xE000, 0xFFFFFFFF) + nested + tag(0xFFFE, 0xE00D, 0)
                   + tag(0xFFFE, 0xE0DD, 0))


def _a_file_meta_element_without_a_vr() -> bytes:
    """pydicom reads it as implicit VR, 131,072 bytes long, and finds a transfer syntax
    ("deflated") where the node saw none."""
    part = bytearray(part10(_HEAD + _TAIL[:-30]))
    meta_element = struct.pack("<HH2sH", 0x0002, 0x0001, b"\0\0", 2) + b"\0\1"
    return bytes(part[:132]) + meta_element + bytes(part[144:])   # no group length


def _a_file_meta_past_64_kib() -> bytes:
    """Its elements were read from the first 64 KiB only: a long-VR element whose header
    ended at the mark had its length read as 0, and the walk began inside its value
    (a decoy data set) while pydicom read on to a second file meta and data set."""
    part = part10(_HEAD + _TAIL[:-30])
    padding = struct.pack("<HH2sHL", 0x0002, 0x0001, b"OB", 0, 70_000) + bytes(70_000)
    return part[:132] + padding + part[144:]                       # no group length


def _many_empty_items_deflated() -> bytes:
    data = (struct.pack("<HH2sHL", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF)
            + tag(0xFFFE, 0xE000, 0) * 131_000 + tag(0xFFFE, 0xE0DD, 0))
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return part10(deflate.compress(data) + deflate.flush(), DeflatedExplicitVRLittleEndian)


@pytest.mark.parametrize("build, refused", [
    (_group_length_into_a_value, "file meta group length ends at byte"),
    (lambda: part10(_HEAD + _TAIL[:-30], group_length=2**31), "file meta group length"),
    (_un_item_read_as_pydicom_reads_it, "(0020,000D) is out of order"),
    (_many_empty_elements_deflated, "more than 100000 elements"),
    (lambda: part10(_HEAD + _TAIL[:-30] + bytes(4096)), None),  # zeros after its end
    (lambda: part10(_HEAD + _TAIL[:-30], "1.2.840.113619.5.2"), "not one the node knows"),
    (_an_element_without_a_vr, "(0029,0010) has no VR (bytes 0c00)"),
    (_an_item_of_an_implicit_data_set_spelling_ob, "(0020,000D) is out of order"),
    (_pixel_data_with_an_item_of_undefined_length, "an item of undefined length"),
    (_a_file_meta_element_without_a_vr, "file meta element (0002,0001) has no VR"),
    (_many_empty_items_deflated, "more than 100000 elements"),
    (_a_file_meta_past_64_kib, "file meta does not end within its first 65536 bytes"),
], ids=["group-length-into-a-value", "group-length-past-the-file", "un-item",
        "many-elements", "zero-padding", "unknown-syntax", "no-vr", "implicit-item",
        "undefined-fragment", "meta-without-vr", "many-items", "meta-past-64-kib"])
def test_the_walk_reads_the_data_set_where_pydicom_reads_it(tmp_path, build, refused):
    from pacs_node.structure import check_elements

    path = tmp_path / "part.dcm"
    path.write_bytes(build())
    if refused is None:
        check_elements(path)
    else:
        with pytest.raises(ValueError, match=re.escape(refused)):
            check_elements(path)
