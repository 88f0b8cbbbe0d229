"""Presets: adapter sets with their samples, as YAML data files in presets/ (PRODUCT.md, "Presets")."""

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import CoreMergeError
from .merging.methods import METHODS
from .merging.options import SPACES

# A checkout's presets/ folder; an installed package carries the same files as coremerge/presets_data.
PRESETS_DIR = next((folder for folder in (Path(__file__).resolve().parent / "presets_data",
                                          Path(__file__).resolve().parent.parent / "presets") if folder.is_dir()),
                   Path(__file__).resolve().parent.parent / "presets")
Kind = Literal["text-generation", "image-classification", "image-generation"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PresetAdapter(_Strict):
    """One adapter of a preset: a Hub ID or a path relative to the preset file."""

    name: str
    source: str
    weight: float = 1.0
    trigger: Optional[str] = None  # trigger words (image generation)
    task: Optional[str] = None  # the task it was trained for (bundled presets)


class SampleImage(_Strict):
    path: str  # relative to the preset file
    task: str
    label: str


class SampleDataset(_Strict):
    """Where a Hub preset's images for one task come from: a Hub dataset (`datasets.load_dataset` arguments)."""

    task: str
    source: str  # a Hub dataset ID, org/name
    subset: Optional[str] = None  # the dataset's configuration name, if it has several
    split: str = "test"


class Samples(_Strict):
    prompts: list[str] = Field(default_factory=list)
    images: list[SampleImage] = Field(default_factory=list)
    datasets: list[SampleDataset] = Field(default_factory=list)  # image classification on the Hub
    # Keyword arguments of the generating call plus a seed: text, transformers' generate()
    # (max_new_tokens, do_sample, repetition_penalty ...); images, the diffusers pipeline
    # (num_inference_steps, guidance_scale, width, height).
    generation: dict = Field(default_factory=dict)


class MergeDefaults(_Strict):
    """The merge settings the app starts from for this preset (e.g. an alpha chosen on a validation split)."""

    method: str = "tsv"
    space: Literal["core", "full", "knots"] = "core"
    alpha: float = 1.0


@dataclass(frozen=True)
class MethodSettings:
    """What a merge with one method uses for a preset: alpha and every parameter of the method."""

    alpha: float
    params: dict  # every parameter of the method: the tuned ones, the method's defaults for the rest
    tuned: bool  # True: chosen on the preset's validation split (its `tuned:` block)


def _check_values(where: str, method: str, settings: dict) -> None:
    """Each entry a number in its range: alpha > 0, or one of the method's parameters."""
    known = {p.name: p for p in METHODS[method].parameters}
    for name, value in settings.items():
        if name != "alpha" and name not in known:
            takes = ", ".join(["alpha", *known])
            raise ValueError(f"{where}.{name}: {method} does not take it (it takes {takes})")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}.{name}: {value!r} is not a number")
        parameter = known.get(name)
        low, high = (0.0, math.inf) if parameter is None else (parameter.low, parameter.high)
        low_exclusive = parameter is None or parameter.low_exclusive
        too_low = value <= low if low_exclusive else value < low
        if not math.isfinite(value) or too_low or value > high:
            bracket = "(" if low_exclusive else "["
            raise ValueError(f"{where}.{name}: {value} is out of range {bracket}{low:g}, {high:g}]")


def check_tuned(tuned: dict, merge: MergeDefaults) -> None:
    """Raises ValueError naming the first entry of a `tuned:` block that is not a method's alpha or parameter
    in range (or, under a space's name, such settings for that space), or a tuned alpha of the preset's own
    method that disagrees with `merge.alpha`."""
    for method, settings in tuned.items():
        if method not in METHODS:
            raise ValueError(f"tuned.{method}: unknown method; choose among {', '.join(METHODS)}")
        if not isinstance(settings, dict) or "alpha" not in settings:
            raise ValueError(f"tuned.{method}: give its alpha, as {{alpha: A, ...}}")
        by_space = {k: v for k, v in settings.items() if k in SPACES}
        _check_values(f"tuned.{method}", method, {k: v for k, v in settings.items() if k not in SPACES})
        for space, values in by_space.items():
            if not isinstance(values, dict):
                raise ValueError(f"tuned.{method}.{space}: give the settings that differ in {space} space, "
                                 "as {alpha: A, ...}")
            _check_values(f"tuned.{method}.{space}", method, values)
    own = tuned.get(merge.method)
    chosen = None if own is None else {**own, **own.get(merge.space, {})}
    if chosen is not None and chosen["alpha"] != merge.alpha:
        raise ValueError(f"tuned.{merge.method}.alpha {chosen['alpha']:g} differs from merge.alpha {merge.alpha:g} "
                         "(the preset's own choice); make them agree")


class Preset(_Strict):
    """A preset file's content; `folder` (not in the file) is where relative paths start."""

    name: str
    title: str
    description: str
    kind: Kind
    base_model: str  # a Hub ID or a path relative to the preset file
    adapters: list[PresetAdapter] = Field(min_length=1)
    samples: Samples = Field(default_factory=Samples)
    merge: MergeDefaults = Field(default_factory=MergeDefaults)
    # Per method, the settings chosen on the preset's validation split: alpha and any of the method's own
    # parameters (the rest keep the method's defaults), and under a space's name (core, full, knots) the ones
    # that space's search chose otherwise. A method not listed merges at its defaults, alpha 1.
    tuned: dict[str, dict] = Field(default_factory=dict)
    bundled: bool = False  # True: every file ships in the repo and works offline
    tokenizer: Optional[str] = None  # text: the adapters' tokenizer (Hub ID), if not the base model's
    folder: Path = Path(".")

    @model_validator(mode="after")
    def _tuned_settings_are_valid(self) -> "Preset":
        check_tuned(self.tuned, self.merge)
        return self

    def settings_for(self, method: str, space: Optional[str] = None) -> MethodSettings:
        """Alpha and parameters to merge this preset's adapters with `method` (in `space`; default the preset's):
        its tuned settings if the preset has them, else the preset's alpha for its own method (`merge:`), else
        alpha 1; parameters not tuned take the method's defaults."""
        entry = self.tuned.get(method, {})
        tuned = {k: v for k, v in entry.items() if k not in SPACES}
        tuned.update(entry.get(space or self.merge.space, {}))
        alpha = tuned.pop("alpha", self.merge.alpha if method == self.merge.method else 1.0)
        params = {**METHODS[method].defaults(), **tuned}
        return MethodSettings(float(alpha), params, method in self.tuned)

    def resolve(self, source: str) -> str:
        """A local path (relative to the preset file) if it exists there, else the Hub ID as given."""
        local = self.folder / source
        return str(local) if local.exists() else source

    @property
    def adapter_sources(self) -> list[str]:
        return [self.resolve(a.source) for a in self.adapters]

    @property
    def base_model_path(self) -> str:
        return self.resolve(self.base_model)


def load_preset(path: Path) -> Preset:
    """Read and validate one preset file.

    Raises:
        CoreMergeError: the file is missing, not YAML, or does not follow the preset schema.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as error:
        raise CoreMergeError(f"preset {path}: no such file") from error
    except yaml.YAMLError as error:
        raise CoreMergeError(f"preset {path}: not valid YAML ({error})") from error
    if not isinstance(data, dict):
        raise CoreMergeError(f"preset {path}: expected a mapping at the top level")
    try:
        return Preset(**data, folder=path.parent.resolve())
    except ValidationError as error:
        first = error.errors()[0]
        if first["type"] == "value_error" and not first["loc"]:  # a check of the whole preset: says where itself
            raise CoreMergeError(f"preset {path}: {first['ctx']['error']}") from error
        where = ".".join(str(p) for p in first["loc"])
        raise CoreMergeError(f"preset {path}: {where}: {first['msg']}") from error


def list_presets(folder: Path = PRESETS_DIR) -> list[Preset]:
    """Every preset in `folder`, bundled (offline) ones first, then by name."""
    presets = [load_preset(p) for p in sorted(folder.glob("*.yaml"))]
    return sorted(presets, key=lambda p: (not p.bundled, p.name))


def find_preset(name: str, folder: Path = PRESETS_DIR) -> Preset:
    for preset in list_presets(folder):
        if preset.name == name:
            return preset
    names = ", ".join(p.name for p in list_presets(folder))
    raise CoreMergeError(f"--preset {name}: no such preset; choose one of {names}")


MANIFEST_NAME = "manifest.json"


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (but the manifest), by path relative to it."""
    folder = Path(folder)
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }


def write_manifest(folder: Path) -> None:
    (Path(folder) / MANIFEST_NAME).write_text(json.dumps(file_digests(folder), indent=1) + "\n")


def check_manifest(folder: Path) -> None:
    """Raises CoreMergeError naming the first file that is missing, extra or changed."""
    expected = json.loads((Path(folder) / MANIFEST_NAME).read_text())
    actual = file_digests(folder)
    for name in sorted(set(expected) | set(actual)):
        if expected.get(name) != actual.get(name):
            state = "missing" if name not in actual else "not in the manifest" if name not in expected else "changed"
            raise CoreMergeError(f"preset files in {folder}: {name} is {state}")
