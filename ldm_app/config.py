"""Typed configs: defaults live in these dataclasses, `configs/*.yaml` override fields, `--set key=value` flags
override both. Every model folder and checkpoint carries the config that built it (`save_config`).

Loading is strict: an unknown key, a value of the wrong type or an impossible value is a `UserError` that names
the key. Configs never name classes to import (no `target: ldm.models...`): builders in `ldm_app.models` turn
them into diffusers / transformers objects with explicit `if kind == ...` factories.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union

import yaml

from .errors import UserError
from .fileio import atomic_write_text

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------------------
# Component configs


@dataclass
class AutoencoderConfig:
    """First stage (LDM, Rombach et al. 2022): a KL- or VQ-regularised autoencoder, downsampling factor
    f = 2 ** (len(block_out_channels) - 1); four levels give the f=8 of Stable Diffusion."""

    kind: Literal["kl", "vq"] = "kl"
    in_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64, 128, 128, 128)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    num_vq_embeddings: int = 256  # codebook size (vq only)
    sample_size: int = 64
    scaling_factor: float = 1.0  # measured from data after training (LDM's scale_by_std)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self) -> None:
        _positive(self, "in_channels", "latent_channels", "layers_per_block", "norm_num_groups", "sample_size")
        _positive_tuple(self, "block_out_channels")
        _divisible_by_groups(self, "block_out_channels", self.norm_num_groups)
        if self.kind == "vq" and self.num_vq_embeddings < 2:
            raise UserError(f"num_vq_embeddings must be >= 2 for a VQ autoencoder, got {self.num_vq_embeddings}")
        if self.scaling_factor <= 0:
            raise UserError(f"scaling_factor must be > 0, got {self.scaling_factor}")


@dataclass
class UNetConfig:
    """Denoiser eps_theta(x_t, t, c): a U-Net with ResNet blocks, self-attention and cross-attention to the text
    embeddings (the seeds' U-Net; diffusers' UNet2DConditionModel). One entry of `attention` per level says
    whether that level has (cross-)attention blocks."""

    in_channels: int = 4  # must equal the autoencoder's latent_channels
    sample_size: int = 8  # latent side = image side / f
    block_out_channels: tuple[int, ...] = (64, 128, 256)
    attention: tuple[bool, ...] = (False, True, True)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 32

    def validate(self) -> None:
        _positive(self, "in_channels", "sample_size", "layers_per_block", "attention_head_dim", "norm_num_groups")
        _positive_tuple(self, "block_out_channels")
        _divisible_by_groups(self, "block_out_channels", self.norm_num_groups)
        if len(self.attention) != len(self.block_out_channels):
            raise UserError(
                f"attention needs one entry per level ({len(self.block_out_channels)}), got {len(self.attention)}"
            )
        if not any(self.attention):
            raise UserError("attention must enable at least one level: text conditioning is cross-attention")


CONDITIONING_KINDS = ("text", "class", "text+class", "scalar", "text+scalar")


@dataclass
class ConditioningConfig:
    """What the U-Net is conditioned on (the seeds' three ways): text by cross-attention, and/or a class label or a
    scalar as an embedding added to the timestep embedding, and/or an image by channel-wise concatenation
    (`concat`). Both embeddings are diffusers' own U-Net options, so the folder still loads in diffusers; a U-Net
    has one such embedding, so a model takes a class or a scalar, not both.

    Classes (`num_class_embeds`) come from a dataset column (`label_column`, e.g. imagefolder's class sub-folders or
    a `label` key in metadata.jsonl) as integers 0..num_classes-1; index num_classes is the null class, used for
    `label_dropout` of the labels (classifier-free guidance over classes).

    A scalar (`class_embed_type="projection"`, an MLP from 2 inputs) is a number per image from `scalar_column`
    (e.g. the object's size written by `python -m ldm_app.data.shapes --sizes`). The U-Net sees [s, 1] for a value
    s and [0, 0] for the null condition (dropped with probability `label_dropout`; the unconditional half of
    classifier-free guidance), so s = 0 stays distinct from "no value". Values should be O(1), like the size as a
    fraction of the image side: the first linear layer sees them raw, and values in the hundreds would swamp the
    timestep embedding they are added to. Fine-tuning a text-to-image folder adds the MLP with its last layer
    zero, so training starts from exactly the text model.

    `concat: inpaint` makes an inpainting model: the U-Net also sees a random mask and the latents of the image
    with the mask's region blanked (ldm_app.masks; SD-inpainting's 9-channel layout, loads in diffusers'
    StableDiffusionInpaintPipeline); fine-tuning a text-to-image folder widens its first convolution with zero
    weights for the new channels."""

    kind: str = "text"
    num_classes: int = 0
    label_column: str = "label"
    scalar_column: str = "size"
    label_dropout: float = 0.1  # share of class labels / scalars replaced by the null condition
    concat: str = "none"

    @property
    def uses_text(self) -> bool:
        return "text" in self.kind

    @property
    def uses_class(self) -> bool:
        return "class" in self.kind

    @property
    def uses_scalar(self) -> bool:
        return "scalar" in self.kind

    def validate(self) -> None:
        if self.kind not in CONDITIONING_KINDS:
            raise UserError(f"unknown conditioning.kind {self.kind!r}; expected one of {', '.join(CONDITIONING_KINDS)}"
                            + (" (a U-Net has one class/scalar embedding: not both)" if "class" in self.kind and
                               "scalar" in self.kind else ""))  # fmt: skip
        if self.uses_class and self.num_classes < 1:
            raise UserError(f"conditioning.kind {self.kind!r} needs conditioning.num_classes >= 1")
        if not self.uses_class and self.num_classes:
            raise UserError(f"conditioning.num_classes is set but conditioning.kind is {self.kind!r}; use "
                            "kind class or text+class")  # fmt: skip
        if not self.scalar_column:
            raise UserError("conditioning.scalar_column must name a dataset column")
        if not 0 <= self.label_dropout < 1:
            raise UserError(f"conditioning.label_dropout must be in [0, 1), got {self.label_dropout}")
        from .conditioning import CONCAT_KINDS

        if self.concat not in CONCAT_KINDS:
            raise UserError(f"unknown conditioning.concat {self.concat!r}; expected one of {', '.join(CONCAT_KINDS)}")


@dataclass
class TextEncoderConfig:
    """Conditioning stage tau_theta: a CLIP text transformer. Either a pretrained folder (kept frozen) or a small
    CLIPTextModel trained jointly from scratch with the U-Net (LDM's trainable conditioning)."""

    pretrained: str | None = None
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    max_position_embeddings: int = 77

    def validate(self) -> None:
        _positive(self, "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        if self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if not 2 <= self.max_position_embeddings <= 77:
            raise UserError(f"max_position_embeddings must be in 2..77, got {self.max_position_embeddings}")


@dataclass
class NoiseScheduleConfig:
    """Forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (Ho et al. 2020)."""

    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear"] = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"

    def validate(self) -> None:
        _positive(self, "num_train_timesteps")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise UserError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start} and {self.beta_end}")


@dataclass
class DataConfig:
    train_data_dir: str | None = None  # an imagefolder: images + metadata.jsonl
    dataset_name: str | None = None  # or a hub dataset (needs a network)
    image_column: str = "image"
    caption_column: str = "text"
    resolution: int = 64
    center_crop: bool = True
    random_flip: bool = False  # off by default: captions say left/right
    # aspect-ratio bucketing (train_ldm.py): each image goes to the bucket of about resolution^2 pixels whose
    # aspect ratio is closest to its own, and every batch holds one bucket (ldm_app/data/dataset.py, docs/training.md)
    buckets: bool = False
    bucket_max_aspect: float = 2.0  # the longest bucket side is at most this many times the shortest
    holdout_fraction: float = 0.05
    max_samples: int | None = None
    dataloader_num_workers: int = 0

    def validate(self) -> None:
        from .limits import check_image_side

        _positive(self, "resolution")
        check_image_side("resolution", self.resolution, multiple=1)  # refused before any image is allocated
        if not 0 <= self.holdout_fraction < 1:
            raise UserError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if not 1.0 <= self.bucket_max_aspect <= 8.0:
            raise UserError(f"bucket_max_aspect must be in [1, 8], got {self.bucket_max_aspect}")
        if self.dataloader_num_workers < 0:
            raise UserError(f"dataloader_num_workers must be >= 0, got {self.dataloader_num_workers}")


MAX_TRAIN_SEED = 2**32 - 1  # 32-bit, as A1111's and most trainers' seeds; the step seeds derived from it stay < 2**63


@dataclass
class TrainConfig:
    """Optimisation settings shared by train_vae.py and train_ldm.py."""

    seed: int = 0
    learning_rate: float = 1e-4
    scale_lr: bool = False  # lr *= batch * accumulation * processes
    train_batch_size: int = 16  # per process
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 1000
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    # torch's fused AdamW kernel (CPU and CUDA): one pass over all parameters instead of a Python loop of small
    # ops; the same update up to float rounding (benchmarks/bench_fused_adam.py measures the gain).
    fused_adam: bool = True
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = 3
    log_every: int = 10

    def validate(self) -> None:
        _positive(self, "learning_rate", "train_batch_size", "gradient_accumulation_steps", "max_train_steps",
                  "checkpointing_steps", "log_every")
        if self.lr_warmup_steps < 0:
            raise UserError(f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        if not 0 <= self.seed <= MAX_TRAIN_SEED:  # numpy's generators take no negative seed; torch's, none >= 2**63
            raise UserError(f"the seed (--seed, train.seed) must be an integer from 0 to {MAX_TRAIN_SEED}, got "
                            f"{self.seed}")  # fmt: skip
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise UserError(f"checkpoints_total_limit must be >= 1 or null, got {self.checkpoints_total_limit}")


@dataclass
class LoRAConfig:
    """LoRA fine-tuning (Hu et al. 2021) of a pretrained model: the base weights stay frozen and only low-rank
    updates W + (alpha / rank) * B A of the `target_modules` train (peft, as diffusers' train_text_to_image_lora.py).
    `rank: null` (the default) is no LoRA: the whole U-Net trains. The defaults are that script's: the U-Net's
    attention projections, alpha = rank; `text_encoder: true` adds LoRA to the CLIP text encoder's attention
    projections too (`text_encoder_target_modules`)."""

    rank: int | None = None
    alpha: float | None = None  # null: = rank (scale 1)
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    text_encoder: bool = False
    text_encoder_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")

    def validate(self) -> None:
        if self.rank is None:
            if self.text_encoder or self.alpha is not None:
                raise UserError("lora.alpha / lora.text_encoder need a LoRA rank: pass --lora_rank R")
            return
        if self.rank < 1:
            raise UserError(f"the LoRA rank (--lora_rank, lora.rank) must be a positive integer, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise UserError(f"lora.alpha must be > 0 (or null: = rank), got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules or (self.text_encoder and not self.text_encoder_target_modules):
            raise UserError("lora.target_modules (and text_encoder_target_modules) must name at least one module")


@dataclass
class EmbeddingConfig:
    """Textual inversion (Gal et al. 2022) of a pretrained model: one new token whose input embedding (one vector, or
    `num_vectors`) is the only weight that trains, as diffusers' examples/textual_inversion/textual_inversion.py. The
    captions must contain `token`; its vectors start as `initializer_token`'s (one existing token; "*" is A1111's
    default). With num_vectors N > 1 the token stands for N tokens, `token token_1 ... token_{N-1}` (diffusers'
    multi-vector layout: its load_textual_inversion and pipelines expand the token the same way)."""

    token: str | None = None  # null: no textual inversion
    initializer_token: str = "*"
    num_vectors: int = 1

    def validate(self) -> None:
        if self.token is None:
            return
        if not self.token.strip() or any(ch.isspace() for ch in self.token):
            raise UserError(f"the embedding token (--train_embedding) must be one word without spaces, got "
                            f"{self.token!r}")
        if not 1 <= self.num_vectors <= 16:
            raise UserError(f"embedding.num_vectors (--num_vectors) must be 1 to 16 vectors for the token, got "
                            f"{self.num_vectors}")


# --------------------------------------------------------------------------------------------------------------
# Validation helpers


def _positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value <= 0:
            raise UserError(f"{name} must be > 0, got {value}")


def _positive_tuple(cfg: Any, name: str) -> None:
    values = getattr(cfg, name)
    if not values or any(v <= 0 for v in values):
        raise UserError(f"{name} must be a non-empty list of positive numbers, got {list(values)}")


def _divisible_by_groups(cfg: Any, name: str, groups: int) -> None:
    bad = [c for c in getattr(cfg, name) if c % groups]
    if bad:
        raise UserError(f"{name}: channels {bad} are not divisible by norm_num_groups={groups}")


# --------------------------------------------------------------------------------------------------------------
# Dict <-> dataclass, strict


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from a (nested) mapping; unknown keys and wrong types raise UserError naming the key."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise UserError(f"{where or 'config'} must be a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise UserError(f"unknown config key {key!r}; valid keys here: {', '.join(sorted(fields))}")
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}" if where else name) for name, value in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise UserError(f"{key} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key} must be a list, got {value!r}")
        item = args[0]
        items = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as the float it means
            number = float(value)
        except (ValueError, OverflowError):
            raise UserError(f"{key} must be a number, got {value!r}") from None
        # NaN passes every `<= 0` / `< 1` check of validate() and inf most of them: refused here, for every float
        if not math.isfinite(number):
            raise UserError(f"{key} must be a finite number, got {value!r}")
        return number
    if tp is str and type(value) in (int, float, bool):  # YAML read it as a number: "2024", "0123" (octal!), "yes"
        kind = "true/false" if type(value) is bool else "a number"
        raise UserError(f"{key} must be text, but YAML reads {value!r} as {kind}: quote it (--set {key}=\"'...'\" "
                        f"or {key}: \"...\" in a config file)")  # fmt: skip
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise UserError(f"{key} must be of type {tp.__name__}, got {value!r}")
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def validate(cfg: Any, where: str = "") -> None:
    """Call `validate()` on `cfg` and every nested dataclass that has one; errors name the section."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, f"{where}.{f.name}" if where else f.name)
    if hasattr(cfg, "validate"):
        try:
            cfg.validate()
        except UserError as e:
            raise UserError(f"config {where}: {e}" if where else str(e)) from None


# --------------------------------------------------------------------------------------------------------------
# YAML files and command-line overrides


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """`["train.learning_rate=1e-4", "unet.attention=[false,true]"]` -> nested dict; values parse as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError:
            value = raw
        node = nested
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r} conflicts with another override of {p!r}")
        node[leaf] = value
    return nested


def flag_overrides(args: Any, flag_keys: Mapping[str, str]) -> dict[str, Any]:
    """Nested overrides from command-line flags: `flag_keys` maps a flag's name to its "section.key" (or a
    top-level "key"); flags left unset (None) override nothing."""
    nested: dict[str, Any] = {}
    for flag, key in flag_keys.items():
        value = getattr(args, flag)
        if value is not None:
            *sections, leaf = key.split(".")
            node = nested
            for section in sections:
                node = node.setdefault(section, {})
            node[leaf] = value
    return nested


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: values in `update` win."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"config file {str(path)!r} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read config file {str(path)!r}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is not None and not isinstance(data, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    return data or {}


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] | Mapping = ()) -> T:
    """Defaults from `cls`, then the YAML file at `path`, then `overrides` (a list of "a.b=v" or a nested dict);
    the result is validated."""
    data = read_yaml(path) if path else {}
    extra = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    cfg = from_dict(cls, merge(data, extra))
    validate(cfg)
    return cfg


def save_config(cfg: Any, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _default_of(f: dataclasses.Field) -> Any:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    return list(value) if isinstance(value, tuple) else value


# Fields added after runs were already saved, with the value those earlier runs had in effect (which is not
# always today's default: runs before `train.fused_adam` used the for-loop AdamW). A saved run config that lacks
# one of these is read as holding this value, so such a run still resumes with the config it was made with.
# Conditioning keys added later take their default: no earlier run was an inpainting or a scalar run.
LEGACY_VALUES: dict[str, Any] = {"train.fused_adam": False, "conditioning.concat": "none",
                                 "data.buckets": False, "data.bucket_max_aspect": 2.0,
                                 "conditioning.scalar_column": "size", **{f"lora.{f.name}": _default_of(f)
                                                                         for f in dataclasses.fields(LoRAConfig)},
                                 **{f"embedding.{f.name}": _default_of(f) for f in dataclasses.fields(EmbeddingConfig)}}
# Sections added after runs were already saved: section -> a section every config that has it also has. A saved
# config that has the companion but not the section gets it (empty, then filled from LEGACY_VALUES): train_ldm.py
# runs saved before LoRA / textual-inversion training existed resume as the runs they were.
LEGACY_SECTIONS: dict[str, str] = {"lora": "ldm", "embedding": "ldm"}


def with_legacy_values(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a saved plain config dict with the sections and fields it predates filled in from
    `LEGACY_SECTIONS` and `LEGACY_VALUES`."""
    out = copy.deepcopy(dict(saved))
    for section, companion in LEGACY_SECTIONS.items():
        if isinstance(out.get(companion), dict) and section not in out:
            out[section] = {}
    for dotted, value in LEGACY_VALUES.items():
        *sections, key = dotted.split(".")
        node = out
        for name in sections:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict) and key not in node:
            node[key] = value
    return out


def diff_configs(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Keys (dotted) whose values differ between two plain config dicts."""
    keys = sorted(set(a) | set(b))
    out: list[str] = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += diff_configs(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


__all__ = [
    "AutoencoderConfig", "UNetConfig", "TextEncoderConfig", "NoiseScheduleConfig", "DataConfig", "TrainConfig",
    "LoRAConfig", "EmbeddingConfig",
    "from_dict", "to_dict", "validate", "parse_overrides", "flag_overrides", "merge", "read_yaml", "load_config",
    "save_config",
    "diff_configs", "with_legacy_values", "LEGACY_VALUES",
]
