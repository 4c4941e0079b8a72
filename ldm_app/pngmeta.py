"""Generation parameters stored inside each PNG, so an image carries what is needed to make it again.

Two text chunks (PNG's own key/value metadata; Pillow writes tEXt, or iTXt for non-Latin-1 text):
- `ldm_app`: the parameters as JSON, read back by `generate.py --from_png`;
- `parameters`: the same in AUTOMATIC1111's human-readable layout, which image viewers and web UIs already show:

    a corgi in a sushi house
    Negative prompt: blurry
    Steps: 50, Sampler: ddim, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: default_model, Version: ldm_app 0.1.0

Pillow has no notion of typed generation parameters, hence the small dataclass and checks below.

`save_png` never replaces a file unless asked: the image is written to a temporary file, then published under the
first free name with `os.link`, which fails when the name exists, so two processes writing into one folder at once
never replace each other's images, and no reader ever sees a half-written PNG.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from ldm_app import __version__, limits
from ldm_app.errors import UserError
from ldm_app.fileio import atomic_path, write_errors

KEY = "ldm_app"  # JSON chunk
TEXT_KEY = "parameters"  # A1111-style chunk
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes up to 2**64 - 1; seed + k must fit too
# os.link errors that mean "this file system has no hard links" (FAT, some network shares), not "forbidden"
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV, errno.EMLINK}


def check_unicode(name: str, text: str) -> str:
    """`text` if it can be stored as UTF-8; else a UserError: a prompt with lone surrogates comes from bytes that
    were not UTF-8 (Python decodes such command-line bytes with surrogateescape) or from a broken caller."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            shown = repr(text.encode("utf-8", "surrogateescape"))  # the original bytes of a command-line argument
        except UnicodeEncodeError:
            shown = repr(text)
        raise UserError(f"{name} is not valid UTF-8 text ({shown[:80]}); expected UTF-8 (check the terminal's or "
                        "file's encoding)") from None
    return text


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
    model: str  # the model folder's (or single file's) absolute path
    version: str = __version__
    # image-to-image and inpainting: the input files (absolute paths, and their SHA-256 so a remake can tell the
    # file changed) and the settings; None/default for text-to-image
    init_image: str | None = None
    init_image_sha256: str | None = None
    strength: float | None = None
    mask: str | None = None
    mask_sha256: str | None = None
    inpaint: str | None = None  # blend | repaint | model
    mask_blur: float = 0.0
    paste_back: bool = False
    jump_length: int | None = None  # RePaint's schedule
    jump_n_sample: int | None = None
    harmonize: float | None = None
    # adapters: LoRA files as "ABSOLUTE_PATH:SCALE", textual-inversion embedding files; A1111 prompt weighting
    loras: tuple[str, ...] = ()
    embeddings: tuple[str, ...] = ()
    weighting: bool = False
    class_label: int | None = None  # a class-conditional model's class, or the classifier's
    classifier: str | None = None  # classifier guidance: the classifier folder (absolute) and its scale
    classifier_scale: float | None = None
    scalar: float | None = None  # a scalar-conditioned model's value
    # the timestep grid text-to-image sampled on (diffusers' timesteps=): the model's stored grid, the caller's, or
    # the sampler's own spacing written out; None: the sampler's own spacing at `steps`
    timesteps: tuple[int, ...] | None = None

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
                raise UserError(
                    f"{where}: unknown key {limits.shown(name, 60)} in the '{KEY}' chunk; expected {', '.join(fields)}"
                )
            if not _has_type(value, fields[name].type):
                raise UserError(f"{where}: '{name}' in the '{KEY}' chunk has the wrong type ({limits.shown(value)})")
        try:
            _check_values(data)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**data)


def _check_values(data: dict[str, Any]) -> None:
    """Values a hand-edited or foreign chunk may hold that would otherwise be used silently: NaN/inf guidance (NaN
    turned guidance off), steps, sizes and seeds beyond the limits, prompts that are not Unicode."""
    from ldm_app.samplers import check_sampler_name

    limits.check_guidance_scale(data["guidance_scale"])
    limits.check_steps(data["steps"], name="steps")
    limits.check_image_side("height", data["height"])
    limits.check_image_side("width", data["width"])
    if not 0 <= data["seed"] <= MAX_SEED:
        raise UserError(f"seed must be between 0 and {MAX_SEED}, got {data['seed']}")
    if data["sampler"] is not None:
        check_sampler_name(data["sampler"])
    if data.get("strength") is not None and not 0 < limits.check_number("strength", data["strength"]) <= 1:
        raise UserError(f"strength must be in (0, 1], got {data['strength']}")
    if data.get("inpaint") not in (None, "blend", "repaint", "model"):
        raise UserError(f"unknown inpaint method {limits.shown(data['inpaint'], 40)}")
    if not 0 <= limits.check_number("mask_blur", data.get("mask_blur", 0.0)) <= 256:
        raise UserError(f"mask_blur must be in [0, 256], got {data.get('mask_blur')}")
    if data.get("scalar") is not None:
        limits.check_number("scalar", data["scalar"])  # json.loads reads NaN and Infinity
    if data.get("class_label") is not None and data["class_label"] < 0:
        raise UserError(f"class_label must be >= 0, got {data['class_label']}")
    if data.get("harmonize") is not None and not 0 <= limits.check_number("harmonize", data["harmonize"]) < 1:
        raise UserError(f"harmonize must be in [0, 1), got {data['harmonize']}")
    if data.get("timesteps") is not None:
        limits.check_timestep_grid(data["timesteps"], data["steps"], "timesteps")
    for name in ("jump_length", "jump_n_sample"):
        if data.get(name) is not None:
            limits.check_count(name, data[name], limits.current().max_steps)
    for name in ("prompt", "negative_prompt", "version"):
        if name in data:
            check_unicode(name, data[name])


def _has_type(value: Any, annotation: str) -> bool:
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "tuple[str, ...]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if annotation == "tuple[int, ...] | None":
        return value is None or isinstance(value, list) and all(type(v) is int for v in value)
    # bool is an int subclass: refuse it for numbers; an int guidance scale (7) is fine
    if isinstance(value, bool):
        return False
    allowed = {
        "str": (str,),
        "int": (int,),
        "float": (int, float),
        "str | None": (str, type(None)),
        "int | None": (int, type(None)),
        "float | None": (int, float, type(None)),
    }[annotation]
    return isinstance(value, allowed)


WEIGHTED, PLAIN_TEXT = "A1111", "plain text"  # the `Weighting:` field's values


def weighting_field(p: ImageParams) -> str | None:
    """How the prompts were read, for the text's `Weighting:` field: "A1111" (weights applied, --weighting), "plain
    text" (a prompt with A1111 weighting syntax read as characters), None where it made no difference (no syntax,
    no weighting): an A1111 reader applies the syntax by default, so the text must say when it was not."""
    from ldm_app.adapters import uses_weighting_syntax

    if p.weighting:
        return WEIGHTED
    if uses_weighting_syntax(p.prompt) or uses_weighting_syntax(p.negative_prompt):
        return PLAIN_TEXT
    return None


def format_parameters(p: ImageParams) -> str:
    """The A1111 `parameters` text: prompt, optional negative prompt line, then one line of settings."""
    lines = [p.prompt]
    if p.negative_prompt:
        lines.append(f"Negative prompt: {p.negative_prompt}")
    settings = {
        "Steps": p.steps,
        **({"Timesteps": "/".join(map(str, p.timesteps))} if p.timesteps else {}),
        "Sampler": p.sampler or "model default",
        "CFG scale": p.guidance_scale,
        "Seed": p.seed,
        "Size": f"{p.width}x{p.height}",
        "Model": Path(p.model).name,
    }
    if p.init_image is not None:
        settings["Denoising strength"] = p.strength
    if p.mask is not None:
        settings.update({"Inpaint": p.inpaint, "Mask blur": p.mask_blur, "Paste back": p.paste_back})
    if p.class_label is not None:
        settings["Class"] = p.class_label
    if p.scalar is not None:
        settings["Scalar"] = p.scalar
    if p.classifier is not None:
        settings["Classifier scale"] = p.classifier_scale
    if p.loras:
        settings["Lora"] = " ".join(Path(spec.rsplit(":", 1)[0]).stem + ":" + spec.rsplit(":", 1)[1] for spec in p.loras)
    reading = weighting_field(p)
    if reading is not None:
        settings["Weighting"] = reading
    settings["Version"] = f"ldm_app {p.version}"
    lines.append(", ".join(f"{k}: {v}" for k, v in settings.items()))
    return "\n".join(lines)


def _storable(text: str) -> str:
    """Text a PNG chunk can hold: a path with bytes that are not UTF-8 (lone surrogates) gets them escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def numbered_names(dest: Path) -> Iterator[Path]:
    """`k-1.png`, `k-2.png`, ... next to `dest` = `k.png`: where an image goes when `dest` is taken."""
    return (dest.with_name(f"{dest.stem}-{n}{dest.suffix}") for n in itertools.count(1))


def save_png(
    image: Image.Image,
    dest: str | os.PathLike,
    params: ImageParams | None,
    text: str | None = None,
    *,
    overwrite: bool = False,
    alternatives: Iterable[Path] | None = None,
) -> Path:
    """Write `image` with its parameters and return the path written; `text` replaces the A1111 text (e.g. for a
    grid, which gets no `ldm_app` chunk because no single set of parameters reproduces it).

    Never replaces an existing file unless `overwrite`: when `dest` is taken, the first free name of
    `alternatives` (default `numbered_names(dest)`: `k-1.png`, `k-2.png`, ...) is used. Race-free: the complete
    PNG is written to a temporary file, then published with `os.link`, which fails if the name exists (another
    process got there first) and the next name is tried. With `overwrite`, `dest` is replaced atomically. A full
    disk or a read-only folder is a one-line UserError naming the path, and leaves no temporary file.
    """
    info = png_info(params, text)
    dest = Path(dest)
    if overwrite:
        with atomic_path(dest) as tmp:
            image.save(tmp, format="PNG", pnginfo=info)
        return dest
    names = itertools.chain([dest], alternatives if alternatives is not None else numbered_names(dest))
    with write_errors(dest):
        tmp = _write_temporary(image, info, dest)
        try:
            return _publish(tmp, names)
        finally:
            tmp.unlink(missing_ok=True)


def png_info(params: ImageParams | None, text: str | None = None) -> PngImagePlugin.PngInfo:
    """The text chunks of an image: `ldm_app` (the parameters as JSON) and `parameters` (`text`, default the A1111
    text of `params`)."""
    info = PngImagePlugin.PngInfo()
    if params is not None:
        info.add_text(KEY, params.to_json())
    text = text if text is not None else format_parameters(params) if params is not None else None
    if text is not None:
        info.add_text(TEXT_KEY, _storable(text))
    return info


def _write_temporary(image: Image.Image, info: PngImagePlugin.PngInfo, dest: Path) -> Path:
    """The complete PNG in a new hidden file next to `dest`, flushed to disk (a crash after publishing must not
    leave an empty image). Made with O_EXCL and mode 0o666, so the kernel applies the umask (no umask juggling,
    which is process-wide and so unsafe with threads)."""
    while True:
        tmp = dest.with_name(f".{dest.name[:100]}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _publish(tmp: Path, names: Iterable[Path]) -> Path:
    """Give the finished file `tmp` the first of `names` that does not exist yet; never replaces a file."""
    for name in names:
        try:
            os.link(tmp, name)
            return name
        except FileExistsError:
            continue
        except OSError as e:
            if e.errno not in _NO_HARD_LINKS:
                raise
        # no hard links here: claim the name with O_EXCL (an empty file, for an instant), then move the PNG onto it
        try:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        os.replace(tmp, name)
        return name
    raise UserError(f"no free file name for {tmp.name}")  # only with a finite list of alternatives


def read_text_chunks(path: str | os.PathLike) -> dict[str, str]:
    """All tEXt/iTXt/zTXt chunks of a PNG file; UserError if it is missing or not a PNG."""
    path = Path(path)
    if not os.path.isfile(path):  # os.path: False (not an OSError) for a name too long or with a NUL
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
    return ImageParams.from_dict(read_chunk(path), str(path))


def read_chunk(path: str | os.PathLike) -> Any:
    """The `ldm_app` chunk of `path` as parsed JSON, not yet checked (ImageParams.from_dict checks it); for a caller
    that needs to know which keys an older image lacks."""
    chunks = read_text_chunks(path)
    if KEY not in chunks:
        raise UserError(
            f"{path} has no '{KEY}' parameters (a grid, or an image not made by generate.py); "
            "expected a single image written by generate.py"
        )
    try:
        data = json.loads(chunks[KEY])
    except ValueError as e:  # JSONDecodeError, or an integer of more than 4300 digits
        raise UserError(f"{path}: the '{KEY}' chunk is not valid JSON ({e})") from None
    return data
