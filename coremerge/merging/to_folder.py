"""Sources in, merged adapter out (a peft folder, or a diffusers file for SD LoRAs): `coremerge merge` in one call."""

import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..errors import CoreMergeError, shown
from ..formats.adapter import MergedModule
from ..formats.checks import check_same_base_model, check_sources, duplicate_adapter_warnings
from ..formats.diffusion_export import diffusers_tensors, write_diffusers_file
from ..formats.diffusion_family import is_diffusion_set, shared_family
from ..formats.loading import load_adapters
from ..formats.output_folder import WEIGHTS_NAME, atomic_folder, check_output_location
from ..formats.peft_export import output_dtype, peft_config, peft_tensors, write_peft_folder, write_report
from ..version import __version__
from .merge import Timings, check_device, merge_adapters
from .methods import METHODS
from .options import MergeOptions


def merge_to_folder(
    sources: Sequence[str],
    options: MergeOptions,
    output: Path,
    progress: Optional[Callable[[int, int], None]] = None,
    device: str = "cpu",
) -> dict:
    """Merge the sources' adapters and write them with a merge report: a peft folder, or for Stable
    Diffusion LoRAs one diffusers-format `pytorch_lora_weights.safetensors` that `load_lora_weights` loads.
    `device` ("cpu" or "cuda") is where the merge computes, in float64 either way.

    Returns:
        The merge report (also written as merge_report.json).
    Raises:
        CoreMergeError: any bad input; nothing is left in `output` then.
    """
    started = time.perf_counter()
    check_sources(sources)
    options.weights_for(len(sources))
    check_device(device)
    check_output_location(output, sources)  # before any adapter is read
    output = Path(output)
    warnings = single_adapter_warnings(sources, options)
    timings = Timings()
    clock = time.perf_counter()
    adapters = load_adapters(sources)
    base_model = check_same_base_model(adapters)
    warnings += duplicate_adapter_warnings(adapters)
    warnings += [f"{a.source}: ignored {len(a.ignored_keys)} non-LoRA tensor(s) such as {a.ignored_keys[0]} "
                 "(modules_to_save and similar are not merged)" for a in adapters if a.ignored_keys]
    timings.loading += time.perf_counter() - clock
    dtype = output_dtype(adapters, options.dtype)
    diffusion = is_diffusion_set(adapters)
    to_tensors = diffusers_tensors if diffusion else peft_tensors

    tensors, module_reports, zero_modules = {}, {}, []
    factor_dtype = torch.float32 if dtype.itemsize < 4 else torch.float64

    def export(module: MergedModule) -> Optional[dict[str, torch.Tensor]]:
        """The module's tensors as written, made in the merge worker (it overlaps the other modules' merging)."""
        return to_tensors(module, dtype) if module.rank else None

    for module in merge_adapters(adapters, options, timings, progress, factor_dtype, device=device, export=export):
        module_reports[module.name] = {
            "kind": module.template.kind,
            "shape": list(module.template.shape),
            "input_ranks": {adapters[i].source: r for i, r in module.input_ranks.items()},
            "output_rank": module.rank,
        }
        if module.rank == 0:
            zero_modules.append(module.name)
            continue
        tensors.update(module.exported)
    ranks = {name: r["output_rank"] for name, r in module_reports.items() if r["output_rank"] > 0}
    if not ranks:
        raise CoreMergeError("the merged update is zero in every module (do the weights cancel?); nothing to write")

    clock = time.perf_counter()
    with atomic_folder(output, sources) as staging:
        report = {
            "coremerge_version": __version__,
            "base_model": base_model,
            "family": shared_family(adapters),
            "output_format": "diffusers" if diffusion else "peft",
            "sources": [
                {"source": a.source, "origin": a.origin, "revision": a.revision, "format": a.format,
                 "file": a.weights_path.name, "dtype": str(a.dtype).removeprefix("torch."), "bytes": a.nbytes,
                 "modules": len(a.modules), "ignored_tensors": list(a.ignored_keys)}
                for a in adapters
            ],
            **options.as_dict(),
            "weights": list(options.weights_for(len(adapters))),
            "output_dtype": str(dtype).removeprefix("torch."),
            "modules": module_reports,
            "zero_modules": zero_modules,
            "warnings": warnings,
        }
        if diffusion:
            weights_path = write_diffusers_file(staging, tensors, ranks, adapters[0])
        else:
            write_peft_folder(staging, tensors, peft_config(ranks, base_model, adapters[0]))
            weights_path = staging / WEIGHTS_NAME
        timings.writing += time.perf_counter() - clock
        report["seconds"] = {
            "loading": round(timings.loading, 4),
            "merging": round(timings.merging, 4),
            "writing": round(timings.writing, 4),
            "total": round(time.perf_counter() - started, 4),
        }
        report["bytes"] = {"in": sum(a.nbytes for a in adapters), "out": weights_path.stat().st_size}
        report["file"] = weights_path.name
        write_report(staging, report)
    for warning in warnings:  # after success only: a failure is reported as its one line
        print(f"coremerge: warning: {shown(warning)}", file=sys.stderr)
    return report


def single_adapter_warnings(sources: Sequence[str], options: MergeOptions) -> list[str]:
    """One adapter alone is returned unchanged by ta, tsv and cart, but changed by trimming, dropping or
    flattening; say so, since the user probably expected a copy."""
    if len(sources) != 1 or options.params.get("density") == 1:
        return []
    changes = [f"--method {options.method}"] if METHODS[options.method].changes_single else []
    changes += ["--isotropize"] if options.isotropize else []
    if not changes:
        return []
    return [f"{sources[0]} is merged alone, and {' with '.join(changes)} changes it (it trims, drops or flattens "
            "the update); use --method ta to keep it as it is"]
