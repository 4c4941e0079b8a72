"""Autoencoder losses of the LDM first stage (Rombach et al. 2022, after Esser et al. 2021, "taming transformers"):
pixel L1 (+ LPIPS when available), a KL or VQ regulariser, and a PatchGAN discriminator with hinge loss whose
generator term is balanced against the reconstruction by an adaptive weight.

diffusers ships the autoencoders but no discriminator, no GAN losses and no SSIM, and torchvision (for LPIPS'
VGG) does not import with this torch build, so these are written here; each follows its source (cited).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# PatchGAN discriminator


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017, "pix2pix"), as used by Esser et al. 2021 and the LDM
    autoencoders: strided 4x4 convolutions, each logit judges one overlapping patch of the input.

    (B, 3, H, W) -> logits (B, 1, H', W'); for H = 64 and num_layers = 3, H' = 6 (a 70x70 receptive field).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < num_layers else 1  # the last hidden layer keeps the resolution, as in pix2pix
            layers += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_pix2pix_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _pix2pix_init(m: nn.Module) -> None:
    """N(0, 0.02) convolutions, N(1, 0.02) BatchNorm scales (pix2pix's `weights_init`)."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------------------------
# GAN losses


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss (Lim & Ye 2017; taming's `hinge_d_loss`):
    1/2 (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The autoencoder's adversarial term: -E[D(x_hat)]."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float = 1.0, max_weight: float = 1e4) -> torch.Tensor:
    """lambda = ||grad_L rec|| / (||grad_L g|| + 1e-4) at the decoder's last layer L (Esser et al. 2021, eq. 7),
    clamped to [0, max_weight] and detached: the GAN term then moves the output about as much as the
    reconstruction term does, whatever their raw scales."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach() * disc_weight


def disc_factor(step: int, disc_start: int, factor: float = 1.0) -> float:
    """The GAN terms are off before `disc_start` (taming's `adopt_weight`): the autoencoder first learns to
    reconstruct, then the discriminator sharpens it."""
    return factor if step >= disc_start else 0.0


# --------------------------------------------------------------------------------------------------------------
# Perceptual loss (optional)


@functools.lru_cache(maxsize=1)
def load_lpips() -> tuple[nn.Module | None, str]:
    """LPIPS (Zhang et al. 2018) from the `lpips` package, only if it and its VGG weights are already on this
    machine (never downloads). Returns (frozen module or None, reason it is unavailable)."""
    try:
        import lpips  # needs torchvision
        from torch.hub import get_dir
    except ImportError as e:
        return None, f"the lpips package is not usable ({e})"
    from pathlib import Path

    vgg = Path(get_dir()) / "checkpoints" / "vgg16-397923af.pth"
    if not vgg.is_file():
        return None, f"the VGG16 weights LPIPS needs are not at {vgg}"
    model = lpips.LPIPS(net="vgg", verbose=False).eval().requires_grad_(False)
    return model, ""


# --------------------------------------------------------------------------------------------------------------
# The combined autoencoder objective


def reconstruction_loss(x0: torch.Tensor, x_rec: torch.Tensor, lpips_model: nn.Module | None,
                        pixel_weight: float, perceptual_weight: float, mse_weight: float = 0.0) -> torch.Tensor:
    """Per-pixel reconstruction error (B, C, H, W): w_pix |x0 - x_rec| + w_mse (x0 - x_rec)^2
    + w_p LPIPS(x0, x_rec) (LPIPS is one number per image, broadcast over its pixels, as in taming's
    LPIPSWithDiscriminator). LDM uses L1 (+ LPIPS); the squared term is ours, for recipes that optimise PSNR
    (an L2 metric) where LPIPS is unavailable."""
    diff = x0.float() - x_rec.float()
    rec = pixel_weight * diff.abs()
    if mse_weight > 0:
        rec = rec + mse_weight * diff.square()
    if lpips_model is not None and perceptual_weight > 0:
        rec = rec + perceptual_weight * lpips_model(x0.float(), x_rec.float())
    return rec


def autoencoder_nll(rec: torch.Tensor, kind: str) -> torch.Tensor:
    """Reduce the per-pixel error as the LDM code does: KL models sum over pixels and average over the batch
    (LPIPSWithDiscriminator; the KL weight 1e-6 is relative to that sum), VQ models take the mean
    (VQLPIPSWithDiscriminator)."""
    if kind == "kl":
        return rec.sum() / rec.shape[0]
    if kind == "vq":
        return rec.mean()
    raise ValueError(f"unknown autoencoder kind {kind!r}")


def generator_objective(
    rec_nll: torch.Tensor,
    reg_loss: torch.Tensor,
    reg_weight: float,
    logits_fake: torch.Tensor | None,
    last_layer: torch.Tensor,
    disc_weight: float,
    factor: float,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The autoencoder's loss: rec_nll + reg_weight * reg + factor * lambda * g_loss, where reg is the KL
    divergence or the VQ codebook/commitment loss, and lambda is `adaptive_weight` (None logits: GAN off)."""
    loss = rec_nll + reg_weight * reg_loss
    logs: dict[str, Any] = {"loss/rec": rec_nll.detach(), "loss/reg": reg_loss.detach()}
    if logits_fake is not None and factor > 0:
        g_loss = generator_loss(logits_fake)
        d_weight = adaptive_weight(rec_nll, g_loss, last_layer, disc_weight)
        loss = loss + factor * d_weight * g_loss
        logs.update({"loss/g": g_loss.detach(), "disc/adaptive_weight": d_weight})
    logs["loss/total"] = loss.detach()
    return loss, logs


# --------------------------------------------------------------------------------------------------------------
# SSIM (evaluation)


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()  # (C, 1, k, k) depthwise


def ssim(x: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image, images (B, C, H, W) in [-1, 1].

    No installed package provides it (no torchmetrics / scikit-image here), so: an 11x11 Gaussian window with
    sigma 1.5, K1 = 0.01, K2 = 0.03, dynamic range L = 1 after mapping to [0, 1], 'valid' windows only, SSIM map
    averaged over channels and positions (as scikit-image's `structural_similarity(..., gaussian_weights=True)`).
    """
    x = (x.float() + 1) / 2
    y = (y.float() + 1) / 2
    c1, c2 = 0.01**2, 0.03**2
    window = _gaussian_window(window_size, sigma, x.shape[1], x.device, x.dtype)
    blur = functools.partial(F.conv2d, weight=window, groups=x.shape[1])
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)
