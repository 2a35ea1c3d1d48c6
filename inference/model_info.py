"""The model a result comes from, as one small value.

Kept apart from :mod:`inference.identity` (highdicom) and the networks (torch):
the worker process sends it to the node, and unpickling it there must not
load either into the receiving process.
"""

from __future__ import annotations

from dataclasses import dataclass

#: What result objects and logs call each architecture (the Manufacturer's Model Name).
ARCHITECTURE_NAMES = {"m3": "M3 Lung-Sys", "hu2020": "Hu 2020 multi-scale CNN",
                      "ladnn": "LA-DNN", "dualsampling": "Dual-sampling attention network"}


@dataclass(frozen=True)
class ModelInfo:
    """The model a result comes from: one value for the engine, the worker and the results."""

    version: str
    device_uid: str
    profile: str
    content_sha256: str
    device: str = ""
    intended_use: str = ""       # e.g. a phantom-trained model: "demonstration model ..."
    arch: str = "m3"             # inference.profiles.ARCHITECTURES
    crop: str = "lungs"          # the slices' crop (inference.preprocess.CROPS)
    mirror: bool = True          # slices averaged with their mirror image (Engine's mirror)
    #: what a reader must know before trusting the diagnosis (LungSysModel.caution), or ""
    caution: str = ""

    @property
    def architecture(self) -> str:
        """The architecture's name, e.g. "M3 Lung-Sys" (a version like "small-..." does not
        say it)."""
        return ARCHITECTURE_NAMES.get(self.arch, self.arch)

    def to_json(self) -> dict:
        """As ``lungsys analyze --json`` prints it."""
        return {"version": self.version, "content_sha256": self.content_sha256,
                "device_uid": self.device_uid, "profile": self.profile, "arch": self.arch,
                "crop": self.crop, "mirror": self.mirror, "device": self.device,
                "caution": self.caution}
