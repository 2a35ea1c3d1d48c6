"""``lungsys rules test``: what the node would do with a study, and why, before it is sent.

For a folder holding a study (its series in any layout), prints each series with
what the choice rule reads (slices, thickness, kernel), whether it would be
analysed (study mode: the one chosen; series mode: every eligible one) or
skipped and why, and the priority the ``[[priorities]]`` rules would give its job.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lungsys.common import CLIError, out
from lungsys.node import ConfigOption

rules_app = typer.Typer(help="Test the node's series choice and priority rules on a study.",
                        no_args_is_help=True)


@rules_app.command("test")
def rules_test(
    study: Annotated[Path, typer.Argument(help="A folder with the study's DICOM files.")],
    config_file: ConfigOption = None,
    calling_aet: Annotated[str, typer.Option("--calling-aet", help="As if sent by this AE "
                                             "title (for the priority rules).")] = "",
    json_: Annotated[bool, typer.Option("--json", help="One JSON array.")] = False,
) -> None:
    """Show which series would be analysed, which skipped and why, and their priority."""
    from config import AssemblyTrigger, load_config
    from inference.series import scan
    from pacs_node.choice import candidate, choose
    from pacs_node.priority import priority_of

    if not study.is_dir():
        raise CLIError(f"{study}: not a folder")
    config = load_config(config_file)
    groups, _ = scan(study)
    if not groups:
        raise CLIError(f"{study}: no CT image series in it")
    min_slices = config.assembly.min_slices
    candidates = [candidate(uid, uid, [str(p) for p, _ in members], min_slices)
                  for uid, members in sorted(groups.items(), key=lambda kv: str(kv[1][0][0]))]
    if config.assembly.trigger == AssemblyTrigger.study:
        chosen, others = choose(candidates)
        verdicts = {c.series_instance_uid: ("analysed", "the rule's choice") for c in
                    ([chosen] if chosen else [])}
        verdicts.update({c.series_instance_uid: ("skipped", why) for c, why in others})
    else:
        verdicts = {c.series_instance_uid: ("skipped", c.reason) if c.reason else
                    ("analysed", "eligible") for c in candidates}
    rows = []
    for c in candidates:
        first = str(groups[c.series_instance_uid][0][0])
        header = groups[c.series_instance_uid][0][1]
        verdict, why = verdicts[c.series_instance_uid]
        rows.append({"series_instance_uid": c.series_instance_uid,
                     "description": str(header.get("SeriesDescription", "")),
                     "slices": c.slices, "thickness_mm": c.thickness, "kernel": c.kernel,
                     "lung_kernel": c.lung_kernel, "verdict": verdict, "why": why,
                     "priority": str(priority_of(config.priorities, calling_aet, first))
                     if verdict == "analysed" else ""})
    if json_:
        print(json.dumps(rows, indent=1))
        return
    out.print(f"mode: {config.assembly.trigger} (min_slices {min_slices})")
    table = Table("series", "description", "slices", "thickness", "kernel", "verdict",
                  "priority", "why", box=None)
    for r in rows:
        table.add_row("…" + r["series_instance_uid"][-20:], r["description"][:24],
                      str(r["slices"]), f"{r['thickness_mm']:g} mm" if r["thickness_mm"]
                      is not None else "?", r["kernel"] or "?", r["verdict"], r["priority"],
                      r["why"])
    out.print(table)


GROUPS = [("rules", rules_app)]
