"""The Structured Report: a Comprehensive SR carrying a TID 1500 Measurement Report.

Comprehensive SR (1.2.840.10008.5.1.4.1.1.88.33), not 3D: it holds only
image coordinates (SCOORD), and peers (DCMTK's storescu among them) propose
the 3D SOP class far less often.

Content (highdicom builds and validates each template as it is constructed):

- a device observer (the model, with its Device UID);
- a "patient assessment" group (TID 1501): the diagnosis as a coded
  qualitative evaluation, concept SCT 439401001 "Diagnosis" (not DCM 121071
  "Finding", which collides with the finding type on read-back); the
  infected-lung fraction of the volume in percent; finding site lung; the
  algorithm (TID 4019); a TEXT comment that the result is not for primary
  diagnosis;
- one group per class with its probability (DCM 122157 "Probability", UCUM
  "1"), the class as the finding type;
- a "slices with lesions" group referencing those CT images;
- one planar ROI group (TID 1410) per lesion box: a SCOORD polyline on its CT
  image, finding type lesion, site lung.

Every referenced instance, the CT slices and the heatmap SC images, is in the
Current Requested Procedure Evidence Sequence; the SR also names the
algorithm in the Contributing Equipment Sequence.
"""

from __future__ import annotations

import numpy as np
import highdicom as hd
from highdicom.sr import (AlgorithmIdentification, ComprehensiveSR,
                          DeviceObserverIdentifyingAttributes, FindingSite, ImageRegion,
                          Measurement, MeasurementReport, MeasurementsAndQualitativeEvaluations,
                          ObservationContext, ObserverContext,
                          PlanarROIMeasurementsAndQualitativeEvaluations, QualitativeEvaluation,
                          SourceImageForMeasurementGroup, SourceImageForRegion, TextContentItem,
                          TrackingIdentifier)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from inference.identity import (ALGORITHM_NAME, DISCLAIMER, MANUFACTURER, SR_DESCRIPTION,
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
CT_CHEST = Code("169069000", "SCT", "CT of chest")
#: No standard concept names the infected fraction of the lungs; a local code.
LOCAL_SCHEME = "99LUNGSYS"
INFECTED_FRACTION = Code("INFECTED-FRACTION", LOCAL_SCHEME, "Infected fraction of lung volume")
LESION_SLICES = Code("LESION-SLICES", LOCAL_SCHEME, "Slices with lesions")
UNIT_ONE = Code("1", "UCUM", "no units")
UNIT_PERCENT = Code("%", "UCUM", "percent")
UNIT_MM2 = Code("mm2", "UCUM", "square millimeter")


def _source(ds: Dataset, frame: int | None) -> SourceImageForMeasurementGroup:
    return SourceImageForMeasurementGroup(
        referenced_sop_class_uid=ds.SOPClassUID, referenced_sop_instance_uid=ds.SOPInstanceUID,
        referenced_frame_numbers=[frame] if frame is not None else None)


def build_sr(result: AnalysisResult, sources: list[Dataset], frames: list[int | None],
             heatmaps: list[Dataset], identity: AlgorithmIdentity, *,
             series_instance_uid: str, series_number: int, sop_instance_uid: str,
             pixel_spacing_mm: float) -> ComprehensiveSR:
    """The SR of one analysis; ``sources[i]`` is slice i's CT dataset (header)."""
    algorithm = AlgorithmIdentification(name=ALGORITHM_NAME, version=identity.model_version,
                                        parameters=identity.parameters,
                                        manufacturer=MANUFACTURER)
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=identity.device_uid, name=ALGORITHM_NAME, manufacturer_name=MANUFACTURER,
            model_name=identity.model_name))
    lung = [FindingSite(LUNG)]

    assessment = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier="patient assessment"),
        algorithm_id=algorithm, finding_sites=lung,
        qualitative_evaluations=[QualitativeEvaluation(DIAGNOSIS,
                                                       CLASS_CODES[result.diagnosis_index])],
        measurements=[Measurement(name=INFECTED_FRACTION,
                                  value=round(100.0 * result.infected_fraction, 4),
                                  unit=UNIT_PERCENT, finding_sites=lung)])
    _append_comment(assessment, f"{DISCLAIMER}. Produced by {ALGORITHM_NAME} "
                                f"{identity.model_version} ({identity.method}).")
    groups: list = [assessment]
    for code, p in zip(CLASS_CODES, result.probabilities):
        groups.append(MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=hd.UID(),
                                                   identifier=f"probability {code.meaning}"[:64]),
            finding_type=code, algorithm_id=algorithm, finding_sites=lung,
            measurements=[Measurement(name=PROBABILITY, value=round(float(p), 6),
                                      unit=UNIT_ONE)]))
    lesion_slices = result.lesion_slices
    if lesion_slices:
        groups.append(MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier="slices with lesions"),
            finding_type=LESION, algorithm_id=algorithm, finding_sites=lung,
            finding_category=LESION_SLICES,
            source_images=[_source(sources[s.index], frames[s.index]) for s in lesion_slices]))
    for s in lesion_slices:
        ds = sources[s.index]
        for n, box in enumerate(s.boxes, start=1):
            polyline = np.array([[box.col0, box.row0], [box.col1, box.row0],
                                 [box.col1, box.row1], [box.col0, box.row1],
                                 [box.col0, box.row0]], dtype=np.float32)
            region = ImageRegion(
                graphic_type="POLYLINE", graphic_data=polyline,
                source_image=SourceImageForRegion(
                    ds.SOPClassUID, ds.SOPInstanceUID,
                    [frames[s.index]] if frames[s.index] is not None else None))
            groups.append(PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    uid=hd.UID(), identifier=f"lesion {n} on {s.label}"[:64]),
                referenced_region=region, finding_type=LESION, algorithm_id=algorithm,
                finding_sites=lung,
                measurements=[
                    Measurement(name=PROBABILITY, value=round(s.lesion_probability, 6),
                                unit=UNIT_ONE),
                    Measurement(name=codes.SCT.Area,
                                value=round(box.area_px * pixel_spacing_mm ** 2, 2),
                                unit=UNIT_MM2)]))

    report = MeasurementReport(observation_context=ObservationContext(
        observer_device_context=observer), procedure_reported=CT_CHEST, imaging_measurements=groups)
    sr = ComprehensiveSR(
        evidence=[*sources, *heatmaps], content=report[0],
        series_instance_uid=series_instance_uid, series_number=series_number,
        sop_instance_uid=sop_instance_uid, instance_number=1, manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False,
        series_description=SR_DESCRIPTION,
        contributing_equipment=[identity.contributing_equipment()])
    stamp_series(sr)
    scheme = Dataset()
    scheme.CodingSchemeDesignator = LOCAL_SCHEME
    scheme.CodingSchemeName = "lungsys local codes"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


def _append_comment(group: MeasurementsAndQualitativeEvaluations, text: str) -> None:
    """Add a TEXT item (TID 1501 allows text qualitative evaluations) to a group."""
    item = TextContentItem(name=COMMENT, value=text[:1024], relationship_type="CONTAINS")
    group[0].ContentSequence.append(item)

