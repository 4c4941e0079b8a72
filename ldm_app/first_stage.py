"""The first stage: what the autoencoder does for everything else (training, the latent cache, evaluation, the
pipeline's callers), in one place. KL (`AutoencoderKL`) and VQ (`VQModel`) models differ only here.

- encode: the encoder posterior q(z|x) of pixels in [-1, 1]: KL -> (mean, std); VQ -> (latents before quantisation,
  None), as LDM's VQ models (the codebook lookup happens at decode, as in diffusers);
- the latents a diffusion model trains on: x0 = (mean + std * eps) * scaling_factor (LDM's
  `get_first_stage_encoding` + `scale_by_std`), or mean * scaling_factor for VQ;
- reconstruct: decode(encode(x)) through the posterior mode / the quantised codes (evaluation);
- shapes: f = 2 ** (levels - 1), the latent channels the U-Net sees.
"""

from __future__ import annotations

from typing import Any

import torch

# Files of a train_vae.py run folder that other parts read (evaluation: the held-out split and the data config).
HOLDOUT_FILE = "holdout.json"
TRAIN_CONFIG_FILE = "train_config.yaml"


def is_vq(vae: Any) -> bool:
    """A vector-quantised autoencoder (diffusers' VQModel), as opposed to a KL one."""
    return hasattr(vae.config, "num_vq_embeddings")


def downsampling_factor(vae: Any) -> int:
    """f: each level of the autoencoder but the last halves the resolution (8 for SD's 4 levels)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_channels(vae: Any) -> int:
    """Channels of the latents the U-Net sees: VQModel's vq_embed_dim (when set), else latent_channels."""
    return getattr(vae.config, "vq_embed_dim", None) or vae.config.latent_channels


@torch.no_grad()
def latent_stats(vae: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encoder posterior for pixels (B, 3, H, W) in [-1, 1]: KL -> (mean, std) of q(z|x), VQ -> (latents before
    quantisation, None), each (B, C, H/f, W/f) float32."""
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    if is_vq(vae):
        return vae.encode(pixels).latents.float(), None
    dist = vae.encode(pixels).latent_dist  # DiagonalGaussianDistribution
    return dist.mean.float(), dist.std.float()


def sample_x0(mean: torch.Tensor, std: torch.Tensor | None, scaling_factor: float,
              generator: torch.Generator | None) -> torch.Tensor:  # fmt: skip
    """x0 = (mean + std * eps) * scaling_factor, eps ~ N(0, I) from `generator` (the step's): the
    reparameterised sample of q(z|x) (Kingma & Welling 2014), scaled to unit variance as in LDM. (B, C, h, w)"""
    from diffusers.utils.torch_utils import randn_tensor

    if std is None:
        return mean * scaling_factor
    eps = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps) * scaling_factor


def encode_latents(vae: Any, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The latents a diffusion model trains on, unscaled: a posterior sample (KL, as LDM's
    `get_first_stage_encoding`) or the encoder output before quantisation (VQ, as LDM). Keeps the graph (the
    autoencoder's own training calls it)."""
    encoded = vae.encode(x0)
    if hasattr(encoded, "latent_dist"):
        return encoded.latent_dist.sample(generator=generator)
    return encoded.latents


@torch.no_grad()
def reconstruct(vae: Any, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x0 (B, 3, H, W) in [-1, 1] -> (reconstruction clamped to [-1, 1], code indices (B*h*w,) or None): KL through
    the posterior mode, VQ through the quantised codes."""
    if is_vq(vae):
        z_q, _, (_, _, indices) = vae.quantize(vae.encode(x0).latents)
        return vae.decode(z_q, force_not_quantize=True).sample.clamp(-1, 1), indices
    return vae.decode(vae.encode(x0).latent_dist.mode()).sample.clamp(-1, 1), None


@torch.no_grad()
def decode(vae: Any, x0: torch.Tensor) -> torch.Tensor:
    """Scaled latents x0 (B, C, h, w) -> pixels (B, 3, H, W) in [-1, 1] (a VQ model quantises in decode)."""
    return vae.decode(x0.to(vae.dtype) / vae.config.scaling_factor).sample.clamp(-1, 1)
