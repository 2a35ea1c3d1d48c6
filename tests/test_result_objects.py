"""The other result objects: key images (KOS), and on request a Parametric Map and a
GSPS; which objects are written follows ``[results] objects`` / ``--objects``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from config import ConfigError, load_config
from inference.choices import DEFAULT_OBJECTS, ResultObject
from inference.engine import Engine
from inference.export import SERIES_NUMBERS, write_results
from inference.ko import OF_INTEREST
from inference.model_info import UNTRAINED
from inference.pm import LEVELS, REDUCTION, block_origin, reduced
from inference.series import load_series

from conftest import dciodvfy_errors
from doubles import hotspot_model


@pytest.fixture(scope="module")
def everything(study_factory, tmp_path_factory):
    study = study_factory("covid", 3, 24)
    series = load_series(study.directory)
    result = Engine(hotspot_model(), device="cpu").analyze(series)
    files = write_results(result, series, tmp_path_factory.mktemp("all"),
                          objects=tuple(ResultObject))
    return series, result, files


def test_every_object_kind_is_written_and_passes_dciodvfy(everything):
    _, result, files = everything
    assert result.lesion_slices
    assert set(files.files) == set(ResultObject)
    for path in files.all:
        assert dciodvfy_errors(path) == [], path.name
    # highdicom reads each back as its IOD (0.28 has no SC or GSPS reader: pydicom's)
    readers = {ResultObject.sr: hd.sr.ComprehensiveSR, ResultObject.seg: hd.seg.Segmentation,
               ResultObject.ko: hd.ko.KeyObjectSelectionDocument,
               ResultObject.pm: hd.pm.ParametricMap}
    for kind, path in files.kinds():
        if kind in readers:
            assert isinstance(readers[kind].from_dataset(pydicom.dcmread(path)), readers[kind])
    # the KOS goes after the SR it references, the SR after the heatmaps it references
    order = [kind for kind, _ in files.kinds()]
    assert order.index(ResultObject.sr) < order.index(ResultObject.ko)
    assert order.index(ResultObject.sc) < order.index(ResultObject.sr)


def test_key_images_list_the_lesion_slices_and_the_report(everything):
    series, result, files = everything
    ko = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(files.ko))
    assert ko.content[0].ConceptNameCodeSequence[0].CodeValue == OF_INTEREST.value
    assert ko.content[0].ConceptNameCodeSequence[0].CodeMeaning == "Of Interest"
    refs = {str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            for item in ko.ContentSequence if "ReferencedSOPSequence" in item}
    sr_uid = str(pydicom.dcmread(files.sr).SOPInstanceUID)
    lesion_uids = {s.sop_instance_uid for s in result.lesion_slices}
    assert refs == lesion_uids | {sr_uid}
    text = [item.TextValue for item in ko.ContentSequence if item.ValueType == "TEXT"
            and item.ConceptNameCodeSequence[0].CodeValue == "113012"][0]  # Key Object Descr.
    assert "not for primary diagnosis" in text
    # the test double's checkpoint is untrained ('model init'): its reader is told first
    assert text.startswith("Warning: this model is untrained: its diagnosis means nothing. ")
    assert result.lesion_slices[0].label.split(" (")[0] in text     # "image 30", as PACS shows
    ds = pydicom.dcmread(files.ko)
    assert ds.SeriesDescription.startswith("AI ") and ds.SeriesDate
    assert ds.SeriesNumber == SERIES_NUMBERS[ResultObject.ko]
    assert ds.StudyInstanceUID == series.header.StudyInstanceUID


def test_parametric_map_is_the_lesion_map_on_a_coarser_grid(everything):
    series, result, files = everything
    pm = pydicom.dcmread(files.files[ResultObject.pm][0])
    flagged = result.lesion_slices
    assert pm.NumberOfFrames == len(flagged)
    assert (pm.Rows, pm.Columns) == tuple(-(-n // REDUCTION) for n in series.hu.shape[1:])
    assert pm.BitsAllocated == 16
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert float(mapping.RealWorldValueSlope) == pytest.approx(1 / LEVELS)
    frames = pm.pixel_array.reshape(len(flagged), pm.Rows, pm.Columns)
    # each frame sits on its CT slice (its first block's centre) and holds its map
    by_z = {round(s.z_mm, 2): s for s in flagged}
    for frame, group in zip(frames, pm.PerFrameFunctionalGroupsSequence):
        position = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        s = by_z.pop(round(position[2], 2))
        source = pydicom.dcmread(series.slices[s.index].path, stop_before_pixels=True)
        assert position == pytest.approx(block_origin(source))
        expected = reduced(result.maps.on_grid(s.index))
        assert np.abs(frame / LEVELS - expected).max() <= 1 / LEVELS
        assert frame.max() > 0
    assert not by_z
    assert str(pm.FrameOfReferenceUID) == str(source.FrameOfReferenceUID)


def test_presentation_state_outlines_every_box_on_its_slice(everything):
    _, result, files = everything
    pr = pydicom.dcmread(files.files[ResultObject.gsps][0])
    by_image = {str(a.ReferencedImageSequence[0].ReferencedSOPInstanceUID): a
                for a in pr.GraphicAnnotationSequence}
    boxed = [s for s in result.lesion_slices if s.boxes]
    assert set(by_image) == {s.sop_instance_uid for s in boxed}
    for s in boxed:
        annotation = by_image[s.sop_instance_uid]
        drawn = [np.asarray(g.GraphicData, dtype=float).reshape(-1, 2)
                 for g in annotation.GraphicObjectSequence]
        expected = [np.array([[b.col0, b.row0], [b.col1, b.row0], [b.col1, b.row1],
                              [b.col0, b.row1], [b.col0, b.row0]], dtype=float)
                    for b in s.boxes]
        assert len(drawn) == len(expected)
        for d, e in zip(drawn, expected):
            assert np.array_equal(d, e)
        assert all(t.UnformattedTextValue.startswith("AI lesion p=")
                   for t in annotation.TextObjectSequence)
    window = pr.SoftcopyVOILUTSequence[0]
    assert (float(window.WindowCenter), float(window.WindowWidth)) == (-600.0, 1500.0)


def test_the_image_objects_of_an_untrained_model_say_so(everything):
    """The SEG, the map and the presentation state carry no report text, so their Content
    Description (what a PACS lists beside their label) warns a reader that the test
    double's model is untrained, in the 64 characters the attribute holds."""
    _, result, files = everything
    warning = "WARNING: untrained model: the diagnosis means nothing"
    assert result.short_warning == warning
    for kind in (ResultObject.seg, ResultObject.pm, ResultObject.gsps):
        assert pydicom.dcmread(files.files[kind][0]).ContentDescription == warning, kind
    for untrained in UNTRAINED:
        assert len(f"WARNING: {UNTRAINED[untrained].label}") <= 64


def test_only_the_asked_objects_are_written(everything, tmp_path):
    series, result, _ = everything
    files = write_results(result, series, tmp_path / "two", objects=("sr", "ko"))
    assert set(files.files) == {ResultObject.sr, ResultObject.ko}
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == \
        ["KO-lungsys-key-images.dcm", "SR-lungsys-report.dcm"]
    files = write_results(result, series, tmp_path / "ko", objects=("ko",))
    ko = pydicom.dcmread(files.ko)     # without an SR, the KOS lists the slices alone
    assert len([i for i in ko.ContentSequence if "ReferencedSOPSequence" in i]) == \
        len(result.lesion_slices)
    with pytest.raises(ValueError, match="objects must be some of"):
        write_results(result, series, tmp_path / "bad", objects=("sr", "jpeg"))


def test_results_objects_configuration(tmp_path):
    assert load_config().results.objects == DEFAULT_OBJECTS
    config = tmp_path / "node.toml"
    config.write_text('[results]\nobjects = ["sr", "pm", "sr"]\n')
    assert load_config(config).results.objects == (ResultObject.sr, ResultObject.pm)
    config.write_text('[results]\nobjects = ["sr", "mpeg"]\n')
    with pytest.raises(ConfigError, match=r"results.objects: expected one of sr, seg"):
        load_config(config)
    config.write_text('[results]\nobjects = []\n')
    with pytest.raises(ConfigError, match="results.objects: expected at least one"):
        load_config(config)
    env = load_config(environ={"LUNGSYS_RESULTS_OBJECTS": "sr,gsps"})
    assert env.results.objects == (ResultObject.sr, ResultObject.gsps)


def test_analyze_objects_option(study_factory, tmp_path):
    from inference.checkpoint import LungSysModel, save_checkpoint

    study = study_factory("covid", 2, 24)
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(LungSysModel.create("small", seed=5), ckpt)
    exe = Path(sys.executable).with_name("lungsys")
    proc = subprocess.run([str(exe), "analyze", str(study.directory), "--model", str(ckpt),
                           "--out", str(tmp_path / "out"), "--objects", "sr,gsps", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report["files"]) <= {"sr", "gsps"} and "sr" in report["files"]
    proc = subprocess.run([str(exe), "analyze", str(study.directory), "--model", str(ckpt),
                           "--out", str(tmp_path / "out"), "--objects", "sr,movie"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--objects" in proc.stderr


def test_a_jpeg2000_seg_is_smaller_the_same_mask_and_delivered(everything, tmp_path):
    """``seg_compression = "jpeg2000"``: dciodvfy-clean, the same mask, much smaller; a
    PACS that takes JPEG 2000 stores it, one that does not gets a clear error while the
    other objects still arrive."""
    from pynetdicom import AE, evt
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless

    from config import Destination, DestinationKind
    from pacs_node.delivery import DeliveryError, send_dimse
    from orthanc import Orthanc, free_port

    series, result, files = everything
    packed = write_results(result, series, tmp_path / "packed", objects=("seg",))
    j2k = write_results(result, series, tmp_path / "j2k", objects=("seg",),
                        seg_compression="jpeg2000")
    assert pydicom.dcmread(j2k.seg).file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert dciodvfy_errors(j2k.seg) == []
    assert j2k.seg.stat().st_size * 4 < packed.seg.stat().st_size
    assert np.array_equal(hd.seg.segread(j2k.seg).pixel_array,
                          hd.seg.segread(packed.seg).pixel_array)

    pacs = Orthanc(tmp_path / "orthanc").start()
    try:
        send_dimse(Destination(name="pacs", kind=DestinationKind.dimse, ae_title=pacs.aet,
                               host="127.0.0.1", port=pacs.dicom_port), [j2k.seg], "LUNGSYS")
        [instance] = pacs.get("/instances")
        meta = pacs.get(f"/instances/{instance}/metadata?expand")
        assert meta["TransferSyntax"] == JPEG2000Lossless
    finally:
        pacs.stop()

    stored = []
    scp = AE(ae_title="PLAIN")
    for kind in (files.sr, j2k.seg):
        scp.add_supported_context(pydicom.dcmread(kind).SOPClassUID,
                                  [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[
        (evt.EVT_C_STORE, lambda event: stored.append(event.request.AffectedSOPClassUID)
         or 0x0000)])
    try:
        with pytest.raises(DeliveryError, match='1 of 2 objects not stored .*seg_compression') \
                as refused:
            send_dimse(Destination(name="plain", kind=DestinationKind.dimse, ae_title="PLAIN",
                                   host="127.0.0.1", port=port), [files.sr, j2k.seg], "LUNGSYS")
        assert refused.value.permanent       # retrying cannot help: the delivery gives up
    finally:
        server.shutdown()
    assert stored == [pydicom.dcmread(files.sr).SOPClassUID]


def test_the_readme_lines_read_diagnosis_probabilities_boxes_and_mask(everything, tmp_path):
    """The README's highdicom lines, run on results the engine wrote: they print what the
    result says."""
    import re

    from inference.seg import lesion_mask
    from inference.sr import CLASS_CODES

    series, result, _ = everything
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    code = re.search(r"<!-- reads the results -->\n```python\n(.*?)```", readme, re.S).group(1)
    write_results(result, series, tmp_path / "demo" / "results")
    script = tmp_path / "readme.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"diagnosis: {CLASS_CODES[result.diagnosis_index].meaning}"
    for code, p, line in zip(CLASS_CODES, result.probabilities, lines[1:5]):
        name, value = line.strip().rsplit(": ", 1)
        assert name == code.meaning and float(value.rstrip(" %")) == \
            pytest.approx(100 * p, abs=0.01)
    boxes = [line for line in lines[5:-1] if line.startswith("lesion ")]
    assert len(boxes) == sum(len(s.boxes) for s in result.lesion_slices) == len(lines) - 6
    mask = lesion_mask(result, series)
    assert lines[-1] == (f"lesion region on {int(mask.any(axis=(1, 2)).sum())} CT images, "
                         f"{int(mask.sum())} pixels")


def _without(result, *, boxes: bool = False, lesions: bool = False):
    """The result with its boxes (and, with ``lesions``, its lesion slices) taken away."""
    from dataclasses import replace

    slices = [replace(s, boxes=[] if not boxes else s.boxes,
                      lesion_probability=0.1 if lesions else s.lesion_probability)
              for s in result.slices]
    return replace(result, slices=slices)


@pytest.mark.parametrize("lesions", [False, True], ids=["lesion-slices-no-boxes", "no-lesion"])
def test_a_report_without_boxes_leaves_imaging_measurements_out(everything, tmp_path,
                                                                 lesions):
    """TID 1500's Imaging Measurements holds 1-n groups or is absent; highdicom reads the
    report, the diagnosis is there, and nothing is made that would be empty."""
    from highdicom.sr.utils import find_content_items
    from pydicom.sr.codedict import codes

    from inference.sr import CLASS_CODES, DIAGNOSIS

    series, result, _ = everything
    bare = _without(result, lesions=lesions)
    files = write_results(bare, series, tmp_path / "bare", objects=tuple(ResultObject))
    assert dciodvfy_errors(files.sr) == []
    sr = hd.sr.srread(files.sr)
    assert sr.content.get_planar_roi_measurement_groups() == []
    assert find_content_items(sr, name=codes.DCM.ImagingMeasurements) == []
    [diagnosis] = find_content_items(sr, name=DIAGNOSIS, recursive=True)
    assert diagnosis.value.value == CLASS_CODES[result.diagnosis_index].value
    assert files.files.get(ResultObject.gsps) is None        # no box to draw
    assert (files.ko is None) == lesions                     # key images: the lesion slices
    assert (files.files.get(ResultObject.pm) is None) == lesions


@pytest.mark.parametrize("position", ["HFS", "FFS"])
def test_each_box_names_the_patients_side(study_factory, tmp_path, position):
    """Finding site lung with its laterality: right or left of the body's midline, read
    through the slice's orientation (feet first, the image's left is the patient's left)."""
    from inference.sr import LEFT, RIGHT

    study = study_factory("covid", 3, 24, patient_position=position)
    series = load_series(study.directory)
    result = Engine(hotspot_model(), device="cpu").analyze(series)
    files = write_results(result, series, tmp_path, objects=("sr",))
    along_row = float(series.orientation[0])      # +1: columns run to the patient's left
    cols = series.hu.shape[2]
    checked = 0
    for group in hd.sr.srread(files.sr).content.get_planar_roi_measurement_groups():
        corners = group.roi.value.reshape(-1, 2)
        centre = (corners[0][0] + corners[2][0]) / 2
        if abs(centre - cols / 2) < 30:           # near the midline: either side may be right
            continue
        expected = LEFT if (centre - cols / 2) * along_row > 0 else RIGHT
        [site] = group.finding_sites
        assert site.laterality.value == expected.value, (position, centre)
        checked += 1
    assert checked > 0


def test_an_enhanced_ct_source_gets_an_sr_and_heatmaps(study_factory, tmp_path):
    """A multi-frame CT: the SR (boxes on frames, one Image Library item with its frames)
    and the heatmaps; SEG, key images, PM and GSPS wait until they reference frames."""
    from highdicom.sr.utils import find_content_items
    from pydicom.multival import MultiValue
    from pydicom.sr.codedict import codes
    from test_transfer_syntaxes import _enhanced_ct

    study = study_factory("covid", 1, 24)
    ds = _enhanced_ct(study.files, list(range(len(study.files))))
    (tmp_path / "ct").mkdir()
    ds.save_as(tmp_path / "ct" / "enhanced.dcm", enforce_file_format=True)
    series = load_series(tmp_path / "ct")
    result = Engine(hotspot_model(), device="cpu").analyze(series)
    files = write_results(result, series, tmp_path / "out", objects=tuple(ResultObject))
    assert set(files.files) == {ResultObject.sr, ResultObject.sc}
    for path in files.all:
        assert dciodvfy_errors(path) == [], path.name
    sr = hd.sr.srread(files.sr)
    rois = sr.content.get_planar_roi_measurement_groups()
    assert len(rois) == sum(len(s.boxes) for s in result.slices) > 0
    assert all(" frame " in g.tracking_identifier for g in rois)
    [library] = find_content_items(sr, name=codes.DCM.ImageLibrary)
    [image] = find_content_items(library, value_type="IMAGE", recursive=True)
    frames = image.ReferencedSOPSequence[0].ReferencedFrameNumber
    frames = list(frames) if isinstance(frames, MultiValue) else [frames]
    assert sorted(map(int, frames)) == sorted({s.frame for s in result.slices if s.boxes})
