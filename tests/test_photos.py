"""python -m ldm_app.data.photos: captioned views of scikit-image's bundled photos. Deterministic for a seed, crops
inside their photo and where their caption says, both caption formats read back by the trainers' loader, foreign
folders never replaced, a missing scikit-image is one line, and the tiny VAE + LDM configs train on the output."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("skimage", reason="the photos extra: pip install 'ldm_app[photos]'")

from ldm_app.data import photos  # noqa: E402
from ldm_app.data.dataset import build_dataset  # noqa: E402
from ldm_app.errors import UserError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALL_CAPTIONS = {photos.caption(s, v) for s in photos.SOURCES for v in photos.VIEWS}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def views(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("photos") / "views"
    photos.make_dataset(out, num_images=24, resolution=32, seed=3)
    return out


def _metadata(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / photos.METADATA_FILE).read_text().splitlines()]


def test_deterministic_for_a_seed_and_view_i_independent_of_the_count(views, tmp_path):
    again = photos.make_dataset(tmp_path / "again", num_images=24, resolution=32, seed=3)
    assert _files(again) == _files(views)
    fewer = photos.make_dataset(tmp_path / "fewer", num_images=5, resolution=32, seed=3)
    assert all((fewer / f"{i:06d}.png").read_bytes() == (views / f"{i:06d}.png").read_bytes() for i in range(5))
    other = photos.make_dataset(tmp_path / "other", num_images=24, resolution=32, seed=4)
    assert _files(other) != _files(views)


def test_metadata_is_imagefolder_and_the_loader_reads_the_captions(views):
    rows = _metadata(views)
    assert [r["file_name"] for r in rows] == [f"{i:06d}.png" for i in range(24)]
    assert {r["text"] for r in rows} <= ALL_CAPTIONS
    for r in rows:
        assert Image.open(views / r["file_name"]).size == (32, 32)
    dataset = build_dataset(str(views), None, resolution=32)
    assert dataset.captions == [r["text"] for r in rows]
    manifest = json.loads((views / photos.MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {p.name for p in views.iterdir()} - {photos.MANIFEST_FILE}


def test_sidecars_hold_the_same_captions_and_the_loader_reads_them(views, tmp_path):
    out = photos.make_dataset(tmp_path / "sidecars", num_images=24, resolution=32, seed=3, sidecars=True)
    assert not (out / photos.METADATA_FILE).exists()  # else the loader would read it and ignore the .txt files
    rows = _metadata(views)
    for r in rows:
        stem = r["file_name"][:-4]
        assert (out / f"{stem}.txt").read_text() == r["text"] + "\n"
        assert (out / r["file_name"]).read_bytes() == (views / r["file_name"]).read_bytes()
    assert build_dataset(str(out), None, resolution=32).captions == [r["text"] for r in rows]


def test_crops_are_square_inside_their_photo_and_where_the_caption_says():
    seen = set()
    for i in range(1500):
        v = photos.sample_view(np.random.default_rng([0, i]), photos._photo_size)
        w, h = photos._photo_size(v.source.name)
        left, top, right, bottom = v.box
        assert 0 <= left < right <= w and 0 <= top < bottom <= h, (v, w, h)
        assert right - left == bottom - top >= 64  # never upsampled at the recipe's 64 px
        centre = (left + right) / 2
        if v.view == "left part":
            assert centre <= w * (0.5 - photos._PART_MARGIN) + 0.5
        elif v.view == "right part":
            assert centre >= w * (0.5 + photos._PART_MARGIN) - 0.5
        elif v.view == "close-up" and v.source.roi is not None:
            rl, rt, rr, rb = v.source.roi if not v.flip else photos._mirror(v.source.roi, w)
            assert rl <= left and right <= rr and rt <= top and bottom <= rb
        seen.add((v.source.name, v.view, v.flip))
    assert len(seen) == len(photos.SOURCES) * len(photos.VIEWS) * 2  # every source, view and flip is drawn


def test_saved_pixels_are_the_box_of_the_mirrored_photo(views):
    """Recomputed with numpy from the original photo (mirrored coordinates mapped back): 4x4 block means of the
    saved image match those of the crop, so "left part" is the left of the image as saved."""
    for i in range(24):
        v = photos.sample_view(np.random.default_rng([3, i]), photos._photo_size)
        pixels = np.asarray(photos.load_source(v.source.name), dtype=np.float64)
        w = pixels.shape[1]
        left, top, right, bottom = v.box if not v.flip else photos._mirror(v.box, w)
        crop = pixels[top:bottom, left:right]
        if v.flip:
            crop = crop[:, ::-1]
        side = crop.shape[0]
        edges = np.linspace(0, side, 5).round().astype(int)
        expected = np.array([[crop[a:b, c:d].mean(axis=(0, 1)) for c, d in zip(edges, edges[1:])]
                             for a, b in zip(edges, edges[1:])])
        saved = np.asarray(Image.open(views / f"{i:06d}.png"), dtype=np.float64)
        got = saved.reshape(4, 8, 4, 8, 3).mean(axis=(1, 3))
        assert np.abs(got - expected).max() < 12, (i, v)


def test_refuses_a_folder_it_did_not_write_and_replaces_its_own(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="refusing to replace it") as e:
        photos.make_dataset(foreign, num_images=2, resolution=32, seed=0)
    assert "\n" not in str(e.value)
    assert (foreign / "notes.txt").read_text() == "keep me" and len(list(foreign.iterdir())) == 1

    own = photos.make_dataset(tmp_path / "own", num_images=2, resolution=32, seed=0)
    photos.make_dataset(own, num_images=3, resolution=32, seed=1)  # its own output: replaced
    assert len(_metadata(own)) == 3
    (own / "000000.png").write_bytes(b"changed")
    with pytest.raises(UserError, match="changed since the generator wrote it"):
        photos.make_dataset(own, num_images=2, resolution=32, seed=0)

    from ldm_app.data.shapes import make_dataset as make_shapes  # another generator's output is not ours
    shapes = make_shapes(tmp_path / "shapes", num_images=2, resolution=32, seed=0)
    with pytest.raises(UserError, match="not written by this generator"):
        photos.make_dataset(shapes, num_images=2, resolution=32, seed=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_images": 0}, "--num_images must be at least 1"),
    ({"resolution": 8}, "--resolution must be at least 16"),
    ({"seed": -1}, "--seed must be a non-negative integer"),
])
def test_bad_arguments_are_one_line(tmp_path, kwargs, message):
    args = {"num_images": 2, "resolution": 32, "seed": 0, **kwargs}
    with pytest.raises(UserError, match=message):
        photos.make_dataset(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_without_scikit_image_one_line_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "skimage", None)  # import skimage.data -> ImportError
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    from ldm_app.errors import run_cli

    code = run_cli(photos.main, ["--out", str(tmp_path / "out"), "--num_images", "2"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.count("\n") == 0 and "pip install 'ldm_app[photos]'" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("fresh_accelerate")
def test_tiny_vae_and_ldm_train_on_the_views(tmp_path):
    """The pipeline end to end at the smallest size: views -> train_vae.py (tiny, f=4) -> held-out scores ->
    train_ldm.py (tiny, on that autoencoder) -> a model folder that generates an image for a photo caption."""
    import torch

    from ldm_app.pipeline import LatentDiffusionPipeline
    from ldm_app.training import ldm as train_ldm
    from ldm_app.training import vae as train_vae

    data = photos.make_dataset(tmp_path / "data", num_images=16, resolution=32, seed=0, sidecars=True)
    vae = train_vae.main(["--config", str(ROOT / "configs/vae/tiny.yaml"), "--train_data_dir", str(data),
                          "--output_dir", str(tmp_path / "vae"), "--max_train_steps", "4",
                          "--report_to", "none"])
    assert vae.step == 4 and vae.metrics["num_images"] == 4 and np.isfinite(vae.metrics["psnr"])
    ldm = train_ldm.main(["--config", str(ROOT / "configs/ldm/tiny.yaml"), "--train_data_dir", str(data),
                          "--pretrained_vae", str(vae.model_dir), "--output_dir", str(tmp_path / "ldm"),
                          "--max_train_steps", "4", "--report_to", "none"])
    assert ldm.step == 4 and all(np.isfinite(ldm.losses))
    pipe = LatentDiffusionPipeline.from_pretrained(str(tmp_path / "ldm"))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a cat's face, close-up", num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
