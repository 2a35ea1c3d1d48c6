"""Screenshots of the results in a viewer and a PACS, for the README.

    .venv/bin/python scripts/viewer_screenshots.py --out docs/images

Writes a phantom study (as ``lungsys phantom --label covid --seed 7 --slices 48``),
analyses it with the shipped model, writes the results (as ``lungsys analyze``), loads
CT and results into a private Orthanc on loopback, opens them in OHIF 3.13.2 in
headless Chromium and saves:

* ``ohif-sr-boxes.png``: the SR's measurements tracked (the lesion boxes as
  RectangleROIs), the measurements panel open, on the most probable lesion's image;
* ``ohif-seg-overlay.png``: the SEG loaded onto the CT, the segmentation panel open,
  on the slice with the most lesion;
* ``orthanc-sc.png``: the most probable lesion's heatmap Secondary Capture as the
  PACS shows it (Orthanc Explorer's page of the instance, its preview open).

Needs what the viewer tests need (node, the npm packages of tests/viewer/, chromium):
``scripts/setup.sh --test``. Nothing is downloaded; nothing leaves 127.0.0.1.
Takes about a minute.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import pydicom  # noqa: E402
from PIL import Image  # noqa: E402

from inference.checkpoint import default_model  # noqa: E402
from inference.engine import Engine  # noqa: E402
from inference.export import write_results  # noqa: E402
from inference.series import load_series  # noqa: E402
from orthanc import Orthanc  # noqa: E402  (tests/orthanc.py)
from training.phantom import generate_study  # noqa: E402
from viewer import harness  # noqa: E402  (tests/viewer/harness.py)

#: what drive.mjs saves -> the name in --out
SHOTS = {"sr-boxes.png": "ohif-sr-boxes.png", "seg-overlay.png": "ohif-seg-overlay.png",
         "orthanc-instance.png": "orthanc-sc.png"}
MAX_BYTES = 400_000
MARKER = ".lungsys-viewer-screenshots"


def save_png(source: Path, target: Path) -> int:
    """Copy a screenshot as an optimised PNG; one over MAX_BYTES gets a 256-colour palette."""
    image = Image.open(source).convert("RGB")
    image.save(target, optimize=True)
    if target.stat().st_size > MAX_BYTES:
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE) \
            .save(target, optimize=True)
    return target.stat().st_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images",
                    help="folder for the PNGs (default docs/images)")
    ap.add_argument("--label", default="covid")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--slices", type=int, default=48)
    ap.add_argument("--keep", type=Path, default=None,
                    help="keep the study, results, Orthanc and raw screenshots in this folder")
    a = ap.parse_args()
    problem = harness.missing()
    if problem:
        print(f"viewer_screenshots: {problem}", file=sys.stderr)
        return 2

    t0 = time.time()
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="lungsys-shots-"))
    if a.keep and work.exists() and any(work.iterdir()):
        if not (work / MARKER).exists():
            print(f"viewer_screenshots: {work} is not empty and not a --keep folder of this "
                  f"script", file=sys.stderr)
            return 2
        for old in work.iterdir():      # a run before: start afresh (its Orthanc too)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).touch()
    try:
        study = generate_study(work / "ct", a.label, a.seed, a.slices)
        series = load_series(study.directory)
        result = Engine(default_model(), device="cpu").analyze(series)
        files = write_results(result, series, work / "results")
        lesions = sorted(((s, box) for s in result.lesion_slices for box in s.boxes),
                         key=lambda t: (-t[0].lesion_probability, -t[1].score, t[0].index))
        if not lesions or files.seg is None or not files.heatmaps:
            print(f"viewer_screenshots: the model found no lesion in {a.label} seed {a.seed}; "
                  f"nothing to show", file=sys.stderr)
            return 1
        first = lesions[0][0]
        print(f"study: {a.label} seed {a.seed}, {a.slices} slices; {result.diagnosis}; "
              f"{len(lesions)} lesion boxes on {len(result.lesion_slices)} slices; "
              f"first: {first.label}; results: {files.summary()}")

        orthanc = Orthanc(work / "orthanc").start()
        server = None
        try:
            harness.upload(orthanc.url, [*study.files, *(p for p in files.all
                                                         if p not in files.heatmaps)])
            heatmap_ids = dict(zip(files.heatmaps, harness.upload(orthanc.url, files.heatmaps)))
            shown = next(i for p, i in heatmap_ids.items()
                         if pydicom.dcmread(p, stop_before_pixels=True)
                         .SourceImageSequence[0].ReferencedSOPInstanceUID
                         == first.sop_instance_uid)
            (study_uid,) = [s["MainDicomTags"]["StudyInstanceUID"]
                            for s in orthanc.get("/studies?expand")]
            server = harness.OhifServer(orthanc.url).start()
            raw = work / "screenshots"
            # two sessions, so that each picture shows one object: the SR's boxes, the SEG
            sr = harness.drive_ohif(server.url, study_uid, raw, steps="sr")
            seg = harness.drive_ohif(server.url, study_uid, raw, steps="seg",
                                     orthanc_url=orthanc.url, orthanc_instance=shown)
        finally:
            if server is not None:
                server.stop()
            orthanc.stop()

        if a.keep:
            for name, run in (("sr", sr), ("seg", seg)):
                (raw / f"drive-{name}.json").write_text(json.dumps(run, indent=1))
        problems = []
        for name, run in (("SR", sr), ("SEG", seg)):
            if run["error"]:
                problems.append(f"{name}: the drive stopped: {run['error'].splitlines()[0]}")
            problems += [f"{name}: {e['kind']}: {e['text'].splitlines()[0]}"
                         for e in run["appErrors"]]
            problems += [f"{name}: request off loopback: {r['url']}"
                         for r in run["externalRequests"]]
        if sr["sr"] and sr["sr"]["afterTrackingSOPInstanceUID"] != first.sop_instance_uid:
            problems.append("SR: OHIF does not show the most probable lesion's image")
        if problems:
            print("viewer_screenshots: not saved:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
        a.out.mkdir(parents=True, exist_ok=True)
        for name, target in SHOTS.items():
            size = save_png(raw / name, a.out / target)
            print(f"wrote {a.out / target} ({size // 1024} KB)")
        print(f"OHIF: {len(sr['measurements'])} measurements, "
              f"{len(seg['segmentations'])} segmentation(s); "
              f"thumbnail warnings: {[w['tooltip'] for w in sr['thumbnailWarnings']]}; "
              f"{time.time() - t0:.0f} s")
        return 0
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
