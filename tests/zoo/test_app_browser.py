"""zoo.app in a real browser: headless Chromium (Debian's `chromium`, which .ci/run installs) driven by Playwright
loads the page of a real server, opens a val image, drags a box with the mouse and waits for the mask, downloads the
labels (their DSC against the ground truth equals zoo.segment's on the same box) and saves a screenshot. The times
from mouse-up to mask drawn are printed (`-s`): reported, not asserted.

    CP_TINYVIT_APP_SCREENSHOT=docs/app.png python -m pytest -s tests/zoo/test_app_browser.py   # the README's picture
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from zoo.data.formats import tight_boxes
from zoo.data.scoring import case_scores
from zoo.segment import main as segment_main

REPO = Path(__file__).resolve().parents[2]
VAL_IMAGE = "2DBox_Dermoscopy_PH2_IMD002.npz"
MODEL = "cp_tinyvit_fast"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def chromium():
    """(Playwright's sync API, the browser's path); the test is skipped, saying why, where there is none."""
    playwright_api = pytest.importorskip("playwright.sync_api",
                                         reason="Playwright for Python is missing: pip install -e '.[test]'")
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(found).is_file():
        pytest.skip("no Chromium browser here: install Debian's `chromium` (apt-get install chromium; .ci/run does)")
    return playwright_api, found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def app_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("cp-tinyvit-app-*"))


@pytest.fixture(scope="module")
def server(chromium):
    """`python -m zoo.app` on a free port, as a user starts it; stopped (SIGTERM) at the end, which must remove its
    temporary folder."""
    port = free_port()
    before = app_folders()
    process = subprocess.Popen([sys.executable, "-m", "zoo.app", "--model", MODEL, "--port", str(port)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url + "api/info", timeout=2).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the server did not start:\n{process.stdout.read()}")
            time.sleep(0.5)
    ours = app_folders() - before
    yield url
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert ours and not any(folder.exists() for folder in ours), "the session folder outlived the server"


@pytest.fixture
def page(chromium):
    playwright_api, executable = chromium
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        # bypass_csp: Playwright's waits evaluate expressions, which the page's policy forbids to its own scripts
        context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True, bypass_csp=True)
        tab = context.new_page()
        errors = []
        tab.on("pageerror", lambda err: errors.append(str(err)))
        yield tab
        browser.close()
        assert not errors, f"the page raised: {errors}"


def open_image(page, path: Path) -> None:
    page.set_input_files("#file", str(path))
    page.wait_for_function(f"viewer.state.image && viewer.state.image.name === {json.dumps(path.name)} "
                           "&& !viewer.state.busy", timeout=60_000)


def drag_box(page, box, expected_object: int) -> dict:
    """Drag from the centre of pixel (x0, y0) to that of (x1, y1) with the mouse; wait until the answer is drawn."""
    def client(x, y):
        point = page.evaluate(f"viewer.imageToClient({x + 0.5}, {y + 0.5})")
        return round(point["x"]), round(point["y"])

    (ax, ay), (bx, by) = client(*box[:2]), client(*box[2:])
    page.mouse.move(ax, ay)
    page.mouse.down()
    page.mouse.move((ax + bx) // 2, (ay + by) // 2)
    page.mouse.move(bx, by)
    page.mouse.up()
    page.wait_for_function(f"viewer.state.lastAnswer && viewer.state.lastAnswer.object === {expected_object}",
                           timeout=120_000)
    return page.evaluate("viewer.state.lastAnswer")


def test_a_box_drawn_in_the_browser_gives_the_command_lines_labels(server, page, val_dir, tmp_path):
    case = np.load(val_dir / VAL_IMAGE)
    png = tmp_path / "dermoscopy.png"
    Image.fromarray(case["imgs"]).save(png)
    box = tight_boxes(case["gts"])[0].tolist()

    page.goto(server)
    page.wait_for_function("viewer.state.info !== null")
    assert MODEL in page.inner_text("#model")
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a volume")
    page.set_input_files("#file", str(broken))  # a malformed file: a message in the page, and the page goes on
    page.wait_for_function("document.querySelector('#message').className === 'error'")
    assert "broken.nii.gz: not a readable nifti image" in page.inner_text("#message")
    open_image(page, png)
    new_image = drag_box(page, box, 1)
    objects = page.evaluate("viewer.state.objects")
    assert [o["box"] for o in objects] == [box]
    drawn = page.evaluate("Array.from(viewer.state.labels.get(0)).filter(v => v === 1).length")
    assert drawn == objects[0]["pixels"] > 0  # the mask is on the page
    assert page.get_attribute("#timing", "data-ms") is not None

    cached = drag_box(page, box, 2)  # the same box again: only the decoder runs
    assert (new_image["encoder_runs"], cached["encoder_runs"]) == (1, 0)
    page.keyboard.press("Delete")  # the selected (second) object
    page.wait_for_function("viewer.state.objects.length === 1 && !viewer.state.busy")

    with page.expect_download() as download:
        page.click("#save-labels")
    assert download.value.suggested_filename == png.name
    download.value.save_as(tmp_path / "browser.png")
    (tmp_path / "boxes.json").write_text(json.dumps({png.name: [box]}))
    assert segment_main([str(png), "-o", str(tmp_path / "cli"), "--boxes", str(tmp_path / "boxes.json"),
                         "--model", MODEL]) == 0
    from_browser = np.asarray(Image.open(tmp_path / "browser.png"))
    from_cli = np.asarray(Image.open(tmp_path / "cli" / png.name))
    dsc_browser, _ = case_scores(case["gts"], from_browser)
    dsc_cli, _ = case_scores(case["gts"], from_cli)
    assert dsc_browser == dsc_cli > 0.8, (dsc_browser, dsc_cli)

    page.screenshot(path=str(tmp_path / "app.png"))
    target = os.environ.get("CP_TINYVIT_APP_SCREENSHOT")
    if target:
        shutil.copyfile(tmp_path / "app.png", REPO / target)

    # A new 512² image: the first box pays for the embedding.
    square = tmp_path / "square512.png"
    height, width = case["imgs"].shape[:2]
    Image.fromarray(cv2.resize(case["imgs"], (512, 512), interpolation=cv2.INTER_AREA)).save(square)
    open_image(page, square)
    scaled = [int(box[0] * 512 / width), int(box[1] * 512 / height), int(box[2] * 512 / width),
              int(box[3] * 512 / height)]
    first_512 = drag_box(page, scaled, 1)
    print(f"\nmouse-up to mask drawn, {MODEL}, {os.cpu_count()} CPUs: "
          f"new {height}x{width} image {new_image['ms']:.0f} ms (server {new_image['server_ms']:.0f} ms), "
          f"cached {cached['ms']:.0f} ms (server {cached['server_ms']:.0f} ms), "
          f"new 512x512 image {first_512['ms']:.0f} ms (server {first_512['server_ms']:.0f} ms)")
