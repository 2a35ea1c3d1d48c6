"""Write the DICOM results of an analysis: heatmap SC images, the SR, the lesion SEG.

Both go into the source study (same Study Instance UID, patient and study
attributes copied), each in a new series; the SR references the CT slices
and the heatmaps. By default heatmaps are made for the slices the model flags
as lesion-bearing; ``heatmaps="all"`` makes one per slice.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from inference.choices import HeatmapChoice
from inference.conformance import conformant_header
from inference.heatmap import build_sc, edge_markers, render_overlay
from inference.identity import ALGORITHM_NAME, DISCLAIMER, AlgorithmIdentity
from inference.localize import smooth
from inference.results import AnalysisResult
from inference.series import CTSeries
from inference.seg import build_seg
from inference.sr import build_sr

SC_SERIES_NUMBER = 990
SR_SERIES_NUMBER = 991
SEG_SERIES_NUMBER = 992
HEATMAP_CHOICES = tuple(HeatmapChoice)


@dataclass
class ResultFiles:
    """The DICOM files one analysis wrote: the SR, the SEG (when a lesion region was
    found) and the heatmap SCs."""

    sr: Path
    heatmaps: list[Path]
    seg: Path | None = None

    @property
    def all(self) -> list[Path]:
        return [*self.heatmaps, *([self.seg] if self.seg else []), self.sr]


def slice_source(series: CTSeries, index: int, header: Dataset | None = None) -> Dataset:
    """The CT dataset (header only) of one slice, as results reference it
    (``header``: the series' header made conformant, see :mod:`inference.conformance`)."""
    info = series.slices[index]
    ds = copy.deepcopy(series.header if header is None else header)  # never the original
    ds.SOPInstanceUID = info.sop_instance_uid
    if info.frame is None:
        ds.ImagePositionPatient = list(info.position)
        if info.instance_number is not None:
            ds.InstanceNumber = info.instance_number
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
                  heatmaps: str = HeatmapChoice.lesion) -> ResultFiles:
    """Write the SC heatmaps and the SR of ``result`` into ``out_dir``."""
    if heatmaps not in HEATMAP_CHOICES:
        raise ValueError(f"heatmaps must be one of {', '.join(HEATMAP_CHOICES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    identity = AlgorithmIdentity.from_model_info(result.model, result.method)
    header = conformant_header(series.header)
    sources = [slice_source(series, i, header) for i in range(len(series))]
    frames = [s.frame for s in series.slices]
    chosen = {HeatmapChoice.lesion: result.lesion_slices, HeatmapChoice.all: result.slices,
              HeatmapChoice.none: []}[HeatmapChoice(heatmaps)]

    with warnings.catch_warnings():   # highdicom's name check warns with the name in it
        warnings.filterwarnings("ignore", category=UserWarning, module=r"highdicom\.")
        return _write(result, series, out, identity, sources, frames, chosen)


def _write(result: AnalysisResult, series: CTSeries, out: Path, identity: AlgorithmIdentity,
           sources: list[Dataset], frames: list, chosen: list) -> ResultFiles:
    sc_series = hd.UID()
    sc_datasets: list[Dataset] = []
    sc_paths: list[Path] = []
    top = float(result.probabilities[result.diagnosis_index])
    for number, s in enumerate(chosen, start=1):
        lines = [f"{ALGORITHM_NAME} {identity.model_version}",
                 f"Diagnosis: {result.diagnosis} (p={top:.2f})",
                 f"{s.label[0].upper()}{s.label[1:]}: lesion probability "
                 f"{s.lesion_probability:.2f}",
                 DISCLAIMER]
        pixels = render_overlay(series.hu[s.index], _shown(result, series, s.index), lines,
                                [b.as_tuple() for b in s.boxes],
                                edge_markers(series.orientation))
        sc = build_sc(sources[s.index], pixels, series_instance_uid=sc_series,
                      series_number=SC_SERIES_NUMBER, sop_instance_uid=hd.UID(),
                      instance_number=number, identity=identity,
                      orientation=series.orientation, frame=frames[s.index])
        path = out / f"SC-lungsys-heatmap-slice{s.index + 1:04d}.dcm"
        sc.save_as(path, enforce_file_format=True)
        sc_datasets.append(sc)
        sc_paths.append(path)

    sr = build_sr(result, sources, frames, sc_datasets, identity,
                  series_instance_uid=hd.UID(), series_number=SR_SERIES_NUMBER,
                  sop_instance_uid=hd.UID(), pixel_spacing_mm=float(series.pixel_spacing[0]))
    sr_path = out / "SR-lungsys-report.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    seg = build_seg(result, series, sources, frames, identity, series_instance_uid=hd.UID(),
                    series_number=SEG_SERIES_NUMBER, sop_instance_uid=hd.UID())
    seg_path = None
    if seg is not None:
        seg_path = out / "SEG-lungsys-lesions.dcm"
        seg.save_as(seg_path, enforce_file_format=True)
    return ResultFiles(sr=sr_path, heatmaps=sc_paths, seg=seg_path)
