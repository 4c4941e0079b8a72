"""Latent consistency distillation (python -m ldm_app.train_distill) on a tiny random teacher: a few steps train, the
student starts as the teacher, a run killed with SIGKILL resumes to the same weights, the output folder is a
pipeline that samples with one U-Net pass a step (ours and diffusers' own StableDiffusionPipeline, same image), and
bad input is one `error:` line with exit status 2 before anything is written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ldm_helpers import (ROOT, assert_refused_in_one_line, distill_argv, kill_after_first_checkpoint, max_abs_diff,
                         run_in_process, subprocess_env, weights)

from ldm_app.checkpointing import list_checkpoints
from ldm_app.training.distill import guidance_embedding, main, make_student

pytestmark = pytest.mark.usefixtures("fresh_accelerate")

CONFIG = ROOT / "configs" / "distill" / "tiny.yaml"
UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def teacher(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """The tiny random pipeline (64 px, 8x8 latents) as a teacher, with stored defaults, a vocabulary and a run
    config to be carried over; and 8 captioned 64 px renders."""
    from ldm_app.data.shapes import make_dataset
    from ldm_app.pipeline import write_sampling_defaults

    root = tmp_path_factory.mktemp("distill")
    folder = root / "teacher"
    shutil.copytree(tiny_pipeline_dir, folder)
    # a DPM-Solver++ scheduler config, as the bundled model's (its extra keys must not reach the student's)
    from diffusers import DPMSolverMultistepScheduler

    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    DPMSolverMultistepScheduler.from_config(config).save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "DPMSolverMultistepScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    write_sampling_defaults(folder, {"sampler": "ddim", "num_inference_steps": 20, "guidance_scale": 3.0,
                                     "height": 64, "width": 64})
    (folder / "vocabulary.json").write_text(json.dumps({"words": ["circle", "red"], "num_captions": 8}))
    (folder / "run_config.json").write_text(json.dumps({"teacher": True}))
    make_dataset(root / "data", num_images=8, resolution=64, seed=0)
    return folder


def args(teacher: Path, out: Path, *extra: str) -> list[str]:
    return distill_argv(teacher, out, CONFIG, *extra)


@pytest.fixture(scope="module")
def trained(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    return out, run_in_process(main, args(teacher, out))


# ---- the run and its output ----------------------------------------------------------------------------------


def test_a_few_steps_train_and_the_output_is_a_distilled_pipeline(trained, teacher):
    out, result = trained
    assert result.step == 6 and len(result.losses) == 6 and all(x == x and x >= 0 for x in result.losses)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3", "checkpoint-6"]
    unet = json.loads((out / "unet" / "config.json").read_text())
    assert unet["time_cond_proj_dim"] == 16
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "LCMScheduler" and scheduler["original_inference_steps"] == 50
    assert "algorithm_type" not in scheduler and scheduler["steps_offset"] == 1  # only LCMScheduler's keys
    assert json.loads((out / "ldm_app.json").read_text())["sampling"] == {
        "height": 64, "width": 64, "sampler": "lcm", "num_inference_steps": 4, "guidance_scale": 3.0}
    assert (out / "vocabulary.json").read_text() == (teacher / "vocabulary.json").read_text()
    assert json.loads((out / "teacher_run_config.json").read_text()) == {"teacher": True}
    assert "distill" in json.loads((out / "run_config.json").read_text())  # the run's own config
    # the VAE and text encoder are the teacher's, untouched; the exported U-Net is the target (EMA) network
    for part in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert max_abs_diff(weights(out / part), weights(teacher / part)) == 0
    ema = weights(out / "checkpoint-6" / "ema.safetensors")
    exported = weights(out / UNET)
    assert max_abs_diff({k: ema[f"unet.{k}"] for k in exported}, exported) == 0
    trained_proj = exported["time_embedding.cond_proj.weight"]
    assert trained_proj.abs().max() > 0  # the guidance embedding did train


def test_student_starts_as_the_teacher(teacher):
    """The guidance-embedding layer is zero at step 0: same output as the teacher for any input and guidance."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(teacher / "unet")
    student = make_student(unet, 16)
    assert student.config.time_cond_proj_dim == 16 and float(student.time_embedding.cond_proj.weight.detach().abs().sum()) == 0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([999, 500, 19])
    c = torch.randn(3, 77, unet.config.cross_attention_dim, generator=g)
    w = guidance_embedding(torch.tensor([1.0, 2.0, 3.0]), 16)
    with torch.no_grad():
        a = unet(x, t, encoder_hidden_states=c).sample
        b = student(x, t, encoder_hidden_states=c, timestep_cond=w).sample
    assert torch.equal(a, b)


def test_sampling_is_one_unet_pass_a_step_and_matches_diffusers(trained):
    """Our pipeline with the stored defaults (lcm, 4 steps, guidance 3) calls the U-Net once a step, on the prompt
    alone, with the guidance embedding; diffusers' StableDiffusionPipeline + LCMScheduler gives the same image."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from ldm_app.pipeline import LatentDiffusionPipeline

    out, _ = trained
    ours = LatentDiffusionPipeline.from_pretrained(out)
    ours.set_progress_bar_config(disable=True)
    assert type(ours.scheduler) is LCMScheduler
    calls = []
    forward = ours.unet.forward

    def counting(sample, timestep, *a, **kw):
        calls.append((sample.shape[0], kw.get("timestep_cond")))
        return forward(sample, timestep, *a, **kw)

    ours.unet.forward = counting
    image = ours("a red circle", generator=torch.Generator().manual_seed(3), output_type="np").images
    assert len(calls) == 4 and all(n == 1 and cond is not None and cond.shape == (1, 16) for n, cond in calls)
    ours.unet.forward = forward

    theirs = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, use_safetensors=True)
    theirs.set_progress_bar_config(disable=True)
    assert type(theirs.scheduler) is LCMScheduler
    other = theirs("a red circle", num_inference_steps=4, guidance_scale=3.0, height=64, width=64,
                   generator=torch.Generator().manual_seed(3), output_type="np").images
    assert image.shape == other.shape == (1, 64, 64, 3)
    assert abs(image - other).max() <= 1e-5


def test_a_negative_prompt_is_refused_not_dropped(trained):
    """A guidance-embedded U-Net gets no unconditional pass, so diffusers would drop a negative prompt without a
    word: ours refuses it in one line (an empty one is fine)."""
    from ldm_app.errors import UserError
    from ldm_app.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(trained[0])
    with pytest.raises(UserError, match="negative prompt has no effect"):
        pipe.check_call("a red circle", negative_prompt="blue")
    pipe.check_call("a red circle", negative_prompt="")


# ---- exact resume after SIGKILL --------------------------------------------------------------------------------


def test_resume_after_sigkill_ends_with_the_same_weights(trained, teacher, tmp_path):
    straight, _ = trained
    killed = tmp_path / "killed"
    kill_after_first_checkpoint([sys.executable, "-m", "ldm_app.train_distill", *args(teacher, killed)], killed,
                                tmp_path / "killed.log")
    assert not (killed / "model_index.json").exists()  # killed before the end

    result = main(args(teacher, killed, "--resume_from_checkpoint", "latest"))
    assert result.step == 6 and len(result.losses) == 3  # resumed from checkpoint-3, mid-epoch (4 batches of 2)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = weights(straight / "checkpoint-6" / name), weights(killed / "checkpoint-6" / name)
        assert max_abs_diff(a, b) <= 1e-6, name
    assert max_abs_diff(weights(straight / UNET), weights(killed / UNET)) <= 1e-6


# ---- bad input: one line, exit 2, before any work ------------------------------------------------------------


def _refused(capsys, argv: list[str], out: Path, *words: str) -> None:
    assert_refused_in_one_line(main, argv, capsys, out, *words)


def test_missing_teacher_is_one_line(teacher, tmp_path, capsys):
    out = tmp_path / "out"
    _refused(capsys, args(tmp_path / "nowhere", out), out, "--teacher", "not found")
    _refused(capsys, args(teacher.parent / "data", out), out, "not a pipeline folder")
    argv = args(teacher, out)
    del argv[:2]
    _refused(capsys, argv, out, "--teacher")


def test_an_already_distilled_teacher_is_refused(trained, teacher, tmp_path, capsys):
    student, _ = trained
    out = tmp_path / "out"
    argv = args(teacher, out)
    argv[1] = str(student)  # --teacher: a distilled model
    _refused(capsys, argv, out, "already has a guidance embedding", "time_cond_proj_dim=16")


def test_a_guidance_distilled_teacher_distils_only_without_more_guidance(teacher, tmp_path, capsys):
    """A guidance-distilled teacher (the bundled model) never learned its unconditional output: LCM with guidance
    w > 0 is refused in one line naming the way out; with w = 0 (guidance 1) it trains, and the teacher runs one
    conditional pass a step (batch B, not the guided 2B)."""
    gd = tmp_path / "guidance_distilled"
    shutil.copytree(teacher, gd)
    (gd / "run_config.json").write_text(json.dumps({"distill": {"method": "guidance", "guidance_scale": 1.5}}))
    out = tmp_path / "out"
    argv = args(gd, out)
    argv[argv.index("--train_data_dir") + 1] = str(teacher.parent / "data")
    _refused(capsys, argv, out, "already guidance-distilled", "distill.w_max=0")

    without = [*argv, "--set", "distill.w_min=0", "--set", "distill.w_max=0", "--set",
               "ldm.validation_guidance_scale=1", "--max_train_steps", "2", "--checkpointing_steps", "2"]
    from diffusers import UNet2DConditionModel

    batches: list[int] = []
    forward = UNet2DConditionModel.forward

    def counting(self, sample, *a, **k):
        if self.config.time_cond_proj_dim is None:  # the teacher (the student has a guidance embedding)
            batches.append(sample.shape[0])
        return forward(self, sample, *a, **k)

    UNet2DConditionModel.forward = counting
    try:
        result = run_in_process(main, without)
    finally:
        UNet2DConditionModel.forward = forward
    assert result.step == 2 and all(x == x and x >= 0 for x in result.losses)
    assert batches == [2, 2]  # train_batch_size 2: one conditional pass per step
    stored = json.loads((out / "ldm_app.json").read_text())["sampling"]
    assert stored["sampler"] == "lcm" and stored["guidance_scale"] == 1.0
    student, base = weights(out / UNET), weights(teacher / UNET)
    assert max_abs_diff({k: student[k] for k in base}, base) > 0  # trained (cond_proj is the student's own)


@pytest.mark.parametrize("setting, words", [
    ("data.resolution=32", ("data.resolution (32)", "64")),
    ("ldm.validation_guidance_scale=7.5", ("outside the distilled range",)),
    ("ldm.validation_sampler=ddim", ("must be lcm",)),
    ("distill.w_min=4", ("w_min <= w_max",)),
    ("ldm.use_ema=false", ("target network",)),
    ("distill.bogus=1", ("unknown config key",)),
    ("distill.num_ddim_timesteps=2000", ("exceeds the teacher's 1000",)),
    ("ldm.train_text_encoder=true", ("train_text_encoder", "frozen text encoder")),
])
def test_bad_settings_are_one_line(teacher, tmp_path, capsys, setting, words):
    out = tmp_path / "out"
    _refused(capsys, args(teacher, out, "--set", setting), out, *words)


# ---- two processes (torchrun, gloo): what recipes/distill.sh runs ----------------------------------------------


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_process_cpu_run(teacher, tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "ldm_app.train_distill",
                           *args(teacher, out)], capture_output=True, text=True, env=subprocess_env(), cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3", "checkpoint-6"]
    assert json.loads((out / "ldm_app.json").read_text())["sampling"]["sampler"] == "lcm"
    assert weights(out / UNET)["time_embedding.cond_proj.weight"].abs().max() > 0
