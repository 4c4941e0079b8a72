"""Guidance distillation (python -m ldm_app.train_distill with distill.method=guidance) of a tiny random inpainting
teacher: the student is a plain copy of the teacher's U-Net that learns to give in one pass what the teacher gives
in two under classifier-free guidance. Checked: the student moves toward the guided teacher on inputs it never
trained on, its folder is an inpainting folder diffusers' own StableDiffusionInpaintPipeline runs (one U-Net pass a
step, the same image as ours), a SIGKILLed run resumes to the same weights, and bad settings are one line."""

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

CONFIG = ROOT / "configs" / "distill" / "inpaint_guidance.yaml"
UNET = "unet/diffusion_pytorch_model.safetensors"
TINY = ["--train_batch_size", "2", "--max_train_steps", "8", "--checkpointing_steps", "4", "--learning_rate", "3e-4",
        "--set", "train.lr_warmup_steps=0", "--set", "train.lr_scheduler=constant", "--set", "train.log_every=2",
        "--set", "data.holdout_fraction=0", "--set", "ldm.ema_decay=0.5", "--set", "ldm.validation_prompts=[]",
        "--set", "ldm.validation_num_inference_steps=4"]


@pytest.fixture(scope="module")
def teacher(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """The tiny random pipeline made an inpainting model: its U-Net widened to 9 input channels, the new mask and
    masked-image weights random (so the condition matters), saved as an inpainting folder; and 8 renders."""
    from diffusers import UNet2DConditionModel

    from ldm_app.data.shapes import make_dataset
    from ldm_app.models import widen_unet_input

    root = tmp_path_factory.mktemp("guidance_distill")
    folder = root / "teacher"
    shutil.copytree(tiny_pipeline_dir, folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    widen_unet_input(unet, 9)
    with torch.no_grad():
        unet.conv_in.weight[:, 4:] = torch.randn(unet.conv_in.weight[:, 4:].shape,
                                                 generator=torch.Generator().manual_seed(1)) * 0.2
    make_text_matter(unet)  # so that guidance matters
    unet.save_pretrained(folder / "unet")
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionInpaintPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    make_dataset(root / "data", num_images=8, resolution=64, seed=0)
    return folder


def args(teacher: Path, out: Path, *extra: str) -> list[str]:
    return distill_argv(teacher, out, CONFIG, *TINY, *extra)


@pytest.fixture(scope="module")
def trained(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    return out, run_in_process(main, args(teacher, out))


def _probe() -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs none of the runs trained on: x_t with a random mask channel and masked latents, and timesteps."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(4, 9, 8, 8, generator=g)
    x[:, 4] = (torch.rand(4, 8, 8, generator=g) > 0.5).float()
    return x, torch.tensor([900, 600, 300, 50])


def test_the_student_moves_toward_the_guided_teacher(trained, teacher):
    """Distance of the student's single pass from the teacher's guidance-3 output, on held-out inputs: at step 0
    the student IS the teacher's conditional pass; after training it is closer to the guided output."""
    from diffusers import UNet2DConditionModel

    out, result = trained
    assert result.step == 8 and len(result.losses) == 8 and all(x == x and x >= 0 for x in result.losses)
    t_unet = UNet2DConditionModel.from_pretrained(teacher / "unet").eval()
    s_unet = UNet2DConditionModel.from_pretrained(out / "unet").eval()
    assert s_unet.config.in_channels == 9 and s_unet.config.time_cond_proj_dim is None  # a plain inpainting U-Net
    from ldm_app.conditioning import NULL_CAPTION, encode_text
    from ldm_app.models import load_text_encoder, load_tokenizer

    te = load_text_encoder(teacher / "text_encoder")
    tok = load_tokenizer(teacher / "tokenizer", model_max_length=te.config.max_position_embeddings)
    x, t = _probe()
    with torch.no_grad():
        c = encode_text(tok, te, ["a small red circle on the left on a white background"] * 4, "cpu")
        null = encode_text(tok, te, [NULL_CAPTION] * 4, "cpu")
        cond = t_unet(x, t, encoder_hidden_states=c).sample
        uncond = t_unet(x, t, encoder_hidden_states=null).sample
        guided = uncond + 3.0 * (cond - uncond)
        before = (cond - guided).pow(2).mean().item()
        after = (s_unet(x, t, encoder_hidden_states=c).sample - guided).pow(2).mean().item()
    assert before > 0 and after < 0.8 * before, (before, after)


def test_guidance_by_noise_level_is_folded_in(teacher, tmp_path):
    """distill.high_noise_guidance_scale: two runs alike but for guidance 6 at t >= 500 in one (1.5 elsewhere and
    in the other). On held-out inputs at t = 900 and 600, the first student is nearer the teacher's guidance-6
    output than the second. (Which timesteps take which scale: test_guidance_by_timestep.)"""
    from diffusers import UNet2DConditionModel

    from ldm_app.conditioning import NULL_CAPTION, encode_text
    from ldm_app.models import load_text_encoder, load_tokenizer

    outs = {}
    for name, extra in (("by_level", ["--set", "distill.high_noise_guidance_scale=6", "--set",
                                      "distill.high_noise_from=500"]), ("single", [])):
        outs[name] = tmp_path / name
        run_in_process(main, args(teacher, outs[name], "--set", "distill.guidance_scale=1.5", *extra))
    assert json.loads((outs["by_level"] / "run_config.json").read_text())["distill"]["high_noise_guidance_scale"] == 6
    t_unet = UNet2DConditionModel.from_pretrained(teacher / "unet").eval()
    te = load_text_encoder(teacher / "text_encoder")
    tok = load_tokenizer(teacher / "tokenizer", model_max_length=te.config.max_position_embeddings)
    x, t = _probe()
    x, t = x[:2], t[:2]  # t = 900, 600
    with torch.no_grad():
        c = encode_text(tok, te, ["a small red circle on the left on a white background"] * 2, "cpu")
        null = encode_text(tok, te, [NULL_CAPTION] * 2, "cpu")
        cond, uncond = (t_unet(x, t, encoder_hidden_states=e).sample for e in (c, null))
        guided = uncond + 6 * (cond - uncond)
        dist = {name: (UNet2DConditionModel.from_pretrained(out / "unet").eval()(x, t, encoder_hidden_states=c).sample
                       - guided).pow(2).mean().item() for name, out in outs.items()}
    assert dist["by_level"] < 0.95 * dist["single"], dist


def test_guidance_by_timestep():
    from ldm_app.training.distill import guidance_by_timestep

    t = torch.tensor([999, 850, 849, 0])
    assert guidance_by_timestep(t, 1.5, 2.5, 850).flatten().tolist() == [2.5, 2.5, 1.5, 1.5]
    assert guidance_by_timestep(t, 1.5, None, 850).flatten().tolist() == [1.5] * 4


def test_the_folder_samples_without_guidance_in_ours_and_in_diffusers(trained, teacher):
    """Stored defaults: the teacher's sampler (dpm++) and guidance 1; our pipeline runs the U-Net once a step (no
    unconditional pass) and diffusers' StableDiffusionInpaintPipeline gives the same image from the folder."""
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    from ldm_app.pipeline import LatentDiffusionInpaintPipeline

    out, _ = trained
    sampling = json.loads((out / "ldm_app.json").read_text())["sampling"]
    assert sampling["sampler"] == "dpm++" and sampling["guidance_scale"] == 1.0
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
    for part in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert max_abs_diff(weights(out / part), weights(teacher / part)) == 0  # frozen, carried over
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    ours = LatentDiffusionInpaintPipeline.from_pretrained(out)
    ours.set_progress_bar_config(disable=True)
    calls = []
    forward = ours.unet.forward

    def counting(sample, *a, **kw):
        calls.append(sample.shape)
        return forward(sample, *a, **kw)

    ours.unet.forward = counting
    mine = ours("a blue square", image=image, mask_image=mask, num_inference_steps=4,
                generator=torch.Generator().manual_seed(5), output_type="np").images
    ours.unet.forward = forward
    assert len(calls) == 4 and all(s[0] == 1 and s[1] == 9 for s in calls)
    theirs = StableDiffusionInpaintPipeline.from_pretrained(out, safety_checker=None, use_safetensors=True)
    theirs.set_progress_bar_config(disable=True)
    other = theirs("a blue square", image=image, mask_image=mask, num_inference_steps=4, guidance_scale=1.0,
                   height=64, width=64, generator=torch.Generator().manual_seed(5), output_type="np").images
    assert mine.shape == other.shape == (1, 64, 64, 3)
    assert abs(mine - other).max() <= 1e-5


def test_resume_after_sigkill_ends_with_the_same_weights(trained, teacher, tmp_path):
    straight, _ = trained
    killed = tmp_path / "killed"
    kill_after_first_checkpoint([sys.executable, "-m", "ldm_app.train_distill", *args(teacher, killed)], killed,
                                tmp_path / "killed.log")
    assert not (killed / "model_index.json").exists()
    result = main(args(teacher, killed, "--resume_from_checkpoint", "latest"))
    assert result.step == 8 and len(result.losses) == 4
    for name in ("model.safetensors", "ema.safetensors"):
        assert max_abs_diff(weights(straight / "checkpoint-8" / name), weights(killed / "checkpoint-8" / name)) <= 1e-6
    assert max_abs_diff(weights(straight / UNET), weights(killed / UNET)) <= 1e-6


def _refused(capsys, argv: list[str], out: Path, *words: str) -> None:
    assert_refused_in_one_line(main, argv, capsys, out, *words)


@pytest.mark.parametrize("setting, words", [
    ("distill.guidance_scale=1", ("guidance_scale must be > 1",)),
    ("distill.guidance_scale=nan", ("guidance_scale must be a finite number",)),
    ("distill.high_noise_guidance_scale=1", ("high_noise_guidance_scale must be > 1",)),
    ("distill.high_noise_from=0", ("high_noise_from must be a timestep >= 1",)),
    ("ldm.validation_guidance_scale=3", ("validation_guidance_scale=1",)),
    ("ldm.validation_sampler=lcm", ("keeps the teacher's sampler",)),
    ("ldm.caption_dropout=0.1", ("caption_dropout=0",)),
    ("ldm.cache_latents=true", ("cannot use cached latents",)),
    ("distill.method=progressive", ("distill.method must be one of",)),
    ("data.resolution=32", ("data.resolution (32) must be the teacher's image size 64",)),  # it trained at 32
])
def test_bad_settings_are_one_line(teacher, tmp_path, capsys, setting, words):
    out = tmp_path / "out"
    _refused(capsys, args(teacher, out, "--set", setting), out, *words)


def test_a_high_noise_scale_that_applies_nowhere_is_refused(teacher, tmp_path, capsys):
    out = tmp_path / "out"
    argv = args(teacher, out, "--set", "distill.high_noise_guidance_scale=2", "--set", "distill.high_noise_from=1000")
    _refused(capsys, argv, out, "high_noise_from (1000) must be below", "applies nowhere")


def test_a_text_to_image_teacher_is_refused_for_inpainting(tiny_pipeline_dir, teacher, tmp_path, capsys):
    out = tmp_path / "out"
    argv = args(teacher, out)
    argv[1] = str(tiny_pipeline_dir)  # a 4-channel U-Net with conditioning.concat=inpaint
    _refused(capsys, argv, out, "not an inpainting model", "4 input channels")


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_process_cpu_run(teacher, tmp_path):
    """What recipes/inpaint_shapes.sh runs: torchrun, 2 processes (gloo), the inpainting teacher."""
    import subprocess

    from ldm_app.checkpointing import list_checkpoints

    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "ldm_app.train_distill", *args(teacher, out, "--train_batch_size", "1")],
                          capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in list_checkpoints(out)][-1] == "checkpoint-8"
    assert json.loads((out / "ldm_app.json").read_text())["sampling"]["guidance_scale"] == 1.0
    assert max_abs_diff(weights(out / UNET), weights(teacher / UNET)) > 0  # trained


def test_a_negative_prompt_without_guidance_is_refused_not_dropped(trained, tiny_pipeline):
    """At guidance <= 1 (the student's stored default) diffusers runs no unconditional pass, so a negative prompt
    would be dropped without a word: refused in one line, for any model; an empty one is fine."""
    from PIL import Image

    from ldm_app.errors import UserError
    from ldm_app.pipeline import LatentDiffusionInpaintPipeline

    pipe = LatentDiffusionInpaintPipeline.from_pretrained(trained[0])
    image, mask = Image.new("RGB", (64, 64)), Image.new("L", (64, 64), 255)
    with pytest.raises(UserError, match="negative prompt acts only through classifier-free guidance"):
        pipe.check_call("a red circle", negative_prompt="blue", image=image, mask_image=mask)
    pipe.check_call("a red circle", negative_prompt="", image=image, mask_image=mask)
    pipe.check_call("a red circle", negative_prompt="blue", image=image, mask_image=mask, guidance_scale=2.0)
    with pytest.raises(UserError, match="at 1 it has no effect"):
        tiny_pipeline.check_call("a red circle", negative_prompt="blue", guidance_scale=1.0)


def test_a_text_to_image_teacher_distils_too(tiny_pipeline_dir, teacher, tmp_path):
    """conditioning.concat=none: the tiny text-to-image pipeline as the teacher; the student is a plain
    text-to-image folder diffusers' StableDiffusionPipeline loads, storing guidance 1."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "t2i"
    argv = args(teacher, out, "--set", "conditioning.concat=none", "--max_train_steps", "2",
                "--checkpointing_steps", "2")
    argv[1] = str(tiny_pipeline_dir)
    result = run_in_process(main, argv)
    assert result.step == 2 and all(x == x for x in result.losses)
    assert json.loads((out / "ldm_app.json").read_text())["sampling"]["guidance_scale"] == 1.0
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, use_safetensors=True)
    assert pipe.unet.config.in_channels == 4 and pipe.unet.config.time_cond_proj_dim is None
    assert max_abs_diff(weights(out / UNET), weights(tiny_pipeline_dir / UNET)) > 0


def test_a_consistency_distilled_teacher_is_refused(teacher, tmp_path, capsys):
    """A U-Net with a guidance embedding (an LCM student) is already distilled: refused for this method too."""
    from diffusers import UNet2DConditionModel

    lcm = tmp_path / "lcm"
    shutil.copytree(teacher, lcm)
    unet = UNet2DConditionModel.from_pretrained(lcm / "unet")
    UNet2DConditionModel.from_config(unet.config, time_cond_proj_dim=8).save_pretrained(lcm / "unet")
    out = tmp_path / "out"
    argv = args(teacher, out)
    argv[1] = str(lcm)
    _refused(capsys, argv, out, "already has a guidance embedding")


def test_a_guidance_distilled_teacher_is_refused(trained, teacher, tmp_path, capsys):
    """The student's conditional-only training left its unconditional output untrained: distilling it again is
    refused in one line."""
    out = tmp_path / "out"
    argv = args(teacher, out)
    argv[1] = str(trained[0])
    _refused(capsys, argv, out, "already guidance-distilled")
