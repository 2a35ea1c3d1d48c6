"""A coarse voxel map of the lungs, for placing things in them.

Tree growth and lesion placement ask "is this point in a lung?" and "how far
is it from the pleura?" many times; a 2.5 mm grid with a Euclidean distance
transform answers both quickly and deterministically.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from training.phantom.anatomy import Anatomy

VOXEL_MM = 2.5


@dataclass
class LungMap:
    """Which lung each voxel is in, and how deep below the pleura."""

    origin: np.ndarray        # (x, y, z) of voxel (0, 0, 0), mm
    side: np.ndarray          # (nz, ny, nx) int8: 0, RIGHT, LEFT
    depth: np.ndarray         # (nz, ny, nx) float32: distance to the pleura, mm (0 outside)

    @classmethod
    def build(cls, anatomy: Anatomy) -> "LungMap":
        at, bt = anatomy.interior_axes(0.0)
        xs = np.arange(-at - 5, at + 5, VOXEL_MM)
        ys = np.arange(-bt - 5, bt + 5, VOXEL_MM)
        zs = np.arange(-5, anatomy.height + 5, VOXEL_MM)
        side = anatomy.lung_side(xs[None, None, :], ys[None, :, None], zs[:, None, None])
        depth = ndimage.distance_transform_edt(side > 0, sampling=VOXEL_MM).astype(np.float32)
        return cls(origin=np.array([xs[0], ys[0], zs[0]]), side=side, depth=depth)

    def _index(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = np.atleast_2d(points)
        idx = np.rint((p - self.origin) / VOXEL_MM).astype(np.int64)[:, ::-1]  # z, y, x
        shape = np.array(self.side.shape)
        valid = np.all((idx >= 0) & (idx < shape), axis=1)
        return np.clip(idx, 0, shape - 1), valid

    def side_at(self, points: np.ndarray) -> np.ndarray:
        idx, valid = self._index(points)
        return np.where(valid, self.side[idx[:, 0], idx[:, 1], idx[:, 2]], 0)

    def depth_at(self, points: np.ndarray) -> np.ndarray:
        """Distance to the pleura (mm), 0 outside the lungs."""
        idx, valid = self._index(points)
        return np.where(valid, self.depth[idx[:, 0], idx[:, 1], idx[:, 2]], 0.0)

    def outward_normal(self, point: np.ndarray) -> np.ndarray:
        """Direction towards the nearest pleura from a point inside a lung."""
        idx, _ = self._index(point)
        z, y, x = idx[0]
        lo = np.maximum([z - 1, y - 1, x - 1], 0)
        hi = np.minimum([z + 2, y + 2, x + 2], self.depth.shape)
        patch = self.depth[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        grads = np.gradient(patch) if min(patch.shape) > 1 else [np.zeros(1)] * 3
        c = (z - lo[0], y - lo[1], x - lo[2])
        g = np.array([grads[2][c], grads[1][c], grads[0][c]], dtype=np.float64)  # x, y, z
        n = -g
        norm = np.linalg.norm(n)
        return n / norm if norm > 0 else np.array([1.0, 0.0, 0.0])

    def sample(self, rng: np.random.Generator, n: int, weights: np.ndarray | None = None,
               mask: np.ndarray | None = None) -> np.ndarray:
        """``n`` random points (mm) in the lungs, optionally weighted per voxel."""
        sel = self.side > 0 if mask is None else mask & (self.side > 0)
        flat = np.flatnonzero(sel)
        if flat.size == 0:
            raise ValueError("no lung voxel matches the placement constraints")
        p = None
        if weights is not None:
            w = weights.ravel()[flat].astype(np.float64)
            p = w / w.sum()
        chosen = rng.choice(flat, size=n, p=p)
        zyx = np.column_stack(np.unravel_index(chosen, self.side.shape))
        jitter = rng.uniform(-0.5, 0.5, size=(n, 3)) * VOXEL_MM
        return self.origin + zyx[:, ::-1] * VOXEL_MM + jitter

    def grid(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x, y, z coordinates of the voxels, each broadcastable to the map."""
        nz, ny, nx = self.side.shape
        x = self.origin[0] + np.arange(nx) * VOXEL_MM
        y = self.origin[1] + np.arange(ny) * VOXEL_MM
        z = self.origin[2] + np.arange(nz) * VOXEL_MM
        return x[None, None, :], y[None, :, None], z[:, None, None]
