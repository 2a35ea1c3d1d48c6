"""The results as a radiologist sees them in OHIF 3.13: read from a real Orthanc's DICOMweb by
the published OHIF SR extension and Cornerstone adapters (in Node), and by the real OHIF
3.13.2 app in headless Chromium.

What is checked, for a phantom study and its results uploaded to Orthanc: opening the SR does
not fail; it has one measurement per lesion box, each on the CT image the box was found on,
each a RectangleROI once tracked; the report opens on the most probable lesion's image; the SEG
has one frame per CT image with a lesion region, on exactly those images, in the segment of its
lesion type ("lesion" from an untyped model);
OHIF shows all that without an error and without a request off 127.0.0.1.

Needs node, the npm packages of tests/viewer/*/ and Debian's chromium: scripts/setup.sh --test.
"""

from __future__ import annotations

from collections import Counter

import pytest

from inference.checkpoint import default_model
from inference.engine import Engine
from inference.export import write_results
from inference.seg import lesion_mask
from inference.series import load_series

from doubles import typed_hotspot_model
from orthanc import Orthanc
from viewer import harness


def require_viewer() -> None:
    """Fail (not skip) the test, in one line, when node, the npm packages or chromium are
    missing (the fixtures then do nothing)."""
    problem = harness.missing()
    if problem:
        pytest.fail(problem, pytrace=False)


#: Two analyses: a double that finds a lesion on every slice, typed (lesion types coded in the
#: SR and named in the SEG, as a lesion-typing model writes them: ground-glass opacity the
#: most probable), and
#: the shipped model on a study where it finds lesions on a few slices only, so that "exactly
#: the images with a lesion" and "the most probable lesion first" can fail. With each, the one
#: segment a reader should see.
ANALYSES = {"hotspot-every-slice": ("covid", 1, 24, typed_hotspot_model, "ground glass opacity"),
            "shipped-model": ("covid", 7, 48, default_model, "lesion")}


@pytest.fixture(scope="module", params=list(ANALYSES))
def analysed(request, study_factory, tmp_path_factory):
    label, seed, slices, model, segment = ANALYSES[request.param]
    study = study_factory(label, seed, slices)
    series = load_series(study.directory)
    result = Engine(model(), device="cpu").analyze(series)
    files = write_results(result, series, tmp_path_factory.mktemp("viewer-results"))
    return study, series, result, files, segment


@pytest.fixture(scope="module")
def expected(analysed):
    """What a reader should find, from the analysis itself."""
    _, series, result, files, segment = analysed
    boxes = [s.sop_instance_uid for s in result.lesion_slices for _ in s.boxes]
    mask = lesion_mask(result, series)
    top = max((s.lesion_probability for s in result.lesion_slices if s.boxes), default=None)
    assert boxes and files.sr and files.seg, "the analysis should find lesions"
    return {
        "segments": [{"number": 1, "label": segment}],
        "boxes": Counter(boxes),
        "region_images": {series.slices[i].sop_instance_uid for i in range(len(mask))
                          if mask[i].any()},
        # the report opens on its first measurement: a box of the most probable lesion slice
        "most_probable_images": {s.sop_instance_uid for s in result.lesion_slices
                                 if s.lesion_probability == top and s.boxes},
        "instance_numbers": {s.sop_instance_uid: s.instance_number for s in result.slices},
    }


@pytest.fixture(scope="module")
def pacs(analysed, tmp_path_factory):
    if harness.missing():
        yield None
        return
    study, _, _, files, _ = analysed
    orthanc = Orthanc(tmp_path_factory.mktemp("viewer-orthanc")).start()
    try:
        harness.upload(orthanc.url, [*study.files, *files.all])
        (study_uid,) = [s["MainDicomTags"]["StudyInstanceUID"]
                        for s in orthanc.get("/studies?expand")]
        yield orthanc, study_uid
    finally:
        orthanc.stop()


@pytest.fixture(scope="module")
def node_read(pacs):
    if pacs is None:
        return None
    orthanc, study_uid = pacs
    return harness.sr_check(orthanc.url + "/dicom-web", study_uid)


@pytest.fixture(scope="module")
def ohif(pacs, tmp_path_factory):
    if pacs is None:
        return None
    orthanc, study_uid = pacs
    server = harness.OhifServer(orthanc.url).start()
    try:
        return harness.drive_ohif(server.url, study_uid, tmp_path_factory.mktemp("ohif-shots"))
    finally:
        server.stop()


# ------------------------------------------------------------------ OHIF's SR code, in Node

def test_ohif_loads_the_sr_with_one_measurement_per_box_on_its_image(node_read, expected):
    require_viewer()
    ohif = node_read["ohif"]
    assert ohif["handler"] == "dicom-sr"
    assert not ohif["load"]["threw"], ohif["load"]["error"]
    measurements = ohif["measurements"]
    assert Counter(m["referencedSOPInstanceUID"] for m in measurements) == expected["boxes"]
    for m in measurements:
        assert m["loaded"] and m["imageSOPInstanceUID"] == m["referencedSOPInstanceUID"], m
        assert m["valueType"] == "SCOORD" and m["graphicType"] == "POLYLINE", m
        assert m["toolTypes"] == ["RectangleROI"], m
        # the tracking identifier names the image the reader finds the box on
        number = expected["instance_numbers"][m["referencedSOPInstanceUID"]]
        assert f"on image {number} " in m["trackingIdentifier"], m
    assert ohif["isRehydratable"] is True
    assert ohif["previewAnnotations"] == len(measurements)


def test_ohif_opens_the_report_on_the_most_probable_lesion(node_read, expected):
    require_viewer()
    first = node_read["ohif"]["initialMeasurement"]
    assert first["displaySetInstanceUID"], "the first measurement is on no image: blank viewport"
    assert first["imageSOPInstanceUID"] in expected["most_probable_images"], first


def test_tracking_the_sr_makes_a_rectangle_roi_per_box(node_read, expected):
    require_viewer()
    states = node_read["adapters"]
    assert not states["threw"], states["error"]
    assert list(states["toolStates"]) == ["RectangleROI"]
    assert Counter(s["imageSOPInstanceUID"] for s in states["toolStates"]["RectangleROI"]) \
        == expected["boxes"]
    hydration = node_read["ohif"]["hydration"]
    assert hydration is not None and not hydration["threw"], hydration
    assert hydration["byToolType"] == {"RectangleROI": sum(expected["boxes"].values())}
    assert Counter(m["imageSOPInstanceUID"] for m in hydration["measurements"]) \
        == expected["boxes"]
    assert all(m["points"] == 4 and m["finding"] == "Lesion" for m in hydration["measurements"])


def test_the_seg_marks_exactly_the_images_with_a_lesion_region(node_read, expected):
    require_viewer()
    seg = node_read["seg"]
    assert seg is not None, "no SEG series in the study"
    assert seg["segments"] == expected["segments"]
    assert seg["framesNotInCT"] == 0
    assert seg["framesBySource"] == {uid: 1 for uid in expected["region_images"]}
    read = seg["adapters"]
    assert not read["threw"], read["error"]
    assert read["segments"] == expected["segments"]
    assert read["segmentsOnImage"] == {uid: [1] for uid in expected["region_images"]}
    assert read["nonZeroPixels"] > 0


# ------------------------------------------------------------------ the OHIF app, in Chromium

def test_ohif_opens_the_study_without_error_and_stays_on_loopback(ohif):
    require_viewer()
    assert ohif["error"] is None, ohif["error"]
    assert ohif["appErrors"] == []
    assert ohif["externalRequests"] == []
    assert ohif["httpErrors"] == []
    # no warning either: the SEG carries its colour (RecommendedDisplayCIELabValue)
    assert [t for t in ohif["toasts"] if t["type"] in ("error", "warning")] == []
    modalities = Counter(d["Modality"] for d in ohif["displaySets"]
                         if not d["excludeFromThumbnailBrowser"])
    assert {"CT", "SR", "SEG", "OT"} <= set(modalities), modalities
    # no warning triangle on a thumbnail, but the key images': OHIF 3.13 has no handler for
    # the Key Object Selection SOP Class ("SOP Class UID is not supported.", message 14)
    for warning in ohif["thumbnailWarnings"]:
        assert warning["Modality"] == "KO" and warning["messages"] == [14], warning


def test_ohif_tracks_one_measurement_per_box_on_its_image(ohif, expected):
    require_viewer()
    sr = ohif["sr"]
    # the SR viewport, asking to track its measurements
    assert sr and sr["outcome"] == "prompt", (sr, ohif["error"], ohif["appErrors"])
    assert sr["openedOnSOPInstanceUID"] in expected["most_probable_images"], sr
    assert sr["afterTrackingSOPInstanceUID"] in expected["most_probable_images"], sr
    measurements = ohif["measurements"]
    assert Counter(m["SOPInstanceUID"] for m in measurements) == expected["boxes"]
    assert {m["toolName"] for m in measurements} == {"RectangleROI"}


def test_ohif_overlays_the_lesion_segmentation_on_its_slices(ohif, expected):
    require_viewer()
    assert len(ohif["segmentations"]) == 1, (ohif["segmentations"], ohif["error"])
    (segmentation,) = ohif["segmentations"]
    assert [s["label"] for s in segmentation["segments"]] \
        == [s["label"] for s in expected["segments"]]
    assert "Labelmap" in segmentation["representations"]
    labelled = {x["sopInstanceUID"] for x in segmentation["labelled"]}
    assert labelled == expected["region_images"]
    assert [r["segmentationId"] for r in ohif["viewport"]["segmentations"]] \
        == [segmentation["segmentationId"]]
