"""Switching adapters on one loaded base model (peft), shared by the bundled presets' evaluators."""

from typing import Callable, Optional, Protocol

from peft import PeftModel
from peft.tuners.lora import LoraLayer


class HoldsAdapters(Protocol):
    model: object  # the base model, wrapped in a PeftModel once an adapter is loaded
    loaded: dict[str, str]  # adapter folder -> peft adapter name


def activate_adapter(holder: HoldsAdapters, folder: str, scale: float = 1.0) -> None:
    """Load `folder` once (by path), make it the active adapter, with its update times `scale`."""
    folder = str(folder)
    if folder not in holder.loaded:
        name = f"adapter{len(holder.loaded)}_{abs(hash(folder))}"
        if isinstance(holder.model, PeftModel):
            holder.model.load_adapter(folder, adapter_name=name)
        else:
            holder.model = PeftModel.from_pretrained(holder.model, folder, adapter_name=name).eval()
        holder.loaded[folder] = name
    name = holder.loaded[folder]
    if getattr(holder, "_active", None) == (name, scale):
        return  # already active at that scale: skip peft's walks over every module
    holder.model.set_adapter(name)
    for module in holder.model.modules():
        if isinstance(module, LoraLayer) and name in module.scaling:
            module.set_scale(name, scale)  # scaling = scale * lora_alpha / r
    holder._active = (name, scale)


def forget_adapter(holder: HoldsAdapters, folder: str) -> None:
    """Unload an adapter that is no longer needed (a merged one after scoring)."""
    name = holder.loaded.pop(str(folder), None)
    if name is not None:
        holder.model.delete_adapter(name)
        holder._active = None  # peft may have switched to another adapter


def run_with_adapter(holder: HoldsAdapters, folder: Optional[str], scale: float, function: Callable):
    """`function(model)` with the base model alone (`folder` None) or with that adapter active at `scale`."""
    if folder is None:
        if not holder.loaded:
            return function(holder.model)
        with holder.model.disable_adapter():
            return function(holder.model)
    activate_adapter(holder, folder, scale)
    return function(holder.model)
