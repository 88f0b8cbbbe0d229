"""A real headless Chromium (Debian's) opens the app, clicks Merge & compare, and finds the results on the page;
uploads an adapter and merges it; gets the neutral refusal for a server path; switches the method; reads the
comparison at a phone's 430 px (it scrolls sideways, its first column pinned) and the ranks table at 1400 px.

Set COREMERGE_SCREENSHOT=path to keep the screenshot (the README's docs/app.png is made this way);
COREMERGE_REQUIRE_BROWSER=1 (set by CI) turns a missing browser into a failure instead of a skip.
"""

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from coremerge.comparison.plots import CAPTIONS
from coremerge.presets import PRESETS_DIR, find_preset
from coremerge.webapp.sources import refusal

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic"]

if not Path(CHROMIUM).exists() and os.environ.get("COREMERGE_REQUIRE_BROWSER") != "1":
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)


DIGITS = find_preset("digits")


@contextmanager
def browser_page(url: str, width: int, height: int = 1000):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url)
            page.locator("#merge-button").wait_for()
            yield page
        finally:
            browser.close()


def box(page, selector: str) -> dict:
    return page.locator(selector).first.bounding_box()


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


def test_upload_an_adapter_file_and_merge_it(app_server, tmp_path):
    from playwright.sync_api import expect

    archive = Path(shutil.make_archive(str(tmp_path / "my-rotate90"), "zip", root_dir=PRESETS_DIR / "digits/adapters",
                                       base_dir="rotate90"))
    with browser_page(app_server, 1400) as page:
        page.locator("#uploads input[type=file]").set_input_files(str(archive))
        expect(page.locator('[data-testid="cell-8-0"]')).to_have_text("upload:my-rotate90.zip", timeout=60_000)
        page.locator("#merge-button").click()
        table = page.locator("#cm-comparison")
        expect(table).to_be_visible(timeout=240_000)
        headers = table.locator("tr").first.locator("th").all_inner_texts()
        assert headers[-2:] == ["my-rotate90", "Merged"] and len(headers) == 3 + 1 + 9 + 1  # base, 9 adapters, merged
        expect(page.locator("#summary")).to_contain_text("Merged 9 adapters")
        expect(page.get_by_text(CAPTIONS["accuracy"])).to_be_visible()  # each plot says how to read it

        # at 1400 px no column of the ranks table is cut: its last header lies inside the table and the window
        page.get_by_role("tab", name="Merge report").click()
        for caption in (CAPTIONS["spectra"], CAPTIONS["overlap"]):
            expect(page.get_by_text(caption)).to_be_visible()
        last = page.locator("#ranks th").filter(has_text="output rank").first
        expect(last).to_be_visible()
        ranks, cell = box(page, "#ranks"), last.bounding_box()
        assert cell["x"] + cell["width"] <= ranks["x"] + ranks["width"] + 1 and cell["x"] + cell["width"] <= 1400
        assert last.evaluate("e => e.getBoundingClientRect().right - e.closest('table').getBoundingClientRect().right") <= 1


def test_a_hostile_path_gets_the_neutral_message_and_no_server_path(app_server):
    from playwright.sync_api import expect

    with browser_page(app_server, 1400) as page:
        cell = page.locator('[data-testid="cell-0-0"]')
        cell.dblclick()
        page.keyboard.press("Control+A")
        page.keyboard.type(str(PRESETS_DIR / "digits/adapters/rotate90"))  # exists on the server, outside the boundary
        page.keyboard.press("Enter")
        page.locator("#merge-button").click()
        toast = page.locator(".toast-body").filter(has_text="adapter row 1")
        expect(toast).to_be_visible(timeout=60_000)
        assert str(refusal(1)) in toast.inner_text()
        shown = page.locator("body").inner_text().replace(str(PRESETS_DIR / "digits/adapters/rotate90"), "")
        for path in (str(PRESETS_DIR.parent), tempfile.gettempdir(), str(Path.home())):
            assert path not in shown, path


def tuned_alpha(method: str) -> float:
    settings_for = getattr(DIGITS, "settings_for", None)
    assert settings_for is not None, "the presets have no per-method tuned settings yet"
    return settings_for(method).alpha


def test_switching_the_method_sets_its_tuned_alpha(app_server):
    from playwright.sync_api import expect

    alpha_ta, alpha_tsv = tuned_alpha("ta"), tuned_alpha("tsv")
    assert alpha_ta != alpha_tsv == DIGITS.merge.alpha  # the page starts at TSV's: a switch must move it
    with browser_page(app_server, 1400) as page:
        alpha = page.locator("#alpha input[data-testid=number-input]")
        expect(alpha).to_have_value(f"{alpha_tsv:g}")
        for method, display, value in (("ta", "Task Arithmetic", alpha_ta), ("tsv", "TSV-Merge", alpha_tsv)):
            page.locator("#method input").click()
            page.get_by_role("option", name=display, exact=True).click()
            expect(alpha).to_have_value(f"{value:g}", timeout=30_000)


def test_at_430_px_the_comparison_scrolls_to_the_merged_column_with_its_first_column_pinned(app_server):
    from playwright.sync_api import expect

    with browser_page(app_server, 430, 900) as page:
        page.locator("#merge-button").click()
        table = page.locator("#cm-comparison")
        expect(table).to_be_visible(timeout=240_000)
        scroller = page.locator("#cm-scroll")
        view = scroller.bounding_box()
        assert view["x"] >= 0 and view["x"] + view["width"] <= 430  # the box fits the screen; the table scrolls in it
        merged = table.locator("th").filter(has_text="Merged").first
        first = table.locator("tr").nth(1).locator("td").first
        assert merged.bounding_box()["x"] >= view["x"] + view["width"]  # off to the right at first
        pinned_at = first.bounding_box()["x"]

        scroller.evaluate("e => { e.scrollLeft = e.scrollWidth; }")
        time.sleep(0.3)
        assert scroller.evaluate("e => e.scrollLeft") > 0
        cell = merged.bounding_box()
        assert view["x"] <= cell["x"] and cell["x"] + cell["width"] <= view["x"] + view["width"] + 1  # now in view
        assert abs(first.bounding_box()["x"] - pinned_at) < 1  # the image column stayed where it was
