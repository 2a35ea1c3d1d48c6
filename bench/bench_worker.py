"""A worker's peak memory and time for one study: what fits beside other workers.

    .venv/bin/python -m bench.bench_worker [--slices 300 1200] [--device cpu]

For each size, a phantom chest CT of that many 512 x 512 slices is written,
then a fresh process does what a worker does with a job (the shipped model
loaded, the series loaded, analysed, the result objects written) and reports
its peak resident memory (``ru_maxrss``) above what the model takes ready to
run (its weights and the working memory of one batch through the slice
network, measured by a first batch before the job), per slice, and the time
of each stage. Target (issue 16): at most 2 MB a slice above the model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

TARGET_MB_PER_SLICE = 2.0


def _job(folder: str, out: str, device: str) -> dict:
    """In the measured process: one job as a worker runs it."""
    import resource

    from inference.checkpoint import default_model
    from inference.engine import Engine
    from inference.export import write_results
    from inference.series import load_series

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    import numpy as np

    from inference.engine import run_slices

    engine = Engine(default_model(), device=device)
    weights = peak_mb()
    size = engine.model.profile.input_size     # one batch: the model's working memory
    run_slices(engine.model.slice_net, np.full((engine.batch_size, size, size), -800.0,
                                               dtype=np.float32),
               engine.batch_size, engine.device, evidence=True)
    base = peak_mb()
    times = {}
    t0 = time.perf_counter()
    series = load_series(folder)
    times["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = engine.analyze(series)
    times["analyse"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_results(result, series, Path(out))
    times["write"] = time.perf_counter() - t0
    return {"weights_mb": weights, "model_mb": base, "peak_mb": peak_mb(),
            "slices": len(series), "times": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[300, 1200])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    table = Table(title="lungsys worker: one study, peak memory above the loaded model")
    for col in ("slices", "weights MB", "model ready MB", "peak above MB", "MB/slice",
                "target", "load s", "analyse s", "write s"):
        table.add_column(col, justify="right")
    for n in args.slices:
        with tempfile.TemporaryDirectory() as tmp:
            study = Path(tmp) / "study"
            print(f"writing a {n}-slice phantom study ...", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, "-c",
                            "import sys; from training.phantom import generate_study; "
                            "generate_study(sys.argv[1], 'covid', 7, int(sys.argv[2]))",
                            str(study), str(n)], check=True)
            print(f"running the job on {n} slices ...", file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, "-m", "bench.bench_worker", "--_job",
                                   str(study), str(Path(tmp) / "out"), args.device],
                                  capture_output=True, text=True, check=True)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
        above = r["peak_mb"] - r["model_mb"]
        per = above / r["slices"]
        table.add_row(str(r["slices"]), f"{r['weights_mb']:.0f}", f"{r['model_mb']:.0f}",
                      f"{above:.0f}", f"{per:.2f}",
                      "ok" if per <= TARGET_MB_PER_SLICE else "ABOVE",
                      *(f"{r['times'][k]:.1f}" for k in ("load", "analyse", "write")))
    Console().print(table)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--_job":
        print(json.dumps(_job(*sys.argv[2:])))
    else:
        main()
