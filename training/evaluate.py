"""Evaluate a model on a dataset split with the paper's metrics.

Every study of the split is analysed as the node would (the engine, three
windows). Patient level: the network and the non-parametric assessment side
by side, each with per-class sensitivity, specificity and AUC, accuracy, FPE,
FNE and FDPE, 95% bootstrap intervals, and the bootstrap p-value of their
difference in accuracy. Slice level: AUC per class (slices labelled by their
annotations: no lesion -> Healthy, else the patient's class). Localisation,
where the dataset has masks: pointing game and Dice on lesion slices, and the
error of the infected-lung fraction. ROC curves go to PNG files.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from inference import localize
from inference.choices import PatientMethod
from inference.engine import Engine
from inference.ladnn import LESION_TYPES
from inference.preprocess import lung_masks
from inference.profiles import CLASSES
from inference.series import load_series
from training import metrics as M
from training.dataset import StudyEntry, read_manifest, studies_to_evaluate
from training.evaluated import METHODS, Collected, EvaluationCache
from training.runs import default_cache_dir

#: Fewer patients of a class than this: the report says its figures are rough.
SMALL_SAMPLE = 20
#: What the paper's error rates count, as the table says it.
ERRORS = {"fpe": "FPE: healthy called diseased", "fne": "FNE: diseased called healthy",
          "fdpe": "FDPE: diseased, wrong disease"}
#: Each class's figures and how the tables name them.
PER_CLASS = {"sensitivity": "sensitivity", "specificity": "specificity", "auc": "AUC"}


def _method_report(y, pred, scores, seed: int) -> dict:
    y, pred, scores = np.asarray(y), np.asarray(pred), np.asarray(scores)
    rows = M.per_class(y, pred, scores)
    out = {
        "patient_accuracy": M.accuracy(y, pred),
        "patient_accuracy_ci95": M.bootstrap_ci(y, pred, M.accuracy, seed=seed),
        "per_class": {name: row for name, row in zip(CLASSES, rows)},
        "fpe": M.fpe(y, pred), "fpe_ci95": M.bootstrap_ci(y, pred, M.fpe, seed=seed),
        "fne": M.fne(y, pred), "fne_ci95": M.bootstrap_ci(y, pred, M.fne, seed=seed),
        "fdpe": M.fdpe(y, pred), "fdpe_ci95": M.bootstrap_ci(y, pred, M.fdpe, seed=seed),
        "confusion": M.confusion(y, pred).tolist(),
    }
    return out


def timed_on(device) -> str:
    """What the seconds per study were measured on: the GPU, or the processor, its cores
    and the threads PyTorch used (the column means little without it)."""
    import os
    import platform

    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def evaluate(model: str | Path, data: str | Path, split: str = "test", device: str = "auto",
             out_dir: str | Path | None = None, seed: int = 0, progress=None,
             cache_dir: str | Path | None = None, cache: bool = True) -> dict:
    """Evaluate; returns the report (and writes ROC PNGs into ``out_dir``). Each study's
    part is kept in ``cache_dir`` (default DATA/.lungsys-cache) and found there again
    (:mod:`training.evaluated`), unless ``cache`` is False."""
    entries = studies_to_evaluate(data, split)
    engine = Engine(model, device=device)
    machine = timed_on(engine.device)
    kept = EvaluationCache(cache_dir or default_cache_dir(str(data)), engine, machine) \
        if cache else None
    c, reused = Collected(), 0
    task = progress.add_task(f"evaluating {split}", total=len(entries)) if progress else None
    for entry in entries:
        part = kept.get(entry) if kept is not None else None
        if part is None:
            part = _study(engine, entry)
            if kept is not None:
                kept.put(entry, part)
        else:
            reused += 1
        c.extend(part)
        if task is not None:
            progress.advance(task)

    per_class = {name: int(np.sum(np.asarray(c.labels) == k)) for k, name in enumerate(CLASSES)}
    report: dict = {"split": split, "patients": len(c.labels),
                    # the studies, to pair models' reports: digests, as folder names may
                    # be patient IDs
                    "studies": [hashlib.sha256(e.path.name.encode()).hexdigest()[:16]
                                for e in entries],
                    "seconds_per_300_slices": round(sum(c.seconds)
                                                    / max(sum(c.slice_counts), 1) * 300, 2),
                    "timed_on": machine,
                    "studies_kept_before": reused,
                    "patients_per_class": per_class,
                    "small_sample": min(per_class.values()) < SMALL_SAMPLE,
                    "model": engine.model_info.to_json(), "data": str(Path(data).resolve())}
    for method in METHODS:
        report[str(method)] = _method_report(c.labels, c.preds[method], c.scores[method], seed)
    report.update({k: report[PatientMethod.network][k] for k in
                   ("patient_accuracy", "patient_accuracy_ci95", "per_class", "fpe", "fne",
                    "fdpe", "confusion")})
    report["labels"] = [int(v) for v in c.labels]
    report["predictions"] = {str(m): [int(v) for v in c.preds[m]] for m in METHODS}
    report["p_value_accuracy_network_vs_nonparametric"] = M.bootstrap_p_value(
        c.labels, c.preds[PatientMethod.network], c.preds[PatientMethod.nonparametric],
        M.accuracy, seed=seed)
    if c.slice_labels:
        sl, ss = np.array(c.slice_labels), np.array(c.slice_scores)
        report["slice_auc"] = {name: M.roc_auc(sl == k, ss[:, k])
                               for k, name in enumerate(CLASSES)}
        report["slices"] = int(len(sl))
    if c.type_truth:
        truth, scores = np.array(c.type_truth), np.array(c.type_scores)
        report["lesion_type_auc"] = {
            name: (M.roc_auc(truth[:, k] == 1, scores[:, k])
                   if 0 < truth[:, k].sum() < len(truth) else None)
            for k, name in enumerate(LESION_TYPES)}
    report["pointing_game"] = float(np.mean(c.hits)) if c.hits else None
    report["lesion_slices_scored"] = len(c.hits)
    # what a reader checks: where the model shows a lesion, is it on one
    report["pointing_game_flagged"] = float(np.mean(c.flagged_hits)) if c.flagged_hits \
        else None
    report["lesion_slices_flagged"] = len(c.flagged_hits)
    report["dice"] = float(np.mean(c.dices)) if c.dices else None
    report["infected_fraction_mae"] = float(np.mean(c.fraction_errors)) \
        if c.fraction_errors else None
    if out_dir is not None:
        report["roc_png"] = write_roc(c, Path(out_dir))
    return report


def studies_seen(metadata: dict, data: str | Path, split: str) -> int:
    """How many of the studies to evaluate trained the model of this checkpoint
    ``metadata`` or chose its epochs (the train and val splits of every dataset its
    provenance names, however deep: a patient network trained on another model's slice
    network names that model's data, where they can still be read)."""
    seen: set[Path] = set()
    for source in _datasets(metadata.get("provenance")):
        try:
            seen |= {e.path.resolve() for e in read_manifest(source) if e.split != "test"}
        except (ValueError, OSError):           # moved or gone: nothing to compare with
            continue
    return sum(e.path.resolve() in seen for e in read_manifest(data, split))


def _datasets(provenance) -> list[str]:
    """Every ``data`` a provenance (nested dicts) names."""
    if not isinstance(provenance, dict):
        return []
    found = [provenance["data"]] if isinstance(provenance.get("data"), str) else []
    return found + [d for v in provenance.values() for d in _datasets(v)]


def _study(engine: Engine, entry: StudyEntry) -> Collected:
    """What one study adds to the report: the engine run on it, scored against its
    label, annotations and masks."""
    c = Collected()
    series = load_series(entry.path)
    started = time.perf_counter()
    result = engine.analyze(series)
    c.seconds.append(time.perf_counter() - started)
    c.slice_counts.append(len(series))
    c.labels.append(entry.label)
    network, nonparametric = PatientMethod.network, PatientMethod.nonparametric
    c.scores[network].append(result.network_probabilities)
    c.preds[network].append(int(np.argmax(result.network_probabilities)))
    c.scores[nonparametric].append(result.nonparametric_scores)
    c.preds[nonparametric].append(result.nonparametric_diagnosis_index)
    notes = entry.slice_annotations()
    for s in result.slices:
        note = notes.get(s.sop_instance_uid)
        if note is not None:
            c.slice_labels.append(entry.label if note.get("has_lesion") else 0)
            c.slice_scores.append(s.class_probabilities)
            if s.lesion_types is not None and "lesion_types" in note:
                c.type_truth.append([int(t in note["lesion_types"]) for t in LESION_TYPES])
                c.type_scores.append([s.lesion_types[t] for t in LESION_TYPES])
    _localisation(entry, series, result, c)
    return c


def _localisation(entry, series, result, c: Collected) -> None:
    masks = entry.lesion_masks()
    if masks is None:
        return
    uids, lesion = masks
    position = {uid: i for i, uid in enumerate(uids)}
    spacing = float(np.mean(series.pixel_spacing))
    lung = None
    for s in result.slices:
        i = position.get(s.sop_instance_uid)
        if i is None or not lesion[i].any():
            continue
        grid = result.maps.on_grid(s.index)
        c.hits.append(M.pointing_hit(grid, lesion[i]))
        if s.has_lesion:
            c.flagged_hits.append(c.hits[-1])
        if s.index in result.maps.regions:                 # the region the engine cut
            region = result.maps.region(s.index)
        else:                                              # task 1 said no lesion: cut it here
            lung = lung_masks(series.hu) if lung is None else lung
            region = localize.slice_region(grid, series.hu[s.index], lung[s.index], spacing)
        c.dices.append(M.dice(region, lesion[i]))
    truth = json.loads(entry.annotations.read_text()).get("infected_fraction")
    if truth is not None:
        c.fraction_errors.append(abs(result.infected_fraction - float(truth)))


def write_roc(c: Collected, out_dir: Path) -> list[str]:
    """One PNG per method: the four one-against-the-rest ROC curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    y = np.asarray(c.labels)
    paths = []
    for method in METHODS:
        scores = np.asarray(c.scores[method])
        fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
        for k, name in enumerate(CLASSES):
            fpr, tpr = M.roc_curve(y == k, scores[:, k])
            ax.plot(fpr, tpr, label=f"{name} (AUC {M.roc_auc(y == k, scores[:, k]):.3f})")
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.set_title(f"Patient-level ROC, {method}")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        path = out_dir / f"roc-{method}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(str(path))
    return paths


#: What `lungsys evaluate --record` keeps in a checkpoint's metadata.
RECORDED = ("split", "patients", "patient_accuracy", "patient_accuracy_ci95", "per_class",
            "fpe", "fne", "fdpe", "pointing_game", "pointing_game_flagged",
            "lesion_slices_flagged", "dice", "infected_fraction_mae")


def recorded_metrics(report: dict) -> dict:
    """The metrics a checkpoint records about itself (see :data:`RECORDED`)."""
    return {k: report[k] for k in RECORDED} | {
        "data": report["data"],
        "nonparametric_accuracy": report[PatientMethod.nonparametric]["patient_accuracy"]}


def percent(v, ci=None) -> str:
    text = "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.1f}%"
    return text + (f" [{100 * ci[0]:.1f}-{100 * ci[1]:.1f}]" if ci and text != "-" else "")


def report_table(report: dict, split: str):
    """The patient-level metrics, network and non-parametric side by side (a rich Table)."""
    from rich.table import Table

    table = Table(title=f"{report['patients']} {split} patients, model "
                        f"{report['model']['version']}")
    table.add_column("metric")
    for method in METHODS:
        table.add_column(str(method), justify="right")
    n, p = report[PatientMethod.network], report[PatientMethod.nonparametric]
    table.add_row("accuracy", percent(n["patient_accuracy"], n["patient_accuracy_ci95"]),
                  percent(p["patient_accuracy"], p["patient_accuracy_ci95"]))
    for key, label in ERRORS.items():
        table.add_row(label, percent(n[key], n[f"{key}_ci95"]),
                      percent(p[key], p[f"{key}_ci95"]))
    for name in CLASSES:
        for key, label in PER_CLASS.items():
            table.add_row(f"{name} {label}", percent(n["per_class"][name][key]),
                          percent(p["per_class"][name][key]))
    return table


def small_sample_lines(report: dict) -> list[str]:
    """A line of caution when a class had fewer than :data:`SMALL_SAMPLE` patients."""
    if not report.get("small_sample"):
        return []
    low, high = min(report["patients_per_class"].values()), \
        max(report["patients_per_class"].values())
    many = f"{low} to {high} patients" if low != high else \
        f"{low} patient{'s' if low != 1 else ''}"
    return [f"small sample: {many} a class (fewer than {SMALL_SAMPLE}): the 95% intervals "
            f"are wide, read the figures as rough"]


def report_lines(report: dict) -> list[str]:
    """What follows the table: the p-value, localisation, infected fraction, ROC files."""
    lines = [f"p-value (accuracy, network vs non-parametric): "
             f"{report['p_value_accuracy_network_vs_nonparametric']:.3f}"]
    lines += small_sample_lines(report)
    for key in ("pointing_game", "dice"):
        if report.get(key) is not None:
            lines.append(f"{key.replace('_', ' ')}: {100 * report[key]:.1f}% "
                         f"({report['lesion_slices_scored']} lesion slices)")
        if key == "pointing_game" and report.get("pointing_game_flagged") is not None:
            lines.append(f"pointing game on the lesion slices the model flags: "
                         f"{100 * report['pointing_game_flagged']:.1f}% "
                         f"({report['lesion_slices_flagged']} slices)")
    if report.get("infected_fraction_mae") is not None:
        lines.append(f"infected fraction error (mean absolute): "
                     f"{100 * report['infected_fraction_mae']:.2f} percentage points")
    if report.get("slice_auc"):
        lines.append(f"slice-level AUC ({report['slices']} slices; no lesion counts as "
                     f"Healthy): " + ", ".join(f"{name} {_auc(auc)}"
                                               for name, auc in report["slice_auc"].items()))
    if report.get("lesion_type_auc"):
        lines.append("lesion-type AUC (slices): " + ", ".join(
            f"{name.replace('_', ' ')} {_auc(auc)}"
            for name, auc in report["lesion_type_auc"].items()))
    lines += [f"ROC curves: {path}" for path in report.get("roc_png", [])]
    if report.get("studies_kept_before"):
        lines.append(f"{report['studies_kept_before']} of {report['patients']} studies as "
                     f"evaluated before with this model, code and machine (kept in the "
                     f"cache; --no-cache analyses every study again)")
    if report.get("seconds_per_300_slices") is not None:
        lines.append(f"seconds per 300-slice study: {report['seconds_per_300_slices']:.1f}"
                     + (f" (timed on {report['timed_on']})" if report.get("timed_on") else ""))
    return lines


def _auc(auc) -> str:
    return "-" if auc is None or (isinstance(auc, float) and np.isnan(auc)) else f"{auc:.3f}"


def timing_lines(reports) -> list[str]:
    """A line for each machine the reports' seconds per study were timed on."""
    return [f"seconds per 300-slice study timed on {machine}" for machine in machines(reports)]


def machines(reports) -> list[str]:
    """The machines the reports were timed on (``timed_on``; reports before it have none)."""
    return sorted({r.get("timed_on") for r in reports} - {None})
