"""Scalar-conditioned latent diffusion: a number per image (the shapes' object size) from a dataset column, an MLP
of [s, 1] added to the timestep embedding (diffusers' class_embed_type="projection", so the folder loads in
diffusers), dropped to the null [0, 0] for classifier-free guidance, `scalars=` at sampling, generate --scalar."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from ldm_app.data.shapes import make_dataset
from ldm_app.errors import UserError, run_cli
from ldm_app.generate import main as generate_main
from ldm_app.pipeline import ClassConditionedUNet, LatentDiffusionPipeline
from ldm_app.pngmeta import read_params
from ldm_app.training.ldm import main as train_main
from ldm_helpers import CONFIG, make_ldm_files, run_args

TEXT_SCALAR = ["--set", "conditioning.kind=text+scalar"]


@pytest.fixture(scope="module")
def sized(tmp_path_factory):
    return make_ldm_files(tmp_path_factory.mktemp("scalar"), two_object_fraction=0.0, sizes=True)


@pytest.fixture(scope="module")
def trained(sized, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    train_main(run_args(sized, out, "--max_train_steps", "2", *TEXT_SCALAR, "--validation_prompts", "a red circle",
                        "--validation_prompts", "a blue square"))  # fmt: skip
    return out


def _rows(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_sizes_are_the_object_widths_of_one_object_scenes(sized):
    from ldm_app.data.shapes import sample_scene

    rows = _rows(sized.data)
    for i, row in enumerate(rows):
        (obj,) = sample_scene(np.random.default_rng([0, i]), 32, two_object_fraction=0.0).objects
        assert row["size"] == round(obj.width, 3) and obj.size in row["text"]
    assert len({r["size"] for r in rows}) == len(rows)
    manifest = json.loads((sized.data / "shapes_manifest.json").read_text())
    assert manifest["arguments"]["sizes"] is True
    with pytest.raises(UserError, match="two_object_fraction 0 with --sizes"):
        make_dataset(sized.root / "x", num_images=2, resolution=32, seed=0, two_object_fraction=0.5, sizes=True)


def test_a_scalar_run_writes_a_folder_diffusers_loads(trained):
    unet = UNet2DConditionModel.from_pretrained(trained / "unet")  # diffusers itself
    assert unet.config.class_embed_type == "projection" and unet.config.projection_class_embeddings_input_dim == 2
    assert unet.config.num_class_embeds is None
    run = json.loads((trained / "run_config.json").read_text())
    assert run["conditioning"]["kind"] == "text+scalar" and run["conditioning"]["scalar_column"] == "size"
    from PIL import Image

    with Image.open(trained / "validation" / "step-0000002.png") as grid:  # 2 prompts x 3 sizes (rows)
        assert grid.size == (2 * 32, 3 * 32)


def test_a_scalar_only_model_trains_validates_and_generates_without_a_prompt(sized, tmp_path, fresh_accelerate):
    from PIL import Image

    out = tmp_path / "out"
    train_main(run_args(sized, out, "--max_train_steps", "2", "--set", "conditioning.kind=scalar",
                        "--validation_steps", "2"))  # fmt: skip
    with Image.open(out / "validation" / "step-0000002.png") as grid:  # 4 seeds x 3 sizes (rows), no text
        assert grid.size == (4 * 32, 3 * 32)
    path = generate_main(["--scalar", "0.3", "--model", str(out), "--steps", "2", "--seed", "0", "--height", "32",
                          "--width", "32", "--output", str(tmp_path / "s.png")])[0]  # fmt: skip
    assert read_params(path).scalar == 0.3 and read_params(path).prompt == ""


@pytest.mark.parametrize("cache", [False, True], ids=["encoded", "cached"])
def test_each_row_trains_with_its_own_scalar(cache, sized, tmp_path, monkeypatch, fresh_accelerate):
    """Scalars are looked up by dataset row index, cached latents or not: every caption reaches the loss beside
    its own row's value (rows are shuffled, so a value taken by batch position would not match)."""
    import ldm_app.training.ldm as ldm_module

    folder = tmp_path / "numbered"
    shutil.copytree(sized.data, folder)
    (folder / "shapes_manifest.json").unlink()
    rows = _rows(folder)
    for i, r in enumerate(rows):
        r.update(text=f"{r['text']} number {i}", size=i / 10)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen_captions, seen_values = [], []

    def drop_captions(captions, p, g):
        seen_captions.extend(captions)
        return real_drop(captions, p, g)

    def scalar_condition(values):
        seen_values.extend(values.tolist())
        return real_condition(values)

    real_drop, real_condition = ldm_module.drop_captions, ldm_module.scalar_condition
    monkeypatch.setattr(ldm_module, "drop_captions", drop_captions)
    monkeypatch.setattr(ldm_module, "scalar_condition", scalar_condition)
    flags = ["--max_train_steps", "4", *TEXT_SCALAR] + (["--cache_latents"] if cache else [])
    train_main(run_args(SimpleNamespace(data=folder, vae=sized.vae), tmp_path / "out", *flags))
    assert len(seen_captions) == len(seen_values) == 8
    assert [int(c.rsplit(" ", 1)[1]) / 10 for c in seen_captions] == pytest.approx(seen_values)
    assert seen_values != sorted(seen_values)  # the batches were shuffled


def test_the_loss_sees_the_scalar(sized, tmp_path, fresh_accelerate):
    """The same step with other sizes has another loss: the value reaches the U-Net."""
    folder = tmp_path / "swapped"
    shutil.copytree(sized.data, folder)
    (folder / "shapes_manifest.json").unlink()
    rows = _rows(folder)
    for r, size in zip(rows, reversed([r["size"] for r in rows])):
        r["size"] = size
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # label_dropout 0: no row is nulled, so every scalar reaches the loss
    flags = ["--max_train_steps", "1", *TEXT_SCALAR, "--set", "conditioning.label_dropout=0"]
    a = train_main(run_args(sized, tmp_path / "a", *flags))
    b = train_main(run_args(SimpleNamespace(data=folder, vae=sized.vae), tmp_path / "b", *flags))
    assert a.losses[0] != b.losses[0]


def test_a_run_saved_before_scalar_column_existed_still_resumes(ldm_files, tmp_path, fresh_accelerate):
    out = tmp_path / "out"
    train_main(run_args(ldm_files, out, "--max_train_steps", "1", "--checkpointing_steps", "1"))
    saved = json.loads((out / "run_config.json").read_text())
    del saved["conditioning"]["scalar_column"]  # as written by the previous version
    (out / "run_config.json").write_text(json.dumps(saved))
    result = train_main(run_args(ldm_files, out, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"))
    assert result.step == 2


def test_scalars_steer_sampling_and_are_recorded(trained, tmp_path, capsys):
    pipe = LatentDiffusionPipeline.from_pretrained(trained)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe.unet.class_embedding.linear_2.weight.mul_(100)  # 2 training steps: make the values differ visibly
    kwargs = dict(num_inference_steps=3, guidance_scale=2.0, output_type="np", height=32, width=32)
    prompt = "a red circle on a white background"
    a = pipe(prompt, scalars=0.2, generator=torch.Generator().manual_seed(0), **kwargs).images
    b = pipe(prompt, scalars=0.55, generator=torch.Generator().manual_seed(0), **kwargs).images
    a2 = pipe(prompt, scalars=[0.2], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(a - b).mean() > 1e-3 and np.array_equal(a, a2)
    with pytest.raises(UserError, match="give scalars"):
        pipe(prompt, **kwargs)
    with pytest.raises(UserError, match="finite"):
        pipe(prompt, scalars=float("nan"), **kwargs)
    with pytest.raises(UserError, match="got 3 scalars for 2 prompts"):
        pipe([prompt, prompt], scalars=[0.1, 0.2, 0.3], **kwargs)

    path = generate_main([prompt, "--scalar", "0.45", "--model", str(trained), "--steps", "2", "--seed", "1",
                          "--height", "32", "--width", "32", "--output", str(tmp_path / "s.png")])[0]  # fmt: skip
    assert read_params(path).scalar == 0.45 and read_params(path).prompt == prompt
    again = generate_main(["--from_png", str(path), "--output", str(tmp_path / "again.png")])[0]
    assert read_params(again).scalar == 0.45
    assert np.array_equal(np.asarray(_open(path)), np.asarray(_open(again)))
    other = generate_main(["--from_png", str(path), "--scalar", "0.2", "--output", str(tmp_path / "other.png")])[0]
    assert read_params(other).scalar == 0.2
    capsys.readouterr()
    code = run_cli(generate_main, [prompt, "--model", str(trained), "--output", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "give --scalar " in err[0] and not (tmp_path / "x.png").exists()


def _open(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


class _Recorder:
    """A stand-in U-Net that records the class_labels of each call."""

    config = SimpleNamespace(num_class_embeds=19)

    def __init__(self):
        self.seen = []

    def __call__(self, sample, timestep, *args, class_labels=None, **kwargs):
        self.seen.append(class_labels)
        return sample


def test_the_proxy_gives_the_uncond_half_the_null_condition():
    from ldm_app.conditioning import null_scalar_condition, scalar_condition

    unet = _Recorder()
    proxy = ClassConditionedUNet(unet, scalar_condition(torch.tensor([0.25, 0.5])), null_scalar_condition(1)[0])
    proxy(torch.zeros(4, 4, 2, 2), 10)  # classifier-free guidance: [uncond; cond]
    proxy(torch.zeros(2, 4, 2, 2), 10)  # guidance off
    assert unet.seen[0].tolist() == [[0, 0], [0, 0], [0.25, 1], [0.5, 1]]
    assert unet.seen[1].tolist() == [[0.25, 1], [0.5, 1]]
    proxy(torch.zeros(4, 4, 2, 2, dtype=torch.float16), 10)  # the U-Net's dtype (an fp16 model)
    assert unet.seen[2].dtype == torch.float16
    classes = ClassConditionedUNet(unet, torch.tensor([3, 7]))  # class behaviour: the null class is the last row
    classes(torch.zeros(4, 4, 2, 2), 10)
    assert unet.seen[3].tolist() == [18, 18, 3, 7] and unet.seen[3].dtype == torch.long


def test_a_scalar_embedding_added_to_a_text_model_starts_as_that_model(tiny_components, tmp_path):
    from ldm_app.models import add_scalar_embedding

    unet = tiny_components()["unet"]
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=c).sample
        add_scalar_embedding(unet, seed=0)
        for y in ([[0.2, 1], [0.6, 1]], [[0, 0], [0, 0]]):
            y = torch.tensor(y, dtype=torch.float32)
            assert torch.equal(unet(x, t, encoder_hidden_states=c, class_labels=y).sample, before)
    assert unet.class_embedding.linear_1.weight.abs().sum() > 0  # only the last layer is zero: it can learn
    unet.save_pretrained(tmp_path / "unet")
    again = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert again.config.class_embed_type == "projection"
    assert torch.equal(again.class_embedding.linear_1.weight, unet.class_embedding.linear_1.weight)


def test_fine_tuning_a_text_folder_as_text_scalar(tiny_pipeline_dir, tmp_path, fresh_accelerate):
    data = tmp_path / "data"
    make_dataset(data, num_images=4, resolution=64, seed=0, two_object_fraction=0.0, sizes=True)
    out = tmp_path / "out"
    train_main(["--config", str(CONFIG), "--train_data_dir", str(data), "--pretrained_model", str(tiny_pipeline_dir),
                "--output_dir", str(out), "--max_train_steps", "1", "--set", "data.resolution=64", *TEXT_SCALAR])
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert unet.config.class_embed_type == "projection" and unet.class_embedding is not None
    pipe = LatentDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle", scalars=0.3, num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)


def test_a_text_model_refuses_scalars(tiny_pipeline, tiny_pipeline_dir, tmp_path, capsys):
    with pytest.raises(UserError, match="not scalar-conditioned"):
        tiny_pipeline("a cat", scalars=0.3, num_inference_steps=2)
    code = run_cli(generate_main, ["a cat", "--scalar", "0.3", "--model", str(tiny_pipeline_dir), "--steps", "2",
                                   "--output", str(tmp_path / "x.png")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not scalar-conditioned" in err[0] and not (tmp_path / "x.png").exists()


def test_a_huge_scalar_is_refused_before_sampling(trained, tmp_path, capsys):
    # 1e30 overflows the projection in float32: NaN latents, an all-black image, if let through
    pipe = LatentDiffusionPipeline.from_pretrained(trained)
    with pytest.raises(UserError, match="beyond"):
        pipe("a red circle", scalars=1e30, num_inference_steps=2)
    code = run_cli(generate_main, ["a red circle", "--scalar", "1e30", "--model", str(trained), "--steps", "2",
                                   "--output", str(tmp_path / "x.png")])  # fmt: skip
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip() and "Loading" not in line]
    assert code == 2 and len(err) == 1 and "beyond" in err[0] and not (tmp_path / "x.png").exists()


def _edited(sized, tmp_path, edit):
    folder = tmp_path / "edited"
    shutil.copytree(sized.data, folder)
    (folder / "shapes_manifest.json").unlink()
    rows = _rows(folder)
    edit(rows)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return SimpleNamespace(data=folder, vae=sized.vae)


BAD = {
    "missing column": (["--set", "conditioning.scalar_column=nope"], None, "no scalar column 'nope'"),
    "non-numeric": ([], lambda rows: [r.update(size="big") for r in rows], "size 'big' in row 0"),
    "not finite": ([], lambda rows: rows[3].update(size=float("inf")), "in row 3 (000003.png) is not a finite number"),
    "missing value": ([], lambda rows: rows[2].pop("size"), "size None in row 2 (000002.png) is not a number"),
    "huge": ([], lambda rows: rows[1].update(size=1e30), "in row 1 (000001.png) is not a finite number within"),
    "class+scalar": (["--set", "conditioning.kind=class+scalar"], None, "unknown conditioning.kind"),
    "text run, scalar folder": (["--set", "conditioning.kind=text"], "scalar folder",
                                "the U-Net has a scalar embedding; conditioning.kind is 'text'"),
}


@pytest.fixture
def no_dataset_bars():
    """datasets' "Generating train split" bars (stderr, for a folder it has not read before) off for the test."""
    from datasets.utils import logging as datasets_logging

    datasets_logging.disable_progress_bar()
    yield
    datasets_logging.enable_progress_bar()


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_scalar_settings_are_one_line_errors_before_any_work(case, sized, trained, tmp_path, capsys,
                                                                 no_dataset_bars):  # fmt: skip
    flags, edit, message = BAD[case]
    files = _edited(sized, tmp_path, edit) if callable(edit) else sized
    out = tmp_path / "out"
    args = run_args(files, out, "--max_train_steps", "1", *TEXT_SCALAR, *flags)
    if edit == "scalar folder":  # fine-tuning the scalar model as a text model
        args = ["--config", str(CONFIG), "--train_data_dir", str(files.data), "--pretrained_model", str(trained),
                "--output_dir", str(out), "--max_train_steps", "1", *flags]
    code = run_cli(train_main, args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists() or {p.name for p in out.iterdir()} <= {".lock"}
