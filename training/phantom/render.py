"""Render axial slices of the phantom in HU, with their truth masks.

A slice is drawn in layers, back to front: air, the CT table, the body wall
(skin, fat, muscle, ribs, scapulae, sternum, spine), the mediastinum (heart,
great vessels, trachea and main bronchi, oesophagus), the abdomen under the
diaphragm, lung parenchyma with its fissures, ground-glass lesions, the
bronchovascular trees, solid lesions and air bronchograms, then a
pulsation artefact at the heart border when the patient has one. Thin
structures (vessels, bronchi) are averaged over the slice thickness (partial
volume); the whole slice is then blurred by the scanner's point spread and
gets correlated noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from training.phantom.anatomy import Anatomy, ellipse_radius
from training.phantom.lesions import (AIR_BRONCHOGRAM, CONSOLIDATION, CRAZY_PAVING, GGO,
                                      NODULE, SEPTAL, TYPE_BITS, Lesion, capsule_distance,
                                      type_names)
from training.phantom.tree import BRONCHUS, Segments

HU_AIR = -1000.0
HU_FAT = -95.0
HU_MUSCLE = 50.0
HU_SKIN = 30.0
HU_BLOOD = 42.0
HU_LIVER = 58.0
HU_SPLEEN = 46.0
HU_CORTEX = 850.0
HU_MARROW = 240.0
HU_DISC = 90.0
HU_LUNG = -870.0
HU_VESSEL = 40.0
EDGE_MM = 1.2  # soft edge of lesions
PSF_MM = 0.45  # scanner point spread (Gaussian sigma)


@dataclass
class Grid:
    """Patient-relative x of every column and y of every row (mm)."""

    x: np.ndarray
    y: np.ndarray

    def cols(self, lo: float, hi: float) -> slice:
        return _index_range(self.x, lo, hi)

    def rows(self, lo: float, hi: float) -> slice:
        return _index_range(self.y, lo, hi)


def _index_range(coords: np.ndarray, lo: float, hi: float) -> slice:
    step = coords[1] - coords[0]
    a, b = (lo - coords[0]) / step, (hi - coords[0]) / step
    a, b = min(a, b), max(a, b)
    start = max(int(np.floor(a)), 0)
    stop = min(int(np.ceil(b)) + 1, len(coords))
    return slice(start, max(stop, start))


@dataclass
class SliceTruth:
    """What one rendered slice truly holds: lung and lesion masks, lesion types (each
    pixel's, as TYPE_BITS, and the slice's)."""

    lung: np.ndarray     # bool (rows, cols)
    lesion: np.ndarray   # bool (rows, cols)
    types: set[str]
    type_map: np.ndarray  # uint8 (rows, cols): the types each lesion pixel shows


class Renderer:
    """Draws slices of one patient."""

    def __init__(self, anatomy: Anatomy, trees: Segments, lesions: list[Lesion],
                 grid: Grid, thickness: float, noise_sd: float, pulsation: float,
                 rng: np.random.Generator) -> None:
        self.a = anatomy
        self.trees = trees
        self.lesions = lesions
        self.grid = grid
        self.thickness = thickness
        self.noise_sd = noise_sd
        self.pulsation = pulsation
        self.rng = rng
        n_sub = 1 if thickness <= 1.5 else (2 if thickness <= 3.0 else 3)
        self.sub_offsets = (np.arange(n_sub) + 0.5) / n_sub * thickness - thickness / 2
        zlo = np.minimum(trees.p0[:, 2], trees.p1[:, 2]) - trees.radius
        zhi = np.maximum(trees.p0[:, 2], trees.p1[:, 2]) + trees.radius
        self._tree_z = (zlo, zhi)
        self._great_vessels = anatomy.aorta_segments()
        self.spacing = abs(grid.x[1] - grid.x[0])
        self._lumen_cache: tuple[float | None, np.ndarray] = (None, np.zeros(0))

    # ------------------------------------------------------------------------
    def render(self, z: float) -> tuple[np.ndarray, SliceTruth]:
        a = self.a
        X, Y = self.grid.x[None, :], self.grid.y[:, None]
        shape = (len(self.grid.y), len(self.grid.x))
        hu = np.full(shape, HU_AIR, dtype=np.float32)
        self._table(hu, X, Y)

        ba, bb = a.body_axes(z)
        at, bt = a.interior_axes(z)
        r = np.sqrt(X * X + Y * Y) + 1e-6
        rho_body = ellipse_radius(X, Y, ba, bb)
        body = rho_body < 1.0
        depth = np.where(body, r * (1.0 / np.maximum(rho_body, 1e-6) - 1.0), -1.0)
        interior = ellipse_radius(X, Y, at, bt) < 1.0  # the same cavity the lungs fill
        wall_out = a.SKIN + a.fat + a.muscle
        hu[body] = HU_SKIN
        hu[body & (depth > a.SKIN)] = HU_FAT
        hu[body & (depth > a.SKIN + a.fat)] = HU_MUSCLE
        hu[interior] = HU_FAT  # mediastinal fat; organs and lungs go on top
        self._ribs(hu, X, Y, z, depth, interior, wall_out)
        self._scapulae(hu, X, Y, z, depth, wall_out)

        side_of_x = np.where(X < 4.0, 1, 2)
        below = interior & (z < a.diaphragm_z(side_of_x, X, Y))
        hu[below] = np.where(np.broadcast_to(X < 20.0, shape)[below], HU_LIVER, HU_SPLEEN)
        heart = a.heart(X, Y, z) < 1.0
        hu[heart] = HU_BLOOD
        self._mediastinum(hu, X, Y, z)
        self._sternum_and_spine(hu, X, Y, z, bt)

        lung = a.lung_side(X, Y, z) > 0
        posterior = np.clip((Y + bt) / (2 * bt), 0.0, 1.0)
        parenchyma = HU_LUNG + 75.0 * posterior
        hu[lung] = np.broadcast_to(parenchyma, shape)[lung]
        f = a.fissures
        fissure = lung & (np.abs(f.oblique_distance(Y, z) - 0.003 * (np.abs(X) - 0.5 * at) ** 2)
                          < 0.6)
        hu[fissure] = -560.0

        type_map = np.zeros(shape, dtype=np.uint8)
        solid = [les for les in self.lesions if les.layer == "solid"]
        for les in self.lesions:
            if les.layer == "ggo":
                self._lesion(hu, lung, type_map, les, z)
        self._trees(hu, z, interior)
        for les in solid:
            self._lesion(hu, lung, type_map, les, z)
        if self.pulsation > 0:
            self._pulsation(hu, X, Y, z, lung)

        hu = ndimage.gaussian_filter(hu, sigma=PSF_MM / self.spacing)
        noise = self.rng.standard_normal(shape, dtype=np.float32)
        noise = ndimage.gaussian_filter(noise, sigma=0.7)
        hu += noise * (self.noise_sd / 0.403)  # white noise filtered so has sd 0.403
        type_map[~lung] = 0
        present = int(np.bitwise_or.reduce(type_map, axis=None))
        return hu, SliceTruth(lung=lung, lesion=type_map > 0, types=set(type_names(present)),
                              type_map=type_map)

    # --- structures ----------------------------------------------------------
    def _table(self, hu, X, Y) -> None:
        top = self.a.body_b + 4.0 + 0.0008 * X ** 2
        shell = ((Y > top) & (Y < top + 2.5)) | ((Y > top + 11.0) & (Y < top + 13.5))
        core = (Y >= top + 2.5) & (Y <= top + 11.0)
        hu[np.broadcast_to(core, hu.shape)] = -880.0
        hu[np.broadcast_to(shell, hu.shape)] = 260.0

    def _ribs(self, hu, X, Y, z, depth, interior, wall_out) -> None:
        a = self.a
        band = (depth > wall_out) & ~interior
        if not band.any():
            return
        xs, ys, d = np.broadcast_to(X, hu.shape)[band], np.broadcast_to(Y, hu.shape)[band], \
            depth[band]
        phi = np.arctan2(np.abs(xs), ys) / np.pi  # 0 at the spine, 1 at the sternum
        rib_top = a.height + 15.0
        drop = a.rib_drop * phi ** 1.3
        k = np.clip(np.rint((rib_top - drop - z) / a.rib_pitch), 0, 11)
        dz = z - (rib_top - k * a.rib_pitch - drop)
        t = (d - wall_out) / a.RIB_BAND
        rib = (np.abs(dz) < 5.0) & (t > 0.15) & (t < 0.85) & (phi < 0.93)
        cortex = (t < 0.3) | (t > 0.7) | (np.abs(dz) > 3.6)
        values = np.where(cortex, HU_CORTEX, HU_MARROW)
        values = np.where(phi > 0.82, 130.0, values)  # costal cartilage
        out = hu[band]
        out[rib] = values[rib]
        hu[band] = out

    def _scapulae(self, hu, X, Y, z, depth, wall_out) -> None:
        if z < 0.55 * self.a.height:
            return
        phi = np.arctan2(np.abs(X), Y) / np.pi
        plate = (depth > wall_out - 7.0) & (depth < wall_out - 3.0) & (phi > 0.18) & (phi < 0.42)
        hu[plate] = 700.0

    def _mediastinum(self, hu, X, Y, z) -> None:
        a = self.a
        for p0, p1, radius in self._great_vessels:
            self._capsule(hu, p0, p1, radius, z, HU_BLOOD)
        oes = (np.array([-2.0, a.spine_y - 27.0, -40.0]),
               np.array([-2.0, a.spine_y - 27.0, a.height + 80.0]))
        self._capsule(hu, *oes, 7.0, z, 38.0)
        carina = np.array([0.0, a.trachea_y, a.carina_z])
        airways = [(carina, np.array([0.0, a.trachea_y, a.height + 80.0]), 9.5)]
        airways += [(carina, a.hilum(side), 6.5) for side in (1, 2)]
        for p0, p1, radius in airways:
            self._capsule(hu, p0, p1, radius + 1.5, z, 60.0)
            self._capsule(hu, p0, p1, radius, z, HU_AIR)

    def _sternum_and_spine(self, hu, X, Y, z, bt) -> None:
        a = self.a
        if 0.3 * a.height < z < 0.95 * a.height:
            e = ((X / 14.0) ** 2 + ((Y + bt + 0.5 * a.RIB_BAND) / 6.5) ** 2)
            hu[e < 1.0] = HU_CORTEX
            hu[e < 0.55] = 300.0
        sy = a.spine_y
        rv = np.hypot(X, Y - sy)
        disc = (z % 28.0) < 6.0
        hu[rv < a.SPINE_R] = HU_DISC if disc else HU_CORTEX
        if not disc:
            hu[rv < a.SPINE_R - 2.0] = HU_MARROW
        canal_y = sy + a.SPINE_R + 9.0
        rc = np.hypot(X, Y - canal_y)
        hu[(rc < 14.0) & (rc >= 8.0) & (Y > sy + a.SPINE_R - 2)] = 650.0
        hu[rc < 8.0] = 20.0
        spinous = (X / 5.0) ** 2 + ((Y - canal_y - 20.0) / 12.0) ** 2 < 1.0
        hu[spinous] = 600.0

    def _capsule(self, hu, p0, p1, radius, z, value) -> None:
        """Fill the cross-section of a capsule at height z with a value."""
        if not (min(p0[2], p1[2]) - radius <= z <= max(p0[2], p1[2]) + radius):
            return
        rows = self.grid.rows(min(p0[1], p1[1]) - radius, max(p0[1], p1[1]) + radius)
        cols = self.grid.cols(min(p0[0], p1[0]) - radius, max(p0[0], p1[0]) + radius)
        x, y = self.grid.x[cols][None, :], self.grid.y[rows][:, None]
        inside = capsule_distance(x, y, z, p0, p1) < radius
        hu[rows, cols][inside] = value

    # --- trees ---------------------------------------------------------------
    def _tree_alpha(self, z: float, kind_mask: np.ndarray, scale: float, shape) -> np.ndarray:
        """Fraction of each pixel's slab covered by the selected segments."""
        t = self.trees
        zlo, zhi = self._tree_z
        acc = np.zeros(shape, dtype=np.float32)
        for dz in self.sub_offsets:
            zs = z + dz
            cover = np.zeros(shape, dtype=np.float32)
            for i in np.flatnonzero(kind_mask & (zlo <= zs) & (zhi >= zs)):
                p0, p1, radius = t.p0[i], t.p1[i], t.radius[i] * scale
                lo, hi = np.minimum(p0, p1) - radius, np.maximum(p0, p1) + radius
                rows, cols = self.grid.rows(lo[1], hi[1]), self.grid.cols(lo[0], hi[0])
                if rows.start >= rows.stop or cols.start >= cols.stop:
                    continue
                x, y = self.grid.x[cols][None, :], self.grid.y[rows][:, None]
                d = capsule_distance(x, y, zs, p0, p1)
                a = np.clip(radius - d + 0.5 * self.spacing, 0.0, self.spacing) / self.spacing
                np.maximum(cover[rows, cols], a, out=cover[rows, cols])
            acc += cover
        return acc / len(self.sub_offsets)

    def _trees(self, hu, z, interior) -> None:
        t = self.trees
        shape = hu.shape
        vessels = self._tree_alpha(z, t.kind != BRONCHUS, 1.0, shape)
        walls = self._tree_alpha(z, t.kind == BRONCHUS, 1.0, shape)
        lumens = self._tree_alpha(z, t.kind == BRONCHUS, 0.7, shape)
        inside = interior
        hu[inside] += ((HU_VESSEL - hu) * vessels)[inside]
        hu[inside] += ((20.0 - hu) * walls)[inside]
        hu[inside] += ((HU_AIR - hu) * lumens)[inside]

    # --- lesions -------------------------------------------------------------
    def _lesion(self, hu, lung, type_map, les: Lesion, z: float) -> None:
        """Draw a lesion on the slice; mark the types each of its pixels shows: its own
        opacity (GGO, consolidation, nodule) where it is, crazy paving and thickened
        septa where it has septal lines, an air bronchogram on the bronchi's air inside
        it."""
        lo, hi = les.shape.bounds()
        if not lo[2] <= z <= hi[2]:
            return
        rows, cols = self.grid.rows(lo[1], hi[1]), self.grid.cols(lo[0], hi[0])
        if rows.start >= rows.stop or cols.start >= cols.stop:
            return
        x, y = self.grid.x[cols][None, :], self.grid.y[rows][:, None]
        d = les.shape.distance(x, y, z)
        alpha = np.clip(0.5 - d / EDGE_MM, 0.0, 1.0) * lung[rows, cols]
        inside = alpha > 0.5
        if not inside.any():
            return
        block = hu[rows, cols]
        block += (les.hu - block) * alpha * les.opacity
        marks = type_map[rows, cols]
        marks[inside] |= sum(TYPE_BITS[t] for t in les.types if t in (GGO, CONSOLIDATION,
                                                                     NODULE))
        if les.septa:
            if self._septa(block, x, y, z, inside, les):
                marks[inside] |= TYPE_BITS[CRAZY_PAVING] | TYPE_BITS[SEPTAL]
        if les.air_bronchogram:
            lumen = self._tree_alpha_window(z, rows, cols)
            air = inside & (lumen > 0.3)
            if air.any():
                block[air] += ((HU_AIR + 60.0 - block) * lumen)[air]
                marks[air] |= TYPE_BITS[AIR_BRONCHOGRAM]

    def _tree_alpha_window(self, z, rows: slice, cols: slice) -> np.ndarray:
        """Bronchus lumens inside a window, for air bronchograms."""
        if self._lumen_cache[0] != z:
            full = self._tree_alpha(z, self.trees.kind == BRONCHUS, 0.75,
                                    (len(self.grid.y), len(self.grid.x)))
            self._lumen_cache = (z, full)
        return self._lumen_cache[1][rows, cols]

    def _septa(self, block, x, y, z, inside, les: Lesion) -> bool:
        """Thickened interlobular septa: lines between secondary lobules."""
        lo, hi = les.shape.bounds()
        n = int(np.prod((hi - lo) / 9.0)) + 4
        seeds = lo + np.random.default_rng(les.septa_seed).random((n, 3)) * (hi - lo)
        pts = np.column_stack([np.broadcast_to(x, inside.shape)[inside],
                               np.broadcast_to(y, inside.shape)[inside],
                               np.full(int(inside.sum()), z)])
        d, _ = cKDTree(seeds).query(pts, k=2)
        line = (d[:, 1] - d[:, 0]) < 1.1
        if not line.any():
            return False
        vals = block[inside]
        vals[line] += 220.0
        block[inside] = vals
        return True

    def _pulsation(self, hu, X, Y, z, lung) -> None:
        """Cardiac motion: a ghost of the heart border in the left lung."""
        rho = self.a.heart(X, Y, z)
        band = lung & (rho > 1.0) & (rho < 1.0 + 0.12 * self.pulsation) & (X > 0)
        if band.any():
            phase = (rho - 1.0) / (0.12 * self.pulsation)
            hu[band] += (140.0 * np.sin(2 * np.pi * phase) * self.pulsation)[band]
