"""The shapes generator: captions must describe the pixels, output must be deterministic, the CLI must write a
folder that `datasets` loads."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import datasets
import numpy as np
import pytest

from ldm_app.data import shapes
from ldm_app.data.dataset import build_dataset
from ldm_app.errors import UserError, run_cli

R = 64  # measurement resolution: one pixel is 1.6% of the side, below the 1% + rounding margins used below
PIXEL = 1.5 / R  # tolerance for a bbox edge measured at 50% coverage


def _parse(caption: str) -> dict:
    """Parse a caption with the exported vocabulary (as evaluation will)."""
    obj = rf"a ({'|'.join(shapes.SIZES)}) ({'|'.join(shapes.COLOURS)}) ({'|'.join(shapes.SHAPES)})"
    bg = rf"on a ({'|'.join(shapes.BACKGROUNDS)}) background"
    where = "|".join(shapes.POSITIONS.values())
    if m := re.fullmatch(rf"{obj} ({where}) {bg}", caption):
        size, colour, shape, where_words, background = m.groups()
        position = {v: k for k, v in shapes.POSITIONS.items()}[where_words]
        return {"objects": [(size, colour, shape)], "position": position, "background": background}
    m = re.fullmatch(rf"{obj} ({'|'.join(shapes.RELATIONS)}) {obj} {bg}", caption)
    assert m, f"caption does not match either template: {caption!r}"
    g = m.groups()
    return {"objects": [g[0:3], g[4:7]], "relation": g[3], "background": g[7]}


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean (H, W) mask, as boolean masks (a tiny BFS: scipy is not a dependency)."""
    seen = np.zeros_like(mask)
    parts = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        part = np.zeros_like(mask)
        queue = deque([start])
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            part[y, x] = True
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        parts.append(part)
    return parts


def _measure(pixels: np.ndarray, bg: np.ndarray, part: np.ndarray) -> dict:
    """Colour, shape, bbox centre and width of one object from its pixels."""
    # Interior pixels (the pixel and its 4 neighbours in the object) are fully covered: no anti-aliasing blend.
    inner = part.copy()
    inner[1:-1, 1:-1] &= part[:-2, 1:-1] & part[2:, 1:-1] & part[1:-1, :-2] & part[1:-1, 2:]
    colour = pixels[inner].mean(axis=0)
    # Coverage of each pixel by this object: projection of (pixel - bg) onto (colour - bg); bbox at 50% coverage.
    d = colour - bg
    alpha = ((pixels - bg) @ d) / (d @ d)
    alpha = np.where(_dilate(part), np.clip(alpha, 0, 1), 0)  # (R, R), this object only
    ys, xs = np.nonzero(alpha > 0.5)
    # Sub-pixel extents: a column's largest coverage is the fraction of it the object spans.
    width, height = alpha.max(axis=0).sum(), alpha.max(axis=1).sum()
    return {
        "colour": colour,
        "width": width / R,
        "center": ((xs.min() + xs.max() + 1) / 2 / R, (ys.min() + ys.max() + 1) / 2 / R),
        "fill": alpha.sum() / (width * height),
        # How a row's covered width grows downwards (pixels per row): 1 for an up-pointing triangle (apex at the
        # top, base at the bottom), 0 for a square or circle (symmetric), -1 for a down-pointing triangle.
        "slope": np.polyfit(rows := np.nonzero(alpha.sum(axis=1))[0], alpha.sum(axis=1)[rows], 1)[0],
    }


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _check_object(m: dict, size: str, colour: str, shape: str) -> None:
    palette = np.array(shapes.COLOURS[colour])
    assert np.all(np.abs(m["colour"] - palette) <= shapes.COLOUR_JITTER + 1), (m["colour"], colour)
    nearest = min(shapes.COLOURS, key=lambda c: np.abs(np.array(shapes.COLOURS[c]) - m["colour"]).sum())
    assert nearest == colour
    lo, hi = shapes.SIZES[size]
    assert lo - PIXEL <= m["width"] <= hi + PIXEL, (m["width"], size)
    # Fraction of the bbox covered: square 1, circle pi/4, up-pointing triangle 1/2.
    expected_fill = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[shape]
    assert abs(m["fill"] - expected_fill) < 0.08, (m["fill"], shape)
    # Anti-aliased partial rows at the top and bottom blur the slope to about +-0.25 (measured over 400 scenes).
    assert (m["slope"] > 0.5) if shape == "triangle" else (abs(m["slope"]) < 0.35), (m["slope"], shape)


def _check_position(center: tuple[float, float], position: str) -> None:
    x, y = center
    third = 1 / 3
    if position == "center":
        assert third < x < 2 * third and third < y < 2 * third
        return
    along, across = (x, y) if position in ("left", "right") else (y, x)
    assert abs(across - 0.5) <= 1 / R, (center, position)  # the other coordinate is at the middle
    assert (along < third) if position in ("left", "top") else (along > 2 * third), (center, position)


def test_captions_match_pixels():
    kinds = {"single": 0, "two": 0}
    for i in range(40):
        scene = shapes.sample_scene(np.random.default_rng(1000 + i), R, two_object_fraction=0.4)
        image = shapes.render_scene(scene, R)
        assert image.size == (R, R) and image.mode == "RGB"
        parsed = _parse(scene.caption)
        pixels = np.asarray(image, dtype=np.float64)  # (R, R, 3)
        bg = np.array(shapes.BACKGROUNDS[parsed["background"]], dtype=np.float64)
        # Objects stay inside: the outermost ring of pixels is untouched background.
        ring = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        assert np.all(ring == bg)
        mask = np.abs(pixels - bg).max(axis=-1) > 30
        parts = _components(mask)
        assert len(parts) == len(parsed["objects"]), scene.caption  # two objects never touch or overlap
        measured = [_measure(pixels, bg, part) for part in parts]
        # Match components to caption objects by colour (the two colours differ).
        by_colour = {
            min(shapes.COLOURS, key=lambda c: np.abs(np.array(shapes.COLOURS[c]) - m["colour"]).sum()): m
            for m in measured
        }
        for size, colour, shape in parsed["objects"]:
            _check_object(by_colour[colour], size, colour, shape)
        if "relation" in parsed:
            kinds["two"] += 1
            assert {o[0] for o in parsed["objects"]} == {"small"}
            (x1, y1), (x2, y2) = (by_colour[o[1]]["center"] for o in parsed["objects"])
            dx, dy = x1 - x2, y1 - y2  # first minus second; y grows downwards
            expected = {"above": dy < 0, "below": dy > 0, "to the left of": dx < 0, "to the right of": dx > 0}
            vertical = parsed["relation"] in ("above", "below")
            assert expected[parsed["relation"]] and (abs(dy) > abs(dx)) == vertical, scene.caption
        else:
            kinds["single"] += 1
            _check_position(measured[0]["center"], parsed["position"])
    assert kinds["single"] >= 10 and kinds["two"] >= 10, kinds


def test_vocabulary_is_fixed():
    # Evaluation depends on these exact names and values: changing them must be a deliberate, visible edit.
    assert shapes.BACKGROUNDS == {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
    assert shapes.SHAPES == ("circle", "square", "triangle")
    assert shapes.COLOURS["orange"] == (240, 130, 30) and len(shapes.COLOURS) == 6
    assert shapes.SIZES == {"small": (0.20, 0.30), "large": (0.45, 0.60)}
    assert set(shapes.POSITIONS) == {"left", "right", "top", "bottom", "center"}
    assert shapes.RELATIONS == ("above", "below", "to the left of", "to the right of")


@pytest.mark.parametrize("resolution", [16, 17])
def test_small_resolutions_keep_objects_inside(resolution):
    for i in range(30):
        scene = shapes.sample_scene(np.random.default_rng(i), resolution, two_object_fraction=0.3)
        pixels = np.asarray(shapes.render_scene(scene, resolution))
        ring = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        assert np.all(ring == shapes.BACKGROUNDS[scene.background]), scene.caption


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_deterministic_for_a_seed(tmp_path):
    a = _files(shapes.make_dataset(tmp_path / "a", 6, 32, seed=3))
    b = _files(shapes.make_dataset(tmp_path / "b", 6, 32, seed=3))
    c = _files(shapes.make_dataset(tmp_path / "c", 6, 32, seed=4))
    assert a == b
    assert set(a) == set(c) and a != c
    assert sum(a[k] != c[k] for k in a) >= 5  # nearly every image differs, not just one


def test_cli_writes_imagefolder_that_datasets_loads(tmp_path):
    out = tmp_path / "shapes"
    assert run_cli(shapes.main, ["--out", str(out), "--num_images", "5", "--resolution", "24", "--seed", "0"]) == 0
    images = [f"{i:06d}.png" for i in range(5)]
    assert sorted(p.name for p in out.iterdir()) == images + ["metadata.jsonl", shapes.MANIFEST_FILE]
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [set(r) for r in records] == [{"file_name", "text"}] * 5
    # The manifest is not read as data: exactly the five images with their captions load.
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 5 and ds.column_names == ["image", "text"]
    assert ds["text"][:] == [r["text"] for r in records]
    assert [Path(img.filename).name for img in ds["image"]] == images
    assert ds[0]["image"].size == (24, 24)
    # ... and so does the training code's loader.
    train = build_dataset(str(out), None, resolution=24, cache_dir=str(tmp_path / "cache"))
    assert len(train) == 5 and list(train.captions) == [r["text"] for r in records]
    # No temporary folders left next to the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "shapes"]


def test_module_entry_point(tmp_path):
    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "ldm_app.data.shapes", "--out", str(out), "--num_images", "2", "--resolution", "16"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    assert (out / "metadata.jsonl").is_file()
    bad = subprocess.run(cmd[:-1] + ["8"], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --resolution must be at least 16 pixels, got 8"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_images": 0}, "--num_images must be at least 1"),
        ({"resolution": 15}, "--resolution must be at least 16"),
        ({"seed": -1}, "--seed must be a non-negative"),
        ({"two_object_fraction": 1.5}, "--two_object_fraction must be between 0 and 1"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    args = {"out": tmp_path / "x", "num_images": 2, "resolution": 16, "seed": 0, **kwargs}
    with pytest.raises(UserError, match=re.escape(message)):
        shapes.make_dataset(**args)
    assert not (tmp_path / "x").exists()


def test_refuses_to_replace_a_foreign_folder_but_replaces_a_dataset(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not written by this generator"):
        shapes.make_dataset(foreign, 2, 16, seed=0)
    assert (foreign / "notes.txt").read_text() == "keep me"
    out = shapes.make_dataset(tmp_path / "ds", 3, 16, seed=0)
    shapes.make_dataset(out, 2, 16, seed=1)
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "metadata.jsonl", shapes.MANIFEST_FILE]


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_a_killed_generator_leaves_no_temporary_folder(tmp_path, sig, code, word):
    """SIGTERM (kill, timeout, a job scheduler) cleans up as Ctrl-C does: --out untouched, nothing hidden left."""
    out = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-m", "ldm_app.data.shapes", "--out", str(out), "--num_images",
                             "200000", "--resolution", "32"], cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            # as from a terminal: a test run started in the background (`nohup ... &`) passes SIGINT on
                            # ignored, and the generator rightly keeps a SIGINT it was started ignoring ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.time() + 120
    while not any(p.name.startswith(".data.tmp-") for p in tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # well inside the rendering
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code and err.strip().splitlines()[-1] == word, err[-500:]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_that_numpy_swallowed_is_raised_again_by_the_next_image(tmp_path, sig, code):
    """numpy's array coercion can clear the exception a signal handler raises (1 SIGTERM in ~25 in the test above
    ran the generator to its end): the stop is recorded, and the writer raises it again before the next file."""
    from ldm_helpers import swallowed_stop

    from ldm_app import errors
    from ldm_app.data.generated import Writer

    def main(argv):
        writer = Writer(tmp_path)
        writer.write("before.png", b"x")  # no stop yet: written
        swallowed_stop(sig)  # the handler run_cli installed, as if the signal came now, its exception swallowed
        writer.write("after.png", b"x")
        raise AssertionError("the generator went on after the stop")

    assert errors.run_cli(main) == code
    assert sorted(p.name for p in tmp_path.iterdir()) == ["before.png"]
    assert errors.run_cli(lambda argv: Writer(tmp_path).write("next.png", b"x")) == 0  # a new run starts unstopped
