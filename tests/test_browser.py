"""A real browser (Debian's headless Chromium, driven by Playwright) using the --tiny app:
upload examples, check and clear the mask, generate, open the attention panel, click the result,
see a heatmap; stop a long generation; read an error message; transfer a pose.

Screenshots go to pytest's temporary folder, or to $LEFFA_SCREENSHOTS when set (that is how
the README's screenshots are made).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# flags for a closed network and a root user (see the machine notes)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 180_000
VIEWPORT = {"width": 1500, "height": 1300}


@pytest.fixture(scope="module")
def page(app_url):
    playwright = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (scripts/test.sh installs the Debian package 'chromium')")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport=VIEWPORT)
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


def _pixels(locator) -> np.ndarray:
    """What the browser shows of an element (canvas included), as RGB."""
    return np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB")).astype(int)


def _magenta(rgb: np.ndarray) -> float:
    """The share of the mask's colour (magenta over the photo) in a picture."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return float(((r - g > 60) & (b - g > 60)).mean())


def _error_toasts(page):
    return page.locator("[data-testid=toast-text].error")


def _close_toasts(page) -> None:
    for button in page.locator("[data-testid=toast-close]").all():
        button.click()


def test_the_page_before_any_upload(page):
    """Stop is quiet until something runs, the mask editor waits for a person, and a request
    refused for a missing photo leaves its message, not an error mark on the result."""
    stop = page.locator("#tryon-stop")
    assert stop.is_disabled()
    assert not page.locator("#tryon-mask-editor").is_visible()
    page.locator("#tryon-generate").click()
    message = _error_toasts(page).first
    message.wait_for()
    assert message.inner_text() == "Upload a person photo first."
    _close_toasts(page)
    _wait_for(lambda: page.locator("#tryon-result").get_by_text("Error", exact=True).count() == 0,
              "the result box without an error mark", seconds=10)
    _wait_for(stop.is_disabled, "Stop quiet again", seconds=10)


def test_tryon_and_attention_heatmap(page, shots):
    from webapp.components import ATTENTION_HEIGHT

    banner = page.locator("#tiny-banner")
    banner.wait_for()
    assert "untrained" in banner.inner_text()  # the demo model is announced as such
    header = page.get_by_text("Re-implementation of").first.inner_text()
    assert "published weights" not in header  # not above the tiny model
    assert not page.get_by_label("Seed used").first.is_visible()  # no seed to show yet (it used to show 0)
    _upload(page, "tryon-person", ROOT / "examples/person/astronaut.png")
    _upload(page, "tryon-garment", ROOT / "examples/garment/striped_tee.png")
    editor = page.locator("#tryon-mask-editor")
    editor.locator("canvas").first.wait_for()  # the automatic mask, editable
    _wait_for(lambda: _magenta(_pixels(editor)) > 0.05, "the automatic mask in the editor")

    # clearing removes the strokes, not the photo; the editor's own 'Clear canvas' (photo too) is hidden
    assert editor.get_by_role("button", name="Undo").is_visible()
    assert not editor.get_by_role("button", name="Clear canvas").is_visible()
    page.locator("#tryon-clear-mask").click()
    _wait_for(lambda: _magenta(_pixels(editor)) < 0.001 and _pixels(editor).std() > 30,
              "the photo without the mask")
    page.get_by_role("button", name="Recompute mask").click()
    # a first run in a fresh clone has taken more than 60 s here (twice, then never when run again):
    # the same allowance as the page's other first waits
    _wait_for(lambda: _magenta(_pixels(editor)) > 0.05, "the recomputed mask", seconds=TIMEOUT_MS / 1000)

    _open(page, "Advanced options")
    page.get_by_label("Record attention maps").first.check()
    page.locator("#tryon-generate").click()
    result = page.locator("#tryon-result img").first
    result.wait_for()
    seed = page.locator("#tryon-seed input")
    seed.wait_for()
    assert seed.input_value() == "42"
    page.screenshot(path=str(shots / "tryon.png"), full_page=True)

    _open(page, "Attention maps")
    page.wait_for_timeout(500)
    box = result.bounding_box()
    result.click(position={"x": box["width"] * 0.5, "y": box["height"] * 0.45})
    # Gradio's <img loading="lazy"> loads (and gets a size) only near the viewport: scroll to its box
    page.locator("#heatmap-garment").scroll_into_view_if_needed()
    heat = page.locator("#heatmap-garment img").first
    heat.wait_for()
    assert heat.get_attribute("src")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=heat.element_handle())
    size = heat.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert size == [768, 1024 + 64]  # the garment and, under it, the colour scale
    point = page.locator("#point-garment img").first  # the clicked point, marked on a copy of the result
    point.wait_for()
    assert page.get_by_label("After denoising step").input_value() == "4/4"  # 1-based, as the progress counts
    page.locator("#warp-garment").click()
    page.locator("#warped-garment img").first.wait_for()
    heat.scroll_into_view_if_needed()
    for picture in (heat, point, page.locator("#warped-garment img").first):
        assert picture.bounding_box()["height"] <= ATTENTION_HEIGHT
    warp_button = page.locator("#warp-garment").bounding_box()
    assert warp_button["y"] + warp_button["height"] <= VIEWPORT["height"]  # on screen with the pictures
    page.screenshot(path=str(shots / "tryon_attention.png"), full_page=True)


def _wait_for(condition, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.3)


def _set_steps(page, steps: int) -> None:
    box = page.get_by_label("number input for Steps").first
    box.fill(str(steps))
    box.press("Enter")


def test_stop_ends_a_long_generation_quietly(page):
    """Stop ends the generation at its next step (the slot is free for the next one at once) and
    shows no error."""
    _close_toasts(page)
    result = page.locator("#tryon-result img").first
    before = result.get_attribute("src")
    _set_steps(page, 100)  # the --tiny maximum: more than a minute on a CPU
    page.locator("#tryon-generate").click()
    # this run's progress ("Denoising step 3/100"), not the attention panel's "After denoising step"
    # (get_by_text with a string matches any case): Stop must come once the generation runs
    page.get_by_text(re.compile(r"Denoising step \d+/100")).first.wait_for()
    page.locator("#tryon-stop").click()
    page.wait_for_timeout(2000)
    assert _error_toasts(page).count() == 0
    assert result.get_attribute("src") == before  # nothing new
    _set_steps(page, 2)
    start = time.monotonic()
    page.locator("#tryon-generate").click()
    page.wait_for_function("([img, old]) => img.src && img.src !== old", arg=[result.element_handle(), before])
    assert time.monotonic() - start < 45  # not behind the stopped one's other 90-odd steps (a second or more each)


def test_pose_transfer(page, shots, tmp_path):
    from webapp.components import INTERMEDIATE_HEIGHT

    page.get_by_role("tab", name="Pose transfer").click()
    _upload(page, "pose-person", ROOT / "examples/person/astronaut.png")
    blank = tmp_path / "blank.png"
    Image.new("RGB", (600, 800), "white").save(blank)
    _upload(page, "pose-target", blank)
    _close_toasts(page)
    page.locator("#pose-generate").click()
    message = _error_toasts(page).first
    message.wait_for()
    # two lines, as written; the remedy is on this tab; it stays until closed (no timer)
    lines = message.inner_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith("no person detected")
    assert "under the photos on this tab" in lines[1]  # where its DensePose upload is
    assert message.evaluate("e => getComputedStyle(e).whiteSpace") == "pre-wrap"
    assert page.locator(".toast-body .timer").count() == 0
    _close_toasts(page)

    _upload(page, "pose-target", ROOT / "examples/pose/astronaut_mirrored.png")
    page.locator("#pose-generate").click()
    result = page.locator("#pose-result img").first
    result.wait_for()
    assert result.get_attribute("src")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=result.element_handle())
    assert result.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [768, 1024]  # the generated picture
    # the intermediate results open by themselves after a generation (no collapsed panel to find)
    densepose = page.locator("#pose-densepose img").first
    densepose.wait_for()
    assert densepose.bounding_box()["height"] <= INTERMEDIATE_HEIGHT  # not a 1000-pixel-tall picture
    page.screenshot(path=str(shots / "pose.png"), full_page=True)


def test_a_landscape_photo_comes_back_landscape(page, tmp_path):
    """The default result is the person's photo at its own size and shape."""
    from tests.test_framing import figure

    page.get_by_role("tab", name="Virtual try-on").click()
    photo = tmp_path / "landscape.png"
    figure((1200, 800), (700, 120, 900, 760)).save(photo)
    _upload(page, "tryon-person", photo)
    _set_steps(page, 1)
    result = page.locator("#tryon-result img").first
    before = result.get_attribute("src")
    page.locator("#tryon-generate").click()
    page.wait_for_function("([img, old]) => img.src && img.src !== old && img.complete && img.naturalWidth > 0",
                           arg=[result.element_handle(), before])
    assert result.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [1200, 800]


def _trousers(path: Path) -> Path:
    """A lower-body garment: dark trousers on white."""
    img = Image.new("RGB", (768, 1024), "white")
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    draw.polygon([(220, 120), (548, 120), (600, 940), (420, 940), (384, 420), (348, 940), (168, 940)],
                 fill=(40, 50, 90))
    img.save(path)
    return path


def _shown(page, locator) -> np.ndarray:
    """The picture an <img> shows, fetched at its own size (not as scaled on the page)."""
    locator.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=locator.element_handle())
    return np.asarray(Image.open(io.BytesIO(page.request.get(locator.get_attribute("src")).body())).convert("RGB"))


def test_outfit_samples_gallery_and_chains(page, shots, tmp_path):
    """An outfit with three samples: a gallery with each seed under its image, the second pass's
    intermediates; a sample clicked becomes the result (its seed shown); the chain buttons move the
    chosen result, unchanged (lossless), into the other tab's person (and open that tab) or into this tab's person."""
    page.get_by_role("tab", name="Virtual try-on").click()
    _close_toasts(page)
    _upload(page, "tryon-person", ROOT / "examples/person/astronaut.png")
    _upload(page, "tryon-garment", ROOT / "examples/garment/striped_tee.png")
    _open(page, "Outfit: a second garment, put on after the first")
    _upload(page, "tryon-garment2", _trousers(tmp_path / "trousers.png"))
    _set_steps(page, 2)
    box = page.get_by_label("number input for Samples").first
    box.fill("3")
    box.press("Enter")
    result = page.locator("#tryon-result img").first
    before = result.get_attribute("src")
    page.locator("#tryon-generate").click()
    gallery = page.locator("#tryon-samples")
    gallery.wait_for()  # shown once there are samples to choose from
    for seed in (42, 43, 44):
        gallery.get_by_text(f"seed {seed}", exact=True).first.wait_for()
    assert _error_toasts(page).count() == 0
    assert page.locator("#tryon-seed input").input_value() == "42" and result.get_attribute("src") != before
    # the second pass's mask, from the first pass's result (lazy <img>: loaded once scrolled to)
    page.locator("#tryon-mask2").scroll_into_view_if_needed()
    page.locator("#tryon-mask2 img").first.wait_for()
    result.scroll_into_view_if_needed()

    first = _shown(page, result)
    gallery.get_by_text("seed 43", exact=True).first.click()
    _wait_for(lambda: page.locator("#tryon-seed input").input_value() == "43", "the chosen sample's seed")
    _wait_for(lambda: not np.array_equal(_shown(page, result), first), "the chosen sample as the result")
    chosen = _shown(page, result)
    page.screenshot(path=str(shots / "tryon_outfit.png"), full_page=True)

    # try-on → pose transfer: the chosen sample becomes the person to keep, on the pose tab
    page.locator("#tryon-to-pose").click()
    pose_person = page.locator("#pose-person img").first
    _wait_for(lambda: pose_person.is_visible() and _shown(page, pose_person).shape == chosen.shape
              and np.array_equal(_shown(page, pose_person), chosen), "the result as the pose person")
    assert page.get_by_role("tab", name="Pose transfer", selected=True).count() == 1

    # pose transfer → try-on: the pose tab's result (test_pose_transfer's) becomes the try-on person
    posed = _shown(page, page.locator("#pose-result img").first)
    page.locator("#pose-to-tryon").click()
    person = page.locator("#tryon-person img").first
    _wait_for(lambda: person.is_visible() and _shown(page, person).shape == posed.shape
              and np.array_equal(_shown(page, person), posed), "the pose result as the try-on person")
    assert page.get_by_role("tab", name="Virtual try-on", selected=True).count() == 1

    # "Use as person": the chosen try-on sample back as this tab's person, for another garment
    page.locator("#tryon-use-person").click()
    _wait_for(lambda: _shown(page, person).shape == chosen.shape
              and np.array_equal(_shown(page, person), chosen), "the result as the try-on person")


def test_fast_sampling_presets_set_the_options(page):
    """The *Fast sampling* preset sets the steps and the three options it stands for (the values of
    ``engine.options.SAMPLING_PRESETS``); Published gives the model's own sampling back."""
    page.get_by_role("tab", name="Virtual try-on").click()
    if not page.get_by_role("button", name="Fast sampling").first.is_visible():
        _open(page, "Advanced options")
    _open(page, "Fast sampling")
    page.get_by_label("Fast", exact=True).first.check()
    steps = page.get_by_label("number input for Steps").first
    _wait_for(lambda: steps.input_value() == "10", "the Fast preset's steps")
    assert page.get_by_label("number input for Feature cache interval").first.input_value() == "2"
    assert page.get_by_label("number input for Guide from noise level").first.input_value() == "0.07"
    assert page.get_by_label("number input for …up to noise level").first.input_value() == "0.81"
    assert page.get_by_label("Sampler", exact=True).first.input_value() == "DDPM"
    page.get_by_label("Published (30 DDPM steps)").first.check()
    _wait_for(lambda: steps.input_value() == "4", "the model's own steps (--tiny: 4)")
    assert page.get_by_label("Sampler", exact=True).first.input_value().startswith("The model's own")
    assert page.get_by_label("number input for Feature cache interval").first.input_value() == "1"
