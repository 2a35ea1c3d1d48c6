"""Who made a result: the algorithm's name, version and equipment, as IHE AIR asks.

Result objects name the algorithm in the Contributing Equipment Sequence
(Purpose of Reference: Newcode1, 99IHE, "Processing Algorithm"; manufacturer,
model name, software versions, and a Device UID that changes whenever the
weights change) and, inside the SR, in TID 4019 Algorithm Identification.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from highdicom import ContributingEquipment
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from inference.localize import THROUGH_PLANE_MM
from inference.model_info import ARCHITECTURE_NAMES, ModelInfo
from inference.version import software_version

MANUFACTURER = "lungsys"
DISCLAIMER = "AI result - not for primary diagnosis"
#: Series Descriptions of the result series: short, starting with "AI" (PACS lists cut them).
SR_DESCRIPTION = "AI lung report (lungsys)"
SC_DESCRIPTION = "AI lesion heatmaps (lungsys)"
SEG_DESCRIPTION = "AI lesion segmentation (lungsys)"
KO_DESCRIPTION = "AI key images (lungsys)"
PM_DESCRIPTION = "AI lesion map (lungsys)"
GSPS_DESCRIPTION = "AI lesion outlines (lungsys)"
PROCESSING_ALGORITHM = Code("Newcode1", "99IHE", "Processing Algorithm")


def stamp_series(ds) -> None:
    """Series Date and Time: when the result series was made (PACS lists file by them)."""
    now = datetime.datetime.now()
    ds.SeriesDate, ds.SeriesTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")


@dataclass(frozen=True)
class AlgorithmIdentity:
    """The model that produced a result, as result objects name it."""

    model_version: str
    device_uid: str
    profile: str
    method: str
    content_sha256: str
    arch: str = "m3"
    crop: str = "lungs"
    mirror: bool = True

    @classmethod
    def from_model_info(cls, info: ModelInfo, method: str) -> "AlgorithmIdentity":
        return cls(model_version=info.version, device_uid=info.device_uid,
                   profile=info.profile, method=str(method),
                   content_sha256=info.content_sha256 or "", arch=info.arch, crop=info.crop,
                   mirror=info.mirror)

    @property
    def algorithm_name(self) -> str:
        """TID 4019 Algorithm Name: "lungsys M3 Lung-Sys", "lungsys LA-DNN", ..."""
        return f"{MANUFACTURER} {ARCHITECTURE_NAMES.get(self.arch, self.arch)}"

    @property
    def model_name(self) -> str:
        """The architecture and its profile, e.g. "LA-DNN (ladnn-small profile)"."""
        return f"{ARCHITECTURE_NAMES.get(self.arch, self.arch)} ({self.profile} profile)"

    @property
    def parameters(self) -> list[str]:
        """TID 4019 Algorithm Parameters: what a reader needs to reproduce the result."""
        sha = f"weights sha256={self.content_sha256[:16]}"
        if self.arch == "dualsampling":
            return ["patient-level method=volume ensemble", "volume window=-1350,150", sha]
        return [f"patient-level method={self.method}", "window width=1200",
                "window centres=-700,-600,-500",
                "views=as acquired and mirrored" if self.mirror else "views=as acquired",
                f"crop={self.crop}", f"lesion maps through-plane={THROUGH_PLANE_MM:g} mm", sha]

    def contributing_equipment(self) -> ContributingEquipment:
        """The Contributing Equipment item naming this algorithm (IHE AIR)."""
        item = ContributingEquipment(
            manufacturer=MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=self.model_name,
            software_versions=[software_version(), self.model_version],
            contribution_description=DISCLAIMER)
        # highdicom only takes CID 7005 purposes; IHE AIR asks for its own code
        item.PurposeOfReferenceCodeSequence = [CodedConcept.from_code(PROCESSING_ALGORITHM)]
        item.DeviceUID = self.device_uid
        return item
