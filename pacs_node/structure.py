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

:func:`check_elements` walks the top-level elements of the stored file, value by value
skipped (a sequence or encapsulated pixel data of undefined length is walked item by
item, at most :data:`MAX_DEPTH` deep), and raises :class:`ValueError` naming the first
such lie. The data set begins where pydicom finds it (past every group 0002 element),
and a file meta group length that says otherwise is refused (a length pointing past the
file, or into a value, had the walk and the inflation check look elsewhere than pydicom
reads). Where pydicom reads by guessing (an element whose VR bytes are no VR, in the
data set or its file meta; an encapsulated value holding an item of undefined length) the
file is refused: two hostile rounds found a way past every walk that guessed along. Within
an item a value running past the data set's end is refused, not skipped. A deflated data
set is inflated for the walk (within the inflation check's bound). Nested data sets are
not checked for order: the node reads nothing in them.
"""

from __future__ import annotations

import mmap
import struct
import zlib
from pathlib import Path

from pydicom.datadict import dictionary_VR
from pydicom.uid import UID

from pacs_node.dimse import LONG_VRS, UNDEFINED_LENGTH
from pacs_node.header import DEFLATED, MAX_INFLATED_BYTES, META_VIEW, VRS, file_meta

ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
#: Sequences of undefined length nested deeper than this are refused (real objects nest
#: a handful; each level costs the walk and every later reader a frame of recursion).
MAX_DEPTH = 32
#: A data set of more elements than this (nested ones counted) is refused: a CT image has
#: a few hundred, a large SR some thousands; 12 KB deflated can hold a million.
MAX_ELEMENTS = 100_000


def check_elements(path: Path, transfer_syntax: str | None = None) -> None:
    """ValueError naming the first thing in the Part-10 file that pydicom would read
    otherwise than the node, or by guessing (see the module and :class:`_Walk`): its
    file meta (odd, or its group length not its elements' length, or no data set after
    it), an element repeated, out of order or of group 0002/0000 in the data set (zeros
    after its end aside), sequences past MAX_DEPTH or its end, more than MAX_ELEMENTS.
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
            finally:
                data.release()


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
      dictionary VR is SQ or that the dictionary does not know) or encapsulated
      fragments (any other VR), and fragments have defined lengths: pydicom scans an
      encapsulated value with an undefined-length item for the first delimiter's bytes.
    - Every element, item and fragment counts against MAX_ELEMENTS."""

    def __init__(self, data: memoryview, little: bool) -> None:
        self.data, self.end, self.elements = data, len(data), 0
        order = "<" if little else ">"
        self.tag_length = struct.Struct(order + "HHL")
        self.tag_vr_length = struct.Struct(order + "HH2sH")
        self.long_length = struct.Struct(order + "L")

    def count(self) -> None:
        self.elements += 1
        if self.elements > MAX_ELEMENTS:
            raise ValueError(f"its data set holds more than {MAX_ELEMENTS} elements")

    def implicit_at(self, pos: int) -> bool:
        vr = self.data[pos + 4:pos + 6]
        return not (len(vr) == 2 and 0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B)

    def data_set(self, pos: int, top: bool = False, depth: int = 0,
                 implicit: bool = False) -> int:
        """Walk elements from ``pos`` to the end (``top``) or to its item's end; where it
        stopped. Within an item, a value past the end is a ValueError (at the top the
        data set may end cut short: nothing is hidden after its end)."""
        implicit, last = implicit or self.implicit_at(pos), -1
        while pos + 8 <= self.end:
            self.count()
            group, element, length = self.tag_length.unpack_from(self.data, pos)
            tag, vr = group << 16 | element, b""
            if group == 0xFFFE:                        # items and delimiters: no VR
                if tag == ITEM_END and not top:
                    return pos + 8
                raise ValueError(f"an item tag ({group:04X},{element:04X}) where a data "
                                 f"element belongs")
            if top and tag == 0 and last >= 0 and not self.data[pos:].tobytes().strip(b"\0"):
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
                    if pos + 4 > self.end:
                        break
                    length = self.long_length.unpack_from(self.data, pos)[0]
                    pos += 4
            if top:
                if group in (0x0000, 0x0002):
                    raise ValueError(f"its data set holds a group {group:04X} element "
                                     f"(({group:04X},{element:04X}); PS3.10 7.1)")
                if tag <= last:
                    raise ValueError(f"its element ({group:04X},{element:04X}) is "
                                     f"{'repeated' if tag == last else 'out of order'} "
                                     f"(PS3.5 7.1: ascending, each at most once)")
            last = tag
            if length == UNDEFINED_LENGTH:
                pos = self.items(pos, depth + 1, implicit, _sequence(tag, vr))
            else:
                pos += length
        if not top:
            raise ValueError("an item of a sequence runs past the end of the data set")
        return self.end

    def items(self, pos: int, depth: int, implicit: bool, sequence: bool) -> int:
        """Walk a value of undefined length (a sequence's items, or encapsulated
        fragments) to its delimiter; where it stopped."""
        if depth > MAX_DEPTH:
            raise ValueError(f"its sequences nest deeper than {MAX_DEPTH}")
        while pos + 8 <= self.end:
            self.count()
            group, element, length = self.tag_length.unpack_from(self.data, pos)
            tag = group << 16 | element
            pos += 8
            if tag == SEQUENCE_END:
                return pos
            if tag != ITEM:
                raise ValueError(f"a sequence holds ({group:04X},{element:04X}), not items")
            if length != UNDEFINED_LENGTH:
                pos += length
            elif sequence:
                pos = self.data_set(pos, depth=depth, implicit=implicit)
            else:
                raise ValueError("an encapsulated value holds an item of undefined length")
        raise ValueError("a sequence runs past the end of the data set")


def _sequence(tag: int, vr: bytes) -> bool:
    """Whether pydicom reads a value of undefined length as a sequence (else as
    encapsulated fragments): SQ or UN (``infer_sq_for_un_vr``, PS3.5 6.2.2); in implicit
    VR when the dictionary says SQ or knows nothing of the tag (a private one: pydicom
    looks for an item there)."""
    if vr in (b"SQ", b"UN"):
        return True
    if vr:
        return False
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return True
