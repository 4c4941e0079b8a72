"""Builders: typed configs -> diffusers / transformers models. Nothing here re-implements a network.

- first stage: diffusers `AutoencoderKL` or `VQModel` (f = 2 ** (levels - 1));
- denoiser: diffusers `UNet2DConditionModel` with cross-attention to the text embeddings;
- conditioning: transformers `CLIPTextModel` + the real CLIP BPE `CLIPTokenizer` shipped in `assets/tokenizer`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, VQModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .conditioning import SCALAR_INPUT_DIM
from .config import AutoencoderConfig, TextEncoderConfig, UNetConfig
from .errors import UserError
from .first_stage import downsampling_factor  # noqa: F401 (part of the builders' API)

TOKENIZER_DIR = Path(__file__).parent / "assets" / "tokenizer"
CLIP_VOCAB_SIZE = 49408
CLIP_BOS, CLIP_EOS = 49406, 49407

Autoencoder = AutoencoderKL | VQModel


def build_autoencoder(cfg: AutoencoderConfig) -> Autoencoder:
    """A fresh (random) autoencoder with len(block_out_channels) resolution levels."""
    levels = len(cfg.block_out_channels)
    common = dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.sample_size,
        scaling_factor=cfg.scaling_factor,
    )
    if cfg.kind == "kl":
        return AutoencoderKL(**common)
    if cfg.kind == "vq":
        return VQModel(**common, num_vq_embeddings=cfg.num_vq_embeddings, vq_embed_dim=cfg.latent_channels)
    raise ValueError(f"unknown autoencoder kind {cfg.kind!r}")


def build_unet(cfg: UNetConfig, cross_attention_dim: int, num_classes: int = 0,
               extra_in_channels: int = 0, scalar: bool = False) -> UNet2DConditionModel:  # fmt: skip
    """eps_theta(x_t, t, c[, y]): attention levels get CrossAttn blocks (self-attention + cross-attention to c);
    with `num_classes`, a class embedding (num_classes + 1 rows: the last is the null class) added to the
    timestep embedding, diffusers' own `num_class_embeds`; with `scalar`, an MLP of [s, 1] added there instead
    (diffusers' `class_embed_type="projection"`, see ldm_app.conditioning); `extra_in_channels` concatenated
    after x_t at the input (an inpainting model's mask and masked-image latents), the output keeping the
    latents' channels."""
    if num_classes and scalar:
        raise ValueError("a U-Net has one class embedding: classes or a scalar, not both")
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention))
    return UNet2DConditionModel(
        sample_size=cfg.sample_size,
        in_channels=cfg.in_channels + extra_in_channels,
        out_channels=cfg.in_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        cross_attention_dim=cross_attention_dim,
        num_class_embeds=num_classes + 1 if num_classes else None,
        class_embed_type="projection" if scalar else None,
        projection_class_embeddings_input_dim=SCALAR_INPUT_DIM if scalar else None,
    )


def add_scalar_embedding(unet: UNet2DConditionModel, seed: int = 0) -> UNet2DConditionModel:
    """Give a text-to-image U-Net the scalar embedding of `build_unet(scalar=True)` (diffusers' projection class
    embedding: TimestepEmbedding(2, time_embed_dim), built as diffusers builds it) with its LAST linear layer zero,
    so it adds exactly 0 to the timestep embedding and the model starts as the text model it was (the same idea
    as widen_unet_input's zero channels, and ControlNet's zero convolutions). The first layer is random (seeded;
    the global RNG is left alone): were it zero too, the last layer's gradient would be zero for every input
    except through its bias, and the scalar could never be learned. The config is updated so the saved folder
    reloads in diffusers with the embedding. In place; returns the U-Net."""
    from diffusers.models.embeddings import TimestepEmbedding

    if unet.class_embedding is not None:
        raise ValueError("this U-Net already has a class embedding")
    time_embed_dim = unet.time_embedding.linear_2.out_features
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        embedding = TimestepEmbedding(SCALAR_INPUT_DIM, time_embed_dim)
    with torch.no_grad():
        embedding.linear_2.weight.zero_()
        embedding.linear_2.bias.zero_()
    unet.class_embedding = embedding.to(unet.time_embedding.linear_2.weight)
    unet.register_to_config(class_embed_type="projection", projection_class_embeddings_input_dim=SCALAR_INPUT_DIM)
    return unet


def widen_unet_input(unet: UNet2DConditionModel, in_channels: int) -> UNet2DConditionModel:
    """Give the U-Net's first convolution `in_channels` inputs, the new ones with zero weights, so the widened
    model computes exactly what it did before (SD-inpainting's initialisation from SD; diffusers' own
    train_instruct_pix2pix.py does the same inline). In place; returns the U-Net."""
    old = unet.conv_in
    if in_channels < old.in_channels:
        raise ValueError(f"cannot narrow the U-Net input from {old.in_channels} to {in_channels} channels")
    new = torch.nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new.to(old.weight)
    unet.register_to_config(in_channels=in_channels)
    return unet


def build_text_encoder(cfg: TextEncoderConfig) -> CLIPTextModel:
    """A pretrained CLIP text model from a local folder, or a fresh one sized by `cfg` (trained from scratch)."""
    if cfg.pretrained:
        return load_text_encoder(cfg.pretrained)
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=CLIP_BOS,
        eos_token_id=CLIP_EOS,
        pad_token_id=CLIP_EOS,
    )
    return CLIPTextModel(config)


def load_text_encoder(path: str | Path) -> CLIPTextModel:
    path = _component_dir(path, "text encoder")
    # float32 whatever the stored precision: transformers would keep an fp16-stored encoder (the bundled model's)
    # in fp16, which the CPU and training want in float32
    return CLIPTextModel.from_pretrained(path, use_safetensors=True, dtype=torch.float32)


def load_tokenizer(path: str | Path | None = None, model_max_length: int = 77) -> CLIPTokenizer:
    """The bundled CLIP BPE tokenizer (or one saved in a model folder). Never downloads."""
    path = _component_dir(path or TOKENIZER_DIR, "tokenizer")
    return CLIPTokenizer.from_pretrained(path, model_max_length=model_max_length)


def load_autoencoder(path: str | Path) -> Autoencoder:
    """Load an `AutoencoderKL` or `VQModel` folder, whichever its config.json names."""
    path = _component_dir(path, "autoencoder")
    config_file = path / "config.json"
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{path} is not an autoencoder folder: config.json is missing or unreadable") from None
    classes = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}
    if class_name not in classes:
        raise UserError(f"{path} holds a {class_name!r}, expected an AutoencoderKL or VQModel folder")
    return classes[class_name].from_pretrained(path, use_safetensors=True)  # diffusers loads float32 by default


def _component_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{what} folder {str(path)!r} not found")
    return path
