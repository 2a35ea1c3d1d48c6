"""Phantom generation and preprocessing speed, in slices per second.

    .venv/bin/python -m bench.bench_phantom [--slices 64] [--repeats 2]

Prints one table. Run on an otherwise idle machine; the phantom target is a
64-slice study in a few seconds on one core.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table

from inference.preprocess import INFERENCE_CENTRES, crop_and_resize, crop_boxes, window
from inference.series import load_series
from training.phantom import build_phantom, write_study


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = args.slices
    rows = []

    ph = None

    def build():
        nonlocal ph
        ph = build_phantom("covid", 7, n)
    t_build = _best(build, args.repeats)
    rendered = {}

    def render():
        rendered["r"] = ph.render()
    t_render = _best(render, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        t_write = _best(lambda: write_study(ph, tmp, *rendered["r"]), args.repeats)
        t_load = _best(lambda: load_series(tmp), args.repeats)
        hu = load_series(tmp).hu
    total = t_build + t_render + t_write
    rows.append(("phantom: draw patient (trees, lesions)", t_build, None))
    rows.append(("phantom: render slices", t_render, n / t_render))
    rows.append(("phantom: write DICOM + truth", t_write, n / t_write))
    rows.append((f"phantom: whole {n}-slice study", total, n / total))
    rows.append(("load series (decode, order, HU)", t_load, n / t_load))

    boxes = {}
    t_boxes = _best(lambda: boxes.setdefault("b", crop_boxes(hu)), args.repeats)
    rows.append(("preprocess: lung crop boxes", t_boxes, n / t_boxes))
    for size in (224, 512):
        t_resize = _best(lambda: crop_and_resize(hu, boxes["b"], size), args.repeats)
        crops = crop_and_resize(hu, boxes["b"], size)
        t_win = _best(lambda: [window(crops, c) for c in INFERENCE_CENTRES], args.repeats)
        rows.append((f"preprocess: crop+resize to {size}", t_resize, n / t_resize))
        rows.append((f"preprocess: 3 windows at {size}", t_win, n / t_win))
        whole = t_boxes + t_resize + t_win
        rows.append((f"preprocess: all, {size}x{size}", whole, n / whole))

    table = Table(title=f"lungsys phantom and preprocessing, {n} slices 512x512, "
                        f"1 thread, {os.cpu_count()} CPUs, best of {args.repeats}")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("slices/s", justify="right")
    for name, sec, rate in rows:
        table.add_row(name, f"{sec:.3f}", "" if rate is None else f"{rate:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
