"""A merged adapter ready to share: a model card, a "use it in code" snippet, and a zip of the folder."""

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Optional, Sequence

from ..bundled.digits import HEAD_NAME
from ..merging.methods import METHODS
from ..presets import Preset

TEMPLATES = Path(__file__).resolve().parent / "templates"
CARD_NAME = "README.md"
MODEL_CLASSES = {
    "text-generation": "AutoModelForCausalLM",
    "image-classification": "AutoModel",  # the bundled ViT backbone; task heads stay with each adapter
}


TASK_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
                "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "TOKEN_CLS": "AutoModelForTokenClassification"}


@dataclass(frozen=True)
class BaseModel:
    """Where the merged adapter's base model comes from, as a download's card and snippet say it."""

    name: Optional[str]  # as the adapters' configs name it
    hub_id: Optional[str] = None  # a Hub ID to load it from; None for a bundled preset's base
    folder: Optional[str] = None  # a bundled preset's base: its folder in coremerge's repository
    needs: tuple[str, ...] = field(default=())  # other files a user needs (task heads, the tokenizer)

    @property
    def load_from(self) -> str:
        return self.folder or self.hub_id or self.name or "BASE_MODEL"


def base_model_of(preset: Preset, report: dict, on_preset_model: bool) -> BaseModel:
    """The base of a merge of `preset`'s model (`on_preset_model`) or of another one, named by the adapters."""
    name = report.get("base_model")
    if not on_preset_model or not preset.bundled:  # the adapters' own name first: a Hub preset's base is a Hub ID
        return BaseModel(name, hub_id=name or (preset.base_model if on_preset_model else None))
    return BaseModel(name, folder=_folder(preset), needs=tuple(_bundled_needs(preset)))


def _folder(preset: Preset) -> str:
    """A bundled preset's base model folder, as a path from coremerge's repository root."""
    return f"presets/{preset.base_model}"


def _bundled_needs(preset: Preset) -> list[str]:
    """What else a bundled preset's base needs to be useful: each task's head, or the tokenizer."""
    heads = [a for a in preset.adapters if (preset.folder / a.source / HEAD_NAME).exists()]
    if heads:
        tasks = ", ".join(a.task or a.name for a in heads)
        return [f"each task's classification head, `presets/{heads[0].source.rsplit('/', 1)[0]}/<task>/{HEAD_NAME}` "
                f"({tasks}; `coremerge.bundled.digits.load_head` loads one): the merge changes the shared backbone "
                "only, and each task reads its labels through its own head"]
    if preset.kind == "text-generation":
        base = preset.folder / preset.base_model
        if (base / "tokenizer.json").exists():
            return [f"the tokenizer, in the same folder (`AutoTokenizer.from_pretrained(\"{_folder(preset)}\")`)"]
        return ["the tokenizer, which has no files: the model reads bytes as tokens, and "
                "`coremerge.bundled.strings.tokenizer()` builds it (transformers' `ByT5Tokenizer(extra_ids=0)`)"]
    return []


def base_model_section(base: BaseModel) -> str:
    """The card's "Base model" paragraph."""
    if base.folder:
        needs = "".join(f"\n- {need}" for need in base.needs)
        return (f"The base model is not on the Hugging Face Hub: it ships with coremerge, in the folder "
                f"`{base.folder}` of the coremerge repository (the adapters' configs call it `{base.name}`, a name "
                "only). Run the code below from the repository's root, with the unzipped `merged-adapter` folder "
                "there." + (f" You also need:\n{needs}" if needs else ""))
    if base.hub_id:
        return f"[`{base.hub_id}`](https://huggingface.co/{base.hub_id}) on the Hugging Face Hub."
    return "The adapters do not name their base model: load the merged adapter onto the model they were trained on."


def _template(name: str) -> Template:
    return Template((TEMPLATES / name).read_text())


def code_snippet(report: dict, adapter: str, kind: Optional[str] = None, base_path: Optional[str] = None,
                 task_type: Optional[str] = None) -> str:
    """Python that loads the merged adapter onto its base model: peft, or diffusers for diffusion LoRAs. The model
    class follows the preset's `kind`, else the adapter's peft `task_type`."""
    base = base_path or report["base_model"]
    if report.get("output_format") == "diffusers":
        return _template("snippet_diffusers.txt").substitute(base_path=base, adapter=adapter,
                                                             weight_name=report["file"]).strip()
    model_class = MODEL_CLASSES.get(kind or "") or TASK_CLASSES.get(task_type or "", "AutoModel")
    return _template("snippet_peft.txt").substitute(model_class=model_class, base_path=base, adapter=adapter).strip()


def model_card(report: dict, names: Sequence[str], title: str, snippet: str, base: Optional[BaseModel] = None) -> str:
    """The merged adapter's README.md: base model, sources, method, parameters, ranks, time, how to load it.
    `base_model` in its metadata is a Hub ID or left out (a bundled preset's base is not on the Hub)."""
    name = report["base_model"] or report.get("family")
    base = base or BaseModel(name, hub_id=report["base_model"])
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
        base_model_line=f"base_model: {base.hub_id}\n" if base.hub_id else "",
        base_model=name or "unknown",
        base_section=base_model_section(base),
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
