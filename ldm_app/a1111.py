"""AUTOMATIC1111's HTTP API (`/sdapi/v1/...`) over ldm_app.serving, so existing A1111 clients (webuiapi, Krita
and Photoshop plug-ins, scripts written against A1111) can drive an ldm_app server.

`api_router(service, auth)` returns a FastAPI `APIRouter`; the web UI mounts it with `app.include_router(...)` on
the same server, so the API and the UI share one `GenerationService`: one queue, one order, one limit.

Routes (the subset real clients use; field names, defaults and response shapes follow A1111 1.x's modules/api):

- `POST /sdapi/v1/txt2img`, `POST /sdapi/v1/img2img` -> `{"images": [base64 PNG], "parameters": <the request
  echoed>, "info": <a JSON *string*>}`. Each PNG carries the A1111 `parameters` text chunk (and ldm_app's JSON
  chunk, so `generate.py --from_png` remakes it). `info` has A1111's keys (prompt, all_prompts, negative_prompt,
  seed, all_seeds, width, height, sampler_name, cfg_scale, steps, batch_size, infotexts, sd_model_name,
  job_timestamp, ...) plus ours: `ignored_fields` (field -> why it had no effect), `model_defaults_used` (the
  fields taken from the model's stored defaults), `interrupted`, `job_id` (the server's queue number, in
  submission order) and `job_start_time` (epoch seconds).
- `GET /sdapi/v1/samplers`, `/schedulers`, `/sd-models`, `/loras`, `/scripts`, `/embeddings`, `/sd-vae`,
  `/prompt-styles`; `POST /sdapi/v1/refresh-checkpoints`, `/refresh-loras` (no-ops: the catalogs read the disk on
  every call).
- `GET/POST /sdapi/v1/options`: `sd_model_checkpoint` selects the model for later jobs (webuiapi's
  `util_set_model`); other options are accepted and ignored: answered with A1111's null, logged as a warning,
  and one that GET shows (CLIP_stop_at_last_layers, sd_vae, samples_format) set to another value than ours is
  listed in the `ignored_fields` of every later job ("options.CLIP_stop_at_last_layers") until set back.
- `GET /sdapi/v1/progress`, `POST /sdapi/v1/interrupt` (the running job, whoever sent it, as in A1111; it
  returns the images made so far, with `info["interrupted"]`), `POST /sdapi/v1/png-info`.

Choices where we differ from A1111 or map onto ldm_app:

- Defaults: a field the client *omits* takes the model's stored defaults (its ldm_app.json: size, steps,
  guidance, sampler), not A1111's 512x512 / 50 steps / CFG 7 / Euler: our models are trained at their own size
  (the bundled one at 64x64). Fields a client sends are used as sent (webuiapi always sends width, height, steps
  and a sampler). img2img without width/height keeps the init image's size; with them, the image (and mask) is
  resized to them, A1111's resize_mode 0 ("just resize"); other resize modes are done the same way, with a note.
  `denoising_strength` defaults to A1111's 0.75, `mask_blur` to 4.
- Samplers: A1111's names onto ours: "Euler a" -> euler_a, "Euler" -> euler, "DPM++ 2M" -> dpm++, "DDIM" -> ddim,
  "PLMS" -> plms, and our extra "DDPM" -> ddpm; their k-diffusion aliases (k_euler_a, ...) and our own names
  (euler_a, dpm++, pndm, ...) are accepted too, by `sampler_name` or the deprecated `sampler_index` (a name, or an
  index into /samplers). Any other name (e.g. "DPM++ 2M Karras", whose Karras sigmas we do not have) is a 404, as
  A1111 answers an unknown sampler. `scheduler` other than "automatic" is ignored with a note.
- Seeds: -1 (or null) = random; image k of a job uses seed + k, as A1111's all_seeds. The seed used is in `info`.
- `batch_size` / `n_iter` are the job's batch size and batch count. `save_images` (default false, as A1111's API)
  writes the PNGs under the server's outputs folder; `send_images` false returns no images. No grid is returned.
- Prompt weights: a prompt or negative prompt with A1111's emphasis syntax (`(word:1.3)`, `(word)`, `[word]`, `\(`)
  is read with the weights, as A1111 does by default (generate.py's `--weighting`, through compel); a prompt
  without it is read as before. The PNG text says which reading a prompt with the syntax got (`Weighting: A1111`
  or `Weighting: plain text`), `info["weighting"]` too.
- LoRA: `<lora:NAME:SCALE>` (or `<lyco:...>`) tags are taken out of the prompt and applied by name from the
  server's LoRA folder (scale default 1; a second scale, A1111's U-Net multiplier, is ignored with a note; the
  same LoRA twice adds the scales). An unknown LoRA is a 400. Other `<kind:...>` tags (hypernetworks) are removed
  with a note. `disable_extra_networks` removes the tags without applying them.
- Inpainting (`mask` given), `inpainting_fill` onto our `inpaint` methods:
  1 "original" -> blend at `denoising_strength` (the masked area starts from the noised original);
  0 "fill" -> repaint at strength 1 (RePaint: new content resampled until it fits the kept surroundings);
  2 "latent noise", 3 "latent nothing" -> blend at strength 1 (the masked area starts from pure noise).
  A 9-channel inpainting U-Net always uses "model" (its own conditioning) at `denoising_strength`. For the modes
  that start from noise, `denoising_strength` below 1 is ignored with a note. The unmasked pixels are pasted back
  (A1111's overlay); `inpainting_mask_invert` and `mask_blur` map directly (`mask_blur_x`/`_y` when `mask_blur` is
  null; different x and y use the larger); an RGBA mask with transparency uses its alpha, as A1111 does.
  `inpaint_full_res` ("only masked") is ignored with a note.
- `infotext` (A1111's request field: an image's `parameters` text): the fields the request does not set are read
  from it, as A1111's `apply_infotext` does (a field the request sets wins): prompt, negative prompt, steps,
  sampler, CFG scale, seed, size, schedule type, and for img2img denoising strength and mask blur. Where the prompt
  is the infotext's, its `Lora: NAME:SCALE NAME2:SCALE2` line (ours: a LoRA image's tags, taken out of its prompt)
  applies those LoRAs by name, as tags would (an unknown one is a 400); a request with its own prompt gets a note
  ("infotext.Lora") instead. `Clip skip` other than 1 is not applied, with a note. Its `Weighting:` (ours: "A1111"
  or "plain text", how a prompt with weighting syntax was read) applies where the prompt is the infotext's; an
  ldm_app text without it is read as plain text (made before the field, when that was the only reading). Its
  `Timesteps:` (ours: the grid text-to-image sampled on) applies where the steps and sampler are the infotext's, so
  a txt2img request with an ldm_app image's infotext remakes it on its grid even after the model's stored grid
  changed. Its
  `Model:` does not switch the model (A1111's default, "do not change selected model when reading generation
  parameters"): a job on another model than the infotext's gets a note in `ignored_fields` ("infotext.Model").
  An image made on the sampler's own spacing says nothing of its grid in its text, so where the model has since
  stored a grid at those settings, its remake samples on that grid (the PNG's `ldm_app` chunk, which
  `generate.py --from_png` and the web UI read, does say).
- Fields we do not support are accepted and ignored, and listed in `info["ignored_fields"]` with the reason, but
  only when their value would have changed the result (webuiapi sends `restore_faces: false`, `eta: 1.0` with
  "Euler a", ... on every call): hires fix, refiner, scripts and alwayson_scripts, restore_faces, tiling, styles,
  subseeds, seed resize, sampler eta / churn / noise settings other than what our sampler does, override_settings
  other than `sd_model_checkpoint` (which picks the model for this job, and for later ones too with
  `override_settings_restore_afterwards: false`, as in A1111), unknown fields. Never an error.
- `info["notes"]` (ours): lines about the prompt, as generate.py prints them: the words the model never saw in
  training ("words unknown to this model: corgi, sushi"), for a model that stores its vocabulary.
- Errors: every route answers a mistake with a 4xx and a JSON body close to A1111's
  `{"error": <kind>, "detail": <one-line message>, "body": "", "errors": <the same message>}`: 400 for bad values
  (an empty prompt, which A1111 would sample unconditionally and generate.py refuses; sizes or batches above
  `ldm_app.limits`; invalid base64; an image whose header claims a size above the limit, refused before decoding;
  a mask of another size than the image, which A1111 would stretch; an unknown model or LoRA), 404 for an unknown
  sampler, 422 for a body that is not the right JSON shape, 401 without the credentials, 413 for a body above
  `MAX_BODY_BYTES` (refused before it is read; a chunked body, as soon as it passes the limit), 503 when the queue
  is full ("try again later"). These are refused before the job is queued: nothing is sampled or written. The few
  checks that need the loaded model (e.g. more steps than a sampler can take on it) answer 400 when the job
  reaches the worker. The server keeps serving.
- Auth: `auth=(user, password)` puts HTTP basic auth on every route (webuiapi's `set_auth`).
- Generating routes are plain `def`: FastAPI runs them in its thread pool, where they block on the job's future;
  the cheap status routes (progress, interrupt, GET options) are `async`, so they answer while every pool thread
  waits.
- Paths: /sd-models and /loras give names relative to the server's folders in `filename` / `path`, never the
  server's absolute paths.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import logging
import math
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, TypeVar

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, BeforeValidator, ConfigDict
from starlette.exceptions import HTTPException

from ldm_app import limits
from ldm_app.errors import UserError
from ldm_app.serving import (
    MAX_INPUT_BYTES,
    JobCancelled,
    JobSpec,
    QueueFull,
    a1111_weighting,
    decode_base64,
    decode_image,
    encode_png,
    read_png_text,
)

if TYPE_CHECKING:
    from PIL import Image

    from ldm_app.serving import GenerationService, Job, JobResult

logger = logging.getLogger(__name__)

PREFIX = "/sdapi/v1"
MAX_BODY_BYTES = 3 * (MAX_INPUT_BYTES * 4 // 3) + 2**20  # two base64 images (init image, mask) and room to spare

# ---- samplers -----------------------------------------------------------------------------------------------------

# (A1111's name, ours, aliases). Ours without an A1111 name of its own ("DDPM") is offered under an A1111-style name.
SAMPLERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Euler a", "euler_a", ("k_euler_a", "k_euler_ancestral")),
    ("Euler", "euler", ("k_euler",)),
    ("DPM++ 2M", "dpm++", ("k_dpmpp_2m",)),
    ("DDIM", "ddim", ()),
    ("PLMS", "plms", ()),
    ("DDPM", "ddpm", ()),
    ("LCM", "lcm", ()),  # for latent consistency models (python -m ldm_app.train_distill's output)
)
_OUR_NAMES = {"pndm": "plms"}  # ours that are another's twin: shown under the twin's A1111 name
AUTOMATIC_SCHEDULERS = ("automatic", "Automatic", "")


def resolve_sampler(name: str | int) -> str:
    """Our sampler name for an A1111 name, alias, index into SAMPLERS or our own name; ApiError 404 otherwise."""
    from ldm_app.samplers import SAMPLERS as OURS

    if isinstance(name, int) and not isinstance(name, bool):
        if 0 <= name < len(SAMPLERS):
            return SAMPLERS[name][1]
    elif isinstance(name, str):
        for a1111, ours, aliases in SAMPLERS:
            if name in (a1111, *aliases):
                return ours
        if name in OURS:
            return name
        lowered = name.lower()
        for a1111, ours, aliases in SAMPLERS:
            if lowered in (a1111.lower(), *aliases):
                return ours
    names = ", ".join(a1111 for a1111, _, _ in SAMPLERS)
    raise ApiError(404, f"Sampler not found: {limits.shown(name, 60)}; expected one of: {names} (or ldm_app's: "
                        f"{', '.join(OURS)})")  # fmt: skip


def a1111_sampler_name(ours: str | None) -> str:
    """A1111's name for our sampler (None: the model's own scheduler, which has no sampler name)."""
    ours = _OUR_NAMES.get(ours or "", ours)
    return next((a1111 for a1111, name, _ in SAMPLERS if name == ours), ours or "model default")


# ---- errors -------------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """A refusal with its HTTP status (UserError is 400, QueueFull 503)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


def _one_line(text: Any, limit: int = 500) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """A1111's error body (modules/api/api.py handle_exception): error, detail, body, errors."""
    message = _one_line(message)
    content = {"error": kind, "detail": message, "body": "", "errors": message}
    return JSONResponse(content, status_code=status, headers=headers)


# the serving core's names (generate.py's flags, with or without their "--") where this API's fields differ
_FLAG_WORDS = {"guidance_scale": "cfg_scale", "num_images": "n_iter x batch_size", "strength": "denoising_strength",
               "sampler": "sampler_name", "num_inference_steps": "steps"}  # fmt: skip
_FLAG = re.compile(r"(?<![\w-])(?:--)?(" + "|".join(_FLAG_WORDS) + r")\b(?!-)")


def api_wording(message: str) -> str:
    """A serving-core message with the command-line flags it names replaced by this API's field names."""
    return _FLAG.sub(lambda m: _FLAG_WORDS[m.group(1)], message)


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors()[:3]:
        where = ".".join(str(p) for p in item.get("loc", ())[1:]) or "body"
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    more = len(error.errors()) - 3
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _body_limited(request: Request) -> Request:
    """`request` whose body, as it is read, stops with a 413 past MAX_BODY_BYTES: the Content-Length check above
    cannot see a chunked body. (FastAPI >= 0.165 has `max_body_size` for this, but the floor here is 0.110, and its
    413 would not be in A1111's error shape.)"""
    received = 0

    async def receive() -> dict[str, Any]:
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > MAX_BODY_BYTES:  # FastAPI re-raises an HTTPException met while reading the body
            raise HTTPException(413, f"the request body is more than {MAX_BODY_BYTES:,} bytes, the limit")
        return message

    return Request(request.scope, receive)


class A1111Route(APIRoute):
    """Every route of the router answers errors in A1111's JSON shape (an APIRouter cannot install exception
    handlers on the app it is mounted in, so the route does it). Before reading the body it checks the HTTP basic
    credentials (`auth`, set per router by api_router) and refuses an oversize body."""

    auth: tuple[str, str] | None = None

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Any:
            if not authorized(request.headers.get("authorization"), self.auth):
                return error_response(401, "HTTPException", "Incorrect username or password",
                                      {"WWW-Authenticate": "Basic"})  # fmt: skip
            try:
                length = int(request.headers.get("content-length") or 0)
            except ValueError:
                length = 0
            if length > MAX_BODY_BYTES:
                return error_response(413, "PayloadTooLarge", f"the request body is {length:,} bytes, above the "
                                      f"limit of {MAX_BODY_BYTES:,}")  # fmt: skip
            try:
                return await handler(_body_limited(request))
            except (QueueFull, JobCancelled) as e:
                return error_response(503, type(e).__name__, str(e), {"Retry-After": "5"})
            except UserError as e:
                return error_response(400, "UserError", api_wording(str(e)))
            except ApiError as e:
                return error_response(e.status, "HTTPException", str(e), e.headers)
            except RequestValidationError as e:
                return error_response(422, "RequestValidationError", _validation_message(e))
            except HTTPException as e:
                return error_response(e.status_code, "HTTPException", str(e.detail), dict(e.headers or {}))
            except Exception as e:  # a bug: logged with its traceback, answered in one line
                logger.exception("%s %s failed", request.method, request.url.path)
                return error_response(500, type(e).__name__, f"internal error: {e}")

        return route


# ---- requests -----------------------------------------------------------------------------------------------------


def _not_a_boolean(value: Any) -> Any:
    """pydantic's lax mode reads true/false as 1/0 for a number: `"seed": true` is a client's mistake (422)."""
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    return value


Int = Annotated[int, BeforeValidator(_not_a_boolean)]
Float = Annotated[float, BeforeValidator(_not_a_boolean)]


class _Generation(BaseModel):
    """The fields txt2img and img2img share (A1111's StableDiffusionProcessing API models). None = not given: the
    model's stored default. Fields below "accepted, not applied" only ever produce a note in info."""

    model_config = ConfigDict(extra="allow")

    prompt: str | None = ""  # null: "" (refused as an empty prompt)
    negative_prompt: str | None = ""
    seed: Int | None = -1
    sampler_name: str | None = None
    sampler_index: str | int | None = None
    scheduler: str | None = None
    batch_size: Int = 1
    n_iter: Int = 1
    steps: Int | None = None
    cfg_scale: Float | None = None
    width: Int | None = None
    height: Int | None = None
    denoising_strength: Float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    disable_extra_networks: bool = False
    send_images: bool = True
    save_images: bool = False
    # accepted, not applied
    styles: Any = None
    subseed: Any = -1
    subseed_strength: Any = 0
    seed_resize_from_h: Any = -1
    seed_resize_from_w: Any = -1
    restore_faces: Any = None
    tiling: Any = None
    do_not_save_samples: Any = False
    do_not_save_grid: Any = False
    eta: Any = None
    s_min_uncond: Any = None
    s_churn: Any = None
    s_tmax: Any = None
    s_tmin: Any = None
    s_noise: Any = None
    refiner_checkpoint: Any = None
    refiner_switch_at: Any = None
    comments: Any = None
    script_name: Any = None
    script_args: Any = None
    alwayson_scripts: Any = None
    infotext: Any = None
    force_task_id: Any = None


class Txt2ImgRequest(_Generation):
    enable_hr: Any = False
    firstphase_width: Any = 0
    firstphase_height: Any = 0
    hr_scale: Any = 2.0
    hr_upscaler: Any = None
    hr_second_pass_steps: Any = 0
    hr_resize_x: Any = 0
    hr_resize_y: Any = 0
    hr_checkpoint_name: Any = None
    hr_sampler_name: Any = None
    hr_scheduler: Any = None
    hr_prompt: Any = ""
    hr_negative_prompt: Any = ""
    firstpass_image: Any = None


class Img2ImgRequest(_Generation):
    denoising_strength: Float | None = 0.75
    init_images: list[str] | None = None
    resize_mode: Int = 0
    mask: str | None = None
    mask_blur: Float | None = None
    mask_blur_x: Float = 4
    mask_blur_y: Float = 4
    inpainting_fill: Int = 0
    inpainting_mask_invert: Int = 0
    include_init_images: bool = False
    # accepted, not applied
    image_cfg_scale: Any = None
    mask_round: Any = True
    inpaint_full_res: Any = True
    inpaint_full_res_padding: Any = 0
    initial_noise_multiplier: Any = None
    latent_mask: Any = None


RequestT = TypeVar("RequestT", bound=_Generation)


class PngInfoRequest(BaseModel):
    image: str = ""


class ImageResponse(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str


def _unset(value: Any) -> bool:
    return value in (None, False, 0, "", [], {}) or (isinstance(value, float) and math.isnan(value))


# field -> (has no effect when, why it is not applied); eta, scheduler, override_settings and the extra fields are
# judged in `ignored_fields`
_NOT_APPLIED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "enable_hr": (_unset, "hires fix is not supported"),
    "refiner_checkpoint": (_unset, "refiner models are not supported"),
    "refiner_switch_at": (_unset, "refiner models are not supported"),
    "firstpass_image": (_unset, "hires fix is not supported"),
    "styles": (_unset, "prompt styles are not supported"),
    "subseed_strength": (_unset, "variation seeds (subseeds) are not supported"),
    "seed_resize_from_h": (lambda v: _unset(v) or v == -1, "seed resize is not supported"),
    "seed_resize_from_w": (lambda v: _unset(v) or v == -1, "seed resize is not supported"),
    "restore_faces": (_unset, "face restoration is not supported"),
    "tiling": (_unset, "tiling is not supported"),
    "s_min_uncond": (_unset, "sampler setting not supported"),
    "s_churn": (_unset, "sampler setting not supported"),
    "s_tmin": (_unset, "sampler setting not supported"),
    "s_tmax": (lambda v: _unset(v) or v == math.inf, "sampler setting not supported"),
    "s_noise": (lambda v: _unset(v) or v == 1, "sampler setting not supported"),
    "comments": (_unset, "comments are not stored"),
    "script_name": (_unset, "scripts are not supported"),
    "script_args": (_unset, "scripts are not supported"),
    "resize_mode": (_unset, "resized as resize_mode 0 (just resize)"),
    "initial_noise_multiplier": (lambda v: _unset(v) or v == 1, "not supported"),
    "latent_mask": (_unset, "not supported"),
}
_MASK_ONLY = {"inpaint_full_res": (_unset, "'only masked' inpainting is not supported: the whole image is sampled")}


# ---- the service side ---------------------------------------------------------------------------------------------


def resolve_model(service: GenerationService, text: Any) -> str:
    """The catalog name for what a client calls a model: the name (A1111's title), its title with a " [hash]"
    suffix, or a unique case-insensitive match (webuiapi's util_set_model lower-cases); else UserError."""
    if not isinstance(text, str):
        raise UserError(f"sd_model_checkpoint must be a model name, got {limits.shown(text, 60)}")
    names = service.catalog.names()
    candidates = [text, re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", text)]
    for candidate in candidates:
        if candidate in names:
            return candidate
        folded = [n for n in names if n.lower() == candidate.lower()]
        if len(folded) == 1:
            return folded[0]
    service.catalog.path(text)  # the catalog's one-line "unknown model ...; expected one of ..."
    raise UserError(f"unknown model {limits.shown(text, 80)}")  # pragma: no cover (path() raised)


def _unet_in_channels(path: Path) -> int:
    """The model's U-Net input channels (9: an SD-inpainting U-Net), read from its config or the file header."""
    try:
        if path.is_dir():
            config = json.loads((path / "unet" / "config.json").read_text(encoding="utf-8"))
            return int(config.get("in_channels", 4))
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            from ldm_app.single_file import CONV_IN

            with safe_open(str(path), "pt") as f:
                if CONV_IN in f.keys():
                    return int(f.get_slice(CONV_IN).get_shape()[1])
    except Exception:  # noqa: BLE001 (a probe: an unreadable model is reported by its loader, in one line)
        pass
    return 4


_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # A1111's extra networks syntax: <lora:name:0.8>


@dataclass
class PromptNetworks:
    prompt: str
    loras: tuple[tuple[str, float], ...] = ()
    notes: dict[str, str] = field(default_factory=dict)


def _lora_name(name: str, names: list[str], service: GenerationService) -> str:
    """The catalog name of LoRA `name` (an exact or unique case-insensitive match); UserError for an unknown one."""
    if name not in names:
        folded = [n for n in names if n.lower() == name.lower()]
        name = folded[0] if len(folded) == 1 else name
    service.loras.path(name)  # UserError "unknown LoRA ...; expected one of ..."
    return name


# pngmeta's `Lora: NAME:SCALE NAME2:SCALE2`: NAME may hold spaces (the separator too), SCALE is a number ("%g")
_LORA_ENTRY = re.compile(r"\s*(.+?):([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(?=\s|$)")


def parse_lora_field(text: str) -> list[tuple[str, float]]:
    """The (name, scale) entries of an infotext's `Lora:` value, as pngmeta.format_parameters writes it; UserError
    for a value that is not NAME:SCALE entries."""
    entries, position = [], 0
    text = text.strip()
    while position < len(text):
        match = _LORA_ENTRY.match(text, position)
        if match is None:
            raise UserError(f"infotext: Lora {limits.shown(text, 80)} is not NAME:SCALE entries separated by spaces")
        entries.append((match.group(1).strip(), float(match.group(2))))
        position = match.end()
    return entries


def parse_extra_networks(prompt: str, service: GenerationService, apply: bool = True) -> PromptNetworks:
    """Take A1111's `<lora:NAME:SCALE>` tags out of `prompt`; the LoRAs by catalog name (UserError for an unknown
    one or a scale that is not a number)."""
    scales: dict[str, float] = {}
    notes: dict[str, str] = {}
    names = list(service.loras.entries())
    for match in _EXTRA_NETWORK.finditer(prompt):
        kind, args = match.group(1).lower(), match.group(2).split(":")
        if not apply:
            continue
        if kind not in ("lora", "lyco"):
            notes[f"<{match.group(1)}:...>"] = f"'{match.group(1)}' extra networks are not supported; removed"
            continue
        name = _lora_name(args[0].strip(), names, service)
        try:
            scale = float(args[1]) if len(args) > 1 and args[1].strip() else 1.0
        except ValueError:
            raise UserError(f"the LoRA scale in {limits.shown(match.group(0), 80)} is not a number") from None
        limits.check_number(f"the LoRA scale in {match.group(0)}", scale)
        if len(args) > 2:
            notes[match.group(0)] = "only the first multiplier is applied (to the U-Net and the text encoder)"
        scales[name] = scales.get(name, 0.0) + scale
    stripped = " ".join(_EXTRA_NETWORK.sub(" ", prompt).split())
    return PromptNetworks(stripped, tuple(scales.items()), notes)


def ignored_fields(req: _Generation, sampler: str | None, has_mask: bool) -> dict[str, str]:
    """field -> why it had no effect, for the fields we accept but do not apply whose value would have mattered."""
    from ldm_app.samplers import ANCESTRAL_SAMPLERS

    notes: dict[str, str] = {}
    values = dict(req)
    for name, (no_effect, why) in {**_NOT_APPLIED, **(_MASK_ONLY if has_mask else {})}.items():
        if name in values and not no_effect(values[name]):
            notes[name] = why
    if isinstance(req.alwayson_scripts, dict) and req.alwayson_scripts:
        notes["alwayson_scripts"] = f"scripts are not supported: {', '.join(map(str, req.alwayson_scripts))}"
    elif not _unset(req.alwayson_scripts):
        notes["alwayson_scripts"] = "scripts are not supported"
    if req.scheduler not in (None, *AUTOMATIC_SCHEDULERS):
        notes["scheduler"] = "only 'automatic' (the sampler's own noise schedule) is supported"
    if req.eta is not None and sampler is not None:
        implied = 1.0 if sampler in ANCESTRAL_SAMPLERS else 0.0
        if isinstance(req.eta, (int, float)) and float(req.eta) != implied:
            notes["eta"] = f"sampler {a1111_sampler_name(sampler)} runs with eta {implied:g}"
    for key in (req.override_settings or {}):
        if key != "sd_model_checkpoint":
            notes[f"override_settings.{key}"] = "only sd_model_checkpoint is applied"
    for key in req.model_extra or {}:
        notes[key] = "unknown field"
    return notes


def _job_start(job: Job) -> float:
    """The wall-clock time (epoch seconds) the worker started `job` (Job.started is time.monotonic())."""
    started = job.started if job.started is not None else time.monotonic()
    return time.time() - (time.monotonic() - started)


@dataclass
class _Prepared:
    spec: JobSpec
    notes: dict[str, str]
    defaults_used: list[str]


def _common_spec(req: _Generation, service: GenerationService,
                 infotext: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:  # fmt: skip
    """JobSpec fields shared by txt2img and img2img, and the notes about them."""
    notes: dict[str, str] = {}
    networks = parse_extra_networks(req.prompt or "", service, apply=not req.disable_extra_networks)
    notes.update(networks.notes)
    loras = _with_infotext_loras(req, service, infotext, dict(networks.loras), notes)
    clip_skip = str(infotext.get("Clip skip", "1")).strip()
    if clip_skip != "1":
        notes["infotext.Clip skip"] = f"{limits.shown(clip_skip, 20)} not applied: the text encoder's last layer " \
                                      "is used (clip skip 1)"  # fmt: skip
    sampler_field = req.sampler_name if req.sampler_name not in (None, "") else req.sampler_index
    sampler = resolve_sampler(sampler_field) if sampler_field not in (None, "") else None
    if req.seed is not None and req.seed < -1:
        raise UserError(f"seed must be -1 (random) or an integer >= 0, got {req.seed}")
    # the model is fixed when the request arrives: the selected one, or override_settings' for this job (kept
    # selected afterwards with override_settings_restore_afterwards false, as A1111 does)
    model = service.model_name
    if req.override_settings and "sd_model_checkpoint" in req.override_settings:
        model = resolve_model(service, req.override_settings["sd_model_checkpoint"])
    made_with = infotext.get("Model")
    if made_with and made_with not in (model, service.catalog.path(model).name):
        notes["infotext.Model"] = (f"the infotext's image was made with model {limits.shown(made_with, 60)}; this job "
                                   f"used {model!r} (override_settings.sd_model_checkpoint picks the model)")  # fmt: skip
    weighting = _weighting(networks.prompt, req.negative_prompt or "", infotext, notes)
    fields = dict(
        prompt=networks.prompt, negative_prompt=req.negative_prompt or "", weighting=weighting,
        seed=None if req.seed in (None, -1) else req.seed, steps=req.steps,
        guidance_scale=req.cfg_scale, sampler=sampler, height=req.height, width=req.width,
        batch_size=req.batch_size, n_iter=req.n_iter, loras=loras, model=model, save=req.save_images,
    )  # fmt: skip
    return fields, notes


def _with_infotext_loras(req: _Generation, service: GenerationService, infotext: dict[str, Any],
                         scales: dict[str, float], notes: dict[str, str]) -> tuple[tuple[str, float], ...]:  # fmt: skip
    """`scales` (the prompt's LoRAs) with the infotext's `Lora:` entries added where the job's prompt is the
    infotext's (ours writes a LoRA image's tags there, not in its prompt); a note where they are not applied."""
    text = infotext.get("Lora")
    if text in (None, ""):
        return tuple(scales.items())
    if not infotext.get(PROMPT_FROM_INFOTEXT):
        notes["infotext.Lora"] = f"{limits.shown(text, 80)} not applied: the request's own prompt replaces the " \
                                 "infotext's (put <lora:NAME:SCALE> tags in it)"  # fmt: skip
    elif req.disable_extra_networks:
        notes["infotext.Lora"] = f"{limits.shown(text, 80)} not applied: disable_extra_networks"
    else:
        names = list(service.loras.entries())
        for name, scale in parse_lora_field(str(text)):
            name = _lora_name(name, names, service)
            limits.check_number(f"the LoRA scale of {name} in the infotext", scale)
            scales[name] = scales.get(name, 0.0) + scale
    return tuple(scales.items())


def _weighting(prompt: str, negative: str, infotext: dict[str, Any], notes: dict[str, str]) -> bool:
    """Whether the job reads A1111 prompt weights: where the prompt or negative prompt uses their syntax (A1111's
    default; a plain prompt is read as it always was), unless the prompt is an infotext's that says how it was
    read (`Weighting: A1111` / `Weighting: plain text`, pngmeta's); an ldm_app text without that field was made
    before it existed, when prompts were read as plain text."""
    from ldm_app.pngmeta import PLAIN_TEXT, WEIGHTED

    default = a1111_weighting(prompt, negative)
    stated = infotext.get("Weighting")
    if stated not in (None, "") and stated not in (WEIGHTED, PLAIN_TEXT):
        raise UserError(f"infotext: Weighting {limits.shown(stated, 40)} is not {WEIGHTED!r} or {PLAIN_TEXT!r}")
    if not infotext.get(PROMPT_FROM_INFOTEXT):
        if stated not in (None, "") and (stated == WEIGHTED) != default:
            notes["infotext.Weighting"] = f"{stated} not applied: the request's own prompt is read " + \
                ("with A1111 weights" if default else "as it is (no weighting syntax)")  # fmt: skip
        return default
    if stated in (None, ""):
        return default and not str(infotext.get("Version", "")).startswith("ldm_app")
    return stated == WEIGHTED


def _defaults_used(req: _Generation) -> list[str]:
    pairs = (("steps", req.steps), ("cfg_scale", req.cfg_scale), ("width", req.width), ("height", req.height))
    used = [name for name, value in pairs if value is None]
    if req.sampler_name in (None, "") and req.sampler_index in (None, ""):
        used.append("sampler_name")
    return used


def prepare_txt2img(req: Txt2ImgRequest, service: GenerationService, infotext: dict[str, Any] | None = None
                    ) -> _Prepared:  # fmt: skip
    """`infotext`: apply_infotext's parsed infotext of `req` (already applied to it)."""
    fields, notes = _common_spec(req, service, infotext or {})
    timesteps = _infotext_grid(req, infotext or {}, notes)
    return _Prepared(JobSpec(**fields, timesteps=timesteps), notes, _defaults_used(req))


# A1111's paste fields that an API request's `infotext` fills (modules/infotext_utils.py): infotext key -> field
INFOTEXT_FIELDS = {"Prompt": "prompt", "Negative prompt": "negative_prompt", "Steps": "steps",
                   "Sampler": "sampler_name", "CFG scale": "cfg_scale", "Seed": "seed", "Size-1": "width",
                   "Size-2": "height", "Schedule type": "scheduler"}  # fmt: skip
INFOTEXT_IMG2IMG_FIELDS = {"Denoising strength": "denoising_strength", "Mask blur": "mask_blur"}
# apply_infotext's mark in the parsed infotext (no "Key: value" of a text can be this: parse_infotext's keys start
# with a word character): the job's prompt is the infotext's, so its `Lora:` line applies
PROMPT_FROM_INFOTEXT = " prompt from infotext"


def apply_infotext(req: RequestT) -> tuple[RequestT, dict[str, Any]]:
    """A1111's apply_infotext: a copy of `req` whose fields the request did not set are read from its `infotext`
    (see the module doc), and the parsed infotext, with `PROMPT_FROM_INFOTEXT` true when the prompt was read from
    it; `(req, {})` when it has none. UserError for a value of the wrong kind."""
    if _unset(req.infotext):
        return req, {}
    if not isinstance(req.infotext, str):
        raise UserError(f"infotext must be an image's parameters text, got {limits.shown(req.infotext, 60)}")
    params = parse_infotext(req.infotext)
    fields = {**INFOTEXT_FIELDS, **(INFOTEXT_IMG2IMG_FIELDS if isinstance(req, Img2ImgRequest) else {})}
    updates: dict[str, Any] = {}
    for key, name in fields.items():
        value = params.get(key)
        if name in req.model_fields_set or value in (None, ""):
            continue
        if name == "sampler_name" and str(value).lower() == "model default":  # ours: the model's own sampler
            continue
        kind = {"steps": int, "seed": int, "width": int, "height": int, "cfg_scale": float,
                "denoising_strength": float, "mask_blur": float}.get(name, str)  # fmt: skip
        try:
            updates[name] = kind(value)
        except ValueError:
            expected = "a whole number" if kind is int else "a number"
            raise UserError(f"infotext: {key} {limits.shown(value, 40)} is not {expected}") from None
    if "sampler_index" in req.model_fields_set and "sampler_name" in updates:
        del updates["sampler_name"]  # the request's sampler, by its older field
    return req.model_copy(update=updates), {**params, PROMPT_FROM_INFOTEXT: "prompt" in updates}


def _sampler_of(value: Any) -> str | None:
    """Our name of a request's or an infotext's sampler (None: the model's own); "?" for one we do not have."""
    if value in (None, "") or str(value).lower() == "model default":
        return None
    try:
        return resolve_sampler(value)
    except ApiError:
        return "?"


def _infotext_grid(req: Txt2ImgRequest, infotext: dict[str, Any], notes: dict[str, str]) -> tuple[int, ...] | None:
    """The infotext's `Timesteps:` grid, where the job samples at the infotext's steps with its sampler."""
    text = str(infotext.get("Timesteps", ""))
    if not re.fullmatch(r"\d+(/\d+)*", text):
        return None
    grid = tuple(int(t) for t in text.split("/"))
    sampler = req.sampler_name if req.sampler_name not in (None, "") else req.sampler_index
    if req.steps != len(grid) or _sampler_of(sampler) != _sampler_of(infotext.get("Sampler")):
        notes["infotext.Timesteps"] = "not applied: the request's steps or sampler differ from the infotext's"
        return None
    return grid


def _decode_mask(data: bytes) -> Image.Image:
    """The mask as "L" (white = repaint): an RGBA/LA mask with transparency uses its alpha, thresholded at 128
    (A1111's create_binary_mask); otherwise the image's luminance (alpha on white)."""
    import io

    from PIL import Image

    mask = decode_image(data, "mask", mode="L")  # the size is checked from the header before decoding
    with Image.open(io.BytesIO(data)) as image:
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            alpha = image.convert("RGBA").getchannel("A")
            if alpha.getextrema() != (255, 255):
                return alpha.point(lambda a: 255 if a > 128 else 0)
    return mask


def prepare_img2img(req: Img2ImgRequest, service: GenerationService, infotext: dict[str, Any] | None = None
                    ) -> _Prepared:  # fmt: skip
    from PIL import ImageOps

    fields, notes = _common_spec(req, service, infotext or {})
    if not req.init_images:
        raise UserError("init_images is empty; expected a list with one base64-encoded image")
    if len(req.init_images) > 1:
        notes["init_images"] = f"only the first of {len(req.init_images)} init images is used"
    # the sizes and batch are checked before any image is decoded: an oversize request allocates nothing
    for name in ("width", "height"):
        if getattr(req, name) is not None:
            limits.check_image_side(name, getattr(req, name))
    limits.check_count("batch_size", req.batch_size, limits.current().max_images_per_call)
    image = decode_image(decode_base64(req.init_images[0], "init_images[0]"), "init_images[0]")
    strength = req.denoising_strength
    mask = None
    inpaint = mask_blur = None
    if req.mask:
        mask = _decode_mask(decode_base64(req.mask, "mask"))
        if mask.size != image.size:
            raise UserError(f"the mask is {mask.width}x{mask.height} pixels but init_images[0] is {image.width}x"
                            f"{image.height}; expected a mask of the image's size")  # fmt: skip
        if req.inpainting_mask_invert not in (0, 1):
            raise UserError(f"inpainting_mask_invert must be 0 or 1, got {req.inpainting_mask_invert}")
        if req.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
        if req.mask_blur is not None:
            mask_blur = req.mask_blur
        else:
            mask_blur = max(req.mask_blur_x, req.mask_blur_y)
            if req.mask_blur_x != req.mask_blur_y:
                notes["mask_blur_x"] = f"one blur for both directions: the larger, {mask_blur:g}"
        inpaint, strength = _inpaint_method(req, service, fields["model"], notes)
    # without a mask the inpainting settings do nothing, in A1111 too
    if strength is None:
        strength = 0.75
    spec = JobSpec(**fields, init_image=image, mask=mask, strength=strength, inpaint=inpaint,
                   mask_blur=float(mask_blur or 0.0), paste_back=True if mask is not None else None)  # fmt: skip
    return _Prepared(spec, notes, [n for n in _defaults_used(req) if n not in ("width", "height")])


FILL_MODES = ("fill", "original", "latent noise", "latent nothing")


def _inpaint_method(req: Img2ImgRequest, service: GenerationService, model: str | None,
                    notes: dict[str, str]) -> tuple[str, float | None]:  # fmt: skip
    """inpainting_fill -> (our inpaint method, strength); see the module doc."""
    fill = req.inpainting_fill
    if fill not in range(len(FILL_MODES)):
        raise UserError(f"inpainting_fill must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing), "
                        f"got {fill}")  # fmt: skip
    path = service.catalog.path(model if model is not None else service.model_name)
    strength = req.denoising_strength
    if _unet_in_channels(path) == 9:
        if fill != 1:
            notes["inpainting_fill"] = f"{FILL_MODES[fill]}: an inpainting model fills the mask its own way"
        return "model", strength
    if fill == 1:
        return "blend", strength
    if strength is not None and strength != 1:
        notes["denoising_strength"] = f"inpainting_fill {fill} ({FILL_MODES[fill]}) starts the masked area from " \
                                      "noise (strength 1)"  # fmt: skip
    return ("repaint" if fill == 0 else "blend"), 1.0


def run_job(service: GenerationService, prepared: _Prepared, req: _Generation, echo: dict[str, Any]) -> dict[str, Any]:
    """Submit, wait, and answer in A1111's shape."""
    from ldm_app.pngmeta import format_parameters

    job = service.submit(prepared.spec)
    overrides = req.override_settings or {}
    if "sd_model_checkpoint" in overrides and not req.override_settings_restore_afterwards:
        service.set_model(prepared.spec.model)
    result: JobResult = job.future.result()
    spec = prepared.spec
    params = result.params
    first = params[0] if params else None
    # the sampler asked for (the PNG records PLMS as its twin "pndm"), else the model's own as the PNG records it
    sampler = spec.sampler if spec.sampler is not None else first.sampler if first is not None else None
    notes = {**prepared.notes, **ignored_fields(req, sampler, spec.mask is not None)}
    images = [base64.b64encode(encode_png(img, p)).decode("ascii")
              for img, p in zip(result.images, params)] if req.send_images else []  # fmt: skip
    seed = first.seed if first is not None else (spec.seed if spec.seed is not None else -1)
    started = _job_start(job)
    info = {
        "prompt": req.prompt or "",
        "all_prompts": [p.prompt for p in params],
        "negative_prompt": req.negative_prompt or "",
        "all_negative_prompts": [p.negative_prompt for p in params],
        "seed": seed,
        "all_seeds": [p.seed for p in params],
        "subseed": -1,
        "all_subseeds": [-1 for _ in params],
        "subseed_strength": 0,
        "width": first.width if first else spec.width,
        "height": first.height if first else spec.height,
        "sampler_name": a1111_sampler_name(sampler),
        "cfg_scale": first.guidance_scale if first else spec.guidance_scale,
        "steps": first.steps if first else spec.steps,
        "batch_size": spec.batch_size,
        "n_iter": spec.n_iter,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": result.model,
        "sd_model_hash": None,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": first.strength if first else spec.strength,
        "extra_generation_params": {"Lora": ", ".join(f"{n}:{s:g}" for n, s in spec.loras)} if spec.loras else {},
        "index_of_first_image": 0,
        "infotexts": [format_parameters(p) for p in params],
        "styles": [],
        "job_timestamp": datetime.datetime.fromtimestamp(started).strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": bool(first is not None and first.inpaint == "model"),
        "version": f"ldm_app {first.version}" if first else "ldm_app",
        # ours
        "sampler": sampler,
        "weighting": spec.weighting,
        "inpaint": first.inpaint if first else spec.inpaint,
        "interrupted": result.interrupted,
        "job_id": job.id,
        "job_start_time": started,
        "model_defaults_used": prepared.defaults_used,
        "ignored_fields": notes,
        "notes": result.notes,  # about the prompt: "words unknown to this model: corgi, sushi"
        "saved": len(result.paths),
    }
    return {"images": images, "parameters": echo, "info": json.dumps(info)}


def _echo(req: BaseModel, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """The request as A1111 echoes it in `parameters`: every field of the model (with its default), no extras."""
    return {name: (None if name in drop else getattr(req, name)) for name in type(req).model_fields}


def parse_infotext(text: str) -> dict[str, Any]:
    """A1111's parse_generation_parameters, the part clients read: Prompt, Negative prompt, then each "Key: value"
    of the last line (quoted values unquoted), Size also as Size-1 / Size-2."""
    pattern = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
    lines = text.strip().split("\n")
    settings: list[tuple[str, str]] = []
    if lines and len(pattern.findall(lines[-1])) >= 3:
        settings = pattern.findall(lines.pop())
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    result: dict[str, Any] = {"Prompt": "\n".join(prompt).strip(), "Negative prompt": "\n".join(negative).strip()}
    for key, value in settings:
        value = value.strip()
        if value.startswith('"') and value.endswith('"') and len(value) > 1:
            try:
                value = json.loads(value)
            except ValueError:
                pass
        result[key.strip()] = value
        size = re.fullmatch(r"(\d+)x(\d+)", value) if isinstance(value, str) else None
        if size:
            result[f"{key.strip()}-1"], result[f"{key.strip()}-2"] = size.group(1), size.group(2)
    return result


# ---- the router ---------------------------------------------------------------------------------------------------


# GET /options: what we do (besides sd_model_checkpoint); POST /options with another value is noted on later jobs
OPTIONS: dict[str, Any] = {"sd_checkpoint_hash": None, "samples_format": "png", "CLIP_stop_at_last_layers": 1,
                           "sd_vae": "Automatic"}  # fmt: skip
OPTION_NO_EFFECT: dict[str, tuple[Any, ...]] = {"sd_vae": ("Automatic", "None", None)}


def authorized(header: str | None, auth: tuple[str, str] | None) -> bool:
    """Whether an `Authorization: Basic ...` header carries the credentials `auth` (always, when auth is None);
    compared in constant time."""
    if auth is None:
        return True
    if not header or not header[:6].lower() == "basic ":
        return False
    try:
        user, sep, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return False
    return bool(sep) & secrets.compare_digest(user.encode(), auth[0].encode()) & \
        secrets.compare_digest(password.encode(), auth[1].encode())  # fmt: skip


def api_router(service: GenerationService, auth: tuple[str, str] | None = None) -> APIRouter:
    """A FastAPI APIRouter with the /sdapi/v1 routes, answered by `service` (a serving.GenerationService);
    `auth=(user, password)`: HTTP basic auth on every route."""
    if auth is not None and (len(auth) != 2 or not all(isinstance(s, str) and s for s in auth)):
        raise UserError("auth must be (user, password), both non-empty")
    route_class = type("A1111Route", (A1111Route,), {"auth": auth})
    # options of OPTIONS a client set (POST /options) to a value we do not apply: noted on every later job
    unapplied: dict[str, Any] = {}

    def option_notes() -> dict[str, str]:
        return {f"options.{key}": f"set to {limits.shown(value, 40)} by POST /options; not supported, "
                f"{OPTIONS[key]!r} is used" for key, value in list(unapplied.items())}  # fmt: skip

    router = APIRouter(prefix=PREFIX, route_class=route_class, tags=["A1111"])

    @router.post("/txt2img", response_model=ImageResponse)
    def txt2img(req: Txt2ImgRequest) -> dict[str, Any]:
        req, infotext = apply_infotext(req)
        prepared = prepare_txt2img(req, service, infotext)
        prepared.notes.update(option_notes())
        return run_job(service, prepared, req, _echo(req))

    @router.post("/img2img", response_model=ImageResponse)
    def img2img(req: Img2ImgRequest) -> dict[str, Any]:
        req, infotext = apply_infotext(req)
        prepared = prepare_img2img(req, service, infotext)
        prepared.notes.update(option_notes())
        drop = () if req.include_init_images else ("init_images", "mask")
        return run_job(service, prepared, req, _echo(req, drop))

    @router.get("/samplers")
    def samplers() -> list[dict[str, Any]]:
        return [{"name": a1111, "aliases": [ours, *aliases], "options": {}} for a1111, ours, aliases in SAMPLERS]

    @router.get("/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
                 "need_inner_model": False}]  # fmt: skip

    @router.get("/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        return [{"title": name, "model_name": Path(name).stem if path.is_file() else Path(name).name, "hash": None,
                 "sha256": None, "filename": name, "config": None}
                for name, path in service.catalog.entries().items()]  # fmt: skip

    @router.post("/refresh-checkpoints")
    def refresh_checkpoints() -> None:
        return None  # the catalog reads the disk on every call

    @router.get("/loras")
    def loras() -> list[dict[str, Any]]:
        return [{"name": name, "alias": name, "path": path.name, "metadata": {}}
                for name, path in service.loras.entries().items()]  # fmt: skip

    @router.post("/refresh-loras")
    def refresh_loras() -> None:
        return None

    @router.get("/scripts")
    def scripts() -> dict[str, list[str]]:
        return {"txt2img": [], "img2img": []}

    @router.get("/embeddings")
    def embeddings() -> dict[str, dict[str, Any]]:
        return {"loaded": {}, "skipped": {}}

    @router.get("/sd-vae")
    def sd_vae() -> list[dict[str, Any]]:
        return []

    @router.get("/prompt-styles")
    def prompt_styles() -> list[dict[str, Any]]:
        return []

    @router.get("/options")
    async def get_options() -> dict[str, Any]:
        return {"sd_model_checkpoint": service.model_name, **OPTIONS}

    @router.post("/options")
    def set_options(options: dict[str, Any]) -> None:
        if "sd_model_checkpoint" in options:
            service.set_model(resolve_model(service, options["sd_model_checkpoint"]))
        ignored = {}
        for key, value in options.items():
            if key == "sd_model_checkpoint":
                continue
            if key in OPTIONS and value in OPTION_NO_EFFECT.get(key, (OPTIONS[key],)):
                unapplied.pop(key, None)  # what we do anyway: a note set earlier goes
                continue
            ignored[key] = value
            if key in OPTIONS:
                unapplied[key] = value
        if ignored:
            logger.warning("POST /options: not supported, ignored: %s",
                           ", ".join(f"{k}={limits.shown(v, 40)}" for k, v in ignored.items()))  # fmt: skip
        return None  # A1111's answer (webuiapi's set_options returns it): there is no field for a note

    @router.get("/progress")
    async def progress(skip_current_image: bool = False) -> dict[str, Any]:
        return _progress(service)

    @router.post("/interrupt")
    async def interrupt() -> dict[str, Any]:
        service.interrupt()
        return {}

    @router.post("/png-info")
    def png_info(req: PngInfoRequest) -> dict[str, Any]:
        if not req.image.strip():
            return {"info": "", "items": {}, "parameters": {}}
        chunks = read_png_text(decode_base64(req.image, "image"))
        text = chunks.pop("parameters", "")
        return {"info": text, "items": chunks, "parameters": parse_infotext(text) if text else {}}

    return router


def _progress(service: GenerationService) -> dict[str, Any]:
    """A1111's ProgressResponse from service.progress(). A1111 counts batches in job_count/job_no; the service
    counts images, so job_count = the running job's images, job_no = the images done (0 and 0 when idle, which
    is what webuiapi's util_wait_for_ready waits for); sampling_step / sampling_steps are those of the running
    batch; progress and eta_relative cover the whole job. `state.queued` (ours): jobs waiting behind it."""
    snapshot = service.progress()
    job = snapshot["job"]
    state: dict[str, Any] = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                             "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
                             "sampling_steps": 0, "queued": snapshot["queued"]}  # fmt: skip
    if job is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None,
                "current_task": None}  # fmt: skip
    started = datetime.datetime.fromtimestamp(time.time() - job["elapsed"]).strftime("%Y%m%d%H%M%S")
    state.update(interrupted=job["interrupted"], job=f"job {job['id']}", job_count=job["total_images"],
                 job_timestamp=started, job_no=job["images_done"], sampling_step=job["step"],
                 sampling_steps=job["steps"])  # fmt: skip
    textinfo = f"job {job['id']}: step {job['step']} of {job['steps']}, {job['images_done']} of " \
               f"{job['total_images']} images"  # fmt: skip
    return {"progress": job["fraction"], "eta_relative": job["eta"] if job["eta"] is not None else 0.0,
            "state": state, "current_image": None, "textinfo": textinfo, "current_task": state["job"]}  # fmt: skip
