"""lungsys commands for data: phantom studies and sets, scanning folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from lungsys.common import CLIError, err, out, progress


def phantom_command(
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
    with progress() as bar:
        task = bar.add_task(f"rendering {label} seed {seed}", total=slices)
        hu, lung, lesion, types, type_map = ph.render(lambda: bar.advance(task))
    study = write_study(ph, out_dir, hu, lung, lesion, types, type_map)
    t = study.truth
    lesion_slices = sum(s["has_lesion"] for s in t["slices"])
    out.print(f"wrote {len(study.files)} CT slices to {out_dir} ({t['label']}, seed {seed}, "
              f"{t['slice_thickness_mm']} mm, {lesion_slices} slices with lesions, "
              f"infected fraction {100 * t['infected_fraction']:.2f}%)")


def phantom_set_command(
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
    from training.phantom_set import (check_slices_range, generate_phantom_set,
                                      refuse_a_dataset, split_sizes)

    try:
        check_slices_range(*slices_range)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--slices-range") from None
    refuse_a_dataset(out_dir)                 # before any warning
    sizes = split_sizes(per_class)
    if not all(sizes.values()):
        err.print(f"lungsys: warning: with {per_class} studies per class the splits hold "
                  + ", ".join(f"{name} {n}" for name, n in sizes.items())
                  + " per class; the empty ones cannot be trained on or evaluated "
                    "(--per-class 5 or more fills every split)", markup=False,
                  highlight=False)
    with progress() as bar:
        task = bar.add_task("generating phantom studies", total=4 * per_class)
        manifest = generate_phantom_set(out_dir, per_class, seed, tuple(slices_range), workers,
                                        lambda: bar.advance(task))
    out.print(f"wrote {4 * per_class} studies and {manifest}")


def dataset_command(
    labels: Annotated[Path, typer.Option(help="CSV of the studies, one row each: study (its "
                                         "folder), label, and optionally split and "
                                         "lesion_slices (Instance Numbers: '31-38 52') or "
                                         "segmentation (a DICOM SEG of the lesions).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for manifest.csv and "
                                          "the annotations (the studies stay where they "
                                          "are).")],
    seed: Annotated[int, typer.Option(min=0, help="Seed of the splits drawn when the labels "
                                      "give none.")] = 0,
) -> None:
    """Make a dataset of one's own studies: manifest.csv and each study's slice
    annotations, from a labels file.

    Each study folder must hold one CT series; it is read as the node reads it.
    Splits are the labels' own, or drawn 60/20/20 by patient (Patient ID) within
    each class. Every row that cannot be used is named, and nothing is written.
    The slices a radiologist found lesions on are given by Instance Number, as a
    viewer shows them, or outlined in a DICOM SEG (then the lesion masks and, where
    its segments are typed, the lesion types come too); 'lungsys train slice' uses
    the diseased studies that have them, 'train patient' and 'evaluate' every study.
    """
    from training.own_studies import LabelsError, make_dataset

    try:
        with progress() as bar:
            task = bar.add_task("reading studies", total=None)
            made = make_dataset(labels, out_dir, seed, lambda done, total: bar.update(
                task, completed=done, total=total))
    except LabelsError as exc:                  # every row it cannot use, a line each
        for problem in exc.problems:
            err.print(f"lungsys: error: {problem}", markup=False, highlight=False)
        raise typer.Exit(1) from None
    table = Table(title=f"{made['studies']} studies")
    for col in ("Split", *next(iter(made["splits"].values()))):
        table.add_column(col)
    for split, counts in made["splits"].items():
        table.add_row(split, *map(str, counts.values()))
    out.print(table)
    for warning in made["warnings"]:
        err.print(f"lungsys: warning: {warning}", markup=False, highlight=False)
    out.print(f"wrote {made['manifest']}")


def scan_command(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (searched "
                                                "recursively).")],
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """List the CT series found in files or folders, and every file skipped, with why.

    This is how the node and 'lungsys analyze' read a folder: by Series
    Instance UID, CT images only, localizers and other modalities left out.
    """
    from inference.series import scan

    groups, skipped = scan(paths)
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


#: The top-level commands of this group, in the order `lungsys --help` lists them.
COMMANDS = [("phantom", phantom_command), ("phantom-set", phantom_set_command),
            ("dataset", dataset_command), ("scan", scan_command)]
GROUPS: list = []
