"""Own studies with the reader's lesion outlines (`lungsys dataset`'s ``segmentation``
column): a DICOM SEG drawn on the study's slices gives each slice's lesion flag, its
lesion types where the segments are typed, the infected fraction and the lesion masks, so
that `lungsys evaluate` measures the maps on one's own studies as on the phantom; a
segmentation that cannot be a study's truth is named by its row, and nothing is written."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from inference.checkpoint import LungSysModel, save_checkpoint
from inference.profiles import CLASSES
from inference.sr import LESION_TYPE_CODES
from training.dataset import read_manifest, write_manifest
from training.evaluate import evaluate
from training.own_studies import LabelsError, make_dataset
from training.phantom.lesions import TYPE_BITS


def _segment(number: int, label: str, category, kind) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=label, segmented_property_category=category,
        segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)


def reader_seg(study: Path, out: Path, typed: bool = True, lung: bool = False,
               lesion: bool = True, untyped_on: int | None = None, ohif: bool = False) -> Path:
    """The SEG a reader would draw on a phantom study: its lesion mask, one segment per
    lesion type (``typed``) or one "Lesion" segment, and on request a lung segment, an
    untyped lesion segment on the lesion of slice ``untyped_on`` besides the typed ones,
    and what OHIF's writer leaves out or codes the old way (``ohif``: no Spatial Locations
    Preserved, the category coded in SNOMED-RT)."""
    truth = json.loads((study / "truth.json").read_text())
    masks = np.load(study / "masks.npz")
    by_uid = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, study.glob("*.dcm"))}
    sources = [by_uid[s["sop_instance_uid"]] for s in truth["slices"]]
    planes, descriptions = [], []
    if lesion and typed:
        for name, bit in TYPE_BITS.items():
            plane = masks["lesion"] & (masks["types"] & bit > 0)
            if plane.any():
                planes.append(plane)
                descriptions.append(_segment(len(planes), name.replace("_", " "),
                                             codes.SCT.MorphologicallyAbnormalStructure,
                                             LESION_TYPE_CODES[name]))
    elif lesion:
        planes.append(masks["lesion"])
        descriptions.append(_segment(1, "opacity", codes.SCT.MorphologicallyAbnormalStructure,
                                     codes.SCT.Mass))             # a lesion by its category
    if untyped_on is not None:
        plane = np.zeros_like(masks["lesion"])
        plane[untyped_on] = masks["lesion"][untyped_on]
        planes.append(plane)
        descriptions.append(_segment(len(planes), "lesion", codes.SCT.Tissue,
                                     codes.SCT.Tissue))          # by its label alone
    if lung:
        planes.append(masks["lung"])
        descriptions.append(_segment(len(planes), "lungs", codes.SCT.Organ, codes.SCT.Lung))
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=np.stack(planes, axis=-1).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=300,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="a reader's viewer",
        manufacturer_model_name="viewer", software_versions="1", device_serial_number="1")
    if ohif:
        for frame in seg.PerFrameFunctionalGroupsSequence:
            source = frame.DerivationImageSequence[0].SourceImageSequence[0]
            source.pop("SpatialLocationsPreserved", None)     # (items may be shared)
        for item in seg.SegmentSequence:
            category = item.SegmentedPropertyCategoryCodeSequence[0]
            if category.CodeValue == "49755003":
                category.CodeValue, category.CodingSchemeDesignator = "M-01000", "SRT"
    out.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out)
    return out


@pytest.fixture(scope="module")
def own(tiny, tmp_path_factory):
    """One test study of each class copied as one's own (no truth beside it), with the
    truth kept aside, and the reader's SEGs of the three diseased ones: COVID-19's typed,
    with a lung segment too, as OHIF writes it; H1N1's one untyped lesion segment, a lesion
    by its category only (in SNOMED-RT); CAP's typed, and one slice's lesion in an untyped
    segment too, a lesion by its label only."""
    where = tmp_path_factory.mktemp("own")
    chosen = {}
    for entry in read_manifest(tiny, "test"):
        chosen.setdefault(entry.class_name, entry)
    cap = json.loads(chosen["CAP"].annotations.read_text())["slices"]
    segs = {"COVID-19": dict(lung=True, ohif=True), "H1N1": dict(typed=False, ohif=True),
            "CAP": dict(untyped_on=next(i for i, n in enumerate(cap) if n["has_lesion"]))}
    rows = []
    for name, entry in chosen.items():
        copy = where / "studies" / entry.path.name
        shutil.copytree(entry.path, copy, ignore=shutil.ignore_patterns("*.json", "*.npz"))
        row = {"study": f"studies/{copy.name}", "label": name, "split": "test",
               "segmentation": ""}
        if name in segs:
            row["segmentation"] = f"outlines/{copy.name}.dcm"
            reader_seg(entry.path, where / row["segmentation"], **segs[name])
        rows.append(row)
    return where, chosen, rows


def _write_labels(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_a_readers_segmentation_is_the_studys_truth(own, tmp_path):
    where, chosen, rows = own
    labels = _write_labels(where / "labels.csv", rows)
    proc = subprocess.run([str(Path(sys.executable).with_name("lungsys")), "dataset",
                           "--labels", str(labels), "--out", str(tmp_path / "ds")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    line, covid = next((n, r) for n, r in enumerate(rows, start=2) if r["label"] == "COVID-19")
    assert f"lungsys: warning: line {line} ({covid['study']}): segment(s) 'lungs' not a " \
           f"lesion, left out" in proc.stderr
    entries = {e.class_name: e for e in read_manifest(tmp_path / "ds")}
    for name, entry in entries.items():
        truth = chosen[name]
        if name == "Healthy":
            assert entry.masks is None
            assert not any(n["has_lesion"] for n in entry.slice_annotations().values())
            continue
        # the lesion masks, slice for slice, and each slice's flag as the phantom's truth
        uids, lesion = entry.lesion_masks()
        truth_uids, truth_lesion = truth.lesion_masks()
        assert uids == truth_uids and np.array_equal(lesion, truth_lesion), name
        notes, expected = entry.slice_annotations(), truth.slice_annotations()
        assert {u: n["has_lesion"] for u, n in notes.items()} == \
            {u: n["has_lesion"] for u, n in expected.items()}, name
        typed = {u: sorted(n["lesion_types"]) for u, n in notes.items() if "lesion_types" in n}
        if name == "H1N1":                       # one untyped segment: types unknown
            assert typed == {}
        else:                                    # CAP: the slice an untyped segment covers
            mixed = {u for u, n in notes.items() if n["has_lesion"]} - set(typed) \
                if name == "CAP" else set()      # too has unknown types
            assert len(mixed) == (name == "CAP")
            assert typed == {u: sorted(n.get("lesion_types", [])) for u, n in expected.items()
                             if u not in mixed}, name
        # the lesion fractions, from the paper's lung masks rather than the phantom's
        for u, n in notes.items():              # (--size-balanced weighs slices by them)
            theirs = expected[u]["lesion_fraction"]
            assert abs(n["lesion_fraction"] - theirs) <= 0.1 * theirs, (name, u)
        ours = json.loads(entry.annotations.read_text())["infected_fraction"]
        theirs = json.loads(truth.annotations.read_text())["infected_fraction"]
        assert ours > 0 and abs(ours - theirs) < 0.1 * theirs, (name, ours, theirs)

    # evaluate measures the maps on them as on the phantom's own truth
    model = tmp_path / "m.safetensors"
    save_checkpoint(LungSysModel.create("small", seed=1), model)
    phantom = tmp_path / "phantom"
    phantom.mkdir()
    write_manifest(phantom / "manifest.csv", [
        {"study": str(e.path), "label": e.class_name, "split": "test",
         **({"annotations": str(e.annotations), "masks": str(e.masks)} if e.masks else {})}
        for e in chosen.values()])
    mine = evaluate(model, tmp_path / "ds", "all", "cpu", cache=False)
    reference = evaluate(model, phantom, "all", "cpu", cache=False)
    assert mine["pointing_game"] is not None
    for key in ("pointing_game", "pointing_game_flagged", "dice"):
        assert mine[key] == reference[key], key


def test_a_segmentation_that_cannot_be_the_truth_is_named_and_nothing_is_written(
        own, tmp_path):
    where, chosen, rows = own
    healthy, covid, h1n1, cap = sorted(rows, key=lambda r: CLASSES.index(r["label"]))
    not_seg = next((where / covid["study"]).glob("*.dcm"))         # a CT slice
    (where / "junk.dcm").write_bytes(b"\x00" * 200 + b"DICM" + b"\xff" * 64)
    # checked on reading the labels: all at once
    bad = [{**healthy, "segmentation": covid["segmentation"]},
           {**covid, "segmentation": "outlines/none.dcm"},
           {**h1n1, "lesion_slices": "1-2"}]
    for row in bad:
        row.setdefault("lesion_slices", "")
    with pytest.raises(LabelsError) as raised:
        make_dataset(_write_labels(where / "a.csv", bad), tmp_path / "a")
    assert raised.value.problems == [
        "a.csv line 2: a healthy study has no lesion segmentation",
        "a.csv line 3: segmentation file 'outlines/none.dcm' does not exist",
        "a.csv line 4: give lesion_slices or a segmentation, not both"]
    # checked on reading the studies: all at once
    lung_only = reader_seg(chosen["CAP"].path, where / "lung-only.dcm", lung=True,
                           lesion=False)
    bad = [{**covid, "segmentation": cap["segmentation"]},        # another series'
           {**h1n1, "segmentation": str(not_seg)},
           {**cap, "segmentation": lung_only.name},
           {**healthy, "label": "covid", "segmentation": "junk.dcm"}]
    with pytest.raises(LabelsError) as raised:
        make_dataset(_write_labels(where / "b.csv", bad), tmp_path / "b")
    problems = raised.value.problems
    assert len(problems) == 4, problems
    assert problems[0].startswith(f"line 2 ({covid['study']}): ")
    assert problems[0].endswith("its frames lie on no slice of this series (the "
                                "segmentation of another series, or of the CT before it "
                                "was de-identified with new UIDs?)")
    assert f"{not_seg.name} is not a readable DICOM Segmentation (" in problems[1]
    assert "lung-only.dcm has no lesion segment (its segments: lungs)" in problems[2]
    assert "junk.dcm is not a readable DICOM Segmentation (" in problems[3]
    assert not (tmp_path / "b").exists()
    # frames whose pixels were moved off their slices' grid cannot be the truth
    moved = pydicom.dcmread(where / covid["segmentation"])
    for frame in moved.PerFrameFunctionalGroupsSequence:
        frame.DerivationImageSequence[0].SourceImageSequence[0].SpatialLocationsPreserved = "NO"
    moved.save_as(where / "moved.dcm")
    with pytest.raises(LabelsError) as raised:
        make_dataset(_write_labels(where / "c.csv", [{**covid, "segmentation": "moved.dcm"}]),
                     tmp_path / "c")
    assert raised.value.problems == [
        f"line 2 ({covid['study']}): moved.dcm: its frames do not lie on the pixels of the "
        f"slices they come from (Spatial Locations Preserved NO)"]
