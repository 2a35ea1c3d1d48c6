"""Reading the UIDs a received instance is filed by, from the bytes the SCP got first."""

from __future__ import annotations

import copy

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacs_node.header import InstanceHeader, read_header, scan_start


def _encoded(ds: Dataset, syntax: str) -> bytes:
    """The data set as an SCP receives it: no file meta, in ``syntax``."""
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, syntax == ImplicitVRLittleEndian
    ds = copy.deepcopy(ds)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    write_dataset(out, ds)
    return out.getvalue()


@pytest.fixture
def instance(covid_study) -> Dataset:
    return pydicom.dcmread(covid_study.files[0])


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_the_scan_reads_what_pydicom_reads(instance, syntax):
    instance.ImagesInAcquisition = 24
    raw = _encoded(instance, syntax)
    expected = InstanceHeader.from_dataset(instance, syntax)
    assert scan_start(raw, syntax) == expected
    assert scan_start(raw[:2048], syntax) == expected       # only the first bytes
    assert expected.images_in_acquisition == 24 and expected.modality == "CT"


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("undefined", [False, True])
def test_sequences_are_stepped_over_or_left_to_pydicom(instance, syntax, undefined, tmp_path):
    """A sequence before (0020,1002): skipped by its length, or, with undefined
    length (items up to a delimiter), the same bytes are read by pydicom."""
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = "1.2.3", "1.2.3.4"
    instance.ReferencedImageSequence = Sequence([item])          # (0008,1140)
    instance["ReferencedImageSequence"].is_undefined_length = undefined
    raw = _encoded(instance, syntax)
    assert (b"\xff\xff\xff\xff" in raw[:2048]) == undefined
    expected = InstanceHeader.from_dataset(instance, syntax)
    assert scan_start(raw, syntax) == (None if undefined else expected)
    assert read_header(raw[:4096], syntax, tmp_path / "never-read.dcm") == expected


def test_a_start_cut_short_is_read_from_the_file(instance, covid_study):
    raw = _encoded(instance, ExplicitVRLittleEndian)
    cut = raw[:200]          # ends inside group 0008, before any Series Instance UID
    assert scan_start(cut, ExplicitVRLittleEndian) is None
    header = read_header(cut, ExplicitVRLittleEndian, covid_study.files[0])
    assert header.series_instance_uid == instance.SeriesInstanceUID
    assert header.transfer_syntax_uid == str(instance.file_meta.TransferSyntaxUID)


def test_a_missing_uid_is_never_guessed(instance, tmp_path):
    del instance.SeriesInstanceUID
    raw = _encoded(instance, ExplicitVRLittleEndian)
    assert scan_start(raw, ExplicitVRLittleEndian) is None
    path = tmp_path / "no-series.dcm"
    instance.save_as(path, enforce_file_format=True)
    with pytest.raises(AttributeError):
        read_header(raw, ExplicitVRLittleEndian, path)


@pytest.mark.parametrize("value, count", [(b"12", 12), (b" 7 ", 7), (b"", None), (b"0", None),
                                          (b"12.5", None), (b"many", None)])
def test_images_in_acquisition_counts_only_when_it_is_a_count(instance, value, count):
    instance.ImagesInAcquisition = 99
    value += b" " * (len(value) % 2)
    element = b"\x20\x00\x02\x10IS"             # (0020,1002) IS, as senders may fill it
    raw = _encoded(instance, ExplicitVRLittleEndian).replace(
        element + b"\x02\x0099", element + len(value).to_bytes(2, "little") + value)
    assert scan_start(raw, ExplicitVRLittleEndian).images_in_acquisition == count


def test_a_file_of_zeros_after_its_meta_is_refused_not_walked(covid_study, tmp_path):
    """Zeros after the file meta read as group 0000 elements: pydicom would walk them one
    by one as a command set (seconds of CPU per megabyte); the header refuses them at once,
    and zeros after the wanted elements are never read."""
    from pacs_node.header import read_file_header

    raw = covid_study.files[0].read_bytes()
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    zeros = tmp_path / "zeros.dcm"
    zeros.write_bytes(raw[:meta_end] + b"\0" * (8 << 20))
    with pytest.raises(ValueError, match="group 0000"):
        read_file_header(zeros)
    ds = pydicom.dcmread(covid_study.files[0])
    tail = tmp_path / "tail.dcm"       # the elements wanted, then zeros where pixels were
    tail.write_bytes(raw[:-len(ds.PixelData) - 12] + b"\0" * (8 << 20))
    assert read_file_header(tail).sop_instance_uid == ds.SOPInstanceUID


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_spaces_around_a_uid_are_padding_as_every_later_reader_reads_them(instance, syntax):
    """The node files an instance under the UIDs the scan reads; the worker, the results
    and retention read the stored file with pydicom. Both must name the same UIDs."""
    uid = instance.SOPInstanceUID
    instance.SOPInstanceUID = f"1{uid}1"                 # as long as " UID ", which pydicom
    raw = _encoded(instance, syntax).replace(f"1{uid}1".encode(), f" {uid} ".encode())
    assert f" {uid} ".encode() in raw                    # would not write
    read = pydicom.filereader.read_dataset(DicomBytesIO(raw), syntax == ImplicitVRLittleEndian,
                                           True)
    assert scan_start(raw, syntax).sop_instance_uid == read.SOPInstanceUID == uid


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("cut_in", ["SeriesInstanceUID", "ImagesInAcquisition"])
@pytest.mark.parametrize("undefined", [False, True])
def test_a_first_fragment_that_ends_inside_a_value_is_never_taken_for_the_value(
        instance, syntax, cut_in, undefined, tmp_path):
    """A sender may end a PDV anywhere (PS3.8 E.2): the scan and pydicom (which reads a
    value cut short without a word) must not file an instance under half its Series UID
    or count half its Images in Acquisition; the file holds the whole value."""
    instance.ImagesInAcquisition = 300
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = "1.2.3", "1.2.3.4"
    instance.ReferencedImageSequence = Sequence([item])          # (0008,1140): to pydicom
    instance["ReferencedImageSequence"].is_undefined_length = undefined
    raw = _encoded(instance, syntax)
    value = (instance.SeriesInstanceUID if cut_in == "SeriesInstanceUID" else "300").encode()
    at = raw.index(value) + 1
    path = tmp_path / "received.dcm"
    instance.file_meta.TransferSyntaxUID = syntax
    instance.save_as(path, enforce_file_format=True)
    expected = InstanceHeader.from_dataset(instance, syntax)
    assert read_header(raw[:at], syntax, path) == expected
    assert expected.images_in_acquisition == 300
