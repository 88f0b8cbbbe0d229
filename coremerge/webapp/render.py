"""The comparison and the merge report as HTML, Markdown and table rows for the app."""

import base64
import html
import io
from pathlib import Path
from typing import Sequence

from PIL import Image

from ..comparison.images import ImageGrid
from ..comparison.side_by_side import ClassificationComparison, TextComparison
from ..merging.methods import METHODS

# The table scrolls sideways inside its box on narrow screens (a phone's 430 px), its first column pinned.
STYLE = """<style>
.cm-scroll {overflow-x: auto; max-width: 100%;}
.cm-table {border-collapse: collapse; font-size: 0.85em; width: 100%;}
.cm-table tr > :first-child {position: sticky; left: 0; z-index: 1; background: var(--background-fill-primary, #fff);}
.cm-table tr > th:first-child {background: var(--background-fill-secondary, #f5f5f5);}
.cm-table tr > th[colspan]:first-child {position: static;}
.cm-table th, .cm-table td {border: 1px solid var(--border-color-primary, #ddd); padding: 3px 6px; text-align: center;
  vertical-align: middle;}
.cm-table th {background: var(--background-fill-secondary, #f5f5f5); font-weight: 600;}
.cm-table td.cm-text {text-align: left; white-space: pre-wrap; font-family: var(--font-mono, monospace);}
.cm-right {background: rgba(85, 168, 104, 0.22);}
.cm-wrong {background: rgba(196, 78, 82, 0.18);}
.cm-merged {font-weight: 700;}
.cm-own {font-weight: 700; outline: 2px solid rgba(85, 168, 104, 0.6); outline-offset: -2px;}
.cm-table img {width: 40px; height: 40px; image-rendering: pixelated;}
.cm-table img.cm-generated {width: auto; height: auto; max-width: 256px; image-rendering: auto;}
</style>"""


def _image_tag(path: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="sample">'


def _header(variants: list[str], first: list[str]) -> str:
    cells = [*first, *variants]
    return "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr>"


def _scrolling(rows: str) -> str:
    """The comparison table in its sideways-scrolling box."""
    return f'{STYLE}<div class="cm-scroll" id="cm-scroll"><table class="cm-table" id="cm-comparison">{rows}</table></div>'


def classification_html(comparison: ClassificationComparison) -> str:
    """One row per sample image, one column per variant; right labels green, wrong ones red."""
    rows = []
    right = [0] * len(comparison.variants)
    for image, predicted in zip(comparison.images, comparison.predictions):
        cells = [f"<td>{_image_tag(image.path)}</td>", f"<td>{html.escape(image.task)}</td>",
                 f"<td><b>{html.escape(image.label)}</b></td>"]
        for column, label in enumerate(predicted):
            ok = label == image.label
            right[column] += ok
            merged = " cm-merged" if column == len(predicted) - 1 else ""
            cells.append(f'<td class="{"cm-right" if ok else "cm-wrong"}{merged}">{html.escape(label)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    total = max(1, len(comparison.images))
    score = "".join(f"<th>{n}/{total}</th>" for n in right)
    return _scrolling(f"{_header(comparison.variants, ['image', 'task', 'label'])}{''.join(rows)}"
                      f'<tr><th colspan="3">right on these samples</th>{score}</tr>')


def text_html(comparison: TextComparison) -> str:
    """One row per prompt, one column per variant; with expected answers, an `expected` column, right answers
    green and wrong ones red, and each column's exact match on these prompts at the bottom."""
    scores = comparison.scores
    rows = []
    for p, (prompt, outputs) in enumerate(zip(comparison.prompts, comparison.outputs)):
        cells = [f'<td class="cm-text">{html.escape(prompt.rstrip(chr(10)))}</td>']
        if scores is not None:
            cells.append(f'<td class="cm-text"><b>{html.escape(comparison.expected[p] or "")}</b></td>')
        for v, output in enumerate(outputs):
            right = comparison.right(p, v)
            mark = "" if right is None else " cm-right" if right else " cm-wrong"
            symbol = "" if right is None else f' <span class="cm-mark">{"✓" if right else "✗"}</span>'
            cells.append(f'<td class="cm-text{mark}">{html.escape(output)}{symbol}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    first = ["prompt"] if scores is None else ["prompt", "expected"]
    footer = ""
    if scores is not None:
        footer = ('<tr><th colspan="2">exact match on these prompts</th>'
                  + "".join(f"<th>{score:.0%}</th>" for score in scores) + "</tr>")
    return (_scrolling(f"{_header(comparison.variants, first)}{''.join(rows)}{footer}")
            + cross_task_html(comparison))


CROSS_TASK_NOTE = ("Each column alone on every task's prompts (own task outlined). Why `questions` merges and "
                   "`strings` does not: the questions share one answer space (yes / no) over inputs no other task "
                   "uses, so off its own task an adapter still answers yes or no and the updates add up; the string "
                   "tasks rewrite the same lowercase words each in its own way (0 off its own task), and in a merge "
                   "the rewrites undo each other.")


def cross_task_html(comparison: TextComparison) -> str:
    """Exact match per (task of the prompts, column): the diagonal is each adapter on its own task, the rest
    what it does to the other tasks' prompts; empty without tasks."""
    by_task = comparison.by_task
    if not by_task:
        return ""
    rows = []
    for task, scores in by_task.items():
        cells = [f'<td class="cm-text">{html.escape(task)}</td>']
        for variant_task, score in zip(comparison.variant_tasks or [None] * len(scores), scores):
            own = " cm-own" if variant_task == task else ""
            cells.append(f'<td class="cm-text{own}">{score:.0%}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<p class="cm-note" id="cm-cross-task-note">{html.escape(CROSS_TASK_NOTE)}</p>'
            f'<table class="cm-table" id="cm-cross-task">'
            f"{_header(comparison.variants, ['exact match by task'])}{''.join(rows)}</table>")


THUMBNAIL = 256  # pixels, the longer side of a generated image on the page


def _png_tag(image: Image.Image, title: str) -> str:
    thumbnail = image.copy()
    thumbnail.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    thumbnail.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img class="cm-generated" src="data:image/png;base64,{data}" title="{html.escape(title)}" alt="generated">'


def image_grid_html(grid: ImageGrid) -> str:
    """One row per prompt, one column per variant (base, each LoRA, merged), the same seed across a row."""
    rows = []
    for p, prompt in enumerate(grid.prompts):
        used = grid.prompts_used[p] if grid.prompts_used else (prompt,) * len(grid.variants)
        cells = [f'<td class="cm-text">{html.escape(prompt)}</td>']
        cells += [f"<td>{_png_tag(image, text)}</td>" for image, text in zip(grid.images[p], used)]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return _scrolling(f"{_header(list(grid.variants), ['prompt'])}{''.join(rows)}")


def comparison_html(comparison, why_not: str = "") -> str:
    if comparison is None:
        return f'<p id="cm-no-comparison">{html.escape(why_not or NO_COMPARISON_YET)}</p>'
    if isinstance(comparison, ClassificationComparison):
        return classification_html(comparison)
    if isinstance(comparison, ImageGrid):
        return image_grid_html(comparison)
    return text_html(comparison)


NO_COMPARISON_YET = ("No side-by-side comparison for this preset yet: the merged adapter, its report and the download "
                     "are ready.")


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def report_markdown(report: dict, seconds: dict[str, float], names: list[str], cached: bool,
                    sources: Sequence[str] = ()) -> str:
    """The merge report: method, parameters, time per stage, sizes; `sources` as the user gave them
    (default: as resolved, e.g. absolute paths of a preset's files)."""
    shown = list(sources) or [s["source"] for s in report["sources"]]
    method = METHODS[report["method"]]
    params = ", ".join(f"{k} = {v:g}" for k, v in report["params"].items()) or "none"
    ranks = [m["output_rank"] for m in report["modules"].values() if m["output_rank"] > 0]
    stage = report["seconds"]
    lines = [
        f"**{method.display_name}** ([paper]({method.paper_url})) in **{report['space']} space**, "
        f"alpha {report['alpha']:g}, parameters: {params}, isotropize: {'yes' if report['isotropize'] else 'no'}, "
        f"rank: {report['rank'] or 'exact'}" + (" — *cached result: these inputs were merged before*" if cached else ""),
        "",
        f"Base model `{report['base_model']}` · {len(report['sources'])} adapters · {len(ranks)} modules · "
        f"output ranks {min(ranks)}–{max(ranks)}",
        "",
        "| stage | seconds |",
        "|---|---|",
        f"| loading adapters | {stage['loading']:.3f} |",
        f"| merging | {stage['merging']:.3f} |",
        f"| writing the adapter | {stage['writing']:.3f} |",
        f"| spectra and overlaps | {seconds.get('explain', 0):.3f} |",
        f"| side-by-side comparison | {seconds.get('compare', 0):.3f} |",
        f"| model card and zip | {seconds.get('package', 0):.3f} |",
        f"| **total** | **{seconds.get('total', stage['total']):.3f}** |",
        "",
        "| adapter | source | size |",
        "|---|---|---|",
        *[f"| {html.escape(name)} | `{source}` | {_megabytes(s['bytes'])} |"
          for name, source, s in zip(names, shown, report["sources"])],
        f"| **merged** | | **{_megabytes(report['bytes']['out'])}** |",
    ]
    return "\n".join(lines)


RANK_COLUMNS = ["module", "shape", "input ranks", "output rank"]


def rank_rows(report: dict, names: list[str]) -> list[list]:
    """Per module: its shape, each input adapter's rank there, and the merged rank."""
    by_source = {s["source"]: name for name, s in zip(names, report["sources"])}
    rows = []
    for module, info in report["modules"].items():
        inputs = ", ".join(f"{by_source.get(source, source)}: {r}" for source, r in info["input_ranks"].items())
        rows.append([module, " x ".join(map(str, info["shape"])), inputs, info["output_rank"]])
    return rows


def summary_markdown(report: dict, comparison, seconds: dict[str, float]) -> str:
    """One line on top of the results."""
    text = (f"Merged {len(report['sources'])} adapters with **{METHODS[report['method']].display_name}** in "
            f"{report['space']} space: {report['seconds']['loading'] + report['seconds']['merging']:.2f} s to merge, "
            f"{seconds.get('total', 0):.1f} s with the comparison.")
    if isinstance(comparison, ClassificationComparison) and comparison.accuracy:
        text += f" Average normalized accuracy of the merge: **{comparison.average_normalized:.1%}**."
    return text
