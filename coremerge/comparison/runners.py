"""The model a preset's comparison runs on, loaded once per preset and kept (the app's "models load once")."""

import threading
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..bundled.switching import activate_adapter, forget_adapter
from ..errors import CoreMergeError
from ..presets import Preset, find_preset
from .limits import LIMITS


class CausalLMRunner:
    """A Hub causal LM and its tokenizer; adapters are switched on it with peft, greedy generation."""

    def __init__(self, base_model: str, max_new_tokens: int = 64):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(base_model)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(base_model).to(self.device).eval()
        self.loaded: dict[str, str] = {}
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], adapter: Optional[str] = None) -> list[str]:
        batch = self.tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left").to(self.device)

        def run(model):
            output = model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                    pad_token_id=self.tokenizer.pad_token_id)
            return self.tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

        if adapter is None:
            if not self.loaded:
                return run(self.model)
            with self.model.disable_adapter():
                return run(self.model)
        activate_adapter(self, adapter)
        return run(self.model)

    def forget(self, adapter: str) -> None:
        forget_adapter(self, adapter)


class DiffusionRunner:
    """A diffusers text-to-image pipeline, loaded once; `coremerge.diffusion_compare` switches LoRAs on it."""

    def __init__(self, base_model: str):
        from diffusers import DiffusionPipeline

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.pipe = DiffusionPipeline.from_pretrained(base_model, torch_dtype=dtype).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)


def build_runner(preset: Preset, max_new_tokens: int = LIMITS.new_tokens):
    """The comparison model of a preset: a diffusers pipeline, the bundled evaluators, or a Hub causal LM
    (answers capped at `max_new_tokens`)."""
    if preset.kind == "image-generation":
        return DiffusionRunner(preset.base_model_path)
    if preset.bundled:
        from .evaluation import evaluator_for

        return evaluator_for(preset)
    if preset.kind == "text-generation":
        wanted = int(preset.samples.generation.get("max_new_tokens", 64))
        return CausalLMRunner(preset.base_model, min(wanted, max_new_tokens))
    raise CoreMergeError(f"preset {preset.name}: side-by-side comparison of {preset.kind} Hub presets "
                         "is not available yet; the merge itself works")


@lru_cache(maxsize=4)
def runner_for(preset_name: str, presets_folder: Optional[Path] = None):
    """The preset's runner, built on first use and kept; one comparison at a time uses it."""
    preset = find_preset(preset_name) if presets_folder is None else find_preset(preset_name, presets_folder)
    return build_runner(preset)


def parameter_count(runner) -> int:
    """Parameters of the model a runner runs (a pipeline's denoiser), for the GPU time a comparison needs."""
    pipe = getattr(runner, "pipe", None)
    model = getattr(runner, "model", None)
    for name in ("unet", "transformer"):
        if getattr(pipe, name, None) is not None:
            model = getattr(pipe, name)
    return sum(p.numel() for p in model.parameters()) if isinstance(model, torch.nn.Module) else 0


RUNNER_LOCK = threading.Lock()  # adapters are switched in place on the shared model
