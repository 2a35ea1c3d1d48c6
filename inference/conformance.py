"""The source's patient and study attributes, made fit to copy into results.

Results go into the source study with its patient and study attributes
copied (highdicom's constructors read them, and refuse values that do not
conform). Modalities and archives send values that do not conform every day
(a birth date written ``1961-07-04``, a sex ``male``, a 70-character name,
an unknown character set): none of them is needed by the model, so none may
fail a job. :func:`conformant_header` keeps every top-level text value that
conforms to its VR (PS3.5 6.2), empties the Type 2 attributes highdicom
reads when theirs does not, and leaves any other non-conforming value out,
as the standard allows for attributes the results need not carry, and so are
private elements. Values are never logged: only the keyword, at DEBUG.
"""

from __future__ import annotations

import copy
import logging

from highdicom.enum import PatientSexValues, SpecificCharacterSetValues
from pydicom import config
from pydicom.datadict import dictionary_VM, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import DA, DT, TM, validate_value

from inference.headers import encoded_size

log = logging.getLogger(__name__)

#: Read by highdicom's constructors as attributes: kept (Type 2), emptied when bad.
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
         "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")
#: What the export takes from the source itself (checked when the series was loaded).
_KEEP = frozenset({"SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                   "FrameOfReferenceUID", "PixelSpacing", "ImagePositionPatient",
                   "ImageOrientationPatient", "Rows", "Columns", "SpecificCharacterSet"})
#: Copied whatever the budget (each is short once it conforms).
_NEEDED = _KEEP | frozenset(TYPE2)
_TEXT_VRS = frozenset("AE AS CS DA DS DT IS LO LT PN SH ST TM UC UR UT".split())
_PARSE = {"DA": DA, "DT": DT, "TM": TM}
_ENUMS = {"PatientSex": {v.value for v in PatientSexValues}}
_CHARSETS = {v.value for v in SpecificCharacterSetValues} | {"", "ISO_IR 6"}
#: A sequence nesting deeper than this is not copied (the standard's objects nest a few).
MAX_NESTING = 16
#: At most this many bytes of the source's values (as encoded; a decoded sequence's
#: estimated) are copied besides what results need: a CT image's header holds a few KB;
#: an element that would pass this is left out.
MAX_COPIED_BYTES = 256 << 10


def _conforms(elem) -> bool:
    if elem.value is None or elem.value == "":
        return True
    values = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
    try:
        if dictionary_VM(elem.tag) == "1" and len(values) > 1:
            return False
        for v in values:   # a PersonName passes validate_value unchecked: give it text
            validate_value(elem.VR, str(v) if elem.VR == "PN" else v, config.RAISE)
            if elem.VR in _PARSE:
                _PARSE[elem.VR](v)
            if v not in _ENUMS.get(elem.keyword, (v,)):
                return False
    except Exception:      # the message holds the value: never log it
        return False
    return True


def _nests_deeper(elem, limit: int) -> bool:
    """Whether a sequence holds sequences more than ``limit`` deep (walked without
    recursion: copying one a hundred deep ran out of Python's stack)."""
    pending = [(elem, 1)] if elem.VR == "SQ" else []
    while pending:
        sequence, depth = pending.pop()
        if depth > limit:
            return True
        pending.extend((inner, depth + 1) for item in sequence.value for inner in item
                       if inner.VR == "SQ")
    return False


def conformant_header(header: Dataset) -> Dataset:
    """A copy of ``header`` whose top-level text values conform (see the module), without
    its private elements (no result copies them; a sender's 20,000-item private sequence
    cost a job minutes and a gigabyte), sequences nesting deeper than MAX_NESTING,
    values that cannot be decoded, and values past MAX_COPIED_BYTES in all but those
    results need (TYPE2, ``_KEEP``): one text value of 30 million values, 59 KB deflated,
    was 2.6 GB decoded.

    Never raises; logs keywords only, at DEBUG.
    """
    ds = Dataset()
    ds.file_meta = copy.deepcopy(getattr(header, "file_meta", Dataset()))
    copied = 0
    for tag in header.keys():                 # (private ones are not even decoded)
        keyword = keyword_for_tag(tag)
        if tag.is_private:
            continue
        if keyword not in _NEEDED:            # (what results need is copied whatever)
            size = encoded_size(header.get_item(tag))
            if copied + size > MAX_COPIED_BYTES:
                log.debug("the source's %s is too large to copy", keyword or tag)
                continue
            copied += size
        try:
            elem = header[tag]
        except Exception:                     # a value of the wrong length, say
            log.debug("the source's %s cannot be decoded: not copied", keyword or tag)
            continue
        if _nests_deeper(elem, MAX_NESTING):
            log.debug("the source's %s nests deeper than %d: not copied", elem.keyword,
                      MAX_NESTING)
            continue
        ds.add(copy.deepcopy(elem))
    charsets = ds.get("SpecificCharacterSet") or "ISO_IR 6"
    if any(c not in _CHARSETS
           for c in (charsets if isinstance(charsets, MultiValue) else [charsets])):
        ds.SpecificCharacterSet = "ISO_IR 192"   # the values are decoded text already
        log.debug("the source's Specific Character Set is unknown: results use ISO_IR 192")
    for elem in list(ds):
        if elem.VR not in _TEXT_VRS or elem.keyword in _KEEP or _conforms(elem):
            continue
        if elem.keyword in TYPE2:
            elem.value = None
        else:
            del ds[elem.tag]
        log.debug("the source's %s does not conform to its VR: not copied", elem.keyword)
    for keyword in TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, None)
    return ds
