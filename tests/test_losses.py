"""The autoencoder losses: PatchGAN shapes, hinge values, the adaptive weight's gradient balance, SSIM."""

from __future__ import annotations

import pytest
import torch

from ldm_app.losses import (NLayerDiscriminator, adaptive_weight, autoencoder_nll, disc_factor, generator_objective,
                            hinge_d_loss, load_lpips, reconstruction_loss, ssim)


@pytest.mark.parametrize("size, layers, out", [(64, 3, 6), (32, 2, 6), (256, 3, 30)])
def test_patchgan_gives_one_logit_per_patch(size, layers, out):
    disc = NLayerDiscriminator(3, channels=8, num_layers=layers)
    logits = disc(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 1, out, out)


def test_hinge_loss_values():
    ones = torch.ones(2, 1, 6, 6)
    assert hinge_d_loss(2 * ones, -2 * ones).item() == 0.0  # both beyond the margin: nothing to learn
    assert hinge_d_loss(0 * ones, 0 * ones).item() == pytest.approx(1.0)
    assert hinge_d_loss(-ones, ones).item() == pytest.approx(2.0)  # both wrong by 1 past the decision boundary


def test_disc_factor_switches_on_at_disc_start():
    assert disc_factor(9, disc_start=10, factor=0.7) == 0.0
    assert disc_factor(10, disc_start=10, factor=0.7) == 0.7


def test_adaptive_weight_is_the_gradient_norm_ratio():
    w = torch.randn(4, 4, requires_grad=True)
    rec, g = 3.0 * (w**2).sum(), (w**2).sum()  # gradients 6w and 2w: ratio 3
    weight = adaptive_weight(rec, g, w, disc_weight=0.5)
    expected = 0.5 * (6 * w).norm() / ((2 * w).norm() + 1e-4)
    assert weight.item() == pytest.approx(expected.item(), rel=1e-6)
    assert not weight.requires_grad  # a coefficient, not a path for gradients
    assert adaptive_weight(rec, 0 * w.sum(), w).item() == 1e4  # clamped when the GAN gradient vanishes


def test_generator_objective_balances_the_gan_gradient():
    """After weighting, the GAN term's gradient at the last layer has disc_weight times the reconstruction's norm."""
    last = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(8, 8)
    rec_nll = ((last @ x) ** 2).mean()
    logits_fake = (last.sin() * 100).sum().reshape(1, 1, 1, 1)  # a GAN term of a very different scale
    reg = torch.tensor(2.0)
    loss, logs = generator_objective(rec_nll, reg, 0.5, logits_fake, last, disc_weight=0.25, factor=1.0)
    g_part = loss - rec_nll - 0.5 * reg
    (g_grad,) = torch.autograd.grad(g_part, last, retain_graph=True)
    (rec_grad,) = torch.autograd.grad(rec_nll, last)
    assert g_grad.norm().item() == pytest.approx(0.25 * rec_grad.norm().item(), rel=1e-3)
    assert set(logs) >= {"loss/rec", "loss/reg", "loss/g", "disc/adaptive_weight", "loss/total"}


def test_generator_objective_without_gan_is_rec_plus_weighted_reg():
    rec, reg = torch.tensor(3.0), torch.tensor(10.0)
    loss, logs = generator_objective(rec, reg, 1e-2, None, torch.zeros(1, requires_grad=True), 0.5, 1.0)
    assert loss.item() == pytest.approx(3.1)
    assert "loss/g" not in logs


def test_nll_reductions_follow_ldm():
    rec = torch.ones(2, 3, 4, 4)
    assert autoencoder_nll(rec, "kl").item() == 48.0  # summed per image, averaged over the batch
    assert autoencoder_nll(rec, "vq").item() == 1.0  # mean
    with pytest.raises(ValueError):
        autoencoder_nll(rec, "ae")


def test_reconstruction_loss_is_weighted_l1():
    x, y = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)
    assert torch.allclose(reconstruction_loss(x, y, None, 2.0, 1.0), torch.ones(1, 3, 4, 4))


def test_reconstruction_loss_adds_the_weighted_squared_error():
    x, y = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)
    assert torch.allclose(reconstruction_loss(x, y, None, 0.0, 1.0, mse_weight=4.0), torch.ones(1, 3, 4, 4))
    assert torch.allclose(reconstruction_loss(x, y, None, 2.0, 1.0, mse_weight=4.0), 2 * torch.ones(1, 3, 4, 4))


def test_lpips_is_optional_and_says_why():
    model, reason = load_lpips()
    assert (model is None) == bool(reason)


def test_ssim_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-5)
    slightly = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    very = (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert (ssim(x, very) < ssim(x, slightly)).all() and (ssim(x, slightly) < 1).all()
    assert torch.allclose(ssim(x, very), ssim(very, x), atol=1e-6)  # symmetric


def test_ssim_of_flat_images_is_the_luminance_term():
    """Constant images a, b (in [0, 1]) have zero variance: SSIM = (2ab + C1) / (a^2 + b^2 + C1)."""
    a, b = 0.2, 0.7
    x, y = torch.full((1, 3, 16, 16), 2 * a - 1), torch.full((1, 3, 16, 16), 2 * b - 1)
    c1 = 0.01**2
    assert ssim(x, y).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-3)
