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
such lie. A deflated data set is inflated for the walk (the inflation check has bounded
it). Nested data sets are not checked for order: the node reads nothing in them.
"""

from __future__ import annotations

import mmap
import struct
import zlib
from pathlib import Path

from pydicom.uid import UID

from pacs_node.dimse import LONG_VRS, UNDEFINED_LENGTH
from pacs_node.header import DEFLATED, IMPLICIT_VR, MAX_INFLATED_BYTES, file_meta

ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
#: Sequences of undefined length nested deeper than this are refused (real objects nest
#: a handful; each level costs the walk and every later reader a frame of recursion).
MAX_DEPTH = 32


def check_elements(path: Path, transfer_syntax: str | None = None) -> None:
    """ValueError when the Part-10 file's data set repeats an element, has one out of
    order, holds a group 0002 or 0000 element, or nests sequences past MAX_DEPTH.
    ``transfer_syntax``: the data set's (the presentation context's), else its file
    meta's."""
    with open(path, "rb") as f:
        start, syntax = file_meta(f.read(65536))
        syntax = transfer_syntax or syntax
        if not syntax or f.seek(0, 2) <= start:
            return                      # no file meta to go by, or nothing after it
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as whole:
            if syntax in DEFLATED:
                inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                data = memoryview(inflater.decompress(whole[start:], MAX_INFLATED_BYTES))
            else:
                data = memoryview(whole)[start:]
            try:
                _Walk(data, syntax).data_set(0, top=True)
            finally:
                data.release()


class _Walk:
    """One data set's bytes and their encoding, walked element by element."""

    def __init__(self, data: memoryview, syntax: str) -> None:
        self.data, self.end = data, len(data)
        self.implicit = syntax == IMPLICIT_VR
        order = "<" if UID(syntax).is_little_endian else ">"
        self.tag_length = struct.Struct(order + "HHL")
        self.tag_vr_length = struct.Struct(order + "HH2sH")
        self.long_length = struct.Struct(order + "L")

    def data_set(self, pos: int, top: bool = False, implicit: bool | None = None,
                 depth: int = 0) -> int:
        """Walk elements from ``pos`` to the end (``top``) or to an item's end; where it
        stopped."""
        implicit = self.implicit if implicit is None else implicit
        last = -1
        while pos + 8 <= self.end:
            group, element, length = self.tag_length.unpack_from(self.data, pos)
            tag, vr = group << 16 | element, b""
            if group == 0xFFFE:                        # items and delimiters: no VR
                if tag == ITEM_END and not top:
                    return pos + 8
                raise ValueError(f"an item tag ({tag >> 16:04X},{tag & 0xFFFF:04X}) where a "
                                 f"data element belongs")
            if implicit:
                pos += 8
            else:
                group, element, vr, length = self.tag_vr_length.unpack_from(self.data, pos)
                pos += 8
                if vr in LONG_VRS:
                    if pos + 4 > self.end:
                        return self.end
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
                # PS3.5 6.2.2: an undefined-length UN holds implicit VR little endian
                pos = self.items(pos, implicit or vr == b"UN", depth + 1)
            else:
                pos += length
        return self.end

    def items(self, pos: int, implicit: bool, depth: int) -> int:
        """Walk a value of undefined length (a sequence's items, or encapsulated pixel
        data's fragments) to its delimiter; where it stopped."""
        if depth > MAX_DEPTH:
            raise ValueError(f"its sequences nest deeper than {MAX_DEPTH}")
        while pos + 8 <= self.end:
            group, element, length = self.tag_length.unpack_from(self.data, pos)
            tag = group << 16 | element
            pos += 8
            if tag == SEQUENCE_END:
                return pos
            if tag != ITEM:
                raise ValueError(f"a sequence holds ({group:04X},{element:04X}), not items")
            if length == UNDEFINED_LENGTH:
                pos = self.data_set(pos, implicit=implicit, depth=depth)
            else:
                pos += length
        return self.end
