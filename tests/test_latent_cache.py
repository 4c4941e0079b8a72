"""--cache_latents: a cached run trains exactly like an uncached one with the same seed; the cache is reused for the
same data and autoencoder, and rebuilt (not reused) when either changes."""

from __future__ import annotations

import logging

import pytest
import torch
from accelerate import Accelerator
from ldm_helpers import make_ldm_files, max_abs_diff, run_args, weights
from PIL import Image

from ldm_app.config import TextEncoderConfig
from ldm_app.data.dataset import build_dataset, collate_fn
from ldm_app.errors import UserError
from ldm_app.models import build_text_encoder, load_autoencoder, load_tokenizer
from ldm_app.training.latent_cache import (
    check_cacheable,
    latent_stats,
    load_or_build_cache,
    sample_x0,
)
from ldm_app.training.ldm import main

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def test_sample_x0_is_the_reparameterised_draw_of_the_step_generator():
    mean, std = torch.randn(2, 4, 8, 8), torch.rand(2, 4, 8, 8)
    x0 = sample_x0(mean, std, 0.5, torch.Generator().manual_seed(3))
    eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(x0, (mean + std * eps) * 0.5)
    assert torch.equal(sample_x0(mean, None, 0.5, torch.Generator()), mean * 0.5)  # VQ: deterministic


def test_vq_latents_have_no_std():
    from ldm_app.config import AutoencoderConfig
    from ldm_app.models import build_autoencoder

    vq = build_autoencoder(AutoencoderConfig(kind="vq", block_out_channels=(8, 8), norm_num_groups=8))
    mean, std = latent_stats(vq, torch.zeros(1, 3, 16, 16))
    assert mean.shape == (1, 4, 8, 8) and std is None


def test_cached_run_trains_like_an_uncached_one(ldm_files, tmp_path, caplog):
    # a frozen (pretrained) text encoder, so both the latents and the text states are cached
    te_dir = tmp_path / "text_encoder"
    torch.manual_seed(1)
    build_text_encoder(TextEncoderConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=16)).save_pretrained(te_dir)
    extra = ("--max_train_steps", "6", "--checkpointing_steps", "6", "--set", f"text_encoder.pretrained={te_dir}")
    plain = main(run_args(ldm_files, tmp_path / "plain", *extra))
    caplog.set_level(logging.INFO, logger="ldm_app.training.latent_cache")
    cached = main(run_args(ldm_files, tmp_path / "cached", *extra, "--cache_latents"))
    assert "cached latents of 8 images and their captions in" in caplog.text
    assert len(list((tmp_path / "cached" / "latent_cache").glob("latents-*.safetensors"))) == 1
    # same draws, same batches: the losses agree at every step up to float rounding (the cache encodes other
    # batch compositions than training does, ~1e-7 apart)...
    assert torch.allclose(torch.tensor(plain.losses), torch.tensor(cached.losses), atol=1e-5, rtol=0)
    # ...and so do the weights, but Adam divides by sqrt(v) + eps, which turns rounding in near-zero gradients into
    # up to ~lr-sized steps: allow 10% of one step (lr 1e-3), far below what a different draw would give
    diff = max_abs_diff(weights(tmp_path / "plain" / "checkpoint-6" / "model.safetensors"),
                        weights(tmp_path / "cached" / "checkpoint-6" / "model.safetensors"))
    assert diff <= 1e-4
    other_seed = main(run_args(ldm_files, tmp_path / "seed1", *extra, "--cache_latents", "--seed", "1"))
    assert max(abs(a - b) for a, b in zip(other_seed.losses, cached.losses)) > 1e-3


def test_cache_is_reused_and_rebuilt_when_data_or_vae_change(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ldm_app.training.latent_cache")
    files = make_ldm_files(tmp_path)
    acc = Accelerator(cpu=True)
    dataset = build_dataset(str(files.data), None, 32)
    vae, tokenizer = load_autoencoder(files.vae), load_tokenizer()
    cache_dir = tmp_path / "cache"

    def build():
        return load_or_build_cache(acc, cache_dir, dataset, vae, None, tokenizer, collate_fn, batch_size=4)

    first = build()
    assert first.mean.shape == (8, 4, 8, 8) and first.std.shape == (8, 4, 8, 8) and bool(first.valid.all())
    assert first.text_embeds is None  # text encoder trained: text is not cached
    again = build()
    assert "reusing latent cache" in caplog.text and torch.equal(first.mean, again.mean)
    assert len(list(cache_dir.glob("*.safetensors"))) == 1

    with torch.no_grad():  # another autoencoder -> another cache
        next(vae.parameters()).add_(0.1)
    perturbed = build()
    assert len(list(cache_dir.glob("*.safetensors"))) == 2

    image = files.data / "000003.png"  # an edited image -> another cache, with that row's latents changed
    Image.new("RGB", (32, 32), (0, 0, 0)).save(image)
    dataset = build_dataset(str(files.data), None, 32)
    edited = build()
    assert len(list(cache_dir.glob("*.safetensors"))) == 3
    assert not torch.allclose(edited.mean[3], perturbed.mean[3])
    assert torch.allclose(edited.mean[:3], perturbed.mean[:3], atol=1e-6)


def test_random_transforms_cannot_be_cached(ldm_files):
    dataset = build_dataset(str(ldm_files.data), None, 32, random_flip=True)
    with pytest.raises(UserError, match="deterministic"):
        check_cacheable(dataset)
