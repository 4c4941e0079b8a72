"""generate.py's inputs beyond the prompt: the init image and mask of image-to-image and inpainting, and the LoRA
and embedding files; each checked in one line before the model loads, and recorded in every PNG.

Sizes: the output has the init image's size. --height/--width that differ resize the init image (and mask) to them,
with a notice; a side that is not a multiple of 8 is cut down to one, with a notice. A mask must have the image's
size (a mask of another size is more likely the wrong file than a wish to stretch it).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ldm_app import limits
from ldm_app.errors import UserError
from ldm_app.fileio import file_sha256

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)
INPAINT_METHODS = ("blend", "repaint", "model")


def read_image(path: str, flag: str, mode: str) -> Image.Image:
    """The image file at `path` in `mode` ("RGB": alpha on white, 16-bit scaled, as the training data reader does;
    "L" for masks), or a one-line UserError."""
    from PIL import Image, UnidentifiedImageError

    from ldm_app.data.dataset import to_rgb

    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file; expected an image file (PNG, JPEG, ...)")
    try:
        with Image.open(path) as image:
            image.load()
            # the limit on a side only: a side that is not a multiple of 8 is cut down by `load` (module doc)
            limits.check_image_side(f"{flag} width", image.width, multiple=1)
            limits.check_image_side(f"{flag} height", image.height, multiple=1)
            rgb = to_rgb(image)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{flag} {path}: not a readable image ({e})") from None
    return rgb if mode == "RGB" else rgb.convert(mode)


@dataclass
class EditInputs:
    """The loaded init image and mask (None for text-to-image), at the output size (height, width)."""

    image: Image.Image | None = None
    mask: Image.Image | None = None
    size: tuple[int, int] | None = None

    @property
    def kind(self) -> str:
        return "text-to-image" if self.image is None else "image-to-image" if self.mask is None else "inpainting"

    def params(self, req: Any) -> dict[str, Any]:
        """The ImageParams fields of the edit (absolute paths and SHA-256 of the input files)."""
        if self.image is None:
            return {}
        fields: dict[str, Any] = {
            "init_image": str(Path(req.init_image).resolve()),
            "init_image_sha256": file_sha256(Path(req.init_image)),
            "strength": float(req.strength if req.strength is not None else default_strength(req)),
        }
        if self.mask is not None:
            fields.update(mask=str(Path(req.mask).resolve()), mask_sha256=file_sha256(Path(req.mask)),
                          inpaint=req.inpaint, mask_blur=float(req.mask_blur), paste_back=bool(req.paste_back))  # fmt: skip
            if req.inpaint == "repaint":
                fields.update(jump_length=req.jump_length, jump_n_sample=req.jump_n_sample,
                              harmonize=float(req.harmonize))
        return fields

    def call_arguments(self, p: Any) -> dict[str, Any]:
        """The pipeline call's image arguments for the job `p` (an ImageParams)."""
        if self.image is None:
            return {"height": p.height, "width": p.width}
        args: dict[str, Any] = {"image": self.image, "strength": p.strength}
        if self.mask is not None:
            args.update(mask_image=self.mask, inpaint=p.inpaint, mask_blur=p.mask_blur, paste_back=p.paste_back)
            if p.inpaint == "repaint":
                args.update(jump_length=p.jump_length, jump_n_sample=p.jump_n_sample, harmonize=p.harmonize)
        return args


def default_strength(req: Any) -> float:
    return 1.0 if req.mask is not None else 0.8  # diffusers' defaults for inpainting / image-to-image


def check(req: Any) -> None:
    """Every edit and adapter flag, before the model loads (reads the image files: cheap)."""
    if req.mask is not None and req.init_image is None:
        raise UserError("--mask needs --init_image (the image to inpaint)")
    if req.init_image is None:
        for name in ("strength", "inpaint"):
            if getattr(req, name) is not None:
                raise UserError(f"--{name} needs --init_image")
        if req.paste_back is not None or req.mask_blur:
            raise UserError("--paste_back and --mask_blur need --init_image and --mask")
    if req.mask is None and (req.inpaint is not None or req.paste_back is not None or req.mask_blur):
        raise UserError("--inpaint, --paste_back and --mask_blur need --mask (white = repaint, black = keep)")
    if req.strength is not None:
        strength = limits.check_number("--strength", req.strength)
        if not 0 < strength <= 1:
            raise UserError(f"--strength must be in (0, 1], got {strength:g}")
    if req.inpaint is not None and req.inpaint not in INPAINT_METHODS:
        raise UserError(f"unknown --inpaint {limits.shown(req.inpaint, 40)}; expected one of: {', '.join(INPAINT_METHODS)}")
    if not 0 <= limits.check_number("--mask_blur", req.mask_blur) <= 256:
        raise UserError(f"--mask_blur must be in [0, 256] pixels, got {req.mask_blur:g}")
    for name in ("jump_length", "jump_n_sample"):
        limits.check_count(f"--{name}", getattr(req, name), limits.current().max_steps)
    if not 0 <= limits.check_number("--harmonize", req.harmonize) < 1:
        raise UserError(f"--harmonize must be in [0, 1), got {req.harmonize:g}")
    for spec in req.loras:
        from ldm_app.adapters import parse_lora_spec

        path, _ = parse_lora_spec(spec)
        if not os.path.isfile(path):
            raise UserError(f"--lora {path}: no such file; expected a LoRA .safetensors file")
    for path in req.embeddings:
        if not os.path.isfile(path):
            raise UserError(f"--embedding {path}: no such file; expected an embedding .safetensors file")
    load(req)


def load(req: Any) -> EditInputs:
    """Read the init image and mask, and settle the output size (see the module doc)."""
    from PIL import Image

    from ldm_app.pipeline import check_mask_coverage

    if req.init_image is None:
        return EditInputs()
    image = read_image(req.init_image, "--init_image", "RGB")
    mask = read_image(req.mask, "--mask", "L") if req.mask is not None else None
    if mask is not None and mask.size != image.size:
        raise UserError(f"--mask is {mask.width}x{mask.height} pixels but --init_image is {image.width}x"
                        f"{image.height}; expected a mask of the image's size (white = repaint, black = keep)")  # fmt: skip
    if mask is not None:
        check_mask_coverage(mask)
    height = req.height if req.height is not None else image.height
    width = req.width if req.width is not None else image.width
    size = (height // 8 * 8, width // 8 * 8)
    if size[0] < 8 or size[1] < 8:
        raise UserError(f"--init_image is {image.width}x{image.height} pixels; expected at least 8x8")
    if size != (image.height, image.width):
        logger.warning("resizing the init image%s from %dx%d to %dx%d (%s)", " and mask" if mask else "",
                       image.width, image.height, size[1], size[0],
                       "--height/--width" if (req.height or req.width) else "sides must be multiples of 8")  # fmt: skip
        image = image.resize((size[1], size[0]), Image.LANCZOS)
        if mask is not None:
            mask = mask.resize((size[1], size[0]), Image.NEAREST)
    return EditInputs(image, mask, size)


def check_unchanged(stored: Any, flag_given: dict[str, bool]) -> None:
    """For --from_png: the recorded init image / mask must still be the files the image was made from."""
    for name, flag in (("init_image", "--init_image"), ("mask", "--mask")):
        path, digest = getattr(stored, name), getattr(stored, f"{name}_sha256")
        if path is None or flag_given[name]:
            continue
        if not os.path.isfile(path):
            raise UserError(f"the {name.replace('_', ' ')} recorded in the PNG is not there ({path}); pass {flag} FILE")
        if digest is not None and file_sha256(Path(path)) != digest:
            raise UserError(f"{path} changed since the PNG was made (its SHA-256 differs), so the image would not be "
                            f"the same; pass {flag} {path} to use it anyway")  # fmt: skip


def load_adapters(pipe: Any, req: Any) -> dict[str, Any]:
    """Load the LoRAs and embeddings into `pipe`; returns the ImageParams fields that record them."""
    fields: dict[str, Any] = {"weighting": bool(req.weighting)}
    if req.loras:
        from ldm_app.adapters import load_loras, parse_lora_spec

        specs = [parse_lora_spec(s) for s in req.loras]
        load_loras(pipe, specs)
        fields["loras"] = tuple(f"{Path(path).resolve()}:{scale:g}" for path, scale in specs)
    if req.embeddings:
        from ldm_app.adapters import load_embeddings

        tokens = load_embeddings(pipe, list(req.embeddings))
        fields["embeddings"] = tuple(str(Path(p).resolve()) for p in req.embeddings)
        logger.warning("embedding tokens for the prompt: %s", ", ".join(tokens))
    if not req.weighting:
        from ldm_app.adapters import uses_weighting_syntax

        if any(uses_weighting_syntax(t) for t in [*req.prompts, req.negative_prompt]):
            logger.warning("the prompt has (word:1.3)-style weights, which are read as plain text; add --weighting "
                           "to apply them")  # fmt: skip
    return fields


def pipeline_for(pipe: Any, inputs: EditInputs) -> Any:
    """The text-to-image pipeline, or its image-to-image / inpainting sibling on the same modules."""
    from ldm_app.pipeline import LatentDiffusionImg2ImgPipeline, LatentDiffusionInpaintPipeline

    if inputs.image is None:
        return pipe
    cls = LatentDiffusionImg2ImgPipeline if inputs.mask is None else LatentDiffusionInpaintPipeline
    runner = cls.from_pipe(pipe)
    runner.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return runner
