"""The seeds' 2-D setting end to end: a small MLP eps-model trained with Algorithm 1 (`training_losses`) on a mixture
of 8 Gaussians learns it, as judged on samples from Algorithm 2 (`p_sample_loop`); an untrained model does not."""

import numpy as np
import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

from ldm_app.diffusion import GaussianDiffusion

# 8 modes on a circle of radius 2, std 0.15, the lower half twice as likely as the upper half
ANGLES = 2 * np.pi * np.arange(8) / 8
MODES = 2.0 * np.stack([np.cos(ANGLES), np.sin(ANGLES)], axis=1)  # (K, 2)
WEIGHTS = np.array([1, 1, 1, 1, 2, 2, 2, 2]) / 12  # (K,)
STD = 0.15
TRAIN_STEPS, BATCH = 4000, 256


def sample_data(n: int, rng: np.random.Generator) -> torch.Tensor:
    k = rng.choice(len(MODES), size=n, p=WEIGHTS)
    return torch.from_numpy(MODES[k] + STD * rng.standard_normal((n, 2))).float()  # (N, 2)


def data_moments() -> tuple[np.ndarray, np.ndarray]:
    """Mean (2,) and covariance (2, 2) of the mixture, in closed form."""
    mean = WEIGHTS @ MODES
    second = (WEIGHTS[:, None, None] * MODES[:, :, None] * MODES[:, None, :]).sum(0)
    return mean, second - np.outer(mean, mean) + STD**2 * np.eye(2)


class ToyEpsModel(nn.Module):
    """eps_theta(x_t, t): an MLP on [x_t, sinusoidal embedding of t] (the seeds' time embedding, from diffusers)."""

    def __init__(self, hidden: int = 128, time_dim: int = 32):
        super().__init__()
        self.time_dim = time_dim
        self.net = nn.Sequential(
            nn.Linear(2 + time_dim, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 2),
        )  # fmt: skip

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x_t, get_timestep_embedding(t, self.time_dim)], dim=1))  # (B, 2)


def sample_checks(x: torch.Tensor) -> dict[str, bool]:
    """Does x (N, 2) look like the mixture? Mass near the modes, per-mode shares, first two moments."""
    x = x.double().numpy()
    dist = np.linalg.norm(x[:, None] - MODES[None], axis=2)  # (N, K)
    near = dist.min(1) < 3 * STD  # the data itself has 1 - exp(-4.5) = 98.9% here
    shares = np.bincount(dist.argmin(1)[near], minlength=len(MODES)) / max(near.sum(), 1)
    mean, cov = data_moments()
    return {
        "near_modes": near.mean() > 0.8,
        "shares": bool(np.all(np.abs(shares - WEIGHTS) < 0.03)),
        "moments": bool(np.abs(x.mean(0) - mean).max() < 0.1 and np.abs(np.cov(x.T) - cov).max() < 0.2),
    }


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny MLP: threads only add overhead, and one core keeps timings comparable
    yield
    torch.set_num_threads(before)


def test_toy_ddpm_learns_a_2d_mixture(one_thread):
    # 100 steps: betas scaled by 1000 / T from Ho et al.'s 1e-4..0.02 (as improved-diffusion does) so that x_T ~ N(0, I)
    diffusion = GaussianDiffusion(100, "linear", beta_start=1e-3, beta_end=0.2)
    torch.manual_seed(0)
    model = ToyEpsModel()

    def draw(seed: int) -> torch.Tensor:
        model.eval()
        g = torch.Generator().manual_seed(seed)
        return diffusion.p_sample_loop(model, (2000, 2), generator=g, sigma="beta_tilde")

    untrained = sample_checks(draw(1))
    assert not untrained["near_modes"] and not untrained["moments"], untrained  # the checks can fail

    rng, g = np.random.default_rng(0), torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    lr_decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, TRAIN_STEPS)
    model.train()
    for _ in range(TRAIN_STEPS):
        loss, _ = diffusion.training_losses(model, sample_data(BATCH, rng), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr_decay.step()

    trained = sample_checks(draw(1))
    assert all(trained.values()), trained
