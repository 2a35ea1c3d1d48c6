"""Data elements as bytes, for tests that play a sender writing what no toolkit would:
elements in explicit or implicit VR little endian, item and delimiter tags, Part-10 files
with a chosen transfer syntax and file meta group length."""

from __future__ import annotations

import struct

#: The long VRs (a 4-byte length after two reserved bytes: PS3.5 7.1.2) used here.
LONG = (b"OB", b"SQ", b"UN", b"UT")


def element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """An explicit VR little endian element, its value padded to an even length."""
    value += b"\0" * (len(value) % 2)
    if vr in LONG:
        return struct.pack("<HH2sHL", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def implicit(tag: int, value: bytes = b"", length: int | None = None) -> bytes:
    """An implicit VR little endian element of ``tag`` (group << 16 | element)."""
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF,
                       len(value) if length is None else length) + value


def tag(group: int, element: int, length: int) -> bytes:
    """A tag and a length, no VR: items, delimiters, implicit VR elements."""
    return struct.pack("<HHL", group, element, length)


def item(body: bytes) -> bytes:
    """A sequence item of defined length."""
    return tag(0xFFFE, 0xE000, len(body)) + body


def part10(data_set_bytes: bytes, syntax: str = "1.2.840.10008.1.2.1",
           group_length: int | None = None) -> bytes:
    """A Part-10 file: preamble, "DICM", a file meta of its group length (the true one,
    unless given) and transfer syntax, then the data set's bytes."""
    meta = element(0x0002, 0x0010, b"UI", syntax.encode())
    length = len(meta) if group_length is None else group_length
    return (b"\0" * 128 + b"DICM" + struct.pack("<HH2sHL", 2, 0, b"UL", 4, length) + meta
            + data_set_bytes)
