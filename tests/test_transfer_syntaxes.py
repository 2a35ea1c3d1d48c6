"""Every transfer syntax a scanner or PACS may send decodes bit-exact, and
multi-frame (Enhanced, Legacy Converted Enhanced) CT loads as a volume."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1,
                         JPEGLossless, JPEGLSLossless, RLELossless, generate_uid)

from inference.series import ENHANCED_CT_IMAGE_STORAGE, load_series

from conftest import require_tool


@pytest.fixture(scope="module")
def small_study(study_factory):
    return study_factory("cap", 4, 4)


def _dcmtk(tool: str, args: list[str]):
    def convert(src: Path, dst: Path) -> None:
        subprocess.run([require_tool(tool), *args, str(src), str(dst)], check=True,
                       capture_output=True, timeout=60)
    return convert


def _pydicom_j2k(src: Path, dst: Path) -> None:
    ds = pydicom.dcmread(src)
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    ds.save_as(dst)


CONVERTERS = {
    ImplicitVRLittleEndian: _dcmtk("dcmconv", ["+ti"]),
    DeflatedExplicitVRLittleEndian: _dcmtk("dcmconv", ["+td"]),
    JPEGLosslessSV1: _dcmtk("dcmcjpeg", ["+e1"]),
    JPEGLossless: _dcmtk("dcmcjpeg", ["+el"]),
    JPEGLSLossless: _dcmtk("dcmcjpls", ["+el"]),
    RLELossless: _dcmtk("dcmcrle", []),
    JPEG2000Lossless: _pydicom_j2k,
}


@pytest.mark.parametrize("syntax", list(CONVERTERS), ids=lambda u: u.name)
def test_transfer_syntax_loads_bit_exact(small_study, tmp_path, syntax):
    reference = load_series(small_study.directory)
    for f in small_study.files:
        CONVERTERS[syntax](f, tmp_path / f.name)
    for f in tmp_path.iterdir():
        assert pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    series = load_series(tmp_path)
    assert series.sop_instance_uids == reference.sop_instance_uids
    np.testing.assert_array_equal(series.hu, reference.hu)


def _enhanced_ct(files: list[Path], frame_order: list[int]) -> Dataset:
    """An Enhanced CT Image instance holding the given single-frame slices."""
    slices = [pydicom.dcmread(f) for f in files]
    first = slices[0]
    ds = Dataset()
    for kw in ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate",
               "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber",
               "ReferringPhysicianName", "StudyID", "Modality", "Manufacturer",
               "FrameOfReferenceUID", "PositionReferenceIndicator", "BodyPartExamined",
               "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation",
               "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        setattr(ds, kw, first.get(kw))
    ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 3
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.NumberOfFrames = len(slices)
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = first.PixelSpacing
    measures.SliceThickness = first.SliceThickness
    orientation = Dataset()
    orientation.ImageOrientationPatient = first.ImageOrientationPatient
    transform = Dataset()
    transform.RescaleIntercept, transform.RescaleSlope = first.RescaleIntercept, "1"
    transform.RescaleType = "HU"
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for i in frame_order:
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = slices[i].ImagePositionPatient
        item.PlanePositionSequence = Sequence([pos])
        content = Dataset()
        content.InStackPositionNumber = i + 1
        item.FrameContentSequence = Sequence([content])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = b"".join(slices[i].PixelData for i in frame_order)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def test_enhanced_ct_loads_with_frames_in_position_order(small_study, tmp_path):
    reference = load_series(small_study.directory)
    order = [2, 0, 3, 1]
    ds = _enhanced_ct(small_study.files, order)
    ds.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    series = load_series(tmp_path)
    assert len(series) == 4 and series.sop_class_uid == ENHANCED_CT_IMAGE_STORAGE
    np.testing.assert_array_equal(series.hu, reference.hu)
    np.testing.assert_allclose(series.positions, reference.positions)
    assert {s.sop_instance_uid for s in series.slices} == {str(ds.SOPInstanceUID)}
    # frame numbers point back into the instance: the first loaded slice is
    # the lowest, stored as frame order.index(lowest) + 1
    lowest = int(np.argmin(reference.positions @ reference.normal))
    assert series.slices[0].frame == order.index(
        [i for i, f in enumerate(small_study.files)
         if str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
         == reference.sop_instance_uids[lowest]][0]) + 1


def test_legacy_converted_enhanced_ct_from_highdicom(small_study, tmp_path):
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    reference = load_series(small_study.directory)
    legacy = LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(f) for f in small_study.files], series_instance_uid=generate_uid(),
        series_number=9, sop_instance_uid=generate_uid(), instance_number=1)
    legacy.save_as(tmp_path / "legacy.dcm")
    series = load_series(tmp_path)
    assert len(series) == 4
    np.testing.assert_array_equal(series.hu, reference.hu)
