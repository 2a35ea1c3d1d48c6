"""Model speed: slice-forwards per second per profile, and a whole study.

    .venv/bin/python -m bench.bench_model [--slices 300] [--device auto]

Prints one table. On the CPU: the small profile analysing a whole phantom
study (three windows per slice and its mirror image, then one view only as
``[model] mirror = false`` runs it: preprocessing, slice network, patient
network, localisation), raw slice-forward rates of both profiles, and each
architecture's small profile on the same study (``--archs``). On a CUDA
device: the paper profile's slice-forward rate in bf16, with the GPU named,
and each architecture's paper profile on the study. Targets (not tests):
small, 300 slices, three windows, <= 30 s on 2 CPU cores; paper, >= 3000
slice-forwards/s on one H100.
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
from inference.profiles import ARCHITECTURES, PROFILES, profile_for
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


def study_row(arch: str, size: str, series, device: torch.device, name: str) -> tuple:
    """One architecture's profile analysing the whole study (on a GPU after a warm-up)."""
    profile = profile_for(arch, size)
    engine = Engine(LungSysModel.create(profile, 0), device=str(device), batch_size=16)
    if device.type == "cuda":
        engine.analyze(series)
    start = time.perf_counter()
    engine.analyze(series)
    if device.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    rate = None if profile.volume else 3 * len(series) / total
    return (f"{profile.name}, {len(series)}-slice study: total", name, total, rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--archs", nargs="*", default=list(ARCHITECTURES),
                        help="architectures timed on the whole study (none: skip)")
    args = parser.parse_args()
    device = select_device(args.device)
    cpu = torch.device("cpu")
    rows = []

    with tempfile.TemporaryDirectory() as tmp:
        generate_study(tmp, "covid", 1, args.slices)
        series = load_series(tmp)
    for mirror in (True, False):                # the default, and [model] mirror = false
        views = 2 if mirror else 1
        engine = Engine(LungSysModel.create("small", 0), device=str(cpu), batch_size=16,
                        mirror=mirror)
        start = time.perf_counter()
        result = engine.analyze(series)
        total = time.perf_counter() - start
        what = f"small, {args.slices}-slice study, 3 windows x {views} view{'s' * (views > 1)}"
        for stage, sec in result.timings.items():
            rows.append((f"{what}: {stage}", "cpu", sec, None))
        rows.append((f"{what}: total", "cpu", total, 3 * views * args.slices / total))

    rows.append(("small: slice network forwards", "cpu", None,
                 forward_rate("small", cpu, 48, args.seconds)))
    rows.append(("paper: slice network forwards", "cpu", None,
                 forward_rate("paper", cpu, 4, args.seconds)))
    for arch in args.archs:
        rows.append(study_row(arch, "small", series, cpu, "cpu"))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        rows.append(("paper: slice network forwards, bf16", name, None,
                     forward_rate("paper", device, 256, args.seconds)))
        for arch in args.archs:
            rows.append(study_row(arch, "paper", series, device, name))

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
