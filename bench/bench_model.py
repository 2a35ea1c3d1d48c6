"""Model speed: slice-forwards per second per profile, and a whole study.

    .venv/bin/python -m bench.bench_model [--slices 300] [--device auto]

Prints one table. On the CPU: the small profile analysing a whole phantom
study (three windows per slice: preprocessing, slice network, patient
network, localisation) and raw slice-forward rates of both profiles. On a
CUDA device: the paper profile's slice-forward rate in bf16, with the GPU
named. Targets (not tests): small, 300 slices, three windows, <= 30 s on 2
CPU cores; paper, >= 3000 slice-forwards/s on one H100.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table

from inference.checkpoint import LungSysModel
from inference.engine import Engine, select_device
from inference.profiles import PROFILES
from inference.series import load_series
from training.phantom import generate_study


def forward_rate(profile_name: str, device: torch.device, batch: int, seconds: float) -> float:
    """Slice-forwards per second of the slice network at the profile's input size."""
    model = LungSysModel.create(profile_name, 0).to(device).eval()
    size = PROFILES[profile_name].input_size
    x = torch.rand(batch, 3, size, size, device=device)
    cuda = device.type == "cuda"
    if cuda:
        model.slice_net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast(
        "cpu", enabled=False)
    with torch.inference_mode(), ctx:
        model.slice_net(x)  # warm-up
        if cuda:
            torch.cuda.synchronize()
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model.slice_net(x)
            done += batch
        if cuda:
            torch.cuda.synchronize()
        return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    device = select_device(args.device)
    cpu = torch.device("cpu")
    rows = []

    with tempfile.TemporaryDirectory() as tmp:
        generate_study(tmp, "covid", 1, args.slices)
        series = load_series(tmp)
    engine = Engine(LungSysModel.create("small", 0), device=str(cpu), batch_size=16)
    start = time.perf_counter()
    result = engine.analyze(series)
    total = time.perf_counter() - start
    for stage, sec in result.timings.items():
        rows.append((f"small, {args.slices}-slice study: {stage}", "cpu", sec, None))
    rows.append((f"small, {args.slices}-slice study: total (3 windows)", "cpu", total,
                 3 * args.slices / total))

    rows.append(("small: slice network forwards", "cpu", None,
                 forward_rate("small", cpu, 48, args.seconds)))
    rows.append(("paper: slice network forwards", "cpu", None,
                 forward_rate("paper", cpu, 4, args.seconds)))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        rows.append(("paper: slice network forwards, bf16", name, None,
                     forward_rate("paper", device, 256, args.seconds)))

    table = Table(title=f"lungsys model speed ({torch.get_num_threads()} CPU threads, "
                        f"{os.cpu_count()} CPUs)")
    for col, justify in (("what", "left"), ("device", "left"), ("seconds", "right"),
                         ("slice-forwards/s", "right")):
        table.add_column(col, justify=justify)
    for what, dev, sec, rate in rows:
        table.add_row(what, dev, "" if sec is None else f"{sec:.2f}",
                      "" if rate is None else f"{rate:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
