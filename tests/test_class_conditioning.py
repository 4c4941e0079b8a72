"""Class-conditional latent diffusion: labels from the data, a class embedding in the U-Net (diffusers'
num_class_embeds, so the folder loads in diffusers), label dropout to a null class, class labels at sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from ldm_app.data.shapes import NUM_CLASSES, make_dataset
from ldm_app.errors import UserError, run_cli
from ldm_app.generate import main as generate_main
from ldm_app.pipeline import LatentDiffusionPipeline
from ldm_app.pngmeta import read_params
from ldm_app.training.ldm import main as train_main
from ldm_helpers import make_ldm_files, run_args

CLASS = ["--set", "conditioning.kind=class", "--set", f"conditioning.num_classes={NUM_CLASSES}"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return make_ldm_files(tmp_path_factory.mktemp("cls"), two_object_fraction=0.0, labels=True)


@pytest.fixture(scope="module")
def trained(labelled, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    train_main(run_args(labelled, out, "--max_train_steps", "2", *CLASS))
    return out


def test_labels_are_written_for_one_object_scenes(labelled):
    rows = [json.loads(line) for line in (labelled.data / "metadata.jsonl").read_text().splitlines()]
    assert all(0 <= r["label"] < NUM_CLASSES for r in rows) and len({r["label"] for r in rows}) > 1
    with pytest.raises(UserError, match="two_object_fraction 0"):
        make_dataset(labelled.root / "x", num_images=2, resolution=32, seed=0, two_object_fraction=0.5, labels=True)


def test_a_class_conditional_run_writes_a_folder_diffusers_loads(trained):
    unet = UNet2DConditionModel.from_pretrained(trained / "unet")  # diffusers itself
    assert unet.config.num_class_embeds == NUM_CLASSES + 1  # the classes and the null class
    run = json.loads((trained / "run_config.json").read_text())
    assert run["conditioning"]["kind"] == "class"


def test_class_labels_steer_sampling_and_are_recorded(trained, tmp_path, capsys):
    pipe = LatentDiffusionPipeline.from_pretrained(trained)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe.unet.class_embedding.weight.mul_(100)  # 2 training steps: make the classes differ visibly
    kwargs = dict(num_inference_steps=3, guidance_scale=2.0, output_type="np", height=32, width=32)
    a = pipe("", class_labels=0, generator=torch.Generator().manual_seed(0), **kwargs).images
    b = pipe("", class_labels=5, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(a - b).mean() > 1e-3
    with pytest.raises(UserError, match="give class_labels"):
        pipe("", **kwargs)
    with pytest.raises(UserError, match="outside 0..17"):
        pipe("", class_labels=NUM_CLASSES, **kwargs)
    path = generate_main(["--class_label", "4", "--model", str(trained), "--steps", "2", "--seed", "1",
                          "--height", "32", "--width", "32", "--output", str(tmp_path / "c.png")])[0]  # fmt: skip
    assert read_params(path).class_label == 4 and read_params(path).prompt == ""
    again = generate_main(["--from_png", str(path), "--output", str(tmp_path / "again.png")])[0]
    assert np.array_equal(np.asarray(_open(path)), np.asarray(_open(again)))
    capsys.readouterr()
    code = run_cli(generate_main, ["--class_label", "99", "--model", str(trained), "--output", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "outside 0..17" in err[0] and not (tmp_path / "x.png").exists()


def _open(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def test_a_text_model_refuses_class_labels(tiny_pipeline):
    with pytest.raises(UserError, match="not class-conditional"):
        tiny_pipeline("a cat", class_labels=1, num_inference_steps=2)


BAD = {
    "missing column": (["--set", "conditioning.label_column=nope"], "no label column 'nope'"),
    "out of range": (["--set", "conditioning.num_classes=3"], "is not a class number in 0..2"),
    "no classes": (["--set", "conditioning.kind=class"], "needs conditioning.num_classes >= 1"),
    "unknown kind": (["--set", "conditioning.kind=colour"], "unknown conditioning.kind"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_class_settings_are_one_line_errors_before_any_work(case, labelled, tmp_path, capsys):
    flags, message = BAD[case]
    base = [] if case in ("no classes", "unknown kind") else ["--set", "conditioning.kind=class"]
    if case == "missing column":
        base += ["--set", f"conditioning.num_classes={NUM_CLASSES}"]
    out = tmp_path / "out"
    code = run_cli(train_main, run_args(labelled, out, "--max_train_steps", "1", *base, *flags))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists() or {p.name for p in out.iterdir()} <= {".lock"}


def test_the_pixel_colour_check_reads_hand_made_images():
    from ldm_app.data.shapes import class_label
    from ldm_app.evaluation.classes import class_name, pixel_colour

    image = np.full((32, 32, 3), 128, np.uint8)  # gray background
    assert pixel_colour(image) == "background"
    image[8:20, 10:22] = (220, 40, 40)
    assert pixel_colour(image) == "red"
    image[:] = 0
    image[4:12, 4:12] = (40, 80, 220)
    assert pixel_colour(image) == "blue"
    from ldm_app.data.shapes import sample_scene

    scene = sample_scene(np.random.default_rng(3), 64, two_object_fraction=0.0)
    (obj,) = scene.objects
    assert class_name(class_label(scene)) == (obj.colour, obj.shape)


def test_evaluate_classes_reports_each_guidance(trained, tiny_judge, tmp_path):
    from ldm_app.evaluation.classes import run_classes

    pipe = LatentDiffusionPipeline.from_pretrained(trained)
    pipe.set_progress_bar_config(disable=True)
    pipe.sampling_defaults.update(num_inference_steps=2, height=32, width=32)
    report, outputs = run_classes(pipe, tiny_judge, per_class=1, guidances=[1.0, 3.0], log=lambda _: None)
    assert set(report["guidance"]) == {"1", "3"} and len(outputs[3.0]) == NUM_CLASSES
    for r in report["guidance"].values():
        assert 0 <= r["judge"]["class_right"] <= 1 and 0 <= r["pixels"]["colour_right"] <= 1
        assert len(r["per_class"]) == NUM_CLASSES


def test_evaluate_classes_refuses_a_text_model(tiny_pipeline, tiny_judge):
    from ldm_app.evaluation.classes import run_classes

    with pytest.raises(UserError, match="not class-conditional"):
        run_classes(tiny_pipeline, tiny_judge, per_class=1, guidances=[1.0])
