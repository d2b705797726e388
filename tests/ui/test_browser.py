"""The web UI in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``)
driven by selenium against ``python -m ldm.ui`` on 127.0.0.1, serving the random shapes checkpoint.

Skipped (with the reason) only where selenium or the browser is missing; ``.ci/run`` installs them.
``LDM_UI_SCREENSHOT=docs/ui-screenshot.png`` also writes the page after generating there (the
README's picture). Timings (page load, click to image) are logged at INFO.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from ldm.commands.pngmeta import read_params, save_png

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOT_LIMIT = 200_000  # bytes, for the README


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install 'ldm[test]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).is_file():
            return f"{path} not found (apt-get install -y {package}; .ci/run does it)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(shapes_ckpt: Path, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """``python -m ldm.ui`` on a free port of 127.0.0.1, until the module's tests are done."""
    port = _free_port()
    outdir = tmp_path_factory.mktemp("ui-out")
    log = outdir.parent / "server.log"
    env = {
        **os.environ,
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    argv = [sys.executable, "-m", "ldm.ui", "--ckpt", str(shapes_ckpt), "--port", str(port)]
    # one intra-op thread for the tiny model: no OpenMP spin-waiting on a busy 2-core machine
    argv += ["--outdir", str(outdir), "--device", "cpu", "--threads", "1"]
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ldm.ui exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if time.perf_counter() - start > 120:
                    pytest.fail(f"ldm.ui did not answer in 120 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.25)
        logger.info("server up in %.1f s", time.perf_counter() - start)
        yield {"url": url, "outdir": outdir, "log": log, "ckpt": shapes_ckpt}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,860",
        "--no-first-run",
        "--disable-background-networking",  # no browser traffic of its own in the request log
        "--disable-component-update",
        "--disable-sync",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _open(driver: Any, url: str) -> None:
    """Load the page and wait until the model is loaded and its defaults are in the fields."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 60).until(
        lambda d: "loaded; its defaults are set" in d.find_element(By.ID, "info").text
    )


def _requested_urls(driver: Any) -> list[str]:
    import json

    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    return urls


def _screenshot(driver: Any, tmp_path: Path) -> Path:
    shot = tmp_path / "ui-screenshot.png"
    driver.save_screenshot(str(shot))
    if shot.stat().st_size > SCREENSHOT_LIMIT:  # flat UI colours: a palette keeps it legible
        Image.open(shot).convert("RGB").quantize(colors=64).save(shot, optimize=True)
    target = os.environ.get("LDM_UI_SCREENSHOT")
    if target:
        shutil.copyfile(shot, ROOT / target)
    return shot


def test_type_a_prompt_generate_and_read_the_png_metadata(
    server: dict[str, Any], browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    start = time.perf_counter()
    _open(browser, server["url"])
    loaded = time.perf_counter() - start
    prompt = "a small red circle in the top left"
    browser.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys(prompt)
    clicked = time.perf_counter()
    browser.find_element(By.ID, "txt2img-generate").click()
    image = WebDriverWait(browser, 60).until(
        lambda d: next(iter(d.find_elements(By.CSS_SELECTOR, "#gallery img[src*='file=']")), None)
    )
    click_to_image = time.perf_counter() - clicked
    logger.info("page + model load %.2f s; click to image %.2f s", loaded, click_to_image)
    with urllib.request.urlopen(image.get_attribute("src")) as response:  # what the page shows
        data = response.read()
    meta = read_params(io.BytesIO(data))
    assert meta["prompt"] == prompt and meta["mode"] == "txt2img"
    assert meta["model"] == "shapes.ckpt" and (meta["sampler"], meta["steps"]) == ("dpmpp_2m", 20)
    assert Image.open(io.BytesIO(data)).size == (32, 32)
    (written,) = (server["outdir"] / "txt2img").glob("*.png")  # and the output folder has it
    assert read_params(written) == meta
    WebDriverWait(browser, 10).until(
        lambda d: f"seed {meta['seed']}" in d.find_element(By.ID, "info").text
    )
    shot = _screenshot(browser, tmp_path)
    assert shot.stat().st_size < SCREENSHOT_LIMIT
    browser.find_element(By.ID, "seed-reuse").click()  # the seed field gets the image's seed
    seed = browser.find_element(By.CSS_SELECTOR, "#seed input")
    WebDriverWait(browser, 10).until(lambda d: seed.get_attribute("value") == str(meta["seed"]))
    browser.find_element(By.ID, "send-img2img").click()  # the image becomes img2img's input
    WebDriverWait(browser, 10).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#init-image img[src*='file=']")
    )
    local = (server["url"] + "/", "data:", "blob:")
    assert [u for u in _requested_urls(browser) if not u.startswith(local)] == []


def test_send_to_inpaint_paint_a_mask_and_generate(server: dict[str, Any], browser: Any) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    info = lambda: browser.find_element(By.ID, "info").text  # noqa: E731
    _open(browser, server["url"])
    browser.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys("a green triangle")
    clicked = time.perf_counter()  # the model is warm now: the second image of the server
    browser.find_element(By.ID, "txt2img-generate").click()
    WebDriverWait(browser, 60).until(lambda d: "txt2img/00001.png" in info())
    logger.info("click to image, warm model: %.2f s", time.perf_counter() - clicked)
    browser.find_element(By.ID, "send-inpaint").click()
    canvas = WebDriverWait(browser, 10).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#inpaint-editor canvas")
    )[-1]
    time.sleep(0.5)  # the editor draws the sent image first
    stroke = ActionChains(browser).move_to_element(canvas).click_and_hold()
    stroke.move_by_offset(30, 10).move_by_offset(10, 30).release().perform()
    browser.find_element(By.ID, "inpaint-generate").click()
    WebDriverWait(browser, 60).until(lambda d: "inpaint/00000.png" in info())
    meta = read_params(server["outdir"] / "inpaint" / "00000.png")
    assert meta["mode"] == "inpaint" and meta["prompt"] == "a green triangle"
    assert meta["strength"] == 1.0


def test_dropping_one_of_our_pngs_restores_its_settings(
    server: dict[str, Any], browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    params = {
        "prompt": "a big blue square at the bottom", "negative_prompt": "red", "seed": 1234,
        "sampler": "euler", "steps": 7, "scale": 3.5, "size": "32x32", "model": "shapes.ckpt",
        "mode": "txt2img",
    }  # fmt: skip
    png = save_png(Image.new("RGB", (32, 32), (0, 0, 200)), tmp_path / "ours.png", params)
    _open(browser, server["url"])
    browser.find_element(By.CSS_SELECTOR, "#png-drop input[type=file]").send_keys(str(png))
    box = browser.find_element(By.CSS_SELECTOR, "#prompt textarea")
    WebDriverWait(browser, 30).until(lambda d: box.get_attribute("value") == params["prompt"])
    value = lambda css: browser.find_element(By.CSS_SELECTOR, css).get_attribute("value")  # noqa: E731
    assert value("#negative-prompt textarea, #negative-prompt input") == "red"
    assert value("#seed input") == "1234"
    assert value("#steps input[type=number]") == "7"
    assert value("#guidance input[type=number]") == "3.5"
    assert "Settings restored" in browser.find_element(By.ID, "info").text


def test_the_server_serves_only_its_output_folder(server: dict[str, Any]) -> None:
    for path in (server["ckpt"], ROOT / "setup.py", Path("/etc/passwd")):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{server['url']}/gradio_api/file={path}")
        assert err.value.code == 403
    with pytest.raises(urllib.error.HTTPError) as err:  # no fetching for others
        urllib.request.urlopen(f"{server['url']}/gradio_api/file=https://example.com/x.png")
    assert err.value.code == 403 and b"does not fetch outside URLs" in err.value.read()
    with pytest.raises(urllib.error.HTTPError) as err:  # no API around the queue
        urllib.request.urlopen(
            urllib.request.Request(f"{server['url']}/gradio_api/run/predict", data=b"{}")
        )
    assert err.value.code in (403, 404, 405, 422)
