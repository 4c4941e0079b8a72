"""Trajectory distillation (python -m ldm_app.train_distill with distill.method=trajectory) of the tiny random
text-to-image pipeline: the student's 4 solver steps on a grid learn to land where the teacher's 8 land. Checked:
the trainer's solver is the pipeline's own sampling (same latents), a few steps bring the student's 4-step result
nearer the teacher's 8-step one on noise it never trained on, the output samples on its grid by default, a SIGKILLed
run resumes to the same weights, two processes run, and bad settings are one line."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from ldm_helpers import (ROOT, assert_refused_in_one_line, distill_argv, kill_after_first_checkpoint,
                         make_text_matter, max_abs_diff, run_in_process, subprocess_env, weights)

from ldm_app.training.distill import main

pytestmark = pytest.mark.usefixtures("fresh_accelerate")

CONFIG = ROOT / "configs" / "distill" / "shapes64_trajectory.yaml"
UNET = "unet/diffusion_pytorch_model.safetensors"
GRID = [999, 700, 400, 100]
CAPTIONS = ["a red circle", "a blue square on the left"]
TINY = ["--train_batch_size", "2", "--max_train_steps", "8", "--checkpointing_steps", "4", "--learning_rate", "1e-3",
        "--set", "train.log_every=2", "--set", "data.holdout_fraction=0", "--set", "ldm.validation_prompts=[]"]


@pytest.fixture(scope="module")
def teacher(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """The tiny random pipeline with its text made to matter (a random U-Net barely reads it), and 8 renders."""
    from diffusers import UNet2DConditionModel

    from ldm_app.data.shapes import make_dataset

    root = tmp_path_factory.mktemp("trajectory_distill")
    folder = root / "teacher"
    shutil.copytree(tiny_pipeline_dir, folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    make_text_matter(unet)
    unet.save_pretrained(folder / "unet")
    make_dataset(root / "data", num_images=8, resolution=64, seed=0, free_caption_fraction=0.5)
    return folder


def args(teacher: Path, out: Path, *extra: str) -> list[str]:
    return distill_argv(teacher, out, CONFIG, *TINY, *extra)


@pytest.fixture(scope="module")
def trained(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    return out, run_in_process(main, args(teacher, out))


def _solve(folder: Path, steps: int, timesteps: list[int] | None, seed: int = 7) -> torch.Tensor:
    """Latents of the pipeline in `folder` at guidance 1 for CAPTIONS from fixed noise."""
    from ldm_app.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.set_sampler("dpm++")
    return pipe(CAPTIONS, num_inference_steps=steps, timesteps=timesteps, guidance_scale=1.0, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).images


def test_the_trainers_solver_is_the_pipelines_sampling(teacher, tmp_path):
    """At step 0 the student is the teacher: the trainer's 4-step solve on the grid and its 8-step solve of the
    teacher give the pipeline's own latents for the same noise and captions."""
    from ldm_app.training.distill import DistillTrainer, build_distill_models, load_run_config, parse_args
    from ldm_app.training.common import make_accelerator
    from ldm_app.training.ldm import build_train_dataset

    cfg = load_run_config(parse_args(args(teacher, tmp_path / "out")))
    models, frozen = build_distill_models(cfg)
    acc = make_accelerator(cfg.train, tmp_path / "out", cpu=True, report_to=None)
    trainer = DistillTrainer(cfg, models, frozen, build_train_dataset(cfg), acc, tmp_path / "out")
    c = trainer.text_states(CAPTIONS)
    shape = (len(CAPTIONS), frozen.config.in_channels, frozen.config.sample_size, frozen.config.sample_size)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        four = trainer.solve(trainer.unet, x_T, c, timesteps=GRID)
        eight = trainer.solve(frozen, x_T, c, steps=8)
    scale = eight.abs().max()
    assert (four - _solve(teacher, 4, GRID)).abs().max() <= 1e-5 * scale
    assert (eight - _solve(teacher, 8, None)).abs().max() <= 1e-5 * scale
    assert (four - eight).abs().max() > 1e-2 * scale  # a gap to close


def test_a_few_steps_bring_four_steps_nearer_eight(trained, teacher):
    out, result = trained
    assert result.step == 8 and all(x == x for x in result.losses)
    sampling = json.loads((out / "ldm_app.json").read_text())["sampling"]
    assert sampling["sampler"] == "dpm++" and sampling["timesteps"] == GRID
    assert sampling["num_inference_steps"] == 4 and sampling["guidance_scale"] == 1.0
    target = _solve(teacher, 8, None, seed=11)  # noise no training step drew
    before = (_solve(teacher, 4, GRID, seed=11) - target).pow(2).mean()
    after = (_solve(out, 4, GRID, seed=11) - target).pow(2).mean()
    assert after < 0.8 * before, (before, after)
    assert json.loads((out / "run_config.json").read_text())["distill"]["method"] == "trajectory"


def test_resume_after_sigkill_ends_with_the_same_weights(trained, teacher, tmp_path):
    straight, _ = trained
    killed = tmp_path / "killed"
    kill_after_first_checkpoint([sys.executable, "-m", "ldm_app.train_distill", *args(teacher, killed)], killed,
                                tmp_path / "killed.log")
    result = main(args(teacher, killed, "--resume_from_checkpoint", "latest"))
    assert result.step == 8
    assert max_abs_diff(weights(straight / UNET), weights(killed / UNET)) <= 1e-6


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_process_cpu_run(teacher, tmp_path):
    """Four student passes before one backward, under DDP (gloo): trains and ends with a distilled folder."""
    import subprocess

    out = tmp_path / "ddp"
    short = args(teacher, out, "--train_batch_size", "1", "--max_train_steps", "2", "--checkpointing_steps", "2")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "ldm_app.train_distill", *short],
                          capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max_abs_diff(weights(out / UNET), weights(teacher / UNET)) > 0


@pytest.mark.parametrize("setting, words", [
    ("ldm.validation_num_inference_steps=8", ("must be the number of distill.student_timesteps",)),
    ("ldm.validation_sampler=lcm", ("deterministic one that takes a timestep grid (dpm++, euler)",)),
    ("ldm.validation_sampler=ddim", ("deterministic one that takes a timestep grid",)),  # takes no grid
    ("ldm.validation_guidance_scale=3", ("validation_guidance_scale=1",)),
    ("distill.student_timesteps=[100,400]", ("strictly decreasing",)),
    ("distill.student_timesteps=[1200,700,400,100]", ("beyond this model's 1000 training timesteps",)),
    ("distill.teacher_steps=0", ("teacher_steps must be >= 1",)),
    ("data.resolution=32", ("data.resolution (32) must be the teacher's image size 64",)),  # it trained at 32
])
def test_bad_settings_are_one_line(teacher, tmp_path, capsys, setting, words):
    out = tmp_path / "out"
    assert_refused_in_one_line(main, args(teacher, out, "--set", setting), capsys, out, *words)


def test_a_teacher_that_samples_with_guidance_is_named(teacher, tmp_path, caplog):
    """Trajectory distillation follows its teacher at guidance 1: a teacher stored to sample at guidance 3 would
    give a student drawing as the teacher does without it. The run says so in one warning (and still runs: a user
    may mean it); a teacher without guidance in its defaults gets no such line."""
    from ldm_app.pipeline import write_sampling_defaults

    guided = tmp_path / "guided"
    shutil.copytree(teacher, guided)
    (tmp_path / "data").symlink_to(teacher.parent / "data")  # the renders beside it, as distill_argv expects
    write_sampling_defaults(guided, {"sampler": "dpm++", "num_inference_steps": 8, "guidance_scale": 3.0})
    one_step = ["--set", "train.max_train_steps=1"]
    with caplog.at_level("WARNING", logger="train_distill"):
        run_in_process(main, args(guided, tmp_path / "from_guided", *one_step))
    named = [r.getMessage() for r in caplog.records if "samples at guidance 3" in r.getMessage()]
    assert len(named) == 1 and "distill.method=guidance" in named[0], named
    assert (tmp_path / "from_guided" / "model_index.json").exists()

    caplog.clear()
    with caplog.at_level("WARNING", logger="train_distill"):
        run_in_process(main, args(teacher, tmp_path / "from_plain", *one_step))
    assert not [r for r in caplog.records if "samples at guidance" in r.getMessage()]


def test_output_dir_inside_the_data_folder_is_refused(teacher, capsys):
    out = teacher.parent / "data" / "student"
    assert_refused_in_one_line(main, args(teacher, out), capsys, out, "inside --train_data_dir")
