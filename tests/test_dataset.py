"""Loading image-caption folders: transforms, skipping unreadable images, and clear errors before training."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_app.data import shapes
from ldm_app.data.dataset import (
    build_dataset,
    collate_fn,
    crop_square,
    resize_shorter_side,
    split_indices,
    to_tensor,
    transform_image,
)
from ldm_app.errors import UserError

N = 8


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return shapes.make_dataset(tmp_path_factory.mktemp("data") / "shapes", N, 32, seed=0)


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf_cache")  # keep `datasets`' Arrow cache out of the user's home


def _captions(folder) -> list[str]:
    return [json.loads(line)["text"] for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_items_shape_range_and_captions(shapes_dir, cache):
    ds = build_dataset(str(shapes_dir), None, 16, cache_dir=cache)
    assert len(ds) == N and ds.captions == _captions(shapes_dir)
    item = ds[3]
    x = item["pixel_values"]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.max() - x.min() > 0.5  # uses the [-1, 1] range, not [0, 1]
    assert item["caption"] == ds.captions[3] and item["index"] == 3
    batch = collate_fn([ds[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["num_skipped"] == 0
    assert batch["captions"] == ds.captions[:4] and batch["indices"].tolist() == [0, 1, 2, 3]


def test_max_samples_and_select(shapes_dir, cache):
    ds = build_dataset(str(shapes_dir), None, 32, max_samples=3, cache_dir=cache)
    assert len(ds) == 3 and ds.captions == _captions(shapes_dir)[:3]
    sub = ds.select([2, 0])
    assert sub.captions == [ds.captions[2], ds.captions[0]]
    assert torch.equal(sub[0]["pixel_values"], ds[2]["pixel_values"])


def test_values_match_the_file_and_flip_is_off_by_default(shapes_dir, cache):
    ds = build_dataset(str(shapes_dir), None, 32, cache_dir=cache)  # native size: no resize, no crop
    files = [to_tensor(Image.open(shapes_dir / f"{i:06d}.png").convert("RGB")) for i in range(N)]
    # Pick an image that is not mirror-symmetric, so that a flip would show.
    i = next(i for i, x in enumerate(files) if not torch.equal(x, x.flip(-1)))
    expected = files[i]
    torch.manual_seed(0)
    assert all(torch.equal(ds[i]["pixel_values"], expected) for _ in range(20))
    flipping = build_dataset(str(shapes_dir), None, 32, random_flip=True, cache_dir=cache)
    seen = {torch.equal(flipping[i]["pixel_values"], expected) for _ in range(20)}
    assert seen == {True, False}  # both orientations occur
    assert any(torch.equal(flipping[i]["pixel_values"], expected.flip(-1)) for _ in range(20))


def test_resize_and_crops():
    # 40x20 image: left half red, right half blue; shorter side -> 16 gives 32x16.
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    assert resize_shorter_side(image, 16).size == (32, 16)
    assert resize_shorter_side(Image.new("RGB", (20, 50)), 16).size == (16, 40)
    x = transform_image(image, 16, center_crop=True, random_flip=False)
    assert x.shape == (3, 16, 16)
    # The centre crop straddles the red/blue boundary: left columns red, right columns blue.
    assert x[0, :, 0].min() > 0.9 and x[2, :, 0].max() < -0.9
    assert x[2, :, -1].min() > 0.9 and x[0, :, -1].max() < -0.9
    # Random crops of a horizontal gradient land at different offsets; each is a contiguous 16-wide window.
    gradient = Image.fromarray(np.tile(np.arange(48, dtype=np.uint8) * 5, (16, 1))).convert("RGB")
    torch.manual_seed(0)
    lefts = {np.asarray(crop_square(gradient, 16, center=False))[0, 0, 0] // 5 for _ in range(30)}
    assert len(lefts) > 5 and min(lefts) >= 0 and max(lefts) <= 32
    assert np.asarray(crop_square(gradient, 16, center=True))[0, 0, 0] // 5 == 16


def test_corrupt_images_are_skipped_with_a_warning_and_counted(shapes_dir, tmp_path, cache, caplog):
    folder = tmp_path / "broken"
    shutil.copytree(shapes_dir, folder)
    (folder / "000001.png").write_bytes(b"not an image")
    good = (folder / "000004.png").read_bytes()
    (folder / "000004.png").write_bytes(good[: len(good) // 2])  # truncated mid-stream
    (folder / "000006.png").unlink()  # listed in metadata.jsonl but missing
    ds = build_dataset(str(folder), None, 16, cache_dir=cache)  # loading does not decode: no error yet
    with caplog.at_level(logging.WARNING, logger="ldm_app.data.dataset"):
        items = [ds[i] for i in range(N)]
    assert [i for i, item in enumerate(items) if item is None] == [1, 4, 6]
    for name in ("000001.png", "000004.png", "000006.png"):
        assert sum(name in r.getMessage() for r in caplog.records) == 1
    assert ds.num_skipped == 3
    batch = collate_fn(items)
    assert batch["num_skipped"] == 3 and batch["pixel_values"].shape == (N - 3, 3, 16, 16)
    assert batch["indices"].tolist() == [0, 2, 3, 5, 7]
    assert collate_fn([None, None])["captions"] == []  # an all-bad batch is empty, not a crash
    # A second pass does not warn again, and validate_images finds the same files.
    caplog.clear()
    assert ds.validate_images() == [1, 4, 6] and not caplog.records and ds.num_skipped == 3


def test_skip_count_survives_dataloader_workers(shapes_dir, tmp_path, cache):
    folder = tmp_path / "broken"
    shutil.copytree(shapes_dir, folder)
    (folder / "000002.png").write_bytes(b"\x89PNG garbage")
    ds = build_dataset(str(folder), None, 16, cache_dir=cache)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_fn)
    batches = list(loader)
    assert sum(b["num_skipped"] for b in batches) == 1
    assert sum(len(b["captions"]) for b in batches) == N - 1


def _one_line_error(*args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        build_dataset(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_folder_errors_are_one_line_user_errors(shapes_dir, tmp_path, cache):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "is empty" in _one_line_error(str(empty), None, 16, cache_dir=cache)
    assert "is not a folder" in _one_line_error(str(tmp_path / "nope"), None, 16, cache_dir=cache)

    no_meta = tmp_path / "no_meta"
    no_meta.mkdir()
    shutil.copy(shapes_dir / "000000.png", no_meta)
    assert "has no metadata.jsonl" in _one_line_error(str(no_meta), None, 16, cache_dir=cache)

    message = _one_line_error(str(shapes_dir), None, 16, caption_column="caption", cache_dir=cache)
    assert "no caption column 'caption'" in message and "text" in message

    bad_json = tmp_path / "bad_json"
    shutil.copytree(shapes_dir, bad_json)
    with (bad_json / "metadata.jsonl").open("a") as f:
        f.write("{not json\n")
    assert "metadata.jsonl line 9 is not JSON" in _one_line_error(str(bad_json), None, 16, cache_dir=cache)

    no_caption = tmp_path / "no_caption"
    shutil.copytree(shapes_dir, no_caption)
    lines = (no_caption / "metadata.jsonl").read_text().splitlines()
    lines[2] = json.dumps({"file_name": "000002.png"})
    (no_caption / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    assert "000002.png has no caption" in _one_line_error(str(no_caption), None, 16, cache_dir=cache)

    assert "exactly one of" in _one_line_error(None, None, 16, cache_dir=cache)
    assert "exactly one of" in _one_line_error(str(shapes_dir), "user/data", 16, cache_dir=cache)


def _write_images(folder, names, sidecars):
    """A small PNG for each relative name, captioned "caption of NAME" by a .txt beside it or, with
    sidecars=False, by one metadata.jsonl line each."""
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (200, 40, 40)).save(folder / name)
        if sidecars:
            (folder / name).with_suffix(".txt").write_text(f"caption of {name}\n")
    if not sidecars:
        (folder / "metadata.jsonl").write_text(
            "".join(json.dumps({"file_name": name, "text": f"caption of {name}"}) + "\n" for name in names))
    return folder


def _rows(ds, folder) -> dict[str, str]:
    """{image path relative to the folder: caption} of a built dataset."""
    return {os.path.relpath(ds.image_name(i), folder).replace(os.sep, "/"): ds.captions[i] for i in range(len(ds))}


SPLIT_LIKE_NAMES = {
    "words at the start": ["training_day1.png", "beach.png", "test_shot.png", "val_x.png", "photo2.png"],
    "no train-like name": ["img1.png", "test_1.png", "val_2.png"],
    "a val sub-folder": ["photos/a.png", "val/b.png"],
    "train and test sub-folders": ["train/a.png", "test/b.png", "validation/c.png", "dev/d.png"],
}


@pytest.mark.parametrize("sidecars", [True, False], ids=["sidecars", "metadata"])
@pytest.mark.parametrize("names", SPLIT_LIKE_NAMES.values(), ids=SPLIT_LIKE_NAMES.keys())
def test_names_that_look_like_split_names_are_ordinary_images(tmp_path, cache, names, sidecars):
    # `datasets` reads "test_..." / "val/" / "train/" as split names when it is left to infer splits: every image
    # must be a row, with its own caption, whatever its file or folder is called.
    folder = _write_images(tmp_path / "data", names, sidecars)
    ds = build_dataset(str(folder), None, 8, cache_dir=cache)
    assert _rows(ds, folder) == {name: f"caption of {name}" for name in names}


def test_metadata_with_a_byte_order_mark_is_read(shapes_dir, tmp_path, cache):
    # Windows editors save UTF-8 with a byte-order mark: the file is accepted, and the mark is not read as part of
    # the first line's first key (which would leave the first image without its file_name).
    folder = tmp_path / "bom"
    shutil.copytree(shapes_dir, folder)
    metadata = folder / "metadata.jsonl"
    metadata.write_bytes(b"\xef\xbb\xbf" + metadata.read_bytes())
    ds = build_dataset(str(folder), None, 16, cache_dir=cache)
    assert ds.captions == _captions(shapes_dir)
    assert sorted(ds.hf_dataset.column_names) == ["image", "text"]
    assert [os.path.basename(ds.image_name(i)) for i in range(N)] == [f"{i:06d}.png" for i in range(N)]
    # A byte that is not UTF-8 after the mark is still reported at its place in the file (line 2).
    lines = (shapes_dir / "metadata.jsonl").read_bytes().split(b"\n")
    metadata.write_bytes(b"\xef\xbb\xbf" + lines[0] + b"\n" + b"\xff" + lines[1])
    message = _one_line_error(str(folder), None, 16, cache_dir=cache)
    assert f"byte {3 + len(lines[0]) + 1}, line 2" in message


@pytest.mark.parametrize("bad", ['{"file_name": "000003.png", "text": "unclosed', '["000003.png", "a caption"]'])
def test_a_bad_metadata_line_is_named_by_its_line_number(shapes_dir, tmp_path, cache, bad):
    # Line 5 of the file (1-based, counting a blank line before it) is the bad one: the message says line 5, not
    # a row number counted from 0 or without blank lines.
    folder = tmp_path / "bad_line"
    shutil.copytree(shapes_dir, folder)
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    lines[2:4] = [lines[2], "", bad]  # line 3, a blank line 4, and the bad line 5 in place of 000003.png's
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    message = _one_line_error(str(folder), None, 16, cache_dir=cache)
    assert "metadata.jsonl line 5 is not" in message
    assert "row" not in message and "line 4" not in message


@pytest.mark.parametrize("line", [1, 4])
def test_a_line_without_a_caption_or_file_name_is_named(shapes_dir, tmp_path, cache, line):
    # One line without the caption key, the first or another: the message names that line and its image (not "no
    # caption column", which is for a file where no line has the key).
    folder = tmp_path / "one_missing"
    shutil.copytree(shapes_dir, folder)
    metadata = folder / "metadata.jsonl"
    lines = metadata.read_text().splitlines()
    name = f"{line - 1:06d}.png"
    lines[line - 1] = json.dumps({"file_name": name})
    metadata.write_text("\n".join(lines) + "\n")
    message = _one_line_error(str(folder), None, 16, cache_dir=cache)
    assert f"line {line}: image {name} has no caption" in message and "caption column" not in message
    # A line without a file_name (an image-less row, which crashed when images were checked): named too.
    lines[line - 1] = json.dumps({"text": "a caption"})
    metadata.write_text("\n".join(lines) + "\n")
    assert f"line {line} has no 'file_name' key" in _one_line_error(str(folder), None, 16, cache_dir=cache)


def test_caption_files_without_images_say_so(shapes_dir, tmp_path, cache):
    # Only .txt files (an image in a hidden folder does not count: `datasets` does not read it either): the
    # message says there are no images, not `datasets`' 'Instruction "train" corresponds to no data!'.
    folder = tmp_path / "only_txt"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("a caption\n")
    (folder / "sub" / "b.txt").write_text("another caption\n")
    (folder / ".thumbnails").mkdir()
    shutil.copy(shapes_dir / "000000.png", folder / ".thumbnails" / "a.png")
    message = _one_line_error(str(folder), None, 16, cache_dir=cache)
    assert "has caption files but no images" in message and "Instruction" not in message
    # With images, an image column the folder does not have is named as such (it was "no images" too).
    _write_images(folder, ["c.png"], sidecars=True)
    assert "no image column 'photo'" in _one_line_error(str(folder), None, 16, image_column="photo", cache_dir=cache)


def test_images_missing_from_metadata_are_warned_about(shapes_dir, tmp_path, cache, caplog):
    # 8 images plus one in a sub-folder, 4 listed: the 4 listed are the rows, and one warning line counts the 5
    # left out and names the first of them.
    folder = tmp_path / "partial"
    shutil.copytree(shapes_dir, folder)
    metadata = folder / "metadata.jsonl"
    metadata.write_text("\n".join(metadata.read_text().splitlines()[:4]) + "\n")
    (folder / "extra").mkdir()
    shutil.copy(shapes_dir / "000000.png", folder / "extra" / "more.png")
    with caplog.at_level(logging.WARNING, logger="ldm_app.data.dataset"):
        ds = build_dataset(str(folder), None, 16, cache_dir=cache)
    assert len(ds) == 4
    [record] = caplog.records
    message = record.getMessage()
    assert record.levelno == logging.WARNING and "\n" not in message
    assert "5 of 9 images" in message and "not listed in metadata.jsonl" in message
    assert "000004.png, 000005.png, 000006.png, ..." in message
    # Every image listed (the shapes folder itself): no warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm_app.data.dataset"):
        build_dataset(str(shapes_dir), None, 16, cache_dir=cache)
    assert not caplog.records


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="would try the network")
def test_unreachable_hub_dataset_is_a_user_error(cache):
    assert "from the hub" in _one_line_error(None, "someone/no-such-dataset", 16, cache_dir=cache)


def test_split_indices_is_a_deterministic_partition():
    train, held = split_indices(100, 0.2, seed=0)
    assert len(held) == 20 and sorted(train + held) == list(range(100))
    assert (train, held) == split_indices(100, 0.2, seed=0)
    assert held != split_indices(100, 0.2, seed=1)[1]
    assert split_indices(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])
    with pytest.raises(UserError, match="holdout_fraction"):
        split_indices(10, 1.0, seed=0)
