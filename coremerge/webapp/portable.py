"""A merge report that travels: sources as the visitor gave them, never a path on the server."""

import copy
from pathlib import Path
from typing import Optional, Sequence

from ..formats.peft_export import write_report


def portable_report(report: dict, locations: Sequence[str], shown: Sequence[str],
                    revisions: Sequence[Optional[str]], folder: Optional[Path] = None) -> dict:
    """The report with each source's location replaced by the name the visitor gave (in `sources` and in every
    module's input ranks), Hub revisions recorded; rewritten as the folder's merge_report.json when given."""
    names = dict(zip(locations, shown))
    report = copy.deepcopy(report)
    for entry, name, revision in zip(report["sources"], shown, revisions):
        entry["source"] = name
        if revision is not None:
            entry["origin"], entry["revision"] = "hub", revision
    for module in report["modules"].values():
        module["input_ranks"] = {names.get(source, source): rank for source, rank in module["input_ranks"].items()}
    if folder is not None:
        write_report(Path(folder), report)
    return report
