"""Benchmark: merging 8 rank-16 Llama-3-8B LoRA adapters with coremerge (TSV in core space).

What it measures (on synthetic adapters, no base model needed):

1. The `coremerge merge` CLI end to end in a subprocess, `--repeats` times, each beside the floor for
   the same bytes (`measure.py`: start Python, import torch, read the inputs, write a file of the
   output's size, nothing else): wall and CPU time with the load average, the breakdown (start-up and
   imports, reading, merging, writing), the ratio to the floor, peak RSS.
   Targets: <= 5 s, <= 2.5x the floor and <= 1.5 GB peak RSS for 8 adapters x 32 layers x 7 modules.
2. One 4096 x 4096 module (layer 0 q_proj) merged from the same adapters three ways:
   coremerge in core space, coremerge in full space (8 SVDs of 4096 x 4096), and peft's
   `add_weighted_adapter(combination_type="svd")` (dense task arithmetic + one SVD).
   Target: core space >= 100x faster than both.
3. With --scaling instead: the CLI on 2, 8 and 32 adapters of rank 16 and on 8 adapters of ranks
   8, 16, 64 and 128 (time, peak memory, expected growth beside the measured one), then one square
   module merged in core and in full space for growing R, to find where core space stops being faster.

Usage:
    python benchmarks/bench_merge.py [--workdir DIR] [--adapters 8] [--layers 32] [--repeats 3] [--keep]
                                     [--cli-only]
    python benchmarks/bench_merge.py --scaling [--scaling-layers 2] [--crossover-size 4096] [--plot PNG]
    python benchmarks/bench_merge.py --scaling --crossover-only [--crossover-size 4096]

The adapters are written to DIR (default: a new temporary folder under /tmp; adapters already in DIR
are reused) and removed at the end unless --keep. The output is plain text lines that the README quotes.
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout, without installing coremerge

from coremerge.merging.options import MergeOptions  # noqa: E402
from measure import load, met, print_floor_comparison, run_floor, run_measured  # noqa: E402
from coremerge.merging.spaces import TaskFactors, merge_module, to_lora  # noqa: E402

BASE_MODEL = "meta-llama/Meta-Llama-3-8B"
RANK, LORA_ALPHA = 16, 32
SCALING = LORA_ALPHA / RANK  # alpha = 2 r in every adapter written here
# Llama-3-8B linear layers: module path in a decoder layer -> (out_features, in_features)
LLAMA3_8B_MODULES = {
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (1024, 4096),
    "self_attn.v_proj": (1024, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (14336, 4096),
    "mlp.up_proj": (14336, 4096),
    "mlp.down_proj": (4096, 14336),
}
KEY = "base_model.model.model.layers.{layer}.{module}.lora_{part}.weight"
BENCH_MODULE = "self_attn.q_proj"  # layer 0's q_proj is merged alone in part 2
TARGET_SECONDS, TARGET_RSS_GB, TARGET_RATIO, TARGET_SPEEDUP = 5.0, 1.5, 2.5, 100.0
CORE_REPEATS = 5

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="folder for the adapters and the merged output")
    parser.add_argument("--adapters", type=int, default=8, help="number of adapters (default 8)")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers per adapter (default 32)")
    parser.add_argument("--keep", action="store_true", help="keep the written adapters and merged output")
    parser.add_argument("--cli-only", action="store_true", help="skip the one-module comparison (minutes)")
    parser.add_argument("--repeats", type=int, default=3, help="CLI and floor runs; the best counts (default 3)")
    parser.add_argument("--scaling", action="store_true",
                        help="instead: how time and memory grow with the adapters and ranks, and the crossover")
    parser.add_argument("--scaling-layers", type=int, default=2, help="decoder layers in --scaling (default 2)")
    parser.add_argument("--crossover-adapters", type=int, default=2,
                        help="adapters in the one-module crossover (default 2, the case most favourable to full space)")
    parser.add_argument("--crossover-size", type=int, default=4096,
                        help="m = n of the crossover module (default 4096; full space then takes minutes per point)")
    parser.add_argument("--crossover-only", action="store_true",
                        help="with --scaling: only the one-module crossover (the CLI runs are skipped; no plot)")
    parser.add_argument("--plot", type=Path, help="with --scaling: write the plot (PNG) there")
    return parser.parse_args()


# --- synthetic adapters ---------------------------------------------------------------------------

def lora_config(rank: int) -> LoraConfig:
    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=sorted(name.split(".")[-1] for name in LLAMA3_8B_MODULES),
        base_model_name_or_path=BASE_MODEL,
        task_type="CAUSAL_LM",
        use_rslora=False,
        use_dora=False,
    )


def random_factors(out_features: int, in_features: int, rank: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """lora_A (r, in) and lora_B (out, r) in bf16, with magnitudes like a trained adapter's."""
    a = torch.randn(rank, in_features, generator=generator) * in_features ** -0.5
    b = torch.randn(out_features, rank, generator=generator) * 0.01
    return a.to(torch.bfloat16), b.to(torch.bfloat16)


def write_adapter(folder: Path, seed: int, layers: int, rank: int) -> None:
    """One peft adapter folder: adapter_config.json and adapter_model.safetensors (bf16)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for module, (out_features, in_features) in LLAMA3_8B_MODULES.items():
            a, b = random_factors(out_features, in_features, rank, generator)
            tensors[KEY.format(layer=layer, module=module, part="A")] = a
            tensors[KEY.format(layer=layer, module=module, part="B")] = b
    folder.mkdir(parents=True, exist_ok=True)
    lora_config(rank).save_pretrained(str(folder))
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def write_adapters(root: Path, count: int, layers: int, rank: int = RANK) -> list[Path]:
    """`count` adapters under root/r{rank}-l{layers}; adapters already there (seeded, so equal) are reused."""
    folders = [root / f"r{rank}-l{layers}" / f"t{i}" for i in range(count)]
    for seed, folder in enumerate(folders):
        if not weights_file(folder).is_file():
            write_adapter(folder, seed, layers, rank)
    return folders


def weights_file(folder: Path) -> Path:
    return folder / "adapter_model.safetensors"


# --- part 1: the CLI end to end, beside the floor ------------------------------------------------

def cli_command(adapters: list[Path], output: Path, space: str = "core") -> list[str]:
    return [sys.executable, "-m", "coremerge", "merge", *map(str, adapters),
            "--method", "tsv", "--space", space, "--output", str(output)]


def report_cli(adapters: list[Path], output: Path, repeats: int) -> None:
    """The CLI `repeats` times, each after a floor run on the same bytes; the best of each side."""
    inputs = [weights_file(folder) for folder in adapters]
    runs, floors = [], []
    for _ in range(repeats):
        shutil.rmtree(output, ignore_errors=True)
        runs.append(run_measured(cli_command(adapters, output), REPO))
        best_so_far = min(runs, key=lambda run: run["seconds"]) is runs[-1]
        if best_so_far:
            breakdown = json.loads((output / "merge_report.json").read_text())["seconds"]
        bytes_out = weights_file(output).stat().st_size
        floors.append(run_floor(inputs, bytes_out, output.parent / "floor.safetensors", REPO))
    bytes_in = sum(path.stat().st_size for path in inputs)
    print(f"cli: {min(runs, key=lambda run: run['seconds'])['output'].splitlines()[-1]}")
    print(f"cli bytes: in {bytes_in / 1e6:.1f} MB ({len(adapters)} files), out {bytes_out / 1e6:.1f} MB")
    print_floor_comparison("cli", runs, floors, breakdown, TARGET_SECONDS, TARGET_RATIO)
    rss = min(runs, key=lambda run: run["seconds"])["rss_gb"]
    print(f"cli peak RSS target <= {TARGET_RSS_GB:g} GB: {met(rss <= TARGET_RSS_GB)}; "
          f"highest of the runs {max(run['rss_gb'] for run in runs):.2f} GB")


# --- part 2: one 4096 x 4096 module three ways ----------------------------------------------------

def read_module_factors(adapters: list[Path], layer: int, module: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(lora_A, lora_B) of one module from each adapter, in float32."""
    factors = []
    for folder in adapters:
        with safe_open(str(weights_file(folder)), framework="pt") as handle:
            a = handle.get_tensor(KEY.format(layer=layer, module=module, part="A")).float()
            b = handle.get_tensor(KEY.format(layer=layer, module=module, part="B")).float()
        factors.append((a, b))
    return factors


def coremerge_seconds(factors: list, space: str, clock=time.perf_counter) -> float:
    """One coremerge module merge (merge_module + to_lora), TSV in the given space, timed by `clock`."""
    tasks = [TaskFactors(a=a.double(), b=SCALING * b.double(), weight=1.0) for a, b in factors]
    options = MergeOptions.create(method="tsv", space=space)
    started = clock()
    to_lora(merge_module(tasks, options, torch.Generator().manual_seed(0)), options.rank)
    return clock() - started


class OneLinear(torch.nn.Module):
    """The smallest model peft can put the adapters on: one bias-free q_proj."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.q_proj = torch.nn.Linear(in_features, out_features, bias=False)


def peft_svd_seconds(factors: list) -> float:
    """peft's `add_weighted_adapter(combination_type="svd")` on the same adapters."""
    out_features, in_features = factors[0][1].shape[0], factors[0][0].shape[1]
    config = LoraConfig(r=RANK, lora_alpha=LORA_ALPHA, target_modules=["q_proj"])
    names = [f"t{i}" for i in range(len(factors))]
    model = get_peft_model(OneLinear(in_features, out_features), config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    layer = model.base_model.model.q_proj
    with torch.no_grad():
        for name, (a, b) in zip(names, factors):
            layer.lora_A[name].weight.copy_(a)
            layer.lora_B[name].weight.copy_(b)
    clock = time.perf_counter()
    model.base_model.add_weighted_adapter(adapters=names, weights=[1.0] * len(names), adapter_name="merged",
                                          combination_type="svd", svd_rank=RANK * len(names))
    return time.perf_counter() - clock


def report_module(factors: list) -> None:
    out_features, in_features = factors[0][1].shape[0], factors[0][0].shape[1]
    core = statistics.median(coremerge_seconds(factors, "core") for _ in range(CORE_REPEATS))
    rows = [
        (f"coremerge tsv, core space (median of {CORE_REPEATS})", core),
        ("coremerge tsv, full space (1 run)", coremerge_seconds(factors, "full")),
        ("peft add_weighted_adapter svd (1 run)", peft_svd_seconds(factors)),
    ]
    print(f"one module: layer 0 q_proj, {out_features}x{in_features}, {len(factors)} adapters, float32 factors")
    print(f"  {'method':<46} {'seconds':>10} {'vs core':>10}")
    for label, seconds in rows:
        print(f"  {label:<46} {seconds:>10.4f} {seconds / core:>9.0f}x")
    slowest_speedup = min(seconds / core for _, seconds in rows[1:])
    print(f"core space >= {TARGET_SPEEDUP:g}x faster than full space and peft svd: "
          f"{met(slowest_speedup >= TARGET_SPEEDUP)} (smallest speed-up {slowest_speedup:.0f}x)")


# --- part 3: how the cost grows (--scaling) ---------------------------------------------------------

SCALING_RUNS = [(2, 16), (8, 16), (32, 16), (8, 8), (8, 64), (8, 128)]  # (adapters, rank)


def growth_terms(rank_sum: int, layers: int) -> tuple[float, float]:
    """The two terms of core space's work over the merged modules: sum (m + n) R^2 and R^3 per module."""
    rows = sum(m + n for m, n in LLAMA3_8B_MODULES.values()) * layers
    return rows * rank_sum ** 2, len(LLAMA3_8B_MODULES) * layers * rank_sum ** 3


def startup_cpu_seconds(repeats: int = 3) -> float:
    """CPU time of the CLI started and ended without a merge (`--help`: Python, the imports, the way out the
    program takes; best of `repeats`)."""
    command = [sys.executable, "-m", "coremerge", "--help"]
    return min(run_measured(command, REPO)["cpu_seconds"] for _ in range(repeats))


def report_scaling(adapters_root: Path, workdir: Path, layers: int) -> list[dict]:
    """The CLI on each (adapters, rank) of SCALING_RUNS, one run each, against the 8 x 16 run.

    The growth is measured on CPU time above the start-up's: on a shared machine the wall time of one
    run says more about the other processes than about the merge.
    """
    startup = startup_cpu_seconds()
    rows = []
    for count, rank in SCALING_RUNS:
        adapters = write_adapters(adapters_root, count, layers, rank)
        output = workdir / f"merged-{count}x{rank}"
        run = run_measured(cli_command(adapters, output), REPO)
        merge_seconds = json.loads((output / "merge_report.json").read_text())["seconds"]["total"]
        rows.append({"adapters": count, "rank": rank, "R": count * rank, "wall": run["seconds"],
                     "cpu": run["cpu_seconds"], "merge": merge_seconds, "work": run["cpu_seconds"] - startup, "rss_gb": run["rss_gb"], "load": run["load"],
                     "mb_in": sum(weights_file(f).stat().st_size for f in adapters) / 1e6})
        shutil.rmtree(output)
    base = next(r for r in rows if (r["adapters"], r["rank"]) == (8, 16))
    base_nr2, base_r3 = growth_terms(base["R"], layers)
    print(f"scaling: Llama-3-8B shapes, {layers} layer(s) x {len(LLAMA3_8B_MODULES)} modules, TSV in core space, "
          "one CLI run each; growth relative to 8 x 16 (expected: the n R^2 and R^3 terms; measured: CPU time "
          f"above the start-up's {startup:.2f} s)")
    print(f"  {'adapters x rank':>15} {'R':>5} {'in MB':>7} {'wall s':>7} {'merge s':>8} {'CPU s':>7} {'peak GB':>8} "
          f"{'exp nR^2':>9} {'exp R^3':>9} {'measured':>9}  load")
    for r in rows:
        nr2, r3 = growth_terms(r["R"], layers)
        print(f"  {r['adapters']:>7} x {r['rank']:<5} {r['R']:>5} {r['mb_in']:>7.0f} {r['wall']:>7.2f} {r['merge']:>8.2f} "
              f"{r['cpu']:>7.2f} {r['rss_gb']:>8.2f} {nr2 / base_nr2:>8.2f}x {r3 / base_r3:>8.2f}x "
              f"{r['work'] / base['work']:>8.2f}x  {r['load']}")
    return rows


def random_module_factors(count: int, rank: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(count * 10_000 + rank)
    return [tuple(t.float() for t in random_factors(size, size, rank, generator)) for _ in range(count)]


def report_crossover(count: int, size: int) -> list[dict]:
    """One size x size module, `count` adapters of growing rank (R = 128 ... size), core and full space,
    on one thread (as each of the CLI's merge workers), timed in CPU time of that thread: on a shared machine
    the wall time of one run says more about the other processes than about the merge."""
    rows = []
    torch.set_num_threads(1)
    coremerge_seconds(random_module_factors(count, 4, size), "core")  # warm-up: first calls load LAPACK paths
    print(f"crossover: one {size} x {size} module, {count} adapters, TSV, one run each on one thread, CPU seconds "
          "(merge_module + to_lora)")
    print(f"  {'rank':>6} {'R':>6} {'core s':>9} {'full s':>9}  load")
    rank = 128 // count
    while count * rank <= size:
        factors = random_module_factors(count, rank, size)
        row = {"rank": rank, "R": count * rank, "core": coremerge_seconds(factors, "core", time.thread_time),
               "full": coremerge_seconds(factors, "full", time.thread_time)}
        rows.append(row)
        print(f"  {rank:>6} {row['R']:>6} {row['core']:>9.2f} {row['full']:>9.2f}  {load()}")
        rank *= 2
    slower = [r["R"] for r in rows if r["core"] >= r["full"]]
    if slower:
        print(f"core space is no longer faster than full space from R = {slower[0]}")
    else:
        print(f"no crossover: core space is faster than full space at every R up to {rows[-1]['R']} = the module's size")
    return rows


def plot_scaling(scaling: list[dict], crossover: list[dict], layers: int, count: int, size: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    base = next(r for r in scaling if (r["adapters"], r["rank"]) == (8, 16))
    for label, keep, marker in (("rank 16, 2 / 8 / 32 adapters", lambda r: r["rank"] == 16, "o"),
                                ("8 adapters, rank 8 / 16 / 64 / 128", lambda r: r["adapters"] == 8, "s")):
        points = sorted((r["R"], r["work"]) for r in scaling if keep(r))
        left.plot(*zip(*points), marker=marker, label=label)
    grid = sorted({r["R"] for r in scaling})
    left.plot(grid, [base["work"] * (g / base["R"]) ** 2 for g in grid], "k:", label="n R^2 from 8 x 16")
    left.set(xscale="log", yscale="log", xlabel="R (sum of the ranks)", ylabel="CPU s above start-up",
             title=f"CLI, {layers} Llama-3-8B layer(s)")
    left.legend(fontsize=7)
    right.plot([r["R"] for r in crossover], [r["core"] for r in crossover], "o-", label="core space")
    right.plot([r["R"] for r in crossover], [r["full"] for r in crossover], "s--", label="full space")
    right.set(xscale="log", yscale="log", xlabel="R (sum of the ranks)", ylabel="CPU seconds (one thread)",
              title=f"one {size} x {size} module, {count} adapters")
    right.legend(fontsize=7)
    for axes, values in ((left, grid), (right, [r["R"] for r in crossover])):
        axes.set_xticks(values, [str(v) for v in values], minor=False)
        axes.minorticks_off()
    figure.tight_layout()
    figure.savefig(path)
    print(f"plot: {path}")


# --- main -----------------------------------------------------------------------------------------

def main() -> None:
    args = parse_args()
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="coremerge-bench-", dir="/tmp"))).resolve()
    adapters_root, output = workdir / "adapters", workdir / "merged"
    shutil.rmtree(output, ignore_errors=True)  # a merged folder left by an earlier --keep run
    print(f"coremerge merge benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, {load()}")
    try:
        if args.scaling and args.crossover_only:
            report_crossover(args.crossover_adapters, args.crossover_size)
            return
        if args.scaling:
            scaling = report_scaling(adapters_root, workdir, args.scaling_layers)
            crossover = report_crossover(args.crossover_adapters, args.crossover_size)
            if args.plot:
                plot_scaling(scaling, crossover, args.scaling_layers, args.crossover_adapters, args.crossover_size,
                             args.plot)
            return
        print(f"{args.adapters} adapters x {args.layers} layers x {len(LLAMA3_8B_MODULES)} modules "
              f"(Llama-3-8B shapes, rank {RANK}, bf16)")
        clock = time.perf_counter()
        adapters = write_adapters(adapters_root, args.adapters, args.layers)
        print(f"wrote {len(adapters)} adapters to {adapters_root} in {time.perf_counter() - clock:.1f} s")
        report_cli(adapters, output, args.repeats)
        if not args.cli_only:
            report_module(read_module_factors(adapters, 0, BENCH_MODULE))
    finally:
        if args.keep:
            print(f"kept {workdir}")
        elif args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            shutil.rmtree(adapters_root, ignore_errors=True)
            shutil.rmtree(output, ignore_errors=True)


if __name__ == "__main__":
    main()
