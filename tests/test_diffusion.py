"""Property tests of the diffusion maths (Ho et al. 2020; the seeds' eqs. 1-6, Algorithms 1-2) against references
computed independently here: schedules from their definitions, single-step chains, Bayes' rule on a grid."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from ldm_app.config import NoiseScheduleConfig
from ldm_app.diffusion import GaussianDiffusion

SCHEDULES = {
    "sd": dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "ddpm": dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
}


def reference_betas(num_train_timesteps, beta_schedule, beta_start, beta_end) -> np.ndarray:
    """(T,) float64 from the definitions: linear in beta (Ho et al.) or linear in sqrt(beta) (Stable Diffusion)."""
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps)
    return np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2


@pytest.fixture(params=list(SCHEDULES))
def schedule(request) -> dict:
    return SCHEDULES[request.param]


def perfect_model(diffusion: GaussianDiffusion, x0: torch.Tensor):
    """A predictor that knows x0: it recovers eps from x_t exactly and returns eps or v."""

    def model_fn(x_t, t):
        eps = diffusion.predict_eps_from_x0(x_t, t, x0)
        return eps if diffusion.prediction_type == "epsilon" else diffusion.v_target(x0, eps, t)

    return model_fn


def test_betas_follow_the_schedule_definition(schedule):
    d = GaussianDiffusion(**schedule)
    np.testing.assert_allclose(d.betas.numpy(), reference_betas(**schedule), rtol=1e-5)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), np.cumprod(1 - reference_betas(**schedule)), rtol=1e-5)


def test_closed_form_equals_composed_single_steps(schedule):
    """Composing x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps step by step (eq. 1) gives
    q(x_t | x0) = N(m_t x0, v_t) with m_t = sqrt(1-beta_t) m_{t-1}, v_t = (1-beta_t) v_{t-1} + beta_t."""
    d = GaussianDiffusion(**schedule)
    m, v, means, variances = 1.0, 0.0, [], []
    for beta in reference_betas(**schedule):
        m, v = np.sqrt(1 - beta) * m, (1 - beta) * v + beta
        means.append(m)
        variances.append(v)
    t = torch.arange(d.num_timesteps)
    mean, var = d.q_mean_variance(torch.ones(d.num_timesteps, dtype=torch.float64), t)
    np.testing.assert_allclose(mean.numpy(), means, rtol=1e-5)
    np.testing.assert_allclose(var.flatten().numpy(), variances, rtol=1e-5)


def test_closed_form_matches_a_simulated_chain():
    """Empirical check: 20k chains of single steps agree with q(x_t | x0) in mean and variance."""
    d = GaussianDiffusion(**SCHEDULES["ddpm"])
    g = torch.Generator().manual_seed(0)
    n, x0 = 20_000, torch.tensor([1.7, -0.4], dtype=torch.float64)
    x = x0.expand(n, 2).clone()  # (N, 2)
    for t in range(d.num_timesteps):
        beta = d.betas[t]
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
        if t in (0, 9, 99, 499, 999):
            mean, var = d.q_mean_variance(x0[None], torch.tensor([t]))  # (1, 2), (1, 1)
            assert (x.mean(0) - mean[0]).abs().max() < 5 * (var / n).sqrt().item()
            assert (x.var(0) - var[0]).abs().max() < 5 * var.item() * (2 / n) ** 0.5


@pytest.mark.parametrize("t", [1, 10, 250, 999])
def test_posterior_matches_bayes_rule_on_a_grid(schedule, t):
    """q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0) (eq. 3), normalised numerically on a fine grid."""
    d = GaussianDiffusion(**schedule)
    betas = reference_betas(**schedule)
    abar_prev = np.prod(1 - betas[:t])
    x0, x_t = 0.7, 0.3
    grid = np.linspace(-10, 10, 2_000_001)  # x_{t-1}; spacing 1e-5, posterior std >= 0.02
    log_p = -((grid - np.sqrt(abar_prev) * x0) ** 2) / (2 * (1 - abar_prev))
    log_p += -((x_t - np.sqrt(1 - betas[t]) * grid) ** 2) / (2 * betas[t])
    w = np.exp(log_p - log_p.max())
    mean = (w * grid).sum() / w.sum()
    var = (w * (grid - mean) ** 2).sum() / w.sum()
    one = torch.ones(1, dtype=torch.float64)  # (B=1,)
    mu, beta_tilde = d.q_posterior_mean_variance(x0 * one, x_t * one, torch.tensor([t]))
    np.testing.assert_allclose(mu.item(), mean, rtol=1e-4)
    np.testing.assert_allclose(beta_tilde.item(), var, rtol=1e-4)


def test_posterior_at_first_step_is_x0():
    d = GaussianDiffusion(**SCHEDULES["sd"])
    x0, x_t = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    mu, var = d.q_posterior_mean_variance(x0, x_t, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(mu, x0)
    assert torch.all(var == 0)


def test_posterior_mean_through_predicted_x0_is_eq_6(schedule):
    """mu_tilde(x_t, x0_hat(eps)) = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) (eq. 6, Algorithm 2)."""
    d = GaussianDiffusion(**schedule)
    g = torch.Generator().manual_seed(0)
    t = torch.arange(1, d.num_timesteps)
    x_t, eps = (torch.randn(len(t), 3, generator=g, dtype=torch.float64) for _ in range(2))
    mu, _ = d.q_posterior_mean_variance(d.predict_x0_from_eps(x_t, t, eps), x_t, t)
    beta, abar = d.betas[t, None], d.alphas_cumprod[t, None]
    torch.testing.assert_close(mu, (x_t - beta / (1 - abar).sqrt() * eps) / (1 - beta).sqrt())


def test_x0_is_recovered_from_eps_and_from_v(schedule):
    d = GaussianDiffusion(**schedule)
    g = torch.Generator().manual_seed(0)
    t = torch.arange(d.num_timesteps)
    x0, eps = (torch.randn(len(t), 4, 2, 2, generator=g, dtype=torch.float64) for _ in range(2))
    x_t = d.q_sample(x0, t, eps)
    torch.testing.assert_close(d.predict_x0_from_eps(x_t, t, eps), x0)
    torch.testing.assert_close(d.predict_x0_from_v(x_t, t, d.v_target(x0, eps, t)), x0)
    torch.testing.assert_close(d.predict_eps_from_x0(x_t, t, x0), eps)


def test_q_sample_and_v_match_diffusers_and_the_closed_form(schedule):
    d = GaussianDiffusion(**schedule)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, d.num_timesteps, (16,), generator=g)
    x0, eps = torch.randn(16, 4, 8, 8, generator=g), torch.randn(16, 4, 8, 8, generator=g)
    x_t = d.q_sample(x0, t, eps)
    torch.testing.assert_close(x_t, DDPMScheduler(**schedule).add_noise(x0, eps, t))  # float32 tolerances
    abar = torch.from_numpy(np.cumprod(1 - reference_betas(**schedule)))[t].float()[:, None, None, None]
    torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d.v_target(x0, eps, t), abar.sqrt() * eps - (1 - abar).sqrt() * x0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("extras", [{}, {"snr_gamma": 5.0, "noise_offset": 0.1}])
def test_perfect_predictor_has_zero_loss(prediction_type, extras):
    d = GaussianDiffusion(**SCHEDULES["sd"], prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 4, 8, 8, generator=g, dtype=torch.float64)
    loss, out = d.training_losses(perfect_model(d, x0), x0, generator=g, **extras)
    assert loss.item() < 1e-12
    assert out["t"].shape == out["loss_per_sample"].shape == out["weights"].shape == (64,)
    # the same draw with a useless predictor is far from zero: the test above can fail
    bad, _ = d.training_losses(lambda x_t, t: torch.zeros_like(x_t), x0, generator=g, **extras)
    assert bad.item() > 0.1


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights(prediction_type):
    d = GaussianDiffusion(**SCHEDULES["sd"], prediction_type=prediction_type)
    t, gamma = torch.arange(d.num_timesteps), 5.0
    w, snr = d.min_snr_weights(t, gamma), d.snr(t)
    assert torch.all(w <= 1 + 1e-6)
    low = snr <= gamma
    assert low.any() and (~low).any()
    if prediction_type == "epsilon":
        torch.testing.assert_close(w[low], torch.ones_like(w[low]))
        assert torch.all(w[~low] < 1)
    else:
        torch.testing.assert_close(w, snr.clamp(max=gamma) / (snr + 1))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(32, 4, 4, 4, generator=g)
    loss, out = d.training_losses(lambda x_t, t: 0.5 * x_t, x0, generator=g, snr_gamma=gamma)
    torch.testing.assert_close(loss, (d.min_snr_weights(out["t"], gamma) * out["loss_per_sample"]).mean())


def test_same_generator_seed_gives_the_same_loss():
    d = GaussianDiffusion(**SCHEDULES["sd"])
    torch.manual_seed(0)
    model = torch.nn.Conv2d(4, 4, 3, padding=1)
    x0 = torch.randn(8, 4, 8, 8)

    def loss_for(seed, **kw):
        return d.training_losses(lambda x_t, t: model(x_t), x0, generator=torch.Generator().manual_seed(seed), **kw)

    (a, out_a), (b, out_b), (c, _) = loss_for(0), loss_for(0), loss_for(1)
    assert a.item() == b.item() and torch.equal(out_a["t"], out_b["t"])
    assert a.item() != c.item()
    assert loss_for(0, noise_offset=0.1)[0].item() != a.item()


def test_noise_offset_is_constant_per_sample_and_channel():
    """Offset noise adds offset * N(0, 1) per (B, C, 1, 1): it shows in the spatial means of x_t."""
    d = GaussianDiffusion(**SCHEDULES["sd"])
    x0, t = torch.zeros(64, 3, 32, 32), torch.full((64,), 999)
    seen = {}

    def spy(x_t, t):
        seen["x_t"] = x_t
        return x_t

    for offset in (0.0, 1.0):
        d.training_losses(spy, x0, t=t, generator=torch.Generator().manual_seed(0), noise_offset=offset)
        eps = seen["x_t"] / (1 - d.alphas_cumprod[999]).sqrt()
        seen[offset] = eps.mean(dim=(2, 3)).std().item()  # std over (B, C) of the spatial means
    assert seen[0.0] < 0.1 < 0.5 < seen[1.0]


@pytest.mark.parametrize("prediction_type, sigma", [("epsilon", "beta"), ("v_prediction", "beta_tilde")])
def test_ancestral_sampling_with_the_exact_denoiser_recovers_gaussian_data(prediction_type, sigma):
    """For data N(m, s^2), E[x0 | x_t] is known in closed form; Algorithm 2 driven by it must return N(m, s^2)."""
    d = GaussianDiffusion(**SCHEDULES["sd"], prediction_type=prediction_type)
    m, s = 1.5, 0.5

    def exact_model(x_t, t):
        abar = d.alphas_cumprod[t].float()[:, None]  # (B, 1)
        x0 = m + abar.sqrt() * s**2 / (abar * s**2 + 1 - abar) * (x_t - abar.sqrt() * m)
        eps = d.predict_eps_from_x0(x_t, t, x0)
        return eps if prediction_type == "epsilon" else d.v_target(x0, eps, t)

    x = d.p_sample_loop(exact_model, (10_000, 1), generator=torch.Generator().manual_seed(0), sigma=sigma)
    assert abs(x.mean().item() - m) < 0.03
    assert abs(x.std().item() - s) < 0.02


def test_config_and_bad_values():
    cfg = NoiseScheduleConfig(num_train_timesteps=50, prediction_type="v_prediction")
    d = GaussianDiffusion.from_scheduler_config(cfg)
    assert d.num_timesteps == 50 and d.prediction_type == "v_prediction"
    assert d.scheduler.config.beta_schedule == cfg.beta_schedule
    with pytest.raises(ValueError, match="prediction_type"):
        GaussianDiffusion(prediction_type="sample")
    with pytest.raises(ValueError, match="beta_schedule"):
        GaussianDiffusion(beta_schedule="cosine")
