"""What the web UI (ldm_app.webui) and the A1111-compatible HTTP API (ldm_app.a1111) share: the models a server
offers, a queue that runs one generation at a time on the loaded model, progress and interrupt, and the checks of
client input (images as bytes, names instead of paths).

- `ModelCatalog`: the model folders (with model_index.json) and SD-1.x single files (.safetensors, .ckpt) under
  `--models_dir`, plus the bundled default model, each by a *name* (its path relative to the folder). Clients only
  ever send names: a name that is not in the catalog is refused, so no client path reaches the file system.
  LoRA files are offered the same way from `--loras_dir`.
- `GenerationService`: `submit(JobSpec)` checks everything that needs no model at once (a `UserError`: HTTP 4xx,
  or a message in the UI) and puts the job in a bounded FIFO queue (`QueueFull` when `max_queue` jobs are waiting
  or running: HTTP 503). One worker thread runs the jobs in order on the one loaded pipeline (a model switch loads
  the new one when the next job needs it), through generate.py's own code path (`generate.run`), so every image is
  checked, seeded and recorded exactly as on the command line. `progress()` says which job runs and at which step;
  `interrupt()` ends the running job early (its images so far are returned, as in A1111); `cancel(job)` drops a
  waiting job or interrupts a running one.
- Input images arrive as bytes (`decode_image`): the size is read from the header and checked against the limits
  before the pixels are decoded (a decompression bomb is refused without being inflated). An image-to-image or
  inpainting job writes its input image and mask under `outputs_dir/inputs/` (named by their SHA-256), so the PNGs
  it makes can be remade with `generate.py --from_png` like any other. Nothing is written outside `outputs_dir`.

The queue is written here rather than taken from gradio's: the HTTP API and the UI must share one queue, one order
and one limit, and gradio's queue only sees the UI's events.
"""

from __future__ import annotations

import base64
import binascii
import collections
import concurrent.futures
import contextlib
import datetime
import hashlib
import io
import itertools
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from ldm_app import DEFAULT_MODEL, limits
from ldm_app.errors import UserError

logger = logging.getLogger(__name__)

MODEL_SUFFIXES = (".safetensors", ".ckpt")
DEFAULT_MODEL_NAME = "default_model"  # the bundled model's name when it is not inside --models_dir
MAX_SCAN_DEPTH = 3  # how deep --models_dir is searched for model folders
MAX_INPUT_BYTES = 64 * 1024 * 1024  # one base64 image after decoding
_FLAG = re.compile(r"(?<![\w-])--(\w+)")  # "--width" in generate.py's messages -> "width"


def field_wording(message: str) -> str:
    """A UserError's message with generate.py's flag names (`--width`) as the fields a server's clients know
    (`width`): the checks are generate.py's, shared with the command line."""
    return _FLAG.sub(r"\1", message)


class QueueFull(UserError):
    """The queue holds `max_queue` jobs already (HTTP 503: try again later)."""


class JobCancelled(UserError):
    """The job was cancelled before it started."""


# ---- the models and LoRAs a server offers ------------------------------------------------------------------------


def _is_model_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file()


class ModelCatalog:
    """Model folders and single files under `models_dir` by name, plus the bundled default model."""

    def __init__(self, models_dir: str | os.PathLike | None, default_model: str | os.PathLike = DEFAULT_MODEL):
        self.models_dir = Path(models_dir).resolve() if models_dir is not None else None
        if self.models_dir is not None and not self.models_dir.is_dir():
            raise UserError(f"--models_dir {models_dir}: no such folder; expected a folder of model folders or "
                            ".safetensors/.ckpt files")  # fmt: skip
        self.default_model = Path(default_model).resolve()

    def entries(self) -> dict[str, Path]:
        """name -> path, read from the disk on every call (a model copied in appears without a restart)."""
        found: dict[str, Path] = {}
        if self.models_dir is not None:
            for path in sorted(self._scan(self.models_dir, 0)):
                found[path.relative_to(self.models_dir).as_posix()] = path
        if self.default_model not in found.values() and (
            _is_model_folder(self.default_model) or self.default_model.is_file()
        ):
            found.setdefault(DEFAULT_MODEL_NAME if self.default_model == Path(DEFAULT_MODEL).resolve()
                             else self.default_model.name, self.default_model)  # fmt: skip
        return found

    def _scan(self, folder: Path, depth: int) -> list[Path]:
        out: list[Path] = []
        try:
            children = sorted(folder.iterdir())
        except OSError:
            return out
        for child in children:
            if child.name.startswith("."):
                continue
            if child.is_dir():
                if _is_model_folder(child):
                    out.append(child)
                elif depth + 1 < MAX_SCAN_DEPTH:
                    out.extend(self._scan(child, depth + 1))
            elif child.suffix.lower() in MODEL_SUFFIXES and child.is_file():
                out.append(child)
        return out

    def names(self) -> list[str]:
        return list(self.entries())

    def path(self, name: str) -> Path:
        """The path of model `name`; UserError for a name the catalog does not have (never a path from a client)."""
        return _lookup(self.entries(), name, "model")


class LoraCatalog:
    """LoRA .safetensors files under `loras_dir` by name (the file name without .safetensors, A1111's way)."""

    def __init__(self, loras_dir: str | os.PathLike | None):
        self.loras_dir = Path(loras_dir).resolve() if loras_dir is not None else None
        if self.loras_dir is not None and not self.loras_dir.is_dir():
            raise UserError(f"--loras_dir {loras_dir}: no such folder; expected a folder of LoRA .safetensors files")

    def entries(self) -> dict[str, Path]:
        if self.loras_dir is None:
            return {}
        return {p.stem: p for p in sorted(self.loras_dir.glob("*.safetensors")) if p.is_file()}

    def path(self, name: str) -> Path:
        return _lookup(self.entries(), name, "LoRA")


def _lookup(entries: dict[str, Path], name: Any, what: str) -> Path:
    if not isinstance(name, str) or name not in entries:
        raise UserError(f"unknown {what} {limits.shown(name, 80)}; expected one of: {', '.join(entries) or '(none)'}")
    return entries[name]


# ---- client images -----------------------------------------------------------------------------------------------


def decode_base64(text: Any, what: str) -> bytes:
    """The bytes of a base64 text (a `data:image/png;base64,` prefix allowed, as A1111 clients send)."""
    if not isinstance(text, str):
        raise UserError(f"{what} must be a base64 text, got {limits.shown(text, 40)}")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    if len(text) > MAX_INPUT_BYTES * 4 // 3 + 4:
        raise UserError(f"{what} is over {MAX_INPUT_BYTES // 2**20} MiB; expected a smaller image")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"{what} is not valid base64; expected a base64-encoded PNG or JPEG") from None


@contextlib.contextmanager
def _opened(data: bytes, what: str, expected: str, min_side: int = 1) -> Iterator[Any]:
    """The PIL image in `data`, its pixels loaded only after its size (read from the header) is within the limits,
    so a decompression bomb is refused without being inflated; Pillow's errors as one-line UserErrors."""
    from PIL import Image, UnidentifiedImageError

    side = limits.current().max_image_side
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width > side or image.height > side:
                raise UserError(f"{what} is {image.width}x{image.height} pixels, above the limit of {side} per side")
            if image.width < min_side or image.height < min_side:
                raise UserError(f"{what} is {image.width}x{image.height} pixels; expected at least "
                                f"{min_side}x{min_side}")  # fmt: skip
            image.load()
            yield image
    except UserError:
        raise
    except Image.DecompressionBombError:  # Pillow's own refusal, from the header too, for a gross excess
        raise UserError(f"{what} claims far more pixels than allowed (DecompressionBombError: a decompression "
                        f"bomb?); the limit is {side} pixels per side") from None  # fmt: skip
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{what} is not a readable image ({type(e).__name__}); expected {expected}") from None


def decode_image(data: bytes, what: str, mode: str = "RGB") -> Any:
    """A PIL image from `data` (see `_opened`), converted to `mode` ("RGB": alpha on white, as the training data
    reader does; "L" for masks)."""
    from ldm_app.data.dataset import to_rgb

    with _opened(data, what, "a PNG or JPEG", min_side=8) as image:
        rgb = to_rgb(image)
    return rgb if mode == "RGB" else rgb.convert(mode)


def encode_png(image: Any, params: Any = None, text: str | None = None) -> bytes:
    """PNG bytes with the same text chunks as a saved image (`ldm_app` JSON and A1111 `parameters`)."""
    from ldm_app.pngmeta import png_info

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(params, text))
    return buffer.getvalue()


def read_png_text(data: bytes) -> dict[str, str]:
    """The text chunks of PNG bytes (the `parameters` of an A1111 or ldm_app image); {} for an image without.

    Reading text needs no pixels, so an image above the generation limits (an upscaled 4096 px image) is read too:
    from the chunks before its pixel data, where Pillow, and so A1111 and ldm_app, write them; its pixels are never
    decoded. Pillow's own decompression-bomb refusal, from the header, still applies."""
    from PIL import Image, UnidentifiedImageError

    side = limits.current().max_image_side
    try:
        with Image.open(io.BytesIO(data)) as image:  # the header and the chunks before the pixel data
            if image.width > side or image.height > side:
                return {str(k): str(v) for k, v in image.info.items() if isinstance(v, str)}
    except (Image.DecompressionBombError, UnidentifiedImageError, OSError, ValueError, SyntaxError):
        pass  # worded in one line by `_opened` below
    with _opened(data, "the image", "a PNG") as image:
        return {str(k): str(v) for k, v in getattr(image, "text", {}).items()}


def a1111_weighting(prompt: str, negative_prompt: str) -> bool:
    """Whether a served job reads A1111 prompt weights by default: where the prompt or negative prompt uses their
    syntax, as A1111's web UI and API do (a plain prompt reads the same either way)."""
    from ldm_app.adapters import uses_weighting_syntax

    return uses_weighting_syntax(prompt) or uses_weighting_syntax(negative_prompt)


def _store_input(image: Any, folder: Path) -> str:
    """Write a client's input image under `folder` named by its pixels' SHA-256 (the same image is stored once);
    returns the path."""
    from ldm_app.pngmeta import save_png

    digest = hashlib.sha256(image.tobytes() + repr((image.mode, image.size)).encode()).hexdigest()[:32]
    path = folder / f"{digest}.png"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        save_png(image, path, None, "", overwrite=True)
    return str(path)


def _with_inputs(request: Any, spec: Any, folder: Path) -> Any:
    """`request` with the job's init image and mask stored under `folder` (generate.py reads them as files)."""
    return replace(request, init_image=_store_input(spec.init_image, folder),
                   mask=_store_input(spec.mask, folder) if spec.mask is not None else None)  # fmt: skip


def _defaults_stamp(model: Path) -> tuple[int, int] | None:
    """(mtime_ns, size) of a model folder's ldm_app.json; None for a single file or a folder without one."""
    from ldm_app.pipeline import DEFAULTS_FILE

    try:
        stat = (model / DEFAULTS_FILE).stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


# ---- jobs --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    """One generation as a face asks for it. None: the model's stored default. `init_image`/`mask`: PIL images
    (decoded with `decode_image`); `loras`: (name in the LoRA catalog, scale); `model`: a catalog name (None: the
    selected model)."""

    prompt: str
    negative_prompt: str = ""
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    sampler: str | None = None
    height: int | None = None
    width: int | None = None
    batch_size: int = 1
    n_iter: int = 1
    init_image: Any = None
    mask: Any = None
    strength: float | None = None
    inpaint: str | None = None
    mask_blur: float = 0.0
    paste_back: bool | None = None
    loras: tuple[tuple[str, float], ...] = ()
    weighting: bool = False  # A1111 prompt weights, (word:1.3) (generate.py's --weighting)
    model: str | None = None
    save: bool = True
    # text-to-image's timestep grid, one per step (None: the model's stored grid where it applies, else the
    # sampler's own spacing); own_spacing: the sampler's own spacing even where the model stores a grid
    timesteps: tuple[int, ...] | None = None
    own_spacing: bool = False


@dataclass
class JobResult:
    images: list[Any] = field(default_factory=list)  # PIL images
    params: list[Any] = field(default_factory=list)  # ImageParams, one per image
    paths: list[Path] = field(default_factory=list)  # the saved PNGs (empty when the job was not saved)
    interrupted: bool = False
    partial_images: int = 0  # the last images, cut short by an interrupt: in `images`, never saved
    model: str = ""  # the catalog name of the model used
    notes: list[str] = field(default_factory=list)  # lines for the user: "words unknown to this model: corgi"


@dataclass
class Job:
    id: int
    spec: JobSpec
    request: Any  # generate.Request
    model_name: str
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    step: int = 0  # denoising step of the running batch
    steps: int = 0  # its total
    images_done: int = 0
    total_images: int = 0
    started: float | None = None
    stop: bool = False
    result: JobResult = field(default_factory=JobResult)

    def fraction(self) -> float:
        """0..1 over the whole job (batches x steps)."""
        if self.total_images == 0:
            return 0.0
        batch = max(1, self.request.batch_size)
        batches = -(-self.total_images // batch)
        done = self.images_done // batch + (self.step / self.steps if self.steps else 0.0)
        return min(1.0, done / batches)


@dataclass(frozen=True)
class ServerConfig:
    models_dir: str | None = None
    model: str | None = None  # the model selected at start: a catalog name (None: the bundled default)
    loras_dir: str | None = None
    outputs_dir: str = "outputs"
    max_queue: int = 8  # jobs waiting or running; one more is answered "busy" (HTTP 503)
    device: str = "auto"
    dtype: str = "auto"


class GenerationService:
    """One worker thread, one loaded pipeline, a bounded FIFO queue (see the module doc)."""

    def __init__(self, config: ServerConfig = ServerConfig()):
        limits.check_count("max_queue", config.max_queue, 10_000)
        self.config = config
        self.catalog = ModelCatalog(config.models_dir)
        self.loras = LoraCatalog(config.loras_dir)
        self.outputs_dir = Path(config.outputs_dir).resolve()
        names = self.catalog.names()
        if not names:
            raise UserError("no model to serve: --models_dir has none and the bundled default model is missing")
        self.model_name = config.model if config.model is not None else \
            (DEFAULT_MODEL_NAME if DEFAULT_MODEL_NAME in names else names[0])  # fmt: skip
        self.catalog.path(self.model_name)  # a one-line error for an unknown --model
        self._cond = threading.Condition()
        self._pending: collections.deque[Job] = collections.deque()
        self._current: Job | None = None
        self._ids = itertools.count(1)
        self._pipe: Any = None
        self._pipe_path: Path | None = None
        self._pipe_scheduler: Any = None
        self._pipe_stamp: tuple[int, int] | None = None  # _defaults_stamp of the loaded model
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="ldm_app-generation", daemon=True)
        self._worker.start()

    # ---- the faces' calls --------------------------------------------------------------------------------------

    def set_model(self, name: str) -> None:
        """Select the model for later jobs (loaded when the next job needs it)."""
        self.catalog.path(name)
        with self._cond:
            self.model_name = name

    def request_for(self, spec: JobSpec) -> tuple[Any, str]:
        """The generate.Request of `spec`, checked (UserError) without the model; and the model's catalog name."""
        from ldm_app import generate

        if not isinstance(spec.prompt, str) or not spec.prompt.strip():
            raise UserError("the prompt is empty; expected a text describing the image")
        model_name = spec.model if spec.model is not None else self.model_name
        model_path = self.catalog.path(model_name)
        lim = limits.current()
        batch = limits.check_count("batch_size", spec.batch_size, lim.max_images_per_call)
        n_iter = limits.check_count("n_iter (batch count)", spec.n_iter, lim.max_images_per_command)
        if spec.mask is not None and spec.init_image is None:
            raise UserError("a mask needs an init image (the image to inpaint)")
        if spec.mask is not None and spec.mask.size != spec.init_image.size:
            raise UserError(f"the mask is {spec.mask.width}x{spec.mask.height} pixels but the image is "
                            f"{spec.init_image.width}x{spec.init_image.height}; expected a mask of the image's size")  # fmt: skip
        loras = tuple(f"{self.loras.path(name)}:{limits.check_number('LoRA scale', scale):g}" for name, scale in spec.loras)
        inputs = self.outputs_dir / "inputs"
        request = generate.Request(
            prompts=[spec.prompt], model=str(model_path), seed=spec.seed, negative_prompt=spec.negative_prompt,
            steps=spec.steps, guidance_scale=spec.guidance_scale, sampler=spec.sampler, height=spec.height,
            width=spec.width, num_images=batch * n_iter, batch_size=batch,
            output=str(self.outputs_dir / datetime.date.today().isoformat()), device=self.config.device,
            dtype=self.config.dtype, strength=spec.strength, inpaint=spec.inpaint, mask_blur=spec.mask_blur,
            paste_back=spec.paste_back, loras=loras, weighting=spec.weighting, timesteps=spec.timesteps,
            own_spacing=spec.own_spacing,
        )  # fmt: skip
        try:
            # the checks on everything but the input files first, so a bad request writes nothing
            generate.check_request(replace(request, init_image=None, mask=None, strength=None, inpaint=None,
                                           paste_back=None, mask_blur=0.0))  # fmt: skip
            if spec.init_image is not None:
                with tempfile.TemporaryDirectory(prefix="ldm_app-check-") as scratch:  # checked before stored
                    generate.check_request(_with_inputs(request, spec, Path(scratch)))
                request = _with_inputs(request, spec, inputs)
        except UserError as e:
            raise UserError(field_wording(str(e))) from None
        return request, model_name

    def submit(self, spec: JobSpec) -> Job:
        """Check `spec` (UserError) and queue it (QueueFull when the queue is full); `job.future.result()` is the
        JobResult (or the UserError the model-side checks raised)."""
        request, model_name = self.request_for(spec)
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            waiting = len(self._pending) + (self._current is not None)
            if waiting >= self.config.max_queue:
                raise QueueFull(f"the queue is full ({waiting} jobs waiting or running, the limit is "
                                f"{self.config.max_queue}); try again later")  # fmt: skip
            job = Job(next(self._ids), spec, request, model_name, total_images=request.num_images)
            self._pending.append(job)
            self._cond.notify_all()
        return job

    def run(self, spec: JobSpec, timeout: float | None = None) -> JobResult:
        """submit, then wait for the result."""
        return self.submit(spec).future.result(timeout)

    def cancel(self, job: Job) -> None:
        """Drop a waiting job (its future gets JobCancelled) or interrupt it if running."""
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
                job.future.set_exception(JobCancelled("cancelled before it started"))
                return
            job.stop = True

    def interrupt(self) -> bool:
        """Stop the running job early (A1111's /interrupt); False when none runs."""
        with self._cond:
            if self._current is None:
                return False
            self._current.stop = True
            return True

    def queue_length(self) -> int:
        with self._cond:
            return len(self._pending) + (self._current is not None)

    def position(self, job: Job) -> int:
        """0 while running (or done), else 1 + the number of jobs ahead of it."""
        with self._cond:
            return self._pending.index(job) + 1 if job in self._pending else 0

    def progress(self) -> dict[str, Any]:
        """A snapshot: the running job (id, step, steps, images done/total, fraction, seconds), the queue length."""
        with self._cond:
            job = self._current
            queued = len(self._pending)
            if job is None:
                return {"busy": False, "queued": queued, "job": None}
            elapsed = time.monotonic() - job.started if job.started else 0.0
            fraction = job.fraction()
            eta = elapsed / fraction - elapsed if fraction > 0 else None
            return {"busy": True, "queued": queued, "job": {
                "id": job.id, "step": job.step, "steps": job.steps, "images_done": job.images_done,
                "total_images": job.total_images, "fraction": fraction, "elapsed": elapsed, "eta": eta,
                "interrupted": job.stop, "model": job.model_name,
            }}  # fmt: skip

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, cancel the waiting ones, interrupt the running one, stop the worker."""
        with self._cond:
            self._closed = True
            while self._pending:
                self._pending.popleft().future.set_exception(JobCancelled("the server is shutting down"))
            if self._current is not None:
                self._current.stop = True
            self._cond.notify_all()
        self._worker.join(timeout)

    # ---- the worker ---------------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._pending.popleft()
                self._current = job
                job.started = time.monotonic()
            try:
                if job.future.set_running_or_notify_cancel():
                    job.future.set_result(self._run(job))
            except BaseException as e:  # the job's error goes to whoever waits for it; the worker goes on
                if isinstance(e, UserError):  # the model-side checks: the same wording as the submit-time ones
                    e.args = (field_wording(str(e)),)
                else:
                    logger.exception("job %d failed", job.id)
                if not job.future.done():
                    job.future.set_exception(e)
            finally:
                with self._cond:
                    self._current = None

    def _pipeline(self, job: Job) -> Any:
        from ldm_app import generate

        path = Path(job.request.model)
        # a model folder whose ldm_app.json changed since it was loaded (`evaluate sweep --write_defaults` into a
        # served folder) is loaded again: its stored sampler, steps and grid are read at load, and a job must sample
        # as generate.py would now, as the page's preselected defaults (read from the disk) say
        stamp = _defaults_stamp(path)
        if self._pipe is None or self._pipe_path != path or self._pipe_stamp != stamp:
            self._pipe = None  # the old model's memory is freed before the new one loads
            pipe = generate.load_pipeline(replace(job.request, sampler=None))
            pipe.set_progress_bar_config(disable=True)
            self._pipe, self._pipe_path, self._pipe_scheduler = pipe, path, pipe.scheduler
            self._pipe_stamp = stamp
        pipe = self._pipe
        if job.request.sampler is not None:
            pipe.set_sampler(job.request.sampler)
        else:
            pipe.scheduler = self._pipe_scheduler  # the model's own sampler
        return pipe

    def _run(self, job: Job) -> JobResult:
        from ldm_app import generate
        from ldm_app.adapters import unload_loras

        pipe = self._pipeline(job)
        result = job.result
        result.model = job.model_name

        def on_step(step: int, total: int) -> None:
            job.step, job.steps = step, total

        def on_image(params: Any, image: Any, path: Path | None) -> None:
            result.images.append(image)
            result.params.append(params)
            if path is not None:
                result.paths.append(path)
            job.images_done += 1
            job.step = 0

        sink = None
        if job.spec.save:
            sink = generate.OutputSink.plan(Path(job.request.output), job.request.num_images)
            sink.log = logger.info
        hooks = generate.RunHooks(pipe=pipe, on_step=on_step, should_stop=lambda: job.stop, on_image=on_image,
                                  log=lambda text: logger.info("job %d: %s", job.id, text))  # fmt: skip
        try:
            generate.run(job.request, sink, hooks)
        finally:
            if job.request.loras:
                unload_loras(pipe)
        result.interrupted = job.stop
        result.partial_images = hooks.partial_images
        result.notes = list(hooks.notes)
        return result
