"""Captioned views of real photos: a small natural-image text-to-image dataset that needs no network.

    python -m ldm_app.data.photos --out data/photos --num_images 4000 --resolution 64 --seed 0 [--sidecars]

The photos are the sample images that scikit-image's wheel ships in `skimage/data/` (an astronaut, a cat, a cup of
coffee, a rocket, a motorcycle, coins, a cameraman, ...; `pip install 'ldm_app[photos]'`), the ones that
`skimage.data.<name>()` opens offline. Each view is a square crop of one photo at one of four scales, optionally
mirrored, resized to `--resolution`, with a caption that names the photo and the view in plain words:
"a photo of a cat's face, close-up", "a black and white photo of a brick wall, left part". The vocabulary is
SOURCES x VIEWS below (14 subjects x 4 views); "left part" / "right part" say where the crop lies in the image as
it is saved (after any mirroring).

Writes `DIR/000000.png ...` and `DIR/metadata.jsonl` (`{"file_name": ..., "text": ...}` a line), the imagefolder
layout, or with `--sidecars` a caption file beside each image (`000000.png` + `000000.txt`) and no metadata.jsonl
(when both are there, the trainers read metadata.jsonl, so writing both would leave the caption files unread),
plus `DIR/photos_manifest.json`: the arguments and every file written with its size and SHA-256. View i is drawn
from its own generator seeded with (seed, i): the output is byte-identical for a seed, and view i does not depend
on `--num_images`.

`--out` is handled exactly as `ldm_app.data.shapes` handles it: a missing path, an empty folder, or a folder that is
exactly an earlier output of this generator, replaced atomically; anything else is refused in one line before any
photo is read.
"""

from __future__ import annotations

import functools
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ldm_app.errors import ArgumentParser, UserError, run_cli
from ldm_app.data.generated import GeneratedFolder, add_common_arguments, check_counts

INSTALL_HINT = "scikit-image is not installed: pip install 'ldm_app[photos]'"


@dataclass(frozen=True)
class Source:
    name: str  # the skimage.data function that opens it
    subject: str  # what the photo shows, as the caption says it
    closeup: str  # what a close-up shows (the region `roi`)
    roi: tuple[int, int, int, int] | None = None  # (left, top, right, bottom) in the original; None: anywhere
    gray: bool = False  # a black and white photo: captions say so


# Only photos that load offline (bundled in the wheel, checked on scikit-image 0.26); regions of interest were read
# off the photos by eye, wide enough that a close-up always holds part of the subject.
SOURCES: tuple[Source, ...] = (
    Source("astronaut", "an astronaut in an orange suit", "an astronaut's face", (150, 10, 310, 170)),
    Source("chelsea", "a tabby cat", "a cat's face", (60, 0, 400, 300)),
    Source("coffee", "a cup of coffee on a saucer", "a cup of coffee", (150, 0, 430, 290)),
    Source("rocket", "a rocket on its launch pad", "a rocket", (250, 110, 400, 427)),
    Source("stereo_motorcycle", "a red motorcycle in a garage", "a red motorcycle", (150, 150, 680, 440)),
    Source("hubble_deep_field", "galaxies in deep space", "galaxies in deep space"),
    Source("retina", "the retina of an eye", "the retina of an eye", (250, 250, 1160, 1160)),
    Source("immunohistochemistry", "stained tissue under a microscope", "stained tissue under a microscope"),
    Source("coins", "old coins", "old coins", (10, 10, 374, 293), gray=True),
    Source("camera", "a man with a camera on a tripod", "a man looking through a camera", (140, 40, 340, 240),
           gray=True),
    Source("moon", "the surface of the moon", "the surface of the moon", gray=True),
    Source("brick", "a brick wall", "a brick wall", gray=True),
    Source("grass", "grass", "grass", gray=True),
    Source("gravel", "gravel", "gravel", gray=True),
)
# View -> the crop's side as a fraction of the shorter side of the photo (close-ups: of the region of interest).
VIEWS: dict[str, tuple[float, float]] = {
    "wide view": (0.85, 1.0),
    "left part": (0.5, 0.7),
    "right part": (0.5, 0.7),
    "close-up": (0.45, 0.75),
}
_PART_MARGIN = 0.05  # a left/right part's centre is at least this fraction of the width left/right of the middle


def caption(source: Source, view: str) -> str:
    kind = "a black and white photo" if source.gray else "a photo"
    return f"{kind} of {source.closeup if view == 'close-up' else source.subject}, {view}"


def _skimage_data():
    try:
        import skimage.data
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return skimage.data


@functools.cache
def load_source(name: str) -> Image.Image:
    """The photo as an RGB image (gray ones repeated over 3 channels), from the scikit-image wheel."""
    data = _skimage_data()
    try:
        pixels = getattr(data, name)()
    except (ImportError, OSError, ValueError) as e:  # not in this wheel: skimage would fetch it through pooch
        import skimage
        raise UserError(f"scikit-image {skimage.__version__} does not ship the photo {name!r} offline "
                        f"({str(e).splitlines()[0][:80]}): pip install 'scikit-image>=0.26'") from None
    if name == "stereo_motorcycle":
        pixels = pixels[0]  # (left, right, disparity): the left view
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    return Image.fromarray(pixels[..., :3].astype(np.uint8), "RGB")


@dataclass(frozen=True)
class View:
    source: Source
    view: str  # one of VIEWS
    flip: bool  # mirrored left-right before cropping
    box: tuple[int, int, int, int]  # (left, top, right, bottom) of the square crop in the (mirrored) photo

    @property
    def caption(self) -> str:
        return caption(self.source, self.view)


def _mirror(box: tuple[int, int, int, int], width: int) -> tuple[int, int, int, int]:
    left, top, right, bottom = box
    return (width - right, top, width - left, bottom)


def sample_view(rng: np.random.Generator, size_of) -> View:
    """Draw a view: a source, a view kind, a mirror flip and a square crop inside the (mirrored) photo.
    `size_of(name)` gives a photo's (width, height)."""
    source = SOURCES[int(rng.integers(len(SOURCES)))]
    view = list(VIEWS)[int(rng.integers(len(VIEWS)))]
    flip = bool(rng.random() < 0.5)
    w, h = size_of(source.name)
    region = (0, 0, w, h) if view != "close-up" or source.roi is None else source.roi
    if flip:
        region = _mirror(region, w)
    rl, rt, rr, rb = region
    lo, hi = VIEWS[view]
    side = max(1, int(round(rng.uniform(lo, hi) * min(rr - rl, rb - rt))))
    top = rt + int(rng.integers(0, rb - rt - side + 1))
    if view == "left part":  # centre left of the middle by at least the margin
        left = int(rng.integers(0, max(0, int(w * (0.5 - _PART_MARGIN) - side / 2)) + 1))
    elif view == "right part":
        lo_left = min(w - side, int(np.ceil(w * (0.5 + _PART_MARGIN) - side / 2)))
        left = int(rng.integers(lo_left, w - side + 1))
    else:
        left = rl + int(rng.integers(0, rr - rl - side + 1))
    return View(source, view, flip, (left, top, left + side, top + side))


def _photo_size(name: str) -> tuple[int, int]:
    return load_source(name).size


def render_view(view: View, resolution: int) -> Image.Image:
    image = load_source(view.source.name)
    if view.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # LANCZOS: an antialiased downsample; reducing_gap=3 box-reduces the large crops first, for speed (at 64 px the
    # crops are 68 to 1,411 pixels wide), which Pillow documents as indistinguishable from plain LANCZOS in most cases
    return image.crop(view.box).resize((resolution, resolution), Image.Resampling.LANCZOS, reducing_gap=3.0)


METADATA_FILE = "metadata.jsonl"
CAPTION_SUFFIX = ".txt"
MANIFEST_FILE = "photos_manifest.json"
WRITTEN_BY = "python -m ldm_app.data.photos"
OUTPUT = GeneratedFolder(MANIFEST_FILE, WRITTEN_BY, "DIR/photos")  # --out's rules and the atomic write (as shapes)
check_previous_output = OUTPUT.check_previous_output  # is FOLDER exactly an earlier output of this generator?


def make_dataset(out: str | Path, num_images: int, resolution: int, seed: int, sidecars: bool = False) -> Path:
    """Write `num_images` captioned views to `out` atomically: metadata.jsonl, or with `sidecars` a caption file
    beside each image instead. View i comes from a generator seeded with (seed, i)."""
    out = Path(out)
    check_counts(num_images, resolution, seed)
    OUTPUT.check_out(out)
    _skimage_data()  # the one-line install hint before anything is written
    arguments = {"num_images": int(num_images), "resolution": int(resolution), "seed": int(seed),
                 "sidecars": bool(sidecars)}
    with OUTPUT.writing(out, arguments) as writer:
        lines = []
        for i in tqdm(range(num_images), desc="cropping photos", unit="img"):
            view = sample_view(np.random.default_rng([seed, i]), _photo_size)
            stem = f"{i:06d}"
            png = io.BytesIO()
            render_view(view, resolution).save(png, format="PNG")
            writer.write(f"{stem}.png", png.getvalue())
            if sidecars:
                writer.write(f"{stem}{CAPTION_SUFFIX}", (view.caption + "\n").encode("utf-8"))
            else:
                lines.append(json.dumps({"file_name": f"{stem}.png", "text": view.caption}) + "\n")
        if not sidecars:
            writer.write(METADATA_FILE, "".join(lines).encode("utf-8"))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(
        prog="python -m ldm_app.data.photos",
        description="Write captioned square views of scikit-image's bundled photos (imagefolder layout).",
    )
    add_common_arguments(parser)
    parser.add_argument("--sidecars", action="store_true",
                        help="write a caption file beside each image (000000.png + 000000.txt) instead of "
                        "metadata.jsonl")
    args = parser.parse_args(argv)
    path = make_dataset(args.out, args.num_images, args.resolution, args.seed, sidecars=args.sidecars)
    print(f"wrote {args.num_images} views to {path}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
