"""Rebuild both bundled presets from scratch, side by side: one process and one torch thread each.

    python scripts/build_presets.py [--output-root presets]

Runs scripts/build_vision_preset.py (presets/digits) and scripts/build_text_preset.py (presets/strings)
at once, so that on a 2-core machine the whole rebuild takes about as long as the slower of the two.
Each build shows its own progress bars and log in `<output-root>/<preset>.build.log`; the exit code is
non-zero if either build fails.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
BUILDS = {"digits": "build_vision_preset.py", "strings": "build_text_preset.py"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-root", type=Path, default=SCRIPTS.parent / "presets")
    args = parser.parse_args()
    args.output_root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    running = {}
    for preset, script in BUILDS.items():
        log = (args.output_root / f"{preset}.build.log").open("w")
        command = [sys.executable, str(SCRIPTS / script), "--output", str(args.output_root / preset), "--threads", "1"]
        running[preset] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log)
        print(f"building {preset}: {' '.join(command[1:])} (log: {log.name})", flush=True)
    failed = []
    for preset, (process, log) in running.items():
        if process.wait() != 0:
            failed.append(preset)
        log.close()
        print(f"{preset}: {'failed' if process.returncode else 'built'} after {time.perf_counter() - started:.0f} s",
              flush=True)
    print(f"rebuilt {len(BUILDS) - len(failed)} of {len(BUILDS)} presets in {time.perf_counter() - started:.0f} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
