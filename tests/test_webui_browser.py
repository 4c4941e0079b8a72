"""The web UI (ldm_app.webui) in a real headless browser: Debian's chromium driven by Playwright (no browser
download), against the real app (uvicorn on 127.0.0.1, a free port) serving the tiny random-weight model.

Without chromium the browser tests are skipped locally and fail under CI (the environment variable CI is set
there, and CI installs chromium). Every wait is bounded; the page must load nothing from outside 127.0.0.1.

The inpainting mask is painted as a user does: the image is uploaded into the ImageMask, then the mouse is pressed
on the editor's canvas, moved across the middle of the image and released; the test then reads the mask the
server stored next to the outputs and checks it is white along the stroke and black far from it.

Run as a script, this file writes the README's screenshots of the real page, on the bundled default model:

    python tests/test_webui_browser.py --screenshots docs/webui
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from PIL import Image, PngImagePlugin  # noqa: E402

WAIT_MS = 30_000  # the longest any single wait for the page may take (a generation on the tiny model takes ~1 s)
PROMPT = "a small red circle above a small blue square on a white background"  # the bundled model's words


# ---- the server and the browser ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(service: Any, auth: tuple[str, str] | None = None) -> Iterator[str]:
    """The real app (ldm_app.webui.build_app) under uvicorn in a thread on 127.0.0.1; yields its base URL."""
    import uvicorn

    from ldm_app.webui import build_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(service, auth), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        message = "Debian's chromium is not installed (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI installs it")
        pytest.skip(message)
    return path


@contextlib.contextmanager
def launch_browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("playwright is not installed; CI installs the test extras")
        pytest.skip("playwright is not installed (pip install -e .[test])")
    path = chromium_path()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=["--no-sandbox"])  # root needs --no-sandbox
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser: Any, url: str, outside: list[str]) -> Any:
    """A page on `url` once the UI is up; every request to anywhere but 127.0.0.1 is appended to `outside`."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(WAIT_MS)

    def record(request: Any) -> None:
        if not request.url.startswith(("http://127.0.0.1:", "data:", "blob:")):
            outside.append(request.url)

    page.on("request", record)
    page.goto(url + "/")
    page.wait_for_selector("#txt2img_prompt textarea")
    return page


def png_bytes_of(page_url: str, src: str) -> bytes:
    """The bytes the page's <img> shows, fetched from the same server (and only from it)."""
    assert src.startswith(page_url + "/"), f"the image is not served by the app: {src}"
    with urllib.request.urlopen(src, timeout=10) as response:
        return response.read()


def stroke(page: Any, start: tuple[float, float], end: tuple[float, float], moves: int = 4) -> None:
    """One brush stroke with the mouse, as a user paints: press at `start`, move in a few steps, release at `end`
    (the editor joins the points; each move redraws its canvas, slow in software WebGL, hence few moves)."""
    page.mouse.move(*start)
    page.mouse.down()
    for k in range(1, moves + 1):
        page.mouse.move(start[0] + (end[0] - start[0]) * k / moves, start[1] + (end[1] - start[1]) * k / moves)
    page.mouse.up()


def upload_to_editor(page: Any, path: Path, tries: int = 3) -> None:
    """Upload `path` into the Inpaint tab's ImageMask and wait until it is the editor's background (its Pan tool is
    enabled then). gradio's editor drops a file given before its canvas has finished starting (seen on a busy
    machine, right after the tab is first shown), so the upload is given again, a few times at most."""
    from playwright.sync_api import expect

    editor = page.locator("#inpaint_image")
    expect(editor.locator("canvas").first).to_be_visible()
    for attempt in range(tries):
        editor.locator("input[type=file]").set_input_files(str(path))
        try:
            expect(editor.locator("button[aria-label=Pan]")).to_be_enabled(timeout=5000 * (attempt + 1))
            return
        except AssertionError:
            if attempt == tries - 1:
                raise


def text_chunks(data: bytes) -> dict[str, str]:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return dict(image.text)


# ---- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_env(tiny_pipeline_dir, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Two copies of the tiny model with different stored sampling defaults, a service and the served app."""
    from ldm_app.pipeline import write_sampling_defaults
    from ldm_app.serving import GenerationService, ServerConfig
    from ldm_app.vocabulary import Vocabulary

    root = tmp_path_factory.mktemp("webui")
    models = root / "models"
    shutil.copytree(tiny_pipeline_dir, models / "tiny")
    write_sampling_defaults(models / "tiny", {"num_inference_steps": 2, "sampler": "ddim", "guidance_scale": 2.0})
    Vocabulary.from_captions([PROMPT, "blurry"]).write(models / "tiny")  # the words it was "trained" on
    shutil.copytree(tiny_pipeline_dir, models / "tiny_b")
    write_sampling_defaults(models / "tiny_b", {"num_inference_steps": 5, "sampler": "euler", "guidance_scale": 6.5,
                                                "height": 32, "width": 40})  # fmt: skip
    service = GenerationService(ServerConfig(models_dir=str(models), model="tiny", outputs_dir=str(root / "outputs")))
    try:
        with serve(service) as url, launch_browser() as browser:
            yield {"url": url, "service": service, "browser": browser, "root": root}
    finally:
        service.close()


@pytest.fixture
def page(app_env) -> Iterator[Any]:
    outside: list[str] = []
    page = open_page(app_env["browser"], app_env["url"], outside)
    yield page
    page.close()
    assert outside == [], f"the page fetched from outside 127.0.0.1: {outside}"


def _expect() -> Any:
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)  # its own default is 5 s, short on a busy 2-core machine
    return expect


# ---- tests ---------------------------------------------------------------------------------------------------------


def test_words_the_model_never_saw_are_named_in_the_status(page, app_env):
    expect = _expect()
    page.fill("#txt2img_prompt textarea", "a small red corgi on a white sushi house")
    page.click("#txt2img_generate")
    status = page.locator("#txt2img_status")
    expect(status).to_contain_text("Done: 1 image with tiny. Words unknown to this model: corgi, sushi, house.",
                                   timeout=WAIT_MS)  # fmt: skip
    page.fill("#txt2img_prompt textarea", PROMPT)
    page.click("#txt2img_generate")
    expect(status).to_contain_text("Done: 1 image with tiny.", timeout=WAIT_MS)
    expect(status).not_to_contain_text("unknown")


def test_txt2img_image_in_gallery_and_download_keeps_parameters(page, app_env):
    expect = _expect()
    # the model's stored defaults are preselected
    expect(page.locator("#model input")).to_have_value("tiny")
    expect(page.locator("#txt2img_steps input[type=number]")).to_have_value("2")
    expect(page.locator("#txt2img_sampler input")).to_have_value("ddim")
    expect(page.locator("#txt2img_width input")).to_have_value("64")

    page.fill("#txt2img_prompt textarea", PROMPT)
    page.fill("#txt2img_negative textarea", "blurry")
    page.click("#txt2img_generate")
    expect(page.locator("#txt2img_status")).to_contain_text("Done: 1 image", timeout=WAIT_MS)
    image = page.locator("#txt2img_gallery img").first
    expect(image).to_be_visible()
    seed = page.input_value("#txt2img_seed_used textarea")
    assert seed.isdigit()

    data = png_bytes_of(app_env["url"], image.get_attribute("src"))
    chunks = text_chunks(data)
    assert chunks["parameters"].startswith(PROMPT + "\nNegative prompt: blurry\n")
    assert f"Seed: {seed}," in chunks["parameters"]
    assert "Steps: 2, Sampler: ddim, CFG scale: 2.0" in chunks["parameters"]
    assert json.loads(chunks["ldm_app"])["seed"] == int(seed)
    # the bytes served are the saved file's (gradio did not re-encode it)
    saved = [p for p in (app_env["root"] / "outputs").rglob(f"*-{seed}-*.png")]
    assert len(saved) == 1 and saved[0].read_bytes() == data
    assert chunks["parameters"] in page.input_value("#txt2img_info textarea")
    # ♻ puts the seed used in the Seed field, 🎲 back to random (-1)
    page.click("#txt2img_reuse_seed")
    expect(page.locator("#txt2img_seed input")).to_have_value(seed)
    page.click("#txt2img_random_seed")
    expect(page.locator("#txt2img_seed input")).to_have_value("-1")


def test_errors_are_shown_in_the_page_and_the_server_keeps_serving(page):
    expect = _expect()
    status = page.locator("#txt2img_status")
    page.click("#txt2img_generate")  # no prompt
    expect(status).to_contain_text("Error: the prompt is empty")
    page.fill("#txt2img_prompt textarea", "a blue square")
    # (field, typed, the error); 71.6 and 3.7: gradio's rounding had generated at 72 / seed 4 with no word
    for field, typed, error in (("width", "100", "width must be a positive multiple of 8, got 100"),
                                ("width", "4096", "width is 4096 pixels, above the limit of 2048"),
                                ("width", "71.6", "a size must be a whole number of pixels, got 71.6"),
                                ("seed", "3.7", "seed must be a whole number, got 3.7")):
        page.fill("#txt2img_width input", typed if field == "width" else "64")
        page.fill("#txt2img_seed input", typed if field == "seed" else "-1")
        page.click("#txt2img_generate")
        expect(status).to_contain_text(f"Error: {error}")
    page.fill("#txt2img_seed input", "-1")
    assert page.locator("#txt2img_gallery img").count() == 0
    page.fill("#txt2img_width input", "48")
    page.click("#txt2img_generate")
    expect(status).to_contain_text("Done: 1 image")
    assert "Size: 48x64" in page.input_value("#txt2img_info textarea")
    assert "Weighting" not in page.input_value("#txt2img_info textarea")  # a plain prompt: read as before
    page.fill("#txt2img_prompt textarea", "a (blue:1.3) square")  # A1111's web UI applies the weights: so does ours
    page.click("#txt2img_generate")
    expect(page.locator("#txt2img_info textarea")).to_have_value(re.compile("Weighting: A1111"))


def test_inpaint_with_a_mask_painted_in_the_browser(page, app_env, tmp_path):
    expect = _expect()
    from ldm_app.pngmeta import KEY

    source = Image.new("RGB", (64, 64), "white")
    source.paste((255, 0, 0), (16, 16, 48, 48))
    source.save(tmp_path / "input.png")
    page.get_by_role("tab", name="Inpaint").click()
    upload_to_editor(page, tmp_path / "input.png")
    box = page.locator("#inpaint_image canvas").first.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    stroke(page, (x - 60, y), (x + 60, y))  # across the middle of the image (it is centred in the canvas)
    page.fill("#inpaint_prompt textarea", "a blue square")
    page.click("#inpaint_generate")
    expect(page.locator("#inpaint_status")).to_contain_text("Done: 1 image", timeout=WAIT_MS)

    data = png_bytes_of(app_env["url"], page.locator("#inpaint_gallery img").first.get_attribute("src"))
    chunks = text_chunks(data)
    assert "Inpaint: repaint" in chunks["parameters"]  # "auto" on a 4-channel model
    params = json.loads(chunks[KEY])
    mask = Image.open(params["mask"])
    assert mask.mode == "L" and mask.size == (64, 64)
    assert mask.getpixel((32, 32)) == 255, "the stroke's middle is not in the mask"
    for corner in ((0, 0), (63, 0), (0, 63), (63, 63), (32, 2), (32, 61)):
        assert mask.getpixel(corner) == 0, f"{corner}, far from the stroke, is in the mask"
    painted = sum(1 for v in mask.getdata() if v == 255) / 64**2
    assert 0.05 < painted < 0.7
    assert Image.open(params["init_image"]).convert("RGB").tobytes() == source.tobytes()
    # the corner is kept (paste back), the masked area is repainted: most masked pixels differ from the
    # source (one pixel alone is not enough: the tiny model's decoder saturates, and with the random seed of a web
    # request a repainted red area sometimes comes out exactly (255, 0, 0) at the centre)
    result = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    inside = np.asarray(mask) == 255
    assert (result[0, 0] == 255).all()
    changed = (np.abs(result - np.asarray(source)).max(axis=2) > 8)[inside].mean()
    assert changed > 0.5, f"only {changed:.0%} of the masked pixels were repainted"


def test_img2img_from_an_uploaded_image(page, app_env, tmp_path):
    expect = _expect()
    from ldm_app.pngmeta import KEY

    source = Image.new("RGB", (48, 40), "white")
    source.paste((0, 0, 255), (8, 8, 40, 32))
    source.save(tmp_path / "input.png")
    page.get_by_role("tab", name="Image to image").click()
    page.locator("#img2img_image input[type=file]").set_input_files(str(tmp_path / "input.png"))
    expect(page.locator("#img2img_image img")).to_be_visible()
    page.fill("#img2img_prompt textarea", "a blue square")
    page.fill("#img2img_strength input[type=number]", "0.5")
    page.click("#img2img_generate")
    expect(page.locator("#img2img_status")).to_contain_text("Done: 1 image", timeout=WAIT_MS)
    data = png_bytes_of(app_env["url"], page.locator("#img2img_gallery img").first.get_attribute("src"))
    chunks = text_chunks(data)
    assert "Denoising strength: 0.5" in chunks["parameters"] and "Size: 48x40" in chunks["parameters"]
    assert Image.open(json.loads(chunks[KEY])["init_image"]).convert("RGB").tobytes() == source.tobytes()


def test_png_info_shows_parameters_and_sends_them_to_txt2img(page, tmp_path):
    expect = _expect()
    text = ("a blue square, best quality\nNegative prompt: blurry, lowres\nSteps: 7, Sampler: Euler a, CFG scale: 4.5, "
            "Seed: 1234, Size: 40x48, Model: v1-5-pruned, Version: v1.10")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (16, 16), "gray").save(tmp_path / "a1111.png", pnginfo=info)

    page.get_by_role("tab", name="PNG info").click()
    page.locator("#pnginfo_file input[type=file]").set_input_files(str(tmp_path / "a1111.png"))
    expect(page.locator("#pnginfo_parameters textarea")).to_have_value(text)
    page.click("#pnginfo_send")
    expect(page.get_by_role("tab", name="Text to image")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#txt2img_prompt textarea")).to_have_value("a blue square, best quality")
    expect(page.locator("#txt2img_negative textarea")).to_have_value("blurry, lowres")
    expect(page.locator("#txt2img_steps input[type=number]")).to_have_value("7")
    expect(page.locator("#txt2img_guidance input[type=number]")).to_have_value("4.5")
    expect(page.locator("#txt2img_seed input")).to_have_value("1234")
    expect(page.locator("#txt2img_width input")).to_have_value("40")
    expect(page.locator("#txt2img_height input")).to_have_value("48")
    expect(page.locator("#txt2img_sampler input")).to_have_value("euler_a")
    expect(page.locator("#pnginfo_status")).to_contain_text("made with model 'v1-5-pruned'")


def test_png_info_remakes_an_image_exactly_model_and_grid_included(page, app_env, tmp_path):
    """An image made on another served model than the page's, then remade from the PNG info tab after that model
    stored a timestep grid (and later changed it): the send selects the model without resetting the sent fields to
    its defaults, and fills Timesteps so the remake samples as the image was sampled: the same pixels."""
    expect = _expect()
    from ldm_app.pipeline import write_sampling_defaults
    from ldm_app.serving import JobSpec

    service, tiny_b = app_env["service"], app_env["root"] / "models" / "tiny_b"
    stored = {"num_inference_steps": 5, "sampler": "euler", "guidance_scale": 6.5, "height": 32, "width": 40}

    def made_on_tiny_b() -> Path:  # guidance and size unlike tiny_b's stored defaults
        result = service.run(JobSpec("a blue square", seed=11, guidance_scale=3.0, width=48, height=32,
                                     model="tiny_b"), timeout=60)  # fmt: skip
        return result.paths[0]

    def remake(png: Path, expected_grid: str) -> bytes:
        page.get_by_role("tab", name="PNG info").click()
        clear = page.locator("#pnginfo_file button[aria-label='Clear']")
        if clear.count():  # a PNG already dropped: take it out first, as a person would
            clear.click()
        page.locator("#pnginfo_file input[type=file]").set_input_files(str(png))
        expect(page.locator("#pnginfo_status")).to_contain_text("Parameters read.")
        page.click("#pnginfo_send")
        expect(page.locator("#pnginfo_status")).to_contain_text("Sent to Text to image")
        expect(page.locator("#model input")).to_have_value("tiny_b")
        expect(page.locator("#txt2img_timesteps input")).to_have_value(expected_grid)
        expect(page.locator("#txt2img_guidance input[type=number]")).to_have_value("3")
        expect(page.locator("#txt2img_width input")).to_have_value("48")
        shown = page.locator("#txt2img_gallery img").first
        before = shown.get_attribute("src") if shown.count() else None
        page.click("#txt2img_generate")
        expect(page.locator("#txt2img_status")).to_contain_text("Done: 1 image with tiny_b")
        if before is not None:  # the status reads "Done" from the last remake too: wait for the new image
            expect(shown).not_to_have_attribute("src", before)
        return png_bytes_of(app_env["url"], shown.get_attribute("src"))

    def pixels(data: bytes) -> bytes:
        return Image.open(io.BytesIO(data)).convert("RGB").tobytes()

    try:
        # made on the sampler's own spacing; then the model stores a grid at these very settings
        own = made_on_tiny_b()
        write_sampling_defaults(tiny_b, {**stored, "timesteps": [999, 800, 500, 300, 100]})
        assert pixels(remake(own, "own")) == pixels(own.read_bytes())
        assert "Timesteps:" not in text_chunks(own.read_bytes())["parameters"]
        # made on that grid; then the model's grid changes
        gridded = made_on_tiny_b()
        assert "Timesteps: 999/800/500/300/100" in text_chunks(gridded.read_bytes())["parameters"]
        write_sampling_defaults(tiny_b, {**stored, "timesteps": [950, 700, 450, 200, 20]})
        again = remake(gridded, "999/800/500/300/100")
        assert pixels(again) == pixels(gridded.read_bytes())
        assert pixels(again) != pixels(own.read_bytes())  # the grid made a difference to begin with
        # a grid that does not fit the steps is a message in the page, and nothing is made
        page.fill("#txt2img_steps input[type=number]", "3")
        page.click("#txt2img_generate")
        expect(page.locator("#txt2img_status")).to_contain_text(
            "Error: Timesteps has 5 values but Steps is 3: give one timestep per step, or clear Timesteps")
    finally:
        write_sampling_defaults(tiny_b, stored)
        service.set_model("tiny")


def test_model_switch_preselects_its_defaults(page, app_env):
    expect = _expect()
    service = app_env["service"]
    try:
        page.locator("#model input").click()
        page.get_by_role("option", name="tiny_b").click()
        expect(page.locator("#txt2img_steps input[type=number]")).to_have_value("5")
        expect(page.locator("#txt2img_sampler input")).to_have_value("euler")
        expect(page.locator("#txt2img_guidance input[type=number]")).to_have_value("6.5")
        expect(page.locator("#txt2img_width input")).to_have_value("40")
        page.get_by_role("tab", name="Image to image").click()  # gradio renders a tab when it is first shown
        expect(page.locator("#img2img_steps input[type=number]")).to_have_value("5")
        expect(page.locator("#img2img_sampler input")).to_have_value("euler")
        assert service.model_name == "tiny_b"
    finally:
        service.set_model("tiny")


def test_queue_is_shared_with_the_api_and_cancel_stops_a_long_job(page, app_env):
    expect = _expect()
    from ldm_app.serving import JobSpec

    service = app_env["service"]
    status = page.locator("#txt2img_status")
    # a long job from another face (the HTTP API submits the same way) holds the worker
    other = service.submit(JobSpec("another client's job", steps=150, n_iter=50, save=False))
    page.fill("#txt2img_prompt textarea", "a long job")
    page.fill("#txt2img_steps input[type=number]", "150")
    page.fill("#txt2img_batch_count input[type=number]", "20")
    page.click("#txt2img_generate")
    expect(status).to_contain_text("Waiting in the queue: position 1 of 1 waiting, after the job running now")
    service.cancel(other)
    expect(status).to_contain_text("Image 1/20, step")
    page.click("#txt2img_cancel")
    expect(status).to_contain_text("Cancelled:", timeout=WAIT_MS)
    made = int(status.inner_text().split("Cancelled: ")[1].split(" image")[0])
    assert made < 20
    assert page.locator("#txt2img_gallery img").count() == made
    assert other.future.result(10).interrupted
    deadline = time.monotonic() + 10
    while service.progress()["busy"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert service.progress() == {"busy": False, "queued": 0, "job": None}


def test_closing_the_page_cancels_its_job(app_env):
    expect = _expect()
    service = app_env["service"]
    page = open_page(app_env["browser"], app_env["url"], [])
    page.fill("#txt2img_prompt textarea", "a job nobody waits for")
    page.fill("#txt2img_steps input[type=number]", "150")
    page.fill("#txt2img_batch_count input[type=number]", "30")
    page.click("#txt2img_generate")
    expect(page.locator("#txt2img_status")).to_contain_text("Image 1/30, step")
    page.close()
    deadline = time.monotonic() + 15
    while service.progress()["busy"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not service.progress()["busy"], "the job of a closed page still runs"


def test_auth_guards_the_page_and_the_api(app_env):
    expect = _expect()
    with serve(app_env["service"], auth=("user", "secret")) as url:
        for path in ("/config", "/sdapi/v1/sd-models"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(url + path, timeout=10)
            assert e.value.code == 401, path
        page = app_env["browser"].new_page()
        page.set_default_timeout(WAIT_MS)
        page.goto(url + "/")
        page.get_by_label("username").fill("user")
        page.get_by_label("password").fill("secret")
        page.get_by_role("button", name="Login").click()
        expect(page.locator("#txt2img_generate")).to_be_visible()
        page.close()


def test_parse_parameters_reads_ours_and_a1111s():
    from ldm_app.pngmeta import ImageParams, format_parameters
    from ldm_app.webui import MODEL_DEFAULT_SAMPLER, parse_parameters

    ours = format_parameters(ImageParams(prompt="two\nlines", negative_prompt="", seed=5, steps=9, guidance_scale=3.5,
                                         sampler=None, height=32, width=48, model="/m/tiny"))  # fmt: skip
    assert parse_parameters(ours) == {"prompt": "two\nlines", "negative_prompt": "", "steps": 9, "guidance": 3.5,
                                      "seed": 5, "width": 48, "height": 32, "sampler_text": "model default",
                                      "sampler": MODEL_DEFAULT_SAMPLER, "model": "tiny"}  # fmt: skip
    a1111 = ('cat\nNegative prompt: dog\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 512x768, '
             'Lora hashes: "a: 1, b: 2", Model: sd15')  # fmt: skip
    p = parse_parameters(a1111)
    assert (p["prompt"], p["negative_prompt"], p["sampler"], p["width"], p["height"], p["model"]) == \
        ("cat", "dog", "dpm++", 512, 768, "sd15")  # fmt: skip
    p = parse_parameters("just a prompt, Steps: many")
    assert p == {"prompt": "just a prompt, Steps: many", "negative_prompt": ""}
    assert parse_parameters("x\nSteps: 4, Timesteps: 999/700/400/100, Seed: 1")["timesteps"] == "999/700/400/100"
    assert "timesteps" not in parse_parameters("x\nSteps: 4, Timesteps: 999/-700, Seed: 1")


def test_the_timesteps_box_and_what_a_png_says_of_its_grid():
    from ldm_app.errors import UserError
    from ldm_app.webui import OWN_SPACING, parse_grid, png_grid

    def chunk(**data: Any) -> dict[str, str]:
        return {"ldm_app": json.dumps({"prompt": "x", **data})}

    assert png_grid(chunk(timesteps=[999, 500, 1])) == "999/500/1"
    assert png_grid(chunk(timesteps=None)) == OWN_SPACING
    assert png_grid(chunk()) is None  # made before grids were recorded: the model decides
    assert png_grid(chunk(timesteps=None, init_image="in.png")) is None  # an edit: no text-to-image grid
    assert png_grid({"ldm_app": "{not json"}) is None and png_grid({}) is None
    assert png_grid(chunk(timesteps=["999"])) is None
    assert parse_grid("", 4) == (None, False) and parse_grid("  ", 4) == (None, False)
    assert parse_grid(" Own ", 4) == (None, True)
    assert parse_grid("999/700/400/100", 4) == ((999, 700, 400, 100), False)
    assert parse_grid("999, 500", 2) == ((999, 500), False)
    with pytest.raises(UserError, match=r"^Timesteps: expected whole timesteps separated by '/'.*'999/x'"):
        parse_grid("999/x", 2)
    with pytest.raises(UserError, match="Timesteps has 2 values but Steps is 4"):
        parse_grid("999/500", 4)


def test_cli_refuses_bad_flags_in_one_line(capsys, tmp_path):
    from ldm_app.webui import main

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    for argv, expected in (
        (["--port", str(port)], f"--port {port}: cannot listen on 127.0.0.1:{port}"),
        (["--auth", "nocolon"], "--auth must be USER:PASSWORD"),
        (["--models_dir", str(tmp_path / "missing")], "no such folder"),
        (["--port", "99999"], "--port must be between 1 and 65535"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--model", "nope"], "unknown model 'nope'"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    taken.close()


# ---- the README's screenshots ------------------------------------------------------------------------------------


def write_screenshots(folder: Path) -> None:
    """Serve the bundled default model, make an image from the page and screenshot the Text to image and Inpaint
    tabs as a user sees them."""
    import tempfile

    from playwright.sync_api import expect

    from ldm_app.serving import GenerationService, ServerConfig

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as outputs:
        service = GenerationService(ServerConfig(outputs_dir=outputs))
        try:
            with serve(service) as url, launch_browser() as browser:
                outside: list[str] = []
                page = open_page(browser, url, outside)
                page.set_viewport_size({"width": 1280, "height": 1120})
                page.fill("#txt2img_prompt textarea", PROMPT)
                page.fill("#txt2img_seed input", "7")
                page.fill("#txt2img_batch_count input[type=number]", "4")
                page.click("#txt2img_generate")
                expect(page.locator("#txt2img_status")).to_contain_text("Done: 4 images", timeout=120_000)
                page.wait_for_timeout(500)
                page.screenshot(path=str(folder / "txt2img.png"))
                src = page.locator("#txt2img_gallery img").first.get_attribute("src")
                made = Path(outputs) / "made.png"
                made.write_bytes(png_bytes_of(url, src))
                page.get_by_role("tab", name="Inpaint").click()
                upload_to_editor(page, made)
                box = page.locator("#inpaint_image canvas").first.bounding_box()
                x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
                for dy in (20, 60, 100, 140):  # the lower half of the image, where the square is
                    stroke(page, (x - 130, y + dy), (x + 130, y + dy))
                page.fill("#inpaint_prompt textarea", PROMPT.replace("blue square", "green triangle"))
                page.fill("#inpaint_seed input", "7")
                page.click("#inpaint_generate")
                expect(page.locator("#inpaint_status")).to_contain_text("Done: 1 image", timeout=120_000)
                page.wait_for_timeout(500)
                page.screenshot(path=str(folder / "inpaint.png"))
                assert outside == [], outside
        finally:
            service.close()


if __name__ == "__main__":
    if sys.argv[1:2] != ["--screenshots"] or len(sys.argv) != 3:
        sys.exit("usage: python tests/test_webui_browser.py --screenshots FOLDER")
    write_screenshots(Path(sys.argv[2]))
