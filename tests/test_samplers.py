"""Samplers: built from the model's noise schedule, each runs, and the per-image seed rule holds for all of them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
)

from ldm_app.errors import UserError
from ldm_app.pipeline import make_generators
from ldm_app.samplers import ANCESTRAL_SAMPLERS, SAMPLERS, make_scheduler, sampler_name

EXPECTED_CLASS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "plms": PNDMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "lcm": LCMScheduler,
}


def model_schedule() -> DDPMScheduler:
    """A trained model's schedule that differs from every default: scaled_linear betas and v-prediction."""
    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction"
    )


def test_sampler_names():
    assert set(SAMPLERS) == set(EXPECTED_CLASS)
    assert set(ANCESTRAL_SAMPLERS) <= set(SAMPLERS)


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_keeps_the_models_noise_schedule(name):
    source = model_schedule()
    scheduler = make_scheduler(name, source.config)
    assert type(scheduler) is EXPECTED_CLASS[name]
    assert torch.allclose(scheduler.alphas_cumprod, source.alphas_cumprod)
    assert scheduler.config.prediction_type == "v_prediction"


def test_sampler_specific_settings():
    config = model_schedule().config  # DDPM's default clip_sample=True must not leak into latent sampling
    assert make_scheduler("plms", config).config.skip_prk_steps is True
    assert make_scheduler("pndm", config).config.skip_prk_steps is True
    assert make_scheduler("dpm++", config).config.algorithm_type == "dpmsolver++"
    assert make_scheduler("ddpm", config).config.clip_sample is False
    # Euler's config has no clip_sample field: going back to DDIM must not pick up DDIM's default (True)
    euler = make_scheduler("euler", config)
    assert make_scheduler("ddim", euler.config).config.clip_sample is False


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_name_inverts_make_scheduler(name):
    made = make_scheduler(name, model_schedule().config)
    assert sampler_name(made) == ("pndm" if name == "plms" else name)  # plms is an alias of pndm


def test_unknown_sampler_lists_the_valid_ones():
    with pytest.raises(UserError) as err:
        make_scheduler("heun", model_schedule().config)
    assert "heun" in str(err.value) and all(name in str(err.value) for name in SAMPLERS)


def _latents(seed: int) -> torch.Tensor:
    return torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", SAMPLERS)
def test_each_sampler_denoises(tiny_pipeline, name):
    tiny_pipeline.set_sampler(name)
    assert type(tiny_pipeline.scheduler) is EXPECTED_CLASS[name]
    x_T = _latents(0)
    generator = torch.Generator().manual_seed(1)
    out = tiny_pipeline("a red circle", num_inference_steps=4, latents=x_T, generator=generator, output_type="latent")
    out = out.images  # (1, 4, 8, 8)
    assert out.shape == x_T.shape
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, x_T * tiny_pipeline.scheduler.init_noise_sigma, atol=1e-2)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler_a", "lcm"])
def test_per_step_noise_comes_from_the_generator(tiny_pipeline, name):
    """Same x_T, different generators: ancestral samplers must differ (fresh noise per step), DDIM must not."""
    tiny_pipeline.set_sampler(name)
    runs = [
        tiny_pipeline("a cat", num_inference_steps=3, latents=_latents(0), generator=torch.Generator().manual_seed(s),
                      output_type="latent").images
        for s in (1, 2)
    ]
    assert torch.allclose(runs[0], runs[1]) == (name not in ANCESTRAL_SAMPLERS)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler_a", "dpm++", "lcm"])
def test_batch_seed_rule(tiny_pipeline, name):
    """Image k of a batch made with generators seeded seed+k equals the prompt run alone with seed+k, for
    deterministic and ancestral samplers alike (each image draws x_T and its per-step noise from its own generator)."""
    tiny_pipeline.set_sampler(name)
    kwargs = dict(num_inference_steps=3, output_type="np")
    batch = tiny_pipeline("a cat", num_images_per_prompt=3, generator=make_generators(10, 3), **kwargs).images
    alone = tiny_pipeline("a cat", generator=torch.Generator().manual_seed(12), **kwargs).images
    assert np.abs(batch[2] - alone[0]).max() <= 2 / 255
    assert np.abs(batch[0] - batch[2]).max() > 2 / 255  # the images of a batch do differ


def test_sampler_name_of_any_type_is_a_user_error():
    for name in (["ddim"], None, 3, "DDIM"):
        with pytest.raises(UserError, match="unknown sampler"):
            make_scheduler(name, model_schedule().config)


def _runs_finite(scheduler) -> bool:
    import inspect

    x = torch.randn((1, 4, 2, 2), generator=torch.Generator().manual_seed(0))
    ancestral = "generator" in inspect.signature(scheduler.step).parameters
    kwargs = {"generator": torch.Generator().manual_seed(1)} if ancestral else {}
    try:
        for t in scheduler.timesteps:
            scheduler.scale_model_input(x, t)
            x = scheduler.step(torch.randn((1, 4, 2, 2), generator=torch.Generator().manual_seed(2)), t, x, **kwargs,
                               return_dict=False)[0]  # fmt: skip
    except (IndexError, ValueError, RuntimeError):
        return False
    return bool(torch.isfinite(x).all())


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_timestep_grid_check_never_lets_a_failing_step_count_through(spacing):
    """How many steps a sampler can take is not simply the training timesteps T: with steps_offset=1, DDIM at T
    steps asks for timestep T (IndexError) and DPM-Solver++ at T steps repeats a timestep (NaN, a black image).
    Over short schedules, offsets and spacings: every step count the check accepts runs and stays finite."""
    from ldm_app.samplers import set_timesteps_checked

    refused = 0
    for train_steps in (7, 10):
        for offset in (0, 1, 2):
            config = DDIMScheduler(num_train_timesteps=train_steps, beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012, steps_offset=offset, timestep_spacing=spacing).config  # fmt: skip
            for name in SAMPLERS:
                for steps in range(1, train_steps + 1):
                    scheduler = make_scheduler(name, config)
                    try:
                        set_timesteps_checked(scheduler, steps, label=name)
                    except UserError as e:
                        assert f"{steps} steps do not fit sampler {name}" in str(e)
                        refused += 1
                        continue
                    assert _runs_finite(scheduler), (train_steps, offset, spacing, name, steps)
    assert refused > 0 or spacing == "trailing"  # SD's leading spacing with an offset is where grids break


def test_lcm_keeps_a_distilled_models_grid_and_names_it_when_refusing():
    """`lcm` from a distilled model's own LCMScheduler config keeps its distillation grid (original_inference_steps);
    more steps than that grid is refused in one line that says so."""
    from ldm_app.samplers import set_timesteps_checked

    distilled = LCMScheduler.from_config(model_schedule().config, original_inference_steps=25).config
    scheduler = make_scheduler("lcm", distilled)
    assert scheduler.config.original_inference_steps == 25 and scheduler.config.clip_sample is False
    set_timesteps_checked(scheduler, 4, label="lcm")
    assert [int(t) for t in scheduler.timesteps] == sorted({int(t) for t in scheduler.timesteps}, reverse=True)
    assert all(int(t) % 40 == 39 for t in scheduler.timesteps)  # on the 25-point grid (k = 1000 / 25 = 40)
    with pytest.raises(UserError, match="more steps than the 25 of its distillation grid"):
        set_timesteps_checked(scheduler, 26, label="lcm")
