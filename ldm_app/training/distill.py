"""train_distill: latent consistency distillation (LCD; Luo et al. 2023, "Latent Consistency Models") of a trained
text-to-image model (the teacher) into a few-step model with classifier-free guidance folded in, so that sampling
takes 1-8 steps of ONE U-Net pass each (`--sampler lcm`).

    python -m ldm_app.train_distill --teacher DIR --train_data_dir DATA --output_dir OUT
        [--config configs/distill/shapes64_lcm.yaml] [--set key=value] [--resume_from_checkpoint latest]

The maths is transcribed from diffusers' examples/consistency_distillation/train_lcm_distill_sd_wds.py (its
webdataset plumbing is not): one optimisation step on B cached latents x0 with captions c,

    n ~ U{0..N-1}, s = tau_n = (n + 1) T/N - 1, t = max(s - T/N, 0)   the teacher's DDIM grid of N timesteps (N = 50:
                                                                      a solver step skips k = T/N = 20 timesteps)
    w ~ U[w_min, w_max]                                               guidance, as diffusers' guidance_scale - 1
    x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps
    teacher, one DDIM step s -> t with guidance w (x0 and eps guided alike):
        x0^ = x0_c + w (x0_c - x0_u),  eps^ = eps_c + w (eps_c - eps_u)
        x_t = sqrt(abar'_n) x0^ + sqrt(1 - abar'_n) eps^              abar'_n = abar at the previous grid point
    f(x, s) = c_skip(s) x + c_out(s) x0(F(x, s, w, c))                the consistency function, boundary scalings of
                                                                      LCMScheduler (timestep_scaling 10, sigma_data 0.5)
    loss = mean( sqrt((f_student(x_s, s) - f_target(x_t, t))^2 + c^2) - c )      pseudo-Huber, c = huber_c

The student is the teacher's U-Net with `time_cond_proj_dim` set: diffusers' guidance embedding (the sinusoidal
embedding of w, `StableDiffusionPipeline.get_guidance_scale_embedding`, added to the time embedding through
`time_embedding.cond_proj`). That new layer starts at zero, so at step 0 the student IS the teacher. The target
network is the EMA of the student (diffusers' EMAModel, decay `ldm.ema_decay` = 0.95 as in the reference; EMAModel
ramps the decay up as (1 + n) / (10 + n) over the first ~170 steps, where the reference starts the target as a copy
of the teacher at 0.95). The text encoder and autoencoder are frozen (latents and text states cached).

Everything else is train_ldm.py's machinery, reused by subclassing its trainer: accelerate, per-step generators
(exact resume), checkpoints that are pipeline folders (here with the target/EMA U-Net and an LCMScheduler), the
progress bar, validation grids, atomic writes and one-line errors before any work. OUT ends as a complete pipeline
folder (the teacher's VAE, text encoder and tokenizer, the student U-Net, an LCMScheduler config) with sampling
defaults in ldm_app.json (sampler lcm, `ldm.validation_num_inference_steps` steps, `ldm.validation_guidance_scale`),
the teacher's vocabulary.json when it has one, and its run_config.json as teacher_run_config.json (OUT's own
run_config.json is this run's config, which ties the folder to it for --resume_from_checkpoint).

`distill.method: guidance` is the other distillation here, guidance distillation (Meng et al. 2023, "On
Distillation of Guided Diffusion Models", stage one, with fixed guidance scales): the student, a plain copy of the
teacher's U-Net, learns to give in ONE pass what the teacher gives in two under classifier-free guidance,

    t ~ U{0..T-1}, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    loss = || F_student(x_t, t, c) - [F(x_t, t, null) + s (F(x_t, t, c) - F(x_t, t, null))] ||^2   s = guidance_scale

(F: the teacher's output, whatever its prediction type: the guided combination is linear). It keeps the teacher's
sampler and steps and stores guidance 1 (no classifier-free guidance, half the U-Net calls), and it works for an
inpainting teacher too (`conditioning.concat: inpaint`: both see the same random mask and masked-image latents),
whose output stays a diffusers StableDiffusionInpaintPipeline folder. configs/distill/inpaint_guidance.yaml.

Guidance by noise level: with `distill.high_noise_guidance_scale` set, s is that scale where t >= high_noise_from
and guidance_scale below it (cf. Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval", who vary
guidance with the noise level too). Measured on the shapes model (docs/few_step/README.md, "Guidance by noise
level"): sampled at 4 steps on the grid 999/700/400/100, its teacher kept colour and relation with guidance 2 at the
first step and 1.5 after it, where one scale everywhere traded them (1.5 lost colour, 2 the relation); a student
distilled with 2 at t >= 850 gained 0.006-0.013 on free-form prompts and lost 0.007 of canonical relation, so the
bundled model does not use it.

`distill.method: trajectory` distils a model that samples without guidance (a guidance-distilled one) into fewer
solver steps on a fixed grid: knowledge distillation of the sampler's output (Luhman & Luhman 2021, "Knowledge
Distillation in Iterative Generative Models for Improved Sampling Speed"), with the solver in the loop. From the
same x_T ~ N(0, I) and caption c, the student's `len(student_timesteps)` steps of the sampler
(`ldm.validation_sampler`, e.g. DPM-Solver++) on the grid `student_timesteps` must land where the teacher's
`teacher_steps` steps (its own spacing) land:

    loss = || Solve_student(x_T, c; student_timesteps) - Solve_teacher(x_T, c; teacher_steps) ||^2

backpropagated through every student step (the sampler's update is linear in the U-Net outputs). No image is
needed (only the captions); the student starts as an exact copy of the teacher, and the grid is stored with the
output (ldm_app.json `sampling.timesteps`), so it samples as it was trained. configs/distill/shapes64_trajectory.yaml.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..config import flag_overrides, from_dict, merge, parse_overrides, read_yaml, to_dict, validate
from ..errors import ArgumentParser, UserError
from ..first_stage import downsampling_factor
from ..limits import check_timestep_grid
from .common import (REPORT_TO, check_launchable, check_output_dir, check_report_to, launched_processes,
                     make_accelerator, open_run_folder, rows_sha256, setup_logging)
from .ldm import MAY_DIFFER_ON_RESUME as LDM_MAY_DIFFER
from .ldm import (LDMRunConfig, LDMTrainer, Models, build_models, build_train_dataset, check_concat,
                  check_enough_images, check_strategy)

logger = logging.getLogger("train_distill")

MAY_DIFFER_ON_RESUME = LDM_MAY_DIFFER
TEACHER_FILES = {"vocabulary.json": "vocabulary.json", "run_config.json": "teacher_run_config.json"}


# --------------------------------------------------------------------------------------------------------------
# Run configuration


@dataclass
class DistillSection:
    """What is specific to distillation: `method`, then guidance distillation's scale, trajectory distillation's
    steps and grid, then latent consistency distillation's settings. The stored sampling defaults are the
    `ldm.validation_*` settings (lcd: sampler lcm, steps, guidance; guidance: the teacher's sampler and steps,
    guidance 1; trajectory: its sampler, steps and grid, guidance 1), which also make the validation grids."""

    method: Literal["lcd", "guidance", "trajectory"] = "lcd"  # latent consistency, guidance or trajectory (above)
    guidance_scale: float = 3.0  # method guidance: the teacher's classifier-free guidance folded into the student
    # method guidance: another scale folded in at t >= high_noise_from (None: guidance_scale at every t; module doc,
    # "Guidance by noise level")
    high_noise_guidance_scale: float | None = None
    high_noise_from: int = 850
    teacher_steps: int = 8  # method trajectory: the teacher's steps (its sampler's own spacing) ...
    student_timesteps: list[int] = field(default_factory=lambda: [999, 700, 400, 100])  # ... and the student's grid
    num_ddim_timesteps: int = 50  # N: the teacher's DDIM solver grid (LCMScheduler's original_inference_steps)
    w_min: float = 1.0  # guidance w ~ U[w_min, w_max] per image, as diffusers' guidance_scale - 1 (the reference's
    w_max: float = 3.0  # 5..15 is for SD 1.5; this toolkit's shapes models are best near guidance_scale 3)
    time_cond_proj_dim: int = 256  # width of the guidance embedding (the reference's default)
    timestep_scaling: float = 10.0  # LCMScheduler's boundary-condition scaling
    loss_type: Literal["huber", "l2"] = "huber"
    huber_c: float = 0.001

    def validate(self) -> None:
        if self.guidance_scale <= 1:
            raise UserError(f"distill.guidance_scale must be > 1 (1 is the teacher without guidance), got "
                            f"{self.guidance_scale:g}")
        if self.high_noise_guidance_scale is not None and self.high_noise_guidance_scale <= 1:
            raise UserError(f"distill.high_noise_guidance_scale must be > 1 (or null: guidance_scale at every "
                            f"timestep), got {self.high_noise_guidance_scale:g}")
        if self.high_noise_from < 1:
            raise UserError(f"distill.high_noise_from must be a timestep >= 1, got {self.high_noise_from}")
        if self.num_ddim_timesteps < 1:
            raise UserError(f"num_ddim_timesteps must be >= 1, got {self.num_ddim_timesteps}")
        if not 0 <= self.w_min <= self.w_max:
            raise UserError(f"need 0 <= w_min <= w_max, got w_min={self.w_min:g}, w_max={self.w_max:g}")
        if self.time_cond_proj_dim < 2 or self.time_cond_proj_dim % 2:
            raise UserError(f"time_cond_proj_dim must be an even number >= 2, got {self.time_cond_proj_dim}")
        if self.timestep_scaling <= 0 or self.huber_c <= 0:
            raise UserError("timestep_scaling and huber_c must be > 0")
        if self.teacher_steps < 1:
            raise UserError(f"distill.teacher_steps must be >= 1, got {self.teacher_steps}")
        check_timestep_grid(self.student_timesteps, None, "distill.student_timesteps")


@dataclass
class DistillRunConfig(LDMRunConfig):
    """train_ldm.py's run config (the data, train and ldm sections are used; unet, text_encoder and noise are the
    teacher's, read from its folder) plus the `distill` section."""

    distill: DistillSection = field(default_factory=DistillSection)

    def validate(self) -> None:
        if not self.ldm.pretrained_model:
            raise UserError("give --teacher MODEL_DIR (a pipeline folder: train_ldm.py's output or the bundled model)")
        if self.lora.rank is not None or self.embedding.token is not None:
            raise UserError("lora.* and embedding.* do not apply to distillation: the student is a whole U-Net")
        if self.ldm.train_text_encoder:
            raise UserError("ldm.train_text_encoder does not apply to distillation: the student shares the "
                            "teacher's frozen text encoder")
        if self.distill.method == "guidance":
            self._validate_guidance()
            return
        if self.distill.method == "trajectory":
            self._validate_trajectory()
            return
        if self.conditioning.kind != "text" or self.conditioning.concat != "none":
            raise UserError("only text-to-image teachers can be distilled by lcd (conditioning.kind=text, "
                            "concat=none); an inpainting teacher by distill.method=guidance")
        if not self.ldm.use_ema:
            raise UserError("ldm.use_ema must stay on: the EMA of the student is the consistency target network")
        if self.ldm.validation_sampler != "lcm":
            raise UserError(f"ldm.validation_sampler must be lcm for a distilled model, got "
                            f"{self.ldm.validation_sampler!r}")
        n = self.ldm.validation_num_inference_steps
        if n > self.distill.num_ddim_timesteps:
            raise UserError(f"ldm.validation_num_inference_steps ({n}) must be <= distill.num_ddim_timesteps "
                            f"({self.distill.num_ddim_timesteps})")
        g, d = self.ldm.validation_guidance_scale, self.distill
        if not 1 + d.w_min <= g <= 1 + d.w_max:
            raise UserError(f"ldm.validation_guidance_scale {g:g} is outside the distilled range 1 + [w_min, w_max] "
                            f"= [{1 + d.w_min:g}, {1 + d.w_max:g}]")

    def _validate_trajectory(self) -> None:
        d, ldm = self.distill, self.ldm
        if self.conditioning.kind != "text" or self.conditioning.concat != "none":
            raise UserError("distill.method=trajectory needs a text-to-image teacher (conditioning.kind=text, "
                            "concat=none)")
        from ..samplers import ANCESTRAL_SAMPLERS, samplers_taking

        solvers = [name for name in samplers_taking("timesteps") if name not in ANCESTRAL_SAMPLERS]
        if ldm.validation_sampler not in solvers:  # the same x_T must give the same x_0
            raise UserError(f"distill.method=trajectory solves with ldm.validation_sampler, which must be a "
                            f"deterministic one that takes a timestep grid ({', '.join(solvers)}), got "
                            f"{ldm.validation_sampler!r}")
        if ldm.validation_num_inference_steps != len(d.student_timesteps):
            raise UserError(f"ldm.validation_num_inference_steps ({ldm.validation_num_inference_steps}) must be the "
                            f"number of distill.student_timesteps ({len(d.student_timesteps)})")
        if ldm.validation_guidance_scale != 1 or ldm.caption_dropout:
            raise UserError("distill.method=trajectory follows a teacher that samples without guidance (one pass a "
                            "step): set ldm.validation_guidance_scale=1 and ldm.caption_dropout=0")

    def _validate_guidance(self) -> None:
        if self.conditioning.kind != "text":
            raise UserError("distill.method=guidance needs a text-conditioned teacher (conditioning.kind=text)")
        if self.ldm.validation_sampler == "lcm":
            raise UserError("distill.method=guidance keeps the teacher's sampler: set ldm.validation_sampler to it "
                            "(e.g. dpm++), not lcm")
        if self.ldm.validation_guidance_scale != 1:
            raise UserError(f"distill.method=guidance folds guidance {self.distill.guidance_scale:g} into the student, "
                            f"which samples without it: set ldm.validation_guidance_scale=1, not "
                            f"{self.ldm.validation_guidance_scale:g}")
        if self.ldm.caption_dropout:
            raise UserError("distill.method=guidance learns the guided output for the caption given: set "
                            "ldm.caption_dropout=0")


# Defaults that differ from train_ldm.py's (below the YAML file and the command line).
DEFAULTS: dict[str, Any] = {
    "train": {"learning_rate": 1e-4, "lr_scheduler": "constant", "max_train_steps": 1000},  # the reference's lr
    "ldm": {"caption_dropout": 0.0, "snr_gamma": None, "use_ema": True, "ema_decay": 0.95, "cache_latents": True,
            "validation_sampler": "lcm", "validation_num_inference_steps": 4, "validation_guidance_scale": 3.0},
}


# --------------------------------------------------------------------------------------------------------------
# Command line

FLAG_KEYS = {
    "teacher": "ldm.pretrained_model", "train_data_dir": "data.train_data_dir",
    "caption_column": "data.caption_column", "max_train_steps": "train.max_train_steps",
    "checkpointing_steps": "train.checkpointing_steps", "checkpoints_total_limit": "train.checkpoints_total_limit",
    "seed": "train.seed", "learning_rate": "train.learning_rate", "train_batch_size": "train.train_batch_size",
    "cache_dir": "ldm.cache_dir", "validation_steps": "ldm.validation_steps",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m ldm_app.train_distill",
                       description="Distil a model into a few-step latent consistency model (LCM), or (--set "
                       "distill.method=guidance, configs/distill/inpaint_guidance.yaml) into one that samples without "
                       "classifier-free guidance at half the U-Net calls (text-to-image or inpainting teachers), or "
                       "(distill.method=trajectory, configs/distill/shapes64_trajectory.yaml) into fewer solver steps "
                       "on a fixed grid.")
    p.add_argument("--teacher", help="the model to distil: a pipeline folder (train_ldm.py's output, the bundled "
                   "ldm_app/assets/default_model; an inpainting model for method guidance)")
    p.add_argument("--train_data_dir", help="images with a metadata.jsonl (the teacher's training data, or like it)")
    p.add_argument("--output_dir", required=True, help="run folder: checkpoints, logs, and the final pipeline")
    p.add_argument("--config", help="YAML file overriding the defaults (configs/distill/*.yaml)")
    p.add_argument("--caption_column", help="the caption column of metadata.jsonl (default: text)")
    p.add_argument("--resume_from_checkpoint", help="a checkpoint folder, or 'latest' (fresh start if none)")
    for name in ("max_train_steps", "checkpointing_steps", "checkpoints_total_limit", "seed", "train_batch_size",
                 "validation_steps"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--learning_rate", type=float)
    p.add_argument("--cache_dir", help="where the latent cache goes (default OUTPUT_DIR/latent_cache)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="any config key")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    p.add_argument("--report_to", choices=REPORT_TO, default="tensorboard",
                   help="where the training curves go (OUT/logs for TensorBoard; 'all': every installed tracker)")
    return p.parse_args(argv)


def load_run_config(args: argparse.Namespace) -> DistillRunConfig:
    """DEFAULTS, then the YAML file, then --set, then the dedicated flags; validated."""
    data = merge(DEFAULTS, read_yaml(args.config) if args.config else {})
    data = merge(data, merge(parse_overrides(args.set), flag_overrides(args, FLAG_KEYS)))
    if not (data.get("ldm") or {}).get("pretrained_model"):  # before train_ldm's own wording (--pretrained_model)
        raise UserError("give --teacher MODEL_DIR (a pipeline folder: train_ldm.py's output or the bundled model)")
    cfg = from_dict(DistillRunConfig, data)
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------------------------
# Models


def check_teacher_folder(folder: str) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"--teacher folder {folder!r} not found")
    if not (path / "model_index.json").is_file():
        raise UserError(f"--teacher {folder!r} is not a pipeline folder (no model_index.json)")
    return path


def make_student(teacher_unet: Any, proj_dim: int) -> Any:
    """The teacher's U-Net with diffusers' guidance embedding (`time_cond_proj_dim`): the teacher's weights, and
    the new `time_embedding.cond_proj` (a bias-free linear layer added to the time embedding's input) all zero, so
    the student's output equals the teacher's for every input and guidance at step 0."""
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel.from_config(teacher_unet.config, time_cond_proj_dim=proj_dim)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected, (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


def build_distill_models(cfg: DistillRunConfig) -> tuple[Models, Any]:
    """(models with the student as `unet`, the frozen teacher U-Net); every problem a one-line UserError."""
    teacher = check_teacher_folder(cfg.ldm.pretrained_model)
    if cfg.conditioning.concat != "none":  # build_models would widen a text-to-image U-Net: no teacher for the mask
        try:
            in_channels = json.loads((teacher / "unet" / "config.json").read_text(encoding="utf-8"))["in_channels"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"--teacher {str(teacher)!r}: unreadable unet/config.json ({e})") from None
        if in_channels != 9:
            raise UserError(f"--teacher {str(teacher)!r} is not an inpainting model (its U-Net takes {in_channels} "
                            "input channels, an inpainting model 9): distil it with conditioning.concat=none")
    models = build_models(cfg)  # the teacher's autoencoder, text encoder (frozen), tokenizer, U-Net, noise schedule
    unet = models.unet
    if unet.config.time_cond_proj_dim is not None:
        raise UserError(f"--teacher {str(teacher)!r}: its U-Net already has a guidance embedding (time_cond_proj_dim="
                        f"{unet.config.time_cond_proj_dim}), so it is already distilled; give the model it came from")
    # its unconditional output was never trained: nothing to guide with. Latent consistency distillation without
    # further guidance (w_min = w_max = 0) needs only its conditional output, which is what it was trained to give.
    more_guidance = cfg.distill.method == "guidance" or (cfg.distill.method == "lcd" and cfg.distill.w_max > 0)
    if _distilled_by_guidance(teacher) and more_guidance:
        raise UserError(f"--teacher {str(teacher)!r} is already guidance-distilled (its run_config.json has "
                        "distill.method=guidance): give the model it came from, or distil it to fewer steps without "
                        "more guidance (distill.w_min=0 distill.w_max=0, ldm.validation_guidance_scale=1)")
    f = downsampling_factor(models.vae)
    side = unet.config.sample_size * f  # every method: the student learns at the size the teacher samples at
    if cfg.data.resolution != side:
        raise UserError(f"data.resolution ({cfg.data.resolution}) must be the teacher's image size {side} (latent side "
                        f"{unet.config.sample_size} x autoencoder factor {f}): --set data.resolution={side}")
    LDMTrainer.check_class_embedding(cfg, unet)  # a class- or scalar-conditioned U-Net is refused here
    d, T = cfg.distill, models.diffusion.scheduler.config.num_train_timesteps  # the teacher's training timesteps
    if d.method == "trajectory":
        check_timestep_grid(d.student_timesteps, None, "distill.student_timesteps", T)
        warn_if_guided(teacher)
    if d.method == "guidance" and d.high_noise_guidance_scale is not None and d.high_noise_from >= T:
        raise UserError(f"distill.high_noise_from ({d.high_noise_from}) must be below the teacher's {T} training "
                        f"timesteps, or high_noise_guidance_scale {d.high_noise_guidance_scale:g} applies nowhere")
    if d.method in ("guidance", "trajectory"):  # the student starts as an exact copy of the teacher
        models.unet = copy.deepcopy(unet)
        return models, unet.requires_grad_(False).eval()
    if d.num_ddim_timesteps > T:
        raise UserError(f"distill.num_ddim_timesteps ({d.num_ddim_timesteps}) exceeds the teacher's {T} "
                        "training timesteps")
    models.unet = make_student(unet, d.time_cond_proj_dim)
    return models, unet.requires_grad_(False).eval()


def warn_if_guided(teacher: Path) -> None:
    """Trajectory distillation follows the teacher at guidance 1. A teacher whose stored defaults sample with
    classifier-free guidance would give a student that draws as the teacher does without it: say so once (a
    user may mean it; the student's own defaults say guidance 1)."""
    from ..pipeline import read_sampling_defaults

    scale = read_sampling_defaults(teacher).get("guidance_scale", 1.0)
    if scale > 1:
        logger.warning(f"--teacher {str(teacher)!r} samples at guidance {scale:g} (its ldm_app.json), and "
                       "distill.method=trajectory follows it without guidance: the student will draw as the teacher "
                       "does at guidance 1. Fold the guidance in first (distill.method=guidance) and distil that")


def _distilled_by_guidance(folder: Path) -> bool:
    """Whether `folder` is train_distill's output with distill.method=guidance (its own run_config.json says so)."""
    try:
        distill = json.loads((folder / "run_config.json").read_text(encoding="utf-8")).get("distill")
    except (OSError, ValueError, AttributeError):
        return False  # no run config (a diffusers folder, the bundled model): nothing says it was distilled
    return isinstance(distill, dict) and distill.get("method") == "guidance"


def guidance_by_timestep(t: torch.Tensor, scale: float, high_noise_scale: float | None,
                         high_noise_from: int) -> torch.Tensor:
    """(B, 1, 1, 1): the guidance scale guidance distillation folds in for each sample's timestep: `high_noise_scale`
    where t >= high_noise_from, `scale` elsewhere (everywhere when high_noise_scale is None)."""
    w = torch.full((len(t), 1, 1, 1), float(scale))
    if high_noise_scale is not None:
        w[t.detach().cpu() >= high_noise_from] = float(high_noise_scale)
    return w.to(t.device)


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, dim): the embedding of guidance w that diffusers' StableDiffusionPipeline feeds as `timestep_cond`
    (it passes guidance_scale - 1): its own function, so training and sampling cannot disagree."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)


def lcm_scheduler(teacher: Path, d: DistillSection) -> Any:
    """The student's LCMScheduler: the teacher's noise schedule, the distillation's grid and boundary scalings,
    SD's steps_offset=1 and no x0 clipping (what both our pipeline and diffusers' apply on load)."""
    from diffusers import LCMScheduler

    import inspect

    config = LCMScheduler.load_config(str(teacher / "scheduler"))
    # only LCMScheduler's own keys: a DPM-Solver teacher's extra keys would be saved with the student and make
    # diffusers log "config attributes ... will be ignored" on every load
    known = inspect.signature(LCMScheduler.__init__).parameters
    config = {k: v for k, v in config.items() if k in known}
    return LCMScheduler.from_config(config, original_inference_steps=d.num_ddim_timesteps,
                                    timestep_scaling=d.timestep_scaling, clip_sample=False, steps_offset=1)


# --------------------------------------------------------------------------------------------------------------
# The trainer


class DistillTrainer(LDMTrainer):
    """train_ldm.py's trainer with a distillation loss: the prepared `unet` is the student, `teacher` is frozen;
    for lcd the EMA (`self.ema`, exported in checkpoints and the output) is the consistency target network, for
    guidance it is the usual EMA of the student."""

    def __init__(self, cfg: DistillRunConfig, models: Models, teacher: Any, dataset: Any, accelerator: Any,
                 output_dir: Path):
        super().__init__(cfg, models, dataset, accelerator, output_dir)
        device, d = accelerator.device, cfg.distill
        self.teacher = teacher.to(device)
        if d.method == "guidance":  # train_ldm's noise schedule (self.m.diffusion) is all it needs
            return
        if d.method == "trajectory":  # the teacher's own scheduler config: its sampler settings, not only the schedule
            from diffusers import DDPMScheduler

            # any scheduler class reads the file; make_scheduler then builds the sampler from it as a pipeline would
            self.solver_config = DDPMScheduler.load_config(str(Path(cfg.ldm.pretrained_model) / "scheduler"))
            return
        self.scheduler = lcm_scheduler(Path(cfg.ldm.pretrained_model), d)
        abar = self.scheduler.alphas_cumprod.to(device, torch.float32)  # the sampler's own schedule
        self.alpha, self.sigma = abar.sqrt(), (1 - abar).sqrt()
        T = self.scheduler.config.num_train_timesteps  # num_ddim_timesteps <= T: checked in build_distill_models
        # The DDIM solver by hand, as the reference's DDIMSolver: DDIMScheduler.step takes one scalar timestep for
        # the whole batch, and here every image has its own. Grid tau_n = (n + 1) k - 1 (LCMScheduler's
        # lcm_origin_timesteps), abar'_n = abar at tau_{n-1} (abar_0 for n = 0).
        self.k = T // d.num_ddim_timesteps
        self.grid = torch.arange(1, d.num_ddim_timesteps + 1, device=device) * self.k - 1
        self.abar_prev = torch.cat([abar[:1], abar[self.grid[:-1]]])
        self.prediction_type = self.scheduler.config.prediction_type

    def x0_eps(self, out: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from a U-Net output at timesteps t (B,) for the teacher's prediction type."""
        a, s = self.alpha[t].view(-1, 1, 1, 1), self.sigma[t].view(-1, 1, 1, 1)
        if self.prediction_type == "epsilon":
            return (x - s * out) / a, out
        if self.prediction_type == "v_prediction":
            return a * x - s * out, a * out + s * x
        if self.prediction_type == "sample":
            return out, (x - a * out) / s
        raise UserError(f"the teacher's prediction_type {self.prediction_type!r} is not supported")

    def consistency(self, out: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """f(x, t) = c_skip(t) x + c_out(t) x0: LCMScheduler's own boundary scalings, as its step() applies them."""
        c_skip, c_out = self.scheduler.get_scalings_for_boundary_condition_discrete(t.float())
        return c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * self.x0_eps(out, t, x)[0]

    def loss(self, batch: dict[str, Any], g: torch.Generator) -> torch.Tensor:
        """The LCD loss on one batch; draws, in order: latent eps, grid index n, noise, guidance w."""
        from ..conditioning import NULL_CAPTION

        if self.cfg.distill.method == "guidance":
            return self.guidance_loss(batch, g)
        if self.cfg.distill.method == "trajectory":
            return self.trajectory_loss(batch, g)
        d, device = self.cfg.distill, self.acc.device
        x0 = self.latents(batch, g)  # (B, C, h, w)
        B = len(x0)
        c = self.text_states(list(batch["captions"]))  # (B, L, D)
        c_null = self.text_states([NULL_CAPTION] * B)
        n = torch.randint(0, d.num_ddim_timesteps, (B,), generator=g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        w = (torch.rand(B, generator=g) * (d.w_max - d.w_min) + d.w_min).to(device)
        s = self.grid[n]
        t = (s - self.k).clamp(min=0)
        w_emb = guidance_embedding(w, d.time_cond_proj_dim).to(device)
        x_s = self.alpha[s].view(-1, 1, 1, 1) * x0 + self.sigma[s].view(-1, 1, 1, 1) * noise

        with torch.no_grad():
            if d.w_max == 0:  # no guidance (a guidance-distilled teacher): the conditional pass alone
                with self.acc.autocast():
                    out = self.teacher(x_s, s, encoder_hidden_states=c, return_dict=False)[0].float()
                x0_g, eps_g = self.x0_eps(out, s, x_s)
            else:
                with self.acc.autocast():  # the teacher: one guided DDIM step s -> t (cond and uncond in one batch)
                    out = self.teacher(torch.cat([x_s, x_s]), torch.cat([s, s]),
                                       encoder_hidden_states=torch.cat([c_null, c]), return_dict=False)[0].float()
                x0_u, eps_u = self.x0_eps(out[:B], s, x_s)
                x0_c, eps_c = self.x0_eps(out[B:], s, x_s)
                wv = w.view(-1, 1, 1, 1)
                x0_g, eps_g = x0_c + wv * (x0_c - x0_u), eps_c + wv * (eps_c - eps_u)
            a_prev = self.abar_prev[n].view(-1, 1, 1, 1)
            x_t = a_prev.sqrt() * x0_g + (1 - a_prev).sqrt() * eps_g
            # the target network (EMA weights swapped into the student, restored before its own forward pass)
            with self.ema_weights():
                target_out = self.acc.unwrap_model(self.unet)(x_t, t, timestep_cond=w_emb, encoder_hidden_states=c,
                                                              return_dict=False)[0]
            target = self.consistency(target_out.float(), t, x_t)

        out = self.unet(x_s, s, timestep_cond=w_emb, encoder_hidden_states=c, return_dict=False)[0]
        pred = self.consistency(out.float(), s, x_s)
        if d.loss_type == "l2":
            return torch.nn.functional.mse_loss(pred, target)
        return (torch.sqrt((pred - target) ** 2 + d.huber_c ** 2) - d.huber_c).mean()

    def guidance_loss(self, batch: dict[str, Any], g: torch.Generator) -> torch.Tensor:
        """Guidance distillation on one batch (module doc): train_ldm's objective and draws (an inpainting model's
        masks, latent eps, t, noise), with the teacher's guided output on the same x_t as the target."""
        from ..conditioning import NULL_CAPTION, unet_input

        x0, concat = self.x0_and_concat(batch, g)
        B = len(x0)
        c = self.text_states(list(batch["captions"]))
        c_null = self.text_states([NULL_CAPTION] * B)
        d = self.cfg.distill

        def guided_teacher(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x_in = unet_input(x_t, concat)
            with torch.no_grad(), self.acc.autocast():  # unconditional and conditional in one batch
                out = self.teacher(torch.cat([x_in, x_in]), torch.cat([t, t]),
                                   encoder_hidden_states=torch.cat([c_null, c]), return_dict=False)[0].float()
            scale = guidance_by_timestep(t, d.guidance_scale, d.high_noise_guidance_scale, d.high_noise_from)
            return out[:B] + scale * (out[B:] - out[:B])

        def student(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.unet(unet_input(x_t, concat), t, encoder_hidden_states=c, return_dict=False)[0]

        loss, _ = self.m.diffusion.training_losses(student, x0, generator=g, target_fn=guided_teacher)
        return loss

    def solve(self, unet: Any, x: torch.Tensor, c: torch.Tensor, steps: int | None = None,
              timesteps: list[int] | None = None) -> torch.Tensor:
        """The sampler (ldm.validation_sampler, built from the teacher's scheduler config as its pipeline builds it)
        from x_T to x_0 in `steps` steps of its own spacing or on the grid `timesteps`; differentiable in `unet`."""
        from ..samplers import make_scheduler

        scheduler = make_scheduler(self.cfg.ldm.validation_sampler, self.solver_config)
        scheduler.set_timesteps(num_inference_steps=steps, timesteps=timesteps, device=x.device)
        x = x * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(x, t), t, encoder_hidden_states=c, return_dict=False)[0]
            x = scheduler.step(out.float(), t, x).prev_sample
        return x

    def trajectory_loss(self, batch: dict[str, Any], g: torch.Generator) -> torch.Tensor:
        """Trajectory distillation on one batch (module doc); draws x_T only."""
        d = self.cfg.distill
        c = self.text_states(list(batch["captions"]))
        config = self.teacher.config
        x_T = torch.randn((len(c), config.in_channels, config.sample_size, config.sample_size),
                          generator=g).to(self.acc.device)
        with torch.no_grad(), self.acc.autocast():
            target = self.solve(self.teacher, x_T, c, steps=d.teacher_steps)
        with self.acc.autocast():
            pred = self.solve(self.unet, x_T, c, timesteps=list(d.student_timesteps))
        return torch.nn.functional.mse_loss(pred.float(), target.float())

    # ---- pipelines -----------------------------------------------------------------------------------------

    def pipeline(self, full: dict[str, dict] | None = None) -> Any:
        """train_ldm's pipeline over the live modules, with the student's LCMScheduler and the teacher's stored
        image size kept beside the distilled defaults."""
        from ..pipeline import read_sampling_defaults

        pipe = super().pipeline(full)
        if self.cfg.distill.method == "guidance":  # the teacher's sampler (ldm.validation_sampler), guidance 1
            return pipe
        if self.cfg.distill.method == "trajectory":  # the teacher's size, the grid the student was trained on
            teacher = read_sampling_defaults(self.cfg.ldm.pretrained_model)
            pipe.sampling_defaults = {**pipe.sampling_defaults, **{k: teacher[k] for k in ("height", "width")
                                                                   if k in teacher},
                                      "timesteps": list(self.cfg.distill.student_timesteps)}
            return pipe
        pipe.scheduler = lcm_scheduler(Path(self.cfg.ldm.pretrained_model), self.cfg.distill)
        teacher = read_sampling_defaults(self.cfg.ldm.pretrained_model)
        pipe.sampling_defaults = {**{k: teacher[k] for k in ("height", "width") if k in teacher},
                                  **pipe.sampling_defaults}
        return pipe

    def export_final(self) -> None:
        from ..fileio import atomic_path, write_errors

        super().export_final()
        if self.acc.is_main_process:
            teacher = Path(self.cfg.ldm.pretrained_model)
            for name, dest in TEACHER_FILES.items():
                if (teacher / name).is_file():
                    with write_errors(self.out / dest), atomic_path(self.out / dest) as tmp:
                        shutil.copyfile(teacher / name, tmp)
        self.acc.wait_for_everyone()


# --------------------------------------------------------------------------------------------------------------
# Entry point


def main(argv: list[str] | None = None) -> Any:
    """Parse, check every input (one-line errors, nothing written), then distil. Returns the run's step and losses."""
    from ..checkpointing import LOADED_WEIGHTS, TRAINING_ROWS, lock_run_folder, write_run_config

    args = parse_args(argv)
    cfg = load_run_config(args)
    setup_logging()
    check_report_to(args.report_to)
    check_launchable(args.cpu)
    models, teacher = build_distill_models(cfg)
    dataset = build_train_dataset(cfg)
    dataset = dataset.readable(str(cfg.data.train_data_dir or cfg.data.dataset_name))
    check_concat(cfg, models)  # an inpainting teacher: no latent cache, a KL autoencoder
    if cfg.ldm.cache_latents:
        from .latent_cache import check_cacheable

        check_cacheable(dataset, cfg.ldm.cache_dir)
    check_enough_images(len(dataset), cfg.train.train_batch_size, launched_processes())
    check_output_dir(args.output_dir, {"--teacher": cfg.ldm.pretrained_model}, cfg.data.train_data_dir)
    with lock_run_folder(args.output_dir):
        record = {**to_dict(cfg), LOADED_WEIGHTS: models.loaded_weights,  # the teacher's, as loaded
                  TRAINING_ROWS: rows_sha256(dataset)}
        out, checkpoint = open_run_folder(args.output_dir, record, args.resume_from_checkpoint, MAY_DIFFER_ON_RESUME)
        accelerator = make_accelerator(cfg.train, out, cpu=args.cpu, report_to=args.report_to)
        check_strategy(accelerator, cfg, train_text_encoder=False)
        accelerator.init_trackers("train_distill")
        trainer = DistillTrainer(cfg, models, teacher, dataset, accelerator, out)
        if cfg.ldm.cache_latents:
            trainer.use_cache(Path(cfg.ldm.cache_dir) if cfg.ldm.cache_dir else out / "latent_cache")
        if checkpoint is not None:
            trainer.resume(checkpoint)
        if accelerator.is_main_process:
            write_run_config(out, record)
        return trainer.run()
