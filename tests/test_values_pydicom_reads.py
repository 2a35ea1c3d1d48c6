"""Values that pydicom reads into more than the node looked at, or as another value.

A fourth hostile round found the element walk (pacs_node.structure) skipping every value
of defined length: a sequence of defined length with a million empty items (12 KB
deflated) passed and cost pydicom 734 MB and 17 s when the worker touched it; one nested
2,000 deep crashed ``str(ds)``. A Study Instance UID sent as OB was filed under its text
and read by pydicom as bytes; a transfer syntax with a leading space, or in VR OB, had the
node check the data set one way (plain, or inflated) and pydicom read it the other; zeros
after a data set's end were accepted at any length (60 MiB deflated into 61 KB: 15 s of
pydicom per read). Each is refused (0xC000; STOW-RS: Failure Reason 0xC000); the honest
forms are stored.
"""

from __future__ import annotations

import re
import socket
import struct
import subprocess

import pydicom
import pytest

from pacs_node.structure import MAX_DEPTH, MAX_ELEMENTS, MAX_PADDING, check_elements

from elements import element, implicit, item, part10, tag
from raw_peer import CT_ID, associate, c_store_rq, data_set, p_data, status_of
from stow_client import multipart, post

IMPLICIT = "1.2.840.10008.1.2"
_HEAD = (element(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.2")
         + element(0x0008, 0x0018, b"UI", b"1.2.3"))
_SERIES = element(0x0020, 0x000E, b"UI", b"1.1.2")
_UIDS = element(0x0020, 0x000D, b"UI", b"1.1.1") + _SERIES


def _nested_defined(depth: int, vr: bytes = b"SQ") -> bytes:
    """``depth`` Referenced Image Sequences of defined length, each in the one before."""
    inner = b""
    for _ in range(depth):
        inner = element(0x0008, 0x1140, vr, item(inner))
    return inner


def _many_items() -> bytes:
    return element(0x0008, 0x1140, b"SQ", tag(0xFFFE, 0xE000, 0) * MAX_ELEMENTS)


def _private_sequence_by_its_creator() -> bytes:
    """Implicit VR: 'FDMS 1.0' (0019,xxA0) is a sequence in pydicom's private dictionary,
    so pydicom reads its value as items whatever their tag says; this one's first "item"
    is tagged (0008,0100) and holds a Study Instance UID."""
    hidden = implicit(0x0020000D, b"9.9.9\0")
    return part10(implicit(0x00080016, b"1.2.840.10008.5.1.4.1.1.2\0")
                  + implicit(0x00080018, b"1.2.3\0") + implicit(0x00190010, b"FDMS 1.0")
                  + implicit(0x001910A0, tag(0x0008, 0x0100, len(hidden)) + hidden)
                  + implicit(0x0020000D, b"1.1.1\0"), IMPLICIT)


def _honest_sequences_of_defined_length() -> bytes:
    image = item(element(0x0008, 0x1150, b"UI", b"1.2.840.10008.5.1.4.1.1.2")
                 + element(0x0008, 0x1155, b"UI", b"1.2.4"))
    return part10(_HEAD + element(0x0008, 0x1140, b"SQ", image + image)
                  + element(0x0008, 0x1150, b"UN", b"")       # UN, empty
                  + element(0x0009, 0x0010, b"LO", b"ACME")
                  + element(0x0009, 0x1010, b"UN", item(element(0x0009, 0x1011, b"SH", b"x")))
                  + _UIDS)


def _syntax(value: bytes, vr: bytes = b"UI") -> bytes:
    """A file meta whose transfer syntax is ``value`` in ``vr``."""
    meta = element(0x0002, 0x0010, vr, value)
    return (b"\0" * 128 + b"DICM" + struct.pack("<HH2sHL", 2, 0, b"UL", 4, len(meta)) + meta
            + _HEAD + _UIDS)


@pytest.mark.parametrize("build, refused", [
    (lambda: part10(_HEAD + _many_items() + _UIDS), f"more than {MAX_ELEMENTS} elements"),
    (lambda: part10(_HEAD + _nested_defined(MAX_DEPTH + 1) + _UIDS),
     f"nest deeper than {MAX_DEPTH}"),
    (lambda: part10(_HEAD + _nested_defined(MAX_DEPTH) + _UIDS), None),
    (lambda: part10(_HEAD + _nested_defined(MAX_DEPTH + 1, b"UN") + _UIDS),  # pydicom: SQ
     f"nest deeper than {MAX_DEPTH}"),
    (lambda: part10(_HEAD + element(0x0008, 0x1140, b"SQ", item(b"") + b"\0\0\0\0")
                    + _UIDS), "items do not fill its length"),
    (lambda: part10(_HEAD + element(0x0008, 0x1140, b"SQ", item(
        element(0x0008, 0x1150, b"UI", b"1.2")[:-2])) + _UIDS), "runs past the end"),
    (_private_sequence_by_its_creator, "a sequence holds (0008,0100), not items"),
    (_honest_sequences_of_defined_length, None),
    (lambda: part10(_HEAD + element(0x0020, 0x000D, b"OB", b"1.1.1") + _SERIES),
     "(0020,000D) comes as OB, not UI"),
    (lambda: part10(_HEAD + element(0x0020, 0x000D, b"UN", b"1.1.1") + _SERIES), None),
    (lambda: _syntax(b" 1.2.840.10008.1.2.1"), "transfer syntax (0002,0010) is not a UID"),
    (lambda: _syntax(b"1.2.840.10008.1.2.1\t"), "transfer syntax (0002,0010) is not a UID"),
    (lambda: _syntax(b"1.2.840.10008.1.2.1.99\0", b"OB"),
     "transfer syntax (0002,0010) is not a UID of VR UI"),
    (lambda: _syntax(b"1.2.840.10008.1.2.1\0"), None),
    (lambda: part10(_HEAD + _UIDS + bytes(MAX_PADDING + 2)),
     f"more than {MAX_PADDING} bytes follow its data set's end"),
    (lambda: part10(_HEAD + _UIDS + bytes(MAX_PADDING)), None),
    (lambda: part10(_HEAD + element(0x0019, 0x0010, b"LO", b"FDMS\x1b(B 1.0") + _UIDS),
     "private creator (0019,0010) holds control characters"),   # ISO 2022: 'FDMS 1.0'
], ids=["many-items", "deep", "deep-enough", "deep-as-un", "items-short", "item-overruns",
        "private-by-creator", "honest", "uid-as-ob", "uid-as-un", "syntax-space",
        "syntax-tab", "syntax-as-ob", "syntax-padded", "long-padding", "padding",
        "creator-escaped"])
def test_values_are_walked_as_pydicom_reads_them(tmp_path, build, refused):
    path = tmp_path / "part.dcm"
    path.write_bytes(build())
    if refused is None:
        check_elements(path)
        pydicom.dcmread(path).walk(lambda ds, elem: None)        # and pydicom reads it all
    else:
        with pytest.raises(ValueError, match=re.escape(refused)):
            check_elements(path)


@pytest.mark.parametrize("syntax", ["+ti", "+te", "+tb", "+td"])
def test_what_dcmtk_writes_is_walked_without_refusal(tmp_path, covid_study, syntax):
    """No false alarm: a slice with nested sequences and a private group, as DCMTK writes
    it in each transfer syntax, with lengths defined or not, with group lengths or not."""
    source = tmp_path / "source.dcm"
    source.write_bytes(covid_study.files[0].read_bytes())
    subprocess.run(["dcmodify", "-nb", "-i", "(0008,1140)[0].(0008,1155)=1.2.3.4",
                    "-i", "(0008,1140)[1].(0008,1155)=1.2.3.5",
                    "-i", "(0040,0275)[0].(0040,0008)[0].(0008,0100)=X",
                    "-i", "(0029,0010)=ACME 1.0", str(source)], check=True)
    for lengths in ("+e", "-e"):
        for groups in ("+g", "-g"):
            out = tmp_path / f"{lengths}{groups}.dcm"
            subprocess.run(["dcmconv", syntax, lengths, groups, str(source), str(out)],
                           check=True)
            check_elements(out)
            assert len(pydicom.dcmread(out).ReferencedImageSequence) == 2


@pytest.fixture
def node(start_node):
    return start_node(allowed_calling_aets=["CT1"])


def _store(port: int, ds, body: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        associate(s)
        s.sendall(p_data(CT_ID, 0x03, c_store_rq(ds.SOPClassUID, ds.SOPInstanceUID)))
        for at in range(0, len(body), 16000):
            last = at + 16000 >= len(body)
            s.sendall(p_data(CT_ID, 0x02 if last else 0x00, body[at:at + 16000]))
        return status_of(s)


def _with_study_as_ob(body: bytes, study: bytes) -> bytes:
    """The data set with its Study Instance UID element re-sent in VR OB."""
    at = body.index(b"\x20\x00\x0d\x00UI")
    length = struct.unpack_from("<H", body, at + 6)[0]
    return body[:at] + element(0x0020, 0x000D, b"OB", study) + body[at + 8 + length:]


def test_a_study_uid_in_another_vr_is_refused_over_dimse(node, covid_study):
    """pydicom reads an OB value as bytes: the worker's study would not be the one the
    node filed the instance under."""
    receiver, store = node
    path = covid_study.files[0]
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    body = data_set(path)
    assert _store(receiver.port, ds, _with_study_as_ob(body, ds.StudyInstanceUID.encode())) \
        == 0xC000
    assert store.counts()["instances"] == 0
    [incident] = store.incidents()
    assert "(0020,000D) comes as OB, not UI" in incident.detail
    assert _store(receiver.port, ds, body) == 0x0000


def test_a_stow_part_whose_transfer_syntax_is_not_a_uid_is_refused(tmp_path, covid_study):
    """A leading space: pydicom strips it and reads the syntax; the node compared it as
    sent (a deflated one went unchecked for its inflation)."""
    from pacs_node.storage import CANNOT_UNDERSTAND, InstanceStorage
    from pacs_node.stow import StowServer
    from store.api import JobStore

    store = JobStore(f"sqlite:///{tmp_path}/lungsys.db")
    server = StowServer(InstanceStorage(store, tmp_path / "data", min_free_disk_mb=1))
    server.start("127.0.0.1", 0)
    try:
        raw = covid_study.files[0].read_bytes()
        syntax = pydicom.dcmread(covid_study.files[0]).file_meta.TransferSyntaxUID
        padded = syntax.encode() + b"\0" * (len(syntax) % 2)
        assert raw.count(padded) == 1
        hostile = raw.replace(padded, b" " + padded[:-1] if padded.endswith(b"\0")
                              else b" " + padded + b" ")
        if len(hostile) != len(raw):           # an odd length grew by two: the group too
            hostile = hostile[:140] + struct.pack("<L", struct.unpack_from(
                "<L", raw, 140)[0] + 2) + hostile[144:]
        body, ctype = multipart([("application/dicom", hostile)])
        status, _, answer = post(server.port, body, ctype)
        assert status == 409
        [failed] = answer["00081198"]["Value"]
        assert failed["00081197"]["Value"] == [CANNOT_UNDERSTAND]
        assert store.counts()["instances"] == 0
        body, ctype = multipart([("application/dicom", raw)])
        assert post(server.port, body, ctype)[0] == 200
    finally:
        server.stop()
