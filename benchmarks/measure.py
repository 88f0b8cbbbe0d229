"""Shared by the merge benchmarks: run the CLI in a child process, and the floor for the same bytes.

Every figure is printed with the 1-minute load average at the time it was taken: on a shared machine
the wall time means little without it, so the CPU time of the process is printed too.
"""

import compileall
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

# The CLI is started from this bare-Python launcher, not from the benchmark directly: on Linux a
# child's ru_maxrss includes the high-water RSS of the process that spawned it (exec records the
# old memory map's peak), and the benchmark holds torch and the generated tensors. The launcher
# reports the child's wall time, CPU time and peak RSS (KiB) as JSON on its last stdout line; the
# child's own stdout goes to stderr.
LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
child = subprocess.Popen(sys.argv[1:], stdout=sys.stderr)
_, status, usage = os.wait4(child.pid, 0)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
                  "maxrss_kib": usage.ru_maxrss, "returncode": os.waitstatus_to_exitcode(status)}))
"""

# The floor: the least any merge of these inputs can cost. Start Python, import torch and safetensors,
# read every tensor of the inputs (from the page cache, as the CLI does; each is copied out of the file's
# memory map, since a mapped tensor that is never touched has not been read), write one output of the
# merged file's size with safetensors, and leave at once (os._exit, as the CLI does), nothing else.
# Prints its stages as JSON.
FLOOR = """
import json, os, sys, time
started = time.perf_counter()
import torch
from safetensors import safe_open
from safetensors.torch import save_file
imported = time.perf_counter()
*inputs, out_bytes, out_path = sys.argv[1:]
for path in inputs:
    with safe_open(path, framework="pt") as handle:
        for key in handle.keys():
            handle.get_tensor(key).clone()
read = time.perf_counter()
output = {"merged": torch.zeros(int(out_bytes), dtype=torch.uint8)}
clock = time.perf_counter()
save_file(output, out_path)
written = time.perf_counter()
print(json.dumps({"imports": imported - started, "reading": read - imported, "writing": written - clock}), flush=True)
os._exit(0)
"""


def fresh_key_map_cache(workdir: Path) -> Path:
    """An empty key map cache for the CLI runs that follow (COREMERGE_CACHE, inherited by the children): the first
    run maps the files' keys with diffusers (importing it), later ones read the maps from the cache."""
    folder = workdir / "key-maps"
    shutil.rmtree(folder, ignore_errors=True)
    os.environ["COREMERGE_CACHE"] = str(folder)
    return folder


def print_cold_and_warm(runs: Sequence[dict]) -> None:
    """The first run (no key maps cached: diffusers imported) beside the best of the later ones."""
    if len(runs) < 2:
        return
    warm = min(run["seconds"] for run in runs[1:])
    print(f"key maps: run 1 (none cached, diffusers imported) {runs[0]['seconds']:.2f} s wall; runs 2-{len(runs)} "
          f"(read from the cache) best {warm:.2f} s, {runs[0]['seconds'] - warm:.2f} s less")


def load() -> str:
    """The 1-, 5- and 15-minute load averages, as `uptime` prints them."""
    return "load " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


@functools.cache
def compile_bytecode(repo: Path) -> None:
    """Compile coremerge's modules once, as installing a package does. A checkout's Python writes them on first
    import anyway, unless PYTHONDONTWRITEBYTECODE is set (as on the machine these figures come from): then every
    run would compile each module again, a cost no installed coremerge has."""
    compileall.compile_dir(repo / "coremerge", quiet=1)


def run_measured(command: Sequence[str], cwd: Path) -> dict:
    """Run `command` once under the launcher: seconds, cpu_seconds, peak RSS (GB), its output and the load."""
    compile_bytecode(cwd)
    loadavg = load()
    done = subprocess.run([sys.executable, "-c", LAUNCHER, *command], capture_output=True, text=True, cwd=cwd)
    if done.returncode != 0 or not done.stdout.strip():
        raise SystemExit(f"launcher failed ({done.returncode}):\n{done.stderr}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["output"] = done.stderr.strip()
    if figures["returncode"] != 0:
        raise SystemExit(f"{command[0]} failed ({figures['returncode']}):\n{figures['output']}")
    figures["rss_gb"] = figures.pop("maxrss_kib") * 1024 / 1e9
    figures["load"] = loadavg
    return figures


def run_floor(inputs: Sequence[Path], out_bytes: int, out_path: Path, cwd: Path) -> dict:
    """The floor once: its wall and CPU time, and the stages (imports, reading, writing) it printed."""
    figures = run_measured([sys.executable, "-c", FLOOR, *map(str, inputs), str(out_bytes), str(out_path)], cwd)
    figures.update(json.loads(figures.pop("output").splitlines()[-1]))
    figures["io"] = figures["reading"] + figures["writing"]
    out_path.unlink()
    return figures


def best(runs: Sequence[dict]) -> dict:
    return min(runs, key=lambda run: run["seconds"])


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def print_floor_comparison(label: str, runs: Sequence[dict], floors: Sequence[dict], breakdown: dict,
                           target_seconds: float, target_ratio: float) -> None:
    """Best-of-n wall time beside the floor's, with the breakdown and the load of each run."""
    run, floor = best(runs), best(floors)
    print(f"{label} runs (wall / CPU s, peak RSS):")
    for i, r in enumerate(runs, start=1):
        print(f"  run {i}: {r['seconds']:.2f} s wall, {r['cpu_seconds']:.2f} s CPU, {r['rss_gb']:.2f} GB ({r['load']})")
    for i, f in enumerate(floors, start=1):
        print(f"  floor {i}: {f['seconds']:.2f} s wall (imports {f['imports']:.2f}, reading {f['reading']:.2f}, "
              f"writing {f['writing']:.2f}), {f['cpu_seconds']:.2f} s CPU ({f['load']})")
    startup = run["seconds"] - breakdown["total"]
    print(f"{label} best wall: {run['seconds']:.2f} s (target <= {target_seconds:g} s: "
          f"{met(run['seconds'] <= target_seconds)}), {run['cpu_seconds']:.2f} s CPU ({run['load']})")
    print(f"{label} breakdown: start-up and imports {startup:.2f}, reading {breakdown['loading']:.2f}, "
          f"merging {breakdown['merging']:.2f}, writing {breakdown['writing']:.2f} "
          f"(in-process total {breakdown['total']:.2f})")
    ratio, ratio_io = run["seconds"] / floor["seconds"], run["seconds"] / floor["io"]
    print(f"floor (same bytes, best of {len(floors)}): {floor['seconds']:.2f} s wall = start-up and imports "
          f"{floor['seconds'] - floor['io']:.2f} + reading {floor['reading']:.2f} + writing {floor['writing']:.2f}")
    print(f"ratio to the floor: {ratio:.2f}x of the floor process (target <= {target_ratio:g}x: "
          f"{met(ratio <= target_ratio)}), {ratio_io:.2f}x of its reading + writing alone")
    print(f"{label} peak RSS: {run['rss_gb']:.2f} GB (best run)")
