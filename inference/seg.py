"""The lesion region as a DICOM Segmentation: what viewers overlay on the CT.

One binary segment, "lesion" (SCT Lesion, category Morphologically abnormal
structure, site lung); from a lesion-typing model (LA-DNN) one segment per
lesion type found instead, named and coded as the SR codes it
(:data:`inference.sr.LESION_TYPE_CODES`): the model types a slice, not a
pixel, so each slice's region goes to the most probable of the types shown on
that slice ("lesion" where none is), and the segments never overlap, which
every viewer reads (overlapping binary segments are not). Algorithm type
AUTOMATIC with the model's algorithm identification, in the CT's Frame of
Reference; one frame per CT slice whose region is not empty (highdicom leaves
the empty ones out), each referencing its source slice; bit-packed, or JPEG
2000 Lossless with ``[results] seg_compression = "jpeg2000"`` (about 8 times
smaller; OHIF 3.13 shows it, but ``@cornerstonejs/adapters``' file reader and
some PACS do not, so it is not the default). The region is the one the engine
measured (kept with the lesion maps): the lesion map of each lesion-bearing
slice cut by :func:`inference.localize.lesion_region`. No SEG is made when no
slice has a lesion region (an empty segmentation is not sent), nor for
multi-frame (enhanced) CT sources yet. From an untrained model its Content Description
says so (:attr:`~inference.results.AnalysisResult.short_warning`), as the map's
and the presentation state's do.
"""

from __future__ import annotations

import logging

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from inference.choices import SegCompression
from inference.identity import MANUFACTURER, SEG_DESCRIPTION, \
    AlgorithmIdentity, stamp_series
from inference.results import AnalysisResult, SliceResult
from inference.sr import LESION_TYPE_CODES, LOCAL_SCHEME, local_scheme
from inference.series import CTSeries
from inference.version import software_version

log = logging.getLogger(__name__)

#: The segment's Recommended Display CIELab Value: the heatmaps' red (viewers otherwise pick
#: one and OHIF says so in a warning).
LESION_COLOUR = hd.color.CIELabColor(53.2, 80.1, 67.2)
#: The lesion types' colours, told apart from each other and from the lesion red: yellow,
#: blue, green, magenta, cyan (CIELab of the sRGB primaries and secondaries).
TYPE_COLOURS = {
    "ground_glass_opacity": hd.color.CIELabColor(97.1, -21.6, 94.5),
    "consolidation": hd.color.CIELabColor(32.3, 79.2, -107.9),
    "crazy_paving": hd.color.CIELabColor(87.7, -86.2, 83.2),
    "air_bronchogram": hd.color.CIELabColor(60.3, 98.2, -60.8),
    "interlobular_septal_thickening": hd.color.CIELabColor(91.1, -48.1, -14.1),
}

#: The SEG's transfer syntax by ``[results] seg_compression``: bit-packed native pixels, or
#: JPEG 2000 Lossless, the one compressed syntax highdicom writes binary segments in.
TRANSFER_SYNTAXES = {SegCompression.none: ExplicitVRLittleEndian,
                     SegCompression.jpeg2000: JPEG2000Lossless}


def segment_of(s: SliceResult) -> str | None:
    """The segment a slice's region goes to: the most probable of the lesion types shown on
    it (the first of equals, in LA-DNN's order), or None for "lesion"."""
    shown = s.shown_types
    return max(shown, key=lambda t: s.lesion_types[t]) if shown else None


def segments(result: AnalysisResult) -> list[str | None]:
    """The SEG's segments in order (numbers 1, 2, ...): the lesion types the regions go to,
    in LA-DNN's order, then None ("lesion") when some region has no type. Only slices with
    a region count: a segment is never described without pixels."""
    used = {segment_of(s) for s in result.lesion_slices if s.index in result.maps.regions
            and result.maps.region(s.index).any()}
    return [t for t in LESION_TYPE_CODES if t in used] + ([None] if None in used else [])


def lesion_mask(result: AnalysisResult, series: CTSeries) -> np.ndarray:
    """(slices, rows, columns) bool: the lesion region of every lesion-bearing slice, as
    the engine cut it (:meth:`~inference.results.LesionMaps.region`)."""
    mask = np.zeros((len(series), *result.maps.shape), dtype=bool)
    for s in result.lesion_slices:
        mask[s.index] = result.maps.region(s.index)
    return mask


def build_seg(result: AnalysisResult, series: CTSeries, sources: list[Dataset],
              frames: list[int | None], identity: AlgorithmIdentity, *,
              series_instance_uid: str, series_number: int, sop_instance_uid: str,
              compression: SegCompression = SegCompression.none
              ) -> hd.seg.Segmentation | None:
    """The Segmentation of one analysis, or None when there is nothing to overlay."""
    if any(f is not None for f in frames):
        log.info("no SEG for a multi-frame CT source (not supported yet)")
        return None
    mask = lesion_mask(result, series)
    if not mask.any():
        return None
    algorithm = hd.AlgorithmIdentificationSequence(
        name=identity.algorithm_name, family=codes.DCM.ArtificialIntelligence,
        version=identity.model_version, parameters={"parameters": "; ".join(identity.parameters)})
    order = segments(result)
    labels = np.zeros(mask.shape, dtype=np.uint8)     # 0 background, k segment k
    for s in result.lesion_slices:
        if mask[s.index].any():
            labels[s.index][mask[s.index]] = order.index(segment_of(s)) + 1
    descriptions = [hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=LESION_TYPE_CODES[t].meaning.lower() if t else "lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=LESION_TYPE_CODES[t] if t else codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, anatomic_regions=[codes.SCT.Lung],
        display_color=TYPE_COLOURS[t] if t else LESION_COLOUR)
        for number, t in enumerate(order, start=1)]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=labels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=series_instance_uid,
        series_number=series_number, sop_instance_uid=sop_instance_uid, instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=identity.model_name,
        software_versions=[software_version(), identity.model_version],
        device_serial_number=identity.device_uid, series_description=SEG_DESCRIPTION,
        contributing_equipment=[identity.contributing_equipment()],
        content_description=result.short_warning or None,
        transfer_syntax_uid=TRANSFER_SYNTAXES[SegCompression(compression)])
    stamp_series(seg)
    if any(t and LESION_TYPE_CODES[t].scheme_designator == LOCAL_SCHEME for t in order):
        seg.CodingSchemeIdentificationSequence = [local_scheme()]
    return seg
