"""One synthetic chest CT study: the patient, the scan geometry, the volume.

:func:`build_phantom` draws everything random from the seed (so the same
seed and label always give the same study); :meth:`Phantom.render` draws the
slices and their truth masks in the loader's order (ascending along the
slice normal).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.phantom.anatomy import Anatomy
from training.phantom.lesions import LABELS, Lesion, draw_lesions, type_names
from training.phantom.lungmap import LungMap
from training.phantom.render import Grid, Renderer
from training.phantom.tree import Segments, grow_trees

HU_MIN, HU_MAX = -1024.0, 3071.0
PATIENT_POSITIONS = ("HFS", "FFS")


@dataclass
class Phantom:
    """One synthetic patient: anatomy, lungs, vessel and airway trees, lesions."""

    label: str
    seed: int
    severity: float
    anatomy: Anatomy
    lungs: LungMap
    trees: Segments
    lesions: list[Lesion]
    rows: int
    spacing: float            # mm, square pixels
    recon_centre: np.ndarray  # (x, y) of the image centre, patient-relative mm
    z_rel: np.ndarray         # slice centres, patient-relative, loader order
    thickness: float
    offset: np.ndarray        # patient-relative -> DICOM patient coordinates
    patient_position: str
    noise_sd: float
    pulsation: float
    render_seed: int

    @property
    def orientation(self) -> tuple[float, ...]:
        """Image Orientation (Patient): feet-first flips the row direction."""
        row_x = 1.0 if self.patient_position == "HFS" else -1.0
        return (row_x, 0.0, 0.0, 0.0, 1.0, 0.0)

    @property
    def grid(self) -> Grid:
        half = (self.rows - 1) / 2.0
        steps = (np.arange(self.rows) - half) * self.spacing
        row_x = self.orientation[0]
        return Grid(x=self.recon_centre[0] + row_x * steps, y=self.recon_centre[1] + steps)

    def positions(self) -> np.ndarray:
        """Image Position (Patient) of every slice, DICOM coordinates."""
        g = self.grid
        out = np.empty((len(self.z_rel), 3))
        out[:, 0] = g.x[0] + self.offset[0]
        out[:, 1] = g.y[0] + self.offset[1]
        out[:, 2] = self.z_rel + self.offset[2]
        return out

    def fov_mask(self) -> np.ndarray:
        """True inside the reconstruction circle."""
        g = self.grid
        dx, dy = g.x[None, :] - self.recon_centre[0], g.y[:, None] - self.recon_centre[1]
        return dx * dx + dy * dy <= (self.rows * self.spacing / 2.0) ** 2

    def render(self, progress=None) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                             list[set[str]], np.ndarray]:
        """Draw every slice: (hu, lung masks, lesion masks, lesion types per slice, lesion
        types per pixel as TYPE_BITS).

        ``hu`` is float32 (slices, rows, rows), clipped to what 12-bit CT stores;
        outside the reconstruction circle it is -1024 HU.
        """
        rng = np.random.default_rng(self.render_seed)
        renderer = Renderer(self.anatomy, self.trees, self.lesions, self.grid, self.thickness,
                            self.noise_sd, self.pulsation, rng)
        n = len(self.z_rel)
        hu = np.empty((n, self.rows, self.rows), dtype=np.float32)
        lung = np.empty_like(hu, dtype=bool)
        lesion = np.empty_like(hu, dtype=bool)
        type_map = np.zeros(hu.shape, dtype=np.uint8)
        types: list[set[str]] = []
        fov = self.fov_mask()
        for i, z in enumerate(self.z_rel):
            img, truth = renderer.render(float(z))
            np.clip(img, HU_MIN, HU_MAX, out=img)
            img[~fov] = HU_MIN
            hu[i], lung[i], lesion[i] = img, truth.lung & fov, truth.lesion & fov
            type_map[i] = np.where(fov, truth.type_map, 0)
            types.append(set(type_names(int(np.bitwise_or.reduce(type_map[i], axis=None)))))
            if progress is not None:
                progress()
        return hu, lung, lesion, types, type_map


def build_phantom(label: str, seed: int, slices: int = 64, *, patient_position: str = "HFS",
                  severity: float | None = None, rows: int = 512) -> Phantom:
    """Draw one patient of a class and the scan of their chest.

    The scan covers the lungs from below the bases to above the apices; the
    slice spacing follows from ``slices`` and the slice thickness is drawn
    around it, within 1-5 mm.
    """
    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}; expected one of {', '.join(LABELS)}")
    if patient_position not in PATIENT_POSITIONS:
        raise ValueError(f"patient position must be one of {', '.join(PATIENT_POSITIONS)}")
    if slices < 1:
        raise ValueError("a study needs at least one slice")
    if seed < 0:
        raise ValueError("the seed must be a non-negative integer")
    rng = np.random.default_rng([seed, LABELS.index(label)])
    anatomy = Anatomy.draw(rng)
    lungs = LungMap.build(anatomy)
    trees = grow_trees(anatomy, lungs, rng)
    sev = float(rng.uniform(0.0, 1.0)) if severity is None else float(severity)
    lesions = draw_lesions(label, sev, anatomy, lungs, trees, rng)

    # the field of view fits the patient; pixel spacing as on a 512 matrix
    fov = 2 * anatomy.body_a + rng.uniform(25, 80)
    spacing = round(float(np.clip(fov / 512, 0.6, 0.9)) * 512 / rows, 4)
    recon_centre = np.array([rng.uniform(-12, 12), rng.uniform(-5, 25)])
    z_lo = -rng.uniform(8, 25)
    z_hi = anatomy.height + rng.uniform(8, 30)
    z = np.linspace(z_lo, z_hi, slices) if slices > 1 else np.array([0.55 * anatomy.height])
    step = (z_hi - z_lo) / max(slices - 1, 1)
    thickness = round(float(np.clip(step * rng.uniform(1.0, 1.25), 1.0, 5.0)), 2)
    if patient_position == "FFS":
        z = z[::-1]  # the loader orders feet-first slices from head to feet
    offset = np.array([0.0, rng.uniform(-40, 40), -rng.uniform(100, 300)])
    noise_sd = float(rng.uniform(8, 14) * (anatomy.body_a / 150) ** 2)
    pulsation = float(rng.uniform(0.5, 1.0)) if rng.random() < (0.8 if label == "healthy"
                                                                else 0.3) else 0.0
    return Phantom(label=label, seed=seed, severity=sev if label != "healthy" else 0.0,
                   anatomy=anatomy, lungs=lungs, trees=trees, lesions=lesions, rows=rows,
                   spacing=spacing, recon_centre=recon_centre, z_rel=np.round(z, 3),
                   thickness=thickness, offset=np.round(offset, 3),
                   patient_position=patient_position, noise_sd=noise_sd, pulsation=pulsation,
                   render_seed=int(rng.integers(2**31)))
