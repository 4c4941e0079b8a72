"""The A1111 HTTP API (ldm_app.a1111) on a real uvicorn server on 127.0.0.1, driven by an unmodified A1111 client
library from PyPI (webuiapi) and, for what a well-behaved client never sends, by raw HTTP (httpx, http.client).

One server for the module (tiny random-weight models "tiny" and "tiny2", a LoRA "style", outputs in a temporary
folder); a second one with HTTP basic auth; a third with a two-job queue for the 503 test. Every generation is
64x64 (or the model's stored default size) with 2-4 steps, so the module runs in well under a minute on CPU.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import shutil
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import numpy as np
import pytest
import uvicorn
import webuiapi
from fastapi import FastAPI
from PIL import Image

from conftest import build_tiny_components
from ldm_app.a1111 import MAX_BODY_BYTES, api_router
from ldm_app.pipeline import LatentDiffusionPipeline, write_sampling_defaults
from ldm_app.serving import GenerationService, ServerConfig
from ldm_app.vocabulary import Vocabulary

PROMPT = "a red circle on a gray background"
SMALL = dict(width=64, height=64, steps=2)  # webuiapi's defaults are A1111's 512x512 and 20 steps
# the stored defaults of model "tiny" (its ldm_app.json): what a client that omits the fields gets
TINY_DEFAULTS = {"sampler": "euler", "num_inference_steps": 3, "guidance_scale": 2.5, "height": 48, "width": 32}


# ---- servers ------------------------------------------------------------------------------------------------------


@dataclass
class Server:
    port: int
    service: GenerationService
    root: Path  # everything the server may touch: models/, loras/, outputs/

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/sdapi/v1"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    def client(self) -> webuiapi.WebUIApi:
        return webuiapi.WebUIApi(host="127.0.0.1", port=self.port)

    def post(self, route: str, payload: Any, **kwargs: Any) -> httpx.Response:
        return httpx.post(f"{self.url}/{route}", json=payload, timeout=60, **kwargs)

    def get(self, route: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(f"{self.url}/{route}", timeout=60, **kwargs)


@contextlib.contextmanager
def serve(service: GenerationService, root: Path, auth: tuple[str, str] | None = None) -> Iterator[Server]:
    """uvicorn in a background thread on a socket bound here (port 0: the kernel picks a free port, no race)."""
    app = FastAPI()
    app.include_router(api_router(service, auth))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield Server(sock.getsockname()[1], service, root)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll `condition` until it returns a true value (returned); fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def root(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """models/tiny (the conftest model, with stored sampling defaults), models/tiny2 (other weights), loras/style."""
    from test_adapters import peft_lora, save_diffusers_lora

    root = tmp_path_factory.mktemp("a1111")
    shutil.copytree(tiny_pipeline_dir, root / "models" / "tiny")
    write_sampling_defaults(root / "models" / "tiny", TINY_DEFAULTS)
    LatentDiffusionPipeline(**build_tiny_components(seed=1)).save_pretrained(root / "models" / "tiny2")
    Vocabulary.from_captions([PROMPT]).write(root / "models" / "tiny2")  # its training words (tiny has none stored)
    (root / "loras").mkdir()
    unet_sd, te_sd = peft_lora(seed=1)
    save_diffusers_lora(root / "loras", "style.safetensors", unet_sd, te_sd)
    (root / "outputs").mkdir()
    return root


def make_service(root: Path, max_queue: int = 16) -> GenerationService:
    return GenerationService(ServerConfig(models_dir=str(root / "models"), model="tiny", loras_dir=str(root / "loras"),
                                          outputs_dir=str(root / "outputs"), max_queue=max_queue))  # fmt: skip


@pytest.fixture(scope="module")
def server(root) -> Iterator[Server]:
    service = make_service(root)
    with serve(service, root) as s:
        yield s
    service.close()


@pytest.fixture
def api(server) -> webuiapi.WebUIApi:
    return server.client()


# ---- helpers ------------------------------------------------------------------------------------------------------


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def gradient_image(width: int = 64, height: int = 64) -> Image.Image:
    """A smooth colour gradient (a fixed, non-trivial init image)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), np.full_like(x, 128)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def square_mask(size: int = 64, lo: int = 16, hi: int = 48) -> Image.Image:
    mask = np.zeros((size, size), np.uint8)
    mask[lo:hi, lo:hi] = 255
    return Image.fromarray(mask, "L")


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit RGB) with a few bytes of pixel data: a decompression bomb as
    far as any reader that trusts the header is concerned."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


# ---- generation through webuiapi ----------------------------------------------------------------------------------


def test_txt2img_size_seed_and_parameters_chunk(api):
    first = api.txt2img(prompt=PROMPT, seed=123, **SMALL)
    again = api.txt2img(prompt=PROMPT, seed=123, **SMALL)
    other = api.txt2img(prompt=PROMPT, seed=124, **SMALL)
    assert len(first.images) == 1 and first.image.size == (64, 64)
    assert np.array_equal(pixels(first.image), pixels(again.image))  # same seed, same pixels
    assert not np.array_equal(pixels(first.image), pixels(other.image))
    info = first.info  # webuiapi json.loads the info string
    assert isinstance(first.json["info"], str)
    assert info["seed"] == 123 and info["all_seeds"] == [123]
    assert (info["width"], info["height"], info["steps"]) == (64, 64, 2)
    assert info["sampler_name"] == "Euler a" and info["sampler"] == "euler_a"  # webuiapi's default sampler
    assert info["prompt"] == PROMPT and info["sd_model_name"] == "tiny"
    assert info["ignored_fields"] == {}  # webuiapi's defaults change nothing we do not do
    assert len(info["job_timestamp"]) == 14 and info["job_timestamp"].isdigit()
    # the PNG carries A1111's parameters chunk, the same text as info's infotexts
    text = first.image.info["parameters"]
    assert text == info["infotexts"][0]
    assert text.startswith(PROMPT + "\n") and "Seed: 123" in text and "Size: 64x64" in text
    assert first.parameters["prompt"] == PROMPT and first.parameters["seed"] == 123  # the request echoed


def test_txt2img_batch_random_seed_and_consecutive_seeds(api):
    result = api.txt2img(prompt=PROMPT, seed=-1, batch_size=2, n_iter=2, **SMALL)
    info = result.info
    assert len(result.images) == 4
    assert info["seed"] >= 0 and info["all_seeds"] == [info["seed"] + k for k in range(4)]
    assert info["batch_size"] == 2 and info["n_iter"] == 2
    assert [f"Seed: {s}," in t for s, t in zip(info["all_seeds"], info["infotexts"])] == [True] * 4
    # image k is made from seed + k whatever its batch (up to float rounding: a batch of 2 computes differently)
    remade = pixels(api.txt2img(prompt=PROMPT, seed=info["all_seeds"][2], **SMALL).image)
    assert np.abs(remade - pixels(result.images[2])).max() <= 3
    assert np.abs(remade - pixels(result.images[1])).mean() > 5


def test_omitted_fields_take_the_models_stored_defaults(server):
    response = server.post("txt2img", {"prompt": PROMPT, "seed": 5, "negative_prompt": None, "controlnet_units": []})
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert (info["width"], info["height"]) == (TINY_DEFAULTS["width"], TINY_DEFAULTS["height"])  # not 512x512
    assert info["steps"] == TINY_DEFAULTS["num_inference_steps"]
    assert info["cfg_scale"] == TINY_DEFAULTS["guidance_scale"]
    assert info["sampler"] == "euler" and info["sampler_name"] == "Euler"
    assert set(info["model_defaults_used"]) == {"steps", "cfg_scale", "width", "height", "sampler_name"}
    assert info["ignored_fields"] == {"controlnet_units": "unknown field"}
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
    assert image.size == (TINY_DEFAULTS["width"], TINY_DEFAULTS["height"])


def test_samplers_by_a1111_name_alias_index_and_our_name(server, api):
    names = api.util_get_sampler_names()
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "PLMS", "DDPM"} <= set(names)
    assert [s["name"] for s in api.get_schedulers()] == ["automatic"]
    assert api.txt2img(prompt=PROMPT, seed=1, sampler_name="DPM++ 2M", **SMALL).info["sampler"] == "dpm++"
    for payload, ours in (({"sampler_index": "DDIM"}, "ddim"), ({"sampler_index": "k_euler"}, "euler"),
                          ({"sampler_name": "plms"}, "plms"), ({"sampler_index": 5}, "ddpm")):  # fmt: skip
        response = server.post("txt2img", {"prompt": PROMPT, **SMALL, **payload})
        assert response.status_code == 200, response.text
        assert json.loads(response.json()["info"])["sampler"] == ours


def test_unsupported_fields_are_ignored_with_a_note(api):
    result = api.txt2img(prompt=PROMPT, seed=3, enable_hr=True, restore_faces=True, styles=["cinematic"],
                         subseed_strength=0.5, scheduler="karras", sampler_name="DDIM", eta=0.7,
                         override_settings={"CLIP_stop_at_last_layers": 2},
                         alwayson_scripts={"ControlNet": {"args": []}}, **SMALL)  # fmt: skip
    ignored = result.info["ignored_fields"]
    assert {"enable_hr", "restore_faces", "styles", "subseed_strength", "scheduler", "eta", "alwayson_scripts",
            "override_settings.CLIP_stop_at_last_layers"} <= set(ignored)  # fmt: skip
    assert "ControlNet" in ignored["alwayson_scripts"]
    plain = api.txt2img(prompt=PROMPT, seed=3, sampler_name="DDIM", eta=0.0, **SMALL)
    assert plain.info["ignored_fields"] == {}
    assert np.array_equal(pixels(result.image), pixels(plain.image))  # the ignored fields really changed nothing


def test_prompt_words_the_model_never_saw_are_named_in_info(api):
    tiny2 = {"override_settings": {"sd_model_checkpoint": "tiny2"}}
    result = api.txt2img(prompt="a red corgi on a gray sushi house", seed=1, **tiny2, **SMALL)
    assert result.info["sd_model_name"] == "tiny2"
    assert result.info["notes"] == ["words unknown to this model: corgi, sushi, house"]
    assert api.txt2img(prompt=PROMPT, seed=1, **tiny2, **SMALL).info["notes"] == []
    assert api.txt2img(prompt="a red corgi", seed=1, **SMALL).info["notes"] == []  # tiny: no vocabulary stored


def test_img2img_keeps_the_init_size_when_width_and_height_are_omitted(server):
    init = gradient_image(80, 48)
    response = server.post("img2img", {"prompt": PROMPT, "init_images": [b64_png(init)], "steps": 4, "seed": 2,
                                       "denoising_strength": 0.5})  # fmt: skip
    assert response.status_code == 200, response.text
    out = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
    info = json.loads(response.json()["info"])
    assert out.size == (80, 48) and (info["width"], info["height"]) == (80, 48)
    assert info["denoising_strength"] == 0.5
    assert response.json()["parameters"]["init_images"] is None  # A1111 echoes them only with include_init_images


def test_img2img_resizes_an_init_image_whose_sides_are_not_multiples_of_8(server):
    init = gradient_image(65, 47)  # any photo's size; A1111's resize_mode 0 resizes it to width x height
    for size, expected in (({"width": 64, "height": 48}, (64, 48)), ({}, (64, 40))):
        response = server.post("img2img", {"prompt": PROMPT, "init_images": [b64_png(init)], "steps": 4, "seed": 2,
                                           "denoising_strength": 0.5, **size})  # fmt: skip
        assert response.status_code == 200, response.text
        out = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
        assert out.size == expected, size


def test_img2img_mask_keeps_unmasked_pixels(api):
    init, mask = gradient_image(), square_mask()
    result = api.img2img(images=[init], mask_image=mask, inpainting_fill=1, denoising_strength=0.9, mask_blur=0,
                         prompt=PROMPT, seed=4, **SMALL)  # fmt: skip
    info = result.info
    assert info["inpaint"] == "blend" and info["denoising_strength"] == 0.9
    out, src, inside = pixels(result.image), pixels(init), np.asarray(mask) > 127
    assert result.image.size == (64, 64)
    assert np.abs(out - src)[~inside].max() <= 1  # pasted back (A1111's overlay), up to rounding
    assert np.abs(out - src)[inside].mean() > 10  # the masked square was repainted
    assert "Inpaint: blend" in result.image.info["parameters"]


def test_inpainting_fill_modes_and_mask_invert(api):
    init, mask = gradient_image(), square_mask()
    expected = {0: ("repaint", 1.0), 1: ("blend", 0.6), 2: ("blend", 1.0), 3: ("blend", 1.0)}
    for fill, (method, strength) in expected.items():
        result = api.img2img(images=[init], mask_image=mask, inpainting_fill=fill, denoising_strength=0.6,
                             prompt=PROMPT, seed=4, mask_blur=2, **SMALL)  # fmt: skip
        assert (result.info["inpaint"], result.info["denoising_strength"]) == (method, strength), fill
        assert ("denoising_strength" in result.info["ignored_fields"]) == (fill != 1)
        assert "inpaint_full_res" in result.info["ignored_fields"]  # webuiapi sends True ("only masked")
    inverted = api.img2img(images=[init], mask_image=mask, inpainting_fill=1, inpainting_mask_invert=1,
                           denoising_strength=0.9, mask_blur=0, prompt=PROMPT, seed=4, **SMALL)  # fmt: skip
    out, src, inside = pixels(inverted.image), pixels(init), np.asarray(mask) > 127
    assert np.abs(out - src)[inside].max() <= 1  # the square is now what is kept
    assert np.abs(out - src)[~inside].mean() > 10


def test_models_options_and_model_switch(server, api):
    titles = api.util_get_model_names()
    assert {"tiny", "tiny2"} <= set(titles)
    assert api.util_get_current_model() == "tiny"
    before = api.txt2img(prompt=PROMPT, seed=7, **SMALL)
    try:
        api.util_set_model("tiny2")  # lower-cases and matches, then POST /options sd_model_checkpoint
        assert api.get_options()["sd_model_checkpoint"] == "tiny2"
        assert api.util_get_current_model() == "tiny2"
        after = api.txt2img(prompt=PROMPT, seed=7, **SMALL)
        assert after.info["sd_model_name"] == "tiny2" and "Model: tiny2" in after.image.info["parameters"]
        assert not np.array_equal(pixels(before.image), pixels(after.image))  # other weights, other image
    finally:
        api.set_options({"sd_model_checkpoint": "tiny"})
    assert api.get_options()["sd_model_checkpoint"] == "tiny"
    # override_settings picks the model for one job only
    once = api.txt2img(prompt=PROMPT, seed=7, override_settings={"sd_model_checkpoint": "tiny2"}, **SMALL)
    assert once.info["sd_model_name"] == "tiny2" and once.info["ignored_fields"] == {}
    assert np.array_equal(pixels(once.image), pixels(after.image))
    assert api.get_options()["sd_model_checkpoint"] == "tiny"
    try:  # ... and for later jobs too when the client asks not to restore the settings afterwards
        kept = api.txt2img(prompt=PROMPT, seed=7, override_settings={"sd_model_checkpoint": "TINY2"},
                           override_settings_restore_afterwards=False, **SMALL)  # fmt: skip
        assert kept.info["sd_model_name"] == "tiny2" and api.get_options()["sd_model_checkpoint"] == "tiny2"
    finally:
        api.set_options({"sd_model_checkpoint": "tiny"})


def test_options_we_do_not_apply_are_noted_on_later_jobs(server, api, caplog):
    """POST /options answers A1111's null whatever it holds (webuiapi reads that): an option set to a value we do
    not apply is logged, GET still shows what we do, and the jobs that follow list it in ignored_fields."""
    try:
        with caplog.at_level("WARNING", logger="ldm_app.a1111"):
            assert api.set_options({"CLIP_stop_at_last_layers": 2, "samples_format": "png"}) is None
        assert "CLIP_stop_at_last_layers" in caplog.text and "samples_format" not in caplog.text
        assert api.get_options()["CLIP_stop_at_last_layers"] == 1
        info = api.txt2img(prompt=PROMPT, seed=1, **SMALL).info
        assert set(info["ignored_fields"]) == {"options.CLIP_stop_at_last_layers"}
    finally:
        api.set_options({"CLIP_stop_at_last_layers": 1})
    assert api.txt2img(prompt=PROMPT, seed=1, **SMALL).info["ignored_fields"] == {}


def test_progress_and_interrupt(server, api):
    assert api.get_progress()["state"]["job_count"] == 0  # idle: what util_wait_for_ready waits for
    outcome: dict[str, Any] = {}

    def long_job() -> None:
        outcome["result"] = server.client().txt2img(prompt=PROMPT, seed=9, width=64, height=64, steps=400)
        outcome["done"] = time.monotonic()

    thread = threading.Thread(target=long_job)
    thread.start()
    try:
        running = wait_for(lambda: (p := api.get_progress())["state"]["sampling_step"] >= 2 and p, what="step 2")
        state = running["state"]
        assert state["sampling_steps"] == 400 and state["job_count"] == 1 and state["job_no"] == 0
        assert 0 < running["progress"] < 1 and running["eta_relative"] > 0 and "step" in running["textinfo"]
        first_step, first_seen = state["sampling_step"], time.monotonic()
        later = wait_for(lambda: (p := api.get_progress())["state"]["sampling_step"] >= first_step + 2 and p,
                         what="two more steps")  # fmt: skip
        seconds_per_step = (time.monotonic() - first_seen) / (later["state"]["sampling_step"] - first_step)
        steps_left = 400 - later["state"]["sampling_step"]
        assert api.interrupt() == {}
        asked = time.monotonic()
    finally:
        thread.join(120)
    info = outcome["result"].info
    assert info["interrupted"] is True and len(outcome["result"].images) == 1  # the image so far, as A1111
    # ended well before the remaining steps could have run
    assert outcome["done"] - asked < 0.5 * steps_left * seconds_per_step
    assert api.get_progress()["state"]["job_count"] == 0


def test_png_info(api):
    made = api.txt2img(prompt=PROMPT, negative_prompt="blurry", seed=11, **SMALL)
    read = api.png_info(made.image)
    assert read.info == made.image.info["parameters"]
    assert read.parameters["Prompt"] == PROMPT and read.parameters["Negative prompt"] == "blurry"
    assert read.parameters["Seed"] == "11" and read.parameters["Size-1"] == "64"
    assert json.loads(read.json["items"]["ldm_app"])["seed"] == 11
    assert api.png_info(gradient_image()).info == ""  # an image without parameters


def test_png_info_reads_an_image_above_the_generation_limit(api, server):
    """An upscaled 4096 px image: too large to generate or to take as an init image, but its text needs no
    pixels, so png-info reads it (from the chunks before the pixel data), as A1111's does."""
    made = api.txt2img(prompt=PROMPT, seed=12, **SMALL)
    big = made.image.resize((4096, 4096), Image.NEAREST)
    big.info = dict(made.image.info)  # webuiapi sends an image's text chunks with it
    read = api.png_info(big)
    assert read.info == made.image.info["parameters"] and read.parameters["Seed"] == "12"
    # a header claiming 4096 px over a few bytes of pixels: read without inflating anything, and it has no text
    answer = server.post("png-info", {"image": b64(png_claiming(4096, 4096))})
    assert answer.status_code == 200 and answer.json()["info"] == ""


def test_infotext_fills_what_the_request_leaves_out_and_remakes_on_its_grid(server, root):
    """A1111's `infotext` field: the fields a request omits come from an image's parameters text (the request's own
    win), and an ldm_app image's `Timesteps:` grid is sampled on again after the model's stored grid changed."""
    tiny = root / "models" / "tiny"

    def txt2img(payload: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        response = server.post("txt2img", payload)
        assert response.status_code == 200, response.text
        image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
        return pixels(image), json.loads(response.json()["info"])

    try:
        write_sampling_defaults(tiny, {**TINY_DEFAULTS, "timesteps": [900, 500, 100]})
        made, info = txt2img({"prompt": PROMPT, "negative_prompt": "blurry", "seed": 42})
        text = info["infotexts"][0]
        assert "Timesteps: 900/500/100" in text
        write_sampling_defaults(tiny, {**TINY_DEFAULTS, "timesteps": [999, 600, 50]})
        on_new_grid, _ = txt2img({"prompt": PROMPT, "negative_prompt": "blurry", "seed": 42})
        assert not np.array_equal(on_new_grid, made)  # the stored grid changed what the same request makes

        remade, info = txt2img({"infotext": text})
        assert np.array_equal(remade, made)
        assert (info["prompt"], info["negative_prompt"], info["seed"], info["steps"], info["sampler"]) == \
            (PROMPT, "blurry", 42, 3, "euler")  # fmt: skip
        assert (info["width"], info["height"], info["cfg_scale"]) == (32, 48, 2.5)
        assert info["ignored_fields"] == {} and "Timesteps: 900/500/100" in info["infotexts"][0]

        # what the request sets wins; a grid that no longer fits its steps or sampler is left out, with a note
        _, info = txt2img({"infotext": text, "seed": 7, "steps": 2})
        assert (info["seed"], info["steps"], info["prompt"]) == (7, 2, PROMPT)
        assert "infotext.Timesteps" in info["ignored_fields"] and "Timesteps:" not in info["infotexts"][0]
        _, info = txt2img({"infotext": text, "sampler_name": "DDIM"})
        assert info["sampler"] == "ddim" and "infotext.Timesteps" in info["ignored_fields"]
        _, info = txt2img({"infotext": text, "sampler_name": "Euler"})  # the same sampler by its A1111 name
        assert "infotext.Timesteps" not in info["ignored_fields"] and "Timesteps: 900/500/100" in info["infotexts"][0]
        # another model than the infotext's is used as selected, with a note (A1111 does not switch on it either)
        other = text.replace("Model: tiny", "Model: tiny2")
        assert other != text
        _, info = txt2img({"infotext": other})
        assert info["sd_model_name"] == "tiny" and "tiny2" in info["ignored_fields"]["infotext.Model"]
        response = server.post("txt2img", {"infotext": "a cat\nSteps: many, Sampler: Euler, Seed: 1"})
        assert response.status_code == 400 and response.json()["detail"] == \
            "infotext: Steps 'many' is not a whole number"  # fmt: skip
    finally:
        write_sampling_defaults(tiny, TINY_DEFAULTS)


def test_lora_tags_in_the_prompt(server, api):
    assert [lora["name"] for lora in api.get_loras()] == ["style"]
    plain = api.txt2img(prompt=PROMPT, seed=12, **SMALL)
    styled = api.txt2img(prompt=f"{PROMPT} <lora:style:0.8>", seed=12, **SMALL)
    assert styled.info["all_prompts"] == [PROMPT]  # the tag is taken out of the prompt
    assert "Lora: style:0.8" in styled.image.info["parameters"]
    assert not np.array_equal(pixels(plain.image), pixels(styled.image))
    response = server.post("txt2img", {"prompt": f"{PROMPT} <lora:nope:1>", **SMALL})
    assert response.status_code == 400 and "unknown LoRA 'nope'" in response.json()["detail"]


def _txt2img(server: Server, payload: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    response = server.post("txt2img", payload)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
    return pixels(image), json.loads(response.json()["info"])


def test_infotext_of_a_lora_image_applies_its_lora_line(server, root):
    """Our PNG text has the LoRAs on a `Lora:` line, not as tags in the prompt: an infotext's prompt brings them
    back (by catalog name, a name with spaces too); a request with its own prompt gets a note instead."""
    made, info = _txt2img(server, {"prompt": f"{PROMPT} <lora:style:0.8>", "seed": 1, **SMALL})
    text = info["infotexts"][0]
    assert "Lora: style:0.8" in text and "<lora" not in text
    remade, again = _txt2img(server, {"infotext": text})
    assert np.array_equal(remade, made) and again["ignored_fields"] == {}
    assert "Lora: style:0.8" in again["infotexts"][0]
    without, _ = _txt2img(server, {"infotext": text.replace(" Lora: style:0.8,", "")})
    assert not np.array_equal(without, made)  # the LoRA is what made the difference
    # the request's own prompt wins, and its LoRAs with it: the infotext's are not applied, with a note
    own, info = _txt2img(server, {"infotext": text, "prompt": PROMPT})
    assert np.array_equal(own, without) and "style" in info["ignored_fields"]["infotext.Lora"]
    response = server.post("txt2img", {"infotext": text.replace("Lora: style:0.8", "Lora: nope:0.8")})
    assert response.status_code == 400 and "unknown LoRA 'nope'" in response.json()["detail"]
    response = server.post("txt2img", {"infotext": text.replace("Lora: style:0.8", "Lora: style")})
    assert response.status_code == 400 and "infotext: Lora" in response.json()["detail"]
    # a name with a space, next to another on the same line (pngmeta separates them with a space)
    spaced = root / "loras" / "my style.safetensors"
    shutil.copyfile(root / "loras" / "style.safetensors", spaced)
    try:
        two, info = _txt2img(server, {"prompt": f"{PROMPT} <lora:my style:0.5> <lora:style:0.3>", "seed": 1,
                                      **SMALL})  # fmt: skip
        text = info["infotexts"][0]
        assert "Lora: my style:0.5 style:0.3" in text
        remade, info = _txt2img(server, {"infotext": text})
        assert np.array_equal(remade, two) and info["ignored_fields"] == {}
    finally:
        spaced.unlink()


def test_lora_line_of_an_infotext_is_read_entry_by_entry():
    from ldm_app.a1111 import parse_lora_field
    from ldm_app.errors import UserError

    assert parse_lora_field("my style:0.5 style:1 a:b:-2 tiny:1e-05") == \
        [("my style", 0.5), ("style", 1.0), ("a:b", -2.0), ("tiny", 1e-05)]  # fmt: skip
    for bad in ("style", "style:lots", "style:0.5x"):
        with pytest.raises(UserError, match="NAME:SCALE"):
            parse_lora_field(bad)


def test_infotext_clip_skip_other_than_1_gets_a_note(server):
    _, info = _txt2img(server, {"prompt": PROMPT, "seed": 1, **SMALL})
    text = info["infotexts"][0]
    _, info = _txt2img(server, {"infotext": text + ", Clip skip: 2"})
    assert "infotext.Clip skip" in info["ignored_fields"]
    _, info = _txt2img(server, {"infotext": text + ", Clip skip: 1"})  # what we do anyway
    assert info["ignored_fields"] == {}


def test_prompt_weights_are_applied_and_recorded(server):
    """A1111 applies (word:1.3)-style emphasis by default: so does the API, for a prompt that uses the syntax (a
    plain prompt is read as before); the PNG text says which reading was used, and its infotext remakes it."""
    plain, info = _txt2img(server, {"prompt": "a red circle", "seed": 1, **SMALL})
    assert "Weighting" not in info["infotexts"][0]
    # (red) and (red:1.1) are the same weight: one image; read as plain text they are other characters
    bare, info = _txt2img(server, {"prompt": "a (red) circle", "seed": 1, **SMALL})
    weighted, info = _txt2img(server, {"prompt": "a (red:1.1) circle", "seed": 1, **SMALL})
    assert np.array_equal(bare, weighted) and not np.array_equal(weighted, plain)
    assert info["ignored_fields"] == {} and "Weighting: A1111" in info["infotexts"][0]
    # the negative prompt's syntax counts too
    _, info = _txt2img(server, {"prompt": "a red circle", "negative_prompt": "[blurry]", "seed": 1, **SMALL})
    assert "Weighting: A1111" in info["infotexts"][0]
    text = _txt2img(server, {"prompt": "a (red:1.1) circle", "seed": 1, **SMALL})[1]["infotexts"][0]
    remade, _ = _txt2img(server, {"infotext": text})
    assert np.array_equal(remade, weighted)
    # the text's plain-text reading is honoured: other pixels, the same as a job made that way
    plain_text = text.replace("Weighting: A1111", "Weighting: plain text")
    as_text, info = _txt2img(server, {"infotext": plain_text})
    assert not np.array_equal(as_text, weighted) and "Weighting: plain text" in info["infotexts"][0]
    # our text without the field was made before it existed, when the API and generate.py read plain text
    assert text.count(" Weighting: A1111,") == 1
    older, _ = _txt2img(server, {"infotext": text.replace(" Weighting: A1111,", "")})
    assert np.array_equal(older, as_text)
    _, info = _txt2img(server, {"infotext": plain_text, "prompt": "a (red:1.1) circle"})  # the request's prompt wins
    assert "Weighting: A1111" in info["infotexts"][0] and "infotext.Weighting" in info["ignored_fields"]
    response = server.post("txt2img", {"infotext": text.replace("Weighting: A1111", "Weighting: maybe")})
    assert response.status_code == 400 and "infotext: Weighting 'maybe'" in response.json()["detail"]


def test_infotext_remakes_cli_images_made_with_and_without_weighting(server, root, tmp_path):
    """generate.py reads (word:1.3) as plain text unless --weighting: its PNG text says which, so the API remakes
    both exactly from their text (and `--from_png`, which reads the JSON chunk, is unchanged)."""
    from ldm_app.generate import main
    from ldm_app.pngmeta import read_params

    made = {}
    for flags, reading in (((), "plain text"), (("--weighting",), "A1111")):
        path = main(["a (red:1.3) circle", "--model", str(root / "models" / "tiny"), "--seed", "3", "--steps", "2",
                     "--width", "64", "--height", "64", "--output", str(tmp_path / f"{reading}.png"), *flags])[0]
        with Image.open(path) as image:
            text, made[reading] = image.info["parameters"], pixels(image)
        assert f"Weighting: {reading}" in text
        remade, info = _txt2img(server, {"infotext": text})
        assert np.array_equal(remade, made[reading]), reading
        assert read_params(path).weighting == bool(flags)
        again = main(["--from_png", str(path), "--output", str(tmp_path / f"again {reading}.png")])[0]
        with Image.open(again) as image:
            assert np.array_equal(pixels(image), made[reading])
    assert not np.array_equal(made["plain text"], made["A1111"])


# ---- bad input, auth, files ---------------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


BAD_REQUESTS: list[tuple[str, str, Any, int, str]] = [
    # (case, route, payload, status, a word of the message)
    ("empty prompt", "txt2img", {"prompt": "", **SMALL}, 400, "prompt"),
    ("blank prompt", "txt2img", {"prompt": "   ", **SMALL}, 400, "prompt"),
    ("oversize width", "txt2img", {"prompt": PROMPT, "width": 100_000, "height": 64}, 400, "width"),
    ("width not a multiple of 8", "txt2img", {"prompt": PROMPT, "width": 60, "height": 64}, 400, "width"),
    ("oversize batch", "txt2img", {"prompt": PROMPT, "batch_size": 100_000, **SMALL}, 400, "batch_size"),
    ("oversize batch pixels", "txt2img", {"prompt": PROMPT, "batch_size": 64, "width": 2048, "height": 2048,
                                          "steps": 2}, 400, "pixels"),  # fmt: skip
    ("oversize n_iter", "txt2img", {"prompt": PROMPT, "n_iter": 10**9, **SMALL}, 400, "n_iter"),
    ("zero steps", "txt2img", {"prompt": PROMPT, "width": 64, "height": 64, "steps": 0}, 400, "steps"),
    ("huge cfg", "txt2img", {"prompt": PROMPT, "cfg_scale": 1e9, **SMALL}, 400, "cfg_scale"),
    ("negative seed", "txt2img", {"prompt": PROMPT, "seed": -5, **SMALL}, 400, "seed"),
    ("unknown sampler", "txt2img", {"prompt": PROMPT, "sampler_name": "DPM++ 2M Karras", **SMALL}, 404, "Sampler"),
    ("wrong type", "txt2img", {"prompt": PROMPT, "width": "wide"}, 422, "width"),
    ("seed true", "txt2img", {"prompt": PROMPT, "seed": True, **SMALL}, 422, "seed"),
    ("steps true", "txt2img", {"prompt": PROMPT, "width": 64, "height": 64, "steps": True}, 422, "steps"),
    ("cfg_scale false", "txt2img", {"prompt": PROMPT, "cfg_scale": False, **SMALL}, 422, "cfg_scale"),
    ("inpainting_fill true", "img2img", {"prompt": PROMPT, "init_images": [b64_png(gradient_image())],
                                         "mask": b64_png(square_mask()), "inpainting_fill": True, **SMALL}, 422,
     "inpainting_fill"),
    ("unknown model", "txt2img", {"prompt": PROMPT, "override_settings": {"sd_model_checkpoint": "../../etc"},
                                  **SMALL}, 400, "unknown model"),  # fmt: skip
    ("unknown LoRA", "txt2img", {"prompt": "<lora:../../etc/passwd:1> x", **SMALL}, 400, "LoRA"),
    ("LoRA scale not a number", "txt2img", {"prompt": "<lora:style:lots> x", **SMALL}, 400, "not a number"),
    ("model path in options", "options", {"sd_model_checkpoint": "../../etc"}, 400, "unknown model"),
    ("no init image", "img2img", {"prompt": PROMPT, "init_images": []}, 400, "init_images"),
    ("invalid base64", "img2img", {"prompt": PROMPT, "init_images": ["not base64 !!"]}, 400, "base64"),
    ("not an image", "img2img", {"prompt": PROMPT, "init_images": [b64(b"hello world")]}, 400, "not a readable"),
    ("header above the limit", "img2img", {"prompt": PROMPT, "init_images": [b64(png_claiming(4096, 4096))]}, 400,
     "4096x4096"),
    ("decompression bomb", "img2img", {"prompt": PROMPT, "init_images": [b64(png_claiming(30000, 30000))]}, 400,
     "decompression bomb"),
    ("mask of another size", "img2img", {"prompt": PROMPT, "init_images": [b64_png(gradient_image())],
                                         "mask": b64_png(square_mask(32, 8, 24)), **SMALL}, 400, "32x32"),
    ("all-black mask", "img2img", {"prompt": PROMPT, "init_images": [b64_png(gradient_image())],
                                   "mask": b64_png(Image.new("L", (64, 64), 0)), **SMALL}, 400, "black"),
    ("bomb mask", "img2img", {"prompt": PROMPT, "init_images": [b64_png(gradient_image())],
                              "mask": b64(png_claiming(30000, 30000)), **SMALL}, 400, "decompression bomb"),
    ("unknown inpainting_fill", "img2img", {"prompt": PROMPT, "init_images": [b64_png(gradient_image())],
                                            "mask": b64_png(square_mask()), "inpainting_fill": 7, **SMALL}, 400,
     "inpainting_fill"),
    ("zero denoising strength", "img2img", {"prompt": PROMPT, "init_images": [b64_png(gradient_image())],
                                            "denoising_strength": 0, **SMALL}, 400, "denoising_strength"),
    ("png-info invalid base64", "png-info", {"image": "%%%"}, 400, "base64"),
    ("png-info bomb", "png-info", {"image": b64(png_claiming(30000, 30000))}, 400, "DecompressionBomb"),
]


def test_bad_input_is_a_4xx_with_a_one_line_message_and_writes_nothing(server):
    before = files_under(server.root)
    answers = {}
    for case, route, payload, status, word in BAD_REQUESTS:
        response = server.post(route, payload)
        body = response.json()
        answers[case] = (response.status_code, body.get("detail"))
        assert response.status_code == status, (case, response.text)
        assert set(body) >= {"error", "detail"} and isinstance(body["detail"], str), case
        assert "\n" not in body["detail"] and "Traceback" not in body["detail"] and body["detail"], case
        assert word in body["detail"], (case, body["detail"])
    raw = httpx.post(f"{server.url}/txt2img", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 422 and "JSON" in raw.json()["detail"]
    assert files_under(server.root) == before  # nothing written for a refused request, not even inputs/
    assert server.service.model_name == "tiny"
    assert server.post("txt2img", {"prompt": PROMPT, **SMALL}).status_code == 200  # still serving


def test_oversize_body_is_refused_before_it_is_read(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.putrequest("POST", "/sdapi/v1/img2img")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
        connection.endheaders()  # and no body: the answer must come without it
        response = connection.getresponse()
        assert response.status == 413 and "limit" in json.loads(response.read())["detail"]
    finally:
        connection.close()


def test_a_chunked_body_is_cut_off_at_the_limit(server, monkeypatch):
    import ldm_app.a1111

    monkeypatch.setattr(ldm_app.a1111, "MAX_BODY_BYTES", 100_000)  # the server runs in this process

    def post_chunked(body: bytes) -> tuple[int, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        try:  # no Content-Length: Transfer-Encoding chunked, 10 KB a chunk
            connection.request("POST", "/sdapi/v1/txt2img", body=(body[i:i + 10_000] for i in range(0, len(body), 10_000)),
                               headers={"Content-Type": "application/json"}, encode_chunked=True)  # fmt: skip
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    small = json.dumps({"prompt": PROMPT, **SMALL}).encode()
    status, body = post_chunked(small + b" " * 50_000)
    assert status == 200, body
    status, body = post_chunked(small + b" " * 300_000)
    assert status == 413 and "100,000 bytes" in body["detail"] and body["error"] == "HTTPException", body


def test_files_are_written_only_under_outputs(server, api):
    before = files_under(server.root)
    saved = api.txt2img(prompt=PROMPT, seed=13, save_images=True, batch_size=2, **SMALL)
    init = gradient_image().rotate(90)  # an image no other test sent: its input file is new
    api.img2img(images=[init], mask_image=square_mask(), prompt=PROMPT, seed=13, **SMALL)  # not saved
    unsaved = api.txt2img(prompt=PROMPT, seed=14, **SMALL)
    new = files_under(server.root) - before
    assert all(server.outputs in p.parents for p in new), sorted(map(str, new))
    pngs = [p for p in new if "inputs" not in p.parts]
    assert saved.info["saved"] == 2 == len(pngs) and unsaved.info["saved"] == 0
    assert any("inputs" in p.parts for p in new)  # the img2img input, kept so the result can be remade
    assert sorted(Image.open(p).info["parameters"] for p in pngs) == sorted(saved.info["infotexts"])


def test_http_basic_auth(root, server):
    with serve(server.service, root, auth=("alice", "s3cret")) as guarded:
        assert guarded.get("sd-models").status_code == 401
        wrong = guarded.get("sd-models", auth=("alice", "wrong"))
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Basic"
        assert guarded.post("txt2img", {"prompt": PROMPT, **SMALL}, auth=("bob", "s3cret")).status_code == 401
        api = webuiapi.WebUIApi(host="127.0.0.1", port=guarded.port, username="alice", password="s3cret")
        assert "tiny" in api.util_get_model_names()
        other = guarded.client()
        other.set_auth("alice", "s3cret")
        assert other.txt2img(prompt=PROMPT, seed=1, **SMALL).image.size == (64, 64)


# ---- load ---------------------------------------------------------------------------------------------------------


def test_concurrent_clients_all_answered_in_queue_order(server):
    clients, per_client = 8, 5
    infos: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    deepest = [0]
    done = threading.Event()

    def client(index: int) -> None:
        api = server.client()  # one requests.Session per thread
        try:
            for k in range(per_client):
                result = api.txt2img(prompt=f"{PROMPT} {index}", seed=100 * index + k, **SMALL)  # raises unless 200
                with lock:
                    infos.append(result.info)
        except BaseException as e:  # noqa: BLE001 (reported by the main thread)
            errors.append(e)

    def watch() -> None:
        while not done.is_set():
            deepest[0] = max(deepest[0], server.service.queue_length())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    done.set()
    watcher.join()
    assert not errors, errors[:3]
    assert len(infos) == clients * per_client  # every request answered with 200
    assert deepest[0] > 1  # requests really waited in the queue together
    ids = [info["job_id"] for info in infos]
    assert len(set(ids)) == len(ids)
    # one worker, FIFO: the jobs started (and so finished) in the order the server queued them (job_id)
    by_start = sorted(infos, key=lambda info: info["job_start_time"])
    assert [info["job_id"] for info in by_start] == sorted(ids)
    for index in range(clients):  # and each client's own requests in its order
        mine = [info for info in infos if info["prompt"] == f"{PROMPT} {index}"]
        assert [info["seed"] for info in sorted(mine, key=lambda i: i["job_id"])] == [100 * index + k for k in range(5)]


def test_full_queue_is_a_503_while_queued_jobs_succeed(root):
    service = make_service(root, max_queue=2)
    try:
        with serve(service, root) as small:
            results: dict[str, httpx.Response] = {}

            def post(name: str, payload: dict[str, Any]) -> None:
                results[name] = small.post("txt2img", {"prompt": PROMPT, "width": 64, "height": 64, **payload})

            long = threading.Thread(target=post, args=("long", {"steps": 400}))
            long.start()
            wait_for(lambda: small.get("progress").json()["state"]["sampling_step"] >= 1, what="the long job")
            short = threading.Thread(target=post, args=("short", {"steps": 2}))
            short.start()
            wait_for(lambda: small.get("progress").json()["state"]["queued"] == 1, what="the queued job")
            extra = [threading.Thread(target=post, args=(f"extra{i}", {"steps": 2})) for i in range(4)]
            for t in extra:
                t.start()
            for t in extra:
                t.join(60)
            small.post("interrupt", None)
            for t in (long, short):
                t.join(120)
            for i in range(4):
                response = results[f"extra{i}"]
                assert response.status_code == 503, response.text
                assert "queue is full" in response.json()["detail"]
            assert results["long"].status_code == 200 and results["short"].status_code == 200
            assert json.loads(results["long"].json()["info"])["interrupted"] is True
            assert json.loads(results["short"].json()["info"])["interrupted"] is False
            assert small.post("txt2img", {"prompt": PROMPT, **SMALL}).status_code == 200  # room again
    finally:
        service.close()
