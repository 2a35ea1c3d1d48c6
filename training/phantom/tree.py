"""Branching bronchovascular trees of the lungs.

From each hilum an arterial tree grows into the lobes with a bronchus running
beside each of its first generations (the bronchovascular bundle), and a
venous tree grows from a point below it. Segments shrink and shorten at every
generation and stop at the pleura, like the real trees.

Calibres follow the real ones: a lobar artery of about 8 mm diameter, radii
shrinking by about 0.74 per branching, so that segmental vessels are 3-5 mm
wide and the outer third of the lung holds only vessels of a millimetre or
two. (Thicker trees crowd the lung with bright discs that look like nodules
and hide the ground glass a reader, or a model, has to find.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.phantom.anatomy import LEFT, RIGHT, Anatomy
from training.phantom.lungmap import LungMap

ARTERY, VEIN, BRONCHUS = 0, 1, 2
MAX_GENERATION = 7
TARGETS = 8  # lobar/segmental directions per lung
BRONCHUS_GENERATIONS = 5
ARTERY_ROOT_MM, VEIN_ROOT_MM = 4.0, 3.6  # radii of the lobar trunks
TAPER = (0.70, 0.78)  # child radius / parent radius


@dataclass
class Segments:
    """Capsules: start and end points (mm), radius, generation, kind, side."""

    p0: np.ndarray
    p1: np.ndarray
    radius: np.ndarray
    generation: np.ndarray
    kind: np.ndarray
    side: np.ndarray

    def __len__(self) -> int:
        return len(self.radius)

    def select(self, mask: np.ndarray) -> "Segments":
        return Segments(self.p0[mask], self.p1[mask], self.radius[mask],
                        self.generation[mask], self.kind[mask], self.side[mask])


def _perpendicular(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    v -= v.dot(d) * d
    return v / np.linalg.norm(v)


def _rotate_towards(d: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    out = np.cos(angle) * d + np.sin(angle) * axis
    return out / np.linalg.norm(out)


def grow_trees(anatomy: Anatomy, lungs: LungMap, rng: np.random.Generator) -> Segments:
    """Arterial, venous and bronchial trees of both lungs."""
    rows: list[tuple] = []
    for side in (RIGHT, LEFT):
        hilum = anatomy.hilum(side)
        vein_root = hilum + np.array([0.0, 6.0, -26.0])
        targets = _spread_points(lungs.sample(rng, 300, mask=lungs.side == side), TARGETS)
        for root, kind, r0 in ((hilum, ARTERY, ARTERY_ROOT_MM), (vein_root, VEIN, VEIN_ROOT_MM)):
            for target in targets:
                d = target - root
                dist = float(np.linalg.norm(d))
                _grow(rows, root, d / dist, 0, r0, 0.4 * dist, kind, side, lungs, rng, root)
    arr = list(zip(*rows))
    seg = Segments(p0=np.array(arr[0]), p1=np.array(arr[1]), radius=np.array(arr[2]),
                   generation=np.array(arr[3]), kind=np.array(arr[4]), side=np.array(arr[5]))
    return seg


def _spread_points(points: np.ndarray, k: int) -> np.ndarray:
    """``k`` of the points, far apart from each other (farthest-point sampling)."""
    chosen = [0]
    dist = np.linalg.norm(points - points[0], axis=1)
    for _ in range(k - 1):
        chosen.append(int(np.argmax(dist)))
        dist = np.minimum(dist, np.linalg.norm(points - points[chosen[-1]], axis=1))
    return points[chosen]


def _grow(rows: list, start: np.ndarray, direction: np.ndarray, gen: int, radius: float,
          length: float, kind: int, side: int, lungs: LungMap,
          rng: np.random.Generator, root: np.ndarray) -> None:
    end = start + direction * length
    if gen > 0 and lungs.side_at(end)[0] != side:
        end = start + direction * length * 0.5
        if lungs.side_at(end)[0] != side:
            return
    rows.append((start, end, radius, gen, kind, side))
    if kind == ARTERY and gen < BRONCHUS_GENERATIONS:
        # the bronchus runs beside its artery, about as wide
        offset = _perpendicular(direction, rng) * (radius * 2.0 + 0.6)
        rows.append((start + offset, end + offset, radius * 0.95, gen, BRONCHUS, side))
    if gen >= MAX_GENERATION or radius < 0.7:
        return
    axis = _perpendicular(direction, rng)
    spread = rng.uniform(0.35, 0.6)
    outward = (end - root) / (np.linalg.norm(end - root) + 1e-9)
    for sign in (1.0, -1.0):
        child = _rotate_towards(direction, axis, sign * spread + rng.normal(0, 0.08))
        child = child + 0.4 * outward  # branches keep heading away from the hilum
        child /= np.linalg.norm(child)
        _grow(rows, end, child, gen + 1, radius * rng.uniform(*TAPER),
              max(length * rng.uniform(0.7, 0.85), 6.0), kind, side, lungs, rng, root)
