"""A whole phantom dataset: studies of every class, a manifest, splits by patient."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from training.dataset import write_manifest
from training.phantom import LABELS, generate_study

SPLIT_FRACTIONS = (("train", 0.6), ("val", 0.2), ("test", 0.2))


def study_seed(base_seed: int, index: int) -> int:
    """The seed of the index-th patient of a class in a set made with base_seed.

    Sets made with different base seeds never share a patient (up to 10,000
    patients per class).
    """
    return base_seed * 10_000 + index


def split_of(position: int, n: int) -> str:
    """The split of the ``position``-th of ``n`` studies of a class (60/20/20)."""
    edges = np.cumsum([round(f * n) for _, f in SPLIT_FRACTIONS])
    for (name, _), edge in zip(SPLIT_FRACTIONS, edges):
        if position < edge:
            return name
    return SPLIT_FRACTIONS[-1][0]


def split_sizes(per_class: int) -> dict[str, int]:
    """How many studies of each class each split gets with ``per_class`` studies a class
    (fewer than 5 leave a split empty: 3 give 2/1/0)."""
    sizes = {name: 0 for name, _ in SPLIT_FRACTIONS}
    for position in range(per_class):
        sizes[split_of(position, per_class)] += 1
    return sizes


def _make(args: tuple) -> dict:
    out, label, seed, slices, split = args
    folder = f"{label}-{seed:07d}"
    try:
        generate_study(Path(out) / folder, label, seed, slices)
    except Exception as exc:  # say which study, from inside the worker process
        raise ValueError(f"phantom {label} seed {seed} failed: {exc}") from None
    return {"study": folder, "label": label, "split": split,
            "annotations": f"{folder}/truth.json", "masks": f"{folder}/masks.npz"}


def check_slices_range(lo: int, hi: int) -> None:
    """ValueError unless ``lo`` and ``hi`` are a study's fewest and most slices."""
    if not 1 <= lo <= hi:
        raise ValueError(f"{lo} {hi}: the fewest slices must be at least 1 and at most the "
                         f"most")


def refuse_a_dataset(out: Path) -> None:
    """ValueError if ``out`` holds a dataset already: its studies would be orphaned."""
    if (out / "manifest.csv").exists():
        raise ValueError(f"{out} already holds a dataset (manifest.csv): choose another "
                         f"folder, or remove that one first")


def generate_phantom_set(out: str | Path, per_class: int, seed: int,
                         slices_range: tuple[int, int] = (32, 48), workers: int | None = None,
                         progress: Callable[[], None] | None = None) -> Path:
    """Write ``per_class`` studies of each class and ``manifest.csv`` into ``out`` (a folder
    that holds no dataset yet).

    Splits are by patient, 60/20/20 within each class, in an order drawn from
    the seed. Returns the manifest's path.
    """
    if per_class < 1:
        raise ValueError("need at least one study per class")
    check_slices_range(*slices_range)
    lo, hi = slices_range
    out = Path(out)
    refuse_a_dataset(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    jobs = []
    for label in LABELS:
        order = rng.permutation(per_class)
        for position, index in enumerate(order):
            s = study_seed(seed, int(index))
            jobs.append((str(out), label, s, int(rng.integers(lo, hi + 1)),
                         split_of(position, per_class)))
    rows = []
    workers = workers or min(os.cpu_count() or 1, 4)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for row in pool.map(_make, jobs):
            rows.append(row)
            if progress is not None:
                progress()
    rows.sort(key=lambda r: (r["split"], r["study"]))
    manifest = out / "manifest.csv"
    write_manifest(manifest, rows)
    return manifest
