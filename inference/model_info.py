"""The model a result comes from, as one small value.

Kept apart from :mod:`inference.identity` (highdicom) and the networks (torch):
the worker process sends it to the node, and unpickling it there must not
load either into the receiving process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

#: What result objects and logs call each architecture (the Manufacturer's Model Name).
ARCHITECTURE_NAMES = {"m3": "M3 Lung-Sys", "hu2020": "Hu 2020 multi-scale CNN",
                      "ladnn": "LA-DNN", "dualsampling": "Dual-sampling attention network"}


#: Below this highest class probability a result is flagged low confidence: no class is
#: more likely than the three others together.
LOW_CONFIDENCE = 0.5


def low_confidence(probabilities) -> bool:
    """Whether the classes' ``probabilities`` are too near uniform for the diagnosis to
    mean much (the highest below :data:`LOW_CONFIDENCE`)."""
    return float(max(probabilities)) < LOW_CONFIDENCE


def recorded_low_confidence(probabilities: dict | None) -> bool | None:
    """:func:`low_confidence` of a recorded result's probabilities by class (a job's);
    None when it has none (a job not done)."""
    return low_confidence(probabilities.values()) if probabilities else None


class Untrained(NamedTuple):
    """What is said of a model whose diagnosis comes from an untrained network."""

    caution: str    # to a reader of its results (the SR, the console, a webhook)
    label: str      # as short, burned into the heatmaps
    remedy: str     # to the one who runs it (logs, the command line)


#: What is untrained where the diagnosis comes from (inference.model_file.untrained).
UNTRAINED = {
    "model": Untrained(
        "this model is untrained: its diagnosis means nothing",
        "untrained model: the diagnosis means nothing",
        "it was made by 'lungsys model init' (or its slice network was): train it with "
        "'lungsys train slice' and 'lungsys train patient'"),
    "patient": Untrained(
        "this model's patient-level network is untrained: its diagnosis means nothing",
        "untrained patient network: the diagnosis means nothing",
        "only its slice network was trained ('lungsys train slice'), and the "
        "non-parametric assessment's diagnosis holds ([model] method = "
        "\"nonparametric\"); train the patient network with 'lungsys train patient "
        "--slice-model MODEL'"),
}


def advice_for(untrained: str) -> str:
    """What the one who runs the model is told: the caution and what to do about it."""
    return f"{UNTRAINED[untrained].caution}; {UNTRAINED[untrained].remedy}" \
        if untrained else ""


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
    crop: str = "lungs"          # the slices' crop (inference.profiles.CROPS)
    mirror: bool = True          # slices averaged with their mirror image (Engine's mirror)
    #: what is untrained where the diagnosis comes from (UNTRAINED's keys), or ""
    untrained: str = ""

    @property
    def caution(self) -> str:
        """What a reader of its results must know before trusting the diagnosis, or ""."""
        return UNTRAINED[self.untrained].caution if self.untrained else ""

    @property
    def advice(self) -> str:
        """The caution and what to do about it, for logs and the command line."""
        return advice_for(self.untrained)

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
