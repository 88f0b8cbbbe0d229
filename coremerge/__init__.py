"""coremerge: merge LoRA adapters of one base model in Core Space (Panariello et al., NeurIPS 2025)."""

__version__ = "0.1.0"

from .diffusion_family import is_diffusion_set  # noqa: E402
from .errors import AdapterFormatError, CoreMergeError, HubError, IncompatibleAdaptersError  # noqa: E402
from .merge import load_adapter, load_adapters, merge_adapters  # noqa: E402
from .methods import METHODS  # noqa: E402
from .options import MergeOptions  # noqa: E402
from .pipeline import merge_to_folder  # noqa: E402
from .spaces import SPACE_MERGES, TaskFactors, merge_module, to_lora  # noqa: E402

__all__ = [
    "AdapterFormatError", "CoreMergeError", "HubError", "IncompatibleAdaptersError", "METHODS", "MergeOptions",
    "is_diffusion_set",
    "SPACE_MERGES", "TaskFactors", "load_adapter", "load_adapters", "merge_adapters", "merge_module",
    "merge_to_folder", "to_lora",
]
