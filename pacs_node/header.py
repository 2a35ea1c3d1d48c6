"""The few header elements the node needs from a received instance, read fast.

Every received instance is filed and recorded by its UIDs before the C-STORE
is answered, so reading them is on the path of every acknowledgement. Most
instances hold them in plain top-level elements of defined length near the
start of the data set; :func:`scan_start` walks those elements in the first
bytes the SCP received, without building a data set (about a tenth of the
cost of pydicom's reader). Anything it cannot walk (a sequence of undefined
length before (0020,1002), a cut-off start, big endian or deflated data) goes
to pydicom: first on the same bytes, trusted only when it reads past (0020,1002)
within them (a sender may end a fragment inside a value, which pydicom reads cut
short without a word), then on the whole file.

A deflated data set is inflated whole by pydicom, here and by every later reader of the
stored file: :func:`refuse_inflation_bomb` inflates it first a piece at a time, nothing
kept, and refuses one that grows past :data:`MAX_INFLATED_BYTES` (a megabyte of zeros
sent deflated is a gigabyte inflated).
"""

from __future__ import annotations

import functools
import io
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from pydicom import Dataset
from pydicom.filereader import read_dataset, read_partial
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from pacs_node.dimse import LONG_VRS, UNDEFINED_LENGTH, iter_elements, text_value

IMPLICIT_VR = "1.2.840.10008.1.2"
SOP_CLASS, SOP_INSTANCE, MODALITY = 0x00080016, 0x00080018, 0x00080060
STUDY, SERIES, IMAGES_IN_ACQUISITION = 0x0020000D, 0x0020000E, 0x00201002
_WANTED = (SOP_CLASS, SOP_INSTANCE, MODALITY, STUDY, SERIES, IMAGES_IN_ACQUISITION)
_KEYWORDS = ["SOPClassUID", "SOPInstanceUID", "Modality", "StudyInstanceUID",
             "SeriesInstanceUID", "ImagesInAcquisition"]
_TAGS = [Tag(k) for k in _KEYWORDS]
TRANSFER_SYNTAX = 0x00020010
_META_HEAD = struct.Struct("<HH2s")
_UID_BYTES = re.compile(rb"[0-9.]{1,64}")
#: The bytes of a file that its file meta must end within (every reader of it takes these).
META_VIEW = 65536
#: A deflated data set that inflates past this is refused (Out of Resources): a CT image
#: is about half a megabyte inflated; pydicom inflates a deflated data set whole in memory.
MAX_INFLATED_BYTES = 64 * 2**20
_INFLATE_PIECE = 2**20
#: The transfer syntaxes the node accepts whose whole data set is deflated (PS3.5 A.5).
DEFLATED = frozenset({DeflatedExplicitVRLittleEndian})
#: The VRs (PS3.5 Table 6.2-1): an explicit VR element has one at bytes 4-5.
VRS = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST "
                 b"SV TM UC UI UL UN UR US UT UV".split())


@dataclass(frozen=True)
class InstanceHeader:
    """What the node files and records an instance by."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str = ""
    images_in_acquisition: int | None = None

    @classmethod
    def from_dataset(cls, ds: Dataset, transfer_syntax: str) -> "InstanceHeader":
        """From a pydicom data set; AttributeError when a UID is missing."""
        return cls(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID),
                   str(ds.SeriesInstanceUID), transfer_syntax, str(ds.get("Modality", "") or ""),
                   _count(str(ds.get("ImagesInAcquisition", "") or "")))


def scan_start(start: bytes | memoryview, transfer_syntax: str) -> InstanceHeader | None:
    """The header from the first bytes of a data set in ``transfer_syntax``, or None.

    For little endian, not deflated transfer syntaxes only (the caller checks).
    Walks top-level elements (:func:`pacs_node.dimse.iter_elements`) until one
    past (0020,1002); None when an element of undefined length comes first,
    when the bytes end before that point, or when a UID is missing.
    """
    values: dict[int, bytes] = {}
    for tag, pos, length in iter_elements(start, implicit_vr=transfer_syntax == IMPLICIT_VR):
        if tag > IMAGES_IN_ACQUISITION:
            return _header(values, transfer_syntax)
        if length == UNDEFINED_LENGTH:
            return None
        if tag in _WANTED:
            values[tag] = bytes(start[pos:pos + length])
    return None


def read_header(start: bytes, transfer_syntax: str, path: Path) -> InstanceHeader:
    """The header of a received instance: from its first bytes, else from its file.

    ``start`` is the data set's first fragment (no file meta) as sent in
    ``transfer_syntax``, ``path`` the Part-10 file. Raises when the file has
    no readable header, or when ``start`` is not encoded as ``transfer_syntax`` says
    (:func:`check_vr_encoding`).
    """
    check_vr_encoding(start, transfer_syntax)
    if start and _little_endian_plain(transfer_syntax):
        header = scan_start(start, transfer_syntax)
        if header is not None:
            return header
        try:
            stream = io.BytesIO(start)
            ds = read_dataset(stream, transfer_syntax == IMPLICIT_VR, True, specific_tags=_TAGS,
                              stop_when=lambda tag, vr, length: tag > IMAGES_IN_ACQUISITION)
            # stopped at an element past (0020,1002), not at the end of the bytes: every
            # value wanted is whole (pydicom reads a value cut short without a word)
            if stream.tell() < len(start):
                return InstanceHeader.from_dataset(ds, transfer_syntax)
        except Exception:  # the start ends inside an element: the file has it all
            pass
    return read_file_header(path)


def check_vr_encoding(start: bytes | memoryview, transfer_syntax: str) -> None:
    """ValueError when the data set's first element is in explicit VR and the transfer
    syntax (the presentation context's) is implicit, or the reverse: stored under the
    syntax it was sent on, it is a file DCMTK cannot read and pydicom reads by guessing.
    (An implicit VR element whose length's low bytes spell a VR would be taken for
    explicit, as pydicom's own check takes it; a first element of 16,000 bytes and more.)
    Deflated data sets are not looked at."""
    if len(start) < 8 or transfer_syntax in DEFLATED:
        return
    explicit = bytes(start[4:6]) in VRS
    if explicit and transfer_syntax == IMPLICIT_VR:
        raise ValueError("the data set is in explicit VR, sent on a presentation context "
                         "of Implicit VR Little Endian")
    if not explicit and transfer_syntax != IMPLICIT_VR:
        raise ValueError(f"the data set is in implicit VR, sent on a presentation context "
                         f"of {UID(transfer_syntax).name}")


def read_file_header(path: Path) -> InstanceHeader:
    """The header of a Part-10 file (pydicom); raises when it cannot be read.

    Reading stops past the last element wanted, and at an element of group 0000 (which a
    data set never holds): a file padded with zeros is 8-byte elements of tag 0 all the
    way, which pydicom would otherwise walk one by one (12 s of CPU for 30 MB)."""
    def enough(tag, vr, length) -> bool:
        return tag > IMAGES_IN_ACQUISITION or tag >> 16 == 0

    with open(path, "rb") as f:
        _refuse_group_0000(f.read(META_VIEW))
        f.seek(0)
        ds = read_partial(f, stop_when=enough, specific_tags=_TAGS)
    return InstanceHeader.from_dataset(ds, str(ds.file_meta.TransferSyntaxUID))


def _refuse_group_0000(head: bytes) -> None:
    """ValueError when the data set after the file meta begins with group 0000: pydicom
    would read it as a command set, every zero element of a padded file one by one."""
    start = file_meta(head).end
    if start and len(head) >= start + 8 and head[start:start + 2] == b"\0\0":
        raise ValueError("the data set begins with group 0000 (zeros?)")


@functools.lru_cache(maxsize=64)
def _little_endian_plain(transfer_syntax: str) -> bool:
    """Little endian and not deflated: the data set's bytes can be walked as sent."""
    syntax = UID(transfer_syntax)
    return syntax.is_little_endian and not syntax.is_deflated


def _header(values: dict[int, bytes], transfer_syntax: str) -> InstanceHeader | None:
    uids = [text_value(values.get(t, b"")) for t in (SOP_CLASS, SOP_INSTANCE, STUDY, SERIES)]
    if not all(uids):
        return None
    return InstanceHeader(*uids, transfer_syntax, modality=text_value(values.get(MODALITY, b"")),
                          images_in_acquisition=_count(text_value(
                              values.get(IMAGES_IN_ACQUISITION, b""))))


def _count(text: str) -> int | None:
    """Images in Acquisition (IS) as a number; None when empty or not a count."""
    try:
        count = int(text.strip())
    except ValueError:
        return None
    return count if count > 0 else None


def refuse_inflation_bomb(path: Path, transfer_syntax: str | None,
                          limit: int = MAX_INFLATED_BYTES) -> None:
    """ValueError when the Part-10 file's data set is deflated (``transfer_syntax``, else
    its file meta's) and inflates past ``limit`` bytes, or is not deflate data at all.
    Inflated a megabyte at a time and thrown away: the memory it takes is bounded."""
    if transfer_syntax and transfer_syntax not in DEFLATED:
        return                               # (the usual case: the file is not opened)
    with open(path, "rb") as f:
        meta_end, syntax, _, _ = file_meta(f.read(META_VIEW))
        if (transfer_syntax or syntax) not in DEFLATED:
            return
        f.seek(meta_end)
        inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
        try:
            while (chunk := f.read(_INFLATE_PIECE)) and not inflater.eof:
                while chunk and not inflater.eof:      # (after its end: a pad byte, say)
                    total += len(inflater.decompress(chunk, _INFLATE_PIECE))
                    if total > limit:
                        raise ValueError(f"its deflated data set inflates past "
                                         f"{limit / 2**20:g} MiB")
                    chunk = inflater.unconsumed_tail
        except zlib.error as exc:
            raise ValueError(f"its deflated data set cannot be inflated ({exc})") from None


class FileMeta(NamedTuple):
    """A Part-10 file's file meta as pydicom reads it: where the data set begins (past
    every group 0002 element, whatever the group length says), its transfer syntax (the
    last given; "" when none), where the group length says the data set begins (None
    when it gives none), and what in it pydicom would read by guessing ("" when
    nothing: an element without a VR, which pydicom reads as implicit VR)."""

    end: int
    syntax: str
    said_end: int | None
    odd: str = ""


def file_meta(head: bytes) -> FileMeta:
    """The file meta of the Part-10 file beginning with ``head`` (its first 64 KiB, or
    the whole file when shorter; 0, "", None without "DICM"). A file meta that does not
    end within them is odd: the length of an element whose header ended at the 64 KiB
    mark was read as 0, and the data set taken to begin inside that element's value."""
    if head[128:132] != b"DICM":
        return FileMeta(0, "", None)
    said = (144 + int.from_bytes(head[140:144], "little")
            if head[132:136] == b"\x02\x00\x00\x00" else None)
    pos = end = 132
    syntax = odd = ""
    while True:
        if pos + 12 > len(head):            # the next element's header not all in view
            if len(head) >= META_VIEW:
                odd = f"its file meta does not end within its first {META_VIEW} bytes"
            elif pos + 8 <= len(head) and head[pos:pos + 2] == b"\x02\x00":
                odd = "its file meta is cut short"
            break
        group, element, vr = _META_HEAD.unpack_from(head, pos)
        if group != 0x0002:
            break
        if vr not in VRS:
            odd = f"its file meta element (0002,{element:04X}) has no VR"
            break
        if vr in LONG_VRS:
            length, pos = int.from_bytes(head[pos + 8:pos + 12], "little"), pos + 12
        else:
            length, pos = int.from_bytes(head[pos + 6:pos + 8], "little"), pos + 8
        if length == UNDEFINED_LENGTH:
            odd = f"its file meta element (0002,{element:04X}) has an undefined length"
            break
        if element == TRANSFER_SYNTAX & 0xFFFF:
            value = head[pos:pos + length].rstrip(b"\0 ")
            if vr != b"UI" or not _UID_BYTES.fullmatch(value):
                odd = ("its transfer syntax (0002,0010) is not a UID of VR UI (pydicom reads "
                       "one in another VR as bytes, and strips whitespace a UID cannot hold)")
                break
            syntax = value.decode("ascii")
        pos = end = pos + length
    return FileMeta(end, syntax, said, odd)
