"""The browser web UI: `python -m ldm_app.webui` (or `ldm-webui`) serves a gradio page and the A1111-compatible
HTTP API (ldm_app.a1111) from one server, over one `serving.GenerationService`.

    python -m ldm_app.webui --models_dir models/ --loras_dir loras/ --port 7860 [--listen] [--auth user:pass]

Tabs: Text to image, Image to image, Inpaint (the mask is painted in the page with a brush: painted = repaint), PNG
info (drop a PNG, read its parameters, send them to the Text to image tab). Each generating tab has the prompt,
negative prompt, sampler, steps, guidance, seed (🎲 = random, the seed used is shown afterwards), size, batch
count and size, LoRAs with a scale; Text to image also has the timestep grid (blank: the model's). The model
dropdown above the tabs switches the served model and preselects the model's stored sampling defaults (its
ldm_app.json).

Choices:
- The queue is the service's, not gradio's: the UI and the HTTP API must share one queue, one order and one limit
  (`--max_queue`), and gradio's queue only sees the UI's events. So the Generate events run with no gradio
  concurrency limit: each submits its job to the service at once (a full queue or bad input is a message in the
  page) and then polls the job, yielding its queue position, step k/N and image i/M to a status line, until the
  job's future is done. Cancel calls `service.cancel(job)` (drops a waiting job, interrupts a running one: the
  images made so far are shown). A page that goes away mid-job cancels its job.
- The gallery is given the saved PNG files (`JobResult.paths`), never PIL images: gradio copies a file path to its
  cache byte for byte, whereas a PIL image would be re-encoded (as WebP by default) without the `parameters`
  chunk. So the image a user downloads from the page is the file on disk, parameters included.
- Every job names its model (the dropdown's value), so a page runs the model it shows even when another page (or
  the API) switched the served model since; switching in the dropdown also calls `service.set_model`, which the
  API's requests without a model follow (as in A1111).
- Sizes are typed in number boxes, not sliders, so any value reaches the service's checks (multiple of 8, the
  size limits of ldm_app.limits): a bad size is a message in the page, not a clamp or a crash. Every `UserError`
  is shown in the tab's status line, under the Generate and Cancel buttons (not as a toast, which would cover
  them); the server keeps serving.
- An image remakes itself from the PNG info tab, as with `generate.py --from_png`: "Send to Text to image" also
  selects the PNG's model when it is served here (without resetting the sent fields to that model's defaults: the
  dropdown's defaults follow a user's pick, gradio's `input` event, not `change`) and fills Timesteps with the grid
  the image was sampled on (its `ldm_app` chunk, else the `Timesteps:` of its text), or `own` for an image made on
  the sampler's own spacing, so a model whose stored grid changed since still gives the same pixels.
- Nothing is fetched from the internet: gradio's analytics are off (GRADIO_ANALYTICS_ENABLED=False, set before
  gradio is imported), no share link, and the theme's fonts are gradio's bundled ones.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import html
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: it reads it then

try:
    import gradio as gr  # noqa: E402
except ImportError as e:  # an install without the extra: one line, not a traceback
    raise SystemExit(f"error: the web UI needs gradio, FastAPI and uvicorn ({e}); install them with "
                     "pip install -e .[webui]") from None

from ldm_app import limits  # noqa: E402
from ldm_app.errors import ArgumentParser, UserError, run_cli  # noqa: E402

MODEL_DEFAULT_SAMPLER = "model default"  # the sampler choice that keeps the model folder's own scheduler
POLL_SECONDS = 0.25  # how often a running Generate event reads the job's progress
MAX_BATCH_COUNT = 100  # the Batch count slider's range (the service's limits still apply)
MAX_BATCH_SIZE = 8
MAX_SLIDER_STEPS = 150
MAX_SLIDER_GUIDANCE = 30.0
SEND_TO_TXT2IMG = "Send to Text to image"
PLACEHOLDER = "a small red circle above a small blue square on a white background"  # the bundled model's words
# A1111 samplers we have no exact twin for, read from a PNG as our nearest one (the API refuses them: a client's
# request must be exact; a PNG's settings are a starting point). The rest: ldm_app.a1111.resolve_sampler.
NEAREST_SAMPLERS = {"dpm++ 2m karras": "dpm++"}
OWN_SPACING = "own"  # the Timesteps box's word for the sampler's own spacing (even where the model stores a grid)


# ---- model defaults ------------------------------------------------------------------------------------------------


def model_defaults(path: Path) -> dict[str, Any]:
    """What the page preselects for a model: its stored sampling defaults (ldm_app.json), else the fallbacks the
    pipeline would use; for a model folder without a stored size, the U-Net's sample size x the autoencoder's
    scale factor (as the pipeline computes it). A single file: SD 1.x's 512."""
    from ldm_app.pipeline import FALLBACK_GUIDANCE, FALLBACK_STEPS, read_sampling_defaults

    stored: dict[str, Any] = {}
    height = width = None
    if path.is_dir():
        try:
            stored = read_sampling_defaults(path)
        except UserError:
            stored = {}  # a broken ldm_app.json is reported when the model is used
        try:
            unet = json.loads((path / "unet" / "config.json").read_text(encoding="utf-8"))
            vae = json.loads((path / "vae" / "config.json").read_text(encoding="utf-8"))
            size = unet["sample_size"]
            height, width = (size, size) if isinstance(size, int) else size
            factor = 2 ** (len(vae["block_out_channels"]) - 1)
            height, width = int(height) * factor, int(width) * factor
        except (OSError, ValueError, KeyError, TypeError):
            height = width = None
    else:
        height = width = 512
    return {
        "sampler": stored.get("sampler", MODEL_DEFAULT_SAMPLER),
        "steps": stored.get("num_inference_steps", FALLBACK_STEPS),
        "guidance": stored.get("guidance_scale", FALLBACK_GUIDANCE),
        "height": stored.get("height", height),
        "width": stored.get("width", width),
    }


# ---- PNG info ------------------------------------------------------------------------------------------------------


def parse_parameters(text: str) -> dict[str, Any]:
    """A1111's `parameters` text (prompt, optional `Negative prompt:` line, a last line of `Key: value` settings) as
    a dict: prompt, negative_prompt, and those settings that the page has fields for (steps, sampler, guidance,
    seed, width, height), each only when present and readable."""
    lines = text.strip("\n").split("\n")
    settings_line = ""
    if lines and re.match(r"^\s*Steps: ", lines[-1]):
        settings_line = lines.pop()
    negative_at = next((i for i, line in enumerate(lines) if line.startswith("Negative prompt:")), None)
    out: dict[str, Any] = {}
    if negative_at is None:
        out["prompt"], out["negative_prompt"] = "\n".join(lines), ""
    else:
        out["prompt"] = "\n".join(lines[:negative_at])
        out["negative_prompt"] = "\n".join(lines[negative_at:])[len("Negative prompt:"):].strip()
    # values may be quoted ("Lora hashes: "a: 1, b: 2""), so split on commas outside quotes
    settings = dict(re.findall(r'\s*([\w ]+):\s*("(?:\\.|[^"])*"|[^,]*)(?:,|$)', settings_line))
    settings = {k.strip(): v.strip() for k, v in settings.items()}

    def number(key: str, kind: type) -> Any:
        try:
            return kind(settings[key])
        except (KeyError, ValueError):
            return None

    for key, name, kind in (("Steps", "steps", int), ("CFG scale", "guidance", float), ("Seed", "seed", int)):
        value = number(key, kind)
        if value is not None:
            out[name] = value
    size = re.fullmatch(r"(\d+)x(\d+)", settings.get("Size", ""))
    if size:
        out["width"], out["height"] = int(size.group(1)), int(size.group(2))
    if "Sampler" in settings:
        out["sampler_text"] = settings["Sampler"]
        sampler = settings["Sampler"].lower()
        if sampler == MODEL_DEFAULT_SAMPLER:
            out["sampler"] = MODEL_DEFAULT_SAMPLER
        elif sampler in NEAREST_SAMPLERS:
            out["sampler"] = NEAREST_SAMPLERS[sampler]
        else:
            from ldm_app.a1111 import ApiError, resolve_sampler

            with contextlib.suppress(ApiError):  # a sampler we do not offer: left as the page has it
                out["sampler"] = resolve_sampler(sampler)
    if "Model" in settings:
        out["model"] = settings["Model"]
    if re.fullmatch(r"\d+(/\d+)*", settings.get("Timesteps", "")):
        out["timesteps"] = settings["Timesteps"]
    return out


def png_grid(chunks: dict[str, str]) -> str | None:
    """What a PNG's `ldm_app` chunk says of the grid a text-to-image was sampled on, as the Timesteps box takes
    it: "T1/T2/...", OWN_SPACING (the sampler's own spacing), or None where it does not say (no chunk, an edit, or an
    image made before grids were recorded on 2026-12-05: the model's stored grid decides, as when it was made)."""
    from ldm_app.pngmeta import KEY

    try:
        data = json.loads(chunks.get(KEY, ""))
    except ValueError:
        return None
    if not isinstance(data, dict) or "timesteps" not in data or data.get("init_image") is not None:
        return None
    grid = data["timesteps"]
    if grid is None:
        return OWN_SPACING
    if isinstance(grid, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in grid):
        return "/".join(map(str, grid))
    return None


def parse_grid(text: Any, steps: int) -> tuple[tuple[int, ...] | None, bool]:
    """The Timesteps box as (timesteps, own_spacing): blank (None, False): the model's stored grid where it has one;
    OWN_SPACING: the sampler's own spacing; "T1/T2/...": that grid, one timestep per step (the rest of its checks,
    order and range, are generate.py's)."""
    import argparse

    from ldm_app.generate import parse_timesteps

    text = str(text or "").strip()
    if not text:
        return None, False
    if text.lower() == OWN_SPACING:
        return None, True
    try:
        grid = parse_timesteps(text)
    except argparse.ArgumentTypeError as e:
        raise UserError(f"Timesteps: {e} (or blank for the model's grid, or '{OWN_SPACING}')") from None
    if len(grid) != steps:
        raise UserError(f"Timesteps has {len(grid)} values but Steps is {steps}: give one timestep per step, or "
                        "clear Timesteps")  # fmt: skip
    return grid, False


# ---- the page ------------------------------------------------------------------------------------------------------


@dataclass
class _Tab:
    """The components of one generating tab (the fields every tab has, then the tab's own inputs)."""

    name: str  # txt2img | img2img | inpaint
    prompt: Any
    negative: Any
    sampler: Any
    steps: Any
    guidance: Any
    width: Any
    height: Any
    batch_count: Any
    batch_size: Any
    seed: Any
    loras: Any
    lora_scale: Any
    generate: Any
    cancel: Any
    gallery: Any
    status: Any
    seed_used: Any
    info: Any
    infos: Any  # gr.State: the parameters text of each gallery image
    image: Any = None  # img2img: gr.Image; inpaint: gr.ImageMask
    strength: Any = None
    inpaint_method: Any = None
    mask_blur: Any = None
    timesteps: Any = None  # txt2img: the grid's Textbox


def _status(text: str, fraction: float | None = None, error: bool = False) -> str:
    """The status line's HTML: the text escaped (it may hold a prompt), a progress bar while running."""
    style = "color: #c62828; font-weight: 600" if error else ""
    bar = f'<progress value="{fraction:.3f}" max="1" style="width: 100%"></progress>' if fraction is not None else ""
    return f'<div class="ldm-status" style="{style}">{bar}<div>{html.escape(text)}</div></div>'


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    return f", about {value:.0f} s left" if value >= 1 else ", under a second left"


class WebUI:
    """The gradio Blocks over a GenerationService; `blocks` is the page."""

    def __init__(self, service: Any):
        self.service = service
        self._jobs: dict[tuple[str, str], Any] = {}  # (session, tab) -> its running Job, for Cancel
        self._jobs_lock = threading.Lock()
        self.blocks = self._build()

    # ---- layout ------------------------------------------------------------------------------------------------

    def _build(self) -> Any:
        from ldm_app.samplers import SAMPLERS

        service = self.service
        defaults = model_defaults(service.catalog.path(service.model_name))
        self.sampler_choices = [MODEL_DEFAULT_SAMPLER, *SAMPLERS]
        # delete_cache: gradio keeps a copy of every image it serves; copies older than a day go (checked hourly)
        with gr.Blocks(title="ldm_app", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
            with gr.Row():
                self.model = gr.Dropdown(service.catalog.names(), value=service.model_name, label="Model",
                                         elem_id="model", scale=4, filterable=False)  # fmt: skip
                self.refresh = gr.Button("Refresh the lists of models and LoRAs", elem_id="refresh", scale=1,
                                         size="sm", variant="secondary")  # fmt: skip
            with gr.Tabs(selected="txt2img") as self.tabs:
                with gr.Tab("Text to image", id="txt2img"):
                    self.txt2img = self._tab("txt2img", defaults)
                with gr.Tab("Image to image", id="img2img"):
                    self.img2img = self._tab("img2img", defaults)
                with gr.Tab("Inpaint", id="inpaint"):
                    self.inpaint = self._tab("inpaint", defaults)
                with gr.Tab("PNG info", id="pnginfo"):
                    self._png_info_tab()
            self._wire(demo)
        return demo

    def _tab(self, name: str, defaults: dict[str, Any]) -> _Tab:
        edit = name != "txt2img"
        with gr.Row():
            with gr.Column(scale=4):
                prompt = gr.Textbox(label="Prompt", lines=3, elem_id=f"{name}_prompt", placeholder=PLACEHOLDER)
                negative = gr.Textbox(label="Negative prompt", lines=2, elem_id=f"{name}_negative")
            with gr.Column(scale=1, min_width=160):
                generate = gr.Button("Generate", variant="primary", elem_id=f"{name}_generate", size="lg")
                cancel = gr.Button("Cancel", variant="stop", elem_id=f"{name}_cancel")
                # beside the buttons, where the eye is after a click (a toast would cover the buttons)
                status = gr.HTML(_status("Ready."), elem_id=f"{name}_status")
        image = strength = inpaint_method = mask_blur = None
        with gr.Row():
            with gr.Column(scale=1):
                if name == "img2img":
                    image = gr.Image(label="Image", type="pil", image_mode="RGB", elem_id="img2img_image",
                                     sources=["upload", "clipboard"], height=320)  # fmt: skip
                elif name == "inpaint":
                    image = gr.ImageMask(label="Image and mask (paint the part to repaint)", type="pil",
                                         image_mode="RGBA", elem_id="inpaint_image", sources=["upload", "clipboard"],
                                         brush=gr.Brush(colors=[("#ff00ff", 0.8)], color_mode="fixed", default_size=8),
                                         layers=False, transforms=(), height=420)  # fmt: skip
                if edit:
                    strength = gr.Slider(0.01, 1.0, value=0.75 if name == "img2img" else 1.0, step=0.01,
                                         label="Denoising strength", elem_id=f"{name}_strength")  # fmt: skip
                if name == "inpaint":
                    with gr.Row():
                        inpaint_method = gr.Dropdown(["auto", "blend", "repaint", "model"], value="auto",
                                                     label="Inpaint method", elem_id="inpaint_method",
                                                     info="auto: model for an inpainting model (9-channel U-Net), "
                                                     "else repaint (RePaint resampling, the most accurate; see the "
                                                     "README); blend: fastest")  # fmt: skip
                        mask_blur = gr.Slider(0, 64, value=4, step=1, label="Mask blur", elem_id="inpaint_mask_blur")
                with gr.Row():
                    sampler = gr.Dropdown(self.sampler_choices, value=defaults["sampler"], label="Sampler",
                                          elem_id=f"{name}_sampler", filterable=False)  # fmt: skip
                    steps = gr.Slider(1, MAX_SLIDER_STEPS, value=defaults["steps"], step=1, label="Steps",
                                      elem_id=f"{name}_steps")  # fmt: skip
                guidance = gr.Slider(0.0, MAX_SLIDER_GUIDANCE, value=defaults["guidance"], step=0.5,
                                     label="Guidance (CFG scale)", elem_id=f"{name}_guidance")  # fmt: skip
                timesteps = None
                if not edit:  # an edit starts part way down the sampler's own spacing
                    timesteps = gr.Textbox(label="Timesteps", elem_id="txt2img_timesteps", max_lines=1,
                                           placeholder="the model's grid",
                                           info=f"blank: the model's stored grid, if any; '{OWN_SPACING}': the "
                                           "sampler's own spacing; or one per step, e.g. 999/700/400/100")  # fmt: skip
                # an edit keeps its image's size unless told (0); a blank number box reads as 0 in gradio too
                size_info = "0: the image's size; else a multiple of 8" if edit else "a multiple of 8"
                with gr.Row():
                    width = gr.Number(0 if edit else defaults["width"], label="Width",
                                      elem_id=f"{name}_width", info=size_info)  # fmt: skip
                    height = gr.Number(0 if edit else defaults["height"], label="Height",
                                       elem_id=f"{name}_height", info=size_info)  # fmt: skip
                with gr.Row():
                    batch_count = gr.Slider(1, MAX_BATCH_COUNT, value=1, step=1, label="Batch count",
                                            elem_id=f"{name}_batch_count")  # fmt: skip
                    batch_size = gr.Slider(1, MAX_BATCH_SIZE, value=1, step=1, label="Batch size",
                                           elem_id=f"{name}_batch_size")  # fmt: skip
                with gr.Row(equal_height=True):
                    # no `precision=0` on the three: gradio would round 71.6 to 72 (and seed 3.7 to 4) without a
                    # word; _size and count refuse what is not whole
                    seed = gr.Number(-1, label="Seed (-1: random)", elem_id=f"{name}_seed", scale=4)
                    random_seed = gr.Button("🎲", elem_id=f"{name}_random_seed", scale=0, min_width=48)
                    reuse_seed = gr.Button("♻", elem_id=f"{name}_reuse_seed", scale=0, min_width=48)
                with gr.Row():
                    loras = gr.Dropdown(list(self.service.loras.entries()), value=[], multiselect=True, label="LoRAs",
                                        elem_id=f"{name}_loras", scale=3)  # fmt: skip
                    lora_scale = gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="LoRA scale",
                                           elem_id=f"{name}_lora_scale", scale=2)  # fmt: skip
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="Images", columns=3, height="auto", format="png", elem_id=f"{name}_gallery",
                                     object_fit="contain", interactive=False,
                                     buttons=["download", "fullscreen"])  # fmt: skip
                seed_used = gr.Textbox(label="Seed used", interactive=False, elem_id=f"{name}_seed_used")
                info = gr.Textbox(label="Parameters (stored in each PNG)", lines=4, interactive=False,
                                  elem_id=f"{name}_info")  # fmt: skip
                infos = gr.State([])
        random_seed.click(lambda: -1, outputs=seed, api_visibility="private")
        reuse_seed.click(lambda used, current: int(used) if str(used).strip().isdigit() else current,
                         inputs=[seed_used, seed], outputs=seed, api_visibility="private")  # fmt: skip
        return _Tab(name, prompt, negative, sampler, steps, guidance, width, height, batch_count, batch_size, seed,
                    loras, lora_scale, generate, cancel, gallery, status, seed_used, info, infos, image, strength,
                    inpaint_method, mask_blur, timesteps)  # fmt: skip

    def _png_info_tab(self) -> None:
        with gr.Row():
            with gr.Column():
                # a File, not an Image: gr.Image would hand over a re-encoded copy without the text chunks
                self.png_file = gr.File(label="PNG (drop one here)", file_types=[".png"], type="binary",
                                        elem_id="pnginfo_file")  # fmt: skip
                self.png_preview = gr.Image(label="Preview", interactive=False, elem_id="pnginfo_preview", height=320)
            with gr.Column():
                self.png_text = gr.Textbox(label="Parameters", lines=8, interactive=False, elem_id="pnginfo_parameters")
                self.png_send = gr.Button(SEND_TO_TXT2IMG, variant="primary", elem_id="pnginfo_send")
                self.png_status = gr.HTML(_status("Drop a PNG made by ldm_app or A1111."), elem_id="pnginfo_status")
                self.png_grid = gr.State(None)  # png_grid() of the PNG read

    def _wire(self, demo: Any) -> None:
        tabs = (self.txt2img, self.img2img, self.inpaint)
        for tab in tabs:
            inputs = {self.model, tab.prompt, tab.negative, tab.sampler, tab.steps, tab.guidance, tab.width,
                      tab.height, tab.batch_count, tab.batch_size, tab.seed, tab.loras, tab.lora_scale}  # fmt: skip
            inputs |= {c for c in (tab.image, tab.strength, tab.inpaint_method, tab.mask_blur, tab.timesteps)
                       if c is not None}  # fmt: skip
            outputs = [tab.gallery, tab.status, tab.seed_used, tab.info, tab.infos]

            # gradio passes the request (whose session_hash keys the Cancel button's job) to a parameter annotated
            # gr.Request; `tab` is bound by default value, one handler per tab
            def generate(data: dict, request: gr.Request, tab: _Tab = tab) -> Iterator[dict]:
                yield from self._generate(tab, data, request)

            def cancel(request: gr.Request, tab: _Tab = tab) -> str:
                return self._cancel(tab, request)

            tab.generate.click(generate, inputs=inputs, outputs=outputs, concurrency_limit=None,
                               show_progress="hidden", api_visibility="private")  # fmt: skip
            tab.cancel.click(cancel, outputs=[tab.status], concurrency_limit=None, show_progress="hidden",
                             api_visibility="private")  # fmt: skip
            tab.gallery.select(self._select_image, inputs=[tab.infos], outputs=[tab.info, tab.seed_used],
                               api_visibility="private")  # fmt: skip
        default_outputs = [c for tab in tabs for c in (tab.sampler, tab.steps, tab.guidance)]
        default_outputs += [self.txt2img.width, self.txt2img.height, self.txt2img.timesteps]
        # `input`, not `change`: a user's pick, not the model that "Send to Text to image" selects with its fields
        self.model.input(self._switch_model, inputs=[self.model], outputs=default_outputs, api_visibility="private")
        self.refresh.click(self._refresh, outputs=[self.model, *(tab.loras for tab in tabs)], api_visibility="private")
        self.png_file.change(self._read_png, inputs=[self.png_file], outputs=[self.png_text, self.png_preview,
                             self.png_status, self.png_grid], api_visibility="private")  # fmt: skip
        t = self.txt2img
        edit_defaults = [c for tab in (self.img2img, self.inpaint) for c in (tab.sampler, tab.steps, tab.guidance)]
        self.png_send.click(self._send_to_txt2img, inputs=[self.png_text, self.png_grid, self.model],
                            outputs=[t.prompt, t.negative, t.steps, t.guidance, t.seed, t.width, t.height, t.sampler,
                                     t.timesteps, self.model, *edit_defaults, self.png_status, self.tabs],
                            api_visibility="private")  # fmt: skip

    # ---- events --------------------------------------------------------------------------------------------------

    def _spec(self, tab: _Tab, data: dict) -> Any:
        """The JobSpec of a tab's fields; UserError for what the service does not check itself."""
        from ldm_app.serving import JobSpec, a1111_weighting

        def real(component: Any, what: str) -> float:
            value = data[component]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"{what} must be a number, got {limits.shown(value)}")
            return float(value)

        def count(component: Any, what: str) -> int:
            value = real(component, what)
            if value != int(value):
                raise UserError(f"{what} must be a whole number, got {value:g}")
            return int(value)

        seed = None if data[tab.seed] is None else count(tab.seed, "seed")
        if seed == -1:
            seed = None
        sampler = data[tab.sampler]
        steps = count(tab.steps, "steps")
        timesteps, own_spacing = parse_grid(data[tab.timesteps], steps) if tab.timesteps is not None else (None, False)
        names = data[tab.loras] or []
        scale = real(tab.lora_scale, "LoRA scale")
        init_image = mask = None
        if tab.name == "img2img":
            if data[tab.image] is None:
                raise UserError("no image: upload the image to change")
            init_image = _checked_image(data[tab.image], "the image")
        elif tab.name == "inpaint":
            init_image, mask = _image_and_mask(data[tab.image])
        prompt, negative = data[tab.prompt] or "", data[tab.negative] or ""
        return JobSpec(
            prompt=prompt, negative_prompt=negative, seed=seed, weighting=a1111_weighting(prompt, negative),
            steps=steps, guidance_scale=real(tab.guidance, "guidance"),
            sampler=None if sampler in (None, MODEL_DEFAULT_SAMPLER) else sampler,
            width=_size(data[tab.width], tab.name != "txt2img"), height=_size(data[tab.height], tab.name != "txt2img"),
            batch_size=count(tab.batch_size, "batch size"), n_iter=count(tab.batch_count, "batch count"),
            init_image=init_image, mask=mask,
            strength=real(tab.strength, "strength") if tab.strength is not None else None,
            inpaint=data[tab.inpaint_method] if tab.inpaint_method is not None and data[tab.inpaint_method] != "auto"
            else None,  # None: generate.py's default for the model
            mask_blur=real(tab.mask_blur, "mask blur") if tab.mask_blur is not None else 0.0,
            loras=tuple((name, scale) for name in names), model=data[self.model], timesteps=timesteps,
            own_spacing=own_spacing,
        )  # fmt: skip

    def _generate(self, tab: _Tab, data: dict, request: gr.Request) -> Iterator[dict]:
        """Submit the job, then report its queue position and progress until it is done (see the module doc)."""
        from ldm_app.pngmeta import format_parameters
        from ldm_app.serving import JobCancelled

        service = self.service
        try:
            job = service.submit(self._spec(tab, data))
        except UserError as e:
            yield self._error(tab, e)
            return
        key = (getattr(request, "session_hash", None) or "", tab.name)
        with self._jobs_lock:
            self._jobs[key] = job
        try:
            while not concurrent.futures.wait([job.future], timeout=POLL_SECONDS).done:
                yield {tab.status: self._progress_text(job)}
            result = job.future.result()
        except JobCancelled:
            yield {tab.status: _status("Cancelled before it started.")}
            return
        except UserError as e:
            yield self._error(tab, e)
            return
        finally:
            if not job.future.done():  # the page went away (gradio closed this generator): drop the job
                service.cancel(job)
            with self._jobs_lock:
                if self._jobs.get(key) is job:
                    del self._jobs[key]
        saved = result.params[: len(result.params) - result.partial_images]  # the saved ones come first
        texts = [format_parameters(p) for p in saved]
        pictures = [(str(path), f"seed {p.seed}") for path, p in zip(result.paths, saved)]
        made = f"{len(pictures)} image{'s' if len(pictures) != 1 else ''}"
        if result.interrupted:
            cut = f" ({result.partial_images} cut short mid-sampling, not saved)" if result.partial_images else ""
            message = f"Cancelled: {made} of {job.total_images} made{cut}."
        else:
            message = f"Done: {made} with {result.model}."
        message += "".join(f" {note[:1].upper()}{note[1:]}." for note in result.notes)  # the words it never saw
        yield {
            tab.gallery: pictures, tab.status: _status(message), tab.infos: texts,
            tab.seed_used: str(result.params[0].seed) if result.params else "",
            tab.info: texts[0] if texts else "",
        }  # fmt: skip

    def _progress_text(self, job: Any) -> str:
        position = self.service.position(job)
        if position > 0:
            waiting = max(position, self.service.progress()["queued"])
            return _status(f"Waiting in the queue: position {position} of {waiting} waiting, after the job "
                           "running now.")  # fmt: skip
        if job.future.done():
            return _status("Finishing…", 1.0)
        if job.steps == 0 and job.images_done == 0:
            return _status(f"Starting (loading {job.model_name} if needed)…", 0.0)
        snapshot = self.service.progress().get("job") or {}
        eta = snapshot.get("eta") if snapshot.get("id") == job.id else None
        image = min(job.images_done + 1, job.total_images)
        text = f"Image {image}/{job.total_images}, step {job.step}/{job.steps}{_seconds(eta)}"
        if job.stop:
            text = "Cancelling… " + text
        return _status(text, job.fraction())

    @staticmethod
    def _error(tab: _Tab, error: Exception) -> dict:
        return {tab.status: _status(f"Error: {error}", error=True)}

    def _cancel(self, tab: _Tab, request: gr.Request) -> str:
        key = (getattr(request, "session_hash", None) or "", tab.name)
        with self._jobs_lock:
            job = self._jobs.get(key)
        if job is None or job.future.done():
            return _status("Nothing to cancel.")
        self.service.cancel(job)
        return _status("Cancelling…")

    @staticmethod
    def _select_image(infos: list[str], evt: gr.SelectData) -> tuple[str, str]:
        index = getattr(evt, "index", None)
        if not isinstance(index, int) or not 0 <= index < len(infos):
            return infos[0] if infos else "", ""
        text = infos[index]
        seed = re.search(r"Seed: (\d+)", text)
        return text, seed.group(1) if seed else ""

    def _switch_model(self, name: str) -> list[Any]:
        try:
            self.service.set_model(name)
            defaults = model_defaults(self.service.catalog.path(name))
        except UserError as e:
            raise gr.Error(html.escape(str(e))) from None
        values = [defaults["sampler"], defaults["steps"], defaults["guidance"]] * 3
        return [*values, defaults["width"], defaults["height"], ""]  # "": the new model's own grid

    def _refresh(self) -> list[Any]:
        names = self.service.catalog.names()
        loras = list(self.service.loras.entries())
        return [gr.Dropdown(choices=names), *(gr.Dropdown(choices=loras) for _ in range(3))]

    def _read_png(self, data: bytes | None) -> tuple[str, Any, str, str | None]:
        from ldm_app.pngmeta import TEXT_KEY
        from ldm_app.serving import decode_image, read_png_text

        if not data:
            return "", None, _status("Drop a PNG made by ldm_app or A1111."), None
        try:
            chunks = read_png_text(data)
        except UserError as e:
            return "", None, _status(f"Error: {e}", error=True), None
        try:
            preview = decode_image(data, "the PNG")
        except UserError:
            preview = None  # e.g. smaller than 8x8: the parameters are still worth reading
        text = chunks.get(TEXT_KEY)
        if text is None:
            return "", preview, _status("This PNG has no generation parameters (no 'parameters' text chunk)."), None
        return text, preview, _status("Parameters read."), png_grid(chunks)

    def _send_to_txt2img(self, text: str, grid: str | None, model: str) -> list[Any]:
        """The PNG's parameters into the Text to image tab; its model selected when served here (the edit tabs get
        that model's defaults, as a pick in the dropdown gives them); its grid (see the module doc)."""
        keep = gr.skip()
        if not text or not text.strip():
            return [keep] * 16 + [_status("No parameters to send: drop a PNG first.", error=True), keep]
        p = parse_parameters(text)
        notes = []
        if "sampler_text" in p and "sampler" not in p:
            notes.append(f"its sampler {p['sampler_text']!r} is not offered here, kept the current one")
        switch: list[Any] = [keep] * 7  # the model dropdown, then the edit tabs' sampler, steps, guidance
        made_with = p.get("model")
        if made_with and made_with != model and Path(model).name != made_with:
            # a PNG names its model by file or folder name; the catalog by the path under --models_dir
            served = [name for name, path in self.service.catalog.entries().items() if made_with in (name, path.name)]
            if len(served) == 1:
                try:
                    self.service.set_model(served[0])
                    defaults = model_defaults(self.service.catalog.path(served[0]))
                    switch = [served[0], *[defaults["sampler"], defaults["steps"], defaults["guidance"]] * 2]
                    notes.append(f"selected its model {served[0]!r}")
                except UserError as e:
                    notes.append(f"its model {made_with!r} cannot be selected ({e})")
            elif served:
                notes.append(f"it was made with model {made_with!r}: several served models have that name "
                             f"({', '.join(served)}); pick it above, then send again")  # fmt: skip
            else:
                notes.append(f"it was made with model {made_with!r}, which is not served here; the pixels will "
                             "differ")  # fmt: skip
        # the grid: the PNG's chunk says (blank for an image made before grids were recorded: the model decides),
        # else its text; a PNG saying nothing clears the box, so no earlier grid stays behind
        timesteps = grid if grid is not None else p.get("timesteps", "")
        message = "Sent to Text to image" + (f" ({'; '.join(notes)})." if notes else ".")
        return [p.get("prompt", keep), p.get("negative_prompt", keep), p.get("steps", keep), p.get("guidance", keep),
                p.get("seed", keep), p.get("width", keep), p.get("height", keep), p.get("sampler", keep), timesteps,
                *switch, _status(message), gr.Tabs(selected="txt2img")]  # fmt: skip


def _size(value: Any, zero_is_default: bool) -> int | None:
    """A typed width/height: None for the default (blank, or 0 in an edit tab: the image's size), else the integer
    (the service checks it)."""
    if value is None or (zero_is_default and value == 0):
        return None
    number = float(value)
    if number != int(number):
        raise UserError(f"a size must be a whole number of pixels, got {value}")
    return int(number)


def _checked_image(image: Any, what: str) -> Any:
    """An uploaded PIL image within the size limits, as RGB (alpha flattened on white)."""
    from ldm_app.data.dataset import to_rgb

    side = limits.current().max_image_side
    if image.width > side or image.height > side:
        raise UserError(f"{what} is {image.width}x{image.height} pixels, above the limit of {side} per side")
    if image.width < 8 or image.height < 8:
        raise UserError(f"{what} is {image.width}x{image.height} pixels; expected at least 8x8")
    return to_rgb(image)


def _image_and_mask(value: Any) -> tuple[Any, Any]:
    """The image and the mask ("L", white = repaint) of a gr.ImageMask value: the mask is every pixel that a brush
    layer painted (alpha > 0), at the background image's size."""
    from PIL import Image, ImageChops

    background = (value or {}).get("background")
    if background is None:
        raise UserError("no image: upload the image to inpaint, then paint the part to repaint")
    image = _checked_image(background, "the image")
    mask = Image.new("L", image.size, 0)
    for layer in value.get("layers") or []:
        alpha = layer.convert("RGBA").getchannel("A")
        if alpha.size != image.size:
            alpha = alpha.resize(image.size, Image.NEAREST)
        mask = ImageChops.lighter(mask, alpha.point(lambda a: 255 if a > 0 else 0))
    if mask.getbbox() is None:
        raise UserError("the mask is empty: paint over the part of the image to repaint")
    return image, mask


# ---- the server ----------------------------------------------------------------------------------------------------


def build_app(service: Any, auth: tuple[str, str] | None = None) -> Any:
    """A FastAPI app: the A1111 API routes (/sdapi/v1/...) and the gradio page at "/", over one service and so one
    queue. `auth`: (user, password) for both."""
    from fastapi import FastAPI

    from ldm_app import a1111
    from ldm_app.serving import MAX_INPUT_BYTES

    app = FastAPI(title="ldm_app")
    app.include_router(a1111.api_router(service, auth))  # before the mount at "/", which would catch every path
    ui = WebUI(service)
    ui.blocks.queue(default_concurrency_limit=None, max_size=None)
    app.state.webui = ui
    return gr.mount_gradio_app(
        app, ui.blocks, path="/", auth=auth, allowed_paths=[str(service.outputs_dir)], show_error=True,
        max_file_size=MAX_INPUT_BYTES, footer_links=[], ssr_mode=False, mcp_server=False,
    )  # fmt: skip


def _parse_auth(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise UserError("--auth must be USER:PASSWORD (both non-empty), got a text without them")
    return user, password


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise UserError(f"--port must be a number between 1 and 65535, got {limits.shown(text, 20)}") from None
    if not 1 <= port <= 65535:
        raise UserError(f"--port must be between 1 and 65535, got {port}")
    return port


def parse_args(argv: list[str] | None = None) -> Any:
    p = ArgumentParser(prog="python -m ldm_app.webui",
                       description="The web UI and the A1111-compatible HTTP API (/sdapi/v1) on one server.")
    p.add_argument("--listen", action="store_true", help="listen on every interface (0.0.0.0), not just 127.0.0.1")
    p.add_argument("--port", type=str, default="7860", help="the port (default 7860)")
    p.add_argument("--auth", help="USER:PASSWORD required by the page and the API")
    p.add_argument("--models_dir", help="a folder of model folders and .safetensors/.ckpt files to choose from "
                   "(the bundled default model is always offered)")  # fmt: skip
    p.add_argument("--model", help="the model selected at start (a name in the Model list; default: the bundled one)")
    p.add_argument("--loras_dir", help="a folder of LoRA .safetensors files")
    p.add_argument("--outputs_dir", default="outputs", help="where the images are saved (default: outputs)")
    p.add_argument("--max_queue", type=str, default="8", help="jobs waiting or running at most (default 8)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", help="auto, fp32, fp16 or bf16")
    args = p.parse_args(argv)
    args.port = _port(args.port)
    args.auth = _parse_auth(args.auth) if args.auth is not None else None
    try:
        args.max_queue = int(args.max_queue)
    except ValueError:
        raise UserError(f"--max_queue must be a whole number, got {limits.shown(args.max_queue, 20)}") from None
    return args


def _check_free(host: str, port: int) -> None:
    """A one-line error now for a port another program holds (uvicorn would log a traceback-like error later)."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); is another server "
                            "running there?") from None  # fmt: skip


def _serve(argv: list[str] | None) -> None:
    args = parse_args(argv)
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    _check_free(host, args.port)
    from ldm_app.pipeline import resolve_device_dtype
    from ldm_app.serving import GenerationService, ServerConfig

    resolve_device_dtype(args.device, args.dtype)  # a bad --device is refused now, not at the first job
    service = GenerationService(ServerConfig(
        models_dir=args.models_dir, model=args.model, loras_dir=args.loras_dir, outputs_dir=args.outputs_dir,
        max_queue=args.max_queue, device=args.device, dtype=args.dtype,
    ))  # fmt: skip
    app = build_app(service, args.auth)
    import uvicorn

    print(f"ldm_app web UI on http://{'127.0.0.1' if args.listen else host}:{args.port}/ "
          f"(API: /sdapi/v1/, model: {service.model_name}, outputs: {service.outputs_dir})", flush=True)  # fmt: skip
    try:
        uvicorn.run(app, host=host, port=args.port, log_level="warning")
    finally:
        service.close()


def main(argv: list[str] | None = None) -> int:
    """The console script `ldm-webui`: a bad flag is one line on stderr and exit status 2."""
    return run_cli(_serve, argv)


if __name__ == "__main__":
    raise SystemExit(main())
