"""The GPU check in one command, for a machine with CUDA (the CI here has none).

    python scripts/gpu_check.py

It runs the GPU-marked tests (CUDA merges equal CPU merges), times one merge of the bundled digits preset's
eight adapters on CUDA against CPU in each space, and times one comparison per preset kind on tiny models (the
Hub preset stand-ins of tests/test_hub_standins.py, whose runners use CUDA when present; the bundled digits
preset for classification), then prints a table. Without CUDA it says so and exits 0.
"""

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout, without installing coremerge

COMPARISONS = {  # preset kind: the test that runs one merge and its side by side through the app's handler
    "text generation (TinyLlama stand-in)": "tests/test_hub_standins.py::test_tinyllama_tasks_merge_side_by_side_and_download",
    "image generation (SD 1.5 stand-in)": "tests/test_hub_standins.py::test_diffusion_presets_merge_side_by_side_and_download[sd15-styles]",
    "image generation (SDXL stand-in)": "tests/test_hub_standins.py::test_diffusion_presets_merge_side_by_side_and_download[sdxl-styles]",
    "image classification (digits)": "tests/test_app_handlers.py::test_merge_and_compare_shows_every_variant_and_a_zip_that_peft_loads_with_the_merged_update",
}


def pytest(*args: str) -> tuple[float, str]:
    started = time.perf_counter()
    code = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", *args], cwd=REPO,
                          stdout=subprocess.DEVNULL).returncode
    return time.perf_counter() - started, "passed" if code in (0, 5) else f"FAILED (pytest exit {code})"


def timed_merge(space: str, device: str) -> float:
    from coremerge import MergeOptions
    from coremerge.merging.to_folder import merge_to_folder
    from coremerge.presets import find_preset

    preset = find_preset("digits")
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        merge_to_folder(preset.adapter_sources, MergeOptions.create(method="tsv", space=space),
                        Path(folder) / "out", device=device)
        return time.perf_counter() - started


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing to check here (exit 0)")
        return 0
    rows = [("check", "result", "seconds")]
    seconds, result = pytest("-m", "gpu", "tests")
    rows.append(("GPU-marked tests (pytest -m gpu)", result, f"{seconds:.1f}"))
    for space in ("core", "full", "knots"):
        timed_merge(space, "cuda")  # warm-up: CUDA context and kernels
        cpu, cuda = timed_merge(space, "cpu"), timed_merge(space, "cuda")
        rows.append((f"merge digits x8, tsv, {space} space", f"cpu {cpu:.2f} s / cuda {cuda:.2f} s",
                     f"x{cpu / cuda:.1f}"))
    for kind, test in COMPARISONS.items():
        seconds, result = pytest(test)
        rows.append((f"comparison: {kind}", result, f"{seconds:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    print(f"gpu_check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    return 0 if all("FAILED" not in row[1] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
