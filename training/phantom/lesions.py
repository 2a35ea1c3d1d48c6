"""Lesions of the four classes, placed as the seed papers describe them.

- COVID-19: bilateral, peripheral/subpleural, lower-zone ground-glass
  opacities, flattened against the pleura, some with a consolidated core,
  some with crazy paving (septal lines inside the GGO).
- H1N1: consolidation along the bronchovascular bundles
  (peribronchovascular) with a GGO halo, and clusters of centrilobular
  nodules that spare the subpleural lung.
- CAP: lobar or segmental consolidation confined to a lobe, with air
  bronchograms and surrounding GGO, usually in one lung.
- Healthy: no lesion.

Every lesion is a shape with a signed distance (mm, negative inside) that the
renderer evaluates per slice, plus the truth a test can check: its side,
zone, lobe and distance to the pleura.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from training.phantom.anatomy import LEFT, LOBE_NAMES, RIGHT, Anatomy
from training.phantom.lungmap import LungMap
from training.phantom.tree import ARTERY, Segments

GGO = "ground_glass_opacity"
CONSOLIDATION = "consolidation"
CRAZY_PAVING = "crazy_paving"
SEPTAL = "interlobular_septal_thickening"
AIR_BRONCHOGRAM = "air_bronchogram"
NODULE = "centrilobular_nodule"
LESION_TYPES = (GGO, CONSOLIDATION, CRAZY_PAVING, AIR_BRONCHOGRAM, SEPTAL, NODULE)
#: A pixel's lesion types as bits (``masks.npz`` ``types``): bit k is LESION_TYPES[k].
TYPE_BITS = {name: 1 << k for k, name in enumerate(LESION_TYPES)}


def type_names(bits: int) -> list[str]:
    """The lesion types of a pixel's (or a slice's) bits, in LESION_TYPES order."""
    return [name for name in LESION_TYPES if bits & TYPE_BITS[name]]

LABELS = ("healthy", "covid", "h1n1", "cap")


class Waves:
    """A smooth random perturbation of a surface: a few 3-D plane waves."""

    def __init__(self, rng: np.random.Generator, amplitude: float, wavelength=(10.0, 30.0)):
        self.amplitude = amplitude
        d = rng.normal(size=(3, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        self.k = d * (2 * np.pi / rng.uniform(*wavelength, size=(3, 1)))
        self.phase = rng.uniform(0, 2 * np.pi, size=3)

    def __call__(self, x, y, z):
        if self.amplitude == 0:
            return 0.0
        total = 0.0
        for (kx, ky, kz), ph in zip(self.k, self.phase):
            total = total + np.sin(kx * x + ky * y + kz * z + ph)
        return self.amplitude * total / 3.0


@dataclass
class Ellipsoid:
    """A lesion shape: a rotated ellipsoid with a wavy surface."""

    centre: np.ndarray
    axes: np.ndarray
    rotation: np.ndarray  # columns: the axes' directions
    waves: Waves

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        r = self.axes.max() + self.waves.amplitude + 1.0
        return self.centre - r, self.centre + r

    def distance(self, x, y, z):
        dx, dy, dz = x - self.centre[0], y - self.centre[1], z - self.centre[2]
        R = self.rotation
        u = (R[0, 0] * dx + R[1, 0] * dy + R[2, 0] * dz) / self.axes[0]
        v = (R[0, 1] * dx + R[1, 1] * dy + R[2, 1] * dz) / self.axes[1]
        w = (R[0, 2] * dx + R[1, 2] * dy + R[2, 2] * dz) / self.axes[2]
        return (np.sqrt(u * u + v * v + w * w) - 1.0) * self.axes.min() + self.waves(x, y, z)


@dataclass
class Capsule:
    """A lesion shape: a segment swept by a sphere, with a wavy surface."""

    p0: np.ndarray
    p1: np.ndarray
    radius: float
    waves: Waves

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        r = self.radius + self.waves.amplitude + 1.0
        return np.minimum(self.p0, self.p1) - r, np.maximum(self.p0, self.p1) + r

    def distance(self, x, y, z):
        return capsule_distance(x, y, z, self.p0, self.p1) - self.radius + self.waves(x, y, z)


@dataclass
class LobeRegion:
    """The part of a lobe inside a cone from the hilum (a segment), or all of it."""

    anatomy: Anatomy
    side: int
    lobe: int
    apex: np.ndarray
    direction: np.ndarray
    half_angle: float      # >= pi: the whole lobe
    inner_radius: float    # nothing closer than this to the hilum
    grow: float            # mm added all round (for a halo)
    waves: Waves

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        at, bt = self.anatomy.interior_axes(0.0)
        lo_x, hi_x = (-at, 4.0) if self.side == RIGHT else (4.0, at)
        return (np.array([lo_x, -bt, 0.0]) - self.grow,
                np.array([hi_x, bt, self.anatomy.height]) + self.grow)

    def distance(self, x, y, z):
        f = self.anatomy.fissures
        od = f.oblique_distance(y, z)
        if self.lobe == 3:
            d = od
        elif self.side == LEFT:
            d = -od
        elif self.lobe == 1:
            d = np.maximum(-od, f.horizontal_z - z)
        else:
            d = np.maximum(-od, z - f.horizontal_z)
        vx, vy, vz = x - self.apex[0], y - self.apex[1], z - self.apex[2]
        dist = np.sqrt(vx * vx + vy * vy + vz * vz) + 1e-6
        d = np.maximum(d, self.inner_radius - dist)
        if self.half_angle < np.pi:
            cos = (vx * self.direction[0] + vy * self.direction[1] + vz * self.direction[2]) / dist
            angle = np.arccos(np.clip(cos, -1.0, 1.0))
            d = np.maximum(d, (angle - self.half_angle) * dist)
        return d - self.grow + self.waves(x, y, z)


def capsule_distance(x, y, z, p0: np.ndarray, p1: np.ndarray):
    """Distance from points to the segment p0-p1."""
    d = p1 - p0
    dd = float(d @ d) or 1e-9
    px, py, pz = x - p0[0], y - p0[1], z - p0[2]
    t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / dd, 0.0, 1.0)
    qx, qy, qz = px - t * d[0], py - t * d[1], pz - t * d[2]
    return np.sqrt(qx * qx + qy * qy + qz * qz)


@dataclass
class Lesion:
    """One lesion: its shape, how it changes the image, and its truth."""

    shape: Ellipsoid | Capsule | LobeRegion
    types: tuple[str, ...]
    hu: float
    opacity: float
    layer: str                    # "ggo": under the vessels; "solid": over them
    septa: bool = False           # crazy paving: septal lines inside
    septa_seed: int = 0           # where the secondary lobules' centres lie
    air_bronchogram: bool = False
    truth: dict = field(default_factory=dict)

    def all_types(self) -> list[str]:
        """Every lesion type this lesion can show (its own, and the signs drawn inside it:
        septal lines, air bronchograms), in LESION_TYPES order."""
        kinds = set(self.types) | ({CRAZY_PAVING, SEPTAL} if self.septa else set()) | (
            {AIR_BRONCHOGRAM} if self.air_bronchogram else set())
        return [name for name in LESION_TYPES if name in kinds]


def _rotation_with_normal(normal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A rotation whose third axis is ``normal``."""
    t1 = np.cross(normal, rng.normal(size=3))
    t1 /= np.linalg.norm(t1)
    t2 = np.cross(normal, t1)
    return np.column_stack([t1, t2, normal])


def _truth(kind: str, centre: np.ndarray, anatomy: Anatomy, lungs: LungMap, **extra) -> dict:
    side = int(lungs.side_at(centre)[0]) or (RIGHT if centre[0] < 4 else LEFT)
    return {"kind": kind, "side": "right" if side == RIGHT else "left",
            "zone": anatomy.zone(centre[2]),
            "centre_mm": [round(float(v), 2) for v in centre],
            "pleural_distance_mm": round(float(lungs.depth_at(centre)[0]), 2), **extra}


def draw_lesions(label: str, severity: float, anatomy: Anatomy, lungs: LungMap,
                 trees: Segments, rng: np.random.Generator) -> list[Lesion]:
    """The lesions of one patient of a class, at a severity in [0, 1]."""
    if label == "healthy":
        return []
    if label == "covid":
        return _covid(severity, anatomy, lungs, rng)
    if label == "h1n1":
        return _h1n1(severity, anatomy, lungs, trees, rng)
    if label == "cap":
        return _cap(severity, anatomy, lungs, trees, rng)
    raise ValueError(f"unknown label {label!r}; expected one of {', '.join(LABELS)}")


def _covid(s: float, anatomy: Anatomy, lungs: LungMap, rng) -> list[Lesion]:
    x, y, z = lungs.grid()
    at, bt = anatomy.interior_axes(0.0)
    zu = np.clip(z / anatomy.height, 0, 1)
    posterior = np.clip((y + bt) / (2 * bt), 0, 1)
    weights = np.broadcast_to((1.1 - zu) ** 2 * (0.6 + posterior) + 0 * x, lungs.side.shape)
    subpleural = (lungs.depth >= 1.5) & (lungs.depth <= 10.0) & (zu < 0.8)
    n = 2 + int(round(10 * s ** 1.3))
    out = []
    for i in range(n):
        side = RIGHT if i % 2 == 0 else LEFT
        centre = lungs.sample(rng, 1, weights=weights, mask=subpleural & (lungs.side == side))[0]
        r = rng.uniform(5.0, 9.0 + 26.0 * s)
        axes = np.array([r, r * rng.uniform(0.7, 1.0), r * rng.uniform(0.4, 0.65)])
        rot = _rotation_with_normal(lungs.outward_normal(centre), rng)
        crazy = rng.random() < 0.2 + 0.25 * s
        types = (GGO, CRAZY_PAVING, SEPTAL) if crazy else (GGO,)
        truth = _truth("subpleural_ggo", centre, anatomy, lungs)
        out.append(Lesion(Ellipsoid(centre, axes, rot, Waves(rng, 0.25 * r)), types,
                          hu=rng.uniform(-640, -420), opacity=0.9, layer="ggo", septa=crazy,
                          septa_seed=int(rng.integers(2**31)), truth=truth))
        if rng.random() < 0.15 + 0.45 * s:
            core = Ellipsoid(centre, axes * rng.uniform(0.4, 0.6), rot, Waves(rng, 0.12 * r))
            out.append(Lesion(core, (CONSOLIDATION,), hu=rng.uniform(-90, 25), opacity=0.95,
                              layer="solid", truth=_truth("consolidation", centre, anatomy,
                                                          lungs, part_of=len(out) - 1)))
    return out


def _h1n1(s: float, anatomy: Anatomy, lungs: LungMap, trees: Segments, rng) -> list[Lesion]:
    out: list[Lesion] = []
    bundles = np.flatnonzero((trees.kind == ARTERY) & (trees.generation >= 2)
                             & (trees.generation <= 5))
    for i in range(1 + int(round(5 * s))):
        side = RIGHT if i % 2 == 0 else LEFT
        on_side = bundles[trees.side[bundles] == side]
        pick = rng.choice(on_side if on_side.size else bundles)
        p0, p1, r = trees.p0[pick], trees.p1[pick], float(trees.radius[pick])
        thick = r + rng.uniform(3.0, 6.0 + 6.0 * s)
        mid = (p0 + p1) / 2
        truth = _truth("peribronchovascular_consolidation", mid, anatomy, lungs,
                       bundle_generation=int(trees.generation[pick]))
        out.append(Lesion(Capsule(p0, p1, thick + 4.0, Waves(rng, 1.5)), (GGO,),
                          hu=-520.0, opacity=0.8, layer="ggo",
                          truth={**truth, "kind": "peribronchovascular_ggo_halo"}))
        out.append(Lesion(Capsule(p0, p1, thick, Waves(rng, 0.25 * thick)), (CONSOLIDATION,),
                          hu=rng.uniform(-120, 15), opacity=0.95, layer="solid",
                          air_bronchogram=rng.random() < 0.3, truth=truth))
    # clusters sit at the ends of small bronchovascular branches, away from the pleura
    ends = np.array([], dtype=int)
    for generation, depth in ((5, 8.0), (4, 6.0), (2, 5.0)):
        candidates = np.flatnonzero((trees.kind == ARTERY) & (trees.generation >= generation))
        ends = candidates[lungs.depth_at(trees.p1[candidates]) >= depth]
        if ends.size:
            break
    for _ in range(1 + int(round(4 * s)) if ends.size else 0):
        pick = rng.choice(ends)
        anchor = trees.p1[pick]
        for _ in range(4 + int(round(8 * s))):
            centre = anchor + rng.normal(0, 5.0, size=3)
            if lungs.depth_at(centre)[0] < 4.0:
                continue  # centrilobular nodules spare the subpleural lung
            r = rng.uniform(1.8, 3.5)
            out.append(Lesion(Ellipsoid(centre, np.full(3, r), np.eye(3), Waves(rng, 0.0)),
                              (NODULE,), hu=rng.uniform(-320, -60), opacity=0.9, layer="solid",
                              truth=_truth("centrilobular_nodule", centre, anatomy, lungs)))
    return out


def _cap(s: float, anatomy: Anatomy, lungs: LungMap, trees: Segments, rng) -> list[Lesion]:
    primary = RIGHT if rng.random() < 0.55 else LEFT
    sides = [primary] + ([LEFT if primary == RIGHT else RIGHT] if rng.random() < 0.25 else [])
    out: list[Lesion] = []
    x, y, z = lungs.grid()
    for n, side in enumerate(sides):
        choices = [3, 1, 2] if side == RIGHT else [3, 1]
        probs = [0.6, 0.3, 0.1] if side == RIGHT else [0.65, 0.35]
        lobe = int(rng.choice(choices, p=probs))
        region_s = s if n == 0 else s * 0.5
        lobar = region_s >= 0.55
        hilum = anatomy.hilum(side)
        probe = LobeRegion(anatomy, side, lobe, hilum, np.array([1.0, 0, 0]), np.pi, 0.0, 0.0,
                           Waves(rng, 0.0))
        in_lobe = (probe.distance(x, y, z) < -3.0) & (lungs.side == side) & (lungs.depth > 4)
        target = lungs.sample(rng, 1, mask=in_lobe)[0]
        direction = (target - hilum) / np.linalg.norm(target - hilum)
        half = np.pi if lobar else rng.uniform(0.22, 0.3 + 0.35 * region_s)
        inner = 0.0 if lobar else rng.uniform(25.0, 45.0) * (1.2 - region_s)
        waves = Waves(rng, 2.5)
        core = LobeRegion(anatomy, side, lobe, hilum, direction, half, inner, 0.0, waves)
        halo = LobeRegion(anatomy, side, lobe, hilum, direction, half, inner,
                          rng.uniform(5.0, 10.0), Waves(rng, 3.0))
        centre = target
        truth = _truth("lobar_consolidation" if lobar else "segmental_consolidation", centre,
                       anatomy, lungs, lobe=LOBE_NAMES[(side, lobe)])
        out.append(Lesion(halo, (GGO,), hu=-500.0, opacity=0.75, layer="ggo",
                          truth={**truth, "kind": "ggo_halo"}))
        out.append(Lesion(core, (CONSOLIDATION, AIR_BRONCHOGRAM), hu=rng.uniform(5, 40),
                          opacity=1.0, layer="solid", air_bronchogram=True, truth=truth))
    return out
