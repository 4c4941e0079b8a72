"""Resource limits: one place that says how big a request may be, checked before anything is allocated.

Every entry point (generate.py, the pipeline's __call__, `--from_png`, train_vae.py / train_ldm.py's
`data.resolution`, the shapes generator, later the web server) asks this module, so a limit is changed in one
place and every face refuses the same input with the same one-line `UserError`.

Configurable without code: each limit can be set by an environment variable `LDM_APP_<NAME>` (upper case,
e.g. `LDM_APP_MAX_IMAGE_SIDE=4096`), read when the limits are first used, or in Python with
`ldm_app.limits.configure(max_image_side=4096)`. No library offers this (diffusers checks only that sizes are
multiples of 8, then lets torch try to allocate), hence the small module.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from numbers import Real
from typing import Any

from ldm_app.errors import UserError

ENV_PREFIX = "LDM_APP_"


@dataclass(frozen=True)
class Limits:
    max_image_side: int = 2048  # pixels, height or width (SD 1.x is trained at 512; 2048 is 256x256 latents)
    max_pixels_per_call: int = 64 * 512 * 512  # images per call x height x width (64 SD-size images)
    max_images_per_call: int = 64  # one pipeline call (a batch)
    max_images_per_command: int = 10_000  # one generate.py command / generate() call, all batches
    max_steps: int = 1000  # sampling steps; a sampler also never gets more than the model's training timesteps
    max_guidance_scale: float = 50.0  # classifier-free guidance w; A1111 caps its slider at 30
    min_guidance_scale: float = 0.0  # w <= 1 means no guidance; negative w is refused as a likely mistake


_FIELDS = {f.name: f.type for f in dataclasses.fields(Limits)}
_current: Limits | None = None


def _from_env() -> Limits:
    values: dict[str, Any] = {}
    for name in _FIELDS:
        text = os.environ.get(ENV_PREFIX + name.upper())
        if text is None:
            continue
        kind = float if "guidance" in name else int
        try:
            value = kind(text)
        except ValueError:
            raise UserError(f"{ENV_PREFIX + name.upper()}={text!r} is not a number; expected a {kind.__name__}") from None
        values[name] = value
    return _checked(Limits(**values))


def _checked(limits: Limits) -> Limits:
    for name in _FIELDS:
        value = getattr(limits, name)
        if not math.isfinite(value) or (value <= 0 and name != "min_guidance_scale"):
            raise UserError(f"limit {name} must be a finite positive number, got {value}")
    if limits.min_guidance_scale > limits.max_guidance_scale:
        raise UserError("limit min_guidance_scale must be <= max_guidance_scale")
    return limits


def current() -> Limits:
    """The limits in force: `configure`'s, else the environment's, else the defaults above."""
    global _current
    if _current is None:
        _current = _from_env()
    return _current


def configure(**changes: Any) -> Limits:
    """Change some limits for this process (unknown names are an error); returns the new limits."""
    global _current
    unknown = set(changes) - set(_FIELDS)
    if unknown:
        raise UserError(f"unknown limit {sorted(unknown)[0]!r}; expected some of {', '.join(_FIELDS)}")
    _current = _checked(dataclasses.replace(current(), **changes))
    return _current


def reset() -> None:
    """Forget `configure`'s changes (the environment is read again on next use)."""
    global _current
    _current = None


# ---- checks -----------------------------------------------------------------------------------------------------


def shown(value: Any, limit: int = 100) -> str:
    """`repr(value)` for an error message: one line (a tensor's or a custom object's repr may span many) and at
    most `limit` characters (a ten-thousand-digit integer or a huge list stays readable)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."



def check_number(name: str, value: Any) -> float:
    """`value` as a finite float; NaN, inf, bools and non-numbers are refused."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise UserError(f"{name} must be a number, got {shown(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value}")
    return value


def check_guidance_scale(value: Any, name: str = "guidance_scale") -> float:
    lim = current()
    value = check_number(name, value)
    if not lim.min_guidance_scale <= value <= lim.max_guidance_scale:
        raise UserError(
            f"{name} must be between {lim.min_guidance_scale:g} and {lim.max_guidance_scale:g}, got {value:g}"
        )
    return value


def check_count(name: str, value: Any, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be an integer >= 1, got {shown(value)}")
    if value > maximum:
        raise UserError(f"{name} is {value}, above the limit of {maximum}")
    return value


def check_image_side(name: str, value: Any, multiple: int = 8) -> int:
    """A height, width or training resolution in pixels: a positive multiple of `multiple`, at most the limit."""
    lim = current()
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % multiple:
        raise UserError(f"{name} must be a positive multiple of {multiple}, got {shown(value)}")
    if value > lim.max_image_side:
        raise UserError(f"{name} is {value} pixels, above the limit of {lim.max_image_side}")
    return value


def check_steps(value: Any, num_train_timesteps: int | None = None, sampler: str | None = None,
                name: str = "num_inference_steps") -> int:
    """Sampling steps: >= 1, at most the limit and at most the model's training timesteps (no scheduler can take
    more steps than the timesteps it was trained on: diffusers raises a ValueError for DDIM and others)."""
    maximum = current().max_steps
    if num_train_timesteps is not None and num_train_timesteps < maximum:
        maximum = num_train_timesteps
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be an integer >= 1, got {shown(value)}")
    if value > maximum:
        why = f"the model's {num_train_timesteps} training timesteps" if maximum == num_train_timesteps \
            else f"the limit of {maximum}"
        on = f" for sampler {sampler}" if sampler else ""
        raise UserError(f"{name} is {value}{on}, above {why}")
    return value


def check_batch(images: int, height: int, width: int, name: str = "images per call") -> None:
    """One call's images x pixels: refused before the latents are allocated."""
    lim = current()
    check_count(name, images, lim.max_images_per_call)
    pixels = images * height * width
    if pixels > lim.max_pixels_per_call:
        raise UserError(
            f"{images} images of {width}x{height} is {pixels:,} pixels in one call, above the limit of "
            f"{lim.max_pixels_per_call:,}; lower the batch size or the image size"
        )


def check_timestep_grid(grid: Any, steps: int | None, name: str, num_train_timesteps: int | None = None) -> list[int]:
    """A timestep grid (diffusers' `timesteps=`): whole numbers, strictly decreasing, >= 0 (and below the model's
    training timesteps when given), one per step when `steps` is given."""
    if (not isinstance(grid, list) or not grid
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in grid)):
        raise UserError(f"{name} must be a non-empty list of whole timesteps >= 0, got {shown(grid)}")
    if any(a <= b for a, b in zip(grid, grid[1:])):
        raise UserError(f"{name} must be strictly decreasing (the first step is the noisiest), got {shown(grid)}")
    if num_train_timesteps is not None and grid[0] >= num_train_timesteps:
        raise UserError(f"{name} starts at {grid[0]}, beyond this model's {num_train_timesteps} training timesteps "
                        f"(0 to {num_train_timesteps - 1})")
    if steps is not None and len(grid) != steps:
        raise UserError(f"{name} has {len(grid)} timesteps but num_inference_steps is {steps}: give one per step")
    return grid
