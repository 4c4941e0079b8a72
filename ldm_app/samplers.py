"""Samplers by name: each one a diffusers scheduler built from the model's own noise schedule.

A model is trained with one forward process q(x_t | x0) (betas -> alphas_cumprod, `prediction_type`); every sampler
below reads that schedule from the model's scheduler config (`from_config`) and only changes how the reverse
process is discretised, so any sampler can be used with any model.

- `ddpm`: ancestral sampling, Algorithm 2 of Ho et al. 2020 (fresh noise z ~ N(0, I) at every step).
- `ddim`: deterministic (eta = 0) DDIM, Song et al. 2021.
- `pndm` / `plms`: pseudo linear multistep, Liu et al. 2022 (PLMS only: `skip_prk_steps=True`).
- `dpm++`: DPM-Solver++ (2M multistep), Lu et al. 2022.
- `euler`: Euler method on the probability-flow ODE, Karras et al. 2022 (Algorithm 1 with no churn).
- `euler_a`: Euler ancestral (k-diffusion's `sample_euler_ancestral`), stochastic like `ddpm`.
- `lcm`: multistep latent consistency sampling, Luo et al. 2023 (diffusers' LCMScheduler): for a model distilled
  by `python -m ldm_app.train_distill` (1-8 steps; fresh noise between steps, so stochastic like `ddpm`). Its
  timesteps are picked from the distillation's DDIM grid (`original_inference_steps`, kept from the model's own
  LCMScheduler config). On a model that was not distilled it runs but gives poor images in few steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from ldm_app.errors import UserError

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

# Latents are not bounded to [-1, 1] like pixels, so clipping the predicted x0 there would distort them (diffusers'
# StableDiffusionPipeline forces clip_sample=False for the same reason); a config coming from a scheduler class
# without this field (e.g. Euler) would otherwise get DDPM/DDIM's default clip_sample=True.
_NO_CLIP = {"clip_sample": False}

# name -> (diffusers scheduler class name, overrides of the model's config). Class names, resolved on use, so that
# checking a sampler name (a CLI error path) does not import diffusers.
_REGISTRY: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", _NO_CLIP),
    "ddim": ("DDIMScheduler", _NO_CLIP),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "lcm": ("LCMScheduler", _NO_CLIP),
}

SAMPLERS: tuple[str, ...] = tuple(_REGISTRY)

# Samplers that draw fresh noise at every step (from the call's generator): their output depends on the seed
# beyond the initial latents x_T.
ANCESTRAL_SAMPLERS: tuple[str, ...] = ("ddpm", "euler_a", "lcm")


def check_sampler_name(name: str) -> str:
    """`name` if it is a known sampler, else a UserError listing the valid ones."""
    if not isinstance(name, str) or name not in _REGISTRY:
        from ldm_app.limits import shown

        raise UserError(f"unknown sampler {shown(name, 60)}; expected one of: {', '.join(SAMPLERS)}")
    return name


def samplers_taking(kind: str) -> list[str]:
    """The samplers whose scheduler takes a custom grid: kind "timesteps" or "sigmas" (diffusers' set_timesteps
    argument of that name, as its pipelines' retrieve_timesteps checks)."""
    import inspect

    import diffusers

    return [name for name, (cls, _) in _REGISTRY.items()
            if kind in inspect.signature(getattr(diffusers, cls).set_timesteps).parameters]


def make_scheduler(name: str, config: Mapping[str, Any]) -> SchedulerMixin:
    """Build sampler `name` from a scheduler config (the model's noise schedule), e.g. `pipe.scheduler.config`."""
    import diffusers

    cls_name, overrides = _REGISTRY[check_sampler_name(name)]
    return scheduler_from_config(getattr(diffusers, cls_name), config, **overrides)


def scheduler_from_config(cls: type, config: Mapping[str, Any], **overrides: Any) -> SchedulerMixin:
    """`cls.from_config(config, **overrides)` without diffusers' warning, a long line on every call, about the keys
    of another sampler's config (DPM-Solver's given to LCM) that it keeps in the config but does not use: expected
    here, where one model config serves every sampler."""
    import diffusers

    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        return cls.from_config(config, **overrides)
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)


def sampler_name(scheduler: SchedulerMixin) -> str | None:
    """The first registered name whose scheduler class is `scheduler`'s class, or None for a class we don't name."""
    return next((name for name, (cls, _) in _REGISTRY.items() if type(scheduler).__name__ == cls), None)


def set_timesteps_checked(scheduler: SchedulerMixin, steps: int, device: Any = None, label: str | None = None) -> None:
    """`scheduler.set_timesteps(steps)`, refusing (UserError) a timestep grid the sampler cannot run.

    How many steps a sampler can take on a model is not simply its training timesteps T: with SD's
    `steps_offset=1`, DDIM/DDPM/PNDM at T steps ask for timestep T (an IndexError mid-sampling), and DPM-Solver++
    at T steps repeats a timestep (a division by zero: a silently black image). The rule that holds for every
    sampler, spacing and offset (checked in tests/test_samplers.py) is on the grid itself: every timestep inside
    the trained range [0, T) and strictly decreasing (PLMS repeats one timestep by design).
    """
    label = label or type(scheduler).__name__
    train_steps = scheduler.config.num_train_timesteps
    problem = None
    try:
        scheduler.set_timesteps(steps, device=device)
    except ValueError:  # diffusers' own refusal (steps > T for DDIM/DDPM; LCM: steps > its original_inference_steps)
        problem = "more steps than its training timesteps"
        if type(scheduler).__name__ == "LCMScheduler":
            n = scheduler.config.original_inference_steps
            problem = (f"a distillation grid (original_inference_steps={n}) longer than them" if n > train_steps
                       else f"more steps than the {n} of its distillation grid (original_inference_steps)")
    if problem is None:
        import torch

        grid = scheduler.timesteps.double()
        gaps = grid[:-1] - grid[1:]
        repeats_allowed = 1 if type(scheduler).__name__ == "PNDMScheduler" else 0
        if len(grid) == 0 or not torch.isfinite(grid).all() or grid.min() < 0 or grid.max() >= train_steps:
            problem = "a timestep outside the trained range"
        elif (gaps < 0).any() or int((gaps == 0).sum()) > repeats_allowed:
            problem = "a repeated timestep"
    if problem is not None:
        raise UserError(
            f"{steps} steps do not fit sampler {label} on this model: its {train_steps} training timesteps would give "
            f"{problem}; use fewer steps"
        )
