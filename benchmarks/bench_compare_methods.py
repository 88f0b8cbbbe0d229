"""The page's "Compare methods" on a bundled preset, timed: the handler the button calls, with the preset's rows
and prompts, off ZeroGPU (scoring on CPU here).

    python benchmarks/bench_compare_methods.py [--preset digits]
"""

import argparse
import time

import torch

from coremerge.webapp import handlers, method_comparison


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="digits")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread, never oversubscribing shared cores
    rows, _, _, prompts, _ = handlers.preset_view(args.preset)
    started = time.perf_counter()
    summary, table, _ = method_comparison.compare_methods_button(args.preset, rows, prompts, None, None,
                                                                 progress=lambda *a, **k: None)
    seconds = time.perf_counter() - started
    print(summary.replace("**", ""))
    print(" | ".join(method_comparison.COLUMNS))
    for row in table:
        print(" | ".join(str(cell) for cell in row))
    print(f"wall time of the button (a first click: it loads the preset's model): {seconds:.1f} s")


if __name__ == "__main__":
    main()
