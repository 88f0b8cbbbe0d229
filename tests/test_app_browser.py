"""A real headless Chromium (Debian's) opens the app, clicks Merge & compare, and finds the results on the page.

Set COREMERGE_SCREENSHOT=path to keep the screenshot (the README's docs/app.png is made this way);
COREMERGE_REQUIRE_BROWSER=1 (set by CI) turns a missing browser into a failure instead of a skip.
"""

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic"]

if not Path(CHROMIUM).exists() and os.environ.get("COREMERGE_REQUIRE_BROWSER") != "1":
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)


def test_click_merge_and_see_the_comparison_and_the_report(app_server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app_server)
            page.locator("#merge-button").click()
            table = page.locator("#cm-comparison")
            expect(table).to_be_visible(timeout=240_000)
            headers = table.locator("th").all_inner_texts()
            assert headers[:4] == ["image", "task", "label", "Base"] and "Merged" in headers
            assert table.locator("img").count() == 24
            expect(page.locator("#summary")).to_contain_text("Average normalized accuracy of the merge")
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)

            page.get_by_role("tab", name="Merge report").click()
            expect(page.locator("#report")).to_contain_text("merging")
            expect(page.locator("#report")).to_contain_text("Base model")
        finally:
            browser.close()
    if os.environ.get("COREMERGE_SCREENSHOT"):
        shutil.copy(tmp_path / "app.png", os.environ["COREMERGE_SCREENSHOT"])
