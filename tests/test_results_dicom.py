"""Results as standard DICOM: the TID 1500 SR and the heatmap Secondary Captures."""

from __future__ import annotations

import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.sr.utils import find_content_items
from pydicom.sr.codedict import codes

from inference.engine import Engine
from inference.export import overlay_lines, write_results
from inference.identity import AlgorithmIdentity
from inference.preprocess import lung_masks
from inference.series import load_series
from inference.sr import CLASS_CODES, DIAGNOSIS, INFECTED_FRACTION, PROBABILITY

from conftest import dciodvfy_errors, require_tool
from doubles import hotspot_model

CHINESE_NAME = "张^三丰"


@pytest.fixture(scope="module")
def written(study_factory, tmp_path_factory):
    study = study_factory("covid", 1, 24, patient_name=CHINESE_NAME, character_set="ISO_IR 192")
    series = load_series(study.directory)
    result = Engine(hotspot_model(), device="cpu").analyze(series)
    files = write_results(result, series, tmp_path_factory.mktemp("results"))
    return study, series, result, files


def test_sr_and_every_sc_pass_dciodvfy(written):
    _, _, result, files = written
    assert len(files.heatmaps) == len(result.lesion_slices) > 0
    assert dciodvfy_errors(files.sr) == []
    for path in files.heatmaps:
        assert dciodvfy_errors(path) == [], path.name


def test_dsrdump_reads_the_sr(written):
    _, _, result, files = written
    proc = subprocess.run([require_tool("dsrdump"), str(files.sr)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Imaging Measurement Report" in proc.stdout
    code = CLASS_CODES[result.diagnosis_index]
    assert f'"Diagnosis")=({code.value},SCT,"{code.meaning}")' in proc.stdout
    assert proc.stdout.count('"Probability")') >= 4
    assert "=CONTINUOUS" not in proc.stdout        # every container SEPARATE


def test_dsr2html_shows_every_value_with_its_name(written):
    """A text renderer shows "Probability = 99.88 %", not a bare "99.88 %"."""
    import html
    import re

    _, _, result, files = written
    proc = subprocess.run([require_tool("dsr2html"), str(files.sr)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", proc.stdout)))
    top = CLASS_CODES[result.diagnosis_index].meaning
    named = r"(?::| =) "         # dsr2html: "Name: value" in a container, "Name = value" below
    assert re.search("Diagnosis" + named + re.escape(top), text)
    for name in ("Probability", "Infected fraction of lung volume", "Area",
                 "Attenuation Coefficient"):
        assert re.search(re.escape(name) + named + r"-?[0-9.]+ ", text), name
    for code in CLASS_CODES:
        assert re.search("Finding" + named + re.escape(code.meaning), text)
    assert re.search("Algorithm Name" + named + '"lungsys M3 Lung-Sys"', text)
    # no value without its name: every number with a unit follows "NAME: " or "NAME = "
    values = re.findall(r"(\S+ ?)(-?[0-9]+\.[0-9]+) (?:%|mm2|\[hnsf'U\])", text)
    assert values and all(before.rstrip().endswith((":", "=")) for before, _ in values), values


def test_highdicom_reads_back_diagnosis_probabilities_fraction_boxes(written):
    """What the README shows: the few lines that read the SR back."""
    _, series, result, files = written
    sr = hd.sr.srread(files.sr)
    [diagnosis] = find_content_items(sr, name=DIAGNOSIS, recursive=True)
    assert diagnosis.ConceptCodeSequence[0].CodeMeaning == \
        CLASS_CODES[result.diagnosis_index].meaning
    probabilities = {f.ConceptCodeSequence[0].CodeMeaning:
                     f.ContentSequence[0].MeasuredValueSequence[0].NumericValue
                     for f in find_content_items(sr, name=codes.DCM.Finding, recursive=True)
                     if f.ConceptCodeSequence[0].CodingSchemeDesignator == "SCT"
                     and "ContentSequence" in f}
    assert list(probabilities) == [c.meaning for c in CLASS_CODES]
    np.testing.assert_allclose([float(v) for v in probabilities.values()],
                               100 * result.probabilities, atol=0.01)
    [fraction] = find_content_items(sr, name=INFECTED_FRACTION, recursive=True)
    assert float(fraction.MeasuredValueSequence[0].NumericValue) == \
        pytest.approx(100 * result.infected_fraction, abs=1e-3)
    assert fraction.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "%"

    def text(name):   # TID 4019 Algorithm Identification: once in the report
        return [i.TextValue for i in find_content_items(sr, name=name, recursive=True)]
    assert text(codes.DCM.AlgorithmName) == ["lungsys M3 Lung-Sys"]
    assert text(codes.DCM.AlgorithmVersion) == [result.model.version]
    assert any("method=network" in p for p in text(codes.DCM.AlgorithmParameters))
    device = sr.content.get_observer_contexts(observer_type=codes.DCM.Device)
    assert device[0].observer_identifying_attributes.uid == result.model.device_uid
    assert sr.SeriesDescription.startswith("AI")

    # one planar ROI group per box and nothing else; the most probable lesion first
    rois = sr.content.get_planar_roi_measurement_groups()
    assert len(rois) == sum(len(s.boxes) for s in result.slices) > 0
    assert sr.content.get_image_measurement_groups() == []      # no patient-level group
    by_uid = {s.sop_instance_uid: s for s in result.slices}
    seen = []
    for g in rois:
        region = g.roi
        s = by_uid[region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID]
        corners = region.value.reshape(-1, 2)
        assert len(corners) == 5 and (corners[0] == corners[-1]).all()
        box = [(b.col0, b.row0, b.col1, b.row1) for b in s.boxes]
        assert (corners[0][0], corners[0][1], corners[2][0], corners[2][1]) in box
        assert g.tracking_identifier.startswith("lesion ") and f" on {s.label}" in \
            g.tracking_identifier                         # the CT's Instance Number and z
        [p] = g.get_measurements(name=PROBABILITY)
        assert float(p.value) == pytest.approx(100 * s.lesion_probability, abs=0.01)
        assert p.unit.value == "%"
        [area] = g.get_measurements(name=codes.SCT.Area)
        assert area.unit.value == "mm2" and area.value > 0
        [hu] = g.get_measurements(name=codes.DCM.AttenuationCoefficient)
        assert hu.unit.value == "[hnsf'U]" and -1024 <= hu.value <= 3071
        # each value carries the region it was inferred from (the adapters read the
        # box from under the first NUM, Area)
        assert g[0].ContentSequence[[i.ValueType for i in g[0].ContentSequence]
                                    .index("NUM")].ConceptNameCodeSequence[0].CodeMeaning == "Area"
        for m in (p, area, hu):
            [scoord] = [i for i in m[0].ContentSequence if i.ValueType == "SCOORD"]
            assert scoord.RelationshipType == "INFERRED FROM"
            assert list(scoord.GraphicData) == list(region.GraphicData)
        [site] = g.finding_sites
        assert site.value.value == "39607008"
        seen.append(s.lesion_probability)
    assert seen == sorted(seen, reverse=True)
    library = find_content_items(sr, name=codes.DCM.ImageLibrary)
    assert len(library) == 1


def test_contributing_equipment_names_the_algorithm(written):
    _, _, result, files = written
    for path in (files.sr, files.heatmaps[0]):
        ds = pydicom.dcmread(path)
        algorithms = [item for item in ds.ContributingEquipmentSequence
                      if item.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"]
        assert len(algorithms) == 1
        item = algorithms[0]
        purpose = item.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodingSchemeDesignator, purpose.CodeMeaning) == \
            ("99IHE", "Processing Algorithm")
        assert item.Manufacturer == "lungsys" and item.ManufacturerModelName
        assert result.model.version in item.SoftwareVersions
        assert item.DeviceUID == result.model.device_uid


def test_results_live_in_the_source_study_and_reference_it(written):
    study, series, _, files = written
    ct = pydicom.dcmread(study.files[0])
    sr = pydicom.dcmread(files.sr)
    scs = [pydicom.dcmread(p) for p in files.heatmaps]
    ct_uids = set(series.sop_instance_uids)
    for ds in [sr, *scs]:
        assert ds.StudyInstanceUID == ct.StudyInstanceUID
        for kw in ("PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber"):
            assert ds.get(kw) == ct.get(kw), kw
        assert ds.SeriesInstanceUID != ct.SeriesInstanceUID
    assert len({ds.SeriesInstanceUID for ds in scs}) == 1
    assert sr.SeriesInstanceUID != scs[0].SeriesInstanceUID
    for sc in scs:
        assert sc.BurnedInAnnotation == "YES" and sc.BodyPartExamined == "CHEST"
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in ct_uids
        assert (sc.Rows, sc.Columns) == (ct.Rows, ct.Columns)
        assert [float(v) for v in sc.PixelSpacing] == [float(v) for v in ct.PixelSpacing]
    evidence = {item.ReferencedSOPInstanceUID
                for series_item in sr.CurrentRequestedProcedureEvidenceSequence
                for s in series_item.ReferencedSeriesSequence
                for item in s.ReferencedSOPSequence}
    assert ct_uids <= evidence
    assert {sc.SOPInstanceUID for sc in scs} <= evidence


def test_chinese_patient_name_survives_byte_for_byte(written):
    study, _, _, files = written
    def raw_name(path):
        ds = pydicom.dcmread(path)
        return ds.SpecificCharacterSet, ds.get_item(0x00100010).value
    ct_set, ct_name = raw_name(study.files[0])
    assert ct_set == "ISO_IR 192" and ct_name == CHINESE_NAME.encode("utf-8")
    for path in (files.sr, *files.heatmaps):
        assert raw_name(path) == (ct_set, ct_name), path.name
    assert str(pydicom.dcmread(files.sr).PatientName) == CHINESE_NAME


def test_heatmap_pixels_show_the_map(written):
    _, series, result, files = written
    sc = pydicom.dcmread(files.heatmaps[0])
    index = int(files.heatmaps[0].stem[-4:]) - 1
    rgb = sc.pixel_array.astype(int)
    grid = result.maps.on_grid(index)
    hot = grid > 0.9
    gray = np.abs(rgb[..., 0] - rgb[..., 2]) < 3
    assert hot.any()
    assert (~gray[hot]).mean() > 0.9                     # coloured where the map is hot
    body = (series.hu[index] > -200) & (grid == 0)
    assert gray[body].mean() > 0.9                       # plain CT elsewhere


def test_all_slices_on_request(written, tmp_path):
    _, series, result, _ = written
    files = write_results(result, series, tmp_path, heatmaps="all")
    assert len(files.heatmaps) == len(series)
    none = write_results(result, series, tmp_path / "none", heatmaps="none")
    assert none.heatmaps == [] and dciodvfy_errors(none.sr) == []


def test_cli_analyze_writes_the_results(study_factory, tmp_path):
    import json
    import sys
    from pathlib import Path

    from inference.checkpoint import LungSysModel, save_checkpoint

    study = study_factory("covid", 1, 24)
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(LungSysModel.create("small", seed=5), ckpt)
    exe = Path(sys.executable).with_name("lungsys")
    proc = subprocess.run([str(exe), "analyze", str(study.directory), "--model", str(ckpt),
                           "--out", str(tmp_path / "out"), "--heatmaps", "all", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert Path(report["files"]["sr"]).name == "SR-lungsys-report.dcm"
    assert len(report["files"]["sc"]) == 24
    assert sorted(p.name for p in (tmp_path / "out").glob("SC-*"))[0] == \
        "SC-lungsys-heatmap-slice0001.dcm"
    assert dciodvfy_errors(Path(report["files"]["sr"])) == []


def test_result_series_say_what_and_when_they_are(written):
    """PACS lists: a Series Date/Time, a short description starting with "AI", distinct
    Series Numbers, the disclaimer in the Contribution Description; the SR is a
    Comprehensive SR (2D coordinates only), which peers propose far more than 3D."""
    _, _, _, files = written
    sr, sc = pydicom.dcmread(files.sr), pydicom.dcmread(files.heatmaps[0])
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    for ds in (sr, sc):
        assert len(ds.SeriesDate) == 8 and len(ds.SeriesTime) >= 6
        assert ds.SeriesDescription.startswith("AI") and len(ds.SeriesDescription) <= 64
        assert any("not for primary diagnosis" in item.get("ContributionDescription", "")
                   for item in ds.ContributingEquipmentSequence)
    assert sr.SeriesNumber != sc.SeriesNumber


def test_slices_are_named_as_pacs_shows_them(written):
    """The CT's Instance Number and z, in the JSON, the labels and the heatmaps' numbers."""
    study, series, result, files = written
    report = result.to_json()
    for s, info in zip(report["slices"], series.slices):
        assert s["instance_number"] == info.instance_number
        assert s["z_mm"] == pytest.approx(info.position[2], abs=0.01)
    by_uid = {s.sop_instance_uid: s for s in result.slices}
    for path in files.heatmaps:     # each heatmap numbered as its CT image
        sc = pydicom.dcmread(path, stop_before_pixels=True)
        source = sc.SourceImageSequence[0].ReferencedSOPInstanceUID
        assert sc.InstanceNumber == by_uid[source].instance_number
    lesion = result.lesion_slices[0]
    assert lesion.label == (f"image {series.slices[lesion.index].instance_number} "
                            f"(z {series.slices[lesion.index].position[2]:.1f} mm)")


def test_heatmaps_mark_the_patients_sides():
    from inference.heatmap import edge_markers

    assert edge_markers([1, 0, 0, 0, 1, 0]) == ("R", "L")      # axial, as CT shows it
    assert edge_markers([-1, 0, 0, 0, 1, 0]) == ("L", "R")     # flipped left-right
    assert edge_markers([0, 1, 0, 0, 0, -1]) == ("A", "P")     # sagittal


def test_the_seg_overlays_the_lesion_region_on_its_ct_slices(written):
    """One binary segment "lesion", AUTOMATIC, one frame per CT slice with a region, each
    pointing at its source slice; dciodvfy finds no error; highdicom reads it back."""
    from inference import localize
    from inference.seg import lesion_mask

    study, series, result, files = written
    assert files.seg is not None and files.seg in files.all
    assert dciodvfy_errors(files.seg) == []
    seg = hd.seg.segread(files.seg)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.StudyInstanceUID == series.header.StudyInstanceUID
    assert seg.FrameOfReferenceUID == series.header.FrameOfReferenceUID
    [description] = seg.SegmentSequence
    assert description.SegmentLabel == "lesion" and description.SegmentAlgorithmType == "AUTOMATIC"
    mask = lesion_mask(result, series)
    spacing = float(np.mean(series.pixel_spacing))
    lung = lung_masks(np.asarray(series.hu))
    for s in result.lesion_slices:        # the region the engine cut, kept, not cut again
        hu = np.asarray(series.hu[s.index])
        region = localize.slice_region(result.maps.on_grid(s.index), hu, lung[s.index],
                                       spacing)
        assert (mask[s.index] == region).all()
    with_region = [series.slices[i].sop_instance_uid for i in range(len(series)) if mask[i].any()]
    referenced = [f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                  for f in seg.PerFrameFunctionalGroupsSequence]
    assert sorted(referenced) == sorted(with_region) and len(referenced) > 0
    pixels = seg.pixel_array
    assert pixels.shape[0] == len(with_region) and pixels.any()


def test_a_near_uniform_result_is_flagged_low_confidence_in_json_and_sr(written, tmp_path):
    """The untrained patient network of the test double gives the four classes nearly
    the same probability: the result, its JSON and its SR say the confidence is low, and
    that the model is untrained (its checkpoint says so); the slices' own
    (non-parametric) assessment of a model trained at least that far is sure, and
    nothing is said."""
    _, series, result, files = written
    assert max(result.probabilities) < 0.5 and result.low_confidence
    assert result.to_json()["low_confidence"] is True
    assert "untrained" in result.to_json()["model"]["caution"]

    def comment(sr) -> str:
        proc = subprocess.run([require_tool("dsrdump"), "+Pl", str(sr)], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return next(line for line in proc.stdout.splitlines()
                    if '"Comment")=' in line and "primary" in line)

    said = comment(files.sr)
    assert "Warning: this model is untrained: its diagnosis means nothing. Low confidence: " \
        "no class is more likely than the others together" in said
    lines = overlay_lines(result, AlgorithmIdentity.from_model_info(result.model, "network"),
                          result.slices[0])                 # burned into the heatmaps
    assert lines[1].endswith(", low confidence)")
    assert lines[2] == "WARNING: untrained model: the diagnosis means nothing"
    slice_trained = hotspot_model()
    slice_trained.metadata["provenance"] = {"kind": "slice-trained"}
    sure = Engine(slice_trained, device="cpu", method="nonparametric").analyze(series)
    assert max(sure.probabilities) >= 0.5 and not sure.low_confidence
    assert sure.to_json()["low_confidence"] is False and sure.to_json()["model"]["caution"] == ""
    sure_files = write_results(sure, series, tmp_path)
    assert "Low confidence" not in comment(sure_files.sr)
    assert "Warning" not in comment(sure_files.sr)
    assert not pydicom.dcmread(sure_files.seg).get("ContentDescription")  # SEG: nothing
    lines = overlay_lines(sure, AlgorithmIdentity.from_model_info(sure.model, "nonparametric"),
                          sure.slices[0])
    assert lines[1].endswith(")") and "low confidence" not in lines[1]
    assert not any(line.startswith("WARNING") for line in lines)
    assert dciodvfy_errors(sure_files.sr) == [] and dciodvfy_errors(files.sr) == []
