"""Any source (Hub ID, folder or file) to a canonical adapter, and the checks that a set can be merged."""

from pathlib import Path
from typing import Sequence

from ..errors import AdapterFormatError, describe_os_error
from .adapter import Adapter
from .checks import check_module_shapes, check_same_base_model, check_same_family, check_sources
from .diffusion_format import is_diffusion_lora, load_diffusion_adapter
from .peft_format import load_peft_adapter
from .sources import resolve_source
from .transformer_format import is_transformer_lora, load_transformer_adapter


def load_adapter(source: str) -> Adapter:
    """Resolve a source (Hub ID, folder or file) and read its config and tensor index.

    Diffusion LoRAs (Flux.1 and SD3 transformers in any layout diffusers loads; Stable Diffusion kohya /
    diffusers files, peft folders of a UNet or transformer) get component-prefixed module names and a
    `family`; every other adapter is read as a peft LoRA.
    """
    try:
        resolved = resolve_source(source)
        for path in (resolved.weights_path, resolved.config_path):
            if path is not None:
                with open(path, "rb"):  # an unreadable file is named as such, not as missing or malformed
                    pass
    except OSError as error:
        what = Path(error.filename).name if error.filename else "it"
        raise AdapterFormatError(f"{source}: cannot read {what} ({describe_os_error(error)})") from error
    if is_transformer_lora(resolved):
        return load_transformer_adapter(resolved)
    return load_diffusion_adapter(resolved) if is_diffusion_lora(resolved) else load_peft_adapter(resolved)


def load_adapters(sources: Sequence[str]) -> list[Adapter]:
    """Load every source and check that they can be merged together."""
    check_sources(sources)
    adapters = [load_adapter(source) for source in sources]
    check_same_base_model(adapters)
    check_same_family(adapters)
    check_module_shapes(adapters)
    return adapters
