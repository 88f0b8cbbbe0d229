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


def comparison_device() -> str:
    """CUDA when present (on ZeroGPU, in the main process too: `spaces` reports it and defers the move), else CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def inference_dtype(device: str) -> torch.dtype:
    """Half precision on CUDA (bf16 where the GPU supports it), float32 on CPU."""
    if device != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class CausalLMRunner:
    """A Hub causal LM and its tokenizer; adapters are switched on it with peft, greedy generation.

    `tokenizer` is where the adapters' tokenizer lives when it is not the base model's: adapters trained with
    added tokens (ChatML) ship theirs, and the base model's embeddings are resized to it before any adapter loads,
    as peft's merging guide does for the TinyLlama task LoRAs.
    """

    def __init__(self, base_model: str, max_new_tokens: int = 64, tokenizer: Optional[str] = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = comparison_device()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or base_model)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=inference_dtype(self.device))
        if len(self.tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(self.tokenizer))  # rows for the added tokens (the adapters' own)
        self.model = model.to(self.device).eval()
        self.loaded: dict[str, str] = {}
        self.max_new_tokens = max_new_tokens
        # The base (and a merge, which carries LoRA tensors only) runs with the embedding rows of the tokenizer's
        # repo where it saved them, as the guide's model has them after loading that adapter.
        self.default_embeddings = saved_embeddings(tokenizer) if tokenizer else {}
        self.embeddings: dict[str, dict[str, torch.Tensor]] = {}

    def _use_embeddings(self, adapter: Optional[str]) -> None:
        """Each adapter with the embedding layers it saved (peft saves them when the vocabulary was resized)."""
        if adapter is not None and adapter not in self.embeddings:
            self.embeddings[adapter] = saved_embeddings(adapter)
        chosen = (self.embeddings.get(adapter) if adapter is not None else None) or self.default_embeddings
        layers = {"embed_tokens.weight": self.model.get_input_embeddings(),
                  "lm_head.weight": self.model.get_output_embeddings()}
        for suffix, layer in layers.items():
            weight = next((w for key, w in chosen.items() if key.endswith(suffix)), None)
            if weight is not None and weight.shape == layer.weight.shape:
                layer.weight.data.copy_(weight)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], adapter: Optional[str] = None) -> list[str]:
        batch = self.tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left").to(self.device)

        def run(model):
            output = model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                    pad_token_id=self.tokenizer.pad_token_id)
            return self.tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

        self._use_embeddings(adapter)
        if adapter is None:
            if not self.loaded:
                return run(self.model)
            with self.model.disable_adapter():
                return run(self.model)
        activate_adapter(self, adapter)
        return run(self.model)

    def forget(self, adapter: str) -> None:
        forget_adapter(self, adapter)


def saved_embeddings(source: str) -> dict[str, torch.Tensor]:
    """The full embedding layers (embed_tokens, lm_head) a peft adapter saved beside its LoRA tensors, if any."""
    from safetensors import safe_open

    from ..formats.sources import resolve_source

    try:
        weights = resolve_source(source).weights_path
    except CoreMergeError:  # not an adapter (a tokenizer repo, say): nothing saved
        return {}
    if weights.suffix != ".safetensors":
        return {}
    with safe_open(str(weights), "pt") as reader:
        return {key: reader.get_tensor(key) for key in reader.keys()
                if key.endswith(("embed_tokens.weight", "lm_head.weight"))}


class DiffusionRunner:
    """A diffusers text-to-image pipeline, loaded once; `coremerge.diffusion_compare` switches LoRAs on it."""

    def __init__(self, base_model: str):
        from diffusers import DiffusionPipeline

        self.device = comparison_device()
        self.pipe = DiffusionPipeline.from_pretrained(base_model, torch_dtype=inference_dtype(self.device))
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)


def build_runner(preset: Preset, max_new_tokens: int = LIMITS.new_tokens):
    """The comparison model of a preset: a diffusers pipeline, the bundled evaluators, a Hub causal LM
    (answers capped at `max_new_tokens`), or CLIP with zero-shot heads on the preset's Hub datasets."""
    if preset.kind == "image-generation":
        return DiffusionRunner(preset.base_model_path)
    if preset.bundled:
        from .evaluation import evaluator_for

        return evaluator_for(preset)
    if preset.kind == "text-generation":
        wanted = int(preset.samples.generation.get("max_new_tokens", 64))
        return CausalLMRunner(preset.base_model, min(wanted, max_new_tokens), preset.tokenizer)
    if preset.kind == "image-classification" and preset.samples.datasets:
        from .clip_zero_shot import ClipZeroShotRunner

        return ClipZeroShotRunner(preset.base_model, preset.samples.datasets)
    raise CoreMergeError(f"preset {preset.name}: side-by-side comparison of {preset.kind} Hub presets "
                         "needs sample datasets in the preset; the merge itself works")


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
