"""The ``lungsys`` command.

Exit status: 0 on success, 1 when the input is bad or an operation failed
(one line on stderr, no traceback), 2 on a usage error.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
    TimeElapsedColumn
from rich.table import Table

from inference.version import software_version

app = typer.Typer(
    name="lungsys",
    help=("lungsys: an AI node for chest CT. It receives CT series over DICOM, runs the M3 "
          "Lung-Sys model (Healthy / COVID-19 / H1N1 / CAP, with lesion maps) and sends a "
          "Structured Report and heatmaps back to PACS.\n\n"
          "Start with 'lungsys phantom --out demo/study --label covid --seed 7' to make a "
          "synthetic study, and 'lungsys scan demo/study' to see how the node reads it."),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)  # no wrapping in pipes


class CLIError(Exception):
    """A failure to report as one line and exit status 1."""


def _version_callback(value: bool) -> None:
    if value:
        print(f"lungsys {software_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version_: Annotated[bool, typer.Option("--version", callback=_version_callback,
                                           is_eager=True, help="Print the version and exit.")]
    = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True,
                                         help="More log output (-v info, -vv debug).")] = 0,
) -> None:
    level = logging.WARNING if verbose == 0 else (logging.INFO if verbose == 1 else logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err, transient=True,
                    disable=not err.is_terminal)


@app.command()
def phantom(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the study into "
                                          "(created; existing files are overwritten).")],
    label: Annotated[str, typer.Option(help="Class of the patient: healthy, covid, h1n1 or cap.")],
    seed: Annotated[int, typer.Option(min=0, help="Random seed: the same seed and label always "
                                      "give the same study.")],
    slices: Annotated[int, typer.Option(min=1, max=2000, help="Number of slices; they cover "
                                        "the whole lungs, so more slices means thinner ones.")]
    = 64,
    patient_position: Annotated[str, typer.Option(help="HFS (head first) or FFS (feet first).")]
    = "HFS",
    severity: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Disease "
                        "severity from 0 (a few small lesions) to 1 (extensive); drawn from the "
                        "seed when left out.")] = None,
) -> None:
    """Write one synthetic chest CT study as a DICOM series, with its truth.

    Beside the CT files (CT0001.dcm, ... in acquisition order) come truth.json
    (label, lesions, per-slice lesion flags, types and lung fraction) and
    masks.npz (lung and lesion masks in the slice order of truth.json).
    """
    from training.phantom import LABELS, build_phantom, write_study

    label = label.lower()
    if label not in LABELS:
        raise CLIError(f"unknown label {label!r}; expected one of {', '.join(LABELS)}")
    ph = build_phantom(label, seed, slices, patient_position=patient_position.upper(),
                       severity=severity)
    with _progress() as bar:
        task = bar.add_task(f"rendering {label} seed {seed}", total=slices)
        hu, lung, lesion, types = ph.render(lambda: bar.advance(task))
    study = write_study(ph, out_dir, hu, lung, lesion, types)
    t = study.truth
    lesion_slices = sum(s["has_lesion"] for s in t["slices"])
    out.print(f"wrote {len(study.files)} CT slices to {out_dir} ({t['label']}, seed {seed}, "
              f"{t['slice_thickness_mm']} mm, {lesion_slices} slices with lesions, "
              f"infected fraction {100 * t['infected_fraction']:.2f}%)")


@app.command("phantom-set")
def phantom_set(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the dataset.")],
    per_class: Annotated[int, typer.Option(min=1, help="Studies (patients) per class.")],
    seed: Annotated[int, typer.Option(min=0, help="Base seed; sets with different seeds share "
                                      "no patient.")],
    slices_range: Annotated[tuple[int, int], typer.Option(help="Fewest and most slices per "
                                                          "study.")] = (32, 48),
    workers: Annotated[int, typer.Option(min=1, help="Processes generating studies.")] = 2,
) -> None:
    """Write a phantom dataset: studies of all four classes and manifest.csv.

    Splits (train/val/test, 60/20/20 by patient within each class) are in the
    manifest; every study carries truth.json and masks.npz, which the manifest
    names as annotations and masks.
    """
    from training.phantom_set import generate_phantom_set

    with _progress() as bar:
        task = bar.add_task("generating phantom studies", total=4 * per_class)
        manifest = generate_phantom_set(out_dir, per_class, seed, tuple(slices_range), workers,
                                        lambda: bar.advance(task))
    out.print(f"wrote {4 * per_class} studies and {manifest}")


@app.command()
def scan(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (searched "
                                                "recursively).")],
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """List the CT series found in files or folders, and every file skipped, with why.

    This is how the node and 'lungsys analyze' read a folder: by Series
    Instance UID, CT images only, localizers and other modalities left out.
    """
    from inference.series import scan as scan_files

    groups, skipped = scan_files(paths)
    if json_:
        print(json.dumps({
            "series": [{"series_instance_uid": uid, "files": len(members),
                        "description": str(members[0][1].get("SeriesDescription", ""))}
                       for uid, members in sorted(groups.items())],
            "skipped": [{"path": str(s.path), "reason": s.reason} for s in skipped]}))
        return
    table = Table(title="CT series")
    for col in ("Series Instance UID", "Files", "Description"):
        table.add_column(col)
    for uid, members in sorted(groups.items()):
        table.add_row(uid, str(len(members)), str(members[0][1].get("SeriesDescription", "")))
    out.print(table)
    for s in skipped:
        out.print(f"skipped {s.path}: {s.reason}")
    if not groups:
        raise CLIError("no CT image series found")


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


train_app = typer.Typer(help="Train the two networks on a dataset (a folder with "
                        "manifest.csv): first 'slice', then 'patient'.", no_args_is_help=True)
app.add_typer(train_app, name="train")


def _train_progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err, disable=not err.is_terminal)


@train_app.command("slice")
def train_slice_cmd(
    data: Annotated[Path, typer.Option(help="Dataset folder (or its manifest.csv).")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write.")],
    profile: Annotated[str, typer.Option(help="small or paper.")] = "small",
    epochs: Annotated[int, typer.Option(min=1, help="Epochs (paper: 110).")] = 110,
    lr: Annotated[float, typer.Option(help="Initial learning rate (paper: 0.01).")] = 0.01,
    lr_step: Annotated[int, typer.Option(min=1, help="Epochs between x lr-gamma steps.")] = 40,
    lr_gamma: Annotated[float, typer.Option(help="Learning-rate factor per step.")] = 0.1,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.")] = 1e-4,
    optimizer: Annotated[str, typer.Option(help="sgd (the paper's, with momentum) or adamw "
                                           "(faster from scratch).")] = "sgd",
    batch_size: Annotated[int, typer.Option(min=2, help="Slices per batch.")] = 32,
    seed: Annotated[int, typer.Option(min=0, help="Seed: the same seed, data and settings "
                                      "give the same model on the same device.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda ...")] = "auto",
    backbone_weights: Annotated[Optional[Path], typer.Option(
        help="torchvision ResNet-50 state dict (ImageNet) to start from.")] = None,
    focal: Annotated[bool, typer.Option(help="Class-balanced focal loss (Hu 2020) instead "
                                        "of cross-entropy.")] = False,
    size_balanced: Annotated[bool, typer.Option(help="Infection-size-balanced sampling "
                                                "(dual-sampling paper).")] = False,
    flips: Annotated[str, typer.Option(help="Random flips: horizontal, both or none.")]
    = "horizontal",
    run_dir: Annotated[Optional[Path], typer.Option(help="Run folder (config, log, metrics, "
                                                    "resume state); default OUT.run.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Preprocessed-slice cache; "
                                                      "default DATA/.lungsys-cache.")] = None,
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
        size_balanced=size_balanced, flips=flips,
        cache_dir=str(cache_dir) if cache_dir else None)
    with _train_progress() as bar:
        meta = train_slice(cfg, bar)
    out.print(f"wrote {out_path} (version {meta['model_version']}); run folder "
              f"{meta['provenance']['run_dir']}")


@train_app.command("patient")
def train_patient_cmd(
    data: Annotated[Path, typer.Option(help="Dataset folder (or its manifest.csv).")],
    slice_model: Annotated[Path, typer.Option(help="Checkpoint from 'lungsys train slice'.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write (both "
                                           "networks).")],
    epochs: Annotated[int, typer.Option(min=1, help="Epochs (paper: 90).")] = 90,
    lr: Annotated[float, typer.Option(help="Initial learning rate (paper: 0.001).")] = 0.001,
    lr_step: Annotated[int, typer.Option(min=1, help="Epochs between x lr-gamma steps.")] = 30,
    lr_gamma: Annotated[float, typer.Option(help="Learning-rate factor per step.")] = 0.1,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.")] = 1e-4,
    optimizer: Annotated[str, typer.Option(help="sgd (the paper's) or adamw.")] = "sgd",
    batch_size: Annotated[int, typer.Option(min=1, help="Patients per batch.")] = 8,
    seed: Annotated[int, typer.Option(min=0, help="Seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda ...")] = "auto",
    run_dir: Annotated[Optional[Path], typer.Option(help="Run folder; default OUT.run.")]
    = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Cache of slices and features; "
                                                      "default DATA/.lungsys-cache.")] = None,
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

    import numpy as np
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


@app.command()
def serve(
    config_file: Annotated[Optional[Path], typer.Option(
        "--config", "-c", help="TOML configuration (see config/default.toml); every key has "
        "a default and an environment variable LUNGSYS_<SECTION>_<KEY>.")] = None,
) -> None:
    """Run the node: receive CT over DICOM, analyse complete series, deliver results.

    Stops cleanly on Ctrl-C or SIGTERM; nothing received is lost, and work
    left unfinished resumes at the next start.
    """
    import signal
    import threading

    from config import load_config
    from inference.checkpoint import default_model
    from inference.engine import Engine
    from pacs_node.node import Node

    cfg = load_config(config_file)
    checkpoint = cfg.model["checkpoint"] or default_model()
    engine = Engine(checkpoint, device=cfg.model["device"],
                    batch_size=cfg.model["batch_size"], method=cfg.model["method"])
    node = Node(cfg, engine)
    node.start()
    logging.getLogger("lungsys").warning(
        "lungsys %s: %s listening on %s:%d, model %s on %s, %d destination(s)", software_version(),
        cfg.node["ae_title"], cfg.node["host"], node.port, engine.model.version, engine.device,
        len(cfg.destinations))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    node.stop()


def _store(config_file: Optional[Path]):
    from config import load_config
    from store.api import JobStore

    return JobStore(load_config(config_file).store["url"])


ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c",
                                                      help="The node's configuration file.")]
jobs_app = typer.Typer(help="Inspect and retry the node's jobs (the job store named by the "
                       "configuration).", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
deliveries_app = typer.Typer(help="Retry deliveries of results to PACS.", no_args_is_help=True)
app.add_typer(deliveries_app, name="deliveries")


def _job_dict(job) -> dict:
    return {"id": job.id, "state": job.state.value, "series_instance_uid":
            job.series.series_instance_uid, "study_instance_uid": job.series.study_instance_uid,
            "series_state": job.series.state.value, "series_reason": job.series.reason,
            "version": job.version, "attempts": job.attempts,
            "created_at": str(job.created_at), "started_at": str(job.started_at or ""),
            "finished_at": str(job.finished_at or ""), "model_version": job.model_version,
            "diagnosis": job.diagnosis, "probabilities": job.probabilities,
            "infected_fraction": job.infected_fraction, "timings": job.timings,
            "error": job.error,
            "results": [{"kind": r.kind, "sop_instance_uid": r.sop_instance_uid,
                         "path": r.path} for r in job.results],
            "deliveries": [{"id": d.id, "destination": d.destination, "kind": d.kind,
                            "state": d.state.value, "attempts": d.attempts,
                            "next_attempt_at": str(d.next_attempt_at),
                            "last_error": d.last_error} for d in job.deliveries]}


@jobs_app.command("list")
def jobs_list(
    config_file: ConfigOption = None,
    state: Annotated[Optional[str], typer.Option(help="queued, running, done or failed.")]
    = None,
    json_: Annotated[bool, typer.Option("--json", help="One JSON array.")] = False,
) -> None:
    """List jobs, newest first."""
    jobs = _store(config_file).jobs(state)
    if json_:
        print(json.dumps([_job_dict(j) for j in jobs]))
        return
    table = Table()
    for col in ("job", "state", "series", "diagnosis", "deliveries", "finished", "error"):
        table.add_column(col)
    for j in jobs:
        deliveries = ", ".join(f"{d.destination}:{d.state.value}" for d in j.deliveries) or "-"
        table.add_row(str(j.id), j.state.value, j.series.series_instance_uid[-24:],
                      j.diagnosis or "-", deliveries, str(j.finished_at or "-")[:19],
                      (j.error or "")[:60])
    out.print(table)


@jobs_app.command("show")
def jobs_show(job_id: Annotated[int, typer.Argument(help="Job number.")],
              config_file: ConfigOption = None) -> None:
    """Everything about one job: series, timings, diagnosis, results, deliveries."""
    jobs = [j for j in _store(config_file).jobs(limit=100000) if j.id == job_id]
    if not jobs:
        raise CLIError(f"no job {job_id}")
    print(json.dumps(_job_dict(jobs[0]), indent=1))


@jobs_app.command("retry")
def jobs_retry(job_id: Annotated[int, typer.Argument(help="Job number.")],
               config_file: ConfigOption = None) -> None:
    """Queue a job again (a running node picks it up)."""
    try:
        _store(config_file).retry_job(job_id)
    except LookupError as exc:
        raise CLIError(str(exc)) from None
    out.print(f"job {job_id} queued")


@deliveries_app.command("retry")
def deliveries_retry(delivery_id: Annotated[int, typer.Argument(help="Delivery number.")],
                     config_file: ConfigOption = None) -> None:
    """Send a delivery again now (a running node picks it up)."""
    try:
        _store(config_file).retry_delivery(delivery_id)
    except LookupError as exc:
        raise CLIError(str(exc)) from None
    out.print(f"delivery {delivery_id} due now")


@app.command()
def echo(
    host: Annotated[str, typer.Argument(help="Peer address.")],
    port: Annotated[int, typer.Argument(help="Peer DICOM port.")],
    aet: Annotated[str, typer.Option("--aet", help="The peer's (called) AE title.")] = "ANY-SCP",
    calling: Annotated[str, typer.Option("--calling", help="Our (calling) AE title.")]
    = "LUNGSYS",
) -> None:
    """C-ECHO a peer, as DCMTK's echoscu does: exit 0 when it answers Success."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate(host, port, ae_title=aet)
    if not assoc.is_established:
        raise CLIError(f"no association with {aet}@{host}:{port} "
                       f"({'rejected' if assoc.is_rejected else 'no answer'})")
    status = assoc.send_c_echo()
    assoc.release()
    if getattr(status, "Status", None) != 0x0000:
        raise CLIError(f"C-ECHO to {aet}@{host}:{port} failed")
    out.print(f"C-ECHO {aet}@{host}:{port}: Success")


def main() -> None:
    """Entry point: run the app, turning expected failures into one line."""
    from inference.backbone import WeightsError
    from inference.checkpoint import CheckpointError
    from inference.errors import SeriesError
    from training.dataset import ManifestError

    try:
        app()
    except (CLIError, SeriesError, CheckpointError, WeightsError, ManifestError, ValueError,
            FileNotFoundError, OSError) as exc:
        err.print(f"lungsys: error: {exc}", markup=False, highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
