"""Resource limits (ldm_app.limits) on every face of generation: the command line (before the model loads where
possible, the model's own step limit before the first image), the pipeline call (every argument, before anything
is allocated) and `--from_png` / `read_params` (a stored NaN or out-of-range value names the PNG)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image, PngImagePlugin

import ldm_app.generate as gen_module
from ldm_app import limits
from ldm_app.errors import UserError, run_cli
from ldm_app.generate import generate, main
from ldm_app.pipeline import LatentDiffusionPipeline, make_generators
from ldm_app.pngmeta import KEY, ImageParams, read_params, save_png


@pytest.fixture(autouse=True)
def _fresh_limits():
    torch.set_num_threads(1)
    limits.reset()
    yield
    limits.reset()


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the model is loaded: these refusals must come first."""

    def refuse(req):
        raise AssertionError("the model was loaded before the request was refused")

    monkeypatch.setattr(gen_module, "load_pipeline", refuse)


# ---- the command line: refused before the model loads -------------------------------------------------------------

BEFORE_LOAD = {
    "huge guidance": (["--guidance_scale", "1e308"], "--guidance_scale must be between 0 and 50, got 1e+308"),
    "inf guidance": (["--guidance_scale", "inf"], "--guidance_scale: 'inf' is not finite"),
    "nan guidance": (["--guidance_scale", "nan"], "--guidance_scale: 'nan' is not finite"),
    "negative guidance": (["--guidance_scale", "-1"], "--guidance_scale must be between 0 and 50, got -1"),
    "ten million steps": (["--steps", "10000000"], "--steps is 10000000, above the limit of 1000"),
    "2000 steps": (["--steps", "2000", "--scheduler", "ddim"], "--steps is 2000, above the limit of 1000"),
    "huge height": (["--height", "100000"], "--height is 100000 pixels, above the limit of 2048"),
    "huge height, 1 step": (["--height", "100000", "--width", "64", "--steps", "1"], "--height is 100000 pixels"),
    "a million images": (["--num_images", "1000000", "--batch_size", "1000000"], "--num_images is 1000000, above"),
    "huge batch": (["--num_images", "100", "--batch_size", "1000"], "--batch_size is 1000, above the limit of 64"),
    "batch pixels": (["--num_images", "64", "--batch_size", "64", "--height", "2048", "--width", "2048"],
                     "64 images of 2048x2048 is 268,435,456 pixels in one call, above the limit"),
    "grid pixels": (["--num_images", "100", "--grid", "--height", "2048", "--width", "2048"],
                    "a grid of 100 images of 2048x2048"),
    "huge int": (["--steps", "9" * 5000], "--steps: '999"),
    "seed too large": (["--seed", str(2**63)], "--seed must be an integer between 0 and"),
}


@pytest.mark.parametrize("case", BEFORE_LOAD, ids=list(BEFORE_LOAD))
def test_cli_limits_refused_before_the_model_loads(case, tmp_path, tiny_pipeline_dir, no_model_load, capsys):
    flags, expected = BEFORE_LOAD[case]
    argv = ["a cat", "--model", str(tiny_pipeline_dir), "--output", str(tmp_path / "out"), "--device", "cpu", *flags]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert list(tmp_path.iterdir()) == []


def test_prompt_count_times_num_images_is_limited(tmp_path, tiny_pipeline_dir, no_model_load):
    limits.configure(max_images_per_command=5)
    with pytest.raises(UserError, match="3 prompts x 2 images is 6 images, above the limit of 5"):
        generate(["a", "b", "c"], tiny_pipeline_dir, num_images=2, output=tmp_path / "o")


@pytest.mark.parametrize("kwargs, expected", [
    (dict(guidance_scale=math.inf), "guidance_scale must be a finite number, got inf"),
    (dict(guidance_scale=math.nan), "guidance_scale must be a finite number, got nan"),
    (dict(guidance_scale=1e308), "must be between 0 and 50"),
    (dict(steps=2.5), "--steps must be an integer >= 1, got 2.5"),
    (dict(height="64"), "--height must be a positive multiple of 8"),
    (dict(num_images=True), "--num_images must be an integer >= 1"),
    (dict(seed=-1), "--seed must be an integer between 0"),
    (dict(sampler=["ddim"]), "unknown sampler"),
    (dict(overwrite="yes"), "overwrite must be True or False"),
    (dict(prompts=["a\udcff"]), "the prompt is not valid UTF-8 text"),
    (dict(prompts=3), "prompts must be a string or a list of strings"),
    (dict(negative_prompt="\ud800"), "--negative_prompt is not valid UTF-8 text"),
])  # fmt: skip
def test_python_api_refuses_before_loading(kwargs, expected, tmp_path, tiny_pipeline_dir, no_model_load):
    kwargs = {"prompts": "a cat", "model": tiny_pipeline_dir, "output": tmp_path / "out", **kwargs}
    with pytest.raises(UserError) as err:
        generate(kwargs.pop("prompts"), **kwargs)
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


# ---- the command line: the model's own limits, after loading and before sampling ----------------------------------


@pytest.mark.parametrize("flags, expected", [
    (["--steps", "1000", "--scheduler", "ddim"], "1000 steps do not fit sampler ddim on this model: its 1000 training"),
    (["--steps", "1000", "--scheduler", "dpm++"], "1000 steps do not fit sampler dpm++"),
    (["--steps", "1500"], "num_inference_steps is 1500 for sampler ddim, above the model's 1000 training timesteps"),
])  # fmt: skip
def test_steps_beyond_the_models_timesteps_refused_before_sampling(flags, expected, tmp_path, tiny_pipeline_dir,
                                                                   monkeypatch, capsys):
    limits.configure(max_steps=5000)
    monkeypatch.setattr(LatentDiffusionPipeline, "_sample", lambda *a: pytest.fail("sampling started"))
    argv = ["a cat", "--model", str(tiny_pipeline_dir), "--output", str(tmp_path / "o"), "--device", "cpu", *flags]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
    assert list(tmp_path.iterdir()) == []


def test_stored_defaults_beyond_the_limits_refused_before_sampling(tmp_path, tiny_pipeline_dir, monkeypatch):
    import shutil

    model = shutil.copytree(tiny_pipeline_dir, tmp_path / "m")
    (model / "ldm_app.json").write_text(json.dumps({"sampling": {"num_inference_steps": 30, "height": 256}}))
    monkeypatch.setattr(LatentDiffusionPipeline, "_sample", lambda *a: pytest.fail("sampling started"))
    limits.configure(max_steps=20)
    with pytest.raises(UserError, match="num_inference_steps is 30 for sampler ddim, above the limit of 20"):
        generate("a cat", model, output=tmp_path / "o", device="cpu")
    limits.configure(max_steps=100, max_image_side=128)
    with pytest.raises(UserError, match="height is 256 pixels, above the limit of 128"):
        generate("a cat", model, output=tmp_path / "o", device="cpu")
    assert not (tmp_path / "o").exists()


def test_nan_in_the_models_defaults_is_refused_at_load(tmp_path, tiny_pipeline_dir):
    import shutil

    model = shutil.copytree(tiny_pipeline_dir, tmp_path / "m")
    (model / "ldm_app.json").write_text('{"sampling": {"guidance_scale": NaN}}')  # Python's json accepts NaN
    with pytest.raises(UserError, match=r"ldm_app.json: sampling.guidance_scale must be a finite number, got nan"):
        LatentDiffusionPipeline.from_pretrained(model)


# ---- the pipeline call: every argument, before any allocation ------------------------------------------------------

PIPE_CASES = {
    "inf guidance": (dict(guidance_scale=math.inf), "guidance_scale must be a finite number, got inf"),
    "nan guidance": (dict(guidance_scale=math.nan), "guidance_scale must be a finite number, got nan"),
    "huge guidance": (dict(guidance_scale=1e308), r"guidance_scale must be between 0 and 50, got 1e\+308"),
    "bool guidance": (dict(guidance_scale=True), "guidance_scale must be a number"),
    "ten million steps": (dict(num_inference_steps=10_000_000), "above the model's 1000 training timesteps"),
    "steps above T": (dict(num_inference_steps=1000), "1000 steps do not fit sampler ddim"),
    "float steps": (dict(num_inference_steps=2.0), "num_inference_steps must be an integer >= 1"),
    "huge height": (dict(height=100_000), "height is 100000 pixels, above the limit of 2048"),
    "negative width": (dict(width=-64), "width must be a positive multiple of 8"),
    "tiny height": (dict(height=16), "height is 16 pixels, below the 32 this model can take"),
    "huge num_images_per_prompt": (dict(num_images_per_prompt=10**6), "num_images_per_prompt is 1000000, above"),
    "prompts x images": (dict(prompt=["a"] * 40, num_images_per_prompt=2), "images per call is 80, above the limit"),
    "pixels per call": (dict(num_images_per_prompt=64, height=1024, width=1024), "pixels in one call, above"),
    "nan latents": (dict(latents=torch.full((1, 4, 8, 8), math.nan)), "latents contain NaN or infinite values"),
    "int latents": (dict(latents=torch.zeros(1, 4, 8, 8, dtype=torch.int64)), "latents must be a floating-point"),
    "latents shape": (dict(latents=torch.zeros(2, 4, 8, 8)), r"latents have shape \(2, 4, 8, 8\), expected"),
    "generator count": (dict(generator=make_generators(0, 3)), "got 3 generators for 1 images"),
    "generator junk": (dict(generator=[42]), "generator must be a torch.Generator"),
    "unknown sampler": (dict(sampler="heun"), "unknown sampler 'heun'"),
    "unhashable sampler": (dict(sampler=["ddim"]), "unknown sampler"),
    "lone surrogate": (dict(prompt="a \udcff cat"), "prompt is not valid UTF-8 text"),
    "negative surrogate": (dict(negative_prompt="\ud800"), "negative_prompt is not valid UTF-8 text"),
    "negative junk": (dict(negative_prompt=7), "negative_prompt must be a string"),
    "output_type junk": (dict(output_type=["np"]), "output_type must be one of"),
}


@pytest.mark.parametrize("case", PIPE_CASES, ids=list(PIPE_CASES))
def test_pipeline_call_refuses_before_allocating(case, tiny_pipeline, monkeypatch):
    kwargs, expected = PIPE_CASES[case]
    monkeypatch.setattr(tiny_pipeline, "encode_prompt", lambda *a: pytest.fail("the call went past its checks"))
    kwargs = {"prompt": "a cat", "num_inference_steps": 2, **kwargs}
    with pytest.raises(UserError, match=expected) as err:
        tiny_pipeline(**kwargs)
    assert "\n" not in str(err.value)


def test_configured_limits_apply_to_the_call(tiny_pipeline):
    limits.configure(max_steps=2, max_image_side=32, max_images_per_call=2)
    with pytest.raises(UserError, match="height is 64 pixels, above the limit of 32"):
        tiny_pipeline("a", num_inference_steps=1)  # the U-Net's native 64 px: a default is checked too
    with pytest.raises(UserError, match="num_inference_steps is 3 for sampler ddim, above the limit of 2"):
        tiny_pipeline("a", num_inference_steps=3, height=32, width=32)
    with pytest.raises(UserError, match="images per call is 3"):
        tiny_pipeline(["a", "b", "c"], num_inference_steps=1, height=32, width=32)
    out = tiny_pipeline(["a", "b"], num_inference_steps=2, height=32, width=32, output_type="np").images
    assert out.shape == (2, 32, 32, 3)


def test_max_steps_per_sampler_on_a_short_schedule(tiny_components):
    """A model trained with 10 timesteps: each sampler runs every step count its grid allows, up to the model's
    limit, and the rest is refused before sampling (never an IndexError or a NaN image)."""
    from ldm_app.samplers import SAMPLERS

    components = tiny_components()
    components["scheduler"] = type(components["scheduler"]).from_config(components["scheduler"].config,
                                                                        num_train_timesteps=10)  # fmt: skip
    pipe = LatentDiffusionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    for sampler in SAMPLERS:
        ran = []
        for steps in range(1, 12):
            try:
                out = pipe("a", num_inference_steps=steps, sampler=sampler, output_type="latent", height=32, width=32,
                           generator=torch.Generator().manual_seed(0)).images  # fmt: skip
            except UserError as e:
                assert "do not fit" in str(e) or "above the model's 10 training timesteps" in str(e)
                continue
            assert torch.isfinite(out).all(), (sampler, steps)
            ran.append(steps)
        if sampler == "lcm":  # its distillation grid (original_inference_steps, 50 by default) does not fit 10
            assert ran == [], ran  # timesteps at all: every count refused in one line, none sampled
            continue
        assert ran[:5] == [1, 2, 3, 4, 5] and 11 not in ran, (sampler, ran)


# ---- --from_png and read_params: a stored value is checked, naming the PNG -----------------------------------------


def _png_with(tmp_path, tiny_pipeline_dir, name="p.png", **changes):
    data = json.loads(ImageParams("a cat", "", 1, 2, 7.5, "ddim", 64, 64, str(tiny_pipeline_dir)).to_json())
    data.update(changes)
    info = PngImagePlugin.PngInfo()
    info.add_text(KEY, json.dumps(data))  # json writes NaN / Infinity, and Python's json reads them back
    info.add_text("parameters", f"a cat\nSteps: {data['steps']}, CFG scale: {data['guidance_scale']}")
    path = tmp_path / name
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


STORED = {
    "nan guidance": (dict(guidance_scale=math.nan), "guidance_scale must be a finite number, got nan"),
    "inf guidance": (dict(guidance_scale=math.inf), "guidance_scale must be a finite number, got inf"),
    "huge guidance": (dict(guidance_scale=1e308), "guidance_scale must be between 0 and 50"),
    "huge steps": (dict(steps=10_000_000), "steps is 10000000, above the limit of 1000"),
    "huge height": (dict(height=100_000), "height is 100000 pixels, above the limit"),
    "odd width": (dict(width=30), "width must be a positive multiple of 8"),
    "negative seed": (dict(seed=-5), "seed must be between 0 and"),
    "unknown sampler": (dict(sampler="heun"), "unknown sampler 'heun'"),
    "surrogate prompt": (dict(prompt="a \udcff"), "prompt is not valid UTF-8 text"),
}


@pytest.mark.parametrize("case", STORED, ids=list(STORED))
def test_stored_values_are_refused_naming_the_png(case, tmp_path, tiny_pipeline_dir, no_model_load, capsys):
    changes, expected = STORED[case]
    png = _png_with(tmp_path, tiny_pipeline_dir, **changes)
    with pytest.raises(UserError) as err:
        read_params(png)
    assert str(err.value).startswith(f"{png}: ") and expected in str(err.value)
    assert run_cli(main, ["--from_png", str(png), "--output", str(tmp_path / "out")]) == 2
    assert f"error: {png}: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_huge_integer_in_the_chunk_is_one_line(tmp_path, tiny_pipeline_dir):
    png = _png_with(tmp_path, tiny_pipeline_dir)
    info = PngImagePlugin.PngInfo()
    info.add_text(KEY, '{"steps": ' + "9" * 5000 + "}")
    Image.new("RGB", (8, 8)).save(png, pnginfo=info)
    with pytest.raises(UserError, match="is not valid JSON"):
        read_params(png)


def test_from_png_override_is_checked_too(tmp_path, tiny_pipeline_dir, no_model_load, capsys):
    png = save_png(Image.new("RGB", (8, 8)), tmp_path / "ok.png",
                   ImageParams("a cat", "", 1, 2, 7.5, "ddim", 64, 64, str(tiny_pipeline_dir)))  # fmt: skip
    assert run_cli(main, ["--from_png", str(png), "--guidance_scale", "1e308", "--output", str(tmp_path / "o")]) == 2
    assert "--guidance_scale must be between 0 and 50" in capsys.readouterr().err
