"""Generation parameters stored inside each PNG, so an image carries what is needed to make it again.

Two text chunks (PNG's own key/value metadata; Pillow writes tEXt, or iTXt for non-Latin-1 text):
- `ldm_app`: the parameters as JSON, read back by `generate.py --from_png`;
- `parameters`: the same in AUTOMATIC1111's human-readable layout, which image viewers and web UIs already show:

    a corgi in a sushi house
    Negative prompt: blurry
    Steps: 50, Sampler: ddim, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: default_model, Version: ldm_app 0.1.0

Pillow has no notion of typed generation parameters, hence the small dataclass and checks below.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from ldm_app import __version__
from ldm_app.errors import UserError
from ldm_app.fileio import atomic_path

KEY = "ldm_app"  # JSON chunk
TEXT_KEY = "parameters"  # A1111-style chunk


@dataclass(frozen=True)
class ImageParams:
    """Everything that fixes the pixels of one image (given the same device and dtype)."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    sampler: str | None  # None: the model folder's own scheduler, which ldm_app.samplers has no name for
    height: int
    width: int
    model: str  # the model folder's absolute path
    version: str = __version__

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> ImageParams:
        """Check names and types (a hand-edited or foreign chunk must fail in one line, not deep in sampling)."""
        if not isinstance(data, dict):
            raise UserError(f"{where}: the '{KEY}' chunk is not a JSON object")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        missing = [name for name, f in fields.items() if name not in data and f.default is dataclasses.MISSING]
        if missing:
            raise UserError(f"{where}: the '{KEY}' chunk lacks {', '.join(missing)}")
        for name, value in data.items():
            if name not in fields:
                raise UserError(f"{where}: unknown key {name!r} in the '{KEY}' chunk; expected {', '.join(fields)}")
            if not _has_type(value, fields[name].type):
                raise UserError(f"{where}: '{name}' in the '{KEY}' chunk has the wrong type ({value!r})")
        return cls(**data)


def _has_type(value: Any, annotation: str) -> bool:
    # bool is an int subclass: refuse it for numbers; an int guidance scale (7) is fine
    if isinstance(value, bool):
        return False
    allowed = {
        "str": (str,),
        "int": (int,),
        "float": (int, float),
        "str | None": (str, type(None)),
    }[annotation]
    return isinstance(value, allowed)


def format_parameters(p: ImageParams) -> str:
    """The A1111 `parameters` text: prompt, optional negative prompt line, then one line of settings."""
    lines = [p.prompt]
    if p.negative_prompt:
        lines.append(f"Negative prompt: {p.negative_prompt}")
    settings = {
        "Steps": p.steps,
        "Sampler": p.sampler or "model default",
        "CFG scale": p.guidance_scale,
        "Seed": p.seed,
        "Size": f"{p.width}x{p.height}",
        "Model": Path(p.model).name,
        "Version": f"ldm_app {p.version}",
    }
    lines.append(", ".join(f"{k}: {v}" for k, v in settings.items()))
    return "\n".join(lines)


def save_png(image: Image.Image, dest: str | os.PathLike, params: ImageParams | None, text: str | None = None) -> Path:
    """Write `image` to `dest` atomically with its parameters; `text` replaces the A1111 text (e.g. for a grid,
    which gets no `ldm_app` chunk because no single set of parameters reproduces it)."""
    info = PngImagePlugin.PngInfo()
    if params is not None:
        info.add_text(KEY, params.to_json())
    text = text if text is not None else format_parameters(params) if params is not None else None
    if text is not None:
        info.add_text(TEXT_KEY, text)
    with atomic_path(dest) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(dest)


def read_text_chunks(path: str | os.PathLike) -> dict[str, str]:
    """All tEXt/iTXt/zTXt chunks of a PNG file; UserError if it is missing or not a PNG."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"PNG file not found: {path}")
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise UserError(f"{path} is a {im.format} image; expected a PNG written by generate.py")
            im.load()  # text chunks after the image data are read only on load
            return dict(im.text)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UserError(f"{path} is not a readable PNG ({e}); expected a PNG written by generate.py") from None


def read_params(path: str | os.PathLike) -> ImageParams:
    """The parameters stored by `save_png` in `path`."""
    chunks = read_text_chunks(path)
    if KEY not in chunks:
        raise UserError(
            f"{path} has no '{KEY}' parameters (a grid, or an image not made by generate.py); "
            "expected a single image written by generate.py"
        )
    try:
        data = json.loads(chunks[KEY])
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: the '{KEY}' chunk is not valid JSON ({e})") from None
    return ImageParams.from_dict(data, str(path))
