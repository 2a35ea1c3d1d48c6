"""Typed results of analysing one CT series."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from inference.localize import LesionBox
from inference.preprocess import uncrop
from inference.choices import PatientMethod
from inference.model_info import UNTRAINED, ModelInfo, low_confidence
from inference.profiles import CLASSES


@dataclass
class SliceResult:
    """What the model says about one slice (in the series' order)."""

    index: int
    sop_instance_uid: str
    frame: int | None
    lesion_probability: float
    class_probabilities: np.ndarray   # (4,), the four-class head's, averaged over windows
    boxes: list[LesionBox]
    infected_fraction: float          # lesion region / lung, this slice
    instance_number: int | None = None   # the CT's, as PACS and viewers show it
    z_mm: float | None = None            # Image Position (Patient) z of the slice
    #: a lesion-typing model's (LA-DNN) probability of each lesion type on the slice
    lesion_types: dict[str, float] | None = None

    @property
    def shown_types(self) -> list[str]:
        """The lesion types the model finds on the slice (probability 0.5 or more)."""
        return [name for name, p in (self.lesion_types or {}).items() if p >= 0.5]

    @property
    def has_lesion(self) -> bool:
        return self.lesion_probability >= 0.5

    @property
    def label(self) -> str:
        """The slice as a reader finds it in PACS: "image 30 (z -113.9 mm)" ("image 1 frame 30
        (z ...)" in a multi-frame instance)."""
        number = (f"image {self.instance_number}" if self.instance_number is not None
                  else f"slice {self.index + 1}")
        if self.frame is not None:
            number += f" frame {self.frame}"
        return number + (f" (z {self.z_mm:.1f} mm)" if self.z_mm is not None else "")


@dataclass
class LesionMaps:
    """Lesion maps at the network's resolution, with what puts them back on the slices."""

    maps: np.ndarray                  # (n, h, w) float32 in [0, 1], lesion evidence
    boxes: np.ndarray                 # (n, 4) crop boxes on the source grid
    shape: tuple[int, int]            # (rows, columns) of the source slices
    #: slice index -> its lesion region as the engine cut it (bits packed; lesion slices only)
    regions: dict[int, np.ndarray] = field(default_factory=dict)

    def on_grid(self, index: int) -> np.ndarray:
        """The map of one slice on its original pixel grid, zero outside the crop."""
        return uncrop(self.maps[index:index + 1], self.boxes[index:index + 1], self.shape)[0]

    def keep_region(self, index: int, region: np.ndarray) -> None:
        """Keep the region the engine measured, so that results (the SEG) need not cut it
        again."""
        self.regions[index] = np.packbits(region, axis=None)

    def region(self, index: int) -> np.ndarray:
        """The kept region of a slice on its pixel grid (all False when none was kept)."""
        packed = self.regions.get(index)
        if packed is None:
            return np.zeros(self.shape, dtype=bool)
        size = self.shape[0] * self.shape[1]
        return np.unpackbits(packed, count=size).astype(bool).reshape(self.shape)


@dataclass
class AnalysisResult:
    """A patient's diagnosis, per-slice findings and lesion maps."""

    diagnosis_index: int
    probabilities: np.ndarray         # (4,) of the chosen patient-level method
    method: PatientMethod
    network_probabilities: np.ndarray
    nonparametric_scores: np.ndarray  # N_k / N of the paper's assessment
    nonparametric_diagnosis_index: int
    infected_fraction: float          # lesion / lung over the whole volume
    slices: list[SliceResult]
    maps: LesionMaps
    timings: dict[str, float] = field(default_factory=dict)
    model: ModelInfo | None = None    # version, content hash, device UID, profile

    @property
    def diagnosis(self) -> str:
        return CLASSES[self.diagnosis_index]

    @property
    def lesion_slices(self) -> list[SliceResult]:
        return [s for s in self.slices if s.has_lesion]

    @property
    def low_confidence(self) -> bool:
        """No class is more likely than the three others together (the highest probability
        is below :data:`~inference.model_info.LOW_CONFIDENCE`): the four are too near
        uniform for the diagnosis to mean much, and the report says so."""
        return low_confidence(self.probabilities)

    @property
    def warning(self) -> str:
        """"Warning: ... ." for the start of a text a reader sees beside the result (the
        SR's comment, the key images' description) when its model is untrained, or ""."""
        caution = self.model.caution if self.model is not None else ""
        return f"Warning: {caution}. " if caution else ""

    @property
    def short_warning(self) -> str:
        """"WARNING: untrained ..." in at most 64 characters, for where little text goes
        (a heatmap's line, a SEG's, map's or presentation state's Content Description),
        or ""."""
        untrained = self.model.untrained if self.model is not None else ""
        return f"WARNING: {UNTRAINED[untrained].label}" if untrained else ""

    def to_json(self) -> dict:
        """The result as JSON-ready types (the ``--json`` output of ``lungsys analyze``)."""
        return {
            "diagnosis": self.diagnosis,
            "low_confidence": self.low_confidence,
            "probabilities": {c: round(float(p), 6) for c, p in zip(CLASSES, self.probabilities)},
            "method": self.method,
            "network_probabilities": {c: round(float(p), 6)
                                      for c, p in zip(CLASSES, self.network_probabilities)},
            str(PatientMethod.nonparametric): {
                "diagnosis": CLASSES[self.nonparametric_diagnosis_index],
                "scores": {c: round(float(p), 6)
                           for c, p in zip(CLASSES, self.nonparametric_scores)}},
            "infected_fraction": round(self.infected_fraction, 6),
            "slices": [{
                "index": s.index,
                "sop_instance_uid": s.sop_instance_uid,
                "instance_number": s.instance_number,
                "z_mm": None if s.z_mm is None else round(s.z_mm, 2),
                **({"frame": s.frame} if s.frame is not None else {}),
                "lesion_probability": round(s.lesion_probability, 6),
                "class_probabilities": {c: round(float(p), 6)
                                        for c, p in zip(CLASSES, s.class_probabilities)},
                "infected_fraction": round(s.infected_fraction, 6),
                **({"lesion_types": {t: round(p, 6) for t, p in s.lesion_types.items()}}
                   if s.lesion_types is not None else {}),
                "boxes": [{"row0": b.row0, "col0": b.col0, "row1": b.row1, "col1": b.col1,
                           "score": round(b.score, 4)} for b in s.boxes],
            } for s in self.slices],
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "model": self.model.to_json() if self.model is not None else {},
        }
