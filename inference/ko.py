"""Key images: a Key Object Selection document listing the lesion slices.

PACS show a KOS titled "Of Interest" (DCM 113000, CID 7010) as the study's key
images, the flag a radiologist pages through first. It lists the CT slices the
model flags as lesion-bearing, in the series' order, and the SR whose
measurements they carry (so the PACS can open the report beside them), with a
Key Object Description saying who chose them and that the choice is an AI
result (TID 2010). The document names the algorithm as its device observer
and in the Contributing Equipment Sequence, as the other result objects do.
No KOS is made when no slice is flagged, nor yet for a multi-frame CT source
(its frames would need referencing one by one).
"""

from __future__ import annotations

import logging

from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from highdicom.sr import DeviceObserverIdentifyingAttributes, ObserverContext
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from inference.identity import (DISCLAIMER, KO_DESCRIPTION, MANUFACTURER,
                                AlgorithmIdentity, stamp_series)
from inference.results import AnalysisResult

log = logging.getLogger(__name__)

#: CID 7010 Key Object Selection Document Title: the one PACS show as key images.
OF_INTEREST = Code("113000", "DCM", "Of Interest")


def build_ko(result: AnalysisResult, sources: list[Dataset], report: Dataset | None,
             identity: AlgorithmIdentity, *, series_instance_uid: str, series_number: int,
             sop_instance_uid: str) -> KeyObjectSelectionDocument | None:
    """The key images of one analysis (``sources[i]``: slice i's CT header; ``report``:
    the SR to reference, if one is written), or None when no slice has a lesion."""
    flagged = result.lesion_slices
    if not flagged:
        return None
    if any(s.frame is not None for s in flagged):
        log.info("no key images for a multi-frame CT source (frames not referenced yet)")
        return None
    chosen = [sources[s.index] for s in flagged]
    labels = ", ".join(s.label.split(" (")[0] for s in flagged[:12])
    more = f" and {len(flagged) - 12} more" if len(flagged) > 12 else ""
    description = (f"{result.warning}{len(flagged)} CT slice(s) with lesions found by "
                   f"{identity.algorithm_name} "
                   f"{identity.model_version}: {labels}{more}. "
                   f"{'The AI report lists them. ' if report is not None else ''}{DISCLAIMER}.")
    device = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=identity.device_uid, name=identity.algorithm_name, manufacturer_name=MANUFACTURER,
            model_name=identity.model_name))
    referenced = [*chosen, *([report] if report is not None else [])]
    content = KeyObjectSelection(document_title=OF_INTEREST, referenced_objects=referenced,
                                 observer_device_context=device,
                                 description=description[:1024])
    ko = KeyObjectSelectionDocument(
        evidence=referenced, content=content, series_instance_uid=series_instance_uid,
        series_number=series_number, sop_instance_uid=sop_instance_uid, instance_number=1,
        manufacturer=MANUFACTURER, contributing_equipment=[identity.contributing_equipment()])
    ko.SeriesDescription = KO_DESCRIPTION
    stamp_series(ko)
    return ko

