"""Models side by side: one table like the papers', and whether their accuracies differ.

``lungsys evaluate --model A --model B ...`` evaluates each model on the same
studies (:func:`training.evaluate.evaluate`), then compares them here: a
column per model (its own patient-level method, the one its node would use),
a row per metric, and the paired bootstrap p-value of the difference in
accuracy for every pair of models (the same resampled patients score both).
A model's column header is its file name and version; the report of each is
kept whole beside the comparison (``--json``). :func:`comparison_markdown` lays
the same figures out as the papers do, a row per model, for a README.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

from inference.choices import PatientMethod
from inference.ladnn import LESION_TYPES
from inference.profiles import CLASSES
from training import metrics as M
from training.evaluate import (ERRORS, PER_CLASS, machines, percent, small_sample_lines,
                               timing_lines)

NETWORK = str(PatientMethod.network)

#: Rows of the table beyond the per-class ones: (report key, label, a share shown x100).
_ROWS = (("pointing_game", "pointing game", True),
         ("pointing_game_flagged", "pointing game, slices it flags", True), ("dice", "Dice", True),
         ("infected_fraction_mae", "infected-fraction error (points)", True),
         ("seconds_per_300_slices", "seconds per 300-slice study", False))


def _figure(value, share: bool = True) -> str:
    """A figure as both tables show it: a share x100 or a number, one decimal; - for none."""
    return "-" if value is None else f"{100 * value:.1f}" if share else f"{value:.1f}"


def _present_rows(reports) -> list[tuple[str, str, bool]]:
    """The rows of :data:`_ROWS` that at least one of the reports has a figure for."""
    return [row for row in _ROWS if any(r.get(row[0]) is not None for r in reports)]


#: What the Markdown table's error column counts (the rich table names each on its row).
LEGEND = ("FPE: the share of healthy patients called diseased; FNE: of diseased patients "
          "called healthy; FDPE: of diseased patients given the wrong disease.")

#: Lesion types as the Markdown table's header names them (the rich table names them whole).
_SHORT = {"ground_glass_opacity": "GGO", "interlobular_septal_thickening": "septal thickening"}


def compare(reports: list[dict], names: list[str], seed: int = 0,
            files: list[str] | None = None) -> dict:
    """The comparison of reports made on the same studies: each pair's p-value (accuracy).

    ``files``: each model's file name, by which the Markdown names the pairs where that
    tells the models apart (the column names otherwise)."""
    studies = reports[0]["studies"]
    for name, report in zip(names, reports):
        if report["studies"] != studies:
            raise ValueError(f"{name} was evaluated on other studies than {names[0]}")
    labels = reports[0]["labels"]
    p_values = [{"a": a, "b": b, "p_value_accuracy": M.bootstrap_p_value(
                    labels, reports[i]["predictions"][NETWORK],
                    reports[j]["predictions"][NETWORK], M.accuracy, seed=seed)}
                for (i, a), (j, b) in combinations(enumerate(names), 2)]
    return {"models": dict(zip(names, reports)), "pairs": p_values,
            "files": dict(zip(names, files or names)),
            "patients": len(labels), "split": reports[0]["split"]}


def model_name(path: str | Path, report: dict) -> str:
    """A column's header: the checkpoint's file name and the model's version."""
    return f"{Path(path).stem} ({report['model']['version']})"


def comparison_table(comparison: dict):
    """One rich Table: a column per model, a row per metric."""
    from rich.table import Table

    names = list(comparison["models"])
    table = Table(title=f"{comparison['patients']} {comparison['split']} patients, "
                        f"{len(names)} models (patient network)")
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    chosen = [r[NETWORK] for r in comparison["models"].values()]
    table.add_row("accuracy", *(percent(c["patient_accuracy"], c["patient_accuracy_ci95"])
                                for c in chosen))
    for key, label in ERRORS.items():
        table.add_row(label, *(percent(c[key], c[f"{key}_ci95"]) for c in chosen))
    for name in CLASSES:
        for key, label in PER_CLASS.items():
            table.add_row(f"{name} {label}",
                          *(percent(c["per_class"][name][key]) for c in chosen))
    typed = [r.get("lesion_type_auc") or {} for r in comparison["models"].values()]
    for name in LESION_TYPES if any(typed) else ():
        table.add_row(f"{name.replace('_', ' ')} AUC", *(_figure(t.get(name)) for t in typed))
    for key, label, share in _present_rows(comparison["models"].values()):
        table.add_row(label, *(_figure(r.get(key), share)
                               for r in comparison["models"].values()))
    return table


def comparison_markdown(comparison: dict) -> str:
    """The table in short, as Markdown (the README's), laid out as the papers lay theirs
    out: a row per model, a column per metric (the per-class figures and the three errors
    one column each, as A / B / C), then the p-value of every pair on one line (the pairs
    named by file name alone where that tells the models apart)."""
    reports = comparison["models"]
    typed = any(r.get("lesion_type_auc") for r in reports.values())
    rows = _present_rows(reports.values())
    columns = [f"model ({comparison['patients']} patients, split {comparison['split']})",
               "accuracy [95% CI]",
               "FPE / FNE / FDPE (%)",
               *(f"{label} {' / '.join(CLASSES)} (%)" for label in PER_CLASS.values()),
               *([f"lesion-type AUC {' / '.join(_SHORT.get(n, n) for n in LESION_TYPES)} (%)"
                  .replace("_", " ")] if typed else []),
               *(label + (" (%)" if share and "points" not in label else "")
                 for _, label, share in rows)]

    def shares(values) -> str:
        return " / ".join("-" if v != v else _figure(v) for v in values)   # NaN: -

    def cells(name: str, report: dict) -> list[str]:
        chosen = report[NETWORK]
        row = [name, percent(chosen["patient_accuracy"], chosen["patient_accuracy_ci95"]),
               shares(chosen[k] for k in ERRORS),
               *(shares(chosen["per_class"][c][k] for c in CLASSES) for k in PER_CLASS)]
        if typed:
            t = report.get("lesion_type_auc") or {}
            row.append(shares(t.get(n) for n in LESION_TYPES) if t else "-")
        return row + [_figure(report.get(key), share) for key, _, share in rows]

    lines = ["| " + " | ".join(columns) + " |",
             "| --- |" + " ---: |" * (len(columns) - 1),
             *("| " + " | ".join(cells(n, r)) + " |" for n, r in reports.items())]
    files = comparison.get("files") or {n: n for n in reports}
    short = files if len(set(files.values())) == len(files) else {n: n for n in reports}
    p_values = "; ".join(f"{short[p['a']]} vs {short[p['b']]} {p['p_value_accuracy']:.3f}"
                         for p in comparison["pairs"])
    timed_on = machines(reports.values())
    timed = f" Seconds timed on {'; '.join(timed_on)}." if timed_on else ""
    return "\n".join(lines + ["", f"{LEGEND} Bootstrap p-values of the accuracy "
                                   f"differences: {p_values}.{timed}", *small_sample_lines(
                                       next(iter(reports.values())))])


def comparison_lines(comparison: dict) -> list[str]:
    """What follows the table: the p-value of every pair, and a small sample's caution."""
    lines = [f"p-value (accuracy, {p['a']} vs {p['b']}): {p['p_value_accuracy']:.3f}"
             for p in comparison["pairs"]]
    reports = list(comparison["models"].values())
    return lines + small_sample_lines(reports[0]) + timing_lines(reports)
