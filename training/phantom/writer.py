"""Write a rendered phantom as a CT Image Storage series with its truth.

The files carry what a real scanner sends: patient, study (with accession
number), series, frame of reference, equipment, ImageType
ORIGINAL\\PRIMARY\\AXIAL, BodyPartExamined CHEST, Images in Acquisition,
12-bit stored values with a rescale to HU. Beside them:

- ``truth.json``: label, seed, severity, geometry, the lesions with side,
  zone, lobe and distance to the pleura, and per slice (in the loader's order)
  the SOP Instance UID, whether it has a lesion, the lesion types and the
  lesion fraction of the lung;
- ``masks.npz``: ``lung`` and ``lesion``, bool (slices, rows, cols) in the
  slice order of truth.json, and ``types``, uint8: the lesion types each pixel
  shows as bits (``lesion_type_bits`` in truth.json: bit 0 ground-glass
  opacity, 1 consolidation, 2 crazy paving, 3 air bronchogram, 4 interlobular
  septal thickening, 5 centrilobular nodule).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

from inference.version import software_version
from training.phantom.lesions import LABELS, LESION_TYPES, TYPE_BITS
from training.phantom.study import Phantom

TRUTH_FORMAT = "lungsys-phantom-truth/1"
RESCALE_INTERCEPT = -1024.0


@dataclass
class WrittenStudy:
    """A phantom study written as DICOM: its folder, files and truth."""

    directory: Path
    files: list[Path]          # in instance-number (acquisition) order
    truth: dict


_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:lungsys:phantom")


def _uid(*parts: object) -> str:
    """A UID under 2.25 from a name-based (version 5) UUID: same parts, same UID."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '/'.join(map(str, parts))).int}"


def study_header(ph: Phantom, patient_name: str | None = None,
                 character_set: str | None = None) -> Dataset:
    """The attributes every slice of the study shares."""
    rng = np.random.default_rng([ph.seed, LABELS.index(ph.label), 7])
    key = (ph.seed, ph.label, ph.patient_position)
    study_date = dt.date(2024, 1, 1) + dt.timedelta(days=int(rng.integers(0, 700)))
    age = int(rng.integers(22, 88))
    sex = "F" if rng.random() < 0.5 else "M"
    ds = Dataset()
    ds.SpecificCharacterSet = character_set or "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = \
        study_date.strftime("%Y%m%d")
    t = dt.time(int(rng.integers(7, 19)), int(rng.integers(0, 60)), int(rng.integers(0, 60)))
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = t.strftime("%H%M%S")
    ds.AccessionNumber = f"A{int(rng.integers(10**7, 10**8))}"
    ds.Modality = "CT"
    ds.Manufacturer = "lungsys"
    ds.InstitutionName = "lungsys synthetic phantom"
    ds.ReferringPhysicianName = ""
    ds.StationName = "PHANTOM"
    ds.StudyDescription = "CT CHEST"
    ds.SeriesDescription = "Chest 1.0 (lungsys phantom)"
    ds.ManufacturerModelName = "lungsys chest phantom"
    ds.PatientName = patient_name if patient_name is not None else f"PHANTOM^{ph.seed:05d}"
    ds.PatientID = "LSP" + _uid(*key, "patient")[-8:]
    birth = study_date.replace(year=study_date.year - age, day=min(study_date.day, 28))
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = sex
    ds.PatientAge = f"{age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = f"{ph.thickness:.2f}"
    ds.KVP = "120"
    ds.DeviceSerialNumber = "LSP-0001"
    ds.SoftwareVersions = software_version()
    ds.ProtocolName = "CHEST"
    ds.ReconstructionDiameter = f"{ph.rows * ph.spacing:.1f}"
    ds.PatientPosition = ph.patient_position
    ds.ConvolutionKernel = "LUNG"
    ds.StudyInstanceUID = _uid(*key, "study")
    ds.SeriesInstanceUID = _uid(*key, "series")
    ds.StudyID = f"{int(rng.integers(1, 10**6))}"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [f"{v:g}" for v in ph.orientation]
    ds.FrameOfReferenceUID = _uid(*key, "frame-of-reference")
    ds.PositionReferenceIndicator = ""
    ds.ImagesInAcquisition = len(ph.z_rel)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = ph.rows
    ds.PixelSpacing = [f"{ph.spacing:.4f}", f"{ph.spacing:.4f}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1200"
    ds.RescaleIntercept = f"{RESCALE_INTERCEPT:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def write_study(ph: Phantom, out: Path, hu: np.ndarray, lung: np.ndarray, lesion: np.ndarray,
                types: list[set[str]], type_map: np.ndarray | None = None, *,
                patient_name: str | None = None,
                character_set: str | None = None) -> WrittenStudy:
    """Write the DICOM files, truth.json and masks.npz into ``out`` (``type_map``: each
    pixel's lesion types as TYPE_BITS, kept as masks.npz ``types``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header = study_header(ph, patient_name, character_set)
    key = (ph.seed, ph.label, ph.patient_position)
    positions = ph.positions()
    n = len(ph.z_rel)
    # scanners number slices in acquisition order, head to feet
    acquisition = np.argsort(-ph.z_rel, kind="stable")
    instance_of = np.empty(n, dtype=int)
    instance_of[acquisition] = np.arange(1, n + 1)
    stored = np.rint(hu - RESCALE_INTERCEPT).astype(np.uint16)

    files: list[Path | None] = [None] * n
    slices_truth = []
    voxel = ph.spacing * ph.spacing
    for i in range(n):
        ds = Dataset()
        ds.update(header)
        ds.SOPInstanceUID = _uid(*key, "slice", i)
        ds.InstanceNumber = int(instance_of[i])
        ds.ImagePositionPatient = [f"{v:.3f}" for v in positions[i]]
        ds.SliceLocation = f"{positions[i][2]:.3f}"
        ds.PixelData = stored[i].tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        path = out / f"CT{instance_of[i]:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files[instance_of[i] - 1] = path
        lung_px = int(lung[i].sum())
        lesion_px = int(lesion[i].sum())
        slices_truth.append({
            "index": i,
            "sop_instance_uid": str(ds.SOPInstanceUID),
            "instance_number": int(instance_of[i]),
            "position_mm": [round(float(v), 3) for v in positions[i]],
            "lung_area_mm2": round(lung_px * voxel, 1),
            "has_lesion": lesion_px > 0,
            "lesion_types": sorted(types[i], key=LESION_TYPES.index),
            "lesion_fraction": round(lesion_px / lung_px, 6) if lung_px else 0.0,
        })
    lung_total, lesion_total = int(lung.sum()), int(lesion.sum())
    truth = {
        "format": TRUTH_FORMAT,
        "generator": f"lungsys {software_version()}",
        "label": ph.label,
        "label_index": LABELS.index(ph.label),
        "seed": ph.seed,
        "severity": round(ph.severity, 4),
        "patient_position": ph.patient_position,
        "study_instance_uid": str(header.StudyInstanceUID),
        "series_instance_uid": str(header.SeriesInstanceUID),
        "rows": ph.rows,
        "columns": ph.rows,
        "pixel_spacing_mm": ph.spacing,
        "slice_thickness_mm": ph.thickness,
        "image_orientation": list(ph.orientation),
        "lung_height_mm": round(ph.anatomy.height, 2),
        "lung_base_z_mm": round(float(ph.offset[2]), 3),
        "pulsation_artefact": ph.pulsation > 0,
        "infected_fraction": round(lesion_total / lung_total, 6) if lung_total else 0.0,
        "lesions": [{**les.truth, "types": les.all_types()} for les in ph.lesions],
        "lesion_type_bits": {name: bit for name, bit in TYPE_BITS.items()},
        "slices": slices_truth,
    }
    (out / "truth.json").write_text(json.dumps(truth, indent=1))
    extra = {} if type_map is None else {"types": type_map}
    np.savez_compressed(out / "masks.npz", lung=lung, lesion=lesion, **extra)
    return WrittenStudy(out, [f for f in files if f is not None], truth)
