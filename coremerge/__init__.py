"""coremerge: merge LoRA adapters of one base model in Core Space (Panariello et al., NeurIPS 2025)."""

from .errors import AdapterFormatError, CoreMergeError, HubError, IncompatibleAdaptersError  # noqa: E402
from .formats.diffusion_family import is_diffusion_set  # noqa: E402
from .formats.loading import load_adapter, load_adapters  # noqa: E402
from .merging.merge import merge_adapters  # noqa: E402
from .merging.methods import METHODS  # noqa: E402
from .merging.options import MergeOptions  # noqa: E402
from .merging.spaces import SPACE_MERGES, TaskFactors, merge_module, to_lora  # noqa: E402
from .merging.to_folder import merge_to_folder  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = [
    "AdapterFormatError", "CoreMergeError", "HubError", "IncompatibleAdaptersError", "METHODS", "MergeOptions",
    "is_diffusion_set",
    "SPACE_MERGES", "TaskFactors", "load_adapter", "load_adapters", "merge_adapters", "merge_module",
    "merge_to_folder", "to_lora",
]
