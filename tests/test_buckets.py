"""Random crop / flip drawn from the data position (exact resume), and aspect-ratio bucketing: bucket shapes,
assignment by aspect ratio, single-bucket batches, exact resume, and default-off unchanged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from ldm_helpers import LDMFiles, make_ldm_files, max_abs_diff, run_args, weights
from PIL import Image

from ldm_app.data.dataset import (build_dataset, collate_fn, make_buckets, nearest_bucket, resize_to_cover)
from ldm_app.errors import run_cli
from ldm_app.training.common import Position, batches, epoch_order, epoch_permutation
from ldm_app.training.ldm import main

# (width, height) of the 8 images: 3 wide, 3 tall, 2 square-ish; with resolution 32 and multiple 8 the buckets are
# 24x40, 32x32, 40x24
SIZES = [(48, 28), (56, 30), (45, 27), (28, 48), (30, 50), (26, 44), (36, 36), (40, 38)]
BUCKETS_32 = [(24, 40), (32, 32), (40, 24)]


def write_folder(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    """Random-noise RGB images (no symmetry: any crop offset or flip changes the pixels) with captions."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": f"image {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> LDMFiles:
    root = tmp_path_factory.mktemp("buckets")
    base = make_ldm_files(root)  # the tiny f=4 autoencoder (and 32 px shapes, unused)
    return LDMFiles(write_folder(root / "mixed", SIZES), base.vae, root)


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf_cache")


# ---- part 1: crop and flip from the per-sample generator ------------------------------------------------------


def test_crop_and_flip_are_a_function_of_the_sample_seed(files, cache):
    ds = build_dataset(str(files.data), None, 24, center_crop=False, random_flip=True, cache_dir=cache)
    same = [ds[(0, 123)]["pixel_values"] for _ in range(3)]
    assert all(torch.equal(same[0], x) for x in same)  # same (row, seed): same crop and flip, global RNG or not
    torch.manual_seed(5)
    assert torch.equal(ds[(0, 123)]["pixel_values"], same[0])
    variants = {ds[(0, s)]["pixel_values"].numpy().tobytes() for s in range(40)}
    assert len(variants) > 10  # offsets and flips do vary with the seed
    # the flip is one of the draws: some seed gives the mirror image of some other seed's crop
    xs = [ds[(0, s)]["pixel_values"] for s in range(40)]
    assert any(torch.equal(a.flip(-1), b) for a in xs for b in xs)


def test_default_transforms_ignore_the_seed_and_the_order_is_unchanged(files, cache):
    ds = build_dataset(str(files.data), None, 24, cache_dir=cache)  # centre crop, no flip: deterministic
    assert all(torch.equal(ds[(i, 7)]["pixel_values"], ds[i]["pixel_values"]) for i in range(len(ds)))
    for epoch in range(3):  # the data order is the permutation it always was
        assert [row for row, _ in epoch_order(10, 3, epoch, 4)] == epoch_permutation(10, 3, epoch)


def test_resume_with_random_crop_and_flip_ends_with_the_same_weights(files, tmp_path, fresh_accelerate):
    # 40-56 px images at resolution 24: every image is randomly cropped; 4 batches an epoch, checkpoint-3 mid-epoch
    extra = ("--max_train_steps", "5", "--checkpointing_steps", "3", "--set", "data.random_flip=true",
             "--set", "data.center_crop=false", "--set", "data.resolution=24", "--set", "unet.sample_size=6",
             "--set", "ldm.use_ema=false")
    _straight_equals_resumed(files, tmp_path, extra, batch_at_checkpoint=3)


def _straight_equals_resumed(files, tmp_path, extra, batch_at_checkpoint):
    from accelerate.state import AcceleratorState, GradientState

    def run(out, *more):
        try:
            return main(run_args(files, out, *extra, *more))
        finally:
            AcceleratorState._reset_state(True)
            GradientState._reset_state()

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight)
    steps = extra[extra.index("--checkpointing_steps") + 1]
    run(resumed, "--max_train_steps", steps)  # stops at the first checkpoint
    state = json.loads((resumed / f"checkpoint-{steps}" / "training_state.json").read_text())
    assert state["batch"] == batch_at_checkpoint  # resumed mid-epoch
    torch.manual_seed(999)  # a different global RNG state: nothing may depend on it
    result = run(resumed, "--resume_from_checkpoint", "latest")
    assert result.step == 5 and len(result.losses) == 5 - int(steps)
    a = weights(straight / "checkpoint-5" / "model.safetensors")
    b = weights(resumed / "checkpoint-5" / "model.safetensors")
    assert max_abs_diff(a, b) <= 1e-5


# ---- part 2: aspect-ratio buckets ------------------------------------------------------------------------------


def test_buckets_have_about_the_target_pixel_count_and_legal_sides():
    assert make_buckets(512, 64) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    for resolution, multiple, aspect in ((512, 64, 2.0), (768, 64, 3.0), (32, 8, 2.0), (1024, 64, 2.0)):
        buckets = make_buckets(resolution, multiple, aspect)
        assert (resolution, resolution) in buckets
        for w, h in buckets:
            assert w % multiple == 0 and h % multiple == 0
            assert 0.85 * resolution**2 <= w * h <= resolution**2, (w, h)
            assert max(w / h, h / w) <= aspect
    assert make_buckets(32, 8) == BUCKETS_32


def test_every_image_goes_to_its_closest_bucket_and_loses_a_bounded_crop(files, cache):
    ds = build_dataset(str(files.data), None, 32, cache_dir=cache).assign_buckets(8)
    assert ds.buckets == BUCKETS_32
    log_ratios = [math.log(w / h) for w, h in ds.buckets]
    half_gap = max(b - a for a, b in zip(log_ratios, log_ratios[1:])) / 2
    for i, (w, h) in enumerate(SIZES):
        bw, bh = ds.buckets[ds.bucket_ids[i]]
        assert ds[i]["pixel_values"].shape == (3, bh, bw)
        gap = abs(math.log(w / h) - math.log(bw / bh))
        assert gap == min(abs(math.log(w / h) - r) for r in log_ratios)  # the closest aspect ratio
        inside = log_ratios[0] <= math.log(w / h) <= log_ratios[-1]
        assert gap <= half_gap + 1e-9 or not inside
        cw, ch = resize_to_cover(Image.new("RGB", (w, h)), (bw, bh)).size
        removed = 1 - bw * bh / (cw * ch)  # the share of the resized image the crop drops
        assert removed <= 1 - math.exp(-gap) + 2 / min(bw, bh), (i, removed, gap)
    assert [ds.bucket_ids[i] for i in range(8)] == [2, 2, 2, 0, 0, 0, 1, 1]
    # a wide image does land in the wide bucket and a tall one in the tall one (not just the "closest" of a bad set)
    assert nearest_bucket((1000, 10), ds.buckets) == 2 and nearest_bucket((10, 1000), ds.buckets) == 0


def test_batches_are_single_bucket_and_resume_mid_epoch(files, cache):
    ds = build_dataset(str(files.data), None, 32, center_crop=False, random_flip=True,
                       cache_dir=cache).assign_buckets(8)
    acc = Accelerator(cpu=True)

    def take(start, n):
        stream = batches(ds, 2, seed=1, accelerator=acc, start=start, collate_fn=collate_fn)
        return [(pos, b) for _, (pos, b) in zip(range(n), stream)]

    straight = take(Position(), 12)  # 3 full batches an epoch (3 + 3 + 2 images, batch 2): 4 epochs
    orders = []
    for pos, b in straight:
        ids = {ds.bucket_ids[i] for i in b["indices"].tolist()}
        assert len(ids) == 1 and len(b["indices"]) == 2  # one bucket per batch, full batches
        (bucket,) = ids
        bw, bh = ds.buckets[bucket]
        assert b["pixel_values"].shape == (2, 3, bh, bw)
        orders.append((pos.epoch, bucket))
    per_epoch = [[k for e, k in orders if e == epoch] for epoch in range(4)]
    assert all(sorted(o) == [0, 1, 2] for o in per_epoch)  # every bucket's full batch once an epoch
    assert len({tuple(o) for o in per_epoch}) > 1  # the bucket order is drawn per epoch
    resumed = take(straight[4][0], 6)  # from mid-epoch 1
    for (p1, b1), (p2, b2) in zip(straight[5:], resumed):
        assert p1 == p2 and torch.equal(b1["indices"], b2["indices"])
        assert torch.equal(b1["pixel_values"], b2["pixel_values"])  # the same crops and flips


def test_resume_with_buckets_ends_with_the_same_weights(files, tmp_path, fresh_accelerate):
    # 3 single-bucket batches an epoch (24x40, 32x32, 40x24); checkpoint-2 is mid-epoch
    extra = ("--max_train_steps", "5", "--checkpointing_steps", "2", "--set", "data.buckets=true",
             "--set", "data.random_flip=true", "--set", "data.center_crop=false", "--set", "ldm.use_ema=false")
    _straight_equals_resumed(files, tmp_path, extra, batch_at_checkpoint=2)


def test_buckets_with_cached_latents_is_refused_in_one_line(files, tmp_path, capsys, fresh_accelerate):
    rc = run_cli(main, run_args(files, tmp_path / "out", "--cache_latents", "--set", "data.buckets=true"))
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "data.buckets" in lines[0] and "cache_latents" in lines[0], lines
    assert not (tmp_path / "out").exists()
