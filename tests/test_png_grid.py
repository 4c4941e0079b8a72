"""A stored timestep grid travels with each image: the PNG records the grid it was sampled on, `--from_png` samples
on that grid whatever the model folder stores now, and `--timesteps` sets one for a run (tiny random model, CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from ldm_app.errors import UserError, run_cli
from ldm_app.generate import Request, main, sampling_grid
from ldm_app.pipeline import LatentDiffusionPipeline, write_sampling_defaults
from ldm_app.pngmeta import ImageParams, read_params, read_text_chunks
from ldm_app.samplers import samplers_taking

GRID = [999, 600, 300, 80]
OTHER_GRID = [999, 700, 400, 100]


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)


@pytest.fixture
def model(tiny_pipeline_dir, tmp_path) -> Path:
    folder = tmp_path / "m"
    shutil.copytree(tiny_pipeline_dir, folder)
    return folder


def store(folder: Path, grid: list[int] | None) -> None:
    defaults = {"sampler": "dpm++", "num_inference_steps": 4, "guidance_scale": 1.0}
    write_sampling_defaults(folder, {**defaults, **({"timesteps": grid} if grid else {})})


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def make(*argv) -> Path:
    return main([str(a) for a in (*argv, "--device", "cpu")])[0]


def test_the_png_records_the_stored_grid_and_a_remake_keeps_it_after_the_model_changes(model, tmp_path, capsys):
    store(model, GRID)
    first = make("a red circle", "--model", model, "--seed", 3, "--output", tmp_path / "a.png")
    params = read_params(first)
    assert params.timesteps == tuple(GRID) and params.steps == 4
    assert "Steps: 4, Timesteps: 999/600/300/80, Sampler: dpm++" in read_text_chunks(first)["parameters"]
    assert "steps: 4 (timesteps 999/600/300/80)" in capsys.readouterr().out

    store(model, OTHER_GRID)  # e.g. a new sweep rewrote the model's defaults
    fresh = make("a red circle", "--model", model, "--seed", 3, "--output", tmp_path / "b.png")
    assert read_params(fresh).timesteps == tuple(OTHER_GRID)
    assert np.abs(pixels(fresh) - pixels(first)).max() > 0  # the grid changes the image...
    again = make("--from_png", first, "--output", tmp_path / "c.png")
    assert read_params(again) == params
    assert np.array_equal(pixels(again), pixels(first))  # ...and the remake samples on the PNG's grid


def test_an_image_made_on_the_samplers_own_spacing_is_remade_so_after_the_model_stores_a_grid(model, tmp_path):
    store(model, None)
    first = make("a blue square", "--model", model, "--seed", 5, "--output", tmp_path / "a.png")
    assert read_params(first).timesteps is None and read_params(first).steps == 4
    assert "Timesteps" not in read_text_chunks(first)["parameters"]

    store(model, GRID)
    fresh = make("a blue square", "--model", model, "--seed", 5, "--output", tmp_path / "b.png")
    assert np.abs(pixels(fresh) - pixels(first)).max() > 0
    again = make("--from_png", first, "--output", tmp_path / "c.png")
    assert np.array_equal(pixels(again), pixels(first))
    own = LatentDiffusionPipeline.from_pretrained(model).scheduler
    own.set_timesteps(4)
    assert read_params(again).timesteps == tuple(own.timesteps.tolist())  # the own spacing, now written out


def test_an_image_made_before_pngs_recorded_grids_is_remade_on_the_models_stored_grid(model, tmp_path):
    """A PNG from before 2026-12-05 has no `timesteps` key: it was sampled on the model's stored grid where one
    applied, so its remake leaves that choice to the model, as then (not the sampler's own spacing)."""
    store(model, GRID)
    first = make("a red circle", "--model", model, "--seed", 3, "--output", tmp_path / "a.png")
    chunk = json.loads(read_text_chunks(first)["ldm_app"])
    del chunk["timesteps"]
    info = PngImagePlugin.PngInfo()
    info.add_text("ldm_app", json.dumps(chunk))
    with Image.open(first) as im:
        im.save(tmp_path / "old.png", pnginfo=info)
    assert read_params(tmp_path / "old.png").timesteps is None
    again = make("--from_png", tmp_path / "old.png", "--output", tmp_path / "b.png")
    assert read_params(again).timesteps == tuple(GRID)
    assert np.array_equal(pixels(again), pixels(first))


def test_another_step_count_or_sampler_on_a_remake_drops_the_pngs_grid(model, tmp_path):
    store(model, GRID)
    first = make("a red circle", "--model", model, "--seed", 3, "--output", tmp_path / "a.png")
    assert read_params(make("--from_png", first, "--steps", 3, "--output", tmp_path / "b.png")).timesteps is None
    euler = read_params(make("--from_png", first, "--scheduler", "euler", "--output", tmp_path / "c.png"))
    assert euler.sampler == "euler" and euler.timesteps is None


def test_timesteps_flag_sets_the_grid_and_the_step_count(model, tmp_path):
    store(model, None)
    png = make("a red circle", "--model", model, "--seed", 1, "--timesteps", "999/500", "--output", tmp_path / "a.png")
    params = read_params(png)
    assert (params.steps, params.timesteps) == (2, (999, 500))
    pipe = LatentDiffusionPipeline.from_pretrained(model)
    direct = pipe("a red circle", timesteps=[999, 500], generator=torch.Generator().manual_seed(1)).images[0]
    assert np.array_equal(pixels(png), np.asarray(direct, dtype=np.int16))
    own = make("a red circle", "--model", model, "--seed", 1, "--steps", 2, "--output", tmp_path / "b.png")
    assert np.abs(pixels(own) - pixels(png)).max() > 0  # not the sampler's own 2-step spacing


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--timesteps", "500/999"], "strictly decreasing"),
        (["--timesteps", "999/500", "--steps", "3"], "one per step"),
        (["--timesteps", "999/500", "--scheduler", "ddim"], "ddim sampler cannot take a timesteps grid"),
        (["--timesteps", "1200/500", "--scheduler", "dpm++"], "beyond this model's 1000 training timesteps"),
    ],
)
def test_bad_timesteps_are_one_line_errors(model, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert run_cli(main, ["a cat", "--model", str(model), "--output", str(out), "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_timesteps_flag_is_refused_for_edits_and_garbage(model, tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), "red").save(init)
    argv = ["a cat", "--model", str(model), "--timesteps", "999/500", "--init_image", str(init)]
    assert run_cli(main, argv) == 2
    assert "--timesteps is for text-to-image" in capsys.readouterr().err
    assert run_cli(main, ["a cat", "--timesteps", "late/early"]) == 2
    assert "expected whole timesteps separated by '/', e.g. 999/700/400/100, got 'late/early'" in \
        capsys.readouterr().err


@pytest.mark.parametrize("sampler", samplers_taking("timesteps"))
def test_own_spacing_written_out_is_the_samplers_default(model, sampler):
    """sampling_grid's own_spacing relies on this: a grid-taking sampler given its own spacing as timesteps= makes
    the image it makes by default."""
    write_sampling_defaults(model, {"sampler": sampler, "num_inference_steps": 3, "timesteps": [999, 500, 100]})
    pipe = LatentDiffusionPipeline.from_pretrained(model)
    grid = sampling_grid(pipe, Request(["x"], own_spacing=True), 3)
    assert grid is not None and list(grid) != [999, 500, 100]
    own = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    own.set_timesteps(3)
    assert list(grid) == own.timesteps.tolist()

    def image(**kwargs):
        generator = torch.Generator().manual_seed(0)
        return pipe("a cat", num_inference_steps=3, generator=generator, output_type="np", **kwargs).images

    pipe.sampling_defaults = {k: v for k, v in pipe.sampling_defaults.items() if k != "timesteps"}
    assert np.array_equal(image(timesteps=list(grid)), image())


@pytest.mark.parametrize("grid, message", [([999, 999, 1, 0], "strictly decreasing"), ([999, 500], "one per step")])
def test_a_bad_grid_in_a_png_chunk_is_refused(tmp_path, tiny_pipeline_dir, grid, message):
    params = ImageParams("a cat", "", 1, 4, 1.0, "dpm++", 32, 32, str(tiny_pipeline_dir))
    chunk = json.loads(params.to_json())
    chunk["timesteps"] = grid
    info = PngImagePlugin.PngInfo()
    info.add_text("ldm_app", json.dumps(chunk))
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png", pnginfo=info)
    with pytest.raises(UserError, match=message):
        read_params(tmp_path / "a.png")
