"""`coremerge merge ...` (or `python -m coremerge merge ...`): the command line."""

import argparse
import ctypes
import ctypes.util
import gc
import os
import sys
import textwrap
from typing import TYPE_CHECKING, NoReturn, Optional, Sequence

from tqdm.auto import tqdm

from .errors import CoreMergeError, describe_os_error, shown
from .merging.methods import METHODS
from .merging.options import DTYPES, SPACES, MergeOptions
from .merging.to_folder import merge_to_folder

if TYPE_CHECKING:
    from .presets import Preset

EXIT_BAD_INPUT = 2


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments give one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: {message}")


def fail(message: str) -> NoReturn:
    """One line on stderr (control characters in names escaped), exit code 2."""
    print(f"coremerge: error: {shown(message)}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def methods_help() -> str:
    lines = ["methods (--method):"]
    for method in METHODS.values():
        lines.append(f"  {method.name:<10} {method.display_name}: {method.summary}")
        for p in method.parameters:
            lines.append(f"{'':13}{p.flag} (default {p.default:g}): {p.help}")
        lines.append(f"{'':13}{method.paper_url}")
    return "\n".join(lines)


def method_parameter_flags() -> dict[str, object]:
    """Each registry parameter once, with its type and the methods that take it."""
    flags: dict[str, object] = {}
    for method in METHODS.values():
        for p in method.parameters:
            flags.setdefault(p.name, p)
    return flags


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="coremerge", description="Merge LoRA adapters of one base model in Core Space.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    merge = commands.add_parser(
        "merge",
        help="merge adapters into one LoRA adapter",
        description="Merge LoRA adapters (Hub IDs org/name[@rev][/subfolder], folders or .safetensors files) "
                    "into one peft LoRA adapter folder with a merge_report.json; Stable Diffusion LoRAs "
                    "(kohya / diffusers) into one diffusers pytorch_lora_weights.safetensors.",
        epilog=methods_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    merge.add_argument("sources", nargs="*", metavar="SOURCE", help="adapter: Hub ID, local folder or file")
    merge.add_argument("--preset", metavar="NAME",
                       help="merge a preset's adapters (with its weights) instead, with the preset's method and space "
                            "and the alpha and parameters it tuned for the method used, where no flag gives them")
    merge.add_argument("--output", required=True, metavar="DIR", help="folder to write the adapter to")
    merge.add_argument("--method", choices=list(METHODS), help="merge method (default tsv, or the preset's)")
    merge.add_argument("--space", choices=SPACES, help="merge space (default core, or the preset's)")
    merge.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per SOURCE (default 1)")
    merge.add_argument("--alpha", type=float,
                       help="global scale of the merged update (default 1, or the preset's tuned alpha for the method)")
    for name, p in method_parameter_flags().items():
        takers = ", ".join(m.name for m in METHODS.values() if any(q.name == name for q in m.parameters))
        defaults = " / ".join(dict.fromkeys(f"{q.default:g}" for m in METHODS.values() for q in m.parameters
                                            if q.name == name))
        merge.add_argument(p.flag, dest=name, type=p.kind, default=None,
                           help=textwrap.shorten(f"{takers}: {p.help} (default {defaults})", 200))
    merge.add_argument("--isotropize", action="store_true", help="isotropic flattening of the merged result")
    merge.add_argument("--rank", type=int, metavar="K", help="truncate the written adapter to rank K per module")
    merge.add_argument("--dtype", choices=DTYPES, help="dtype of the written adapter (default: the inputs')")
    merge.add_argument("--device", default="cpu", metavar="DEVICE",
                       help="where the merge computes, in float64 either way: cpu (default), cuda or cuda:N")
    return parser


def find_preset(name: str) -> "Preset":
    """The named preset (imported here: the preset schema's pydantic import is a tenth of a second that a merge of
    SOURCEs does not need)."""
    from .presets import find_preset as find

    return find(name)


def sources_and_weights(args: argparse.Namespace) -> tuple[list[str], Optional[list[float]]]:
    """The SOURCEs and --weights, or a preset's adapters and weights (--weights still wins)."""
    if args.preset is None:
        return args.sources, args.weights
    if args.sources:
        raise CoreMergeError("--preset: give either a preset or SOURCEs, not both")
    preset = find_preset(args.preset)
    return preset.adapter_sources, args.weights or [a.weight for a in preset.adapters]


def fill_merge_settings(args: argparse.Namespace) -> None:
    """--method, --space, --alpha and method parameters not given: with --preset, the preset's method and space
    and the settings tuned for the method used (its `tuned:` block; `Preset.settings_for`); else tsv, core, 1."""
    if args.preset is None:
        args.method, args.space = args.method or "tsv", args.space or "core"
        args.alpha = 1.0 if args.alpha is None else args.alpha
        return
    preset = find_preset(args.preset)
    args.method = args.method or preset.merge.method
    args.space = args.space or preset.merge.space
    settings = preset.settings_for(args.method, args.space)
    if args.alpha is None:
        args.alpha = settings.alpha
    for name, value in settings.params.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def options_from_args(args: argparse.Namespace, weights: Optional[list[float]]) -> MergeOptions:
    params = {name: getattr(args, name) for name in method_parameter_flags() if getattr(args, name) is not None}
    return MergeOptions.create(
        method=args.method, space=args.space, weights=weights, alpha=args.alpha,
        isotropize=args.isotropize, rank=args.rank, dtype=args.dtype, **params,
    )


def run_merge(args: argparse.Namespace) -> None:
    bar: Optional[tqdm] = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="merging", unit="module", file=sys.stderr, disable=None, leave=False)
        bar.update(done - bar.n)

    try:
        sources, weights = sources_and_weights(args)
        fill_merge_settings(args)
        report = merge_to_folder(sources, options_from_args(args, weights), args.output, progress, args.device)
    finally:
        if bar is not None:
            bar.close()
    ranks = [m["output_rank"] for m in report["modules"].values()]
    seconds = report["seconds"]
    print(
        f"merged {len(report['sources'])} adapter(s) with {args.method} in {args.space} space into "
        f"{shown(args.output)}: "
        f"{len(ranks)} modules, output ranks {min(ranks)}-{max(ranks)}, {report['bytes']['out'] / 1e6:.1f} MB, "
        f"{seconds['total']:.2f} s (loading {seconds['loading']:.2f}, merging {seconds['merging']:.2f}, "
        f"writing {seconds['writing']:.2f})"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "merge":
            run_merge(args)
    except CoreMergeError as error:
        fail(str(error))
    except OSError as error:  # a file system failure past the checks (disk full, a file removed meanwhile)
        where = f" {error.filename}" if error.filename else ""
        fail(f"cannot read or write{where} ({describe_os_error(error)})")
    except MemoryError:
        fail("out of memory; merge fewer or smaller adapters, or use --space core")
    return 0


# glibc's mallopt parameters: blocks up to this size come from the heap, and freed memory stays there
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_BLOCK_LIMIT = 256 * 2**20


def keep_freed_memory() -> None:
    """Let one process reuse the memory it frees instead of returning it to the system at once.

    A merge allocates and frees tens of megabytes per module (the float64 stacks, their products); by default
    glibc maps each such block afresh and unmaps it when freed, so every page of every block is faulted in and
    zeroed again. Kept in the heap, the blocks are reused. Only for the command line (the process exits after
    one merge); elsewhere, or without glibc, nothing changes.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return
    mallopt(M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT)
    mallopt(M_TRIM_THRESHOLD, 2 * HEAP_BLOCK_LIMIT)


def run() -> NoReturn:
    """The `coremerge` program: `main` in a process of its own."""
    keep_freed_memory()
    # What is imported by now lives until exit: frozen, it is not walked again by the garbage collector
    # during the merge.
    gc.freeze()
    try:
        code = main()
    except SystemExit as exit:  # argparse's --help and errors, `fail`
        if not isinstance(exit.code, (int, type(None))):
            raise
        code = exit.code or 0
    # Every file is written and closed by now: leave without tearing down the interpreter (torch's modules
    # and objects take a tenth of a second or more to dismantle, for nothing).
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said
            pass
    os._exit(code)
