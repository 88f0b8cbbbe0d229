"""A merged adapter ready to share: a model card, a "use it in code" snippet, and a zip of the folder."""

import shutil
from pathlib import Path
from string import Template
from typing import Optional, Sequence

from ..merging.methods import METHODS

TEMPLATES = Path(__file__).resolve().parent / "templates"
CARD_NAME = "README.md"
MODEL_CLASSES = {
    "text-generation": "AutoModelForCausalLM",
    "image-classification": "AutoModel",  # the bundled ViT backbone; task heads stay with each adapter
}


def _template(name: str) -> Template:
    return Template((TEMPLATES / name).read_text())


def code_snippet(report: dict, adapter: str, kind: Optional[str] = None, base_path: Optional[str] = None) -> str:
    """Python that loads the merged adapter onto its base model: peft, or diffusers for diffusion LoRAs."""
    base = base_path or report["base_model"]
    if report.get("output_format") == "diffusers":
        return _template("snippet_diffusers.txt").substitute(base_path=base, adapter=adapter,
                                                             weight_name=report["file"]).strip()
    return _template("snippet_peft.txt").substitute(
        model_class=MODEL_CLASSES.get(kind or "", "AutoModel"), base_path=base, adapter=adapter,
    ).strip()


def model_card(report: dict, names: Sequence[str], title: str, snippet: str) -> str:
    """The merged adapter's README.md: sources, method, parameters, ranks, time, how to load it."""
    method = METHODS[report["method"]]
    ranks = [m["output_rank"] for m in report["modules"].values() if m["output_rank"] > 0]
    rows = [
        f"| {name} | `{s['source']}` | {s['revision'] or '-'} | {weight:g} |"
        for name, s, weight in zip(names, report["sources"], report["weights"])
    ]
    seconds = report["seconds"]
    return _template("model_card.md").substitute(
        title=title,
        library_name="diffusers" if report.get("output_format") == "diffusers" else "peft",
        base_model=report["base_model"] or report.get("family") or "unknown",
        n_sources=len(report["sources"]),
        method=method.name,
        method_display=method.display_name,
        paper_url=method.paper_url,
        space=report["space"],
        alpha=f"{report['alpha']:g}",
        parameters=", ".join(f"{k}={v:g}" for k, v in report["params"].items()) or "none",
        isotropize="yes" if report["isotropize"] else "no",
        rank=report["rank"] or "exact (numerical rank per module)",
        n_modules=len(ranks),
        min_rank=min(ranks),
        max_rank=max(ranks),
        seconds=seconds["total"],
        loading=seconds["loading"],
        merging=seconds["merging"],
        writing=seconds["writing"],
        bytes_in=report["bytes"]["in"],
        bytes_out=report["bytes"]["out"],
        sources_table="\n".join(rows),
        snippet=snippet,
    )


def write_model_card(folder: Path, card: str) -> None:
    (Path(folder) / CARD_NAME).write_text(card)


def zip_folder(folder: Path, destination: Path) -> Path:
    """`destination`.zip holding the folder itself (the name the snippet loads); returns the zip's path."""
    folder = Path(folder)
    return Path(shutil.make_archive(str(Path(destination).with_suffix("")), "zip", root_dir=folder.parent,
                                    base_dir=folder.name))
