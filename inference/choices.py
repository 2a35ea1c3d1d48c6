"""The choices a user makes about an analysis, defined once (the configuration, the
command line, the engine, the export and the evaluation all use these)."""

from __future__ import annotations

import enum


class PatientMethod(enum.StrEnum):
    """How the patient's diagnosis is made from the slices (paper III-C and appendix)."""

    network = "network"                  # the patient-level network
    nonparametric = "nonparametric"      # the paper's parameter-free assessment (Eq. 4-5)


class HeatmapChoice(enum.StrEnum):
    """Which slices get a heatmap Secondary Capture."""

    lesion = "lesion"                    # those the model flags as lesion-bearing
    all = "all"
    none = "none"
