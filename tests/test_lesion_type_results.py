"""Results of a lesion-typing model (LA-DNN) as DICOM: each lesion's types as coded
findings in the SR, and one SEG segment per lesion type found."""

from __future__ import annotations

import subprocess

import highdicom as hd

from inference.engine import Engine
from inference.export import write_results
from inference.series import load_series

from conftest import dciodvfy_errors, require_tool


def test_an_sr_from_a_lesion_typing_model_carries_the_types_with_their_codes(
        study_factory, tmp_path):
    """Each lesion of a lesion-typing model's SR names the types found on its slice as
    coded findings (SNOMED CT, RadLex, DICOM, lungsys local codes for those not yet
    confirmed), and passes dciodvfy; the JSON gives every slice's type probabilities."""
    from doubles import typed_hotspot_model

    series = load_series(study_factory("covid", 1, 24).directory)
    result = Engine(typed_hotspot_model(), device="cpu").analyze(series)
    shown = result.lesion_slices[0].shown_types
    assert shown == ["ground_glass_opacity", "crazy_paving", "interlobular_septal_thickening"]
    assert result.to_json()["slices"][0]["lesion_types"]["consolidation"] < 0.01
    # the double types every slice alike: one slice shows an air bronchogram besides
    bronchogram = result.lesion_slices[1]
    bronchogram.lesion_types = {**bronchogram.lesion_types, "air_bronchogram": 0.9}
    files = write_results(result, series, tmp_path)
    assert dciodvfy_errors(files.sr) == []
    proc = subprocess.run([require_tool("dsrdump"), "+Pl", str(files.sr)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lesions = sum(len(s.boxes) for s in result.lesion_slices)
    for coded in ('(1217294009,SCT,"Ground glass opacity")',
                  '(CRAZY-PAVING,99LUNGSYS,"Crazy paving pattern")',
                  '(SEPTAL-THICK,99LUNGSYS,"Interlobular septal thickening")'):
        assert proc.stdout.count(coded) == lesions, coded
    assert proc.stdout.count('(112071,DCM,"Air bronchogram")') == len(bronchogram.boxes) > 0
    assert "RID43255" not in proc.stdout
    assert "AI lesion" in proc.stdout and ": ground glass opacity, crazy paving pattern" in \
        proc.stdout


def test_the_seg_of_a_lesion_typing_model_names_each_region_by_its_type(
        study_factory, tmp_path):
    """A lesion-typing model's SEG has one segment per lesion type found, labelled and coded
    as the SR codes it, each slice's region in the segment of its most probable type shown
    ("lesion" where none is shown); no pixel is in two segments; dciodvfy finds no error."""
    from doubles import typed_hotspot_model
    from inference.seg import lesion_mask

    series = load_series(study_factory("covid", 1, 24).directory)
    result = Engine(typed_hotspot_model(), device="cpu").analyze(series)
    lesion = result.lesion_slices
    assert len(lesion) >= 5
    # the double types every slice alike: make four slices differ, as a real model's do
    lesion[1].lesion_types = {**lesion[1].lesion_types, "consolidation": 0.999}
    lesion[2].lesion_types = {t: 0.1 for t in lesion[2].lesion_types}
    lesion[3].lesion_types = {**lesion[3].lesion_types, "crazy_paving": 0.999}
    lesion[4].lesion_types = {**lesion[4].lesion_types, "air_bronchogram": 0.9995}
    files = write_results(result, series, tmp_path)
    assert dciodvfy_errors(files.seg) == []
    seg = hd.seg.segread(files.seg)
    labels = [d.SegmentLabel for d in seg.SegmentSequence]
    assert labels == ["ground glass opacity", "consolidation", "crazy paving pattern",
                      "air bronchogram", "lesion"]
    types = [(d.SegmentedPropertyTypeCodeSequence[0].CodeValue,
              d.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator)
             for d in seg.SegmentSequence]
    assert types == [("1217294009", "SCT"), ("RID43255", "RADLEX"),
                     ("CRAZY-PAVING", "99LUNGSYS"), ("112071", "DCM"), ("52988006", "SCT")]
    assert [s.CodingSchemeDesignator for s in seg.CodingSchemeIdentificationSequence] \
        == ["99LUNGSYS"]
    mask = lesion_mask(result, series)
    by_source = {series.slices[i].sop_instance_uid: i for i in range(len(series))}
    expected = {i: 1 for i in range(len(series)) if mask[i].any()}
    for k, number in ((1, 2), (2, 5), (3, 3), (4, 4)):
        expected[lesion[k].index] = number
    got = {}
    for f, frame in zip(seg.PerFrameFunctionalGroupsSequence, seg.pixel_array):
        source = f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        number = f.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        got.setdefault(by_source[source], set()).add(number)
        assert (frame.astype(bool) == mask[by_source[source]]).all()
    assert got == {i: {n} for i, n in expected.items()}     # one segment per slice
    # the crazy-paving slice's region cut to nothing: no segment without pixels, and no
    # local scheme declared where no local code is left
    result.maps.regions.pop(lesion[3].index)
    again = hd.seg.segread(write_results(result, series, tmp_path / "again").seg)
    assert [d.SegmentLabel for d in again.SegmentSequence] == \
        ["ground glass opacity", "consolidation", "air bronchogram", "lesion"]
    assert "CodingSchemeIdentificationSequence" not in again
