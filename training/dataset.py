"""Datasets: a folder of studies and a manifest CSV that labels and splits them.

``manifest.csv`` (UTF-8, one header line), one row per study (patient):

========== =========================================================== ========
column     meaning                                                      required
========== =========================================================== ========
study      folder of the study's DICOM series, relative to the manifest yes
label      healthy, covid, h1n1 or cap (or Healthy, COVID-19, H1N1,     yes
           CAP)
split      train, val or test (by patient: a patient is in one split)   yes
annotations JSON file with per-slice annotations: {"slices": [{         no
           "sop_instance_uid", "has_lesion", "lesion_types"}, ...]}
           (the phantom's truth.json has this form)
masks      NPZ with a boolean ``lesion`` array (slices, rows, columns)  no
           in the order of the annotations' slices (the phantom's
           masks.npz)
========== =========================================================== ========

Errors name the line and what is wrong (:class:`ManifestError`).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference.profiles import CLASSES

SPLITS = ("train", "val", "test")
LABEL_ALIASES = {"healthy": 0, "covid": 1, "covid-19": 1, "h1n1": 2, "cap": 3}
REQUIRED = ("study", "label", "split")
OPTIONAL = ("annotations", "masks")


class ManifestError(ValueError):
    """A manifest that cannot be used, with the line and the reason."""


@dataclass(frozen=True)
class StudyEntry:
    """One study (patient) of a dataset's manifest."""

    path: Path                 # the study's folder
    label: int                 # class index
    split: str
    annotations: Path | None
    masks: Path | None
    line: int

    @property
    def class_name(self) -> str:
        return CLASSES[self.label]

    def slice_annotations(self) -> dict[str, dict]:
        """Per-slice annotations by SOP Instance UID (empty without a file)."""
        if self.annotations is None:
            return {}
        data = json.loads(self.annotations.read_text())
        return {s["sop_instance_uid"]: s for s in data.get("slices", [])}

    @property
    def is_phantom(self) -> bool:
        """Whether the annotations are the lungsys phantom's truth (a synthetic study)."""
        if self.annotations is None:
            return False
        with open(self.annotations, encoding="utf-8") as f:
            head = f.read(200)
        return '"format": "lungsys-phantom-truth/' in head

    def lesion_masks(self) -> tuple[list[str], np.ndarray] | None:
        """(SOP Instance UIDs, lesion masks) in the annotations' slice order, or None."""
        if self.masks is None or self.annotations is None:
            return None
        uids = [s["sop_instance_uid"] for s in json.loads(self.annotations.read_text())["slices"]]
        with np.load(self.masks) as npz:
            return uids, npz["lesion"]


def parse_label(text: str) -> int:
    key = text.strip().lower()
    if key in LABEL_ALIASES:
        return LABEL_ALIASES[key]
    for i, name in enumerate(CLASSES):
        if key == name.lower():
            return i
    raise ValueError(f"unknown label {text!r} (expected healthy, covid, h1n1 or cap)")


def read_manifest(path: str | Path, split: str | None = None) -> list[StudyEntry]:
    """Parse and check a manifest; with ``split``, only that split's studies ("all" or None:
    every study)."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: no such folder or file")
    if path.is_dir():
        path = path / "manifest.csv"
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest (expected a manifest.csv)")
    if split == "all":
        split = None
    if split is not None and split not in SPLITS:
        raise ManifestError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)} "
                            f"or all")
    root = path.parent
    entries: list[StudyEntry] = []
    seen: dict[Path, int] = {}
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED if c not in columns]
        if missing:
            raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}; "
                                f"need {', '.join(REQUIRED)}")
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            where = f"{path.name} line {line}"
            if not row.get("study"):
                raise ManifestError(f"{where}: empty study path")
            study = (root / row["study"]).resolve()
            if not study.is_dir():
                raise ManifestError(f"{where}: study folder {row['study']!r} does not exist")
            if study in seen:
                raise ManifestError(f"{where}: study {row['study']!r} already on line "
                                    f"{seen[study]}")
            seen[study] = line
            try:
                label = parse_label(row["label"])
            except ValueError as exc:
                raise ManifestError(f"{where}: {exc}") from None
            if row["split"] not in SPLITS:
                raise ManifestError(f"{where}: unknown split {row['split']!r} (expected "
                                    f"{', '.join(SPLITS)})")
            optional = {}
            for col in OPTIONAL:
                if row.get(col):
                    p = (root / row[col]).resolve()
                    if not p.is_file():
                        raise ManifestError(f"{where}: {col} file {row[col]!r} does not exist")
                    optional[col] = p
                else:
                    optional[col] = None
            if optional["masks"] is not None and optional["annotations"] is None:
                raise ManifestError(f"{where}: masks need annotations (they give the slice "
                                    f"order)")
            entries.append(StudyEntry(study, label, row["split"], optional["annotations"],
                                      optional["masks"], line))
    if not entries:
        raise ManifestError(f"{path}: no studies")
    return [e for e in entries if split is None or e.split == split]


def studies_to_evaluate(path: str | Path, split: str) -> list[StudyEntry]:
    """The studies an evaluation of ``split`` ("all": every one) reads; ManifestError when
    there are none (``lungsys evaluate`` says so before it loads a model)."""
    entries = read_manifest(path, split)
    if not entries:
        raise ManifestError(f"no {split} studies in the manifest (a phantom set of fewer "
                            f"than 5 studies per class leaves a split empty; --split all "
                            f"evaluates every study)")
    return entries


def intended_use(entries: list[StudyEntry]) -> str:
    """What a model trained on these studies may be used for, in one sentence."""
    if entries and all(e.is_phantom for e in entries):
        return ("Trained only on synthetic lungsys phantom studies: a demonstration model, "
                "not a clinical model; not for diagnosis.")
    return ("Trained on user data; validate it on local studies before any use; "
            "not for primary diagnosis.")


def write_manifest(path: str | Path, rows: list[dict]) -> None:
    """Write a manifest from dicts with the manifest's columns."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[*REQUIRED, *OPTIONAL])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in (*REQUIRED, *OPTIONAL)})
