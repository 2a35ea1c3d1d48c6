"""The synthetic chest CT phantom: realistic studies with pixel-exact truth.

>>> from training.phantom import generate_study
>>> study = generate_study("out/covid-7", label="covid", seed=7, slices=64)
>>> study.truth["slices"][0]["has_lesion"]

See the README section "Phantom studies" for the truth format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from training.phantom.lesions import LABELS, LESION_TYPES
from training.phantom.study import Phantom, build_phantom
from training.phantom.writer import TRUTH_FORMAT, WrittenStudy, write_study

__all__ = ["LABELS", "LESION_TYPES", "TRUTH_FORMAT", "Phantom", "WrittenStudy",
           "build_phantom", "generate_study"]


def generate_study(out: str | Path, label: str, seed: int, slices: int = 64, *,
                   patient_position: str = "HFS", severity: float | None = None,
                   rows: int = 512, patient_name: str | None = None,
                   character_set: str | None = None,
                   progress: Callable[[], None] | None = None) -> WrittenStudy:
    """Draw, render and write one phantom study into ``out``."""
    ph = build_phantom(label, seed, slices, patient_position=patient_position,
                       severity=severity, rows=rows)
    hu, lung, lesion, types, type_map = ph.render(progress)
    return write_study(ph, Path(out), hu, lung, lesion, types, type_map,
                       patient_name=patient_name, character_set=character_set)
