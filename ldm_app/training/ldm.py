"""train_ldm.py: a text-conditioned DDPM (Ho et al. 2020) in the latent space of a frozen autoencoder (LDM, Rombach
et al. 2022), from one CPU to many GPUs through accelerate.

One optimisation step on one process (B images):
    x0 = (mean + std * eps) * scaling_factor    (B, C, h, w)  the encoder posterior, sampled (or cached, see
                                                              latent_cache.py); VQ: the latents, deterministic
    c = tau_theta(caption or "")                (B, L, D)     CLIP text states; captions dropped with p = 10% so
                                                              that classifier-free guidance works at sampling
    loss = || model(x_t, t, c) - eps (or v) ||^2              GaussianDiffusion.training_losses (Min-SNR optional)
Every random draw of a step comes from `step_generator(seed, micro_step, process)` and the data order from
(seed, epoch), so a checkpoint needs only weights, optimiser, LR schedule, EMA and the data position: a resumed run
(even one killed mid-epoch) ends with the same weights as an uninterrupted one.

Every checkpoint is also a pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/,
with the EMA weights): `LatentDiffusionPipeline.from_pretrained(checkpoint_dir)` loads it, and the output folder
ends as one. A LoRA run (`--lora_rank R --pretrained_model DIR`, lora.py) trains only peft adapters of a frozen
pretrained model, and writes pytorch_lora_weights.safetensors instead of the pipeline.

We write our own loop rather than adapt diffusers' examples/text_to_image/train_text_to_image.py, whose
checkpoints do not load as pipelines, whose resume restarts the epoch, which caches nothing and cannot train the
text encoder from scratch.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from ..checkpointing import (LOADED_WEIGHTS, TRAINING_ROWS, load_checkpoint, lock_run_folder, save_checkpoint,
                             write_run_config)
from ..config import (ConditioningConfig, DataConfig, EmbeddingConfig, LoRAConfig, NoiseScheduleConfig,
                      TextEncoderConfig, TrainConfig, UNetConfig, flag_overrides, load_config, merge, parse_overrides,
                      read_yaml, to_dict, validate)
from ..conditioning import (NULL_CAPTION, concat_channels, drop_captions, drop_labels, drop_scalars, encode_text,
                            inpaint_condition, is_scalar_unet, masked_image, read_labels, read_scalars,
                            scalar_condition, unet_input)
from ..errors import ArgumentParser, UserError, raise_if_stopped
from ..first_stage import downsampling_factor, is_vq, latent_channels, latent_stats, sample_x0
from .common import (EmptyBatchGuard, Position, REPORT_TO, TrainProgress, batches, batches_per_epoch,
                     bucket_batches_per_epoch, check_launchable, check_output_dir, check_report_to, effective_lr,
                     launched_processes, log_image, make_accelerator, make_lr_scheduler, make_optimizer,
                     no_transformers_bars, open_run_folder, release_freed_memory, rows_sha256, setup_logging,
                     step_generator, weights_sha256)
from .lora import (add_embedding, add_lora, check_embedding_captions, check_embedding_run, check_lora_base,
                   check_lora_run, expand_token, keep_other_rows, restore_other_rows, save_embedding, save_lora)

logger = logging.getLogger("train_ldm")

EMA_FILE = "ema.safetensors"
# Settings a resumed run may change: the step budget, checkpoint cadence, logging, validation, caching, speed-ups.
MAY_DIFFER_ON_RESUME = (
    "train.max_train_steps", "train.checkpointing_steps", "train.checkpoints_total_limit", "train.log_every",
    "ldm.validation", "ldm.cache_latents", "ldm.cache_dir", "ldm.enable_xformers", "data.dataloader_num_workers",
)


# --------------------------------------------------------------------------------------------------------------
# Run configuration


@dataclass
class LDMSection:
    """What is specific to latent diffusion training (the other sections are shared with the rest of ldm_app)."""

    pretrained_vae: str | None = None  # a trained AutoencoderKL / VQModel folder (train_vae.py's output)
    pretrained_model: str | None = None  # or a whole SD-1.x-layout pipeline folder to fine-tune
    # full fine-tuning of pretrained_model: train its text encoder with the U-Net (DreamBooth's and kohya's
    # --train_text_encoder), e.g. to teach it new wordings; otherwise it stays frozen (from scratch it always trains)
    train_text_encoder: bool = False
    caption_dropout: float = 0.1  # share of captions replaced by "" (classifier-free guidance)
    snr_gamma: float | None = None  # Min-SNR-gamma weighting (Hang et al. 2023); 5.0 is the paper's choice
    noise_offset: float = 0.0  # offset noise (Guttenberg 2023); 0.05-0.1 typical
    use_ema: bool = True
    ema_decay: float = 0.9999
    cache_latents: bool = False
    cache_dir: str | None = None  # default: OUTPUT_DIR/latent_cache
    enable_xformers: bool = False  # xformers attention if installed; PyTorch SDPA otherwise (the default)
    validation_steps: int = 0  # sample the prompts every N steps (0: only at the end)
    validation_prompts: list[str] = field(default_factory=list)
    validation_sampler: str = "ddim"
    validation_num_inference_steps: int = 25
    validation_guidance_scale: float = 5.0
    validation_seed: int = 0

    def validate(self) -> None:
        from ..samplers import SAMPLERS

        if not 0 <= self.caption_dropout < 1:
            raise UserError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise UserError(f"snr_gamma must be > 0 or null, got {self.snr_gamma}")
        if self.noise_offset < 0:
            raise UserError(f"noise_offset must be >= 0, got {self.noise_offset}")
        if not 0 < self.ema_decay < 1:
            raise UserError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.validation_steps < 0 or self.validation_num_inference_steps < 1:
            raise UserError("validation_steps must be >= 0 and validation_num_inference_steps >= 1")
        if self.validation_sampler not in SAMPLERS:
            raise UserError(f"unknown validation_sampler {self.validation_sampler!r}; expected one of "
                            f"{', '.join(SAMPLERS)}")
        if not (self.pretrained_vae or self.pretrained_model):
            raise UserError("give --pretrained_vae VAE_DIR (a trained autoencoder folder) or --pretrained_model "
                            "PIPELINE_DIR (a pipeline folder to fine-tune)")
        if self.train_text_encoder and not self.pretrained_model:
            raise UserError("--train_text_encoder fine-tunes the text encoder of --pretrained_model PIPELINE_DIR; "
                            "from scratch the text encoder trains anyway (unless text_encoder.pretrained is set)")


@dataclass
class LDMRunConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    noise: NoiseScheduleConfig = field(default_factory=NoiseScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ldm: LDMSection = field(default_factory=LDMSection)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)

    def validate(self) -> None:
        check_lora_run(self)
        check_embedding_run(self)
        if self.ldm.train_text_encoder and self.frozen_base:
            raise UserError("--train_text_encoder is full fine-tuning: with --lora_rank use --lora_text_encoder; "
                            "with --train_embedding only the new token's vector trains")

    @property
    def frozen_base(self) -> bool:
        """LoRA or textual inversion: the pretrained weights stay frozen, only the added ones train."""
        return self.lora.rank is not None or self.embedding.token is not None


# --------------------------------------------------------------------------------------------------------------
# Command line




# flag -> config key; each flag given on the command line overrides that key (after --set)
FLAG_KEYS = {
    "train_data_dir": "data.train_data_dir", "dataset_name": "data.dataset_name",
    "caption_column": "data.caption_column", "image_column": "data.image_column",
    "pretrained_vae": "ldm.pretrained_vae",
    "pretrained_model": "ldm.pretrained_model", "max_train_steps": "train.max_train_steps",
    "checkpointing_steps": "train.checkpointing_steps", "checkpoints_total_limit": "train.checkpoints_total_limit",
    "seed": "train.seed", "mixed_precision": "train.mixed_precision", "learning_rate": "train.learning_rate",
    "train_batch_size": "train.train_batch_size", "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "gradient_checkpointing": "train.gradient_checkpointing", "cache_latents": "ldm.cache_latents",
    "cache_dir": "ldm.cache_dir", "validation_steps": "ldm.validation_steps",
    "validation_prompts": "ldm.validation_prompts", "enable_xformers_memory_efficient_attention": "ldm.enable_xformers",
    "lora_rank": "lora.rank", "lora_alpha": "lora.alpha", "lora_text_encoder": "lora.text_encoder",
    "train_embedding": "embedding.token", "initializer_token": "embedding.initializer_token",
    "num_vectors": "embedding.num_vectors",
    "train_text_encoder": "ldm.train_text_encoder",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="train_ldm.py", description="Train a text-conditioned latent diffusion U-Net.")
    p.add_argument("--config", help="YAML file overriding the defaults (configs/ldm/*.yaml)")
    p.add_argument("--output_dir", required=True, help="run folder: checkpoints, logs, and the final pipeline")
    p.add_argument("--train_data_dir", help="a folder of images with a metadata.jsonl (file_name + caption column) "
                   "or a .txt caption file beside each image (see docs/training.md)")
    p.add_argument("--dataset_name", help="or a dataset on the Hugging Face hub (needs a network)")
    p.add_argument("--caption_column", help="the caption column of metadata.jsonl or the hub dataset (default: text)")
    p.add_argument("--image_column", help="the hub dataset's image column (default: image)")
    p.add_argument("--pretrained_vae", help="trained autoencoder folder (AutoencoderKL or VQModel)")
    p.add_argument("--pretrained_model", help="SD-1.x-layout pipeline folder to fine-tune")
    p.add_argument("--lora_rank", type=int, help="LoRA fine-tuning of --pretrained_model with adapters of this rank: "
                   "only they train, and the output is pytorch_lora_weights.safetensors (docs/training.md)")
    p.add_argument("--lora_alpha", type=float, help="LoRA alpha (default: the rank; the update is scaled by "
                   "alpha / rank)")
    p.add_argument("--lora_text_encoder", action="store_true", default=None,
                   help="with --lora_rank: LoRA on the text encoder's attention too")
    p.add_argument("--train_embedding", metavar="TOKEN", help="textual inversion of --pretrained_model: learn one "
                   "vector for this new token (write it into the captions); output learned_embeds.safetensors")
    p.add_argument("--initializer_token", help="the existing token the new vector starts from (default: *)")
    p.add_argument("--num_vectors", type=int, help="with --train_embedding: vectors for the token (default 1; "
                   "more give it more capacity, as diffusers' and A1111's multi-vector embeddings)")
    p.add_argument("--resume_from_checkpoint", help="a checkpoint folder, or 'latest' (fresh start if none)")
    for name in ("max_train_steps", "checkpointing_steps", "checkpoints_total_limit", "seed", "train_batch_size",
                 "gradient_accumulation_steps", "validation_steps"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--learning_rate", type=float)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"])
    p.add_argument("--cache_dir", help="where --cache_latents stores latents (default OUTPUT_DIR/latent_cache)")
    p.add_argument("--train_text_encoder", action="store_true", default=None,
                   help="with --pretrained_model (full fine-tuning): train its text encoder too (new words, wordings)")
    for name in ("cache_latents", "gradient_checkpointing", "enable_xformers_memory_efficient_attention"):
        p.add_argument(f"--{name}", action="store_true", default=None)
    p.add_argument("--validation_prompts", action="append", metavar="PROMPT_OR_FILE",
                   help="a prompt (repeat the flag for more) or one text file with a prompt per line")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="any config key")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    p.add_argument("--report_to", choices=REPORT_TO, default="tensorboard",
                   help="where the training curves go (OUT/logs for TensorBoard; 'all': every installed tracker)")
    return p.parse_args(argv)


def _read_prompts(values: list[str]) -> list[str]:
    if len(values) == 1 and Path(values[0]).is_file():
        path = Path(values[0])
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"--validation_prompts file {str(path)!r} is not UTF-8 text (byte {e.start}): save it "
                            "as UTF-8, one prompt per line") from None
        except OSError as e:
            raise UserError(f"cannot read --validation_prompts file {str(path)!r}: {e.strerror or e}") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise UserError(f"--validation_prompts file {str(path)!r} holds no prompt (one per line expected)")
        return prompts
    return values


def cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The dedicated flags as nested overrides; --validation_prompts may name a file of prompts."""
    if args.validation_prompts is not None:
        args.validation_prompts = _read_prompts(args.validation_prompts)
    return flag_overrides(args, FLAG_KEYS)


VALIDATION_SAMPLING = {"validation_sampler": "sampler", "validation_num_inference_steps": "num_inference_steps",
                       "validation_guidance_scale": "guidance_scale"}  # ldm.* -> the model folder's ldm_app.json


def load_run_config(args: argparse.Namespace) -> LDMRunConfig:
    """The config file, then --set, then the flags. A full fine-tune whose config sets none of the validation
    sampling keys takes them from the base model's stored defaults (ldm_app.json): they are also the output's
    stored defaults, and the class defaults (DDIM 25, guidance 5) would have a guidance-distilled base sampled at
    guidance 5 with no word."""
    overrides = merge(parse_overrides(args.set), cli_overrides(args))
    cfg = load_config(LDMRunConfig, args.config, overrides)
    given = merge(read_yaml(args.config) if args.config else {}, overrides).get("ldm") or {}
    if cfg.ldm.pretrained_model and cfg.lora.rank is None and not any(k in given for k in VALIDATION_SAMPLING):
        base = base_sampling_defaults(cfg)
        inherited = {k: base[v] for k, v in VALIDATION_SAMPLING.items() if v in base}
        if inherited:
            cfg = replace(cfg, ldm=replace(cfg.ldm, **inherited))
            validate(cfg)
            logger.info("sampling as the base model stores it: %s", ", ".join(f"{k}={v}" for k, v in inherited.items()))
    return cfg


def base_sampling_defaults(cfg: LDMRunConfig) -> dict[str, Any]:
    """The stored sampling defaults of the pretrained model folder ({} for none, a single file or a hub name)."""
    from ..pipeline import read_sampling_defaults

    folder = Path(cfg.ldm.pretrained_model)
    return read_sampling_defaults(folder) if folder.is_dir() else {}


# --------------------------------------------------------------------------------------------------------------
# Models


@dataclass
class Models:
    vae: Any  # AutoencoderKL | VQModel, frozen
    text_encoder: Any  # CLIPTextModel: trained jointly when built from scratch, frozen when pretrained
    tokenizer: Any
    unet: Any  # UNet2DConditionModel
    diffusion: Any  # GaussianDiffusion
    train_text_encoder: bool
    embedding_rows: slice | None = None  # textual inversion: the new token's rows of the input embeddings
    # sha256 of the weights taken from disk, as loaded (before adapters or widening): run_config.json records them
    # so that a resume from other files behind the same paths is refused (checkpointing.check_run_folder)
    loaded_weights: dict[str, str] = field(default_factory=dict)


def load_folder(what: str, path: str | Path, loader: Any) -> Any:
    """`loader(path)` with the library's errors on a folder that is not a model turned into one line."""
    if Path(path).is_file():
        raise UserError(f"{what} folder {str(path)!r} is a file; expected a folder (config.json and weights)")
    if not Path(path).is_dir():
        raise UserError(f"{what} folder {str(path)!r} not found")
    try:
        with no_transformers_bars():  # transformers' "Loading weights" bar: noise for a local load, and it would
            return loader(path)       # put lines before a one-line error that follows
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"{str(path)!r} is not a {what} folder ({first})") from None


def build_models(cfg: LDMRunConfig) -> Models:
    """From scratch (U-Net and, unless pretrained, the text encoder; seeded) or from a pipeline folder."""
    from ..diffusion import GaussianDiffusion
    from ..models import build_text_encoder, build_unet, load_autoencoder, load_text_encoder, load_tokenizer

    if cfg.ldm.pretrained_model:
        check_lora_base(cfg)
        models = _models_from_pipeline(Path(cfg.ldm.pretrained_model), cfg.ldm.pretrained_vae,
                                       cfg.conditioning.concat, scalar=cfg.conditioning.uses_scalar,
                                       seed=cfg.train.seed)
        models.train_text_encoder = cfg.ldm.train_text_encoder  # full fine-tuning; LoRA and embeddings set their own
        if cfg.lora.rank is not None:  # freezes the base weights; a text encoder with LoRA trains its adapters
            models.train_text_encoder = cfg.lora.text_encoder
            n = add_lora(models.unet, models.text_encoder if cfg.lora.text_encoder else None, cfg.lora,
                         cfg.train.seed)
            logger.info("LoRA rank %d on %s: %d trainable parameters", cfg.lora.rank,
                        "the U-Net and the text encoder" if cfg.lora.text_encoder else "the U-Net", n)
        if cfg.embedding.token is not None:  # only the new token's row of the text encoder's embeddings trains
            models.unet.requires_grad_(False)
            models.embedding_rows = add_embedding(models.text_encoder, models.tokenizer, cfg.embedding.token,
                                                  cfg.embedding.initializer_token, cfg.embedding.num_vectors)
            models.train_text_encoder = True
            logger.info("textual inversion: token %r (%d vector(s), ids %d-%d) starts as %r", cfg.embedding.token,
                        cfg.embedding.num_vectors, models.embedding_rows.start, models.embedding_rows.stop - 1,
                        cfg.embedding.initializer_token)
        return models
    vae = load_folder("autoencoder", cfg.ldm.pretrained_vae, load_autoencoder)
    check_compatible(vae, cfg.unet.in_channels, cfg)
    extra = concat_channels(cfg.conditioning.concat, latent_channels(vae))
    torch.manual_seed(cfg.train.seed)  # initial weights are a function of the seed
    te_cfg = cfg.text_encoder
    text_encoder = (load_folder("text encoder", te_cfg.pretrained, load_text_encoder) if te_cfg.pretrained
                    else build_text_encoder(te_cfg))
    unet = build_unet(cfg.unet, cross_attention_dim=text_encoder.config.hidden_size,
                      num_classes=cfg.conditioning.num_classes, extra_in_channels=extra,
                      scalar=cfg.conditioning.uses_scalar)
    tokenizer = load_tokenizer(model_max_length=text_encoder.config.max_position_embeddings)
    diffusion = GaussianDiffusion.from_scheduler_config(cfg.noise)
    loaded = {"autoencoder": weights_sha256(vae)}
    if te_cfg.pretrained:
        loaded["text encoder"] = weights_sha256(text_encoder)
    return Models(vae, text_encoder, tokenizer, unet, diffusion, train_text_encoder=not te_cfg.pretrained,
                  loaded_weights=loaded)


def _models_from_pipeline(folder: Path, vae_dir: str | None, concat: str = "none", scalar: bool = False,
                          seed: int = 0) -> Models:
    """Fine-tuning: every component from an SD-1.x-layout folder (the text encoder stays frozen). With
    `concat`, a text-to-image U-Net gets its input widened for the concatenated channels (zero weights); with
    `scalar`, a U-Net without a class embedding gets the scalar embedding, its last layer zero (seeded)."""
    from diffusers import UNet2DConditionModel

    from ..diffusion import GaussianDiffusion
    from ..models import add_scalar_embedding, load_autoencoder, load_text_encoder, load_tokenizer, widen_unet_input

    if not (folder / "model_index.json").is_file():
        raise UserError(f"--pretrained_model {str(folder)!r} is not a pipeline folder (no model_index.json)")
    logger.warning("--pretrained_model: the unet, text_encoder and noise config sections are taken from %s", folder)
    vae = load_folder("autoencoder", vae_dir or folder / "vae", load_autoencoder)
    unet = load_folder("U-Net", folder / "unet",
                       lambda p: UNet2DConditionModel.from_pretrained(p, use_safetensors=True))
    check_compatible(vae, unet.config.out_channels, None)
    loaded = {"autoencoder": weights_sha256(vae), "U-Net": weights_sha256(unet)}  # before widening
    channels = latent_channels(vae)
    want = channels + concat_channels(concat, channels)
    have = unet.config.in_channels
    if have == channels and want > channels:
        widen_unet_input(unet, want)
        logger.info("U-Net input widened from %d to %d channels (zero weights) for conditioning.concat=%s",
                    have, want, concat)
    elif have != want:
        raise UserError(f"{folder / 'unet'} takes {have} input channels; conditioning.concat={concat!r} needs "
                        f"{want} (or {channels}, widened): " + ("set conditioning.concat=inpaint for an inpainting "
                        "model" if concat == "none" else "not a model this run can fine-tune"))  # fmt: skip
    if scalar and unet.class_embedding is None:  # a text-to-image folder: starts as exactly that model
        add_scalar_embedding(unet, seed)
        logger.info("scalar embedding added to the U-Net (last layer zero: the start equals the text model)")
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")
    try:
        diffusion = GaussianDiffusion(**{k: sched[k] for k in keys if k in sched})
    except ValueError as e:
        raise UserError(f"{folder}/scheduler: {e}") from None
    text_encoder = load_folder("text encoder", folder / "text_encoder", load_text_encoder)
    max_length = text_encoder.config.max_position_embeddings
    tokenizer = load_folder("tokenizer", folder / "tokenizer", lambda p: load_tokenizer(p, model_max_length=max_length))
    loaded["text encoder"] = weights_sha256(text_encoder)
    return Models(vae, text_encoder, tokenizer, unet, diffusion, train_text_encoder=False, loaded_weights=loaded)


def check_compatible(vae: Any, unet_in_channels: int, cfg: LDMRunConfig | None) -> None:
    """The U-Net denoises the autoencoder's latents: same channels; with a config, the same latent size too."""
    channels = latent_channels(vae)
    if unet_in_channels != channels:
        raise UserError(f"unet.in_channels ({unet_in_channels}) must equal the autoencoder's latent channels "
                        f"({channels}): set --set unet.in_channels={channels}")
    if cfg is None:
        return
    f = downsampling_factor(vae)
    side, down = cfg.data.resolution // f, 2 ** (len(cfg.unet.block_out_channels) - 1)
    if cfg.data.resolution % f or side % down:
        raise UserError(f"data.resolution {cfg.data.resolution} must be a multiple of {f * down} (autoencoder "
                        f"factor {f} x U-Net downsampling {down})")
    if cfg.unet.sample_size != side:
        raise UserError(f"unet.sample_size ({cfg.unet.sample_size}) must be the latent side data.resolution / f = "
                        f"{cfg.data.resolution} / {f} = {side}")


def build_train_dataset(cfg: LDMRunConfig) -> Any:
    """The training rows of the dataset (the held-out fraction is left out)."""
    from ..data.dataset import build_dataset, split_indices

    d = cfg.data
    full = build_dataset(d.train_data_dir, d.dataset_name, d.resolution, d.center_crop, d.random_flip,
                         d.caption_column, d.image_column, d.max_samples)
    train_rows, held_out = split_indices(len(full), d.holdout_fraction, cfg.train.seed)
    return full.select(train_rows) if held_out else full


# --------------------------------------------------------------------------------------------------------------
# Small pieces of a step



def unwrap_params(accelerator: Any, module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trained parameters of a prepared module (all of them, or a LoRA run's adapters)."""
    return [p for _, p in trainable_named_params(accelerator, module)]


def trainable_named_params(accelerator: Any, module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in accelerator.unwrap_model(module).named_parameters() if p.requires_grad]


# --------------------------------------------------------------------------------------------------------------
# The trainer


@dataclass
class RunState:
    """Where training stands; saved as the checkpoint's training_state.json."""

    step: int = 0  # optimisation steps done
    micro_step: int = 0  # batches consumed by this process (> step with gradient accumulation)
    position: Position = field(default_factory=Position)

    def to_json(self) -> dict[str, int]:
        return {"step": self.step, "micro_step": self.micro_step, "epoch": self.position.epoch,
                "batch": self.position.batch}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunState:
        return cls(d["step"], d.get("micro_step", d["step"]), Position(d["epoch"], d["batch"]))


@dataclass
class TrainResult:
    step: int
    losses: list[float]  # this process's loss at each optimisation step of this run (tests, benchmarks)


class LDMTrainer:
    """Owns the prepared models, optimiser, EMA and run state; `run()` trains to max_train_steps."""

    def __init__(self, cfg: LDMRunConfig, models: Models, dataset: Any, accelerator: Any, output_dir: Path):
        self.cfg, self.m, self.dataset, self.acc, self.out = cfg, models, dataset, accelerator, output_dir
        self.state = RunState()
        self.cache = None
        self.losses: list[torch.Tensor] = []
        self.skipped = 0  # unreadable image loads dropped from batches by this process in this run
        cond = cfg.conditioning
        # class labels and scalars by dataset row: batches carry their rows' indices, cached or not
        self.labels = read_labels(dataset, cond.label_column, cond.num_classes) if cond.uses_class else None
        self.scalars = read_scalars(dataset, cond.scalar_column) if cond.uses_scalar else None
        self.check_class_embedding(cfg, models.unet)
        self._setup_models()
        self._setup_optimisation()

    # ---- setup ---------------------------------------------------------------------------------------------

    @staticmethod
    def check_class_embedding(cfg: LDMRunConfig, unet: Any) -> None:
        """A class-conditional run needs a U-Net with num_classes + 1 class embeddings, a scalar run the scalar
        embedding (ldm_app.conditioning), any other run neither (a fine-tuned folder too)."""
        cond, config = cfg.conditioning, unet.config
        scalar = is_scalar_unet(config)
        if cond.uses_scalar != scalar:
            have = "has a scalar embedding" if scalar else \
                f"has no scalar embedding (class_embed_type={config.class_embed_type!r})"  # fmt: skip
            raise UserError(f"the U-Net {have}; conditioning.kind is {cond.kind!r}")
        if scalar:
            return
        if config.class_embed_type is not None:
            raise UserError(f"the U-Net has class_embed_type={config.class_embed_type!r}, which train_ldm.py cannot "
                            "train")  # fmt: skip
        want = cond.num_classes + 1 if cond.uses_class else None
        have = config.num_class_embeds
        if want != have:
            raise UserError(f"the U-Net has num_class_embeds={have}, conditioning {cond.kind!r} "
                            f"needs {want}; a class-conditional model needs conditioning.num_classes + 1 (null) rows")

    def _setup_models(self) -> None:
        m, device = self.m, self.acc.device
        m.vae.requires_grad_(False).eval().to(device)
        if not self.cfg.frozen_base:  # a LoRA / embedding run's requires_grad flags were set by add_lora/_embedding
            m.text_encoder.requires_grad_(m.train_text_encoder)
        m.text_encoder.train(m.train_text_encoder).to(device)
        m.unet.train()
        if self.cfg.train.gradient_checkpointing:
            m.unet.enable_gradient_checkpointing()
            if m.train_text_encoder:
                m.text_encoder.gradient_checkpointing_enable()
        if self.cfg.ldm.enable_xformers:
            enable_xformers(m.unet)

    def _setup_optimisation(self) -> None:
        """Optimiser over the U-Net (and the text encoder when trained), their trainable parameters only (a LoRA
        run: the adapters); accelerate wraps all of it."""
        cfg, acc, p = self.cfg.train, self.acc, self.acc.num_processes
        # a textual-inversion run's U-Net is frozen whole: not prepared (DDP refuses a module with nothing to train)
        named = {"unet": self.m.unet} if any(q.requires_grad for q in self.m.unet.parameters()) else {}
        if self.m.train_text_encoder:
            named["text_encoder"] = self.m.text_encoder
        params = [q for t in named.values() for q in t.parameters() if q.requires_grad]
        optimizer = make_optimizer(params, cfg, effective_lr(cfg, p))
        lr_scheduler = make_lr_scheduler(optimizer, cfg, p)
        *trainables, self.optimizer, self.lr_scheduler = acc.prepare(*named.values(), optimizer, lr_scheduler)
        self.trainables = trainables
        self.named_trainables = dict(zip(named, trainables))
        self.unet = self.named_trainables["unet"] if "unet" in named else self.m.unet.to(acc.device)
        self.unet_input_dtype = deepspeed_input_dtype(acc)
        self.text_encoder = self.named_trainables.get("text_encoder", self.m.text_encoder)
        self.original_embeddings = None
        if self.m.embedding_rows is not None:
            weight = self.embedding_weight()
            self.original_embeddings = weight.detach().clone()  # the base rows (and the token's start)
            keep_other_rows(weight, self.m.embedding_rows)
        self.ema = self._make_ema() if self.cfg.ldm.use_ema else {}

    def embedding_weight(self) -> torch.nn.Parameter:
        return self.acc.unwrap_model(self.text_encoder).get_input_embeddings().weight

    def _make_ema(self) -> dict[str, Any]:
        from diffusers.training_utils import EMAModel

        return {name: EMAModel(unwrap_params(self.acc, module), decay=self.cfg.ldm.ema_decay)
                for name, module in self.named_trainables.items() if unwrap_params(self.acc, module)}

    def use_cache(self, cache_dir: Path) -> None:
        """Train from cached latents (and cached text states when the text encoder is frozen)."""
        from ..data.dataset import collate_fn
        from .latent_cache import CachedLatentDataset, load_or_build_cache

        frozen_te = None if self.m.train_text_encoder else self.m.text_encoder
        self.cache = load_or_build_cache(self.acc, cache_dir, self.dataset, self.m.vae, frozen_te, self.m.tokenizer,
                                         collate_fn, self.cfg.train.train_batch_size,
                                         self.cfg.data.dataloader_num_workers)
        self.dataset = CachedLatentDataset(self.cache, self.dataset.captions)

    def resume(self, checkpoint: Path) -> None:
        self.state = RunState.from_json(load_checkpoint(self.acc, checkpoint))
        if self.ema:
            self._load_ema(checkpoint / EMA_FILE)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", checkpoint, self.state.step,
                    self.state.position.epoch, self.state.position.batch)

    # ---- one step ------------------------------------------------------------------------------------------

    def latents(self, batch: dict[str, Any], g: torch.Generator) -> torch.Tensor:
        """x0 (B, C, h, w): a sample of the encoder posterior, scaled; the same draw cached or not."""
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"], batch["latent_std"]
        else:
            with self.acc.autocast():
                mean, std = latent_stats(self.m.vae, batch["pixel_values"])
        return sample_x0(mean, std, self.m.vae.config.scaling_factor, g)

    def text_states(self, captions: list[str]) -> torch.Tensor:
        """c = tau_theta(captions), (B, L, D): cached, computed frozen, or computed with gradients."""
        if self.cache is not None and self.cache.text_embeds is not None:
            return self.cache.text_states(captions, self.acc.device)
        with contextlib.nullcontext() if self.m.train_text_encoder else torch.no_grad():
            if self.m.embedding_rows is not None:
                captions = expand_token(captions, self.m.tokenizer)
            return encode_text(self.m.tokenizer, self.text_encoder, captions, self.acc.device)

    def inpaint_latents(self, batch: dict[str, Any], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """An inpainting model's step inputs: x0 (B, C, h, w) and the concatenated condition (B, 1 + C, h, w) of a
        random mask (ldm_app.masks) and the masked image's latents (a posterior sample, as diffusers' pipeline
        encodes it), both images encoded in one autoencoder call. Draws: masks, x0's eps, the masked image's eps."""
        from ..masks import random_masks

        pixels = batch["pixel_values"].to(self.acc.device)
        mask = random_masks(pixels, g)  # (B, 1, H, W), 1 = repaint
        with self.acc.autocast():
            mean, std = latent_stats(self.m.vae, torch.cat([pixels, masked_image(pixels, mask)]))
        n, sf = len(pixels), self.m.vae.config.scaling_factor
        x0 = sample_x0(mean[:n], None if std is None else std[:n], sf, g)
        masked = sample_x0(mean[n:], None if std is None else std[n:], sf, g)
        return x0, inpaint_condition(mask, masked)

    def x0_and_concat(self, batch: dict[str, Any], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x0 (B, C, h, w) and, for an inpainting model, its concatenated condition (B, 1 + C, h, w), else None."""
        if self.cfg.conditioning.concat == "inpaint":
            return self.inpaint_latents(batch, g)
        return self.latents(batch, g), None

    def loss(self, batch: dict[str, Any], g: torch.Generator) -> torch.Tensor:
        """The simplified DDPM objective on one batch; draws, in order: latent eps (an inpainting model: masks and
        latent eps), caption drops, t, noise."""
        ldm = self.cfg.ldm
        cond = self.cfg.conditioning
        x0, concat = self.x0_and_concat(batch, g)
        if cond.uses_text:
            captions = drop_captions(batch["captions"], ldm.caption_dropout, g)
        else:  # class only: the text encoder sees the null caption (the U-Net keeps its cross-attention)
            captions = [NULL_CAPTION] * len(batch["captions"])
        c = self.text_states(captions)  # (B, L, D)
        y = None
        if cond.uses_class:  # (B,) labels, the null class with probability label_dropout
            y = drop_labels(self.labels[batch["indices"]], cond.num_classes, cond.label_dropout, g).to(x0.device)
        elif cond.uses_scalar:  # (B, 2) [s, 1], the null [0, 0] with probability label_dropout
            y = drop_scalars(scalar_condition(self.scalars[batch["indices"]]), cond.label_dropout, g).to(x0)

        def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with contextlib.nullcontext() if "unet" in self.named_trainables else self.acc.autocast():
                return predict_eps(self.unet, unet_input(x_t, concat), t, c, y, self.unet_input_dtype)

        loss, _ = self.m.diffusion.training_losses(model_fn, x0, generator=g, snr_gamma=ldm.snr_gamma,
                                                   noise_offset=ldm.noise_offset)
        return loss

    def train_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """Forward/backward on one batch; the optimiser steps when accelerate says the accumulation is complete."""
        acc, cfg = self.acc, self.cfg.train
        g = step_generator(cfg.seed, self.state.micro_step, acc.process_index)
        with acc.accumulate(*self.trainables):
            loss = self.loss(batch, g)
            acc.backward(loss)
            if acc.sync_gradients and cfg.max_grad_norm > 0:
                acc.clip_grad_norm_([q for t in self.trainables for q in t.parameters() if q.requires_grad],
                                    cfg.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.state.micro_step += 1
        return loss.detach()

    # ---- the loop ------------------------------------------------------------------------------------------

    def data_stream(self) -> Iterator[tuple[Position, dict[str, Any]]]:
        from ..data.dataset import collate_fn
        from .latent_cache import collate_cached

        cfg, p = self.cfg.train, self.acc.num_processes
        check_enough_images(len(self.dataset), cfg.train_batch_size, p, getattr(self.dataset, "bucket_ids", None))
        collate = collate_cached if self.cache is not None else collate_fn
        return batches(self.dataset, cfg.train_batch_size, cfg.seed, self.acc, self.state.position, collate,
                       self.cfg.data.dataloader_num_workers)

    def run(self) -> TrainResult:
        cfg, acc = self.cfg.train, self.acc
        self._log_start()
        window, last_saved, t0 = [], self.state.step, time.perf_counter()
        stream = self.data_stream()
        guard = EmptyBatchGuard(len(self.dataset), cfg.train_batch_size, acc.num_processes)
        per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps * acc.num_processes
        with TrainProgress("train_ldm", cfg.max_train_steps, self.state.step, per_step,
                           acc.is_main_process) as progress:
            while self.state.step < cfg.max_train_steps:
                raise_if_stopped()  # a SIGTERM/Ctrl-C that C code swallowed during the last step (ldm_app.errors)
                self.state.position, batch = next(stream)
                self.skipped += int(batch["num_skipped"])
                # every image of the batch was unreadable (warned by the dataset), here or on another process
                if guard.skip(self._empty_anywhere(len(batch["captions"])), self.skipped, self.dataset):
                    continue
                window.append(self.train_step(batch))
                if not acc.sync_gradients:
                    continue
                self.state.step += 1
                self._after_optimizer_step()
                self.losses.append(torch.stack(window).mean())
                progress.update(lambda: {"loss": self.losses[-1].item()})  # this process's loss
                if self.state.step % cfg.log_every == 0:
                    self._log(t0)
                    release_freed_memory()
                    t0 = time.perf_counter()
                window = []
                if self.state.step % cfg.checkpointing_steps == 0:
                    self.save()
                    last_saved = self.state.step
                if self.cfg.ldm.validation_steps and self.state.step % self.cfg.ldm.validation_steps == 0:
                    self.validate()
        if last_saved != self.state.step:
            self.save()
        if self.skipped:
            logger.warning("skipped %d unreadable image loads during training (see the warnings naming them)",
                           self.skipped)
        if self.cfg.ldm.validation_prompts and not (self.cfg.ldm.validation_steps and
                                                    self.state.step % self.cfg.ldm.validation_steps == 0):
            self.validate()
        self.export_final()
        acc.end_training()
        return TrainResult(self.state.step, [float(x) for x in self.losses])

    def _empty_anywhere(self, n: int) -> bool:
        """Skip a batch with no readable image on any process, by every process together (DDP needs that)."""
        if self.acc.num_processes == 1:
            return n == 0
        return bool(self.acc.gather(torch.tensor([n], device=self.acc.device)).min() == 0)

    def _after_optimizer_step(self) -> None:
        if self.m.embedding_rows is not None:
            restore_other_rows(self.embedding_weight(), self.original_embeddings, self.m.embedding_rows)
        for name, ema in self.ema.items():
            ema.step(unwrap_params(self.acc, self.named_trainables[name]))

    def _log_start(self) -> None:
        cfg, p = self.cfg.train, self.acc.num_processes
        if self.state.step >= cfg.max_train_steps and self.acc.is_main_process:
            logger.warning("the run is at step %d already, at or past max_train_steps %d: nothing to train; the "
                           "output is step %d's weights again (raise --max_train_steps to go on)", self.state.step,
                           cfg.max_train_steps, self.state.step)  # fmt: skip
        logger.info("training %d steps from step %d: %d images, batch %d x %d accumulation x %d process(es) = %d, "
                    "lr %.3g, text encoder %s, %s latents", cfg.max_train_steps, self.state.step, len(self.dataset),
                    cfg.train_batch_size, cfg.gradient_accumulation_steps, p,
                    cfg.train_batch_size * cfg.gradient_accumulation_steps * p, effective_lr(cfg, p),
                    "trained" if self.m.train_text_encoder else "frozen", "cached" if self.cache else "encoded")

    def _log(self, t0: float) -> None:
        """Mean loss over processes for the last step (collective), LR and throughput, to the log and TensorBoard."""
        cfg = self.cfg.train
        loss = self.acc.gather(self.losses[-1].reshape(1).to(self.acc.device)).mean().item()
        imgs = cfg.log_every * cfg.train_batch_size * cfg.gradient_accumulation_steps * self.acc.num_processes
        speed = imgs / max(time.perf_counter() - t0, 1e-9)
        lr = self.lr_scheduler.get_last_lr()[0]
        self.acc.log({"loss": loss, "lr": lr, "images_per_s": speed, "data/skipped_images": self.skipped},
                     step=self.state.step)
        logger.info("step %d/%d loss %.4f lr %.3g %.1f img/s%s", self.state.step, cfg.max_train_steps, loss, lr, speed,
                    f" ({self.skipped} unreadable image loads skipped so far)" if self.skipped else "")

    # ---- EMA -----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Temporarily put the EMA weights into the live modules (exactly restored afterwards)."""
        for name, ema in self.ema.items():
            params = unwrap_params(self.acc, self.named_trainables[name])
            ema.store(params)
            ema.copy_to(params)
        try:
            yield
        finally:
            for name, ema in self.ema.items():
                ema.restore(unwrap_params(self.acc, self.named_trainables[name]))

    def _save_ema(self, path: Path) -> None:
        """EMA shadow weights as safetensors, keyed "<module>.<parameter name>"; decay state in the metadata."""
        from safetensors.torch import save_file

        tensors, meta = {}, {}
        for name, ema in self.ema.items():
            for (pname, _), shadow in zip(trainable_named_params(self.acc, self.named_trainables[name]),
                                          ema.shadow_params):
                tensors[f"{name}.{pname}"] = shadow.detach().contiguous()
            meta[f"{name}.optimization_step"] = str(ema.optimization_step)
        save_file(tensors, str(path), metadata=meta)

    def _load_ema(self, path: Path) -> None:
        from safetensors.torch import load_file
        from safetensors import safe_open

        if not path.is_file():
            raise UserError(f"checkpoint {path.parent} has no {EMA_FILE}, but ldm.use_ema is on")
        # Read on the CPU: a multi-process CPU run's device is "cpu:0", which safetensors refuses; copy_ moves
        # each tensor to its shadow's device.
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        for name, ema in self.ema.items():
            for (pname, _), shadow in zip(trainable_named_params(self.acc, self.named_trainables[name]),
                                          ema.shadow_params):
                shadow.data.copy_(tensors[f"{name}.{pname}"])
            ema.optimization_step = int(meta[f"{name}.optimization_step"])

    # ---- checkpoints, pipelines, validation ----------------------------------------------------------------

    def save(self) -> None:
        """A checkpoint (collective): accelerate state + training_state.json + EMA + a loadable pipeline (a LoRA
        run: the LoRA file instead)."""
        full = self._gather_full_weights()

        def write_extra(folder: Path) -> None:
            if self.ema:
                self._save_ema(folder / EMA_FILE)
            if self.cfg.lora.rank is not None:
                self._save_lora_into(folder)
            elif self.m.embedding_rows is not None:
                self._save_embedding_into(folder)
            else:
                self._save_pipeline_into(folder, full)

        path = save_checkpoint(self.acc, self.out, self.state.step, self.state.to_json(), write_extra,
                               self.cfg.train.checkpoints_total_limit)
        logger.info("saved %s", path)

    def _gather_full_weights(self) -> dict[str, dict] | None:
        """FSDP and DeepSpeed shard the weights: gather full state dicts (collective) to export a pipeline."""
        from accelerate.utils import DistributedType

        if self.acc.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return None
        return {name: self.acc.get_state_dict(module) for name, module in self.named_trainables.items()}

    def _export_module(self, name: str, full: dict[str, dict] | None) -> torch.nn.Module:
        if name not in self.named_trainables:  # frozen, not prepared
            return getattr(self.m, name)
        module = self.acc.unwrap_model(self.named_trainables[name])
        if full is None:
            return module
        copy = type(module)(module.config) if name == "text_encoder" else type(module).from_config(module.config)
        copy.load_state_dict(full[name])
        return copy

    def pipeline(self, full: dict[str, dict] | None = None) -> Any:
        """A LatentDiffusionPipeline over the live modules (EMA weights if the caller swapped them in); an
        inpainting model's is a LatentDiffusionInpaintPipeline (its folder loads in diffusers'
        StableDiffusionInpaintPipeline)."""
        from ..pipeline import LatentDiffusionInpaintPipeline, LatentDiffusionPipeline
        from ..samplers import make_scheduler

        ldm = self.cfg.ldm
        text_encoder = self._export_module("text_encoder", full) if self.m.train_text_encoder else self.m.text_encoder
        scheduler = make_scheduler(ldm.validation_sampler, self.m.diffusion.scheduler.config)
        cls = LatentDiffusionInpaintPipeline if self.cfg.conditioning.concat == "inpaint" else LatentDiffusionPipeline
        pipe = cls(vae=self.m.vae, text_encoder=text_encoder, tokenizer=self.m.tokenizer,
                   unet=self._export_module("unet", full), scheduler=scheduler)
        pipe.sampling_defaults = {"sampler": ldm.validation_sampler,
                                  "num_inference_steps": ldm.validation_num_inference_steps,
                                  "guidance_scale": ldm.validation_guidance_scale}
        if ldm.pretrained_model and self.cfg.lora.rank is None:  # a fine-tune samples on the base's grid, if any
            base = base_sampling_defaults(self.cfg)
            same = ("validation_sampler", "validation_num_inference_steps")  # what the grid was chosen for
            if all(base.get(VALIDATION_SAMPLING[k]) == getattr(ldm, k) for k in same):
                pipe.sampling_defaults |= {k: base[k] for k in ("timesteps", "height", "width") if k in base}
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _save_pipeline_into(self, folder: Path, full: dict[str, dict] | None) -> None:
        """Write the pipeline layout into `folder` (which holds other files too): save to a staging folder inside
        it, then move each entry into place, model_index.json last."""
        staging = folder / ".pipeline"
        with self.ema_weights(), no_transformers_bars():
            self.pipeline(full).save_pretrained(staging)
        vocabulary = self.training_vocabulary()
        if vocabulary is not None:  # before model_index.json: a folder that looks complete has its vocabulary
            vocabulary.write(staging)
        for item in sorted(staging.iterdir(), key=lambda p: p.name == "model_index.json"):
            _replace(item, folder / item.name)
        staging.rmdir()

    def training_vocabulary(self) -> Any:
        """The words of the training captions (ldm_app.vocabulary, vocabulary.json in the pipeline folder) so that
        generate.py can name the prompt words the model never saw. Fine-tuning adds them to the base model's own;
        a base without one (an SD checkpoint: its vocabulary is not known) gives none, rather than a list that
        would call most of its words unknown; a model without text conditioning (class only) has none either."""
        from ..vocabulary import Vocabulary

        if not self.cfg.conditioning.uses_text:
            return None
        vocabulary = self.caption_vocabulary
        if self.cfg.ldm.pretrained_model:
            base = Vocabulary.read(self.cfg.ldm.pretrained_model)
            return None if base is None else base.merged(vocabulary)
        return vocabulary

    @functools.cached_property
    def caption_vocabulary(self) -> Any:
        """The words of the dataset's captions, counted once per run (every checkpoint and export writes them; the
        captions do not change during a run, and a large dataset has millions)."""
        from ..vocabulary import Vocabulary

        return Vocabulary.from_captions(self.dataset.captions)

    def _save_lora_into(self, folder: Path) -> Path:
        """`folder`/pytorch_lora_weights.safetensors, with the EMA weights when the EMA is on, and beside it the
        words of this run's captions (vocabulary.json): loading the LoRA makes them known to generate.py's
        "words unknown to this model" note (ldm_app.adapters.load_loras)."""
        te = self.acc.unwrap_model(self.text_encoder) if self.m.train_text_encoder else None
        if self.cfg.conditioning.uses_text:
            self.caption_vocabulary.write(folder)
        with self.ema_weights():
            return save_lora(folder, self.acc.unwrap_model(self.unet), te)

    def _save_embedding_into(self, folder: Path) -> Path:
        """`folder`/learned_embeds.safetensors, with the EMA vector when the EMA is on."""
        with self.ema_weights():
            return save_embedding(folder, self.cfg.embedding.token, self.embedding_weight()[self.m.embedding_rows])

    def export_final(self) -> None:
        """The output folder becomes a complete pipeline (EMA weights), loadable by generate.py and diffusers; a
        LoRA run's gets pytorch_lora_weights.safetensors instead (generate.py --lora, load_lora_weights), a
        textual-inversion run's learned_embeds.safetensors (generate.py --embedding, load_textual_inversion)."""
        from ..fileio import write_errors

        if self.cfg.frozen_base:
            if self.acc.is_main_process:
                with write_errors(self.out):
                    path = (self._save_lora_into(self.out) if self.cfg.lora.rank is not None
                            else self._save_embedding_into(self.out))
                logger.info("%s written to %s (step %d)", path.name, path, self.state.step)
            self.acc.wait_for_everyone()
            return
        full = self._gather_full_weights()
        if self.acc.is_main_process:
            try:
                with write_errors(self.out):
                    self._save_pipeline_into(self.out, full)
            finally:
                shutil.rmtree(self.out / ".pipeline", ignore_errors=True)
            logger.info("pipeline written to %s (step %d)", self.out, self.state.step)
        self.acc.wait_for_everyone()

    def validate(self) -> None:
        """Sample the validation prompts with fixed seeds (EMA weights) and save the grid as PNG and to TensorBoard."""
        from ..pipeline import make_generators

        ldm, cond = self.cfg.ldm, self.cfg.conditioning
        full = self._gather_full_weights()
        prompts, extra = list(ldm.validation_prompts), {}
        if cond.uses_class:  # classes 0, 1, ... (with the prompts, or alone: the first 8 classes, no text)
            prompts = prompts if cond.uses_text else [NULL_CAPTION] * min(cond.num_classes, 8)
            extra["class_labels"] = [k % cond.num_classes for k in range(len(prompts))]
        rows, cols = 1, len(prompts)
        generators = make_generators(ldm.validation_seed, len(prompts))
        if cond.uses_scalar:  # a row per value (with the prompts, or alone: 4 seeds, no text), the same noise per row
            values = self.validation_scalars()
            per_row = prompts if cond.uses_text else [NULL_CAPTION] * 4
            prompts = per_row * len(values)
            extra["scalars"] = [v for v in values for _ in per_row]
            rows, cols = (len(values), len(per_row)) if per_row else (1, 0)
            generators = [g for _ in values for g in make_generators(ldm.validation_seed, len(per_row))]
        if cond.concat == "inpaint" and prompts:  # an inpainting model from text alone: everything masked
            from PIL import Image

            side = self.cfg.data.resolution
            extra["image"] = [Image.new("RGB", (side, side), (128, 128, 128))] * len(prompts)
            extra["mask_image"] = [Image.new("L", (side, side), 255)] * len(prompts)
        if prompts and self.acc.is_main_process:
            with self.ema_weights(), self.acc.autocast(), _eval_mode(self.trainables):
                images = self.pipeline(full)(prompts, generator=generators, **extra).images
            self._save_grid(images, rows, cols)
        self.acc.wait_for_everyone()

    def validation_scalars(self) -> list[float]:
        """A scalar model's validation values: the training values' 10th, 50th and 90th percentiles (values the
        model has seen, whatever their unit), rounded to 3 decimals."""
        q = torch.quantile(self.scalars.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.double))
        return [round(float(v), 3) for v in q]

    def _save_grid(self, images: list[Any], rows: int, cols: int) -> None:
        from diffusers.utils import make_image_grid

        from ..fileio import atomic_path, write_errors

        grid = make_image_grid(images, rows=rows, cols=cols)
        path = self.out / "validation" / f"step-{self.state.step:07d}.png"
        with write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                grid.save(tmp)
        log_image(self.acc, "validation", grid, self.state.step)
        logger.info("validation grid -> %s", path)


@contextlib.contextmanager
def _eval_mode(modules: list[torch.nn.Module]) -> Iterator[None]:
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def _replace(src: Path, dest: Path) -> None:
    """Move src onto dest; an existing folder is renamed aside first (os.replace cannot overwrite one)."""
    if dest.is_dir():
        aside = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(dest, aside)
        os.replace(src, dest)
        shutil.rmtree(aside)
    else:
        os.replace(src, dest)


def enable_xformers(unet: Any) -> None:
    """xformers attention when installed; otherwise keep PyTorch's scaled_dot_product_attention (diffusers' default,
    as memory-efficient on torch >= 2), with a notice rather than an error: it is only a speed-up."""
    import importlib.util

    if importlib.util.find_spec("xformers") is None:
        logger.warning("xformers is not installed; keeping PyTorch scaled_dot_product_attention")
        return
    unet.enable_xformers_memory_efficient_attention()


def check_strategy(accelerator: Any, cfg: LDMRunConfig, train_text_encoder: bool) -> None:
    """Combinations the sharded strategies cannot run, refused before any work."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if cfg.frozen_base and kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise UserError(f"LoRA / textual-inversion training is not supported with {kind.value}: the trained weights "
                        "are small, train with DDP")
    if cfg.ldm.use_ema and kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise UserError(f"ldm.use_ema is not supported with {kind.value} (the EMA would need the full weights on "
                        "every process): pass --set ldm.use_ema=false, or train with DDP")
    if train_text_encoder and kind == DistributedType.DEEPSPEED:
        raise UserError("DeepSpeed trains a single model: use a pretrained (frozen) text encoder "
                        "(text_encoder.pretrained) or DDP/FSDP")


def predict_eps(unet: Any, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, labels: torch.Tensor | None,
                input_dtype: torch.dtype | None) -> torch.Tensor:
    """eps_theta(x_t, t, c[, y]). With `input_dtype` (deepspeed_input_dtype) the float inputs are cast to the
    U-Net's weights' dtype and eps comes back in float32, so the loss is computed in float32 as under autocast."""
    if input_dtype is None:
        return unet(x, t, encoder_hidden_states=states, class_labels=labels, return_dict=False)[0]
    x, states = x.to(input_dtype), states.to(input_dtype)
    if labels is not None and labels.is_floating_point():  # scalar conditioning; class ids stay integers
        labels = labels.to(input_dtype)
    return unet(x, t, encoder_hidden_states=states, class_labels=labels, return_dict=False)[0].float()


def deepspeed_input_dtype(accelerator: Any) -> torch.dtype | None:
    """The dtype a DeepSpeed-wrapped U-Net needs its inputs in, else None. Under DDP/FSDP accelerate runs the
    prepared model's forward in autocast; under DeepSpeed it does not: the engine casts the weights to fp16/bf16
    and a float32 input fails ("mat1 and mat2 must have the same dtype", seen on the first GPU check)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(str(accelerator.mixed_precision))


# --------------------------------------------------------------------------------------------------------------
# Entry point


def check_concat(cfg: LDMRunConfig, models: Models) -> None:
    """An inpainting model encodes each step's masked images: it needs the pixels (no latent cache) and a KL
    autoencoder (diffusers' inpainting pipeline samples the masked image's posterior)."""
    if cfg.conditioning.concat == "none":
        return
    if cfg.ldm.cache_latents:
        raise UserError(f"conditioning.concat={cfg.conditioning.concat} encodes a newly masked image every step and "
                        "cannot use cached latents: set ldm.cache_latents=false (--set ldm.cache_latents=false)")
    if is_vq(models.vae):
        raise UserError(f"conditioning.concat={cfg.conditioning.concat} needs a KL autoencoder (diffusers' "
                        "inpainting pipeline encodes the masked image through a KL posterior); this one is VQ")


def check_enough_images(n: int, batch_size: int, num_processes: int, bucket_ids: list[int] | None = None) -> None:
    if batches_per_epoch(n, batch_size, num_processes) == 0:
        raise UserError(f"the dataset has {n} training images, fewer than one batch of {batch_size} x "
                        f"{num_processes} process(es): lower --train_batch_size")
    if bucket_ids is not None and bucket_batches_per_epoch(bucket_ids, batch_size, num_processes) == 0:
        raise UserError(f"data.buckets: no bucket holds {batch_size} x {num_processes} process(es) images (images "
                        f"per bucket: {sorted(bucket_ids.count(b) for b in set(bucket_ids))}): lower "
                        "--train_batch_size, or set data.buckets=false")


def setup_buckets(cfg: LDMRunConfig, models: Models, dataset: Any) -> None:
    """`data.buckets`: assign every image its bucket. Bucket sides are multiples of the autoencoder factor f times
    the U-Net's downsampling (the multiple data.resolution must be, see `check_compatible`): 64 for SD's f=8,
    3-level-downsampling U-Net, so every bucket is a shape the models take. Cached latents would need one latent
    shape per bucket: refused."""
    if not cfg.data.buckets:
        return
    if cfg.ldm.cache_latents:
        raise UserError("data.buckets cannot be combined with ldm.cache_latents (latents of different shapes per "
                        "bucket are not cached): turn one of them off")
    f = downsampling_factor(models.vae)
    down = 2 ** (len(models.unet.config.block_out_channels) - 1)
    dataset.assign_buckets(f * down, cfg.data.bucket_max_aspect)
    counts = {s: dataset.bucket_ids.count(i) for i, s in enumerate(dataset.buckets)}
    logger.info("aspect-ratio buckets (sides multiples of %d): %s", f * down,
                ", ".join(f"{w}x{h}: {n}" for (w, h), n in counts.items()))


def main(argv: list[str] | None = None) -> TrainResult:
    """Parse, check every input (one-line errors), then train. Returns the run's step and losses.

    Order matters: everything that can be checked without the output folder (config, models, data) is checked
    first, so a mistaken command leaves nothing behind; then the folder is locked for the whole run (see
    checkpointing.lock_run_folder) before anything reads or writes it; run_config.json, which ties the folder to
    this config, is written last, just before the first step."""
    args = parse_args(argv)
    cfg = load_run_config(args)
    setup_logging()
    check_report_to(args.report_to)
    check_launchable(args.cpu)
    models = build_models(cfg)
    dataset = build_train_dataset(cfg)
    dataset = dataset.readable(str(cfg.data.train_data_dir or cfg.data.dataset_name))
    setup_buckets(cfg, models, dataset)
    if cfg.ldm.cache_latents:
        from .latent_cache import check_cacheable

        check_cacheable(dataset, cfg.ldm.cache_dir)
    check_enough_images(len(dataset), cfg.train.train_batch_size, launched_processes(), dataset.bucket_ids)
    check_embedding_captions(cfg, dataset.captions)
    cond = cfg.conditioning
    check_concat(cfg, models)
    if cond.uses_class:  # labels and the U-Net's class embedding, before the run folder is touched
        read_labels(dataset, cond.label_column, cond.num_classes)
    if cond.uses_scalar:
        read_scalars(dataset, cond.scalar_column)
    LDMTrainer.check_class_embedding(cfg, models.unet)
    check_output_dir(args.output_dir, {"--pretrained_model": cfg.ldm.pretrained_model,
                                       "--pretrained_vae": cfg.ldm.pretrained_vae}, cfg.data.train_data_dir)
    with lock_run_folder(args.output_dir):
        record = {**to_dict(cfg), LOADED_WEIGHTS: models.loaded_weights, TRAINING_ROWS: rows_sha256(dataset)}
        out, checkpoint = open_run_folder(args.output_dir, record, args.resume_from_checkpoint, MAY_DIFFER_ON_RESUME)
        accelerator = make_accelerator(cfg.train, out, cpu=args.cpu, report_to=args.report_to)
        check_strategy(accelerator, cfg, models.train_text_encoder)
        accelerator.init_trackers("train_ldm")
        trainer = LDMTrainer(cfg, models, dataset, accelerator, out)
        if cfg.ldm.cache_latents:
            trainer.use_cache(Path(cfg.ldm.cache_dir) if cfg.ldm.cache_dir else out / "latent_cache")
        if checkpoint is not None:
            trainer.resume(checkpoint)
        if accelerator.is_main_process:
            write_run_config(out, record)
        return trainer.run()
