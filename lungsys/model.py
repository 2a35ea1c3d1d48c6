"""lungsys commands for models: checkpoints (init, info) and analysing a series on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from inference.choices import (DEFAULT_OBJECTS, HeatmapChoice, PatientMethod, ResultObject,
                               SegCompression)
from lungsys.common import CLIError, err, out, print_fields, progress


model_app = typer.Typer(help="Create and inspect model checkpoints (.safetensors with JSON "
                        "metadata; never pickle).", no_args_is_help=True)


@model_app.command("init")
def model_init_command(
    profile: Annotated[str, typer.Option(help="small (CPU, tests, demo) or paper (the paper's "
                                         "sizes, for GPUs); LA-DNN on VGG-16: vgg16-small, "
                                         "vgg16-paper.")] = "small",
    arch: Annotated[str, typer.Option(help="m3 (M3 Lung-Sys: ResNet-50, the shipped model's), "
                                      "hu2020 (Hu et al.: multi-scale CAMs), ladnn (LA-DNN: "
                                      "DenseNet-169 with a lesion-type head) or dualsampling "
                                      "(two 3D ResNet-34s over the volume); "
                                      "docs/models.md.")] = "m3",
    seed: Annotated[int, typer.Option(min=0, help="Seed of the random initialisation.")] = 0,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint file to write "
                                           "(.safetensors).")] = Path("model.safetensors"),
    backbone_weights: Annotated[Optional[Path], typer.Option(
        "--backbone-weights", help="A torchvision state dict of the architecture's backbone "
        "(ImageNet resnet50-*.pth, densenet169-*.pth, vgg16-*.pth) to start the slice "
        "network from.")]
    = None,
) -> None:
    """Write a randomly initialised model: the start of training, and a model for tests.

    It is NOT a diagnostic model: its outputs are meaningless until trained.
    """
    from inference.checkpoint import LungSysModel, load_backbone_weights, save_checkpoint
    from inference.profiles import profile_for

    model = LungSysModel.create(profile_for(arch, profile), seed)
    if backbone_weights is not None:
        load_backbone_weights(model, backbone_weights)
        model.metadata["provenance"]["backbone_weights"] = backbone_weights.name
    meta = save_checkpoint(model, out_path)
    out.print(f"wrote {out_path}: profile {model.profile.name}, version {meta['model_version']}, "
              f"{meta['parameters']:,} parameters (untrained)")


@model_app.command("info")
def model_info_command(
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
    out.print(str(checkpoint), markup=False, highlight=False)
    print_fields(meta)
    if verify:
        out.print("weights verified: hashes match")


def analyze_command(
    folder: Annotated[Path, typer.Argument(help="Folder (or one file) holding one CT series.")],
    model_path: Annotated[Optional[Path], typer.Option(
        "--model", "-m", help="Checkpoint to use; default: the shipped model.")]
    = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a "
                                        "summary.")] = False,
    series_uid: Annotated[Optional[str], typer.Option(help="Series Instance UID to analyse "
                                                      "when the folder holds several.")] = None,
    method: Annotated[PatientMethod, typer.Option(
        help="Patient-level method: network (the patient network) or nonparametric (the "
        "paper's Eq. 5).")] = PatientMethod.network,
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda, cuda:1 ...")]
    = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Slices per batch (each at three "
                                            "windows).")] = 16,
    out_dir: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Write the DICOM results here (SR-lungsys-report.dcm, "
        "SEG-lungsys-lesions.dcm, KO-lungsys-key-images.dcm, SC-lungsys-heatmap-sliceNNNN.dcm, "
        "...).")] = None,
    objects: Annotated[str, typer.Option(
        help="Result objects to write with --out, comma-separated: sr, seg, ko, sc, pm "
        "(Parametric Map), gsps (presentation state); the node's [results] objects.")]
    = ",".join(DEFAULT_OBJECTS),
    seg_compression: Annotated[SegCompression, typer.Option(
        help="SEG frames bit-packed (none) or JPEG 2000 Lossless; the node's [results] "
        "seg_compression.")] = SegCompression.none,
    heatmaps: Annotated[HeatmapChoice, typer.Option(
        help="Heatmaps for 'lesion' slices (flagged by the model), 'all' slices, or "
        "'none'.")] = HeatmapChoice.lesion,
) -> None:
    """Run the model on a CT series on disk and print the diagnosis.

    Prints the diagnosis, the four class probabilities, the infected fraction
    of the lung, and the slices with lesions and their boxes (rows and columns
    on the slice, end-exclusive), with the lesion types a lesion-typing model
    (LA-DNN) finds on them. With --out, also writes the results as
    DICOM in the source study: by default a Comprehensive SR (TID 1500), a
    lesion SEG, key images (KOS) and Secondary Capture heatmaps, as the node
    writes them.
    """
    from inference.checkpoint import default_model
    from inference.engine import Engine
    from inference.profiles import CLASSES
    from inference.series import MultipleSeriesError, load_series

    chosen = tuple(o.strip() for o in objects.split(",") if o.strip())
    if not chosen or any(o not in tuple(ResultObject) for o in chosen):
        raise typer.BadParameter(f"expected some of {', '.join(ResultObject)}, got {objects!r}",
                                 param_hint="--objects")
    try:                                    # the study first: nothing to load for a typo
        series = load_series(folder, series_uid=series_uid)
    except MultipleSeriesError as exc:
        raise CLIError(f"{exc}; choose one with --series-uid") from None
    engine = Engine(model_path or default_model(), device=device, batch_size=batch_size,
                    method=method)
    if engine.model_info.advice:
        err.print(f"lungsys: warning: {engine.model_info.advice}", markup=False,
                  highlight=False)
    elif engine.model.metadata.get("intended_use"):
        err.print(f"lungsys: note: {engine.model.metadata['intended_use']}", markup=False,
                  highlight=False)
    with progress() as bar:
        task = bar.add_task(f"analysing {len(series)} slices", total=len(series))
        result = engine.analyze(series, lambda done, total: bar.update(task, completed=done))
    files = None
    if out_dir is not None:
        from inference.export import write_results
        files = write_results(result, series, out_dir, heatmaps=heatmaps, objects=chosen,
                              seg_compression=seg_compression)
    if json_:
        report = result.to_json()
        if files is not None:
            report["files"] = {str(kind): [str(p) for p in paths] if kind == ResultObject.sc
                               else str(paths[0]) for kind, paths in files.files.items()}
        print(json.dumps(report))
        return
    out.print(f"diagnosis: {result.diagnosis} ({result.method}; model {result.model.version}"
              f" ({result.model.architecture}), {result.model.device})")
    for name, p in zip(CLASSES, result.probabilities):
        out.print(f"  {name:<9} {p:6.3f}")
    if result.low_confidence:
        out.print(f"low confidence: no class is more likely than the others together "
                  f"(highest probability {max(result.probabilities):.3f})")
    out.print(f"infected fraction of the lung: {100 * result.infected_fraction:.2f}%")
    lesion = result.lesion_slices
    out.print(f"slices with lesions: {len(lesion)} of {len(result.slices)}")
    for s in lesion:
        boxes = ", ".join(f"[{b.row0}:{b.row1}, {b.col0}:{b.col1}]" for b in s.boxes) or "-"
        types = f" ({', '.join(t.replace('_', ' ') for t in s.shown_types)})" \
            if s.shown_types else ""
        out.print(f"  {s.label}: p={s.lesion_probability:.3f} {s.sop_instance_uid} {boxes}"
                  f"{types}", markup=False, highlight=False)
    if series.skipped:
        out.print(f"{len(series.skipped)} files skipped (lungsys scan lists them)")
    if files is not None:
        out.print(f"wrote {files.summary()} to {out_dir}", markup=False, highlight=False)


COMMANDS = [("analyze", analyze_command)]
GROUPS = [("model", model_app)]
