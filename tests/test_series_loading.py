"""CT series loading: ordering, HU conversion, junk handling, typed errors."""

from __future__ import annotations

import random
import shutil
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import MRImageStorage, generate_uid

from inference.errors import (DuplicatePositionError, InconsistentGeometryError,
                              MissingPositionError, MultipleSeriesError, NoCTSeriesError,
                              SeriesError)
from inference.series import load_series, scan


def _stored_hu(files: list[Path]) -> dict[str, np.ndarray]:
    out = {}
    for f in files:
        ds = pydicom.dcmread(f)
        out[str(ds.SOPInstanceUID)] = ds.pixel_array * float(ds.RescaleSlope) + float(
            ds.RescaleIntercept)
    return out


def _shuffled_copy(files: list[Path], dest: Path, seed: int = 0) -> list[Path]:
    """Copy files under random names, in random order."""
    rng = random.Random(seed)
    order = list(files)
    rng.shuffle(order)
    dest.mkdir(parents=True, exist_ok=True)
    copies = []
    for f in order:
        target = dest / f"{rng.getrandbits(40):010x}"
        shutil.copy(f, target)
        copies.append(target)
    return copies


@pytest.mark.parametrize("position", ["HFS", "FFS"])
def test_shuffled_files_load_in_order_along_the_normal(study_factory, tmp_path, position):
    study = study_factory("covid", 3, 16, patient_position=position)
    copies = _shuffled_copy(study.files, tmp_path / "shuffled", seed=5)
    series = load_series(copies)

    truth = study.truth["slices"]
    assert series.sop_instance_uids == [s["sop_instance_uid"] for s in truth]
    along = series.positions @ series.normal
    assert np.all(np.diff(along) > 0)
    # HFS: normal +z, feet to head; FFS: the row direction flips, so head to feet
    z = series.positions[:, 2]
    assert np.all(np.diff(z) > 0) if position == "HFS" else np.all(np.diff(z) < 0)
    # each slice's pixels are that slice's, in HU
    stored = _stored_hu(study.files)
    for i, uid in enumerate(series.sop_instance_uids):
        np.testing.assert_array_equal(series.hu[i], stored[uid])
    # and they match the truth masks: the lung is air, slice by slice
    masks = np.load(study.directory / "masks.npz")
    for i in range(len(series)):
        if masks["lung"][i].sum() > 500:
            assert np.median(series.hu[i][masks["lung"][i]]) < -600


def test_instance_numbers_do_not_decide_the_order(covid_study, tmp_path):
    dest = tmp_path / "renumbered"
    dest.mkdir()
    numbers = list(range(1, len(covid_study.files) + 1))
    random.Random(3).shuffle(numbers)
    for f, n in zip(covid_study.files, numbers):
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = n
        ds.save_as(dest / f"{n:04d}.dcm")
    series = load_series(dest)
    assert series.sop_instance_uids == [s["sop_instance_uid"]
                                        for s in covid_study.truth["slices"]]


def test_rescale_slope_and_intercept_give_hu(covid_study, tmp_path):
    """Signed storage with another slope and intercept decodes to the same HU."""
    reference = load_series(covid_study.directory)
    dest = tmp_path / "rescaled"
    dest.mkdir()
    for f in covid_study.files:
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array.astype(np.int32) - 1024
        ds.PixelRepresentation = 1
        ds.BitsStored = ds.BitsAllocated = 16
        ds.HighBit = 15
        ds.RescaleSlope, ds.RescaleIntercept = "2", "-10"
        ds.PixelData = ((hu + 10) // 2).astype(np.int16).tobytes()
        ds.save_as(dest / f.name)
    series = load_series(dest)
    expected = ((reference.hu.astype(np.int32) + 10) // 2) * 2 - 10
    np.testing.assert_array_equal(series.hu, expected)


def _make_mr(src: Path, dest: Path) -> None:
    ds = pydicom.dcmread(src)
    ds.Modality = "MR"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(dest)


def _make_localizer(src: Path, dest: Path) -> None:
    ds = pydicom.dcmread(src)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(dest)


def test_junk_is_reported_and_skipped(covid_study, tmp_path):
    folder = tmp_path / "junk"
    shutil.copytree(covid_study.directory, folder)
    (folder / "notes.txt").write_text("not DICOM at all")
    victim = folder / covid_study.files[5].name
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # truncated mid pixel data
    _make_mr(covid_study.files[0], folder / "mr.dcm")
    _make_localizer(covid_study.files[0], folder / "scout.dcm")
    (folder / "copy-of-slice-1.dcm").write_bytes(covid_study.files[0].read_bytes())

    series = load_series(folder)
    reasons = {s.path.name: s.reason for s in series.skipped}
    assert len(series) == len(covid_study.files) - 1
    assert reasons["notes.txt"] == "not a DICOM file"
    assert "pixel data cannot be decoded" in reasons[victim.name]
    assert reasons["mr.dcm"] == "modality MR, not CT"
    assert reasons["scout.dcm"] == "localizer (scout) image"
    assert "truth.json" in reasons and "masks.npz" in reasons
    dup = [r for n, r in reasons.items() if n in ("copy-of-slice-1.dcm", "CT0001.dcm")]
    assert dup and dup[0].startswith("duplicate of SOP Instance UID")


def test_no_ct_series(tmp_path, covid_study):
    (tmp_path / "a.txt").write_text("hello")
    _make_mr(covid_study.files[0], tmp_path / "mr.dcm")
    with pytest.raises(NoCTSeriesError) as err:
        load_series(tmp_path)
    assert "\n" not in str(err.value) and "modality MR" in str(err.value)


def test_more_than_one_series(study_factory, tmp_path):
    a, b = study_factory("covid", 1, 24), study_factory("healthy", 2, 8)
    files = a.files + b.files
    with pytest.raises(MultipleSeriesError) as err:
        load_series(files)
    assert set(err.value.series_uids) == {a.truth["series_instance_uid"],
                                          b.truth["series_instance_uid"]}
    chosen = load_series(files, series_uid=b.truth["series_instance_uid"])
    assert len(chosen) == 8
    assert sum("other series" in s.reason for s in chosen.skipped) == 24
    groups, _ = scan(files)
    assert len(groups) == 2


def _edit_copy(study, tmp_path, edit) -> Path:
    dest = tmp_path / "edited"
    shutil.copytree(study.directory, dest)
    ds = pydicom.dcmread(dest / "CT0003.dcm")
    edit(ds)
    ds.save_as(dest / "CT0003.dcm")
    return dest


@pytest.mark.parametrize("edit, error, words", [
    (lambda ds: (setattr(ds, "Rows", 256), setattr(ds, "Columns", 256),
                 setattr(ds, "PixelData", bytes(256 * 256 * 2))),
     InconsistentGeometryError, "differ in size"),
    (lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0.9, 0.43589]),
     InconsistentGeometryError, "differ in orientation"),
    (lambda ds: setattr(ds, "PixelSpacing", [0.5, 0.5]),
     InconsistentGeometryError, "pixel spacing"),
    (lambda ds: delattr(ds, "ImagePositionPatient"), MissingPositionError, "Position"),
])
def test_geometry_errors(covid_study, tmp_path, edit, error, words):
    folder = _edit_copy(covid_study, tmp_path, edit)
    with pytest.raises(error) as err:
        load_series(folder)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, SeriesError)


def test_duplicate_positions(covid_study, tmp_path):
    folder = tmp_path / "dups"
    shutil.copytree(covid_study.directory, folder)
    ds = pydicom.dcmread(folder / "CT0004.dcm")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(folder / "again.dcm")
    with pytest.raises(DuplicatePositionError) as err:
        load_series(folder)
    assert "share a position" in str(err.value)


def test_header_keeps_patient_and_study(covid_study):
    series = load_series(covid_study.directory)
    first = pydicom.dcmread(covid_study.files[0])
    for kw in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber",
               "StudyDate", "FrameOfReferenceUID", "SpecificCharacterSet"):
        assert series.header.get(kw) == first.get(kw)
    assert "PixelData" not in series.header
    assert series.study_instance_uid == covid_study.truth["study_instance_uid"]
    assert series.pixel_spacing == (covid_study.truth["pixel_spacing_mm"],) * 2


def test_a_broken_first_copy_of_an_instance_gives_way_to_a_good_one(study_factory, tmp_path):
    """Two files of one SOP Instance UID, the first (by name) with broken pixels: the good
    copy is loaded and the slice kept; a NaN Rescale Slope skips its file with the reason."""
    import shutil

    import pydicom

    study = study_factory("covid", 3, 8)
    reference = load_series(study.directory)
    for f in study.files:
        shutil.copy(f, tmp_path / f.name)
    broken = pydicom.dcmread(study.files[0])
    broken.PixelData = b"\0" * 10
    broken.save_as(tmp_path / "A0000.dcm")
    nan = pydicom.dcmread(study.files[1])
    nan.SOPInstanceUID, nan.RescaleSlope = "1.2.3.4.5", "NaN"
    nan.ImagePositionPatient = [0, 0, 999]
    nan.save_as(tmp_path / "Z9999.dcm")
    series = load_series(tmp_path)
    assert len(series) == len(reference) and np.array_equal(series.hu, reference.hu)
    reasons = {s.path.name: s.reason for s in series.skipped}
    assert reasons["A0000.dcm"].startswith("pixel data cannot be decoded")
    assert "Rescale Slope is NaN" in reasons["Z9999.dcm"]


def test_elements_sent_as_un_are_read_as_pydicom_reads_them(covid_study, tmp_path):
    """A public element in explicit VR UN (as a converter that did not know its VR writes
    it) is read in its dictionary VR: the loader, which lets go of what it does not read,
    kept neither the SOP Instance UID nor the position of such files (a review)."""
    for f in covid_study.files:
        raw = f.read_bytes()
        for group, element in ((0x0008, 0x0018), (0x0020, 0x0032)):   # UID, position
            at = raw.index(struct.pack("<HH", group, element), 132)
            length = struct.unpack_from("<H", raw, at + 6)[0]
            raw = (raw[:at] + struct.pack("<HH2sHL", group, element, b"UN", 0, length)
                   + raw[at + 8:])
        (tmp_path / f.name).write_bytes(raw)
    series = load_series(tmp_path)
    expected = load_series(covid_study.files)
    assert series.sop_instance_uids == expected.sop_instance_uids
    assert np.allclose(series.positions, expected.positions)
