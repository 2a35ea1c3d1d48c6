"""A dataset made from one's own studies: a labels file in, a manifest and annotations out.

Training needs a manifest (:mod:`training.dataset`) and, for the slice network, each
diseased study's per-slice lesion flags keyed by SOP Instance UID: no one writes those by
hand. A data scientist has CT studies in folders, each patient's class, and, from a
radiologist, the slices that show a lesion, read off a viewer as Instance Numbers. The
labels file says that much, one row per study (a CSV, UTF-8, one header line):

=============== ============================================================ ========
column          meaning                                                       required
=============== ============================================================ ========
study           the study's folder (one CT series), relative to the labels    yes
                file or absolute
label           healthy, covid, h1n1 or cap (or Healthy, COVID-19, H1N1, CAP) yes
split           train, val or test; left out or empty on every row: drawn     no
                60/20/20 by patient within each class
lesion_slices   the Instance Numbers of the slices showing a lesion: "31-38   no
                52" (a diseased study without them is not used by `train
                slice`; a healthy study has none)
=============== ============================================================ ========

Each study is read as the node and training read it (one CT series, its slices in
order); its annotations (every slice's SOP Instance UID, Instance Number and lesion
flag) go to ``OUT/annotations/NNNN.json``, and the manifest names the study folders
where they are.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np

from inference.profiles import CLASSES
from inference.series import load_series
from training.dataset import LABEL_ALIASES, SPLITS, parse_label, write_manifest
from training.phantom_set import refuse_a_dataset, split_of

FORMAT = "lungsys-annotations/1"
#: The manifest's label for each class (LABEL_ALIASES' short names).
LABEL_NAMES = {index: name for name, index in LABEL_ALIASES.items() if "-" not in name}


class LabelsError(ValueError):
    """A labels file or study that cannot make a dataset, with the line and the reason."""


def parse_slices(text: str) -> set[int]:
    """Instance Numbers as a radiologist writes them: "31-38 52" or "31-38, 52"."""
    found: set[int] = set()
    for part in re.split(r"[\s,;]+", text.strip()):
        if not part:
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            raise ValueError(f"{part!r} is not an Instance Number or a range (31-38)")
        lo, hi = int(match[1]), int(match[2] or match[1])
        if hi < lo:
            raise ValueError(f"{part!r}: the range runs backwards")
        found.update(range(lo, hi + 1))
    return found


def read_labels(path: Path) -> list[dict]:
    """The labels file's rows, checked: study folder, class index, split, lesion slices."""
    if not path.is_file():
        raise LabelsError(f"{path}: no such labels file")
    rows, seen = [], {}
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if "study" not in columns or "label" not in columns:
            raise LabelsError(f"{path}: need the columns study and label (and optionally "
                              f"split, lesion_slices)")
        for line, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
            where = f"{path.name} line {line}"
            study = (path.parent / row.get("study", "")).resolve()
            if not row.get("study") or not study.is_dir():
                raise LabelsError(f"{where}: study folder {row.get('study', '')!r} does not "
                                  f"exist")
            if study in seen:
                raise LabelsError(f"{where}: study {row['study']!r} already on line "
                                  f"{seen[study]}")
            seen[study] = line
            try:
                label = parse_label(row.get("label", ""))
                lesions = parse_slices(row.get("lesion_slices", ""))
            except ValueError as exc:
                raise LabelsError(f"{where}: {exc}") from None
            if label == 0 and lesions:
                raise LabelsError(f"{where}: a healthy study has no lesion slices")
            split = row.get("split", "")
            if split and split not in SPLITS:
                raise LabelsError(f"{where}: unknown split {split!r} (expected "
                                  f"{', '.join(SPLITS)})")
            rows.append({"study": study, "label": label, "split": split, "lesions": lesions,
                         "line": line, "given": row["study"]})
    if not rows:
        raise LabelsError(f"{path}: no studies")
    given = [bool(r["split"]) for r in rows]
    if any(given) and not all(given):
        raise LabelsError(f"{path}: give a split on every row, or on none (then they are "
                          f"drawn 60/20/20 by patient within each class)")
    return rows


def draw_splits(rows: list[dict], seed: int) -> None:
    """Train, val and test, 60/20/20 within each class, in an order drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    for label in range(len(CLASSES)):
        members = [r for r in rows if r["label"] == label]
        for position, index in enumerate(rng.permutation(len(members))):
            members[int(index)]["split"] = split_of(position, len(members))


def annotate(row: dict, name: str) -> dict:
    """The study's annotations: every slice in order, flagged where the labels say."""
    where = f"line {row['line']} ({row['given']})"
    try:
        series = load_series(row["study"])
    except ValueError as exc:                           # SeriesError: one line
        raise LabelsError(f"{where}: {exc}") from None
    if any(s.frame is not None for s in series.slices):
        raise LabelsError(f"{where}: a multi-frame CT; slice annotations need an image per "
                          f"slice")
    numbers = [s.instance_number for s in series.slices]
    if row["lesions"] and (None in numbers or len(set(numbers)) < len(numbers)):
        raise LabelsError(f"{where}: its slices' Instance Numbers are missing or repeated: "
                          f"lesion slices cannot be named by them")
    unknown = sorted(row["lesions"] - set(numbers))
    if unknown:
        raise LabelsError(f"{where}: no slice with Instance Number "
                          f"{', '.join(map(str, unknown[:5]))}"
                          f"{' ...' if len(unknown) > 5 else ''} (its slices are numbered "
                          f"{min(numbers)} to {max(numbers)})")
    return {"format": FORMAT, "study": name, "label": CLASSES[row["label"]],
            "slices": [{"sop_instance_uid": s.sop_instance_uid,
                        "instance_number": s.instance_number,
                        "has_lesion": s.instance_number in row["lesions"]}
                       for s in series.slices]}


def make_dataset(labels: str | Path, out: str | Path, seed: int = 0,
                 progress: Callable[[int, int], None] | None = None) -> dict:
    """Write ``out/manifest.csv`` and the studies' annotations from a labels file (``out``
    holds no dataset yet). Returns what a user is told: the studies per split and class,
    and how many diseased studies have no lesion slices. ``progress(done, total)`` is told
    after each study is read."""
    rows = read_labels(Path(labels))
    out = Path(out)
    refuse_a_dataset(out)
    if not rows[0]["split"]:
        draw_splits(rows, seed)
    written = []
    for number, row in enumerate(rows, start=1):
        name = f"annotations/{number:04d}.json"
        entry = {"study": os.path.relpath(row["study"], out.resolve()),
                 "label": LABEL_NAMES[row["label"]], "split": row["split"]}
        notes = annotate(row, entry["study"])          # every study must load
        if row["label"] == 0 or row["lesions"]:          # else its lesion slices are unknown
            written.append((out / name, notes))
            entry["annotations"] = name
        row["entry"] = entry
        if progress is not None:
            progress(number, len(rows))
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for path, notes in written:
        path.write_text(json.dumps(notes, indent=1))
    write_manifest(out / "manifest.csv", [r["entry"] for r in rows])
    counts = {split: {name: sum(r["split"] == split and r["label"] == k for r in rows)
                      for k, name in enumerate(CLASSES)} for split in SPLITS}
    return {"manifest": str(out / "manifest.csv"), "studies": len(rows), "splits": counts,
            "diseased_without_lesion_slices": sum(r["label"] != 0 and not r["lesions"]
                                                  for r in rows)}
