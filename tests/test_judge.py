"""The attribute judge: labels, the accuracy gate, caching, determinism, and (slow) reading hand-drawn images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from ldm_app.data.shapes import Scene, ShapeObject
from ldm_app.evaluation import judge as judge_mod
from ldm_app.evaluation.judge import (
    HEADS,
    JudgeAccuracyError,
    JudgeConfig,
    load_judge,
    load_or_train_judge,
    save_judge,
    scene_labels,
    train_judge,
)

TINY = JudgeConfig(resolution=16, num_train=96, num_heldout=48, epochs=1, batch_size=32, width=4, feature_dim=16)


@pytest.fixture(scope="module")
def tiny_judge():
    return train_judge(TINY)


def _obj(shape, colour, position, size="small"):
    centers = {"top": (0.5, 0.2), "bottom": (0.5, 0.8), "left": (0.2, 0.5), "right": (0.8, 0.5), "center": (0.5, 0.5)}
    return ShapeObject(shape, colour, (0, 0, 0), size, 0.25, centers[position], position)


def test_two_object_labels_are_canonical():
    # "red circle above blue square" and "blue square below red circle" are the same picture: same labels.
    a, b = _obj("circle", "red", "top"), _obj("square", "blue", "bottom")
    above = scene_labels(Scene("white", (a, b), "above"))
    below = scene_labels(Scene("white", (b, a), "below"))
    assert above == below
    assert HEADS["first_colour"][above["first_colour"]] == "red"
    assert HEADS["second_shape"][above["second_shape"]] == "square"
    assert above["colour"] == -1 and above["count"] == 1
    one = scene_labels(Scene("black", (_obj("triangle", "green", "left", "large"),)))
    assert HEADS["position"][one["position"]] == "left" and HEADS["size"][one["size"]] == "large"
    assert one["axis"] == -1 and one["first_colour"] == -1


def test_gate_refuses_a_weak_judge_with_its_figures(tiny_judge):
    acc = tiny_judge.heldout_accuracy
    assert set(acc) == set(HEADS)
    assert min(acc.values()) < 0.99  # one epoch on 96 renders at 16px cannot be this good
    with pytest.raises(JudgeAccuracyError, match=r"below 99\.00%.*=0\.\d{4}"):
        tiny_judge.check(0.99)
    tiny_judge.check(0.0)  # the threshold is a parameter


def test_training_is_deterministic_for_a_seed(tiny_judge):
    again = train_judge(TINY)
    for name, value in tiny_judge.net.state_dict().items():
        assert torch.equal(value, again.net.state_dict()[name]), name
    other = train_judge(JudgeConfig(**{**TINY.__dict__, "seed": 1}))
    assert not torch.equal(other.net.heads["colour"].weight, again.net.heads["colour"].weight)


def test_save_load_round_trip_and_cache(tiny_judge, tmp_path, monkeypatch):
    images = torch.rand(5, 3, 40, 40)  # any size: the judge resizes to its own resolution
    folder = save_judge(tiny_judge, tmp_path / "j")
    loaded = load_judge(folder)
    assert loaded.heldout_accuracy == tiny_judge.heldout_accuracy
    for name, pred in tiny_judge.predict(images).items():
        assert torch.equal(loaded.predict(images)[name], pred)
    assert torch.allclose(loaded.features(images), tiny_judge.features(images))

    # The cache: the first call trains and saves, the second loads without training.
    root = tmp_path / "cache"
    monkeypatch.setattr(judge_mod, "train_judge", lambda cfg, log: tiny_judge)
    first = load_or_train_judge(TINY, root, threshold=0.0, log=lambda _: None)
    assert first.folder == judge_mod.judge_folder(TINY, root) and (first.folder / "judge.safetensors").is_file()

    def no_training(cfg, log):
        raise AssertionError("cached judge was retrained")

    monkeypatch.setattr(judge_mod, "train_judge", no_training)
    assert load_or_train_judge(TINY, root, threshold=0.0).heldout_accuracy == tiny_judge.heldout_accuracy
    with pytest.raises(JudgeAccuracyError):  # a cached weak judge still fails the gate
        load_or_train_judge(TINY, root, threshold=0.99)


def test_cache_key_depends_on_settings():
    assert JudgeConfig().key() == JudgeConfig().key()
    assert JudgeConfig(seed=1).key() != JudgeConfig().key()
    assert JudgeConfig(resolution=32).key() != JudgeConfig().key()


def _hand_drawn(background, draw_fn, side=64) -> torch.Tensor:
    """Drawn with PIL by the test itself (not the dataset renderer): (3, side, side) in [0, 1]."""
    image = Image.new("RGB", (side, side), background)
    draw_fn(ImageDraw.Draw(image))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0


@pytest.mark.slow
def test_trained_judge_reads_hand_drawn_images(tmp_path):
    judge = load_or_train_judge(JudgeConfig(), tmp_path, log=lambda _: None)  # gate at 99% passes
    images = torch.stack(
        [
            # a small red square on the left on a white background
            _hand_drawn((255, 255, 255), lambda d: d.rectangle((6, 24, 21, 39), fill=(225, 35, 45))),
            # a large blue circle in the center on a black background
            _hand_drawn((0, 0, 0), lambda d: d.ellipse((16, 17, 49, 50), fill=(45, 75, 215))),
            # a green triangle above a yellow square on a gray background
            _hand_drawn(
                (128, 128, 128),
                lambda d: (
                    d.polygon([(32, 5), (40, 19), (24, 19)], fill=(40, 165, 75)),
                    d.rectangle((25, 44, 39, 58), fill=(230, 200, 45)),
                ),
            ),
        ]
    )
    pred = {k: [HEADS[k][i] for i in v] for k, v in judge.predict(images).items()}
    assert [pred[k][0] for k in ("count", "colour", "shape", "size", "position", "background")] == [
        "one",
        "red",
        "square",
        "small",
        "left",
        "white",
    ]
    assert [pred[k][1] for k in ("count", "colour", "shape", "size", "position", "background")] == [
        "one",
        "blue",
        "circle",
        "large",
        "center",
        "black",
    ]
    two = ("count", "axis", "first_colour", "first_shape", "second_colour", "second_shape", "background")
    assert [pred[k][2] for k in two] == ["two", "vertical", "green", "triangle", "yellow", "square", "gray"]
