"""Secondary Capture heatmaps: the lesion map over the CT slice, burned in.

Each image is the CT slice in a lung window with the lesion map as a colour
overlay, a colour legend, the lesion boxes, the patient's side at the left and
right edges (R / L, from the slice's orientation), and burned-in text at the
top (the algorithm, the diagnosis, the CT's Instance Number and z position,
the slice's lesion probability, "not for primary diagnosis": away from the
bottom edge, where viewers put their own text), so that any viewer shows the
same thing. The image keeps the CT slice's pixel
grid, so it carries the slice's Pixel Spacing and points back at it through
the Source Image Sequence.
"""

from __future__ import annotations

import numpy as np
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from inference.identity import MANUFACTURER, SC_DESCRIPTION, AlgorithmIdentity, stamp_series
from inference.localize import MAP_FLOOR

DISPLAY_CENTRE, DISPLAY_WIDTH = -600.0, 1500.0
#: Map values at or below this are not drawn: the floor below which nothing is lesion.
OVERLAY_FLOOR = MAP_FLOOR
OVERLAY_ALPHA = 0.55
#: A blue-cyan-green-yellow-red ramp (the familiar "jet" heatmap), value 0 to 1.
_STOPS = np.array([[0, 0, 0.5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [0.5, 0, 0]])


def colormap(values: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] for values in [0, 1], shape (..., 3)."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0) * (len(_STOPS) - 1)
    low = np.floor(v).astype(int).clip(0, len(_STOPS) - 2)
    frac = (v - low)[..., None]
    return _STOPS[low] * (1 - frac) + _STOPS[low + 1] * frac


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def render_overlay(hu: np.ndarray, lesion_map: np.ndarray, lines: list[str],
                   boxes: list[tuple[int, int, int, int]] = (),
                   markers: tuple[str, str] | None = None) -> np.ndarray:
    """``lines`` at the top left (the last one, the disclaimer, in red); ``markers`` the
    patient directions at the left and right edges (see :func:`edge_markers`)."""
    """The picture of one slice, RGB uint8 on the slice's grid."""
    gray = np.clip((hu - (DISPLAY_CENTRE - DISPLAY_WIDTH / 2)) / DISPLAY_WIDTH, 0, 1)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    # map values above the floor, stretched to the colour ramp's full range
    strength = np.clip((lesion_map - OVERLAY_FLOOR) / (1 - OVERLAY_FLOOR), 0, 1)
    alpha = (OVERLAY_ALPHA * (strength > 0) * (0.35 + 0.65 * strength))[..., None]
    rgb = rgb * (1 - alpha) + colormap(strength) * alpha
    image = Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    rows, cols = hu.shape
    for r0, c0, r1, c1 in boxes:
        draw.rectangle([c0, r0, c1 - 1, r1 - 1], outline=(255, 255, 255), width=1)
    size = max(10, rows // 40)
    font = _font(size)
    y = 4
    for k, line in enumerate(lines):
        last = k == len(lines) - 1 and len(lines) > 1
        draw.text((6, y), line, fill=(255, 80, 80) if last else (255, 255, 0), font=font)
        y += size + 3
    if markers is not None:
        big = _font(size * 2)
        left_text, right_text = markers
        draw.text((6, rows // 2 - size), left_text, fill=(255, 255, 255), font=big)
        right_x = cols - 8 - int(draw.textlength(right_text, font=big))
        draw.text((right_x, rows // 2 - rows // 6 - 3 * size - 6), right_text,
                  fill=(255, 255, 255), font=big)     # above the legend
    # legend: a vertical ramp at the right edge, "1" at the top, floor at the bottom
    height, width = rows // 3, max(8, cols // 48)
    top, left = rows // 2 - height // 2, cols - width - 6 - size * 2
    ramp = colormap(np.linspace(1, 0, height))[:, None, :].repeat(width, axis=1)
    image.paste(Image.fromarray((ramp * 255).astype(np.uint8), "RGB"), (left, top))
    draw.rectangle([left - 1, top - 1, left + width, top + height], outline=(255, 255, 255))
    draw.text((left + width + 3, top - size // 2), "1.0", fill=(255, 255, 255), font=font)
    draw.text((left + width + 3, top + height - size // 2), f"{OVERLAY_FLOOR:.1f}",
              fill=(255, 255, 255), font=font)
    label_x = min(left, cols - int(draw.textlength("lesion map", font=font)) - 4)
    draw.text((label_x, top + height + 4), "lesion map", fill=(255, 255, 255), font=font)
    return np.asarray(image)


def edge_markers(orientation) -> tuple[str, str]:
    """The patient directions at the image's left and right edges, e.g. ("R", "L") for an
    axial slice as CT shows it (the row direction points to the right edge)."""
    row = patient_orientation(orientation)[0]
    opposite = {"L": "R", "R": "L", "A": "P", "P": "A", "H": "F", "F": "H"}
    return opposite[row], row


def patient_orientation(orientation) -> tuple[str, str]:
    """Patient Orientation (row and column directions) from Image Orientation (Patient)."""
    def letter(vec) -> str:  # the dominant patient axis: +x left, +y posterior, +z head
        axis = int(np.argmax(np.abs(vec)))
        positive, negative = ("L", "P", "H")[axis], ("R", "A", "F")[axis]
        return positive if vec[axis] > 0 else negative
    return letter(orientation[:3]), letter(orientation[3:6])


def build_sc(source: Dataset, pixels: np.ndarray, *, series_instance_uid: str,
             series_number: int, sop_instance_uid: str, instance_number: int,
             identity: AlgorithmIdentity, orientation, frame: int | None = None) -> SCImage:
    """A Secondary Capture image of ``pixels`` (RGB, on ``source``'s grid) in its study."""
    sc = SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=pixels, photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT",
        series_instance_uid=series_instance_uid, series_number=series_number,
        sop_instance_uid=sop_instance_uid, instance_number=instance_number,
        manufacturer=MANUFACTURER,
        pixel_spacing=tuple(float(v) for v in source.PixelSpacing),
        patient_orientation=patient_orientation(orientation),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[identity.contributing_equipment()],
        series_description=SC_DESCRIPTION)
    stamp_series(sc)
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = (f"{identity.model_name} lesion map over the CT slice "
                                f"(window {DISPLAY_CENTRE:g}/{DISPLAY_WIDTH:g})")
    if source.get("BodyPartExamined"):
        sc.BodyPartExamined = source.BodyPartExamined
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame is not None:
        ref.ReferencedFrameNumber = frame
    sc.SourceImageSequence = Sequence([ref])
    return sc
