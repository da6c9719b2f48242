"""`genfast demo` in a real browser: Debian's chromium driven by Playwright (pip's playwright, pointed at the
system browser: nothing is downloaded). Loads the page, runs the tabs as a user would, reads the numbers.

Without chromium the tests skip, unless GENFAST_REQUIRE_BROWSER=1 (CI: `.ci/run` installs chromium and sets it),
where they fail. GENFAST_DEMO_SCREENSHOTS=DIR keeps a screenshot of each tab there (docs/demo/ holds the README's).
"""

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("GENFAST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(autouse=True, scope="module")
def _chromium():
    """No chromium: these tests fail under GENFAST_REQUIRE_BROWSER=1 (CI), else skip; the rest of the suite runs."""
    if CHROMIUM is None:
        why = "no chromium on PATH (apt-get install chromium, or set GENFAST_CHROMIUM to a Chromium binary)"
        if os.environ.get("GENFAST_REQUIRE_BROWSER") == "1":
            pytest.fail(f"GENFAST_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)

# flags for a closed network: no background connections a headless run would wait on
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
LONG = 300_000  # ms: a shared 2-core CI machine


@pytest.fixture(scope="module")
def page(_chromium, demo_server):
    from playwright.sync_api import sync_playwright

    _, url = demo_server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.wait_for_selector("#accelerate-run", timeout=LONG)
        yield page
        browser.close()


def _screenshot(page, name: str) -> None:
    folder = os.environ.get("GENFAST_DEMO_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


def _open(page, tab: str) -> None:
    page.get_by_role("tab", name=tab).click()


def _wait_text(page, selector: str, *texts: str) -> str:
    """The element's text once it holds every one of `texts` (while a job runs it shows the progress instead)."""
    page.wait_for_function("([s, ts]) => { const e = document.querySelector(s); "
                           "return e && ts.every(t => e.innerText.includes(t)); }", arg=[selector, list(texts)],
                           timeout=LONG)
    return page.inner_text(selector)


def _wait_image(page, selector: str) -> int:
    """The natural width of the image under `selector` once it has loaded (it loads after the numbers arrive)."""
    js = f"() => {{ const i = document.querySelector('{selector} img'); return i && i.complete && i.naturalWidth; }}"
    page.wait_for_function(js, timeout=LONG)
    return page.evaluate(js)


def _errors_shown(page) -> str:
    page.wait_for_selector(".toast-body", timeout=LONG)
    return page.inner_text("body")


def test_accelerate_tab_shows_both_images_and_the_numbers(page):
    _open(page, "Accelerate")
    page.fill("#accelerate-prompt textarea", "a green square on a white background")
    page.click("#accelerate-run")
    numbers = _wait_text(page, "#accelerate-numbers", "dB", "speed-up")
    assert _wait_image(page, "#accelerate-baseline") == _wait_image(page, "#accelerate-accelerated") == 256
    assert "speed-up" in numbers and "25 / 25" in numbers  # the baseline ran every step in full
    _screenshot(page, "accelerate")


def test_an_empty_prompt_is_answered_with_what_to_fix(page):
    _open(page, "Accelerate")
    page.fill("#accelerate-prompt textarea", "")
    page.click("#accelerate-run")
    body = _errors_shown(page)
    assert "Type a prompt first" in body and "Traceback" not in body
    page.locator(".toast-close").first.click()


def _set_number(page, selector: str, value) -> None:
    """A slider's number box: type the value and commit it, as a user does."""
    box = page.locator(f"{selector} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_compare_tab_shows_the_report_table_and_its_plot(page):
    _open(page, "Compare")
    page.fill("#compare-recipes textarea", "feature_inheritance:interval=2,4")
    _set_number(page, "#compare-images", 2)
    _set_number(page, "#compare-steps", 10)
    page.click("#compare-run")
    table = _wait_text(page, "#compare-numbers", "feature_inheritance(interval=4)", "PSNR")
    assert "feature_inheritance(interval=2)" in table and "baseline" in table
    _wait_image(page, "#compare-pareto")
    _screenshot(page, "compare")


def test_quantize_tab_shows_the_bytes_and_psnr(page):
    _open(page, "Quantize")
    page.click("#quantize-run")
    table = _wait_text(page, "#quantize-numbers", "dB", "bits")
    assert "bits" in table
    _screenshot(page, "quantize")


def test_assemble_tab_shows_teacher_student_and_multi_unet(page):
    _open(page, "Assemble")
    page.click("#assemble-run")
    table = _wait_text(page, "#assemble-numbers", "dB", "student")
    assert "multi-UNet" in table
    for name in ("teacher", "student-image", "multi"):
        assert _wait_image(page, f"#assemble-{name}") == 256
    _screenshot(page, "assemble")


def test_backbones_tab_shows_each_backbone_s_image_and_costs(page, demo_server, tmp_path, monkeypatch):
    from test_demo_backbones import tiny_backbones

    models, _ = demo_server
    monkeypatch.setattr(models, "class_pipelines", tiny_backbones(tmp_path, ("DiT", "AsCAN")))
    _open(page, "Backbones")
    _set_number(page, "#backbones-steps", 4)
    page.click("#backbones-run")
    table = _wait_text(page, "#backbones-numbers", "GFLOPs per image", "AsCAN")
    assert "DiT" in table and "parameters" in table
    js = ("() => [...document.querySelectorAll('#backbones-images img')].filter(i => i.complete && "
          "i.naturalWidth === 256).length")
    page.wait_for_function(f"() => ({js})() >= 2", timeout=LONG)  # both images, enlarged like the other tabs'
    _screenshot(page, "backbones")


def test_bits_tab_shows_both_families_at_16_bits_and_the_chosen_bits(page, demo_server, tmp_path, monkeypatch):
    from test_demo_bits import tiny_bits_models

    models, _ = demo_server
    monkeypatch.setattr(models, "bits_pipelines", tiny_bits_models(tmp_path))
    _open(page, "Bits")
    box = page.locator("#bits-bits input")  # the bit width, chosen as a user does: type it, pick it with Enter
    box.click()
    box.fill("3")
    box.press("Enter")
    page.locator("#bits-kind label", has_text="fp").click()
    page.click("#bits-run")
    table = _wait_text(page, "#bits-numbers", "fp3_e2m0", "PSNR", "DiT")
    assert "VAR" in table and "total bits at 16-bit (MB)" in table and "Round to nearest (PTQ) here" in table
    js = ("() => [...document.querySelectorAll('#bits-images img')].filter(i => i.complete && "
          "i.naturalWidth === 256).length")
    page.wait_for_function(f"() => ({js})() >= 4", timeout=LONG)  # 16-bit and 3-bit, each family
    _screenshot(page, "bits")

def _head_photos(folder: Path, views: int) -> list[str]:
    from genfast.cli import main

    assert main(["head-photos", "--views", str(views), "--size", "128", "--out", str(folder)]) == 0
    return sorted(str(p) for p in folder.glob("*.png"))


def _upload(page, files: list[str]) -> None:
    """Upload files to the photos box and wait until the page lists every one of them (stem and extension are
    shown on lines of their own)."""
    page.set_input_files("#heads-photos input[type=file]", files)
    names = [Path(f).name for f in files]
    page.wait_for_function("(ns) => { const e = document.querySelector('#heads-photos'); "
                           "return e && ns.every(n => e.innerText.replace(/\\n/g, '').includes(n)); }", arg=names, timeout=LONG)


def test_heads_tab_refuses_too_few_photos(page, tmp_path):
    _open(page, "3D heads")
    _upload(page, _head_photos(tmp_path / "two", 2))
    page.click("#heads-run")
    body = _errors_shown(page)
    assert "at least 3 photos" in body and "Traceback" not in body
    page.locator(".toast-close").first.click()
    page.locator("#heads-photos button[aria-label='Clear']").first.click()


def test_heads_tab_personalizes_from_uploaded_photos(page, tmp_path):
    _open(page, "3D heads")
    _upload(page, _head_photos(tmp_path / "ten", 10))
    _set_number(page, "#heads-steps", 5)  # few adapter steps: the page is tested here, not the fit
    page.click("#heads-run")
    table = _wait_text(page, "#heads-numbers", "photos", "PSNR")
    assert "photos\t10 (uploaded" in table  # the table row: 10 photos, from the upload
    page.wait_for_selector("#heads-orbit video", timeout=LONG)
    _wait_image(page, "#heads-strip")
    assert page.locator("#heads-adapter a").count() >= 1  # the adapter offered for download
    _screenshot(page, "heads")
