"""Rebuild the bundled presets from scratch, side by side: one process and one torch thread each.

    python scripts/build_presets.py [--output-root presets] [--only questions ...]

Runs scripts/build_vision_preset.py (presets/digits), scripts/build_text_preset.py (presets/strings) and
scripts/build_questions_preset.py (presets/questions, which pretrains its own copy of the strings base) at once;
on a 2-core machine the three share the cores, and the whole rebuild takes about as long as the slowest.
Each build shows its own progress bars and log in `<output-root>/<preset>.build.log`; the exit code is
non-zero if either build fails.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
# preset -> script and its arguments besides --output (build_questions_preset.py fixes its own single thread)
BUILDS = {"digits": ["build_vision_preset.py", "--threads", "1"], "strings": ["build_text_preset.py", "--threads", "1"],
          "questions": ["build_questions_preset.py"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-root", type=Path, default=SCRIPTS.parent / "presets")
    parser.add_argument("--only", nargs="+", choices=list(BUILDS), default=list(BUILDS), help="the presets to rebuild")
    args = parser.parse_args()
    args.output_root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    running = {}
    for preset in args.only:
        script, *options = BUILDS[preset]
        log = (args.output_root / f"{preset}.build.log").open("w")
        command = [sys.executable, str(SCRIPTS / script), "--output", str(args.output_root / preset), *options]
        running[preset] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log)
        print(f"building {preset}: {' '.join(command[1:])} (log: {log.name})", flush=True)
    failed = []
    for preset, (process, log) in running.items():
        if process.wait() != 0:
            failed.append(preset)
        log.close()
        print(f"{preset}: {'failed' if process.returncode else 'built'} after {time.perf_counter() - started:.0f} s",
              flush=True)
    print(f"rebuilt {len(running) - len(failed)} of {len(running)} presets in {time.perf_counter() - started:.0f} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
