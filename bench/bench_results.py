"""Result objects: how long each takes to write and how big it is, for one study.

    .venv/bin/python -m bench.bench_results [--slices 300] [--severity 0.6] [--repeats 2]

Analyses a COVID-19 phantom study with the shipped model once, then writes
each kind of result object alone (``write_results(objects=(kind,))``) and
prints one table: files, bytes, bytes per lesion slice, seconds (best of
``--repeats``). The Parametric Map's size target: lesion slices only, on a
grid 4 times coarser, so a few tens of KiB per lesion slice.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from inference.checkpoint import default_model
from inference.choices import ResultObject, SegCompression
from inference.engine import Engine
from inference.export import write_results
from inference.series import load_series
from training.phantom import build_phantom, write_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--severity", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp) / "ct"
        phantom = build_phantom("covid", 11, args.slices, severity=args.severity)
        write_study(phantom, study, *phantom.render())
        series = load_series(study)
        result = Engine(default_model(), device="cpu").analyze(series)
        flagged = len(result.lesion_slices)
        table = Table(title=f"result objects of a {len(series)}-slice COVID-19 phantom "
                            f"({flagged} lesion slices, "
                            f"{sum(len(s.boxes) for s in result.lesion_slices)} boxes)")
        for column in ("object", "files", "bytes", "bytes / lesion slice", "seconds"):
            table.add_column(column, justify="left" if column == "object" else "right")
        kinds = [(str(k), (k,), SegCompression.none) for k in ResultObject]
        kinds.insert(2, ("seg (jpeg2000)", (ResultObject.seg,), SegCompression.jpeg2000))
        for name, objects, compression in kinds:
            best, files = float("inf"), None
            for n in range(args.repeats):
                out = Path(tmp) / f"{name}-{n}".replace(" ", "_")
                t = time.perf_counter()
                files = write_results(result, series, out, objects=objects,
                                      seg_compression=compression)
                best = min(best, time.perf_counter() - t)
            size = sum(p.stat().st_size for p in files.all)
            table.add_row(name, str(len(files.all)), f"{size:,}",
                          f"{size // max(flagged, 1):,}", f"{best:.2f}")
        console.print(table)


if __name__ == "__main__":
    main()
