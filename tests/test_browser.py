"""A real browser (Debian's headless Chromium, driven by Playwright) using the --tiny app:
upload examples, generate, open the attention panel, click the result, see a heatmap.

Screenshots go to pytest's temporary folder, or to $LEFFA_SCREENSHOTS when set (that is how
the README's screenshots are made).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# flags for a closed network and a root user (see the machine notes)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 180_000


@pytest.fixture(scope="module")
def page(app_url):
    playwright = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (scripts/test.sh installs the Debian package 'chromium')")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1500, "height": 1300})
        pg.set_default_timeout(TIMEOUT_MS)
        pg.goto(app_url)
        yield pg
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("LEFFA_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _upload(page, elem_id: str, path: Path) -> None:
    page.locator(f"#{elem_id} input[type=file]").set_input_files(str(path))
    page.locator(f"#{elem_id} img").first.wait_for()


def _open(page, title: str) -> None:
    page.get_by_role("button", name=title).first.click()


def test_tryon_and_attention_heatmap(page, shots):
    banner = page.locator("#tiny-banner")
    banner.wait_for()
    assert "untrained" in banner.inner_text()  # the demo model is announced as such
    _upload(page, "tryon-person", ROOT / "examples/person/astronaut.png")
    _upload(page, "tryon-garment", ROOT / "examples/garment/striped_tee.png")
    page.locator("#tryon-mask-editor canvas").first.wait_for()  # the automatic mask, editable
    _open(page, "Advanced options")
    page.get_by_label("Record attention maps").first.check()
    page.locator("#tryon-generate").click()
    result = page.locator("#tryon-result img").first
    result.wait_for()
    page.screenshot(path=str(shots / "tryon.png"), full_page=True)

    _open(page, "Attention maps")
    page.wait_for_timeout(500)
    box = result.bounding_box()
    result.click(position={"x": box["width"] * 0.5, "y": box["height"] * 0.45})
    heat = page.locator("#heatmap-garment img").first
    heat.wait_for()
    assert heat.get_attribute("src")
    heat.scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "tryon_attention.png"), full_page=True)


def test_pose_transfer(page, shots):
    page.get_by_role("tab", name="Pose transfer").click()
    _upload(page, "pose-person", ROOT / "examples/person/astronaut.png")
    _upload(page, "pose-target", ROOT / "examples/pose/astronaut_mirrored.png")
    page.locator("#pose-generate").click()
    result = page.locator("#pose-result img").first
    result.wait_for()
    assert result.get_attribute("src")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=result.element_handle())
    assert result.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [768, 1024]  # the generated picture
    page.screenshot(path=str(shots / "pose.png"), full_page=True)
