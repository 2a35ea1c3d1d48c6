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
import struct
import subprocess

import pydicom
import pytest

from pacs_node.structure import MAX_DEPTH, MAX_ELEMENTS, MAX_PADDING, check_elements

from elements import element, implicit, item, part10, tag
from raw_peer import data_set, store_raw
from stow_client import refused_then_stored

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


def _in_an_item(body: bytes) -> bytes:
    """A data set with ``body`` in an item of a Referenced Image Sequence."""
    return part10(_HEAD + element(0x0008, 0x1140, b"SQ", item(body)) + _UIDS)


_FDMS_SQ = element(0x0019, 0x10A0, b"UN", tag(0x0008, 0x0100, 8) + bytes(8))   # not items
_LONG_CREATOR = b"http://www.gemedicalsystems.com/it_solutions/bamwallthickness/1.0"


def _undefined_sequence(*parts: bytes) -> bytes:
    return struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF) + b"".join(parts)


_ONE = element(0x0008, 0x1155, b"UI", b"1.2.4")


def _an_unknown_tag_opening_with_an_item_delimiter() -> bytes:
    """Implicit VR: pydicom reads a private value of undefined length as a sequence only
    when an item follows; else it scans for the first sequence delimiter's bytes, here
    inside a later item, and reads on from there: another study."""
    hidden = (tag(0xFFFE, 0xE0DD, 0) + implicit(0x0020000D, b"9.9.9\0")
              + tag(0x0031, 0x1001, 8))
    return part10(implicit(0x00080016, b"1.2.840.10008.5.1.4.1.1.2\0")
                  + implicit(0x00080018, b"1.2.3\0") + implicit(0x0020000D, b"1.1.1\0")
                  + implicit(0x00291010, length=0xFFFFFFFF) + tag(0xFFFE, 0xE00D, 0)
                  + item(implicit(0x00111001, hidden)) + tag(0xFFFE, 0xE0DD, 0), IMPLICIT)


def _an_item_delimiter_whose_length_spells_ob() -> bytes:
    """Explicit VR: pydicom reads bytes 4-5 of an item delimiter as its VR, 'OB', and four
    bytes more; the walk, eight on, read a different data set after it."""
    size, hidden = 0x4F4C, element(0x0020, 0x000D, b"UI", b"9.9.9")
    value = hidden + struct.pack("<HH2sHL", 0x4250, 0x1001, b"OB", 0, size - len(hidden) - 12)
    value += bytes(size - len(value))
    opened = (tag(0xFFFE, 0xE000, 0xFFFFFFFF) + element(0x0040, 0x0009, b"SH", b"XY")
              + struct.pack("<HH", 0xFFFE, 0xE00D) + b"OB\0\0")
    return part10(_HEAD + _UIDS + struct.pack("<HH2sHL", 0x0040, 0x0275, b"SQ", 0, 0xFFFFFFFF)
                  + opened + struct.pack("<HH", 0xFFFE, 0xE0DD) * 2
                  + struct.pack("<HH2sHL", 0x0041, 0x1001, b"OB", 0, size)[:-4]
                  + struct.pack("<L", size) + value)


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
    (lambda: part10(_HEAD + element(0x0008, 0x1140, b"SQ", b"\0\0\0\0") + _UIDS),
     "items do not fill its length"),
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
    # (review) a creator sent as SQ: pydicom reads the sequence, whatever the tag
    (lambda: part10(_HEAD + element(0x0019, 0x0010, b"SQ", b"ABCD    " + bytes(8)) + _UIDS),
     "a sequence holds (4241,4443), not items"),
    # a 65-character creator in pydicom's private dictionary (3119,xx40: a sequence)
    (lambda: part10(_HEAD + _UIDS + element(0x3119, 0x0010, b"LO", _LONG_CREATOR)
                    + element(0x3119, 0x1040, b"UN", tag(0x0008, 0x0100, 0))),
     "a sequence holds (0008,0100), not items"),
    # in an item pydicom looks a creator up in the whole item: the last of two, or after
    (lambda: _in_an_item(element(0x0019, 0x0010, b"LO", b"ACME")
                         + element(0x0019, 0x0010, b"LO", b"FDMS 1.0") + _FDMS_SQ),
     "private creator (0019,0010) is repeated"),
    (lambda: _in_an_item(_FDMS_SQ + element(0x0019, 0x0010, b"LO", b"FDMS 1.0")),
     "private creator (0019,0010) follows elements of its block"),
    (lambda: _in_an_item(element(0x0019, 0x0010, b"LO", b"FDMS 1.0") + _FDMS_SQ),
     "a sequence holds (0008,0100), not items"),
    # a long VR's header ending where its item ends: pydicom reads 4 bytes past it
    (lambda: _in_an_item(struct.pack("<HH2sH", 0x0009, 0x1000, b"OB", 0)),
     "an element runs past the end of its item"),
    (lambda: part10(_HEAD + element(0x0008, 0x1140, b"UN", b"\0\0\0\0") + _UIDS),
     "items do not fill its length"),                   # pydicom: SQ, and an OSError
    # delimiters where pydicom takes them (GE writes the third), and where it does not
    (lambda: _in_an_item(_ONE + tag(0xFFFE, 0xE00D, 0)), None),
    (lambda: part10(_HEAD + element(0x0008, 0x1140, b"SQ", item(_ONE)
                                    + tag(0xFFFE, 0xE0DD, 0)) + _UIDS), None),
    (lambda: part10(_HEAD + _undefined_sequence(item(_ONE), tag(0xFFFE, 0xE00D, 0),
                                                tag(0xFFFE, 0xE0DD, 0)) + _UIDS), None),
    (lambda: _in_an_item(tag(0xFFFE, 0xE00D, 0) + _ONE),
     "an item tag (FFFE,E00D) where a data element belongs"),
    (lambda: part10(_HEAD + element(0x0009, 0x0001, b"OB", b"\x01\x02") + _UIDS), None),
    (_an_unknown_tag_opening_with_an_item_delimiter,
     "an encapsulated value holds (FFFE,E00D), not items"),
    (_an_item_delimiter_whose_length_spells_ob,
     "an item tag (FFFE,E00D) where a data element belongs"),
], ids=["many-items", "deep", "deep-enough", "deep-as-un", "items-short", "no-item",
        "item-overruns", "private-by-creator", "honest", "uid-as-ob", "uid-as-un", "syntax-space",
        "syntax-tab", "syntax-as-ob", "syntax-padded", "long-padding", "padding",
        "creator-escaped", "creator-as-sq", "long-creator", "creator-repeated",
        "creator-after", "creator-in-item", "long-vr-at-item-end", "short-un-sequence",
        "item-delimiter-closing", "sequence-delimiter-closing", "ge-item-delimiter",
        "item-delimiter-inside", "reserved-private-element", "unknown-tag-no-item",
        "item-delimiter-spelling-ob"])
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
    hostile = _with_study_as_ob(body, ds.StudyInstanceUID.encode())
    assert store_raw(receiver.port, ds.SOPClassUID, ds.SOPInstanceUID, hostile) == 0xC000
    assert store.counts()["instances"] == 0
    [incident] = store.incidents()
    assert "(0020,000D) comes as OB, not UI" in incident.detail
    assert store_raw(receiver.port, ds.SOPClassUID, ds.SOPInstanceUID, body) == 0x0000


def test_a_stow_part_whose_transfer_syntax_is_not_a_uid_is_refused(tmp_path, covid_study):
    """A leading space: pydicom strips it and reads the syntax; the node compared it as
    sent (a deflated one went unchecked for its inflation)."""
    raw = covid_study.files[0].read_bytes()
    syntax = pydicom.dcmread(covid_study.files[0]).file_meta.TransferSyntaxUID
    padded = syntax.encode() + b"\0"                   # (1.2.840.10008.1.2.1: odd)
    assert raw.count(padded) == 1
    refused_then_stored(tmp_path, raw.replace(padded, b" " + syntax.encode()), raw)
