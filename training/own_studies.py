"""A dataset made from one's own studies: a labels file in, a manifest and annotations out.

Training needs a manifest (:mod:`training.dataset`) and, for the slice network, each
diseased study's per-slice lesion flags keyed by SOP Instance UID: no one writes those by
hand. A data scientist has CT studies in folders, each patient's class, and, from a
radiologist, the slices that show a lesion, read off a viewer as Instance Numbers. The
labels file says that much, one row per study (a CSV in UTF-8, as Excel's "CSV UTF-8"
saves it, commas or semicolons; column names in any case):

=============== ============================================================ ========
column          meaning                                                       required
=============== ============================================================ ========
study           the study's folder (one CT series), relative to the labels    yes
                file or absolute
label           healthy, covid, h1n1 or cap (or Healthy, COVID-19, H1N1, CAP) yes
split           train, val or test; left out or empty on every row: drawn     no
                60/20/20 by patient (Patient ID) within each class
lesion_slices   the Instance Numbers of the slices showing a lesion: "31-38   no
                52" (quoted when it holds commas; a diseased study without
                them is not used by `train slice`; a healthy study has none)
segmentation    instead of lesion_slices: the reader's lesion outlines, a      no
                DICOM SEG file on the study's slices (relative to the labels
                file or absolute; :mod:`training.lesion_seg`)
=============== ============================================================ ========

Each study is read as the node and training read it (one CT series, its slices in
order); its annotations (every slice's SOP Instance UID, Instance Number and lesion
flag) go to ``OUT/annotations/NNNN.json``, and the manifest names the study folders
where they are. From a segmentation come each slice's lesion types too (where its segments
are typed), the infected fraction, and the lesion masks (``OUT/masks/NNNN.npz``), so that
`lungsys evaluate` measures the maps on one's own studies. Every row that cannot be used
is named at once, and nothing is written then. Messages name rows by their line and study
folder as given, never by a Patient ID.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np

from inference.errors import SeriesError
from inference.profiles import CLASSES
from inference.preprocess import lung_masks
from inference.series import load_series
from training.dataset import LABEL_ALIASES, SPLITS, parse_label, write_manifest
from training.lesion_seg import SegmentationError, lesion_masks, read_truth
from training.phantom_set import refuse_a_dataset, split_of

FORMAT = "lungsys-annotations/1"
#: The manifest's label for each class (LABEL_ALIASES' short names).
LABEL_NAMES = {index: name for name, index in LABEL_ALIASES.items() if "-" not in name}
COLUMNS = ("study", "label", "split", "lesion_slices", "segmentation")
_RANGE = re.compile(r"([0-9]{1,9})(?:-([0-9]{1,9}))?")


class LabelsError(ValueError):
    """Rows of a labels file (or its studies) that cannot make a dataset: one line each,
    naming the row."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def parse_slices(text: str) -> list[tuple[int, int]]:
    """Instance Numbers as a radiologist writes them ("31-38 52", "31 – 38, 52") as
    ranges, first to last."""
    ranges = []
    for part in re.split(r"[\s,;]+", re.sub(r"\s*[-\u2013\u2014]\s*", "-", text.strip())):
        if not part:
            continue
        match = _RANGE.fullmatch(part)
        if match is None:
            raise ValueError(f"{part[:20]!r} is not an Instance Number or a range (31-38)")
        lo, hi = int(match[1]), int(match[2] or match[1])
        if hi < lo:
            raise ValueError(f"{part!r}: the range runs backwards")
        ranges.append((lo, hi))
    return ranges


def _records(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The labels file's columns (lower case) and its non-empty rows with their lines."""
    if path.is_dir():
        raise LabelsError([f"{path}: a folder, not a labels file (a .csv)"])
    if not path.is_file():
        raise LabelsError([f"{path}: no such labels file"])
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise LabelsError([f"{path}: not UTF-8 text; save it as CSV UTF-8"]) from None
    first = text.split("\n", 1)[0]
    reader = csv.reader(io.StringIO(text),
                        delimiter=";" if first.count(";") > first.count(",") else ",")
    records = []
    try:
        header = next(reader, [])
        for fields in reader:
            if any(f.strip() for f in fields):            # not an empty row (Excel's ",,")
                records.append((reader.line_num, fields))
    except csv.Error as exc:
        raise LabelsError([f"{path.name} line {reader.line_num}: {exc}"]) from None
    columns = [c.strip().lower() for c in header]
    if "study" not in columns or "label" not in columns:
        raise LabelsError([f"{path}: need the columns study and label (and optionally split, "
                           f"lesion_slices or segmentation); found "
                           f"{', '.join(map(repr, header)) or 'none'}"])
    return columns, records


def read_labels(path: Path) -> list[dict]:
    """The labels file's rows, checked: study folder, class index, split, lesion slices.
    LabelsError names every row that cannot be used."""
    columns, records = _records(path)
    rows, problems, seen = [], [], {}
    for line, fields in records:
        where = f"{path.name} line {line}"
        row = {c: f.strip() for c, f in zip(columns, fields) if c in COLUMNS}
        if any(f.strip() for f in fields[len(columns):]):
            problems.append(f"{where}: more fields than the header has columns (quote a "
                            f"lesion_slices that holds commas: \"31-38, 52\")")
            continue
        given = row.get("study", "")
        folder = Path(os.path.abspath(path.parent / Path(given).expanduser()))
        try:
            label = parse_label(row.get("label", ""))
            lesions = parse_slices(row.get("lesion_slices", ""))
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        split = row.get("split", "").lower()
        outlines = row.get("segmentation", "")
        seg = Path(os.path.abspath(path.parent / Path(outlines).expanduser())) \
            if outlines else None
        if not given or not folder.exists():
            problems.append(f"{where}: study folder {given!r} does not exist")
        elif not folder.is_dir():
            problems.append(f"{where}: {given!r} is a file, not a study folder")
        elif folder.resolve() in seen:
            problems.append(f"{where}: study {given!r} already on line "
                            f"{seen[folder.resolve()]}")
        elif label == 0 and (lesions or seg):
            problems.append(f"{where}: a healthy study has no lesion "
                            + ("slices" if lesions else "segmentation"))
        elif lesions and seg:
            problems.append(f"{where}: give lesion_slices or a segmentation, not both")
        elif seg and not seg.is_file():
            problems.append(f"{where}: segmentation file {outlines!r} does not exist")
        elif split and split not in SPLITS:
            problems.append(f"{where}: unknown split {split!r} (expected "
                            f"{', '.join(SPLITS)})")
        else:
            seen[folder.resolve()] = line
            rows.append({"study": folder, "label": label, "split": split, "lesions": lesions,
                         "seg": seg, "line": line, "given": given})
    if problems:
        raise LabelsError(problems)
    if not rows:
        raise LabelsError([f"{path}: no studies"])
    blank = [r["line"] for r in rows if not r["split"]]
    if blank and len(blank) < len(rows):
        raise LabelsError([f"{path.name}: give a split on every row, or on none (then they "
                           f"are drawn); none on line(s) {_lines(blank)}"])
    return rows


def _lines(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers[:10])) + (" ..." if len(numbers) > 10 else "")


def annotate(row: dict, name: str) -> dict:
    """Read the study as the node does; its annotations (every slice in order, flagged
    where the labels say), Patient ID and Series Instance UID. LabelsError if it cannot."""
    where = f"line {row['line']} ({row['given']})"
    try:
        series = load_series(row["study"])
    except (SeriesError, OSError) as exc:
        raise LabelsError([f"{where}: {exc}"]) from None
    if any(s.frame is not None for s in series.slices):
        raise LabelsError([f"{where}: a multi-frame CT; slice annotations need an image per "
                           f"slice"])
    numbers = [s.instance_number for s in series.slices]
    if row["lesions"] and (None in numbers or len(set(numbers)) < len(numbers)):
        raise LabelsError([f"{where}: its slices' Instance Numbers are missing or repeated: "
                           f"lesion slices cannot be named by them"])
    if row["lesions"]:
        lo, hi = min(numbers), max(numbers)
        missing = [f"{a}-{b}" if a != b else str(a) for a, b in row["lesions"]
                   if a < lo or b > hi or not any(a <= n <= b for n in numbers)]
        if missing:
            raise LabelsError([f"{where}: no slice with Instance Number "
                               f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                               f"(its slices are numbered {lo} to {hi})"])
    note = {"format": FORMAT, "study": name, "label": CLASSES[row["label"]],
            "patient": str(series.header.get("PatientID", "") or ""),
            "series_instance_uid": series.series_instance_uid,
            "slices": [{"sop_instance_uid": s.sop_instance_uid,
                        "instance_number": s.instance_number,
                        "has_lesion": any(a <= s.instance_number <= b
                                          for a, b in row["lesions"])}
                       for s in series.slices]}
    if row["seg"] is not None:
        row["left_out"] = _outlined(note, row["seg"], series, where)
        row["size"] = tuple(series.hu.shape[1:])     # (its masks are written from it later)
    return note


def _outlined(note: dict, seg: Path, series, where: str) -> list[str]:
    """The slices' lesion flags and types, and the infected fraction, from the study's
    segmentation; returns the labels of the segments it left out (not lesions)."""
    try:
        truth = read_truth(seg, series.sop_instance_uids, lung_masks(np.asarray(series.hu)))
    except SegmentationError as exc:
        raise LabelsError([f"{where}: {exc}"]) from None
    if not any(truth.has_lesion):
        raise LabelsError([f"{where}: its segmentation {seg.name} outlines no lesion (a "
                           f"fractional segment's pixels count from 0.5)"])
    for i, s in enumerate(note["slices"]):
        s["has_lesion"] = truth.has_lesion[i]
        s["lesion_fraction"] = truth.lesion_fraction[i]
        if truth.lesion_types is not None and truth.lesion_types[i] is not None:
            s["lesion_types"] = truth.lesion_types[i]
    note["infected_fraction"] = truth.infected_fraction
    return truth.left_out


def _annotated(row: dict) -> bool:
    """Whether a row says which slices show a lesion (a healthy study's show none)."""
    return row["label"] == 0 or bool(row["lesions"]) or row["seg"] is not None


def check_out(out: Path, rows: list[dict]) -> None:
    """LabelsError (or ValueError) unless ``out`` can take a new dataset: a folder that
    holds no dataset or annotations yet, and lies in none of the studies."""
    if out.exists() and not out.is_dir():
        raise LabelsError([f"{out}: a file, not a folder for the dataset"])
    refuse_a_dataset(out)
    if (out / "annotations").exists():
        raise LabelsError([f"{out} holds annotations/ already: choose another folder"])
    here = Path(os.path.abspath(out)).resolve()
    inside = [r["line"] for r in rows if here == r["study"].resolve()
              or r["study"].resolve() in here.parents]
    if inside:
        raise LabelsError([f"{out} lies in the study folder of line(s) {_lines(inside)}: "
                           f"choose a folder outside the studies"])


def draw_splits(rows: list[dict], seed: int) -> None:
    """Train, val and test, 60/20/20 within each class, by patient (a patient's studies
    in one split), in an order drawn from ``seed``."""
    patients: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        patients[r["patient"] or f"line {r['line']}"].append(r)
    rng = np.random.default_rng(seed)
    for label in range(len(CLASSES)):
        groups = [g for g in patients.values() if g[0]["label"] == label]
        for position, index in enumerate(rng.permutation(len(groups))):
            for r in groups[int(index)]:
                r["split"] = split_of(position, len(groups))


def make_dataset(labels: str | Path, out: str | Path, seed: int = 0,
                 progress: Callable[[int, int], None] | None = None) -> dict:
    """Write ``out/manifest.csv`` and the studies' annotations from a labels file. Returns
    what a user is told: the studies per split and class, and warnings.
    ``progress(done, total)`` is told after each study is read."""
    rows = read_labels(Path(labels))
    out = Path(out)
    check_out(out, rows)
    problems, notes = [], []
    # paths between the folders as they are on disk: the manifest's reader resolves
    # symbolic links before "..", so a dataset folder under a link still finds its studies
    home = Path(os.path.abspath(out)).resolve()
    for number, row in enumerate(rows, start=1):
        name = os.path.relpath(row["study"].resolve(), home)
        try:
            notes.append(annotate(row, name))
        except LabelsError as exc:
            problems.extend(exc.problems)
            notes.append(None)
        if progress is not None:
            progress(number, len(rows))
    first: dict[str, int] = {}
    left_out: list[str] = []
    for row, note in zip(rows, notes):
        if note is not None:
            row["patient"] = note.pop("patient")
            if row.get("left_out"):
                left_out.append(f"line {row['line']} ({row['given']}): segment(s) "
                                f"{', '.join(map(repr, row['left_out']))[:120]} not a "
                                f"lesion, left out")
            uid = note["series_instance_uid"]
            if uid in first:
                problems.append(f"line {row['line']} ({row['given']}): the same series as "
                                f"line {first[uid]}")
            first.setdefault(uid, row["line"])
    if problems:
        raise LabelsError(problems)
    warnings = _splits(rows, seed) + left_out
    entries = []
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for number, (row, note) in enumerate(zip(rows, notes), start=1):
        entry = {"study": note["study"], "label": LABEL_NAMES[row["label"]],
                 "split": row["split"]}
        if _annotated(row):                              # else its lesion slices are unknown
            entry["annotations"] = f"annotations/{number:04d}.json"
            (out / entry["annotations"]).write_text(json.dumps(note, indent=1))
        if row["seg"] is not None:                       # read again: one study's at a time
            entry["masks"] = f"masks/{number:04d}.npz"
            (out / "masks").mkdir(exist_ok=True)
            slices = [s["sop_instance_uid"] for s in note["slices"]]
            np.savez_compressed(out / entry["masks"],
                                lesion=lesion_masks(row["seg"], slices, row["size"]))
        entries.append(entry)
    write_manifest(out / "manifest.csv", entries)
    counts = {split: {name: sum(r["split"] == split and r["label"] == k for r in rows)
                      for k, name in enumerate(CLASSES)} for split in SPLITS}
    unlabelled = [r["line"] for r in rows if not _annotated(r)]
    if unlabelled:
        warnings.append(f"{len(unlabelled)} diseased {_studies(len(unlabelled))} without "
                        f"lesion_slices or segmentation (line(s) {_lines(unlabelled)}): "
                        f"'lungsys train slice' leaves them out")
        for split in ("train", "val"):
            if not any(r["split"] == split and r["label"] != 0 and _annotated(r)
                       for r in rows):
                warnings.append(f"the {split} split has no diseased study with lesion_slices "
                                f"or a segmentation: 'lungsys train slice' "
                                + ("cannot learn lesions" if split == "train" else
                                   "has no validation accuracy to choose its epochs by"))
    for split, by_class in counts.items():
        lacking = [name for name, n in by_class.items() if not n]
        if len(lacking) == len(CLASSES):
            warnings.append(f"the {split} split is empty: it cannot be trained on or "
                            f"evaluated")
        elif lacking:
            warnings.append(f"the {split} split has no {', '.join(lacking)} study")
    return {"manifest": str(out / "manifest.csv"), "studies": len(rows), "splits": counts,
            "warnings": warnings}


def _one_id(rows: list[dict]) -> list[str]:
    """A warning when one Patient ID holds most of the studies (an anonymiser's constant):
    drawn as one patient, they all went to one split."""
    ids: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        if r["patient"]:
            ids[r["patient"]].append(r["line"])
    return [f"{len(lines)} of {len(rows)} studies have one Patient ID (line(s) "
            f"{_lines(lines)}) and were drawn into one split as one patient; if an "
            f"anonymiser gave them that ID, give each study's split in the labels file"
            for lines in ids.values() if len(lines) > 2 and 2 * len(lines) > len(rows)]


def _studies(n: int) -> str:
    return "study" if n == 1 else "studies"


def _splits(rows: list[dict], seed: int) -> list[str]:
    """Draw the splits when the labels give none; warn of a patient the given splits put
    in two (their studies would be trained on and tested)."""
    if not rows[0]["split"]:
        draw_splits(rows, seed)
        return _one_id(rows)
    splits: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["patient"]:
            splits[r["patient"]][r["split"]].append(r["line"])
    return [f"lines {_lines(sorted(n for lines in by.values() for n in lines))} are one "
            f"patient in the {' and '.join(sorted(by))} splits: a model tested on a patient "
            f"it was trained on" for by in splits.values() if len(by) > 1]
