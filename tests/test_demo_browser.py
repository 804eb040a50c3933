"""The web demo in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`, which .ci/run
installs) opens the page, runs the tiny ControlNet + ZeroScope config on the shipped clip and finds the result
video in the page.

Set BIVDIFF_DEMO_SCREENSHOT=path.png to also save a screenshot of the page after the run (docs/demo.png is one).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
pytest.importorskip("gradio", reason="the demo tests need gradio: pip install -e '.[test]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium: pip install '.[test]'")

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
RUN_TIMEOUT_S = 240
# Resolved now: the page runs in a temporary working directory.
SCREENSHOT = os.environ.get("BIVDIFF_DEMO_SCREENSHOT") and Path(os.environ["BIVDIFF_DEMO_SCREENSHOT"]).resolve()


def find_browser() -> tuple[str, str]:
    browser = next((path for path in map(shutil.which, BROWSERS) if path), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip(
            f"no headless Chromium here (found browser: {browser}, chromedriver: {driver}); install Debian's "
            "packages with `apt-get install chromium chromium-driver` (.ci/run does)"
        )
    return browser, driver


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary, driver = find_browser()
    options = Options()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1300"):
        options.add_argument(argument)
    # Both paths are given, so selenium never tries to download a driver (there is no network for it in CI).
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


@pytest.fixture
def page(tmp_path, monkeypatch):
    """`bivdiff demo --tiny --offline`, started in an empty folder."""
    from bivdiff.demo import DemoSettings, build_app, launch

    monkeypatch.chdir(tmp_path)
    settings = DemoSettings(tiny=True, output_dir="outputs", offline=True)
    app = build_app(settings)
    launch(app, settings, port=None, block=False)
    try:
        yield app.local_url, settings
    finally:
        app.close()


def test_the_page_runs_the_tiny_controlnet_config_and_shows_the_result_video(browser, page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    url, settings = page
    browser.get(url)
    run = WebDriverWait(browser, 60).until(ready.element_to_be_clickable((By.XPATH, "//button[text()='Run']")))
    assert "controllable_video_generation_with_controlnet_and_zeroscope" in browser.page_source
    run.click()

    def result_video(driver):
        videos = driver.find_elements(By.CSS_SELECTOR, "#comparison video")
        sources = [v.get_attribute("src") or "" for v in videos]
        return next((src for src in sources if "comparison.mp4" in src), False)

    source = WebDriverWait(browser, RUN_TIMEOUT_S).until(result_video)
    (folder,) = [p for p in Path(settings.output_dir).iterdir() if p.is_dir()]
    assert (folder / "comparison.mp4").is_file() and source.endswith("comparison.mp4")
    assert "The pictures are NOISE" in browser.find_element(By.TAG_NAME, "body").text

    if SCREENSHOT:
        WebDriverWait(browser, 30).until(
            lambda d: d.execute_script("return [...document.querySelectorAll('video')].every(v => v.readyState >= 2)")
        )
        # The whole page, from the top.
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1400, height + 140)
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(str(SCREENSHOT))
        # 256 colours keep the README's picture small (a third of the size) with no visible change.
        from PIL import Image

        with Image.open(SCREENSHOT) as shot:
            shot.convert("RGB").quantize(256, dither=Image.Dither.NONE).save(SCREENSHOT, optimize=True)
