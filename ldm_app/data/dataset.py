"""Image-caption data for training: a local `imagefolder` folder (or a hub dataset) as a torch Dataset.

The folder layout is the one `datasets` reads as an `imagefolder` (every file under the folder, whatever its name, as
the one split: names like "test_1.png" or "val/" are not splits here): image files and a
`metadata.jsonl` with one `{"file_name": "0001.png", "text": "a caption"}` a line. A folder without metadata.jsonl
may instead hold a caption file beside each image (`0001.png` + `0001.txt`, kohya's convention): its text,
lines joined by spaces, is the caption. docs/training.md describes both for users.

Images are decoded here, not by `datasets`: a corrupt or unreadable file must not stop a run. The trainers call
`readable()` first, which decodes every image once and leaves the unreadable ones out, with one warning line
(how many, the first one and why); with none readable it is a one-line `UserError`. The rows kept are a function
of the files only, so a resumed run sees the same rows. A file that breaks later (changed mid-run) still does not
stop the run: `__getitem__` returns None for it (with a warning naming the file) and `collate_fn` drops it. The
folder itself (missing, empty, no captions, no caption column) is checked before any image is read, and a problem
there is a one-line `UserError`.

Counting skipped images: `ImageCaptionDataset.skipped` holds the indices that failed to decode *in this process*,
so with DataLoader workers (separate processes) the main process never sees them. The count that survives
workers is `batch["num_skipped"]` from `collate_fn`: sum it over the run for the training log.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets.data_files import resolve_pattern
from datasets.exceptions import DatasetGenerationError, DatasetNotFoundError
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from PIL import Image, ImageOps

from ldm_app.errors import UserError

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.jsonl"
CAPTION_SUFFIX = ".txt"  # a caption file beside its image: 0001.png + 0001.txt
_ALL_FILES = "**"  # the data_files pattern for every file under the folder (hidden ones left out by `datasets`)
_LAYOUT = (f'image files plus a {METADATA_FILE} with lines like {{"file_name": "0001.png", "text": "a caption"}}, '
           f'or a caption file beside each image (0001.png + 0001{CAPTION_SUFFIX})')
# What PIL raises for an unreadable image: missing/truncated/unidentified files are OSError (incl.
# UnidentifiedImageError), some malformed headers surface as SyntaxError, and oversized ones as
# DecompressionBombError; malformed data inside a readable header, and images `to_rgb` refuses, are ValueError.
_DECODE_ERRORS = (OSError, SyntaxError, Image.DecompressionBombError, ValueError)


class UnsupportedImageError(ValueError):
    """An image that decodes but whose pixels have no one meaning as RGB (see `to_rgb`): skipped like an
    unreadable file, never guessed."""


# What transparent pixels become: composited onto white (how a viewer shows a transparent PNG on a page), rather
# than PIL's `convert("RGB")`, which drops alpha and exposes whatever colour hides under transparent pixels.
ALPHA_BACKGROUND = (255, 255, 255)
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}


# ---- transforms (torchvision does not import with this torch build, so these are PIL/numpy) ----


def resize_shorter_side(image: Image.Image, resolution: int) -> Image.Image:
    """Scale so the shorter side is `resolution`, keeping the aspect ratio (bilinear, as diffusers' scripts)."""
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    return image if size == (w, h) else image.resize(size, Image.Resampling.BILINEAR)


def crop_square(image: Image.Image, resolution: int, center: bool,
                generator: torch.Generator | None = None) -> Image.Image:
    """A `resolution` x `resolution` crop: centred, or at a random offset drawn from `generator` (the training
    stream's per-sample generator, seeded by `ldm_app.training.common.epoch_order`; None: torch's global RNG)."""
    return crop_to(image, (resolution, resolution), center, generator)


def crop_to(image: Image.Image, size: tuple[int, int], center: bool,
            generator: torch.Generator | None = None) -> Image.Image:
    """A `size` = (width, height) crop of an image at least that large: centred, or at a random offset (left
    drawn first, then top) from `generator` (None: torch's global RNG)."""
    (w, h), (cw, ch) = image.size, size
    if center:
        left, top = (w - cw) // 2, (h - ch) // 2
    else:
        left = int(torch.randint(0, w - cw + 1, (), generator=generator))
        top = int(torch.randint(0, h - ch + 1, (), generator=generator))
    return image.crop((left, top, left + cw, top + ch))


def resize_to_cover(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale, keeping the aspect ratio, to the smallest size that covers `size` = (width, height) (bilinear)."""
    (w, h), (bw, bh) = image.size, size
    scale = max(bw / w, bh / h)
    new = (max(bw, round(w * scale)), max(bh, round(h * scale)))
    return image if new == (w, h) else image.resize(new, Image.Resampling.BILINEAR)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1], the range the autoencoder is trained on."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32))  # (H, W, 3) in [0, 255]
    return x.permute(2, 0, 1) / 127.5 - 1.0


def transform_image(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
                    generator: torch.Generator | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Resize, crop and (optionally) flip an RGB image into a (3, resolution, resolution) tensor in [-1, 1], or
    with `size` = (width, height) (a bucket) into a (3, height, width) one. Random choices (crop offset, then flip)
    come from `generator` (None: torch's global RNG).

    Flipping is off by default because captions say "left"/"right": a flipped image contradicts its caption.
    """
    if size is None:
        image = crop_square(resize_shorter_side(image, resolution), resolution, center_crop, generator)
    else:
        image = crop_to(resize_to_cover(image, size), size, center_crop, generator)
    if random_flip and bool(torch.rand((), generator=generator) < 0.5):
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(image)


# ---- aspect-ratio buckets ----


def make_buckets(resolution: int, multiple: int, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """The (width, height) buckets for `resolution`: both sides multiples of `multiple`, each as large as fits in
    resolution^2 pixels (for every width w, the height is the largest multiple <= resolution^2 / w), and no side
    more than `max_aspect` times the other; sorted by aspect ratio. resolution 512, multiple 64, max_aspect 2:
    384x640, 448x576, 512x512, 576x448, 640x384 (kohya's rule, with its 64 px step). The square bucket
    (resolution x resolution) is always there when resolution is a multiple of `multiple`."""
    area, out = resolution * resolution, []
    for w in range(multiple, area // multiple + 1, multiple):
        h = area // w // multiple * multiple
        if h < multiple:
            break
        if max(w / h, h / w) <= max_aspect + 1e-9:
            out.append((w, h))
    if not out:
        raise UserError(f"no bucket of about {resolution}x{resolution} pixels has sides that are multiples of "
                        f"{multiple}: raise data.resolution")
    return sorted(out, key=lambda s: s[0] / s[1])


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> int:
    """The index of the bucket whose aspect ratio is closest to the image's (by |log ratio|; ties: the first)."""
    ratio = math.log(size[0] / size[1])
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - ratio))


# EXIF orientations that turn the image by 90 degrees (exif_transpose swaps width and height for these)
_ROTATED = {5, 6, 7, 8}


def _image_size(source: dict[str, Any]) -> tuple[int, int] | None:
    """(width, height) as `_decode` will see it (after the EXIF rotation), from the header only; None if unreadable."""
    fp = io.BytesIO(source["bytes"]) if source.get("bytes") is not None else source["path"]
    try:
        with Image.open(fp) as image:
            w, h = image.size
            return (h, w) if image.getexif().get(0x0112) in _ROTATED else (w, h)
    except _DECODE_ERRORS:
        return None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB with the pixel values the file means (PIL's `convert("RGB")` clips 16-bit values to 255, so a
    16-bit grayscale PNG becomes all white):
    - 16-bit integer modes (I;16, I;16B, ...) and "I" (32-bit integer, how some Pillow versions and TIFFs give
      16-bit data): read as 0..65535 and scaled to 0..255 (v / 257, rounded); values outside 0..65535 are refused;
    - "F" (32-bit float): read as 0..1 and scaled by 255; values outside [0, 1] (or NaN) are refused;
    - alpha (LA, PA, RGBA, premultiplied La / RGBa, and L / P / RGB with a transparency key) is composited onto
      white (ALPHA_BACKGROUND);
    - 1, L, P, CMYK, YCbCr, LAB, HSV and RGB: PIL's conversion.
    Refused images raise UnsupportedImageError (the dataset skips and counts them like unreadable files)."""
    mode = image.mode
    if mode == "I" or mode.startswith("I;16"):
        a = np.asarray(image).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise UnsupportedImageError(f"{mode} image with values {a.min()}..{a.max()}, outside the 16-bit range "
                                        "0..65535")
        gray = np.round(a / 257.0).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        a = np.asarray(image, dtype=np.float64)
        if a.size and not (np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0):
            raise UnsupportedImageError("float (F) image with values outside [0, 1]; save it as 8 or 16 bits")
        return Image.fromarray(np.round(a * 255.0).astype(np.uint8), mode="L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        if mode == "La":
            image = image.convert("LA")  # PIL converts premultiplied La only to its straight form
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as e:  # a mode PIL cannot turn into RGB
        raise UnsupportedImageError(f"image mode {mode} cannot be converted to RGB ({e})") from None


def _decode(source: dict[str, Any], draft: int | None = None) -> Image.Image:
    """Decode an undecoded `datasets.Image` value ({"bytes", "path"}) to RGB, fully, so errors surface here.
    `draft`: let a JPEG decode at a reduced scale, no smaller than draft x draft (PIL's `draft`; several times
    faster on photos, for the up-front check; a truncated or corrupt file fails all the same)."""
    fp = io.BytesIO(source["bytes"]) if source.get("bytes") is not None else source["path"]
    with Image.open(fp) as image:
        if draft:
            image.draft(None, (draft, draft))
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))


def _reason(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ---- the dataset ----


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Items are {"pixel_values": (3, R, R) float in [-1, 1], "caption": str, "index": int}, or None for an
    image that cannot be decoded (see the module docstring for how skipped images are counted).

    An item is asked for by row index, or by (row index, sample seed) as the training stream does
    (`ldm_app.training.common.batches`): the random crop and flip are then drawn from a generator seeded with that
    seed, so they are a function of the data position and a resumed run sees the same crops and flips. With
    buckets (`assign_buckets`) an item's pixel_values are (3, h, w) of its row's bucket."""

    takes_sample_seeds = True  # `batches` passes (index, seed) items

    def __init__(
        self,
        hf_dataset: datasets.Dataset,
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        caption_column: str = "text",
        image_column: str = "image",
    ):
        self.hf_dataset = hf_dataset  # image column cast to datasets.Image(decode=False)
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.caption_column = caption_column
        self.image_column = image_column
        self.captions: list[str] = list(hf_dataset[caption_column])
        self.buckets: list[tuple[int, int]] | None = None  # (width, height) of each bucket
        self.bucket_ids: list[int] | None = None  # each row's bucket
        self.skipped: set[int] = set()  # indices that failed to decode in this process
        self.first_error: str | None = None  # "name: reason" of the first of them

    def __len__(self) -> int:
        return len(self.hf_dataset)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def image_name(self, index: int) -> str:
        """The image's file path, or a description for an image stored as bytes (hub datasets)."""
        source = self.hf_dataset[index][self.image_column]
        return source.get("path") or f"row {index} (embedded bytes)"

    def load_image(self, index: int) -> Image.Image | None:
        """The decoded RGB image, or None (with a warning naming the file) if it cannot be read."""
        source = self.hf_dataset[index][self.image_column]
        try:
            return _decode(source)
        except _DECODE_ERRORS as e:
            if index not in self.skipped:  # warn once per file, not once per epoch
                reason = _reason(e)
                logger.warning("skipping unreadable image %s: %s", self.image_name(index), reason)
                if self.first_error is None:
                    self.first_error = f"{Path(self.image_name(index)).name}: {reason}"
            self.skipped.add(index)
            return None

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any] | None:
        index, seed = item if isinstance(item, tuple) else (item, None)
        image = self.load_image(index)
        if image is None:
            return None
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        size = None if self.bucket_ids is None else self.buckets[self.bucket_ids[index]]
        pixel_values = transform_image(image, self.resolution, self.center_crop, self.random_flip, generator, size)
        return {"pixel_values": pixel_values, "caption": self.captions[index], "index": index}

    def validate_images(self) -> list[int]:
        """Decode every image once; return the indices of the unreadable ones (each also warned and counted)."""
        return [i for i in range(len(self)) if self.load_image(i) is None]

    def readable(self, source: str) -> ImageCaptionDataset:
        """This dataset without its unreadable images: every image is decoded once (a JPEG at a reduced scale, see
        `_decode`) and the ones that fail are left out, with one warning line "skipped N unreadable images of M in
        SOURCE: first: PATH (REASON)". No readable image at all is a one-line UserError. Which rows are kept depends
        on the files only, so every process, and a resumed run, trains on the same rows in the same order."""
        from tqdm.auto import tqdm

        bad: list[tuple[int, str]] = []
        main_process = int(os.environ.get("RANK", "0")) == 0
        # a bar only for a slow check (delay) on a terminal (disable=None), on one process
        for i in tqdm(range(len(self)), desc="checking images", unit="img", leave=False, delay=2,
                      disable=None if main_process else True):
            try:
                _decode(self.hf_dataset[i][self.image_column], draft=self.resolution)
            except _DECODE_ERRORS as e:
                bad.append((i, _reason(e)))
        if not bad:
            return self
        first, reason = bad[0]
        if len(bad) == len(self):
            raise UserError(f"no readable image in {source}: {len(self)} of {len(self)} skipped "
                            f"(first: {Path(self.image_name(first)).name}: {reason})")
        logger.warning("skipped %d unreadable images of %d in %s: first: %s (%s)", len(bad), len(self), source,
                       self.image_name(first), reason)
        unreadable = {i for i, _ in bad}
        return self.select([i for i in range(len(self)) if i not in unreadable])

    def assign_buckets(self, multiple: int, max_aspect: float = 2.0) -> ImageCaptionDataset:
        """Aspect-ratio bucketing: every row goes to the bucket of `make_buckets(resolution, multiple, max_aspect)`
        with the closest aspect ratio (image sizes read from the file headers); its image is then resized to cover
        the bucket and cropped to it. An unreadable header gets the square-most bucket (the item will be None
        anyway). Returns self."""
        self.buckets = make_buckets(self.resolution, multiple, max_aspect)
        square = nearest_bucket((1, 1), self.buckets)
        sizes = [_image_size(source) for source in self.hf_dataset[self.image_column]]
        self.bucket_ids = [square if size is None else nearest_bucket(size, self.buckets) for size in sizes]
        return self

    def select(self, indices: Sequence[int]) -> ImageCaptionDataset:
        """A dataset over the given rows (e.g. the train part of `split_indices`), with the same transforms."""
        out = ImageCaptionDataset(
            self.hf_dataset.select(indices),
            self.resolution,
            self.center_crop,
            self.random_flip,
            self.caption_column,
            self.image_column,
        )
        if self.bucket_ids is not None:
            out.buckets, out.bucket_ids = self.buckets, [self.bucket_ids[i] for i in indices]
        return out


def collate_fn(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack the decodable items into a batch and count the dropped ones.

    Returns {"pixel_values": (B, 3, R, R), "captions": list[str], "indices": (B,) long, "num_skipped": int}.
    If every item was unreadable B is 0 and pixel_values is an empty tensor: skip that step.
    """
    kept = [item for item in items if item is not None]
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in kept]) if kept else torch.empty(0),
        "captions": [item["caption"] for item in kept],
        "indices": torch.tensor([item["index"] for item in kept], dtype=torch.long),
        "num_skipped": len(items) - len(kept),
    }


# ---- loading and up-front checks ----


def _image_files(folder: Path) -> list[str]:
    """The image files that `_load` gives `datasets` under `folder`, as absolute paths, sorted. Found with
    `datasets`' own pattern resolver and its imagefolder's extensions, so that the checks here see the files the
    loader sees (hidden files and folders left out alike), which `datasets` does not tell once it has loaded."""
    try:
        files = resolve_pattern(_ALL_FILES, base_path=Path(folder).expanduser().resolve().as_posix())
    except FileNotFoundError:  # it refuses a pattern that matches nothing
        return []
    return sorted(f for f in files if os.path.splitext(f)[1].lower() in ImageFolder.EXTENSIONS)


def _warn_unlisted(ds: datasets.Dataset, folder: Path, image_column: str) -> None:
    """One warning line for the images in `folder` that metadata.jsonl does not list: `datasets` makes a row of
    each line only, so they are not trained on (left out, not refused: a partial list can be on purpose)."""
    listed = {os.path.normpath(source["path"]) for source in ds[image_column] if source and source.get("path")}
    images = _image_files(folder)
    unlisted = [path for path in images if os.path.normpath(path) not in listed]
    if unlisted:
        base = Path(folder).expanduser().resolve()
        names = ", ".join(os.path.relpath(path, base) for path in unlisted[:3])
        names += ", ..." if len(unlisted) > 3 else ""
        logger.warning("%d of %d images in %s are not listed in %s and are left out (%s): add a line for each one "
                       "to train on it", len(unlisted), len(images), folder, METADATA_FILE, names)


def _check_folder(folder: Path, caption_column: str) -> bool:
    """Cheap checks of an imagefolder before anything is loaded: exists, not empty, images beside caption files, or
    every metadata line JSON with a file_name and the caption key.
    Returns True when the captions come from caption files beside the images (no metadata.jsonl)."""
    if not folder.is_dir():
        raise UserError(f"train_data_dir {folder} is not a folder: expected a folder of {_LAYOUT}")
    if not any(folder.iterdir()):
        raise UserError(f"train_data_dir {folder} is empty: expected {_LAYOUT}")
    metadata = folder / METADATA_FILE
    if not metadata.is_file():
        if next(folder.rglob(f"*{CAPTION_SUFFIX}"), None) is not None:
            if not _image_files(folder):  # else `datasets` says 'Instruction "train" corresponds to no data!'
                raise UserError(f"train_data_dir {folder} has caption files but no images: expected {_LAYOUT}")
            return True
        raise UserError(f"train_data_dir {folder} has no {METADATA_FILE} and no {CAPTION_SUFFIX} caption files: "
                        f"expected {_LAYOUT}")
    try:
        raw = metadata.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {metadata}: {e.strerror or e}") from None
    # A UTF-8 byte-order mark (Windows editors write one) is not part of the first line; pyarrow, which `datasets`
    # reads the lines with, skips it too.
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[bom: bom + e.start].count(b"\n") + 1
        raise UserError(f"{metadata} is not UTF-8 text (byte {bom + e.start}, line {line}): save it as UTF-8, "
                        f"{_LAYOUT}") from None
    records = _metadata_records(metadata, text)
    if not records:
        raise UserError(f"{metadata} is empty: expected one line per image, like {_LAYOUT}")
    for number, record in records:  # a line without one would be a row without an image
        if "file_name" not in record:
            raise UserError(f"{metadata} line {number} has no 'file_name' key (keys: {sorted(record)}): expected "
                            f"{_LAYOUT}")
    if not any(caption_column in record for _, record in records):
        raise UserError(
            f"{metadata} has no caption column {caption_column!r} (keys: {sorted(records[0][1])}): "
            "set caption_column to one of those keys or add the captions"
        )
    for number, record in records:  # some lines have the caption key: this one lacks it
        if caption_column not in record:
            raise UserError(f"{metadata} line {number}: image {record['file_name']} has no caption (no "
                            f"{caption_column!r} key, which other lines have): give every line one (an empty "
                            "string for an unconditional example)")
    return False


def _metadata_records(metadata: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    """(1-based line number, record) of each non-blank line of metadata.jsonl's text; a line that is not a JSON
    object is a `UserError` naming it. Parsed here although `datasets` parses the file again: pyarrow's error names
    a "row" counted from 0, without the blank lines and within its read block, not a line a user can find."""
    records = []
    for number, line in enumerate(text.split("\n"), 1):  # JSON lines end at "\n" only (splitlines() also
        if not line.strip():                             # splits at U+2028, which a JSON string may hold)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{metadata} line {number} is not JSON ({e.msg}, column {e.colno}): expected "
                            f"{_LAYOUT}") from None
        if not isinstance(record, dict):
            raise UserError(f"{metadata} line {number} is not a JSON object ({{...}}): expected {_LAYOUT}")
        records.append((number, record))
    return records


def _read_caption(path: Path) -> str:
    """A caption file's text, its lines joined by spaces (a UTF-8 byte-order mark is dropped)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"caption file {path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read caption file {path}: {e.strerror or e}") from None
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _add_sidecar_captions(ds: datasets.Dataset, folder: Path, caption_column: str,
                          image_column: str) -> datasets.Dataset:
    """The caption column from the caption file beside each image (0001.png -> 0001.txt); every image needs one."""
    sources = ds.cast_column(image_column, datasets.Image(decode=False))[image_column]
    paths = [Path(source["path"]) for source in sources]
    missing = [p for p in paths if not p.with_suffix(CAPTION_SUFFIX).is_file()]
    if missing:
        raise UserError(f"{len(missing)} of {len(paths)} images in {folder} have no caption file (first: "
                        f"{missing[0].relative_to(folder)} has no {missing[0].with_suffix(CAPTION_SUFFIX).name} "
                        f"beside it): give every image one, or write a {METADATA_FILE}")
    return ds.add_column(caption_column, [_read_caption(p.with_suffix(CAPTION_SUFFIX)) for p in paths])


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """`datasets` shows "Downloading data" and "Generating train split" bars (and info lines) for a local folder
    too, where nothing is downloaded: off while a local folder loads. Errors still raise; a user's own
    HF_DATASETS_DISABLE_PROGRESS_BARS setting is left alone."""
    bars = datasets.is_progress_bar_enabled() and "HF_DATASETS_DISABLE_PROGRESS_BARS" not in os.environ
    verbosity = datasets.logging.get_verbosity()
    if bars:
        datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _load(train_data_dir: str | None, dataset_name: str | None, cache_dir: str | None) -> datasets.Dataset:
    if (train_data_dir is None) == (dataset_name is None):
        raise UserError("give exactly one of train_data_dir (a local imagefolder) or dataset_name (a hub dataset)")
    try:
        if train_data_dir is not None:
            # Every file of the folder as the one split: with `data_dir` alone, `datasets` infers splits from
            # file and folder names, so "test_1.png", "val/" or "training_day1.png" became splits of their own
            # and were dropped (or the load failed with 'Unknown split "train"').
            with _quiet_datasets():
                return datasets.load_dataset("imagefolder", data_dir=train_data_dir,
                                             data_files={"train": _ALL_FILES}, split="train", cache_dir=cache_dir)
        return datasets.load_dataset(dataset_name, split="train", cache_dir=cache_dir)
    except (DatasetNotFoundError, ConnectionError) as e:
        raise UserError(
            f"could not get dataset {dataset_name!r} from the hub ({str(e).splitlines()[0]}): "
            "check the name and the network, or pass a local folder as train_data_dir"
        ) from None
    except (DatasetGenerationError, ValueError) as e:
        # ValueError covers malformed metadata (pyarrow.ArrowInvalid: bad JSON line; an unsafe file_name).
        cause = e.__cause__ or e
        raise UserError(f"could not read {train_data_dir or dataset_name}: {str(cause).splitlines()[0]}") from None


def _check_columns(ds: datasets.Dataset, source: str, caption_column: str, image_column: str) -> datasets.Dataset:
    """Check the loaded columns and rows, and stop `datasets` from decoding images (we decode in the Dataset)."""
    for kind, column in (("caption", caption_column), ("image", image_column)):
        if column not in ds.column_names:
            raise UserError(f"{source} has no {kind} column {column!r} (columns: {ds.column_names})")
    if len(ds) == 0:
        raise UserError(f"{source} has no rows: expected {_LAYOUT}")
    feature = ds.features[image_column]
    if not isinstance(feature, datasets.Image) and feature != datasets.Value("string"):
        raise UserError(f"{source}: column {image_column!r} holds {feature}, not images or image paths")
    return ds.cast_column(image_column, datasets.Image(decode=False))


def build_dataset(
    train_data_dir: str | None,
    dataset_name: str | None,
    resolution: int,
    center_crop: bool = True,
    random_flip: bool = False,
    caption_column: str = "text",
    image_column: str = "image",
    max_samples: int | None = None,
    cache_dir: str | None = None,
) -> ImageCaptionDataset:
    """Load a local imagefolder (`train_data_dir`) or a hub dataset (`dataset_name`, needs a network), check it,
    and wrap it with the training transforms. `max_samples` keeps the first rows only; `cache_dir` is where
    `datasets` writes its Arrow cache (default: its own)."""
    if resolution < 1:
        raise UserError(f"resolution must be a positive number of pixels, got {resolution}")
    if max_samples is not None and max_samples < 1:
        raise UserError(f"max_samples must be at least 1 (or unset for all), got {max_samples}")
    sidecars = train_data_dir is not None and _check_folder(Path(train_data_dir), caption_column)
    ds = _load(train_data_dir, dataset_name, cache_dir)
    if sidecars:
        if image_column not in ds.column_names:  # (a folder without images was refused by _check_folder)
            raise UserError(f"{train_data_dir} has no image column {image_column!r} (columns: {ds.column_names})")
        ds = _add_sidecar_captions(ds, Path(train_data_dir), caption_column, image_column)
    ds = _check_columns(ds, str(train_data_dir or dataset_name), caption_column, image_column)
    if train_data_dir is not None and not sidecars:
        _warn_unlisted(ds, Path(train_data_dir), image_column)
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    dataset = ImageCaptionDataset(ds, resolution, center_crop, random_flip, caption_column, image_column)
    bad = next((i for i, c in enumerate(dataset.captions) if not isinstance(c, str)), None)
    if bad is not None:
        raise UserError(f"image {dataset.image_name(bad)} has no caption in column {caption_column!r}")
    return dataset


def split_indices(n: int, holdout_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, held-out) split of range(n): round(n * holdout_fraction) random rows held out.

    Both lists are sorted; the same (n, fraction, seed) always gives the same split.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise UserError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_holdout = round(n * holdout_fraction)
    return sorted(order[n_holdout:].tolist()), sorted(order[:n_holdout].tolist())
