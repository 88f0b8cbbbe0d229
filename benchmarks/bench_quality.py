"""Merge quality on a bundled preset: every method x space, the paper's protocol in small.

    python benchmarks/bench_quality.py [--preset digits] [--methods ta tsv ...] [--spaces core ...]

For each cell, alpha (and density for ties / dare / dare_ties) is chosen by the best average
normalized accuracy on the validation split; the table shows the test split. Normalized accuracy
of a task = merged accuracy / the task's own adapter's accuracy.
"""

import argparse
import time

import torch

from coremerge.comparison.evaluation import Scores, benchmark
from coremerge.merging.methods import METHODS
from coremerge.merging.options import SPACES
from coremerge.presets import find_preset


def describe(options) -> str:
    extra = "".join(f" {k}={v:g}" for k, v in options.params.items() if k != "seed")
    return f"alpha={options.alpha:g}{extra}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--spaces", nargs="+", default=list(SPACES), choices=list(SPACES))
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is as fast, and never oversubscribes shared cores
    started = time.perf_counter()
    preset = find_preset(args.preset)
    print(f"preset {preset.name}: {len(preset.adapters)} tasks, test split; parameters chosen on validation")
    print(f"{'method':<10} {'space':<6} {'chosen':<22} {'avg acc':>8} {'avg norm':>9} {'merge s':>8}")

    def row(cell, reference) -> None:
        accuracy = Scores.mean(cell.test)
        normalized = Scores.mean({t: a / reference.individual[t] for t, a in cell.test.items()})
        print(f"{cell.method:<10} {cell.space:<6} {describe(cell.options):<22} {accuracy:>8.3f} {normalized:>9.3f} "
              f"{cell.merge_seconds:>8.3f}", flush=True)

    reference, cells = benchmark(preset, args.methods, args.spaces, progress=row)
    print(f"base model: avg acc {Scores.mean(reference.base):.3f}, "
          f"avg norm {Scores.mean({t: reference.base[t] / reference.individual[t] for t in reference.base}):.3f}")
    print(f"individual adapters on their own task: avg acc {Scores.mean(reference.individual):.3f}")
    print("per task (test): " + ", ".join(
        f"{t} base {reference.base[t]:.2f} / own {reference.individual[t]:.2f}" for t in reference.base))
    best = max(cells, key=lambda c: Scores.mean({t: a / reference.individual[t] for t, a in c.test.items()}))
    print(f"best: {best.method} in {best.space} space ({describe(best.options)}); "
          f"finished in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
