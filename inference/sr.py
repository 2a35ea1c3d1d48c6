"""The Structured Report: a Comprehensive SR carrying a TID 1500 Measurement Report
laid out so that viewers show it.

Comprehensive SR (1.2.840.10008.5.1.4.1.1.88.33), not 3D: it holds only
image coordinates (SCOORD), and peers (DCMTK's storescu among them) propose
the 3D SOP class far less often.

The layout follows what OHIF 3.13's ``cornerstone-dicom-sr`` extension and
``@cornerstonejs/adapters`` 5.6 read (``tests/viewer/`` runs them on it):

- a device observer (the model, with its Device UID), the procedure (CT of
  chest), and an Image Library (111028) listing the CT images the
  measurements are made on (their Modality and Frame of Reference once);
- Imaging Measurements (126010): one planar ROI group (TID 1410) per lesion
  box and nothing else, the most probable lesion first (OHIF opens the report
  on its first group, so it must lie on an image). Each group has its
  Tracking Identifier ("lesion 1 on image 30 (z -113.9 mm)", the slice as
  PACS show it) and UID, finding type lesion, finding site lung with its side,
  the box as a closed 5-point SCOORD POLYLINE (111030 "Image Region") on its
  CT slice, and three values each INFERRED FROM that region: area in mm2
  (first: the adapters read the box from the first NUM), lesion probability
  in %, mean attenuation in HU; and a Comment that viewers use as the label.
  A patient-level item here would make OHIF's loader throw (it reads image
  coordinates from every group);
- Qualitative Evaluations (C0034375, where TID 1500 puts evaluations of the
  whole report): the diagnosis as a coded evaluation (SCT 439401001
  "Diagnosis"), each class as a Finding with its probability in %, the
  infected-lung fraction in %, a comment that the result is not for primary
  diagnosis (and, when no class is more likely than the others together, that
  its confidence is low), and the algorithm identification (TID 4019), once for the whole
  report. TID 1500 is extensible; the NUM items here are such an extension.

Every container is SEPARATE, so text renderers (``dsr2html``, OHIF's text
view) print each value with its name. Every referenced instance, the CT
slices and the heatmap SC images, is in the Current Requested Procedure
Evidence Sequence; the SR also names the algorithm in the Contributing
Equipment Sequence.
"""

from __future__ import annotations

import numpy as np
import highdicom as hd
from highdicom.sr import (AlgorithmIdentification, CodeContentItem, ComprehensiveSR,
                          ContainerContentItem, CoordinatesForMeasurement,
                          DeviceObserverIdentifyingAttributes, FindingSite, ImageRegion,
                          Measurement, MeasurementReport, MeasurementsAndQualitativeEvaluations,
                          NumContentItem, ObservationContext,
                          ObserverContext, PlanarROIMeasurementsAndQualitativeEvaluations,
                          ImageContentItem, QualitativeEvaluation, SourceImageForRegion,
                          TextContentItem,
                          TrackingIdentifier, UIDRefContentItem)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from inference.identity import (DISCLAIMER, MANUFACTURER, SR_DESCRIPTION,
                                AlgorithmIdentity, stamp_series)
from inference.results import AnalysisResult

DIAGNOSIS = Code("439401001", "SCT", "Diagnosis")
CLASS_CODES = (
    Code("17621005", "SCT", "Normal"),
    Code("840539006", "SCT", "COVID-19"),
    Code("442696006", "SCT", "Influenza caused by Influenza A virus subtype H1N1"),
    Code("385093006", "SCT", "Community acquired pneumonia"),
)
PROBABILITY = Code("122157", "DCM", "Probability")
LUNG = Code("39607008", "SCT", "Lung")
LESION = Code("52988006", "SCT", "Lesion")
COMMENT = Code("121106", "DCM", "Comment")
SOURCE = Code("260753009", "SCT", "Source")
#: CID 29 Acquisition Modality meanings of the modalities a source may have.
MODALITIES = {"CT": "Computed Tomography"}
CT_CHEST = Code("169069000", "SCT", "CT of chest")
#: No standard concept names the infected fraction of the lungs; a local code.
LOCAL_SCHEME = "99LUNGSYS"
INFECTED_FRACTION = Code("INFECTED-FRACTION", LOCAL_SCHEME, "Infected fraction of lung volume")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
RIGHT = Code("24028007", "SCT", "Right")     # CID 244 Laterality
LEFT = Code("7771000", "SCT", "Left")
UNIT_HU = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
UNIT_PERCENT = Code("%", "UCUM", "percent")
#: The five CT lesion types of LA-DNN's auxiliary task as findings. Ground-glass opacity:
#: SNOMED CT 1217294009 (in HL7's lung imaging value sets); consolidation: RadLex RID43255;
#: air bronchogram: DICOM 112071 (PS3.16 CID 6102 Chest CAD Finding or Feature, CID 6105).
#: Crazy paving and interlobular septal thickening have no code confirmed here yet
#: (docs/models.md): they are lungsys local codes until they do.
LESION_TYPE_CODES = {
    "ground_glass_opacity": Code("1217294009", "SCT", "Ground glass opacity"),
    "consolidation": Code("RID43255", "RADLEX", "consolidation"),
    "crazy_paving": Code("CRAZY-PAVING", LOCAL_SCHEME, "Crazy paving pattern"),
    "air_bronchogram": codes.DCM.AirBronchogram,
    "interlobular_septal_thickening": Code("SEPTAL-THICK", LOCAL_SCHEME,
                                           "Interlobular septal thickening"),
}
UNIT_MM2 = Code("mm2", "UCUM", "square millimeter")


def _reference(ds: Dataset) -> Dataset:
    """What the evidence sequence needs of an instance (the SR copies the patient and
    study from the first, which is whole; copying 300 whole headers took seconds)."""
    ref = Dataset()
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID"):
        setattr(ref, keyword, getattr(ds, keyword))
    return ref


def _walk(items):
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _side(hu: np.ndarray, box, source: Dataset) -> Code | None:
    """The patient's side a box lies on: its centre against the body's midline (the middle
    of the pixels above -500 HU) along whichever image axis runs left-right (the columns
    of an axial slice, the rows of a decubitus one); None for an oblique slice."""
    orientation = [float(v) for v in source.get("ImageOrientationPatient") or []]
    if len(orientation) != 6:
        return None
    along_row, along_column = orientation[0], orientation[3]   # x (patient's left) per step
    if abs(along_row) >= 0.5:
        sign, axis, centre = along_row, 0, (box.col0 + box.col1) / 2
    elif abs(along_column) >= 0.5:
        sign, axis, centre = along_column, 1, (box.row0 + box.row1) / 2
    else:
        return None
    body = np.nonzero((hu > -500).any(axis=axis))[0]
    if body.size == 0:
        return None
    offset = (centre - (body.min() + body.max() + 1) / 2) * sign
    return LEFT if offset > 0 else RIGHT


def _mean_hu(hu: np.ndarray, region: np.ndarray, box) -> float:
    """Mean HU of the lesion region inside the box (the whole box when it holds none)."""
    window = hu[box.row0:box.row1, box.col0:box.col1]
    inside = region[box.row0:box.row1, box.col0:box.col1]
    return float(window[inside].mean() if inside.any() else window.mean())


def build_sr(result: AnalysisResult, sources: list[Dataset], frames: list[int | None],
             heatmaps: list[Dataset], identity: AlgorithmIdentity, *, hu: np.ndarray,
             series_instance_uid: str, series_number: int, sop_instance_uid: str,
             pixel_spacing_mm: tuple[float, float]) -> ComprehensiveSR:
    """The SR of one analysis; ``sources[i]`` is slice i's CT dataset (header), ``hu[i]``
    its pixels in HU."""
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=identity.device_uid, name=identity.algorithm_name, manufacturer_name=MANUFACTURER,
            model_name=identity.model_name))
    pixel_mm2 = float(pixel_spacing_mm[0]) * float(pixel_spacing_mm[1])
    lesions = sorted(((s, n, box) for s in result.lesion_slices
                      for n, box in enumerate(s.boxes, start=1)),
                     key=lambda t: (-t[0].lesion_probability, -t[2].score, t[0].index))
    groups = []
    for s, n, box in lesions:
        ds = sources[s.index]
        frame = [frames[s.index]] if frames[s.index] is not None else None
        corners = np.array([[box.col0, box.row0], [box.col1, box.row0], [box.col1, box.row1],
                            [box.col0, box.row1], [box.col0, box.row0]], dtype=np.float32)

        def inferred_from(corners=corners, ds=ds, frame=frame):
            return [CoordinatesForMeasurement(
                graphic_type="POLYLINE", graphic_data=corners,
                source_image=SourceImageForRegion(ds.SOPClassUID, ds.SOPInstanceUID, frame))]

        region = ImageRegion(graphic_type="POLYLINE", graphic_data=corners,
                             source_image=SourceImageForRegion(ds.SOPClassUID,
                                                               ds.SOPInstanceUID, frame))
        side = _side(hu[s.index], box, ds)
        group = PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=hd.UID(), identifier=f"lesion {n} on {s.label}"[:64]),
            referenced_region=region, finding_type=LESION,
            finding_sites=[FindingSite(LUNG, laterality=side)],
            qualitative_evaluations=[
                QualitativeEvaluation(name=codes.DCM.Finding, value=LESION_TYPE_CODES[name])
                for name in s.shown_types] or None,
            measurements=[
                Measurement(name=codes.SCT.Area, value=round(box.area_px * pixel_mm2, 2),
                            unit=UNIT_MM2),
                Measurement(name=PROBABILITY, value=round(100 * s.lesion_probability, 2),
                            unit=UNIT_PERCENT),
                Measurement(name=codes.DCM.AttenuationCoefficient,
                            value=round(_mean_hu(hu[s.index], result.maps.region(s.index), box),
                                        1),
                            unit=UNIT_HU, derivation=codes.SCT.Mean)])
        # each value INFERRED FROM the box (TID 300 row 8; highdicom's TID 1410 does not
        # take it, and the adapters read the box from under the first NUM)
        for item in group[0].ContentSequence:
            if item.ValueType == "NUM":
                item.ContentSequence = [*item.get("ContentSequence", []), *inferred_from()]
        typed = lesion_type_words(s)
        group[0].ContentSequence.append(TextContentItem(
            name=COMMENT, relationship_type="CONTAINS",
            value=f"AI lesion {100 * s.lesion_probability:.1f}%"
                  + (f": {typed}" if typed else "")))
        groups.append(group)

    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=CT_CHEST,
        # highdicom insists on a group; with no lesion box Imaging Measurements goes, below
        imaging_measurements=groups or [MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier="none"))])
    measured = [sources[i] for i in sorted({s.index for s, _, _ in lesions})]
    if measured:   # after the procedure, before Imaging Measurements (TID 1500 rows 4-6)
        at = [i.ConceptNameCodeSequence[0].CodeValue for i in report[0].ContentSequence] \
            .index(codes.DCM.ImagingMeasurements.value)
        report[0].ContentSequence.insert(at, _image_library(measured, frames, sources))
    if not groups:     # TID 1500: Imaging Measurements holds 1-n groups, or is left out
        report[0].ContentSequence = [
            item for item in report[0].ContentSequence
            if item.ConceptNameCodeSequence[0].CodeValue != codes.DCM.ImagingMeasurements.value]
    report[0].ContentSequence.append(_evaluations(result, identity))
    for item in _walk(report[0].ContentSequence):
        if item.ValueType == "CONTAINER":
            item.ContinuityOfContent = "SEPARATE"
    report[0].ContinuityOfContent = "SEPARATE"
    sr = ComprehensiveSR(
        evidence=[sources[0], *map(_reference, [*sources[1:], *heatmaps])], content=report[0],
        series_instance_uid=series_instance_uid, series_number=series_number,
        sop_instance_uid=sop_instance_uid, instance_number=1, manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False,
        series_description=SR_DESCRIPTION,
        contributing_equipment=[identity.contributing_equipment()])
    stamp_series(sr)
    sr.CodingSchemeIdentificationSequence = [local_scheme()]
    return sr


def local_scheme() -> Dataset:
    """The Coding Scheme Identification item that declares lungsys's local codes."""
    scheme = Dataset()
    scheme.CodingSchemeDesignator = LOCAL_SCHEME
    scheme.CodingSchemeName = "lungsys local codes"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    return scheme


def lesion_type_words(s) -> str:
    """The lesion types a model finds on a slice, as a reader reads them ("" for none)."""
    return ", ".join(LESION_TYPE_CODES[t].meaning.lower() for t in s.shown_types)


def _image_library(images: list[Dataset], frames: list[int | None],
                   sources: list[Dataset]) -> ContainerContentItem:
    """TID 1600 Image Library: one group (126200) naming the shared Modality and Frame of
    Reference, then an IMAGE item per CT instance the measurements are made on (with the
    frames, for a multi-frame one). Per-image descriptors (TID 1602, optional) are left
    out: a 140-box report listed them for 64 images as 1,100 items, and no reader here
    uses them (OHIF keeps only the list)."""
    wanted = {ds.SOPInstanceUID for ds in images}
    entries: dict[str, tuple[Dataset, list[int]]] = {}
    for ds, frame in zip(sources, frames):
        if ds.SOPInstanceUID in wanted:
            entry = entries.setdefault(ds.SOPInstanceUID, (ds, []))
            if frame is not None:
                entry[1].append(frame)
    first = images[0]
    modality = str(first.get("Modality") or "CT")
    shared = [CodeContentItem(name=codes.DCM.Modality,
                              value=Code(modality, "DCM", MODALITIES.get(modality, modality)),
                              relationship_type="HAS ACQ CONTEXT")]
    if first.get("FrameOfReferenceUID"):
        shared.append(UIDRefContentItem(name=codes.DCM.FrameOfReferenceUID,
                                        value=first.FrameOfReferenceUID,
                                        relationship_type="HAS ACQ CONTEXT"))
    group = ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type="CONTAINS",
                                 is_content_continuous=False)
    group.ContentSequence = [*shared, *(
        ImageContentItem(name=SOURCE, referenced_sop_class_uid=ds.SOPClassUID,
                         referenced_sop_instance_uid=ds.SOPInstanceUID,
                         referenced_frame_numbers=sorted(numbers) or None,
                         relationship_type="CONTAINS") for ds, numbers in entries.values())]
    library = ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type="CONTAINS",
                                   is_content_continuous=False)
    library.ContentSequence = [group]
    return library


def _evaluations(result: AnalysisResult, identity: AlgorithmIdentity) -> ContainerContentItem:
    """The patient-level result: TID 1500's Qualitative Evaluations container."""
    container = ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type="CONTAINS",
                                     is_content_continuous=False)
    items = [CodeContentItem(name=DIAGNOSIS, value=CLASS_CODES[result.diagnosis_index],
                             relationship_type="CONTAINS")]
    for code, p in zip(CLASS_CODES, result.probabilities):
        finding = CodeContentItem(name=codes.DCM.Finding, value=code,
                                  relationship_type="CONTAINS")
        finding.ContentSequence = [NumContentItem(
            name=PROBABILITY, value=round(100 * float(p), 2), unit=UNIT_PERCENT,
            relationship_type="HAS PROPERTIES")]
        items.append(finding)
    items.append(NumContentItem(name=INFECTED_FRACTION,
                                value=round(100.0 * result.infected_fraction, 4),
                                unit=UNIT_PERCENT, relationship_type="CONTAINS"))
    caution = result.warning + (
        f"Low confidence: no class is more likely than the others together (highest "
        f"probability {100 * float(max(result.probabilities)):.0f} %). "
        if result.low_confidence else "")
    items.append(TextContentItem(
        name=COMMENT, relationship_type="CONTAINS",
        value=f"{caution}{DISCLAIMER}. Produced by {identity.algorithm_name} "
              f"{identity.model_version} ({identity.method})."[:1024]))
    items.extend(AlgorithmIdentification(name=identity.algorithm_name,
                                         version=identity.model_version,
                                         parameters=identity.parameters,
                                         manufacturer=MANUFACTURER))
    container.ContentSequence = items
    return container
