"""App speed: from click to full comparison on the default bundled preset (target <= 10 s on 2 CPU cores).

    python benchmarks/bench_app.py [--runs 5] [--no-browser] [--screenshot docs/app.png]

Starts `python app.py` as a user would (GRADIO_SERVER_PORT set), then measures:
1. start-up: until the page answers;
2. the first merge right after that (gradio_client): it also waits for the start-up warm-up, which loads the
   default preset's model and computes the base's and each adapter's results once;
3. in a real headless Chromium (Debian's), a click on "Merge & compare" until the comparison table and the
   summary are on the page;
4. with gradio_client, `--runs` further merges with different alphas (never cached), click to every
   output (merge, comparison, plots, zip) back at the client.
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.25)
    raise SystemExit(f"the app did not answer at {url} within {timeout:.0f} s")


def browser_click(url: str, screenshot: Optional[Path] = None) -> float:
    """Seconds from the click to the comparison table and the summary on the page (then a full-page
    screenshot, if asked for)."""
    from playwright.sync_api import expect, sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            button = page.locator("#merge-button")
            expect(button).to_be_visible(timeout=60_000)
            started = time.perf_counter()
            button.click()
            expect(page.locator("#cm-comparison")).to_be_visible(timeout=300_000)
            expect(page.locator("#summary")).to_contain_text("Average normalized accuracy")
            seconds = time.perf_counter() - started
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
            return seconds
        finally:
            browser.close()


def client_clicks(url: str, runs: int, first_alpha: float) -> list[float]:
    from gradio_client import Client

    from coremerge.webapp.handlers import PARAMETERS

    client = Client(url, verbose=False)
    rows, *_ = client.predict("digits", api_name="/show_preset")
    seconds = []
    for run in range(runs):
        alpha = first_alpha + 0.05 * run  # a new alpha each time: never a cached result
        started = time.perf_counter()
        client.predict("digits", rows, "tsv", "core", alpha, False, None, "", "", None,  # no Hub token, no uploads
                       *[p.default for p in PARAMETERS], api_name="/merge_and_compare")
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-browser", action="store_true")
    parser.add_argument("--screenshot", type=Path, help="save the page after the browser's click (docs/app.png)")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_TEMP_DIR": tempfile.mkdtemp(prefix="bench-app-")}
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_up(url)
        print(f"start-up (python app.py until the page answers): {time.perf_counter() - started:.1f} s")
        [first] = client_clicks(url, 1, first_alpha=0.9)
        print(f"first merge right after start-up (waits for the warm-up): {first:.2f} s")
        if not args.no_browser:
            click = browser_click(url, args.screenshot)
            print(f"browser: click to comparison on the page: {click:.2f} s "
                  f"(target <= 10 s: {'met' if click <= 10 else 'missed'})")
        seconds = client_clicks(url, args.runs, first_alpha=0.35)
        print(f"gradio_client: click to all outputs, {args.runs} new merges: median {statistics.median(seconds):.2f} s, "
              f"min {min(seconds):.2f} s, max {max(seconds):.2f} s "
              f"(target <= 10 s: {'met' if statistics.median(seconds) <= 10 else 'missed'})")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
