"""The Gaussian diffusion process of DDPM (Ho et al. 2020): forward process, posterior, training objective and
ancestral sampling, as a plain class that takes the model as an argument (improved-diffusion style).

The schedule (betas, alphas_cumprod) comes from diffusers' `DDPMScheduler`, whose `add_noise` / `get_velocity` give
q_sample and the v target. Written here is what diffusers has no function for: the posterior
q(x_{t-1} | x_t, x0), x0 recovery, the (Min-SNR weighted) loss and Algorithm 2 as a reference sampler.

Timesteps are 0-based as in diffusers: index t here is step t+1 of the paper, alphas_cumprod[t] = prod_{s<=t} alpha_s,
and alpha_bar before the first step is 1 (so the posterior at t=0 is a point mass at x0).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

PredictionType = Literal["epsilon", "v_prediction"]
BetaSchedule = Literal["linear", "scaled_linear"]
SigmaType = Literal["beta", "beta_tilde"]
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B, ...), t (B,)) -> prediction (B, ...)


def _at(a: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a[t] as (B, 1, ..., 1) in x's device and dtype, to broadcast against x of shape (B, ...)."""
    # cast before moving: the float64 tables must not reach devices without float64 (MPS)
    return a.to(x.dtype).to(x.device)[t.to(x.device)].reshape(-1, *([1] * (x.ndim - 1)))


class GaussianDiffusion:
    """q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) with the model's target set by `prediction_type`."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: BetaSchedule = "scaled_linear",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        prediction_type: PredictionType = "epsilon",
    ):
        if beta_schedule not in ("linear", "scaled_linear"):
            raise ValueError(f"unknown beta_schedule {beta_schedule!r}: expected 'linear' or 'scaled_linear'")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unknown prediction_type {prediction_type!r}: expected 'epsilon' or 'v_prediction'")
        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            beta_start=beta_start,
            beta_end=beta_end,
            prediction_type=prediction_type,
            clip_sample=False,  # latents are not bounded to [-1, 1]
        )
        self.prediction_type = prediction_type
        self.num_timesteps = num_train_timesteps
        # (T,) float64: diffusers' float32 cumprod makes 1 - abar_t at small t off by ~1e-4 relative and breaks
        # abar_t = abar_{t-1} alpha_t, which the posterior coefficients rely on. The scheduler gets the same values so
        # that add_noise / get_velocity (cast to the sample's dtype there) agree with everything here.
        self.betas = self.scheduler.betas.double()
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.scheduler.alphas_cumprod = self.alphas_cumprod
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

    @classmethod
    def from_scheduler_config(cls, config) -> GaussianDiffusion:
        """From a `NoiseScheduleConfig` (ldm_app.config) or any dataclass with the constructor's fields."""
        return cls(**dataclasses.asdict(config))

    # ---- forward process -------------------------------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (eq. 2 of the notes; eq. 4 of Ho et al.). (B, ...)"""
        return self.scheduler.add_noise(x0, eps, t)

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I): mean (B, ...) and variance (B, 1, ..., 1)."""
        abar = _at(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0, 1.0 - abar

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | x_t, x0) = N(mu_tilde, beta_tilde I) (eqs. 5-6 of the notes; eq. 7 of Ho et al.):
        mu_tilde = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t,
        beta_tilde = (1 - abar_{t-1}) / (1 - abar_t) beta_t. Mean (B, ...), variance (B, 1, ..., 1)."""
        beta, abar = _at(self.betas, t, x_t), _at(self.alphas_cumprod, t, x_t)
        abar_prev, alpha = _at(self.alphas_cumprod_prev, t, x_t), _at(self.alphas, t, x_t)
        coef_x0 = abar_prev.sqrt() * beta / (1.0 - abar)
        coef_xt = alpha.sqrt() * (1.0 - abar_prev) / (1.0 - abar)
        return coef_x0 * x0 + coef_xt * x_t, (1.0 - abar_prev) / (1.0 - abar) * beta

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR(t) = abar_t / (1 - abar_t) (Kingma et al. 2021), (B,) float32. Not diffusers.training_utils.compute_snr:
        importing that module costs seconds of unrelated imports."""
        abar = self.alphas_cumprod
        return (abar / (1.0 - abar)).float().to(t.device)[t]

    # ---- parameterisations -----------------------------------------------------------------------------------

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert eq. 2: x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t). (B, ...)"""
        abar = _at(self.alphas_cumprod, t, x_t)
        return (x_t - (1.0 - abar).sqrt() * eps) / abar.sqrt()

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Invert eq. 2 for eps: eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t). (B, ...)"""
        abar = _at(self.alphas_cumprod, t, x_t)
        return (x_t - abar.sqrt() * x0) / (1.0 - abar).sqrt()

    def predict_x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v (Salimans & Ho 2022, sec. 4). (B, ...)"""
        abar = _at(self.alphas_cumprod, t, x_t)
        return abar.sqrt() * x_t - (1.0 - abar).sqrt() * v

    def v_target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022). (B, ...)"""
        return self.scheduler.get_velocity(x0, eps, t)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """x0 from the model's output, whichever quantity `prediction_type` says it predicts. (B, ...)"""
        if self.prediction_type == "epsilon":
            return self.predict_x0_from_eps(x_t, t, model_output)
        return self.predict_x0_from_v(x_t, t, model_output)

    # ---- training objective ----------------------------------------------------------------------------------

    def min_snr_weights(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma loss weights (Hang et al. 2023, eq. 9 and its v form): min(SNR, gamma) / SNR on the eps
        loss, min(SNR, gamma) / (SNR + 1) on the v loss. (B,)"""
        snr = self.snr(t)
        clipped = snr.clamp(max=gamma)
        return clipped / snr if self.prediction_type == "epsilon" else clipped / (snr + 1.0)

    def training_losses(
        self,
        model_fn: ModelFn,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        target_fn: ModelFn | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Algorithm 1 of Ho et al.: t ~ U{0..T-1}, eps ~ N(0, I), MSE between the model's output on
        x_t = q_sample(x0, t, eps) and eps (or v). `model_fn(x_t, t)` closes over any conditioning. `target_fn(x_t,
        t)`, when given, is the regression target instead (distillation: a teacher's output on the same x_t).
        Returns the scalar loss and extras: t (B,), per-sample loss (B,) before weighting, weights (B,)."""
        b = x0.shape[0]
        if t is None:
            # draw on the generator's device so a CPU generator can drive a GPU run reproducibly
            gen_device = generator.device if generator is not None else x0.device
            t = torch.randint(0, self.num_timesteps, (b,), generator=generator, device=gen_device).to(x0.device)
        if noise is None:
            noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if noise_offset:
            # offset noise (Guttenberg 2023): a per-(sample, channel) constant lets the model shift mean brightness
            offset_shape = (b, x0.shape[1]) + (1,) * (x0.ndim - 2)  # (B, C, 1, 1)
            offset = randn_tensor(offset_shape, generator=generator, device=x0.device, dtype=x0.dtype)
            noise = noise + noise_offset * offset
        x_t = self.q_sample(x0, t, noise)
        if target_fn is not None:
            target = target_fn(x_t, t)
        else:
            target = noise if self.prediction_type == "epsilon" else self.v_target(x0, noise, t)
        pred = model_fn(x_t, t)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)  # (B,)
        weights = torch.ones_like(per_sample) if snr_gamma is None else self.min_snr_weights(t, snr_gamma)
        return (weights * per_sample).mean(), {"t": t, "loss_per_sample": per_sample.detach(), "weights": weights}

    # ---- sampling --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def p_sample(
        self,
        model_fn: ModelFn,
        x_t: torch.Tensor,
        t: int,
        generator: torch.Generator | None = None,
        sigma: SigmaType = "beta",
    ) -> torch.Tensor:
        """One step of Algorithm 2: x_{t-1} = mu_tilde(x_t, x0_hat) + sigma_t z, with mu_tilde from eq. 6 written
        through x0_hat (the same mean for an eps model; also right for a v model). (B, ...)"""
        t_batch = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        x0_hat = self.predict_x0(x_t, t_batch, model_fn(x_t, t_batch))
        mean, beta_tilde = self.q_posterior_mean_variance(x0_hat, x_t, t_batch)
        if t == 0:
            return mean  # z = 0 at the last step
        var = _at(self.betas, t_batch, x_t) if sigma == "beta" else beta_tilde
        return mean + var.sqrt() * randn_tensor(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)

    @torch.no_grad()
    def p_sample_loop(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,  # None: torch's default device
        dtype: torch.dtype = torch.float32,
        sigma: SigmaType = "beta",
    ) -> torch.Tensor:
        """Algorithm 2 of Ho et al. (ancestral sampling, all T steps) from x_T ~ N(0, I); sigma_t^2 is beta_t
        ("beta") or beta_tilde_t ("beta_tilde"), the two choices of sec. 3.2. A reference sampler: the app samples
        with diffusers schedulers. Returns x0 of `shape`."""
        if sigma not in ("beta", "beta_tilde"):
            raise ValueError(f"unknown sigma {sigma!r}: expected 'beta' (sigma_t^2 = beta_t) or 'beta_tilde'")
        x_t = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        for t in reversed(range(self.num_timesteps)):
            x_t = self.p_sample(model_fn, x_t, t, generator, sigma)
        return x_t
