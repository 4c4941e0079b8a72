"""Synthetic captioned shapes: a tiny text-to-image dataset whose captions can be checked from the pixels.

    python -m ldm_app.data.shapes --out data/shapes --num_images 2000 --resolution 64 --seed 0

writes `DIR/000000.png ...` and `DIR/metadata.jsonl` (`{"file_name": ..., "text": ...}` a line), the layout that
`datasets.load_dataset("imagefolder", data_dir=DIR)` reads. The output is byte-identical for a given seed.

The vocabulary below is FIXED: evaluation imports it to parse captions and to check generated images, so
changing a name, colour or range invalidates every trained model's scores. Geometry is kept in fractions of the
image side so that a caption means the same thing at every resolution.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ldm_app.errors import UserError, run_cli
from ldm_app.fileio import atomic_dir

# ---- vocabulary (imported by evaluation: keep fixed) ----
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")  # square axis-aligned, triangle pointing up
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
COLOUR_JITTER = 15  # each channel of an object's colour is its palette entry +- at most this
# Object width (= height of its bounding box) as a fraction of the image side.
SIZES: dict[str, tuple[float, float]] = {"small": (0.20, 0.30), "large": (0.45, 0.60)}
# Where the object's bounding-box centre lies: a third of the image (the other coordinate at the middle), or the
# centre. Values are the words used in captions.
POSITIONS: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# "A {relation} B": the first object's centre is {relation} the second's.
RELATIONS: tuple[str, ...] = ("above", "below", "to the left of", "to the right of")
# Two-object scenes: where (first, second) go for each relation; both objects are small and of different colours.
RELATION_POSITIONS: dict[str, tuple[str, str]] = {
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
    "to the left of": ("left", "right"),
    "to the right of": ("right", "left"),
}

SUPERSAMPLE = 4  # draw at 4x then box-downsample: anti-aliased edges without ringing (LANCZOS overshoots)
_THIRD_MARGIN = 0.01  # keep an object's centre this far inside its third, so the position is never borderline
_CENTER_JITTER = 0.08  # "in the center" objects: centre within +-8% of the middle (well inside the middle third)


@dataclass(frozen=True)
class ShapeObject:
    shape: str  # one of SHAPES
    colour: str  # one of COLOURS
    rgb: tuple[int, int, int]  # the jittered colour actually drawn
    size: str  # one of SIZES
    width: float  # bounding-box side / image side
    center: tuple[float, float]  # bounding-box centre (x, y) / image side; y grows downwards
    position: str  # one of POSITIONS


@dataclass(frozen=True)
class Scene:
    background: str  # one of BACKGROUNDS
    objects: tuple[ShapeObject, ...]  # one object, or two for a relation scene
    relation: str | None = None  # one of RELATIONS for two-object scenes

    @property
    def caption(self) -> str:
        return caption(self)


def _describe(obj: ShapeObject) -> str:
    return f"a {obj.size} {obj.colour} {obj.shape}"


def caption(scene: Scene) -> str:
    """The scene's caption, exactly as written in metadata.jsonl."""
    tail = f"on a {scene.background} background"
    if scene.relation is None:
        (obj,) = scene.objects
        return f"{_describe(obj)} {POSITIONS[obj.position]} {tail}"
    first, second = scene.objects
    return f"{_describe(first)} {scene.relation} {_describe(second)} {tail}"


def _sample_center(rng: np.random.Generator, position: str, width: float, inset: float) -> tuple[float, float]:
    """Centre (x, y) for `position`: the free coordinate anywhere in its third such that the object (side `width`)
    stays `inset` inside the image; the other coordinate at the middle."""
    if position == "center":
        x, y = rng.uniform(0.5 - _CENTER_JITTER, 0.5 + _CENTER_JITTER, size=2)
        return float(x), float(y)
    lo, hi = width / 2 + inset, 1 / 3 - _THIRD_MARGIN  # range for a centre in the left/top third
    c = float(rng.uniform(lo, hi))
    if position in ("right", "bottom"):
        c = 1.0 - c
    return (c, 0.5) if position in ("left", "right") else (0.5, c)


def _sample_object(
    rng: np.random.Generator, size: str, position: str, colour: str, inset: float
) -> ShapeObject:
    lo, hi = SIZES[size]
    if position != "center":
        # A large object must fit between the image edge and the end of its third.
        hi = min(hi, 2 * (1 / 3 - _THIRD_MARGIN - inset))
    width = float(rng.uniform(lo, hi))
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    rgb = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + jitter, 0, 255))
    return ShapeObject(
        shape=str(rng.choice(SHAPES)),
        colour=colour,
        rgb=rgb,
        size=size,
        width=width,
        center=_sample_center(rng, position, width, inset),
        position=position,
    )


def sample_scene(rng: np.random.Generator, resolution: int, two_object_fraction: float = 0.25) -> Scene:
    """Draw a random scene. `resolution` sets the inset (at least one pixel) that keeps objects inside the image."""
    inset = max(0.01, 1.0 / resolution)
    background = str(rng.choice(list(BACKGROUNDS)))
    if rng.random() < two_object_fraction:
        relation = str(rng.choice(RELATIONS))
        colours = rng.choice(list(COLOURS), size=2, replace=False)
        # Opposite thirds on one axis, both centred on the other: with widths <= 0.30 they are >= 0.03 apart.
        objects = tuple(
            _sample_object(rng, "small", pos, str(col), inset)
            for pos, col in zip(RELATION_POSITIONS[relation], colours)
        )
        return Scene(background=background, objects=objects, relation=relation)
    obj = _sample_object(
        rng, str(rng.choice(list(SIZES))), str(rng.choice(list(POSITIONS))), str(rng.choice(list(COLOURS))), inset
    )
    return Scene(background=background, objects=(obj,))


def _draw_object(draw: ImageDraw.ImageDraw, obj: ShapeObject, side: int) -> None:
    """Draw `obj` on a canvas `side` pixels wide; coordinates are rounded to the (supersampled) pixel grid."""
    half = obj.width / 2
    x0, x1 = round((obj.center[0] - half) * side), round((obj.center[0] + half) * side)
    y0, y1 = round((obj.center[1] - half) * side), round((obj.center[1] + half) * side)
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=obj.rgb)  # PIL boxes include their last pixel
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=obj.rgb)
    elif obj.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=obj.rgb)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render_scene(scene: Scene, resolution: int) -> Image.Image:
    """Render `scene` as an anti-aliased RGB image of `resolution` x `resolution` pixels."""
    side = resolution * SUPERSAMPLE
    image = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, side)
    return image.resize((resolution, resolution), Image.Resampling.BOX)


def _check_args(out: Path, num_images: int, resolution: int, seed: int, two_object_fraction: float) -> None:
    if num_images < 1:
        raise UserError(f"--num_images must be at least 1, got {num_images}")
    if resolution < 16:
        raise UserError(f"--resolution must be at least 16 pixels, got {resolution}")
    if seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed}")
    if not 0.0 <= two_object_fraction <= 1.0:
        raise UserError(f"--two_object_fraction must be between 0 and 1, got {two_object_fraction}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder: give a new folder path")
    # Replacing an earlier shapes dataset is fine; silently deleting some other folder is not.
    if out.is_dir() and any(out.iterdir()) and not (out / "metadata.jsonl").is_file():
        raise UserError(f"--out {out} is a non-empty folder without metadata.jsonl: give a new or empty folder")


def make_dataset(
    out: str | Path, num_images: int, resolution: int, seed: int, two_object_fraction: float = 0.25
) -> Path:
    """Write `num_images` rendered scenes and their captions to `out` (imagefolder layout), atomically.

    Image i is drawn from its own generator seeded with (seed, i), so it does not depend on `num_images`.
    """
    out = Path(out)
    _check_args(out, num_images, resolution, seed, two_object_fraction)
    with atomic_dir(out) as tmp:
        lines = []
        for i in tqdm(range(num_images), desc="rendering shapes", unit="img"):
            scene = sample_scene(np.random.default_rng([seed, i]), resolution, two_object_fraction)
            file_name = f"{i:06d}.png"
            render_scene(scene, resolution).save(tmp / file_name)
            lines.append(json.dumps({"file_name": file_name, "text": caption(scene)}) + "\n")
        (tmp / "metadata.jsonl").write_text("".join(lines), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic captioned shapes dataset (imagefolder layout).")
    parser.add_argument("--out", required=True, help="folder to write (replaced atomically if it is a dataset)")
    parser.add_argument("--num_images", type=int, required=True)
    parser.add_argument("--resolution", type=int, default=64, help="image side in pixels (>= 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--two_object_fraction", type=float, default=0.25, help="share of two-object scenes")
    args = parser.parse_args(argv)
    path = make_dataset(args.out, args.num_images, args.resolution, args.seed, args.two_object_fraction)
    print(f"wrote {args.num_images} images to {path}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
