"""Text-to-image from the command line: `python generate.py "a corgi in a sushi house"`.

Every PNG carries its parameters (ldm_app.pngmeta) and `--from_png FILE` makes the same image again. Seeds: image k
of a prompt uses seed+k, drawn from its own generator, so it does not depend on the batch it was computed in.

torch/diffusers are imported inside functions: `--help` and mistakes in the arguments answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import math
import os
import re
import secrets
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from ldm_app import DEFAULT_MODEL, __version__, edit_inputs, limits
from ldm_app.errors import ArgumentParser, UserError
from ldm_app.fileio import check_writable_folder, write_errors
from ldm_app.limits import shown
from ldm_app.pngmeta import MAX_SEED, ImageParams, check_unicode, read_chunk, save_png
from ldm_app.samplers import SAMPLERS, check_sampler_name

if TYPE_CHECKING:
    from PIL import Image

    from ldm_app.pipeline import LatentDiffusionPipeline

DEFAULT_OUTPUT = "outputs"
_INDEX = re.compile(r"^(\d{5})-")  # "00042-<seed>-<slug>.png"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """What the user asked for; None means "the model's stored default" (its ldm_app.json, else the fallbacks)."""

    prompts: list[str]
    model: str = DEFAULT_MODEL
    seed: int | None = None
    negative_prompt: str = ""
    steps: int | None = None
    guidance_scale: float | None = None
    sampler: str | None = None
    height: int | None = None
    width: int | None = None
    num_images: int = 1
    batch_size: int = 1
    output: str = DEFAULT_OUTPUT
    grid: bool = False
    device: str = "auto"
    dtype: str = "auto"
    overwrite: bool = False
    # image-to-image (init_image) and inpainting (init_image + mask); None: text-to-image
    init_image: str | None = None
    strength: float | None = None  # default 0.8 for image-to-image, 1.0 for inpainting
    mask: str | None = None
    inpaint: str | None = None  # blend | repaint | model (default: model for a 9-channel U-Net, else blend)
    mask_blur: float = 0.0
    paste_back: bool | None = None  # default: True with a mask
    jump_length: int = 5
    jump_n_sample: int = 5
    harmonize: float = 0.3
    # adapters and prompt weighting
    loras: tuple[str, ...] = ()  # "PATH[:SCALE]"
    embeddings: tuple[str, ...] = ()
    weighting: bool = False
    class_label: int | None = None  # for a class-conditional model, or the class for classifier guidance
    classifier: str | None = None  # classifier guidance (Dhariwal & Nichol 2021): a train_classifier.py folder
    classifier_scale: float = 0.0
    scalar: float | None = None  # for a scalar-conditioned model (e.g. the object size as a fraction of the side)
    # text-to-image's timestep grid (diffusers' timesteps=, one per step): None = the model's stored grid where it
    # applies (its ldm_app.json sampling.timesteps at the stored sampler and steps), else the sampler's own spacing;
    # own_spacing: the sampler's own spacing even there (the remake of an image made without a grid)
    timesteps: tuple[int, ...] | None = None
    own_spacing: bool = False


EDIT_FIELDS = ("init_image", "strength", "mask", "inpaint", "mask_blur", "paste_back", "jump_length", "jump_n_sample",
               "harmonize", "loras", "embeddings", "weighting", "class_label", "classifier",
               "classifier_scale", "scalar")  # fmt: skip


# ---- the Python API ---------------------------------------------------------------------------------------------


def generate(
    prompts: str | Sequence[str],
    model: str | os.PathLike = DEFAULT_MODEL,
    seed: int | None = None,
    *,
    negative_prompt: str = "",
    steps: int | None = None,
    guidance_scale: float | None = None,
    sampler: str | None = None,
    height: int | None = None,
    width: int | None = None,
    num_images: int = 1,
    batch_size: int = 1,
    output: str | os.PathLike = DEFAULT_OUTPUT,
    grid: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
    timesteps: Sequence[int] | None = None,
    **edit: Any,
) -> list[Path]:
    """Generate `num_images` images per prompt and write them as PNGs with their parameters.

    `output`: a folder (files `00000-<seed>-<slug>.png`) or a `.png` path (numbered `name-0000.png`, ... when there
    are several images). An existing file is never replaced: the image goes to the next free name (`name-1.png`,
    ...), unless `overwrite`. Returns the paths written, then the grid's if `grid`. Raises UserError for bad input,
    before anything is generated. `edit`: the Request's image-to-image, inpainting and adapter fields
    (init_image, strength, mask, inpaint, mask_blur, paste_back, jump_length, jump_n_sample, loras, embeddings,
    weighting). `timesteps`: text-to-image's timestep grid, one per step (default: the model's stored grid where
    it applies, else the sampler's own spacing).
    """
    unknown = sorted(set(edit) - set(EDIT_FIELDS))
    if unknown:
        raise UserError(f"unknown argument {unknown[0]!r}; expected some of {', '.join(EDIT_FIELDS)}")
    edit = {k: tuple(v) if isinstance(v, list) else v for k, v in edit.items()}
    if isinstance(prompts, str):
        prompts = [prompts]
    elif isinstance(prompts, (list, tuple)):
        prompts = list(prompts)
    else:
        raise UserError(f"prompts must be a string or a list of strings, got {shown(prompts, 100)}")
    if not isinstance(model, (str, os.PathLike)) or not isinstance(output, (str, os.PathLike)):
        raise UserError("model and output must be paths (str or os.PathLike)")
    request = Request(
        prompts=prompts, model=os.fspath(model), seed=seed, negative_prompt=negative_prompt, steps=steps,
        guidance_scale=guidance_scale, sampler=sampler, height=height, width=width, num_images=num_images,
        batch_size=batch_size, output=os.fspath(output), grid=grid, device=device, dtype=dtype, overwrite=overwrite,
        timesteps=None if timesteps is None else tuple(timesteps) if isinstance(timesteps, (list, tuple)) else timesteps,
        **edit,
    )  # fmt: skip
    return run(request, prepare(request))


def prepare(req: Request) -> OutputSink:
    """The checks that need no model (so they answer before torch loads); returns where the images will go."""
    check_request(req)
    if req.output.endswith(("/", os.sep)) and Path(req.output).suffix.lower() == ".png":  # Path drops the slash
        raise UserError(f"--output {req.output} ends with a slash (a folder) but names a .png file: drop one of them")
    if not req.output.strip():
        raise UserError("--output is empty: give a .png path or a folder (default: outputs/)")
    return OutputSink.plan(Path(req.output), len(req.prompts) * req.num_images, req.overwrite)


@dataclass
class RunHooks:
    """What a caller that serves many jobs (ldm_app.serving) adds to `run`: a loaded pipeline to use instead of
    loading `req.model`, a step callback (`on_step(step, total)` per denoising step of each batch), a stop flag read
    at every step and between batches (`should_stop()`: the running batch ends early, diffusers' interrupt, and no
    further batch starts), and `on_image(params, image, path)` for each image made (path None when not saved)."""

    pipe: Any = None
    on_step: Callable[[int, int], None] | None = None
    should_stop: Callable[[], bool] | None = None
    on_image: Callable[[ImageParams, Any, Path | None], None] | None = None
    log: Callable[[str], None] | None = None  # where the "model: ..." line goes (default: stdout)
    notes: list[str] = field(default_factory=list)  # what the run told the user besides images: the unknown words
    # images of a batch the stop flag cut short (some steps skipped): passed to on_image, never saved, since their
    # parameters would not remake them
    partial_images: int = 0
    _cut_short: bool = False

    def stopped(self) -> bool:
        return self.should_stop is not None and self.should_stop()

    def step_callback(self) -> Callable[..., dict] | None:
        """A diffusers `callback_on_step_end` reporting the step and interrupting the call when asked to stop."""
        if self.on_step is None and self.should_stop is None:
            return None

        def callback(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
            total = int(getattr(pipe, "_num_timesteps", 0) or 0)
            if self.on_step is not None:
                self.on_step(step + 1, total)
            if self.stopped():
                pipe._interrupt = True  # diffusers' loops skip the remaining steps, then decode
                self._cut_short = self._cut_short or step + 1 < total
            return tensors

        return callback


def run(req: Request, sink: OutputSink | None, hooks: RunHooks | None = None) -> list[Path]:
    """Load the model, generate in batches and write each image (after `prepare` checked the request). `sink`
    None: nothing is written (the images reach `hooks.on_image`)."""
    hooks = hooks or RunHooks()
    random_seed = req.seed is None
    if random_seed:
        req = replace(req, seed=secrets.randbelow(2**32))
    if req.timesteps is not None and req.steps is None:
        req = replace(req, steps=len(req.timesteps))
    inputs = edit_inputs.load(req)  # (again: cheap) the init image and mask, sized
    pipe = hooks.pipe if hooks.pipe is not None else load_pipeline(req)
    classifier = load_classifier_for(pipe, req)
    adapters = edit_inputs.load_adapters(pipe, req)
    if inputs.mask is not None:  # recorded as resolved, so a remake needs no model lookup
        method = req.inpaint or ("model" if pipe.unet.config.in_channels == 9 else "repaint")
        req = replace(req, inpaint=method, paste_back=req.paste_back is not False)
    if inputs.size is not None:
        req = replace(req, height=inputs.size[0], width=inputs.size[1])
    base = replace(effective_params(pipe, req), **inputs.params(req), **adapters, class_label=req.class_label,
                   scalar=None if req.scalar is None else float(req.scalar))
    if classifier is not None:  # guided DDIM (ldm_app.classifier): the sampler is DDIM whatever the model's
        base = replace(base, sampler="ddim", classifier=str(Path(req.classifier).resolve()),
                       classifier_scale=float(req.classifier_scale))
    elif inputs.image is None:
        base = replace(base, timesteps=sampling_grid(pipe, req, base.steps))
    jobs = [replace(base, prompt=p, seed=req.seed + k) for p in req.prompts for k in range(req.num_images)]
    runner = edit_inputs.pipeline_for(pipe, inputs)
    check_with_model(runner, req, jobs, inputs)  # the model's own limits (steps per sampler), before the first image
    (hooks.log or say)(describe(base, pipe) + (" (random)" if random_seed else ""))
    note = note_unknown_words(pipe, req)  # once for the run: the pipeline's per-call line is off for its batches below
    if note:
        hooks.notes.append(note)
    from ldm_app.pipeline import unknown_words_noted_by_caller

    paths, images = [], []
    for start in range(0, len(jobs), req.batch_size):
        if hooks.stopped():
            break
        batch = jobs[start : start + req.batch_size]
        runner.set_progress_bar_config(**{**getattr(runner, "_progress_bar_config", {}),  # keeps e.g. disable=True
                                          "desc": f"images {start + 1}-{start + len(batch)} of {len(jobs)}"})
        hooks._cut_short = False
        with unknown_words_noted_by_caller():
            batch_images = sample(runner, batch, inputs, req, classifier, hooks.step_callback())
        partial = hooks._cut_short
        if partial:
            hooks.partial_images += len(batch)
            logger.warning("stopped mid-sampling: the %d image(s) of this batch are cut short and not saved",
                           len(batch))  # fmt: skip
        for params, image in zip(batch, batch_images):
            path = sink.save_image(image, params) if sink is not None and not partial else None
            if path is not None:
                paths.append(path)
            if hooks.on_image is not None:
                hooks.on_image(params, image, path)
            if req.grid and not partial:  # kept only for the grid: thousands of images must not pile up in memory
                images.append(image)
    if req.grid and sink is not None and images:
        text = f"grid of {len(images)} images\n" + "\n".join(p.name for p in paths)
        paths.append(sink.save_grid(make_grid(images), base, text))
    return paths


def note_unknown_words(pipe: Any, req: Request) -> str | None:
    """One "words unknown to this model: ..." line (ldm_app.vocabulary) for all the prompts of the run, on the
    module's logger at WARNING (generate.py shows it on stderr) and returned (the server passes it to its clients);
    nothing when the model stores no vocabulary. With --weighting, the words of the A1111-weighted text, not its
    weights."""
    if getattr(pipe, "vocabulary", None) is None:
        return None
    texts, negatives = list(req.prompts), [req.negative_prompt]
    if req.weighting:
        from ldm_app.adapters import parse_a1111_weights

        texts = [" ".join(text for text, _ in parse_a1111_weights(p)) for p in texts]
        negatives = [" ".join(text for text, _ in parse_a1111_weights(n)) for n in negatives]
    note = pipe.unknown_words_note(texts, negatives)
    if note:
        logger.warning("%s", note)
    return note


def say(text: str) -> None:
    """print, with a path whose bytes are not UTF-8 (lone surrogates) escaped rather than failing on stdout."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding, "replace"))


def check_request(req: Request) -> None:
    """Everything that needs no model, through ldm_app.limits: prompts, counts, sizes, steps, guidance, seed,
    sampler name, model folder."""
    lim = limits.current()
    if not isinstance(req.prompts, list) or not all(isinstance(p, str) for p in req.prompts):
        raise UserError(f"prompts must be a list of strings, got {shown(req.prompts, 100)}")
    if req.class_label is not None and (isinstance(req.class_label, bool) or not isinstance(req.class_label, int)
                                        or req.class_label < 0):
        raise UserError(f"--class_label must be a class number >= 0, got {shown(req.class_label, 40)}")
    if req.scalar is not None:
        limits.check_number("--scalar", req.scalar)
    # a class or a scalar is condition enough (a model without text)
    class_only = (req.class_label is not None or req.scalar is not None) and req.prompts == [""]
    if not class_only and (not req.prompts or not all(p.strip() for p in req.prompts)):
        raise UserError("no prompt (or an empty one); expected a prompt argument, --from_file FILE or --from_png FILE")
    for prompt in req.prompts:
        check_unicode("the prompt", prompt)
    if not isinstance(req.negative_prompt, str):
        raise UserError(f"--negative_prompt must be a string, got {shown(req.negative_prompt, 100)}")
    check_unicode("--negative_prompt", req.negative_prompt)
    num_images = limits.check_count("--num_images", req.num_images, lim.max_images_per_command)
    total = len(req.prompts) * num_images
    if total > lim.max_images_per_command:
        raise UserError(f"{len(req.prompts)} prompts x {num_images} images is {total} images, above the limit of "
                        f"{lim.max_images_per_command} per command")  # fmt: skip
    batch_size = limits.check_count("--batch_size", req.batch_size, lim.max_images_per_call)
    if req.steps is not None:
        limits.check_steps(req.steps, name="--steps")
    if req.guidance_scale is not None:
        limits.check_guidance_scale(req.guidance_scale, "--guidance_scale")
    for name in ("height", "width"):
        if getattr(req, name) is not None:
            limits.check_image_side(f"--{name}", getattr(req, name))
    if req.height is not None and req.width is not None:
        check_sizes(min(batch_size, total), total if req.grid else 0, req.height, req.width)
    if req.seed is not None:
        if isinstance(req.seed, bool) or not isinstance(req.seed, int) or not 0 <= req.seed <= MAX_SEED - num_images:
            maximum = MAX_SEED - num_images
            raise UserError(f"--seed must be an integer between 0 and {maximum}, got {shown(req.seed, 40)}")
    if req.sampler is not None:
        check_sampler_name(req.sampler)
    if req.timesteps is not None:
        check_grid_request(req)
    for name in ("grid", "overwrite", "own_spacing"):
        if not isinstance(getattr(req, name), bool):
            raise UserError(f"{name} must be True or False, got {shown(getattr(req, name), 40)}")
    for name in ("model", "output", "device", "dtype"):
        value = getattr(req, name)
        if not isinstance(value, str) or "\0" in value or not value:
            raise UserError(f"--{name} must be a non-empty text without NUL characters, got {shown(value, 100)}")
    check_model_exists(req.model)
    edit_inputs.check(req)
    check_classifier_request(req)


def check_classifier_request(req: Request) -> None:
    """Classifier guidance: a classifier folder, a finite scale >= 0, a class; text-to-image only."""
    scale = limits.check_number("--classifier_scale", req.classifier_scale)
    if scale < 0:
        raise UserError(f"--classifier_scale must be >= 0, got {scale:g}")
    if req.classifier is None:
        if scale:
            raise UserError("--classifier_scale needs --classifier DIR (a python -m ldm_app.train_classifier folder)")
        return
    from ldm_app.classifier import is_classifier_folder

    if not os.path.isdir(req.classifier) or not is_classifier_folder(Path(req.classifier)):
        raise UserError(f"--classifier {req.classifier}: not a classifier folder (made by python -m "
                        "ldm_app.train_classifier)")  # fmt: skip
    if req.class_label is None:
        raise UserError("--classifier needs --class_label N (the class to guide towards)")
    if req.init_image is not None or req.weighting:
        raise UserError("classifier guidance is text-to-image only: drop --init_image/--mask and --weighting")


def check_sizes(batch: int, grid_images: int, height: int, width: int) -> None:
    """One batch's pixels (limits.check_batch) and, with --grid, the grid's: every image is kept in memory for it."""
    limits.check_batch(batch, height, width, name="--batch_size")
    pixels, maximum = grid_images * height * width, limits.current().max_pixels_per_call
    if pixels > maximum:
        raise UserError(f"a grid of {grid_images} images of {width}x{height} is {pixels:,} pixels, above the limit "
                        f"of {maximum:,}; leave out --grid or make fewer or smaller images")  # fmt: skip


def check_grid_request(req: Request) -> None:
    """--timesteps: whole, strictly decreasing timesteps, one per step, and text-to-image only (an edit starts part
    way down the sampler's own spacing)."""
    if not isinstance(req.timesteps, tuple):
        raise UserError(f"--timesteps must be a list of whole timesteps, got {shown(req.timesteps, 60)}")
    limits.check_timestep_grid(list(req.timesteps), req.steps, "--timesteps")
    if req.init_image is not None or req.classifier is not None:
        raise UserError("--timesteps is for text-to-image; image-to-image, inpainting and classifier guidance use "
                        "the sampler's own spacing (give --steps)")  # fmt: skip


def parse_timesteps(text: str) -> tuple[int, ...]:
    """--timesteps 999/700/400/100 (also comma-separated)."""
    try:
        return tuple(int(t) for t in text.replace(",", "/").split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole timesteps separated by '/', e.g. 999/700/400/100, got "
                                         f"{text!r}") from None


def sampling_grid(pipe: LatentDiffusionPipeline, req: Request, steps: int) -> tuple[int, ...] | None:
    """The timestep grid text-to-image will sample on, to pass as timesteps= and record in each PNG: the request's,
    else the model's stored grid where it applies (None where it does not: the sampler's own spacing). With
    own_spacing, that own spacing written out, which the grid-taking samplers run exactly as their default (checked
    for dpm++, euler, ddpm and lcm in tests/test_png_grid.py)."""
    if req.timesteps is not None:
        return tuple(req.timesteps)
    stored = pipe.stored_timesteps(pipe.scheduler, None, steps)
    if stored is None or not req.own_spacing:
        return None if stored is None else tuple(stored)
    from ldm_app.samplers import scheduler_from_config

    scheduler = scheduler_from_config(type(pipe.scheduler), pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return tuple(int(t) for t in scheduler.timesteps)


def check_with_model(pipe: LatentDiffusionPipeline, req: Request, jobs: list[ImageParams],
                     inputs: edit_inputs.EditInputs | None = None) -> None:  # fmt: skip
    """The checks that need the model: its stored defaults against the limits, the steps its sampler can take on
    its training timesteps, the batch at the effective size; the same checks as the pipeline call (of the pipeline
    that will run: text-to-image, image-to-image or inpainting, with the job's image arguments), done before the
    first image is made."""
    first = jobs[0]
    limits.check_image_side("height", first.height)
    limits.check_image_side("width", first.width)
    check_sizes(min(req.batch_size, len(jobs)), len(jobs) if req.grid else 0, first.height, first.width)
    batch = jobs[: req.batch_size]
    images = inputs.call_arguments(first) if inputs is not None else {"height": first.height, "width": first.width}
    try:
        pipe.check_call(
            [job.prompt for job in batch], [job.negative_prompt for job in batch], num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale, class_labels=None if first.classifier else first.class_label,
            scalars=first.scalar, timesteps=list(first.timesteps) if first.timesteps else None, **images,
        )  # fmt: skip
    except UserError as e:  # the pipeline's argument names, as the flags that set them
        raise UserError(re.sub(r"\b(class_labels|scalars)\b", lambda m: CALL_FLAGS[m.group(1)], str(e))) from None


CALL_FLAGS = {"class_labels": "--class_label", "scalars": "--scalar"}


def check_model_exists(model: str) -> None:
    """A missing folder is the likeliest mistake: say it in one line. What is inside the folder is checked by the
    pipeline's loader."""
    if os.path.isdir(model):  # os.path: False (not an OSError) for a name too long
        return
    if os.path.isfile(model) and Path(model).suffix.lower() in (".safetensors", ".ckpt"):
        return  # a single-file SD-1.x checkpoint (ldm_app.single_file checks what is inside)
    if os.path.isfile(model):
        raise UserError(f"--model {model} is a file but not a .safetensors or .ckpt checkpoint; expected a model "
                        "folder or an SD-1.x single file")  # fmt: skip
    if Path(model) == Path(DEFAULT_MODEL):
        raise UserError(
            f"the bundled default model is missing ({model} does not exist: an install without the package data?); "
            "reinstall with `pip install -e .`, make it with `bash recipes/shapes.sh`, or pass --model DIR"
        )
    raise UserError(f"model folder not found: {model}; expected a folder with model_index.json, unet/, vae/...")


def load_classifier_for(pipe: LatentDiffusionPipeline, req: Request) -> Any:
    """The classifier of --classifier, checked against the model (latent shape; a model guided DDIM can sample:
    not class-, scalar- or image-conditioned, see classifier.check_guidable), or None."""
    if req.classifier is None:
        return None
    from ldm_app.classifier import check_fits, check_guidable, load_classifier

    check_guidable(pipe.unet.config)  # before loading the classifier
    classifier = load_classifier(req.classifier, device=pipe.device)
    height, width, _, _ = pipe.resolve_defaults(req.height, req.width, None, None)
    check_fits(classifier, pipe, height, width)
    if not 0 <= req.class_label < classifier.config.num_classes:
        raise UserError(f"--class_label {req.class_label} is outside 0..{classifier.config.num_classes - 1} (the "
                        "classifier's classes)")  # fmt: skip
    return classifier


def load_pipeline(req: Request) -> LatentDiffusionPipeline:
    from ldm_app.pipeline import LatentDiffusionPipeline, resolve_device_dtype

    device, dtype = resolve_device_dtype(req.device, req.dtype)
    if os.path.isfile(req.model):
        from ldm_app.single_file import load_single_file

        pipe = load_single_file(req.model, LatentDiffusionPipeline, torch_dtype=dtype)
        if req.sampler is not None:
            pipe.set_sampler(req.sampler)
        return pipe.to(device)
    pipe = LatentDiffusionPipeline.from_pretrained(req.model, sampler=req.sampler, dtype=dtype)
    return pipe.to(device)


def effective_params(pipe: LatentDiffusionPipeline, req: Request) -> ImageParams:
    """The settings actually used: the request's, else the model's stored defaults (pipe.resolve_defaults)."""
    from ldm_app.samplers import sampler_name

    height, width, steps, guidance = pipe.resolve_defaults(req.height, req.width, req.steps, req.guidance_scale)
    return ImageParams(
        prompt=req.prompts[0],
        negative_prompt=req.negative_prompt,
        seed=req.seed,
        steps=steps,
        guidance_scale=float(guidance),
        sampler=sampler_name(pipe.scheduler),
        height=height,
        width=width,
        model=str(Path(req.model).resolve()),
    )


def describe(p: ImageParams, pipe: LatentDiffusionPipeline) -> str:
    steps = f"{p.steps} (timesteps {'/'.join(map(str, p.timesteps))})" if p.timesteps else p.steps
    return (
        f"model: {p.model} | sampler: {p.sampler or type(pipe.scheduler).__name__} | steps: {steps} | "
        f"guidance: {p.guidance_scale} | size: {p.width}x{p.height} | device: {pipe.device} | dtype: {pipe.dtype} | "
        f"seed: {p.seed}"
    )


def sample(pipe: LatentDiffusionPipeline, batch: list[ImageParams], inputs: edit_inputs.EditInputs | None = None,
           req: Request | None = None, classifier: Any = None,
           callback: Callable[..., dict] | None = None) -> list[Image.Image]:  # fmt: skip
    """One pipeline call for a batch of jobs that share every setting but prompt and seed. `callback`: diffusers'
    callback_on_step_end (not with classifier guidance)."""
    import torch

    p = batch[0]
    # one CPU generator per image (seed + k): the noise of image k is the same in any batch and on any device
    generators = [torch.Generator("cpu").manual_seed(job.seed) for job in batch]
    prompts = [job.prompt for job in batch]
    negatives = [job.negative_prompt for job in batch]
    if classifier is not None:
        from ldm_app.classifier import classifier_guided_sample

        return classifier_guided_sample(
            pipe, classifier, [p.class_label] * len(batch), p.classifier_scale, prompt=prompts,
            num_inference_steps=p.steps, guidance_scale=p.guidance_scale, generator=generators, output_type="pil",
            height=p.height, width=p.width, negative_prompt=negatives,
        ).images  # fmt: skip
    text = {"prompt": prompts, "negative_prompt": negatives}
    if p.weighting:
        from ldm_app.adapters import weighted_prompt_embeds

        embeds, negative_embeds = weighted_prompt_embeds(pipe, prompts, negatives)
        text = {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds}
    extra = inputs.call_arguments(p) if inputs is not None else {"height": p.height, "width": p.width}
    if p.class_label is not None:
        extra["class_labels"] = p.class_label
    if p.scalar is not None:
        extra["scalars"] = p.scalar
    if callback is not None:
        extra["callback_on_step_end"] = callback
    if p.timesteps:
        extra["timesteps"] = list(p.timesteps)
    return pipe(**text, num_inference_steps=p.steps, guidance_scale=p.guidance_scale, generator=generators,
                **extra).images  # fmt: skip


def make_grid(images: list[Image.Image]) -> Image.Image:
    """A near-square grid, row by row (diffusers' make_image_grid needs rows * cols == len(images) exactly)."""
    from PIL import Image

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, (i % cols * w, i // cols * h))
    return grid


# ---- output file names ------------------------------------------------------------------------------------------


def slugify(text: str, max_len: int = 40) -> str:
    """'A corgi, in a sushi house!' -> 'a-corgi-in-a-sushi-house' (safe on every file system)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "image"


@dataclass
class OutputSink:
    """Where images go: a folder (numbered names) or one `.png` path (numbered if several). Never replaces a file
    unless `overwrite`: a taken name becomes the next free one (`k-1.png`, ...), chosen race-free by save_png."""

    path: Path
    is_file: bool
    total: int
    overwrite: bool = False
    written: int = 0
    log: Callable[[str], None] = say  # where "wrote PATH" goes (a server sends it to its log)

    @classmethod
    def plan(cls, path: Path, total: int, overwrite: bool = False) -> OutputSink:
        """Check that the output can be written, before any time is spent generating."""
        with write_errors(path):  # e.g. a name too long for the file system
            is_file = path.suffix.lower() == ".png"
            if is_file and path.is_dir():
                raise UserError(f"--output {path} is a folder; expected a .png file path or a folder without .png")
            if not is_file and path.exists() and not path.is_dir():
                raise UserError(f"--output {path} is a file; expected a folder, or a path ending in .png")
            if not is_file and path.suffix and not path.exists():
                raise UserError(f"--output {path}: only PNG is written; expected a path ending in .png or a folder")
            check_writable_folder("--output", path.parent if is_file else path)
        return cls(path, is_file, total, overwrite)

    def save_image(self, image: Image.Image, p: ImageParams) -> Path:
        self.written += 1
        if not self.is_file:
            return self._save_numbered(image, p, None, f"{p.seed}-{slugify(p.prompt)}.png")
        if self.total == 1:
            return self._save(image, self.path, p, None)
        return self._save(image, self.path.with_name(f"{self.path.stem}-{self.written - 1:04d}.png"), p, None)

    def save_grid(self, grid: Image.Image, p: ImageParams, text: str) -> Path:
        if not self.is_file:
            return self._save_numbered(grid, None, text, f"grid-{p.seed}-{slugify(p.prompt)}.png")
        return self._save(grid, self.path.with_name(f"{self.path.stem}-grid.png"), None, text)

    def _save(self, image: Image.Image, dest: Path, params: ImageParams | None, text: str | None) -> Path:
        """`dest`, or with it taken (and no --overwrite) the next free `name-N.png`, said so on stdout."""
        with write_errors(dest.parent):
            dest.parent.mkdir(parents=True, exist_ok=True)
        path = save_png(image, dest, params, text, overwrite=self.overwrite)
        note = "" if path == dest else f" ({dest.name} exists; --overwrite replaces it)"
        self.log(f"wrote {path}{note}")
        return path

    def _save_numbered(self, image: Image.Image, params: ImageParams | None, text: str | None, name: str) -> Path:
        """`NNNNN-name` with NNNNN one past the highest number in the folder (so no earlier image is replaced);
        a number another process takes meanwhile is skipped (save_png publishes with os.link)."""
        folder = self.path
        with write_errors(folder):
            folder.mkdir(parents=True, exist_ok=True)
            numbers = [int(m.group(1)) for f in os.listdir(folder) if (m := _INDEX.match(f))]
        first = max(numbers, default=-1) + 1
        names = (folder / f"{index:05d}-{name}" for index in itertools.count(first + 1))
        path = save_png(image, folder / f"{first:05d}-{name}", params, text, alternatives=names)
        self.log(f"wrote {path}")
        return path


# ---- the command line -------------------------------------------------------------------------------------------




def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{shown(text, 60)} is not a whole number; expected an integer >= {minimum}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text:.60} is too small; expected an integer >= {minimum}")
        return value

    return parse


def _multiple_of_8(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0 or value % 8:
        raise argparse.ArgumentTypeError(f"{shown(text, 60)} is not a positive multiple of 8; expected e.g. 512")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text, 60)} is not a number; expected e.g. 7.5")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{shown(text, 60)} is not finite; expected e.g. 7.5")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="generate.py",
        description="Generate images from text with a latent diffusion model. Unset sampling options use the "
        "model's stored defaults (its ldm_app.json). Every PNG stores its parameters; --from_png remakes it.",
    )
    p.add_argument("prompt", nargs="?", help="the text prompt (or use --from_file / --from_png)")
    p.add_argument("--from_file", metavar="FILE", help="a text file with one prompt per line (blank lines skipped)")
    p.add_argument("--from_png", metavar="FILE", help="remake the image whose parameters FILE stores; other "
                   "options given override the stored ones")  # fmt: skip
    p.add_argument("--model", help=f"model folder (default: the bundled {DEFAULT_MODEL})")
    p.add_argument("--output", help=f"a folder (default: {DEFAULT_OUTPUT}/; new files are numbered) or a .png path "
                   "(name-0000.png, ... for several images); nothing is replaced without --overwrite")  # fmt: skip
    p.add_argument("--seed", type=_int_at_least(0), help="random seed (default: random, printed and stored); "
                   "image k of a prompt uses seed+k")  # fmt: skip
    p.add_argument("--steps", type=_int_at_least(1), help="number of sampling steps")
    p.add_argument("--timesteps", type=parse_timesteps, metavar="T1/T2/...", help="text-to-image on this timestep "
                   "grid, one per step, e.g. 999/700/400/100 (samplers dpm++, euler, ddpm, lcm; default: the model's "
                   "stored grid at its stored sampler and steps, else the sampler's own spacing)")  # fmt: skip
    p.add_argument("--guidance_scale", type=_float, help="classifier-free guidance scale (<= 1 turns it off)")
    p.add_argument("--negative_prompt", help="what the image should not show")
    p.add_argument("--scheduler", "--sampler", dest="scheduler",
                   help=f"sampler: {', '.join(SAMPLERS)} (default: the model's own)")  # fmt: skip
    p.add_argument("--num_images", type=_int_at_least(1), help="images per prompt (default 1)")
    p.add_argument("--batch_size", type=_int_at_least(1), default=1, help="images per model call (default 1)")
    p.add_argument("--height", type=_multiple_of_8, help="image height in pixels, a multiple of 8")
    p.add_argument("--width", type=_multiple_of_8, help="image width in pixels, a multiple of 8")
    p.add_argument("--grid", action="store_true", help="also write a grid image of all the images")
    p.add_argument("--overwrite", action="store_true", help="replace existing files of the same name (default: never "
                   "replace; an image whose name is taken goes to the next free name, name-1.png, ..., printed)")
    edit = p.add_argument_group("image-to-image and inpainting")
    edit.add_argument("--init_image", metavar="PATH", help="start from this image (image-to-image, SDEdit); the "
                      "output has its size")
    edit.add_argument("--strength", type=_float, help="how far the init image is taken back to noise, in (0, 1] "
                      "(default 0.8; 1.0 with --mask)")
    edit.add_argument("--mask", metavar="PATH", help="inpaint: a mask of the init image's size, white = repaint, "
                      "black = keep")
    edit.add_argument("--inpaint", choices=("blend", "repaint", "model"), help="how to inpaint: repaint (RePaint "
                      "resampling and a free harmonizing tail), blend (diffusers' masked latent blending, fast) or "
                      "model (a 9-channel inpainting model); default: model for such a model, else repaint")
    edit.add_argument("--mask_blur", type=_float, default=0.0, help="soften the mask's edge by this many pixels "
                      "for --paste_back (default 0)")
    edit.add_argument("--paste_back", action="store_true", default=None, help="put the unmasked pixels of the "
                      "init image back exactly after decoding (the default with --mask)")
    edit.add_argument("--no_paste_back", dest="paste_back", action="store_false", help="keep the decoded pixels "
                      "outside the mask too")
    edit.add_argument("--jump_length", type=_int_at_least(1), default=5, help="RePaint: steps per jump back "
                      "(default 5)")
    edit.add_argument("--jump_n_sample", type=_int_at_least(1), default=5, help="RePaint: resamplings per jump "
                      "(default 5; the U-Net runs about this many times more; 1: no resampling)")
    edit.add_argument("--harmonize", type=_float, default=0.3, help="RePaint: the last fraction of the steps that "
                      "runs free of the kept region, so the latents decode cleanly (default 0.3; 0: never free)")
    p.add_argument("--class_label", type=_int_at_least(0), help="the class of a class-conditional model, or the "
                   "class to guide towards with --classifier (then the prompt may be left out)")
    p.add_argument("--classifier", metavar="DIR", help="classifier guidance (Dhariwal & Nichol 2021) with this "
                   "python -m ldm_app.train_classifier folder; sampling is DDIM")
    p.add_argument("--classifier_scale", type=_float, default=0.0, help="strength s of the classifier's gradient "
                   "(default 0; about 20-30 for the shapes classifier)")
    p.add_argument("--scalar", type=_float, help="the value of a scalar-conditioned model (e.g. the object size as a "
                   "fraction of the image side; then the prompt may be left out)")
    adapters = p.add_argument_group("adapters")
    adapters.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", help="apply a LoRA "
                          "(.safetensors, diffusers or kohya/A1111 format), scale default 1; repeatable")
    adapters.add_argument("--embedding", action="append", default=[], metavar="PATH", help="a textual-inversion "
                          "embedding (.safetensors); its token is the file name; repeatable")
    adapters.add_argument("--weighting", action="store_true", help="read A1111 prompt weights: (word:1.3), (word), "
                          "[word]")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="auto: fp16 on CUDA, fp32 elsewhere")  # fmt: skip
    return p


def read_prompt_file(path: str) -> list[str]:
    file = Path(path)
    if not os.path.isfile(file):  # os.path: False (not an OSError) for a name too long
        raise UserError(f"prompt file not found: {file}; expected a text file with one prompt per line")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"prompt file {file} is not UTF-8 text; expected one prompt per line") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {file} has no prompts; expected one prompt per line")
    return prompts


def request_from_args(args: argparse.Namespace) -> Request:
    """Merge the sources of a request: flags over (for --from_png) the PNG's stored parameters over defaults."""
    sources = [name for name, given in (("a prompt", args.prompt is not None), ("--from_file", args.from_file),
                                        ("--from_png", args.from_png)) if given]  # fmt: skip
    if len(sources) > 1:
        raise UserError(f"got {' and '.join(sources)}; expected only one of a prompt, --from_file or --from_png")
    chunk = read_chunk(args.from_png) if args.from_png else None
    stored = ImageParams.from_dict(chunk, args.from_png) if chunk is not None else None
    if stored is not None and stored.version != __version__:
        logger.warning("%s was made by ldm_app %s, this is %s: pixels may differ", args.from_png, stored.version,
                       __version__)  # fmt: skip
    if stored is not None and args.model is None and not os.path.isdir(stored.model):
        raise UserError(f"the model recorded in {args.from_png} is not there ({stored.model}); pass --model DIR")
    prompts = read_prompt_file(args.from_file) if args.from_file else [args.prompt] if args.prompt is not None else []
    if not prompts and (args.class_label is not None or args.scalar is not None) and not args.from_png:
        prompts = [""]  # a class- or scalar-conditioned model: the class or value is the condition
    if stored is not None:
        edit_inputs.check_unchanged(stored, {"init_image": args.init_image is not None, "mask": args.mask is not None})

    def pick(flag, stored_name):  # the flag if given, else the PNG's value (None lets the model decide)
        return flag if flag is not None or stored is None else getattr(stored, stored_name)

    timesteps, own_spacing = args.timesteps, False
    if timesteps is None and stored is not None and stored.init_image is None and stored.classifier is None and \
            args.steps in (None, stored.steps) and args.scheduler in (None, stored.sampler) and \
            "timesteps" in chunk:  # fmt: skip
        # the PNG's grid, or its sampler's own spacing even where the model has since stored a grid. A PNG made
        # before 2026-12-05 has no "timesteps": it was sampled on the model's stored grid where one applied, so its
        # remake leaves the choice to the model, as then.
        timesteps, own_spacing = stored.timesteps, stored.timesteps is None

    return Request(
        prompts=[stored.prompt] if stored else prompts,
        model=pick(args.model, "model") or DEFAULT_MODEL,
        seed=pick(args.seed, "seed"),
        negative_prompt=pick(args.negative_prompt, "negative_prompt") or "",
        steps=len(timesteps) if timesteps is not None and args.steps is None else pick(args.steps, "steps"),
        guidance_scale=pick(args.guidance_scale, "guidance_scale"),
        sampler=pick(args.scheduler, "sampler"),
        height=pick(args.height, "height"),
        width=pick(args.width, "width"),
        num_images=args.num_images or 1,
        batch_size=args.batch_size,
        output=args.output or DEFAULT_OUTPUT,
        grid=args.grid,
        device=args.device,
        dtype=args.dtype,
        overwrite=args.overwrite,
        init_image=pick(args.init_image, "init_image"),
        strength=pick(args.strength, "strength"),
        mask=pick(args.mask, "mask"),
        inpaint=pick(args.inpaint, "inpaint"),
        mask_blur=args.mask_blur if args.mask_blur or stored is None else stored.mask_blur,
        paste_back=args.paste_back if args.paste_back is not None else
        stored.paste_back if stored is not None and stored.mask is not None else None,
        jump_length=stored.jump_length if stored is not None and stored.jump_length else args.jump_length,
        jump_n_sample=stored.jump_n_sample if stored is not None and stored.jump_n_sample else args.jump_n_sample,
        harmonize=stored.harmonize if stored is not None and stored.harmonize is not None else args.harmonize,
        loras=tuple(args.lora) or (stored.loras if stored is not None else ()),
        embeddings=tuple(args.embedding) or (stored.embeddings if stored is not None else ()),
        weighting=args.weighting or (stored is not None and stored.weighting),
        class_label=pick(args.class_label, "class_label"),
        scalar=pick(args.scalar, "scalar"),
        classifier=pick(args.classifier, "classifier"),
        classifier_scale=args.classifier_scale if args.classifier_scale or stored is None or
        stored.classifier_scale is None else stored.classifier_scale,
        timesteps=timesteps,
        own_spacing=own_spacing,
    )


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    with warnings_on_stderr():
        request = request_from_args(args)
        sink = prepare(request)  # before the slow imports below
        quiet_loading_bars()
        return run(request, sink)


@contextlib.contextmanager
def warnings_on_stderr() -> Iterator[None]:
    """ldm_app warnings (e.g. "prompt truncated to CLIP's 77 tokens") as "WARNING: ..." lines on stderr, for the
    duration of one command (removed after, so in-process callers such as tests don't accumulate handlers)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    app_logger = logging.getLogger("ldm_app")
    app_logger.addHandler(handler)
    try:
        yield
    finally:
        app_logger.removeHandler(handler)


def quiet_loading_bars() -> None:
    """Command-line output: the settings line, the sampling progress bar and the written paths; the per-component
    loading bars of diffusers/transformers only add noise for a model that loads in seconds."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


if __name__ == "__main__":
    from ldm_app.errors import run_cli

    sys.exit(run_cli(main))
