"""Write the DICOM results of an analysis: the objects ``[results] objects`` names.

All go into the source study (same Study Instance UID, patient and study
attributes copied), each kind in its own series with its own number: heatmap
SCs (990), the SR (991), the lesion SEG (992), the key images KOS (993), and
when asked for, a Parametric Map of the lesion map (994) and a presentation
state with the box outlines (995). The SR references the CT slices and the
heatmaps, the KOS the lesion slices and the SR. Objects with nothing to say
(a SEG, KOS, PM or GSPS when no slice has a lesion) are not written. By default
heatmaps are made for the slices the model flags as lesion-bearing;
``heatmaps="all"`` makes one per slice.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.valuerep import format_number_as_ds

from inference.choices import DEFAULT_OBJECTS, HeatmapChoice, ResultObject, SegCompression
from inference.conformance import conformant_header
from inference.heatmap import build_sc, edge_markers, render_overlay
from inference.identity import DISCLAIMER, AlgorithmIdentity
from inference.ko import build_ko
from inference.localize import smooth
from inference.results import AnalysisResult, SliceResult
from inference.series import CTSeries
from inference.seg import build_seg
from inference.sr import build_sr, lesion_type_words

#: Series Number of each kind of result object (distinct, so PACS lists keep them apart).
SERIES_NUMBERS = {ResultObject.sc: 990, ResultObject.sr: 991, ResultObject.seg: 992,
                  ResultObject.ko: 993, ResultObject.pm: 994, ResultObject.gsps: 995}
#: File names in the results folder (heatmaps: SC-lungsys-heatmap-sliceNNNN.dcm, one per
#: chosen slice, NNNN its place in the series, 1 the lowest).
FILE_NAMES = {ResultObject.sr: "SR-lungsys-report.dcm", ResultObject.seg: "SEG-lungsys-lesions.dcm",
              ResultObject.ko: "KO-lungsys-key-images.dcm",
              ResultObject.pm: "PM-lungsys-lesion-map.dcm",
              ResultObject.gsps: "PR-lungsys-lesion-outlines.dcm"}
#: The order objects are sent in: what a later object references goes first.
DELIVERY_ORDER = (ResultObject.sc, ResultObject.seg, ResultObject.pm, ResultObject.gsps,
                  ResultObject.sr, ResultObject.ko)
HEATMAP_CHOICES = tuple(HeatmapChoice)


@dataclass
class ResultFiles:
    """The DICOM files one analysis wrote, by kind."""

    files: dict[ResultObject, list[Path]] = field(default_factory=dict)

    def _one(self, kind: ResultObject) -> Path | None:
        return (self.files.get(kind) or [None])[0]

    @property
    def sr(self) -> Path | None:
        return self._one(ResultObject.sr)

    @property
    def seg(self) -> Path | None:
        return self._one(ResultObject.seg)

    @property
    def ko(self) -> Path | None:
        return self._one(ResultObject.ko)

    @property
    def heatmaps(self) -> list[Path]:
        return list(self.files.get(ResultObject.sc, []))

    @property
    def all(self) -> list[Path]:
        """Every file, in the order they are delivered."""
        return [p for kind in DELIVERY_ORDER for p in self.files.get(kind, [])]

    def kinds(self) -> list[tuple[ResultObject, Path]]:
        """(kind, file) for every file, in the order they are delivered."""
        return [(kind, p) for kind in DELIVERY_ORDER for p in self.files.get(kind, [])]

    def summary(self) -> str:
        """"3 SC, SEG, SR and KO" -- what was written, for a person."""
        parts = [f"{len(paths)} {kind.upper()}" if kind == ResultObject.sc else kind.upper()
                 for kind, paths in ((k, self.files.get(k, [])) for k in DELIVERY_ORDER)
                 if paths]
        return " and ".join([", ".join(parts[:-1]), parts[-1]]) if len(parts) > 1 \
            else (parts[0] if parts else "nothing")


def slice_source(series: CTSeries, index: int, header: Dataset | None = None) -> Dataset:
    """The CT dataset (header only) of one slice, as results reference it
    (``header``: the series' header made conformant, see :mod:`inference.conformance`).

    It shares the header's elements (the builders only read them) and has its own where
    the slice differs: a copy of the whole header for each slice cost a job time and
    memory in proportion to the header's size times the slices."""
    info = series.slices[index]
    header = series.header if header is None else header
    ds = Dataset()
    ds.file_meta = header.file_meta if hasattr(header, "file_meta") else Dataset()
    for elem in header:
        ds.add(elem)
    own = {"SOPInstanceUID": info.sop_instance_uid}
    if not ds.get("Modality"):        # the loader took it as CT (a result names a modality)
        own["Modality"] = "CT"
    if info.frame is None:
        own["ImagePositionPatient"] = list(info.position)
        if info.instance_number is not None:
            own["InstanceNumber"] = info.instance_number
    else:   # a frame of an enhanced instance: its geometry, as a slice's, for the builders
        own["ImageOrientationPatient"] = [float(v) for v in series.orientation]
        own["PixelSpacing"] = [float(v) for v in series.pixel_spacing]
    for keyword, value in own.items():
        if keyword in ds:
            del ds[keyword]             # (setting it would change the header's element)
        setattr(ds, keyword, value)
    return ds


def _shown(result: AnalysisResult, series: CTSeries, index: int) -> np.ndarray:
    """The map a heatmap shows: blurred as regions are cut, its peak kept (the
    slice's lesion probability), so that colour follows the evidence's shape and
    the slice's certainty rather than how spiky the evidence is."""
    grid = result.maps.on_grid(index)
    shown = smooth(grid, float(np.mean(series.pixel_spacing)))
    peak = float(shown.max())
    return shown * (float(grid.max()) / peak) if peak > 0 else shown


def write_results(result: AnalysisResult, series: CTSeries, out_dir: str | Path, *,
                  heatmaps: str = HeatmapChoice.lesion,
                  objects: tuple[str, ...] = DEFAULT_OBJECTS,
                  seg_compression: str = SegCompression.none) -> ResultFiles:
    """Write the result ``objects`` of ``result`` into ``out_dir``."""
    if heatmaps not in HEATMAP_CHOICES:
        raise ValueError(f"heatmaps must be one of {', '.join(HEATMAP_CHOICES)}")
    unknown = [o for o in objects if o not in tuple(ResultObject)]
    if unknown or not objects:
        raise ValueError(f"objects must be some of {', '.join(ResultObject)}, "
                         f"got {', '.join(map(str, objects)) or 'none'}")
    wanted = {ResultObject(o) for o in objects}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    identity = AlgorithmIdentity.from_model_info(result.model, result.method)
    header = conformant_header(series.header)
    sources = [slice_source(series, i, header) for i in range(len(series))]
    thickness = series.slice_thickness or series.slice_spacing
    for ds in sources:    # highdicom reads it (SEG, Image Library); a source whose value did
        if "SliceThickness" not in ds and thickness:   # not conform was left without it
            ds.SliceThickness = format_number_as_ds(float(thickness))
    frames = [s.frame for s in series.slices]
    chosen = {HeatmapChoice.lesion: result.lesion_slices, HeatmapChoice.all: result.slices,
              HeatmapChoice.none: []}[HeatmapChoice(heatmaps)]
    if ResultObject.sc not in wanted:
        chosen = []

    with warnings.catch_warnings():   # highdicom's name check warns with the name in it
        warnings.filterwarnings("ignore", category=UserWarning, module=r"highdicom\.")
        return _write(result, series, out, identity, sources, frames, chosen, wanted,
                      SegCompression(seg_compression))


def overlay_lines(result: AnalysisResult, identity: AlgorithmIdentity,
                  s: SliceResult) -> list[str]:
    """The text burned into slice ``s``'s heatmap: the model, the diagnosis (and its low
    confidence), an untrained model's warning, the slice's lesion probability and types,
    and the disclaimer last."""
    top = float(result.probabilities[result.diagnosis_index])
    return [f"{identity.algorithm_name} {identity.model_version}",
            f"Diagnosis: {result.diagnosis} (p={top:.2f}"
            + (", low confidence)" if result.low_confidence else ")"),
            *([result.short_warning] if result.short_warning else []),
            f"{s.label[0].upper()}{s.label[1:]}: lesion probability "
            f"{s.lesion_probability:.2f}",
            *([f"Lesion types: {lesion_type_words(s)}"] if s.shown_types else []),
            DISCLAIMER]


def _heatmaps(result: AnalysisResult, series: CTSeries, out: Path, identity: AlgorithmIdentity,
              sources: list[Dataset], frames: list, chosen: list) -> list[tuple[Dataset, Path]]:
    sc_series = hd.UID()
    written = []
    # each heatmap numbered as its CT image, so that PACS lists "image 37" beside image 37
    # (one's own count where the CT's numbers are missing or repeated)
    numbers = [s.instance_number for s in chosen]
    if None in numbers or len(set(numbers)) < len(numbers):
        numbers = list(range(1, len(chosen) + 1))
    for number, s in zip(numbers, chosen):
        pixels = render_overlay(series.hu[s.index], _shown(result, series, s.index),
                                overlay_lines(result, identity, s),
                                [b.as_tuple() for b in s.boxes],
                                edge_markers(series.orientation))
        sc = build_sc(sources[s.index], pixels, series_instance_uid=sc_series,
                      series_number=SERIES_NUMBERS[ResultObject.sc], sop_instance_uid=hd.UID(),
                      instance_number=number, identity=identity,
                      orientation=series.orientation, frame=frames[s.index])
        path = out / f"SC-lungsys-heatmap-slice{s.index + 1:04d}.dcm"
        sc.save_as(path, enforce_file_format=True)
        written.append((sc, path))
    return written


def _write(result: AnalysisResult, series: CTSeries, out: Path, identity: AlgorithmIdentity,
           sources: list[Dataset], frames: list, chosen: list,
           wanted: set[ResultObject], seg_compression: SegCompression) -> ResultFiles:
    files = ResultFiles()
    heatmaps = _heatmaps(result, series, out, identity, sources, frames, chosen)
    if heatmaps:
        files.files[ResultObject.sc] = [p for _, p in heatmaps]

    def save(kind: ResultObject, ds: Dataset | None) -> Dataset | None:
        if ds is not None:
            path = out / FILE_NAMES[kind]
            ds.save_as(path, enforce_file_format=True)
            files.files[kind] = [path]
        return ds

    uids = {kind: {"series_instance_uid": hd.UID(), "series_number": SERIES_NUMBERS[kind],
                   "sop_instance_uid": hd.UID()} for kind in wanted}
    report = None
    if ResultObject.sr in wanted:
        report = save(ResultObject.sr, build_sr(
            result, sources, frames, [ds for ds, _ in heatmaps], identity, hu=series.hu,
            pixel_spacing_mm=tuple(series.pixel_spacing), **uids[ResultObject.sr]))
    if ResultObject.seg in wanted:
        save(ResultObject.seg, build_seg(result, series, sources, frames, identity,
                                         compression=seg_compression, **uids[ResultObject.seg]))
    if ResultObject.ko in wanted:
        save(ResultObject.ko, build_ko(result, sources, report, identity,
                                       **uids[ResultObject.ko]))
    if ResultObject.pm in wanted:
        from inference.pm import build_pm
        save(ResultObject.pm, build_pm(result, series, sources, frames, identity,
                                       **uids[ResultObject.pm]))
    if ResultObject.gsps in wanted:
        from inference.gsps import build_gsps
        save(ResultObject.gsps, build_gsps(result, sources, frames, identity,
                                           **uids[ResultObject.gsps]))
    return files
