"""Builders turn configs into diffusers / transformers models with the shapes the configs promise."""

import torch

from ldm_app.config import AutoencoderConfig, TextEncoderConfig, UNetConfig
from ldm_app.models import (
    build_autoencoder,
    build_text_encoder,
    build_unet,
    downsampling_factor,
    load_autoencoder,
    load_tokenizer,
)

TINY_AE = dict(block_out_channels=(8, 8, 16, 16), norm_num_groups=8, latent_channels=4, sample_size=32)


def test_autoencoder_kl_and_vq_downsample_by_8(tmp_path):
    x = torch.randn(1, 3, 32, 32)
    for kind in ("kl", "vq"):
        vae = build_autoencoder(AutoencoderConfig(kind=kind, **TINY_AE)).eval()
        assert downsampling_factor(vae) == 8
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode() if kind == "kl" else vae.encode(x).latents
            assert z.shape == (1, 4, 4, 4)
            assert vae.decode(z).sample.shape == x.shape
        vae.save_pretrained(tmp_path / kind)
        loaded = load_autoencoder(tmp_path / kind)
        assert type(loaded) is type(vae)
        assert torch.equal(next(loaded.parameters()), next(vae.parameters()))


def test_unet_cross_attends_to_text():
    text = build_text_encoder(TextEncoderConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=64))
    unet = build_unet(UNetConfig(block_out_channels=(32, 64), attention=(False, True), sample_size=4,
                                 attention_head_dim=8), cross_attention_dim=text.config.hidden_size).eval()
    tok = load_tokenizer()
    ids = tok(["a red circle", "a blue square"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        c = text(ids)[0]  # (2, 77, 32)
        x = torch.randn(1, 4, 4, 4).repeat(2, 1, 1, 1)
        out = unet(x, torch.tensor([10, 10]), encoder_hidden_states=c).sample
    assert c.shape == (2, 77, 32)
    assert out.shape == x.shape
    assert not torch.allclose(out[0], out[1]), "different captions must change the prediction"


def test_tokenizer_is_real_clip_bpe_offline():
    tok = load_tokenizer()
    assert tok.vocab_size == 49408
    ids = tok("a corgi in a sushi house").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407  # <|startoftext|> ... <|endoftext|>
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a corgi in a sushi house"
    long = tok(" ".join(["red"] * 200), truncation=True, max_length=77).input_ids
    assert len(long) == 77
