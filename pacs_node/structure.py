"""A received data set's elements, walked once before it is stored: no element twice.

The node files and records an instance by the UIDs it reads near the start of the
data set (:mod:`pacs_node.header`); every later reader (pydicom, in the worker, the
console, a PACS) reads the whole of it, and where an element comes twice the last one
wins. A data set holding a second Study Instance UID after its pixel data was filed
under one study and analysed, and its results sent, as another. A file meta element
inside the data set fools readers the other way: pydicom takes every group 0002
element at the start of the data set for file meta, so a ``(0002,0010)`` saying
"deflated" there made pydicom inflate, whole, a data set the inflation check had not
looked at. PS3.5 7.1 settles both: a data set's elements ascend, each at most once,
and group 0002 belongs to the file meta only (PS3.10 7.1).

:func:`check_elements` walks the top-level elements of the stored file and every
sequence pydicom would read (of undefined length item by item; of defined length too:
a value skipped whole was where a million empty items hid, 12 KB deflated and 734 MB in
pydicom), at most :data:`MAX_DEPTH` deep and :data:`MAX_ELEMENTS` in all, and raises
:class:`ValueError` naming the first lie. The data set begins where pydicom finds it
(past every group 0002 element), and a file meta group length that says otherwise is
refused (a length pointing past the file, or into a value, had the walk and the inflation
check look elsewhere than pydicom reads). Where pydicom reads by guessing (an element
whose VR bytes are no VR, in the data set or its file meta; an encapsulated value holding
an item of undefined length) the file is refused: each hostile round found a way past a
walk that guessed along. An element the node files by in another VR than its own (a
Study Instance UID as OB: pydicom reads bytes) is refused, and so are more than
:data:`MAX_PADDING` bytes of zeros after the data set. Within an item a value running past
its end is refused, not skipped. A deflated data set is inflated for the walk (within the
inflation check's bound). Nested data sets are not checked for order: the node reads
nothing in them.
"""

from __future__ import annotations

import functools
import mmap
import struct
import zlib
from pathlib import Path

from pydicom._dicom_dict import DicomDictionary
from pydicom._private_dict import private_dictionaries
from pydicom.datadict import dictionary_VR, private_dictionary_VR
from pydicom.uid import UID

from pacs_node.dimse import LONG_VRS, UNDEFINED_LENGTH
from pacs_node.header import (DEFLATED, IMAGES_IN_ACQUISITION, MAX_INFLATED_BYTES, META_VIEW,
                              MODALITY, SERIES, SOP_CLASS, SOP_INSTANCE, STUDY, VRS, file_meta)

ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
#: The elements the node files an instance by (:mod:`pacs_node.header`) and their VRs: in
#: explicit VR they must come as these (or as UN shorter than 64 KiB, which pydicom reads
#: as these): ``(0020,000D) OB "1.2.3"`` was filed under 1.2.3 and read by pydicom as bytes.
READ_AS = {SOP_CLASS: b"UI", SOP_INSTANCE: b"UI", MODALITY: b"CS", STUDY: b"UI",
           SERIES: b"UI", IMAGES_IN_ACQUISITION: b"IS"}
#: Zeros after the data set's end (padding) are accepted up to this many bytes: pydicom
#: reads each 8 of them as an element (60 MiB deflated into 61 KB: 15 s a read).
MAX_PADDING = 64 << 10
#: Public tags pydicom reads as sequences (the dictionary's SQ, and (50xx,2600), its one
#: repeating SQ), and the private creators whose dictionary holds a sequence.
_SQ_TAGS = frozenset([tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ"]
                     + [0x50002600 | group << 16 for group in range(0, 0x100, 2)])
_SQ_CREATORS = frozenset(creator for creator, entries in private_dictionaries.items()
                         if any(entry[0] == "SQ" for entry in entries.values()))
#: Private creators longer than this are refused (LO: 64 characters; the longest
#: creator in pydicom's private dictionary has 65).
MAX_CREATOR = 1024
#: VRs whose values pydicom decodes as text (a creator's name is looked up as one).
_TEXT_VRS = frozenset(b"AE AS CS DA DS DT IS LO LT PN SH ST TM UC UI UR UT".split())
_MAYBE_SQ = (b"", b"UN")      # implicit VR, or unknown: pydicom may read a sequence there
#: Sequences nested deeper than this are refused (real objects nest a handful; each level
#: costs the walk and every later reader a frame of recursion: 2,000 crashed ``str(ds)``).
MAX_DEPTH = 32
#: A data set of more elements than this (nested ones counted) is refused: a CT image has
#: a few hundred, a large SR some thousands; 12 KB deflated can hold a million.
MAX_ELEMENTS = 100_000


def check_elements(path: Path, transfer_syntax: str | None = None) -> None:
    """ValueError naming the first thing in the Part-10 file that pydicom would read
    otherwise than the node, or by guessing (see the module and :class:`_Walk`): its
    file meta (odd, or its group length not its elements' length, or no data set after
    it), an element repeated, out of order, of group 0002/0000 in the data set (zeros
    after its end aside, up to MAX_PADDING) or filed by in a VR not its own, sequences
    past MAX_DEPTH or their ends, more than MAX_ELEMENTS.
    ``transfer_syntax``: the data set's (the presentation context's), else its file
    meta's."""
    with open(path, "rb") as f:
        meta = file_meta(f.read(META_VIEW))
        if meta.end == 0:
            return                      # no file meta: nothing reads it as an instance
        if meta.odd:
            raise ValueError(meta.odd)
        if meta.said_end is not None and meta.said_end != meta.end:
            raise ValueError(f"its file meta group length ends at byte {meta.said_end}, its "
                             f"group 0002 elements at {meta.end} (PS3.10 7.1)")
        if f.seek(0, 2) <= meta.end:
            raise ValueError("no data set follows its file meta")
        syntax = transfer_syntax or meta.syntax
        try:
            little = UID(syntax).is_little_endian
        except ValueError:
            raise ValueError(f"its transfer syntax {syntax[:64]!r} is not one the node "
                             f"knows") from None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as whole:
            if syntax in DEFLATED:              # (refuse_inflation_bomb has read it whole)
                try:
                    data = memoryview(zlib.decompressobj(-zlib.MAX_WBITS).decompress(
                        whole[meta.end:], MAX_INFLATED_BYTES))
                except zlib.error as exc:
                    raise ValueError(f"its deflated data set cannot be inflated ({exc})"
                                     ) from None
            else:
                data = memoryview(whole)[meta.end:]
            try:
                _Walk(data, little).data_set(0, top=True)
                refused = ""
            except ValueError as exc:    # (its traceback holds views of the map: let it go)
                refused = str(exc)
            finally:
                data.release()
    if refused:
        raise ValueError(refused)


class _Walk:
    """One data set's bytes and their byte order, walked element by element, reading them
    as pydicom reads them or refusing where pydicom would guess.

    - Implicit or explicit VR: the data set's as pydicom tells it (explicit when bytes
      4-5 of its first element are two capital letters); an item's the same within an
      explicit data set, implicit within an implicit one (``_is_implicit_vr``).
    - In explicit VR every element's VR must be one PS3.5 defines: pydicom reads an
      element with other bytes there as implicit (``assume_implicit_vr_switch``), its
      length four bytes where the walk read two.
    - A value of undefined length is a sequence (SQ or UN; in implicit VR, a tag whose
      dictionary VR is SQ, or that it does not know and an item follows) or encapsulated
      fragments (any other VR), and fragments have defined lengths: pydicom scans an
      encapsulated value with an undefined-length item for the first delimiter's bytes.
    - A value of defined length is walked as a sequence where pydicom reads one
      (:meth:`defined_sequence`): its items must fill it, each item's elements its length.
    - Every element, item and fragment counts against MAX_ELEMENTS, every sequence
      against MAX_DEPTH (a million empty items in a sequence of defined length were 12
      KB deflated, 734 MB and 17 s in pydicom)."""

    def __init__(self, data: memoryview, little: bool) -> None:
        self.data, self.end, self.elements = data, len(data), 0
        order = "<" if little else ">"
        self.tag_length = struct.Struct(order + "HHL")
        self.tag_vr_length = struct.Struct(order + "HH2sH")
        self.long_length = struct.Struct(order + "L")
        self.item_bytes = struct.pack(order + "HH", 0xFFFE, 0xE000)

    def count(self) -> None:
        self.elements += 1
        if self.elements > MAX_ELEMENTS:
            raise ValueError(f"its data set holds more than {MAX_ELEMENTS} elements")

    def implicit_at(self, pos: int) -> bool:
        vr = self.data[pos + 4:pos + 6]
        return not (len(vr) == 2 and 0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B)

    def data_set(self, pos: int, top: bool = False, depth: int = 0, implicit: bool = False,
                 limit: int | None = None, defined: bool = False) -> int:
        """Walk elements from ``pos`` to the end (``top``), to its item's end delimiter,
        or (``defined``) to exactly ``limit``, the end of an item of defined length (an
        item delimiter may close it there: pydicom ends an item at one, wherever it is);
        where it stopped. Within an item, a value past ``limit`` (else the data's end) is a
        ValueError; at the top the data set may end cut short (nothing hides after it)."""
        end = self.end if limit is None else limit
        implicit, last, creators = implicit or self.implicit_at(pos), -1, _Creators()
        while pos + 8 <= end:
            self.count()
            group, element, length = self.tag_length.unpack_from(self.data, pos)
            tag, vr = group << 16 | element, b""
            if group == 0xFFFE:                        # items and delimiters: no VR
                if tag == ITEM_END and not top and length == 0 and (
                        not defined or pos + 8 == end):
                    return pos + 8      # (another length: explicit VR reads a VR there)
                raise ValueError(f"an item tag ({group:04X},{element:04X}) where a data "
                                 f"element belongs")
            if top and tag == 0 and last >= 0 and self.padding(pos):
                return self.end                        # zeros after the data set
            if implicit:
                pos += 8
            else:
                group, element, vr, length = self.tag_vr_length.unpack_from(self.data, pos)
                if vr not in VRS:
                    raise ValueError(f"its element ({group:04X},{element:04X}) has no VR "
                                     f"(bytes {bytes(vr).hex()}) in explicit VR")
                pos += 8
                if vr in LONG_VRS:
                    if pos + 4 > end:
                        if top:
                            break                      # cut short: pydicom reads no more
                        raise ValueError("an element runs past the end of its item")
                    length = self.long_length.unpack_from(self.data, pos)[0]
                    pos += 4
            if top and (tag <= last or group < 3 or tag in READ_AS):
                _top_level(tag, last, vr, length)
            last = tag
            if length == UNDEFINED_LENGTH:
                pos = self.items(pos, depth + 1, implicit, self.undefined_sequence(
                    tag, vr, pos), end)
                continue
            if not top and pos + length > end:
                raise ValueError("a value runs past the end of its item")
            if group & 1 and 0 < element <= 0xFF and vr != b"SQ":
                creators.add(tag, vr, self.data, pos, length)
            elif (vr == b"SQ" and length) or (length and vr in _MAYBE_SQ and (
                    group & 1 or tag in _SQ_TAGS)
                    and self.defined_sequence(tag, vr, length, pos, creators)):
                self.sequence(pos, length, depth + 1, implicit)
            pos += length
        if top:
            return self.end
        if defined and pos == end:
            return pos
        raise ValueError("an item of a sequence runs past the end of "
                         + ("its sequence" if limit is not None else "the data set"))

    def padding(self, pos: int) -> bool:
        """Whether the data from ``pos`` on is zeros, at most MAX_PADDING of them."""
        if self.end - pos > MAX_PADDING:
            raise ValueError(f"more than {MAX_PADDING} bytes follow its data set's end")
        return not self.data[pos:].tobytes().strip(b"\0")

    def undefined_sequence(self, tag: int, vr: bytes, pos: int) -> bool:
        """Whether pydicom reads a value of undefined length at ``pos`` as a sequence
        (else as encapsulated fragments): SQ or UN (``infer_sq_for_un_vr``, PS3.5
        6.2.2); in implicit VR when the dictionary says SQ, or knows nothing of the tag
        (a private one) and an item follows: pydicom looks there for one."""
        if vr in (b"SQ", b"UN"):
            return True
        if vr:
            return False
        try:
            return dictionary_VR(tag) == "SQ"
        except KeyError:
            return self.data[pos:pos + 4] == self.item_bytes

    def defined_sequence(self, tag: int, vr: bytes, length: int, pos: int,
                         creators: "_Creators") -> bool:
        """Whether a value of defined length in UN or implicit VR is walked as a
        sequence: where pydicom reads one (the dictionary says SQ; an explicit public UN
        only below 64 KiB, ``replace_un_with_known_vr``; a private tag by its creator's
        private dictionary), and, as a caution, any private value that begins with an
        item (pydicom reads those as bytes; other readers may not)."""
        if tag >> 16 & 1:                         # private: its creator's dictionary
            creator = creators.of(tag)
            return (creator is not None and _private_sequence(tag, creator)) \
                or self.data[pos:pos + 4] == self.item_bytes
        if vr == b"UN" and length >= 0xFFFF:
            return False
        return tag in _SQ_TAGS

    def sequence(self, pos: int, length: int, depth: int, implicit: bool) -> None:
        """Walk a sequence's value of defined length: items that fill it (a sequence
        delimiter ends it early: pydicom reads nothing after one)."""
        if depth > MAX_DEPTH:
            raise ValueError(f"its sequences nest deeper than {MAX_DEPTH}")
        end = pos + length
        if end > self.end:
            raise ValueError("a sequence runs past the end of the data set")
        while pos < end:
            if pos + 8 > end:
                raise ValueError("a sequence's items do not fill its length")
            pos, more = self.item(pos, depth, implicit, end)
            if not more:
                return

    def items(self, pos: int, depth: int, implicit: bool, sequence: bool, limit: int) -> int:
        """Walk a value of undefined length (a sequence's items, or encapsulated
        fragments) to its delimiter, before ``limit``; where it stopped."""
        if depth > MAX_DEPTH:
            raise ValueError(f"its sequences nest deeper than {MAX_DEPTH}")
        while pos + 8 <= limit:
            if sequence:
                pos, more = self.item(pos, depth, implicit, limit)
                if not more:
                    return pos
                continue
            self.count()
            group, element, length = self.tag_length.unpack_from(self.data, pos)
            tag = group << 16 | element
            pos += 8
            if tag == SEQUENCE_END:
                return pos
            if tag != ITEM:
                raise ValueError(f"an encapsulated value holds ({group:04X},{element:04X}), "
                                 f"not items")
            if length == UNDEFINED_LENGTH:
                raise ValueError("an encapsulated value holds an item of undefined length")
            pos += length
        raise ValueError("a sequence runs past the end of the data set")

    def item(self, pos: int, depth: int, implicit: bool, limit: int) -> tuple[int, bool]:
        """One item of a sequence at ``pos`` (its header within ``limit``): where it
        ends, and whether more may follow (False after the sequence delimiter). An item
        delimiter of length 0 is an empty item, as pydicom reads it (GE writes one after
        an item of defined length)."""
        self.count()
        group, element, length = self.tag_length.unpack_from(self.data, pos)
        tag, pos = group << 16 | element, pos + 8
        if tag == SEQUENCE_END:
            return pos, False
        if tag == ITEM_END and length == 0:
            return pos, True
        if tag != ITEM:
            raise ValueError(f"a sequence holds ({group:04X},{element:04X}), not items")
        if length == UNDEFINED_LENGTH:
            return self.data_set(pos, depth=depth, implicit=implicit, limit=limit), True
        if pos + length > limit:
            raise ValueError("an item runs past the end of its sequence")
        return self.data_set(pos, depth=depth, implicit=implicit, limit=pos + length,
                             defined=True), True


class _Creators:
    """A data set's private creators as pydicom finds them for an element: the value of
    (gggg,00bb) for block bb, decoded. pydicom looks them up in the whole (finished) data
    set; the walk meets them in order, so one repeated, or met after an element of its
    block, is refused (the walk would have judged that element by another creator)."""

    __slots__ = ("names", "used")

    def __init__(self) -> None:
        self.names: dict[int, str | None] = {}
        self.used: set[int] = set()

    def add(self, tag: int, vr: bytes, data: memoryview, pos: int, length: int) -> None:
        where = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
        if tag in self.names:
            raise ValueError(f"its private creator {where} is repeated")
        if tag in self.used:
            raise ValueError(f"its private creator {where} follows elements of its block")
        if tag & 0xFFFF < 0x10 and vr not in _TEXT_VRS:
            self.names[tag] = None       # (gggg,0001-000F): pydicom reads bytes, no name
            return
        if length > MAX_CREATOR:
            raise ValueError(f"its private creator {where} is {length} bytes long")
        self.names[tag] = _creator(bytes(data[pos:pos + length]), where)

    def of(self, tag: int) -> str | None:
        """The creator of a private element (None: none, or not one pydicom names)."""
        if not tag & 0xFF00:
            return None
        key = tag & 0xFFFF0000 | tag >> 8 & 0xFF
        self.used.add(key)
        return self.names.get(key)


def _top_level(tag: int, last: int, vr: bytes, length: int) -> None:
    """ValueError when a top-level element is of group 0000/0002, not after the one
    before it, or one the node files by in another VR than pydicom reads it in."""
    group, element = tag >> 16, tag & 0xFFFF
    if group in (0x0000, 0x0002):
        raise ValueError(f"its data set holds a group {group:04X} element "
                         f"(({group:04X},{element:04X}); PS3.10 7.1)")
    if tag <= last:
        raise ValueError(f"its element ({group:04X},{element:04X}) is "
                         f"{'repeated' if tag == last else 'out of order'} "
                         f"(PS3.5 7.1: ascending, each at most once)")
    wanted = READ_AS.get(tag)
    if vr and wanted and vr != wanted and not (vr == b"UN" and length < 0xFFFF):
        raise ValueError(f"its element ({group:04X},{element:04X}) comes as "
                         f"{vr.decode()}, not {wanted.decode()}")


def _creator(value: bytes, where: str) -> str:
    """A private creator's name as pydicom matches it; ValueError when it holds control
    characters (an escape sequence would have pydicom decode it as another name)."""
    name = value.rstrip(b"\0 ")
    if any(b < 0x20 or b == 0x7F for b in name):
        raise ValueError(f"its private creator {where} holds control characters")
    return name.decode("latin-1").strip()


@functools.lru_cache(maxsize=4096)
def _private_sequence(tag: int, creator: str) -> bool:
    """Whether the private dictionary makes ``tag`` of ``creator`` a sequence."""
    if creator not in _SQ_CREATORS:
        return False
    try:
        return private_dictionary_VR(tag, creator) == "SQ"
    except KeyError:
        return False


