"""Box outlines as a Grayscale Softcopy Presentation State, for PACS that draw GSPS.

Many PACS viewers render a GSPS over the images it references but show
neither SEG nor SR measurements. This one references the lesion slices only
(they are what it annotates), puts each lesion box as a closed polyline in
image pixels on a graphic layer "AI LESIONS" with a short label above it
("AI lesion p=0.93"), and sets the lung window the heatmaps use, so that
opening it shows the slice as the model saw it. Off by default
(``[results] objects`` adds ``"gsps"``); none is written when no slice has a box,
nor for multi-frame CT sources yet.
"""

from __future__ import annotations

import logging

import highdicom as hd
import numpy as np
from highdicom.pr import (GraphicAnnotation, GraphicLayer, GraphicObject,
                          GrayscaleSoftcopyPresentationState, SoftcopyVOILUTTransformation,
                          TextObject)
from pydicom.dataset import Dataset

from inference.heatmap import DISPLAY_CENTRE, DISPLAY_WIDTH
from inference.identity import GSPS_DESCRIPTION, MANUFACTURER, AlgorithmIdentity, stamp_series
from inference.results import AnalysisResult
from inference.version import software_version

log = logging.getLogger(__name__)

LAYER = "AI LESIONS"
#: Pixels between a box's top edge and its label's baseline.
LABEL_GAP = 3


def build_gsps(result: AnalysisResult, sources: list[Dataset], frames: list[int | None],
               identity: AlgorithmIdentity, *, series_instance_uid: str, series_number: int,
               sop_instance_uid: str) -> GrayscaleSoftcopyPresentationState | None:
    """The outlines of one analysis's lesion boxes, or None when there are none."""
    if any(f is not None for f in frames):
        log.info("no GSPS for a multi-frame CT source (not supported yet)")
        return None
    boxed = [s for s in result.lesion_slices if s.boxes]
    if not boxed:
        return None
    layer = GraphicLayer(layer_name=LAYER, order=1, description="lesion boxes found by AI")
    annotations, referenced = [], []
    for s in boxed:
        source = sources[s.index]
        referenced.append(source)
        graphics, texts = [], []
        for n, box in enumerate(s.boxes, start=1):
            # PIXEL units: column, row; 0,0 is the top left corner of the top left pixel
            # (PS3.3 C.10.5.1.2), so the box's corners are its pixel edges
            outline = np.array([[box.col0, box.row0], [box.col1, box.row0],
                                [box.col1, box.row1], [box.col0, box.row1],
                                [box.col0, box.row0]], dtype=float)
            graphics.append(GraphicObject(graphic_type="POLYLINE", graphic_data=outline,
                                          units="PIXEL", tracking_id=f"lesion {n} on "
                                          f"{s.label}"[:64], tracking_uid=hd.UID()))
            top = max(0.0, box.row0 - LABEL_GAP)
            texts.append(TextObject(text_value=f"AI lesion p={s.lesion_probability:.2f}",
                                    units="PIXEL", anchor_point=(float(box.col0), top),
                                    anchor_point_visible=False))
        frame = frames[s.index]
        annotations.append(GraphicAnnotation(
            referenced_images=[source], graphic_layer=layer,
            referenced_frame_number=frame,
            graphic_objects=graphics, text_objects=texts))
    window = SoftcopyVOILUTTransformation(window_center=DISPLAY_CENTRE,
                                          window_width=DISPLAY_WIDTH,
                                          window_explanation="AI lung window")
    gsps = GrayscaleSoftcopyPresentationState(
        referenced_images=referenced, series_instance_uid=series_instance_uid,
        series_number=series_number, sop_instance_uid=sop_instance_uid, instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=identity.model_name,
        software_versions=[software_version(), identity.model_version],
        device_serial_number=identity.device_uid, content_label="AI_LESIONS",
        content_description=(result.short_warning
                             or "Lesion boxes found by AI - not for primary diagnosis"),
        graphic_annotations=annotations, graphic_layers=[layer],
        voi_lut_transformations=[window],
        contributing_equipment=[identity.contributing_equipment()])
    gsps.SeriesDescription = GSPS_DESCRIPTION
    gsps.BodyPartExamined = referenced[0].get("BodyPartExamined") or "CHEST"  # lungs: paired
    stamp_series(gsps)
    return gsps
