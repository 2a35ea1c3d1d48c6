"""Chest anatomy of the phantom as analytic shapes in patient coordinates.

Coordinates are DICOM's patient system in millimetres, relative to the
patient: x towards the patient's left, y towards the back (posterior), z
towards the head. z = 0 is the lowest point of the lungs (the costophrenic
recesses), z = ``height`` the lung apices.

Every shape is a function of (x, y, z) arrays that broadcast, so the same
code tests single points (tree growth, lesion placement) and renders whole
slices (with x a row vector and y a column vector).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RIGHT, LEFT = 1, 2  # lung side labels (patient's right is -x)


def ellipse_radius(x, y, a, b):
    """Normalised radius of an ellipse: < 1 inside, 1 on the boundary."""
    return np.sqrt((x / a) ** 2 + (y / b) ** 2)


@dataclass(frozen=True)
class Fissures:
    """Oblique fissures (both lungs) and the horizontal fissure (right lung).

    The oblique fissure is the plane z = z0 + slope * (y - y0): it runs from
    posterior-superior to anterior-inferior; the lower lobe lies below it.
    """

    z0: float
    y0: float
    slope: float
    horizontal_z: float

    def oblique_distance(self, y, z):
        """Signed distance (mm) to the oblique plane, > 0 above/anterior."""
        return (z - self.z0 - self.slope * (y - self.y0)) / np.hypot(1.0, self.slope)

    def lobe(self, side, y, z):
        """Lobe names as small integers: 1 upper, 2 middle/lingula, 3 lower."""
        above = self.oblique_distance(y, z) > 0
        upper = z > self.horizontal_z
        out = np.where(above, np.where((side == LEFT) | upper, 1, 2), 3)
        return out


LOBE_NAMES = {(RIGHT, 1): "right upper lobe", (RIGHT, 2): "right middle lobe",
              (RIGHT, 3): "right lower lobe", (LEFT, 1): "left upper lobe",
              (LEFT, 2): "left upper lobe", (LEFT, 3): "left lower lobe"}


@dataclass(frozen=True)
class Anatomy:
    """One patient's body and thorax dimensions (mm)."""

    body_a: float          # half width of the body
    body_b: float          # half depth (anterior-posterior) of the body
    fat: float             # subcutaneous fat thickness
    muscle: float          # chest wall muscle thickness
    height: float          # lung height, base to apex
    heart_shift: float     # heart centre, towards the left
    heart_scale: float
    right_dome: float      # height of the right hemidiaphragm dome (fraction of height)
    left_dome: float
    rib_pitch: float
    rib_drop: float
    fissures: Fissures

    SKIN = 2.0
    RIB_BAND = 11.0

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "Anatomy":
        body_a = rng.uniform(128, 178)
        body_b = body_a * rng.uniform(0.62, 0.74)
        height = rng.uniform(205, 255) * (0.85 + 0.15 * body_a / 150)
        wall = cls.SKIN + cls.RIB_BAND
        fat = rng.uniform(5, 24) * body_a / 150
        muscle = rng.uniform(8, 16)
        bt = body_b - wall - fat - muscle
        fissures = Fissures(z0=0.55 * height, y0=0.1 * bt, slope=rng.uniform(0.9, 1.3),
                            horizontal_z=rng.uniform(0.45, 0.55) * height)
        return cls(body_a=body_a, body_b=body_b, fat=fat, muscle=muscle, height=height,
                   heart_shift=rng.uniform(10, 25), heart_scale=rng.uniform(0.9, 1.1),
                   right_dome=rng.uniform(0.24, 0.32), left_dome=rng.uniform(0.18, 0.26),
                   rib_pitch=rng.uniform(20, 24), rib_drop=rng.uniform(55, 80),
                   fissures=fissures)

    # --- body and chest wall -------------------------------------------------
    def taper(self, z):
        """Narrowing of the thorax towards the apex (1 at the base)."""
        t = np.clip((z - 0.55 * self.height) / (0.6 * self.height), 0.0, 1.0)
        return 1.0 - 0.22 * t ** 2

    def body_axes(self, z):
        return self.body_a * (0.9 + 0.1 * self.taper(z)), self.body_b

    def interior_axes(self, z):
        """Semi-axes of the thoracic cavity (inside the ribs)."""
        a, b = self.body_axes(z)
        wall = self.SKIN + self.fat + self.muscle + self.RIB_BAND
        return (a - wall) * self.taper(z), b - wall

    # --- mediastinum ---------------------------------------------------------
    @property
    def spine_y(self) -> float:
        return self.interior_axes(0.5 * self.height)[1] - 8.0

    SPINE_R = 17.0

    @property
    def trachea_y(self) -> float:
        return self.spine_y - 48.0

    @property
    def carina_z(self) -> float:
        return 0.64 * self.height

    def hilum(self, side: int) -> np.ndarray:
        s = -1.0 if side == RIGHT else 1.0
        at = self.interior_axes(self.carina_z)[0]
        return np.array([s * 0.30 * at, self.trachea_y + 14.0, self.carina_z - 28.0])

    def heart(self, x, y, z):
        """Normalised ellipsoid radius of the heart (< 1 inside)."""
        at, bt = self.interior_axes(0.25 * self.height)
        s = self.heart_scale
        return np.sqrt(((x - self.heart_shift) / (0.44 * at * s)) ** 2
                       + ((y + 0.22 * bt) / (0.50 * bt * s)) ** 2
                       + ((z - 0.24 * self.height) / (0.24 * self.height * s)) ** 2)

    def aorta_segments(self) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """Ascending aorta, arch, descending aorta and pulmonary trunk as capsules."""
        h, bt = self.height, self.interior_axes(0.5 * self.height)[1]
        asc = np.array([-14.0, -0.28 * bt, 0.40 * h])
        top = 0.76 * h
        desc_x, desc_y = 20.0, self.spine_y - 24.0
        segs = [(asc, np.array([asc[0], asc[1], top]), 14.0)]
        # the arch: a half turn from the ascending to the descending aorta
        angles = np.linspace(0.0, np.pi, 7)
        cx, cy = (asc[0] + desc_x) / 2, (asc[1] + desc_y) / 2
        rx, ry = (desc_x - asc[0]) / 2, (desc_y - asc[1]) / 2
        pts = [np.array([cx - rx * np.cos(t), cy - ry * np.cos(t), top + 10 * np.sin(t)])
               for t in angles]
        segs += [(p, q, 13.0) for p, q in zip(pts[:-1], pts[1:])]
        segs.append((np.array([desc_x, desc_y, top]), np.array([desc_x, desc_y, -40.0]), 12.0))
        trunk0 = np.array([12.0, -0.30 * bt, 0.46 * h])
        trunk1 = np.array([22.0, -0.12 * bt, 0.58 * h])
        segs.append((trunk0, trunk1, 13.0))
        return segs

    def in_mediastinum(self, x, y, z):
        """Everything between the lungs that is not lung (excluded from them)."""
        slab = np.abs(x - 4.0) < 17.0 + 0 * y
        heart = self.heart(x, y, z) < 1.08
        spine = np.hypot(x, y - self.spine_y) < self.SPINE_R + 6.0
        return slab | heart | spine

    # --- lungs ---------------------------------------------------------------
    def diaphragm_z(self, side, x, y):
        """Height of the diaphragm under a point (the lung lies above it)."""
        at, bt = self.interior_axes(0.0)
        s = np.where(side == RIGHT, -1.0, 1.0)
        dome = np.where(side == RIGHT, self.right_dome, self.left_dome) * self.height
        r2 = (x - s * 0.45 * at) ** 2 + ((y + 0.15 * bt) * 1.1) ** 2
        return dome - r2 / (2.0 * 75.0)

    def apex_z(self, side, x, y):
        """Height of the lung's top surface over a point."""
        at, bt = self.interior_axes(self.height)
        s = np.where(side == RIGHT, -1.0, 1.0)
        r2 = (x - s * 0.48 * at) ** 2 + ((y - 0.1 * bt) * 1.15) ** 2
        return self.height - r2 / (2.0 * 55.0)

    def lung_side(self, x, y, z):
        """0 outside the lungs, RIGHT or LEFT inside one."""
        x, y, z = np.broadcast_arrays(x, y, z)
        side = np.where(x < 4.0, RIGHT, LEFT)
        at, bt = self.interior_axes(z)
        inside = ellipse_radius(x, y, at, bt) < 1.0
        inside &= z >= 0.0
        inside &= z > self.diaphragm_z(side, x, y)
        inside &= z < self.apex_z(side, x, y)
        inside &= ~self.in_mediastinum(x, y, z)
        return np.where(inside, side, 0).astype(np.int8)

    def zone(self, z) -> str:
        """Upper, middle or lower third of the lung height."""
        u = float(z) / self.height
        return "upper" if u > 2 / 3 else ("middle" if u > 1 / 3 else "lower")
