"""lungsys commands for training and evaluation: the slice and patient networks on a
dataset, and the paper's metrics (computed and formatted by :mod:`training.evaluate`)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from lungsys.common import err, out, progress


# Options both training commands share (their defaults differ, so they stay at the call).
DataOption = Annotated[Path, typer.Option(help="Dataset folder (or its manifest.csv).")]
LrStep = Annotated[int, typer.Option(min=1, help="Epochs between x lr-gamma steps.")]
LrGamma = Annotated[float, typer.Option(help="Learning-rate factor per step.")]
Momentum = Annotated[float, typer.Option(help="SGD momentum.")]
WeightDecay = Annotated[float, typer.Option(help="Weight decay.")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda ...")]
Betas = Annotated[tuple[float, float], typer.Option(help="adam's and adamw's beta1 and beta2 "
                                                    "(Hu 2020: 0.5 0.9).")]
CacheDir = Annotated[Optional[Path], typer.Option(help="Cache of preprocessed slices (and "
                                                  "features); default DATA/.lungsys-cache.")]
RunDir = Annotated[Optional[Path], typer.Option(help="Run folder (config, log, metrics, "
                                                "resume state); default OUT with .run "
                                                "for its suffix (a.safetensors: a.run).")]


@contextmanager
def stopped_by_ctrl_c():
    """Ctrl-C in training: one line saying what was kept and how to go on; exit status 130
    (interrupted, as a shell reports SIGINT)."""
    from training.clock import TrainingStopped

    try:
        yield
    except TrainingStopped as exc:
        err.print(f"lungsys: {exc}", markup=False, highlight=False)
        raise typer.Exit(130) from None
    except KeyboardInterrupt:             # before the first epoch (caching, features)
        err.print("lungsys: stopped before the first epoch: nothing is kept but the cached "
                  "slices; the same command starts again", markup=False, highlight=False)
        raise typer.Exit(130) from None


def warn_about_splits(data: Path) -> None:
    """A warning on stderr for each training split of the dataset that is empty, or lacks a
    class: training goes on, but without validation there is no validation accuracy to
    follow, and a class the training split lacks is never learnt. A dataset that cannot be
    read is refused here (ManifestError), before PyTorch loads and a run folder is made."""
    from collections import Counter

    from inference.profiles import CLASSES
    from training.dataset import read_manifest

    entries = read_manifest(data)     # a dataset that is not one: refused here (ManifestError)
    for split, empty in (("train", "there is nothing to train on"),
                         ("val", "no validation accuracy will be measured")):
        counts = Counter(e.label for e in entries if e.split == split)
        missing = [name for label, name in enumerate(CLASSES) if not counts[label]]
        if not counts:
            line = f"the {split} split of {data} is empty: {empty}"
        elif missing:
            line = f"the {split} split of {data} has no {', '.join(missing)} study"
        else:
            continue
        err.print(f"lungsys: warning: {line}", markup=False, highlight=False)


train_app = typer.Typer(help="Train a model on a dataset (a folder with manifest.csv): "
                        "a slice model's two networks first 'slice', then 'patient'; a volume "
                        "model (dual sampling) with 'volume'.", no_args_is_help=True)


@train_app.command("slice")
def train_slice_command(
    data: DataOption,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write.")],
    profile: Annotated[str, typer.Option(help="small or paper (LA-DNN on VGG-16: "
                                         "vgg16-small, vgg16-paper).")] = "small",
    arch: Annotated[str, typer.Option(help="m3 (M3 Lung-Sys), hu2020 (Hu et al.: multi-scale "
                                      "CAMs) or ladnn (LA-DNN, trained with its lesion-type "
                                      "task from the annotations' lesion_types); "
                                      "dualsampling is a volume model: 'train volume'; "
                                      "docs/models.md.")] = "m3",
    epochs: Annotated[int, typer.Option(min=1, help="Epochs (M3's paper: 110).")] = 110,
    lr: Annotated[float, typer.Option(help="Initial learning rate (M3's paper: 0.01).")]
    = 0.01,
    lr_step: LrStep = 40,
    lr_gamma: LrGamma = 0.1,
    momentum: Momentum = 0.9,
    weight_decay: WeightDecay = 1e-4,
    optimizer: Annotated[str, typer.Option(help="sgd (M3's paper's, with momentum), adam "
                                           "(Hu 2020's) or adamw (faster from scratch).")]
    = "sgd",
    betas: Betas = (0.9, 0.999),
    batch_size: Annotated[int, typer.Option(min=2, help="Slices per batch.")] = 32,
    seed: Annotated[int, typer.Option(min=0, help="Seed: the same seed, data and settings "
                                      "give the same model on the same device.")] = 0,
    device: DeviceOption = "auto",
    backbone_weights: Annotated[Optional[Path], typer.Option(
        help="torchvision state dict (ImageNet) of the architecture's backbone to start "
        "from (ResNet-50 for m3, DenseNet-169 for ladnn, VGG-16 for ladnn's vgg16 "
        "profiles).")] = None,
    from_model: Annotated[Optional[Path], typer.Option(
        help="Start from this checkpoint's slice network (same architecture and sizes): "
        "fine-tune the shipped model on your own studies.")] = None,
    focal: Annotated[bool, typer.Option(help="Class-weighted focal loss instead of "
                                        "cross-entropy: Hu 2020's (gamma 1, inverse class "
                                        "frequencies) for --arch hu2020, else gamma 2 with "
                                        "effective-number weights.")] = False,
    size_balanced: Annotated[bool, typer.Option(help="Infection-size-balanced sampling "
                                                "(dual-sampling paper).")] = False,
    flips: Annotated[str, typer.Option(help="Random flips: horizontal, both or none.")]
    = "horizontal",
    affine: Annotated[bool, typer.Option(help="Small random rotations (+-12 deg), scalings "
                                         "(0.9-1.1) and shifts (6%); not in the paper.")]
    = False,
    crop: Annotated[Optional[str], typer.Option(
        help="lungs (the paper's lung box) or mirrored (the box joined with its mirror image "
        "about the body's midline: a consolidated lung stays in); the model keeps it. "
        "Default: the --from-model's crop, else lungs.")] = None,
    early_stop: Annotated[int, typer.Option(
        min=0, help="Stop after this many epochs without a lower validation loss, and write "
        "the epoch of the best validation accuracy (the mean of both tasks'); 0: train every "
        "epoch and write the last. Validation is once an epoch (Hu 2020: every 500 "
        "iterations, stopping after two without a fall).")]
    = 0,
    level_epochs: Annotated[int, typer.Option(
        min=0, help="Hu 2020's first phase: train each level's classifier on its own for "
        "this many epochs, then the joint one (--arch hu2020 only).")] = 0,
    run_dir: RunDir = None,
    cache_dir: CacheDir = None,
) -> None:
    """Train the slice network: lesion/no-lesion and four-class heads together.

    Prints a line each epoch (losses, validation accuracy, time left). An
    interrupted run (Ctrl-C: exit status 130) continues from its last finished
    epoch when started again with the same settings.
    """
    from training.settings import SliceTrainConfig, checked_slice_profile

    cfg = SliceTrainConfig(
        data=str(data), profile=profile, arch=arch, out=str(out_path),
        run_dir=str(run_dir) if run_dir else None, epochs=epochs, lr=lr, lr_step=lr_step,
        lr_gamma=lr_gamma, momentum=momentum, weight_decay=weight_decay, optimizer=optimizer,
        beta1=betas[0], beta2=betas[1], batch_size=batch_size, seed=seed, device=device,
        backbone_weights=str(backbone_weights) if backbone_weights else None,
        from_model=str(from_model) if from_model else None, focal=focal,
        size_balanced=size_balanced, flips=flips, affine=affine, crop=crop,
        early_stop=early_stop, level_epochs=level_epochs,
        cache_dir=str(cache_dir) if cache_dir else None)
    checked_slice_profile(cfg)      # a typo or the wrong command is said before any warning
    warn_about_splits(data)         # (and before PyTorch is imported: training.settings)
    from training.train_slice import train_slice

    with progress(transient=False) as bar, stopped_by_ctrl_c():
        meta = train_slice(cfg, bar)
    kept = meta["provenance"]["kept_epoch"]
    out.print(f"wrote {out_path} (version {meta['model_version']}"
              + (f", epoch {kept} kept" if early_stop else "")
              + f"); run folder {meta['provenance']['run_dir']}")


@train_app.command("patient")
def train_patient_command(
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
    optimizer: Annotated[str, typer.Option(help="sgd (the paper's), adam or adamw.")] = "sgd",
    betas: Betas = (0.9, 0.999),
    batch_size: Annotated[int, typer.Option(min=1, help="Patients per batch.")] = 8,
    seed: Annotated[int, typer.Option(min=0, help="Seed.")] = 0,
    device: DeviceOption = "auto",
    run_dir: RunDir = None,
    cache_dir: CacheDir = None,
) -> None:
    """Train the patient network on the frozen slice network's features.

    Prints a line each epoch (loss, validation accuracy, time left); Ctrl-C keeps
    the finished epochs, and the same command continues from there."""
    from training.settings import PatientTrainConfig, check_patient_settings

    cfg = PatientTrainConfig(
        data=str(data), slice_model=str(slice_model), out=str(out_path),
        run_dir=str(run_dir) if run_dir else None, epochs=epochs, lr=lr, lr_step=lr_step,
        lr_gamma=lr_gamma, momentum=momentum, weight_decay=weight_decay, optimizer=optimizer,
        beta1=betas[0], beta2=betas[1], batch_size=batch_size, seed=seed, device=device,
        cache_dir=str(cache_dir) if cache_dir else None)
    check_patient_settings(cfg)     # a missing or volume slice model is said before warnings
    warn_about_splits(data)
    from training.train_patient import train_patient

    with progress(transient=False) as bar, stopped_by_ctrl_c():
        meta = train_patient(cfg, bar)
    out.print(f"wrote {out_path} (version {meta['model_version']})")


@train_app.command("volume")
def train_volume_command(
    data: DataOption,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write.")],
    profile: Annotated[str, typer.Option(help="small or paper.")] = "small",
    arch: Annotated[str, typer.Option(help="dualsampling (the dual-sampling attention "
                                      "network: two 3D ResNet-34s over the lungs' volume, "
                                      "their attention trained against the annotations' "
                                      "infection masks); docs/models.md.")] = "dualsampling",
    epochs: Annotated[int, typer.Option(min=1, help="Epochs (paper: 20).")] = 20,
    lr: Annotated[float, typer.Option(help="Initial learning rate (paper: 2e-4).")] = 2e-4,
    lr_step: Annotated[int, typer.Option(min=1, help="Epochs between x lr-gamma steps "
                                         "(paper: 5).")] = 5,
    lr_gamma: LrGamma = 0.1,
    weight_decay: WeightDecay = 1e-4,
    batch_size: Annotated[int, typer.Option(min=2, help="Volumes per batch and branch "
                                            "(paper: 20).")] = 20,
    flips: Annotated[bool, typer.Option(help="Random left-right flips (not in the "
                                        "paper).")] = True,
    seed: Annotated[int, typer.Option(min=0, help="Seed.")] = 0,
    device: DeviceOption = "auto",
    run_dir: RunDir = None,
    cache_dir: CacheDir = None,
) -> None:
    """Train a volume model (dual sampling): both branches, uniform and size-balanced
    sampling, the epoch with the best validation accuracy kept.

    Prints a line each epoch (losses, validation accuracy, time left); Ctrl-C keeps
    the finished epochs, and the same command continues from there."""
    from training.settings import VolumeTrainConfig, checked_volume_profile

    cfg = VolumeTrainConfig(
        data=str(data), profile=profile, arch=arch, out=str(out_path),
        run_dir=str(run_dir) if run_dir else None, epochs=epochs, lr=lr, lr_step=lr_step,
        lr_gamma=lr_gamma, weight_decay=weight_decay, batch_size=batch_size, flips=flips,
        seed=seed, device=device, cache_dir=str(cache_dir) if cache_dir else None)
    checked_volume_profile(cfg)     # a typo or the wrong command is said before any warning
    warn_about_splits(data)
    from training.train_volume import train_volume

    with progress(transient=False) as bar, stopped_by_ctrl_c():
        meta = train_volume(cfg, bar)
    out.print(f"wrote {out_path} (version {meta['model_version']}, epoch "
              f"{meta['provenance']['kept_epoch']} kept)")


def evaluate_command(
    model_paths: Annotated[list[Path], typer.Option(
        "--model", "-m", help="Checkpoint to evaluate; give several (--model A --model B) to "
        "compare them on the same studies.")],
    data: Annotated[Path, typer.Option(help="Dataset folder (or its manifest.csv).")],
    split: Annotated[str, typer.Option(help="train, val, test, or all (a fresh test set "
                                       "whose every study is unseen).")] = "test",
    json_: Annotated[bool, typer.Option("--json", help="Print the report as one JSON "
                                        "object.")] = False,
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write report.json "
                                                    "and ROC curves (PNG) here (a folder "
                                                    "N-NAME per model when several, and "
                                                    "comparison.json and .md, the table "
                                                    "in Markdown).")]
    = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda ...")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap resamples.")] = 0,
    record: Annotated[bool, typer.Option(help="Store the metrics in the checkpoint's "
                                         "metadata (weights unchanged).")] = False,
    cache_dir: Annotated[Optional[Path], typer.Option(
        help="Where each study's evaluation is kept, to be found again by the next "
        "evaluation of the same model; default DATA/.lungsys-cache.")] = None,
    cache: Annotated[bool, typer.Option(help="Use studies evaluated before (--no-cache: "
                                        "analyse every study again).")] = True,
) -> None:
    """Evaluate a model with the paper's metrics: network and non-parametric side by side;
    or several models side by side.

    Patient level: per-class sensitivity, specificity, AUC; accuracy; FPE, FNE,
    FDPE; 95% bootstrap intervals (1000 resamples) and the bootstrap p-value
    between the two methods (between each pair of models, when several). Slice-level
    AUC; pointing game, Dice and the infected-fraction error where the dataset has
    lesion masks; seconds per 300-slice study on this machine.
    """
    from inference.model_file import read_metadata, untrained
    from inference.model_info import advice_for
    from inference.profiles import Profile
    from training.dataset import studies_to_evaluate

    # A model that is not one, and a dataset with nothing to evaluate, are said before
    # PyTorch loads (the models' warnings first: a mistyped dataset does not hide them).
    metadata = [read_metadata(path) for path in model_paths]
    for model_path, meta in zip(model_paths, metadata):
        try:
            notice = advice_for(untrained(meta, not Profile.from_dict(meta["profile"]).volume))
        except (KeyError, TypeError, ValueError):
            notice = ""                                  # evaluate says what is wrong
        if notice:
            err.print(f"lungsys: warning: {model_path}: {notice}", markup=False,
                      highlight=False)
    studies_to_evaluate(data, split)
    from inference.checkpoint import load_checkpoint, save_checkpoint
    from training.compare import (compare, comparison_lines, comparison_markdown,
                                   comparison_table, model_name)
    from training.evaluate import (evaluate, recorded_metrics, report_lines, report_table,
                                   studies_seen)

    for model_path, meta in zip(model_paths, metadata):       # before minutes of evaluation
        try:
            seen = studies_seen(meta, data, split)
        except (ValueError, OSError):                 # evaluate says what is wrong
            continue
        if seen:
            err.print(f"lungsys: warning: {model_path}: {seen} of the studies evaluated "
                      f"trained it or chose its epochs (its datasets' train and val splits): "
                      f"on them its figures are not a test", markup=False, highlight=False)
    reports = []
    for number, model_path in enumerate(model_paths, start=1):
        where = out_dir / f"{number}-{model_path.stem}" \
            if out_dir is not None and len(model_paths) > 1 else out_dir
        with progress() as bar:
            report = evaluate(model_path, data, split, device, where, seed, bar,
                              cache_dir, cache)
        if where is not None:
            where.mkdir(parents=True, exist_ok=True)
            (where / "report.json").write_text(json.dumps(report, indent=1))
        if record:
            model = load_checkpoint(model_path)
            model.metadata["metrics"] = recorded_metrics(report)
            save_checkpoint(model, model_path)
        reports.append(report)
    if len(reports) > 1:
        names = [model_name(path, r) for path, r in zip(model_paths, reports)]
        names = [n if names.count(n) == 1 else f"{n} #{i + 1}" for i, n in enumerate(names)]
        comparison = compare(reports, names, seed, [path.stem for path in model_paths])
        if out_dir is not None:
            (out_dir / "comparison.json").write_text(json.dumps(comparison, indent=1))
            (out_dir / "comparison.md").write_text(comparison_markdown(comparison) + "\n")
        if json_:
            print(json.dumps(comparison))
            return
        out.print(comparison_table(comparison))
        for line in comparison_lines(comparison):
            out.print(line)
        return
    if json_:
        print(json.dumps(reports[0]))
        return
    out.print(report_table(reports[0], split))
    for line in report_lines(reports[0]):
        out.print(line)


#: The top-level commands of this group, in the order `lungsys --help` lists them.
COMMANDS = [("evaluate", evaluate_command)]
GROUPS = [("train", train_app)]
