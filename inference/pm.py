"""The lesion map as a Parametric Map: evidence 0 to 1 that viewers overlay as colour.

OHIF and other viewers fuse a Parametric Map with the CT it shares a Frame of
Reference with. Kept small on purpose: only the slices the model flags as
lesion-bearing get a frame, on a grid ``REDUCTION`` times coarser than the CT
(each value the mean of a ``REDUCTION`` x ``REDUCTION`` block, its position the
block's centre), stored as 16-bit integers (the smallest a Parametric Map
allows) with a Real World Value Mapping (slope 1/1000) to the lesion evidence
0-1 of :mod:`inference.localize`. A 300-slice study with 40 lesion slices of
512 x 512 gives 40 frames of 128 x 128 x 2 bytes, 1.25 MiB (``bench/bench_results.py``
measures it). Off by default (``[results] objects`` adds ``"pm"``); none is written when
no slice is flagged, nor for multi-frame CT sources yet.
"""

from __future__ import annotations

import logging

import highdicom as hd
import numpy as np
from highdicom.pm import ParametricMap, RealWorldValueMapping
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from inference.identity import PM_DESCRIPTION, MANUFACTURER, AlgorithmIdentity, stamp_series
from inference.results import AnalysisResult
from inference.series import CTSeries
from inference.version import software_version

log = logging.getLogger(__name__)

#: The map's grid is this many times coarser than the CT's, in rows and in columns.
REDUCTION = 4
#: Stored values per unit of evidence: thousandths (Parametric Maps store 16-bit integers).
LEVELS = 1000
UNIT_ONE = Code("1", "UCUM", "no units")


def reduced(values: np.ndarray, factor: int = REDUCTION) -> np.ndarray:
    """Block means of a (rows, columns) map; the edges padded with zeros to whole blocks."""
    rows, cols = values.shape
    padded = np.zeros((-(-rows // factor) * factor, -(-cols // factor) * factor),
                      dtype=np.float32)
    padded[:rows, :cols] = values
    r, c = padded.shape
    return padded.reshape(r // factor, factor, c // factor, factor).mean(axis=(1, 3))


def block_origin(source: Dataset, factor: int = REDUCTION) -> list[float]:
    """Image Position (Patient) of the reduced grid's first pixel: the centre of the
    first ``factor`` x ``factor`` block of the source slice."""
    origin = np.asarray(source.ImagePositionPatient, dtype=float)
    orientation = np.asarray(source.ImageOrientationPatient, dtype=float)
    along_row, along_column = orientation[:3], orientation[3:]
    row_spacing, column_spacing = (float(v) for v in source.PixelSpacing)
    shift = (factor - 1) / 2
    return [float(v) for v in origin + shift * column_spacing * along_row
            + shift * row_spacing * along_column]


def build_pm(result: AnalysisResult, series: CTSeries, sources: list[Dataset],
             frames: list[int | None], identity: AlgorithmIdentity, *,
             series_instance_uid: str, series_number: int,
             sop_instance_uid: str) -> ParametricMap | None:
    """The Parametric Map of one analysis, or None when no slice is flagged."""
    if any(f is not None for f in frames):
        log.info("no Parametric Map for a multi-frame CT source (not supported yet)")
        return None
    flagged = result.lesion_slices
    if not flagged:
        return None
    chosen = [sources[s.index] for s in flagged]
    pixels = np.stack([np.round(np.clip(reduced(result.maps.on_grid(s.index)), 0, 1) * LEVELS)
                       .astype(np.uint16) for s in flagged])
    spacing = [float(v) * REDUCTION for v in chosen[0].PixelSpacing]
    thickness = series.slice_thickness or series.slice_spacing
    mapping = RealWorldValueMapping(
        lut_label="LESION", lut_explanation="AI lesion evidence, 0 (none) to 1",
        unit=UNIT_ONE, value_range=(0, LEVELS), slope=1.0 / LEVELS, intercept=0.0)
    pm = ParametricMap(
        source_images=chosen, pixel_array=pixels, series_instance_uid=series_instance_uid,
        series_number=series_number, sop_instance_uid=sop_instance_uid, instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=identity.model_name,
        software_versions=[software_version(), identity.model_version],
        device_serial_number=identity.device_uid,
        contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=LEVELS / 2,
                                                         window_width=LEVELS)],
        content_label="AI_LESION_MAP",
        content_description=result.short_warning or "AI lesion evidence map",
        pixel_measures=hd.PixelMeasuresSequence(
            pixel_spacing=spacing, slice_thickness=float(thickness) if thickness else None),
        plane_orientation=hd.PlaneOrientationSequence(
            coordinate_system="PATIENT",
            image_orientation=[float(v) for v in chosen[0].ImageOrientationPatient]),
        plane_positions=[hd.PlanePositionSequence(coordinate_system="PATIENT",
                                                  image_position=block_origin(ds))
                         for ds in chosen],
        contributing_equipment=[identity.contributing_equipment()])
    pm.SeriesDescription = PM_DESCRIPTION
    pm.BodyPartExamined = chosen[0].get("BodyPartExamined") or "CHEST"   # the lungs: paired
    stamp_series(pm)
    return pm
