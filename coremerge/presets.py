"""Presets: adapter sets with their samples, as YAML data files in presets/ (PRODUCT.md, "Presets")."""

import hashlib
import json
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import CoreMergeError

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
    bundled: bool = False  # True: every file ships in the repo and works offline
    tokenizer: Optional[str] = None  # text: the adapters' tokenizer (Hub ID), if not the base model's
    folder: Path = Path(".")

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
