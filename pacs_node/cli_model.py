"""lungsys commands for models: checkpoints, training, evaluation, analysis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
    TimeElapsedColumn
from rich.table import Table

from pacs_node.cli import _progress, app, err, out


model_app = typer.Typer(help="Create and inspect model checkpoints (.safetensors with JSON "
                        "metadata; never pickle).", no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command("init")
def model_init(
    profile: Annotated[str, typer.Option(help="small (CPU, tests, demo) or paper (the paper's "
                                         "ResNet-50, 512x512, for GPUs).")] = "small",
    seed: Annotated[int, typer.Option(min=0, help="Seed of the random initialisation.")] = 0,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint file to write "
                                           "(.safetensors).")] = Path("model.safetensors"),
    backbone_weights: Annotated[Optional[Path], typer.Option(
        "--backbone-weights", help="A torchvision ResNet-50 state dict (e.g. ImageNet "
        "resnet50-*.pth) to start the slice network's backbone from.")] = None,
) -> None:
    """Write a randomly initialised model: the start of training, and a model for tests.

    It is NOT a diagnostic model: its outputs are meaningless until trained.
    """
    from inference.backbone import load_torchvision_weights, read_state_dict
    from inference.checkpoint import LungSysModel, save_checkpoint

    model = LungSysModel.create(profile, seed)
    if backbone_weights is not None:
        load_torchvision_weights(model.slice_net.backbone, read_state_dict(backbone_weights))
        model.metadata["provenance"]["backbone_weights"] = backbone_weights.name
    meta = save_checkpoint(model, out_path)
    out.print(f"wrote {out_path}: profile {profile}, version {meta['model_version']}, "
              f"{meta['parameters']:,} parameters (untrained)")


@model_app.command("info")
def model_info(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint file (.safetensors).")],
    json_: Annotated[bool, typer.Option("--json", help="Print the metadata as JSON.")] = False,
    verify: Annotated[bool, typer.Option(help="Also read the weights and check their hashes.")]
    = True,
) -> None:
    """Print a checkpoint's metadata: profile, classes, version, hashes, provenance, metrics."""
    from inference.checkpoint import load_checkpoint, read_metadata

    meta = load_checkpoint(checkpoint).metadata if verify else read_metadata(checkpoint)
    if json_:
        print(json.dumps(meta, indent=1))
        return
    table = Table(title=str(checkpoint), show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in meta.items():
        table.add_row(key, value if isinstance(value, str) else json.dumps(value))
    out.print(table)
    if verify:
        out.print("weights verified: hashes match")


# Options both training commands share (their defaults differ, so they stay at the call).
DataOption = Annotated[Path, typer.Option(help="Dataset folder (or its manifest.csv).")]
LrStep = Annotated[int, typer.Option(min=1, help="Epochs between x lr-gamma steps.")]
LrGamma = Annotated[float, typer.Option(help="Learning-rate factor per step.")]
Momentum = Annotated[float, typer.Option(help="SGD momentum.")]
WeightDecay = Annotated[float, typer.Option(help="Weight decay.")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda ...")]
CacheDir = Annotated[Optional[Path], typer.Option(help="Cache of preprocessed slices (and "
                                                  "features); default DATA/.lungsys-cache.")]
RunDir = Annotated[Optional[Path], typer.Option(help="Run folder (config, log, metrics, "
                                                "resume state); default OUT.run.")]


train_app = typer.Typer(help="Train the two networks on a dataset (a folder with "
                        "manifest.csv): first 'slice', then 'patient'.", no_args_is_help=True)
app.add_typer(train_app, name="train")


def _train_progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err, disable=not err.is_terminal)


@train_app.command("slice")
def train_slice_cmd(
    data: DataOption,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write.")],
    profile: Annotated[str, typer.Option(help="small or paper.")] = "small",
    epochs: Annotated[int, typer.Option(min=1, help="Epochs (paper: 110).")] = 110,
    lr: Annotated[float, typer.Option(help="Initial learning rate (paper: 0.01).")] = 0.01,
    lr_step: LrStep = 40,
    lr_gamma: LrGamma = 0.1,
    momentum: Momentum = 0.9,
    weight_decay: WeightDecay = 1e-4,
    optimizer: Annotated[str, typer.Option(help="sgd (the paper's, with momentum) or adamw "
                                           "(faster from scratch).")] = "sgd",
    batch_size: Annotated[int, typer.Option(min=2, help="Slices per batch.")] = 32,
    seed: Annotated[int, typer.Option(min=0, help="Seed: the same seed, data and settings "
                                      "give the same model on the same device.")] = 0,
    device: DeviceOption = "auto",
    backbone_weights: Annotated[Optional[Path], typer.Option(
        help="torchvision ResNet-50 state dict (ImageNet) to start from.")] = None,
    focal: Annotated[bool, typer.Option(help="Class-balanced focal loss (Hu 2020) instead "
                                        "of cross-entropy.")] = False,
    size_balanced: Annotated[bool, typer.Option(help="Infection-size-balanced sampling "
                                                "(dual-sampling paper).")] = False,
    flips: Annotated[str, typer.Option(help="Random flips: horizontal, both or none.")]
    = "horizontal",
    affine: Annotated[bool, typer.Option(help="Small random rotations (+-12 deg), scalings "
                                         "(0.9-1.1) and shifts (6%); not in the paper.")]
    = False,
    run_dir: RunDir = None,
    cache_dir: CacheDir = None,
) -> None:
    """Train the slice network: lesion/no-lesion and four-class heads together.

    An interrupted run continues from its last finished epoch when started
    again with the same settings.
    """
    from training.train_slice import SliceTrainConfig, train_slice

    cfg = SliceTrainConfig(
        data=str(data), profile=profile, out=str(out_path),
        run_dir=str(run_dir) if run_dir else None, epochs=epochs, lr=lr, lr_step=lr_step,
        lr_gamma=lr_gamma, momentum=momentum, weight_decay=weight_decay, optimizer=optimizer,
        batch_size=batch_size, seed=seed, device=device,
        backbone_weights=str(backbone_weights) if backbone_weights else None, focal=focal,
        size_balanced=size_balanced, flips=flips, affine=affine,
        cache_dir=str(cache_dir) if cache_dir else None)
    with _train_progress() as bar:
        meta = train_slice(cfg, bar)
    out.print(f"wrote {out_path} (version {meta['model_version']}); run folder "
              f"{meta['provenance']['run_dir']}")


@train_app.command("patient")
def train_patient_cmd(
    data: DataOption,
    slice_model: Annotated[Path, typer.Option(help="Checkpoint from 'lungsys train slice'.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write (both "
                                           "networks).")],
    epochs: Annotated[int, typer.Option(min=1, help="Epochs (paper: 90).")] = 90,
    lr: Annotated[float, typer.Option(help="Initial learning rate (paper: 0.001).")] = 0.001,
    lr_step: LrStep = 30,
    lr_gamma: LrGamma = 0.1,
    momentum: Momentum = 0.9,
    weight_decay: WeightDecay = 1e-4,
    optimizer: Annotated[str, typer.Option(help="sgd (the paper's) or adamw.")] = "sgd",
    batch_size: Annotated[int, typer.Option(min=1, help="Patients per batch.")] = 8,
    seed: Annotated[int, typer.Option(min=0, help="Seed.")] = 0,
    device: DeviceOption = "auto",
    run_dir: RunDir = None,
    cache_dir: CacheDir = None,
) -> None:
    """Train the patient network on the frozen slice network's features."""
    from training.train_patient import PatientTrainConfig, train_patient

    cfg = PatientTrainConfig(
        data=str(data), slice_model=str(slice_model), out=str(out_path),
        run_dir=str(run_dir) if run_dir else None, epochs=epochs, lr=lr, lr_step=lr_step,
        lr_gamma=lr_gamma, momentum=momentum, weight_decay=weight_decay, optimizer=optimizer,
        batch_size=batch_size, seed=seed, device=device,
        cache_dir=str(cache_dir) if cache_dir else None)
    with _train_progress() as bar:
        meta = train_patient(cfg, bar)
    out.print(f"wrote {out_path} (version {meta['model_version']})")


@app.command()
def evaluate(
    model_path: Annotated[Path, typer.Option("--model", "-m", help="Checkpoint to evaluate.")],
    data: Annotated[Path, typer.Option(help="Dataset folder (or its manifest.csv).")],
    split: Annotated[str, typer.Option(help="train, val, test, or all (a fresh test set "
                                       "whose every study is unseen).")] = "test",
    json_: Annotated[bool, typer.Option("--json", help="Print the report as one JSON "
                                        "object.")] = False,
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write report.json "
                                                    "and ROC curves (PNG) here.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda ...")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap resamples.")] = 0,
    record: Annotated[bool, typer.Option(help="Store the metrics in the checkpoint's "
                                         "metadata (weights unchanged).")] = False,
) -> None:
    """Evaluate a model with the paper's metrics: network and non-parametric side by side.

    Patient level: per-class sensitivity, specificity, AUC; accuracy; FPE, FNE,
    FDPE; 95% bootstrap intervals (1000 resamples) and the bootstrap p-value
    between the two methods. Slice-level AUC; pointing game, Dice and the
    infected-fraction error where the dataset has lesion masks.
    """
    from inference.checkpoint import load_checkpoint, save_checkpoint
    from inference.profiles import CLASSES
    from training.evaluate import evaluate as run_evaluation

    with _progress() as bar:
        report = run_evaluation(model_path, data, split, device, out_dir, seed, bar)
    if out_dir is not None:
        (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    if record:
        model = load_checkpoint(model_path)
        model.metadata["metrics"] = {k: report[k] for k in (
            "split", "patients", "patient_accuracy", "patient_accuracy_ci95", "per_class",
            "fpe", "fne", "fdpe", "pointing_game", "dice", "infected_fraction_mae")} | {
            "data": report["data"], "nonparametric_accuracy":
            report["nonparametric"]["patient_accuracy"]}
        save_checkpoint(model, model_path)
    if json_:
        print(json.dumps(report))
        return
    table = Table(title=f"{report['patients']} {split} patients, model {report['model']['version']}")
    table.add_column("metric")
    for method in ("network", "nonparametric"):
        table.add_column(method, justify="right")

    def fmt(v, ci=None):
        text = "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.1f}%"
        return text + (f" [{100 * ci[0]:.1f}-{100 * ci[1]:.1f}]" if ci and text != "-" else "")

    n, p = report["network"], report["nonparametric"]
    table.add_row("accuracy", fmt(n["patient_accuracy"], n["patient_accuracy_ci95"]),
                  fmt(p["patient_accuracy"], p["patient_accuracy_ci95"]))
    for key in ("fpe", "fne", "fdpe"):
        table.add_row(key.upper(), fmt(n[key], n[f"{key}_ci95"]), fmt(p[key], p[f"{key}_ci95"]))
    for name in CLASSES:
        for key in ("sensitivity", "specificity", "auc"):
            table.add_row(f"{name} {key}", fmt(n["per_class"][name][key]),
                          fmt(p["per_class"][name][key]))
    out.print(table)
    out.print(f"p-value (accuracy, network vs non-parametric): "
              f"{report['p_value_accuracy_network_vs_nonparametric']:.3f}")
    for key in ("pointing_game", "dice"):
        if report.get(key) is not None:
            out.print(f"{key.replace('_', ' ')}: {100 * report[key]:.1f}% "
                      f"({report['lesion_slices_scored']} lesion slices)")
    if report.get("infected_fraction_mae") is not None:
        out.print(f"infected fraction error (mean absolute): "
                  f"{100 * report['infected_fraction_mae']:.2f} percentage points")
    for path in report.get("roc_png", []):
        out.print(f"ROC curves: {path}")


@app.command()
def analyze(
    folder: Annotated[Path, typer.Argument(help="Folder (or one file) holding one CT series.")],
    model_path: Annotated[Optional[Path], typer.Option(
        "--model", "-m", help="Checkpoint to use; default: the shipped model.")]
    = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a "
                                        "summary.")] = False,
    series_uid: Annotated[Optional[str], typer.Option(help="Series Instance UID to analyse "
                                                      "when the folder holds several.")] = None,
    method: Annotated[str, typer.Option(help="Patient-level method: network (the patient "
                                        "network) or nonparametric (the paper's Eq. 5).")]
    = "network",
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda, cuda:1 ...")]
    = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Slices per batch (each at three "
                                            "windows).")] = 16,
    out_dir: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Write the DICOM results here: SR-lungsys-report.dcm and "
        "SC-lungsys-heatmap-sliceNNNN.dcm.")] = None,
    heatmaps: Annotated[str, typer.Option(help="Heatmaps for 'lesion' slices (flagged by "
                                          "the model), 'all' slices, or 'none'.")] = "lesion",
) -> None:
    """Run the model on a CT series on disk and print the diagnosis.

    Prints the diagnosis, the four class probabilities, the infected fraction
    of the lung, and the slices with lesions and their boxes (rows and columns
    on the slice, end-exclusive). With --out, also writes the results as
    DICOM: a Comprehensive 3D SR (TID 1500) and Secondary Capture heatmaps, in
    the source study.
    """
    from inference.engine import Engine
    from inference.profiles import CLASSES
    from inference.series import load_series

    from inference.checkpoint import default_model

    engine = Engine(model_path or default_model(), device=device, batch_size=batch_size,
                    method=method)
    if (engine.model.metadata.get("provenance") or {}).get("kind") == "init":
        err.print("lungsys: warning: this model is untrained (made by 'lungsys model init'); "
                  "its diagnosis means nothing", markup=False, highlight=False)
    elif engine.model.metadata.get("intended_use"):
        err.print(f"lungsys: note: {engine.model.metadata['intended_use']}", markup=False,
                  highlight=False)
    series = load_series(folder, series_uid=series_uid)
    with _progress() as bar:
        task = bar.add_task(f"analysing {len(series)} slices", total=len(series))
        result = engine.analyze(series, lambda done, total: bar.update(task, completed=done))
    files = None
    if out_dir is not None:
        from inference.export import write_results
        files = write_results(result, series, out_dir, heatmaps=heatmaps)
    if json_:
        report = result.to_json()
        if files is not None:
            report["files"] = {"sr": str(files.sr), "heatmaps": [str(p) for p in files.heatmaps]}
        print(json.dumps(report))
        return
    out.print(f"diagnosis: {result.diagnosis} ({result.method}; model {result.model['version']}"
              f", {result.model['device']})")
    for name, p in zip(CLASSES, result.probabilities):
        out.print(f"  {name:<9} {p:6.3f}")
    out.print(f"infected fraction of the lung: {100 * result.infected_fraction:.2f}%")
    lesion = result.lesion_slices
    out.print(f"slices with lesions: {len(lesion)} of {len(result.slices)}")
    for s in lesion:
        boxes = ", ".join(f"[{b.row0}:{b.row1}, {b.col0}:{b.col1}]" for b in s.boxes) or "-"
        out.print(f"  {s.index:4d} p={s.lesion_probability:.3f} {s.sop_instance_uid} {boxes}")
    if series.skipped:
        out.print(f"{len(series.skipped)} files skipped (lungsys scan lists them)")
    if files is not None:
        out.print(f"wrote {files.sr} and {len(files.heatmaps)} heatmaps to {out_dir}")
