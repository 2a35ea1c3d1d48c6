"""What the loader keeps of a series' headers, bounded whatever a sender put in them.

pydicom decodes a sequence of undefined length as it reads a file, and any other value
when it is first touched. The loader reads every file of a series before it assembles
them: keeping each file's whole header held a sender's sequence of 8,000 empty items once
a file (369 MiB for 8 files), and decoding every element of the series' header, as a copy
did, a text value of a million values. :func:`slim` keeps of a file what assembling the
series reads; :func:`header_of` keeps of the series' first file, read again whole, what
results may copy, undecoded; :func:`encoded_size` says how large a value is either way
(:mod:`inference.conformance` copies within a budget of it).
"""

from __future__ import annotations

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

#: The loader keeps values of at most this many bytes of each file's header (the
#: functional groups whatever their size): what it reads there is a few bytes each.
KEPT_BYTES = 4096
_FUNCTIONAL_GROUPS = (0x52009229, 0x52009230)   # Shared, Per-frame Functional Groups
#: Not in the series' header (:attr:`inference.series.CTSeries.header`): pixels and
#: per-frame groups, which results never copy.
_HEADER_EXCLUDE = ("PixelData", "PerFrameFunctionalGroupsSequence", "FloatPixelData",
                   "DoubleFloatPixelData")


def slim(ds: Dataset) -> Dataset:
    """A file's header without what assembling a series never reads: private elements,
    sequences but the functional groups, values over :data:`KEPT_BYTES`. An element in
    UN is judged in the VR pydicom reads it in (a public one below 64 KiB: its
    dictionary's)."""
    for tag in list(ds.keys()):
        if tag in _FUNCTIONAL_GROUPS:
            continue
        elem = ds.get_item(tag)
        size = encoded_size(elem)
        vr = elem.VR
        if vr is None or (vr == "UN" and size < 0xFFFF):
            vr = _dictionary_vr(tag)
        if tag.is_private or vr in ("SQ", "UN") or size > KEPT_BYTES:
            del ds[tag]
    return ds


def header_of(ds: Dataset) -> Dataset:
    """A copy of the dataset without pixels, per-frame groups or private elements (no
    result copies them), its elements as read: none is decoded here."""
    header = Dataset()
    header.file_meta = getattr(ds, "file_meta", Dataset())
    for tag in ds.keys():
        if not tag.is_private and keyword_for_tag(tag) not in _HEADER_EXCLUDE:
            header[tag] = ds.get_item(tag)
    return header


def encoded_size(elem: DataElement | RawDataElement) -> int:
    """About how many bytes an element's value takes encoded: a raw one's length; a
    decoded one's estimated (a sequence's elements counted through its items)."""
    if isinstance(elem, RawDataElement):
        return len(elem.value) if elem.value is not None else elem.length
    size, pending = 0, [elem]
    while pending:
        value = pending.pop().value
        if isinstance(value, (bytes, str)):
            size += len(value)
        elif isinstance(value, Sequence):
            for item in value:
                size += 8
                pending.extend(item.elements())
        elif isinstance(value, (MultiValue, list, tuple)):
            size += 8 * len(value)
        else:
            size += 8
    return size


def _dictionary_vr(tag: int) -> str:
    """A tag's VR in the dictionary, "UN" when it is not there."""
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"
