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


class ResultObject(enum.StrEnum):
    """The DICOM objects an analysis writes (``[results] objects``, ``analyze --objects``)."""

    sr = "sr"        # Comprehensive SR, TID 1500 measurement report
    seg = "seg"      # Segmentation of the lesion region
    ko = "ko"        # Key Object Selection of the lesion slices ("Of Interest")
    sc = "sc"        # Secondary Capture heatmaps (which slices: [model] heatmaps)
    pm = "pm"        # Parametric Map of the lesion map (off by default)
    gsps = "gsps"    # Grayscale Softcopy Presentation State: box outlines (off by default)


#: What an analysis writes unless told otherwise.
DEFAULT_OBJECTS = (ResultObject.sr, ResultObject.seg, ResultObject.ko, ResultObject.sc)


class SegCompression(enum.StrEnum):
    """How the SEG's frames are stored (``[results] seg_compression``)."""

    none = "none"            # Explicit VR Little Endian, bit-packed: every reader takes it
    jpeg2000 = "jpeg2000"    # JPEG 2000 Lossless, ~8x smaller; OHIF reads it, not every PACS
