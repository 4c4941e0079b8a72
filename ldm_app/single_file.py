"""Single-file Stable Diffusion 1.x checkpoints (the CompVis / A1111 layout) in and out.

A single file holds the three networks of an SD-1.x model under their original (CompVis) names in one
safetensors file: the U-Net under `model.diffusion_model.*`, the KL autoencoder under `first_stage_model.*` and
the CLIP ViT-L/14 text encoder under `cond_stage_model.transformer.*`. It holds no configs, tokenizer or scheduler:
those are the SD-1.x ones, shipped without weights in `ldm_app/assets/sd15_configs/` (a diffusers-layout folder;
its tokenizer is the bundled `assets/tokenizer`, passed in at load), so loading a single file needs nothing from
the Hugging Face hub.

- `load_single_file(path, pipeline_class=None, **kwargs)`: a `.safetensors` (or a weights-only `.ckpt`) file ->
  a pipeline, through diffusers' own `pipeline_class.from_single_file(path, config=<shipped folder>,
  local_files_only=True)`. The file is checked first (every tensor an SD-1.x model needs, each with its SD-1.x
  shape; for safetensors only the header is read): anything else is one `UserError` line naming the file. A U-Net
  whose conv_in takes other than 4 channels (9 for SD inpainting) gets its `in_channels` from the weights.
- `save_single_file(pipe_or_folder, dest)`: a pipeline (any diffusers SD-1.x pipeline, ours included) or a
  diffusers-layout folder -> one safetensors file in the single-file layout, written atomically. Only what the
  layout can carry is written: a model whose configs differ from SD-1.x's in a way the file cannot record (another
  VAE scaling factor, v-prediction, another noise schedule, other attention heads...) is refused, since loading the
  file back would silently give other images.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from .errors import UserError
from .fileio import atomic_path, write_errors

SD15_CONFIGS = Path(__file__).resolve().parent / "assets" / "sd15_configs"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
GROUPS = {"U-Net": UNET_PREFIX, "VAE": VAE_PREFIX, "text encoder": TEXT_PREFIX}
CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"  # (320, in_channels, 3, 3): 4, or 9 for SD inpainting
WRITTEN_BY = "ldm_app.single_file"
_EXPECTED = "an SD-1.x single-file checkpoint (CompVis/A1111 layout: model.diffusion_model.*, first_stage_model.*, " \
            "cond_stage_model.transformer.* with SD-1.x shapes)"
# Component weight files of a diffusers folder, in the names save_pretrained writes.
_FOLDER_WEIGHTS = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}

# ---- diffusers -> original key mapping ----------------------------------------------------------------------------
# diffusers ships only the other direction (diffusers.loaders.single_file_utils, used for loading below); its writer
# is a script outside the package (scripts/convert_diffusers_to_original_stable_diffusion.py), so this is that
# script's SD-1.x mapping ported here, with the autoencoder's attention in today's diffusers names (to_q/to_k/to_v/
# to_out.0, not query/key/value/proj_attn). tests/test_single_file.py checks it against diffusers' own converters:
# original -> diffusers of what we write gives back exactly the diffusers state dict.

_UNET_FIXED = [  # (original, diffusers)
    ("time_embed.0.weight", "time_embedding.linear_1.weight"),
    ("time_embed.0.bias", "time_embedding.linear_1.bias"),
    ("time_embed.2.weight", "time_embedding.linear_2.weight"),
    ("time_embed.2.bias", "time_embedding.linear_2.bias"),
    ("input_blocks.0.0.weight", "conv_in.weight"),
    ("input_blocks.0.0.bias", "conv_in.bias"),
    ("out.0.weight", "conv_norm_out.weight"),
    ("out.0.bias", "conv_norm_out.bias"),
    ("out.2.weight", "conv_out.weight"),
    ("out.2.bias", "conv_out.bias"),
]
_UNET_RESNET = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]


def _unet_layer_map() -> list[tuple[str, str]]:
    layers = []
    for i in range(4):  # SD-1.x: 4 levels, 2 resnets down / 3 up, attention except in the lowest level
        for j in range(2):
            layers.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if i < 3:
                layers.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(3):
            layers.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if i > 0:
                layers.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < 3:
            layers.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            layers.append((f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
    layers.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        layers.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return layers


_UNET_LAYERS = _unet_layer_map()


def unet_key_to_original(key: str) -> str:
    for original, hf in _UNET_FIXED:
        if key == hf:
            return UNET_PREFIX + original
    if "resnets" in key:
        for original, hf in _UNET_RESNET:
            key = key.replace(hf, original)
    for original, hf in _UNET_LAYERS:  # order matters (the script's "brittle" order), as in the script
        key = key.replace(hf, original)
    return UNET_PREFIX + key


def _vae_map() -> list[tuple[str, str]]:
    pairs = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"),
             ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(4):
        for j in range(2):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < 3:
            pairs.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            pairs.append((f"up.{3 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        for j in range(3):  # the decoder's levels are numbered in reverse in the original
            pairs.append((f"decoder.up.{3 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
    for i in range(2):
        pairs.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
    return pairs


_VAE_MAP = _vae_map()
_VAE_ATTN = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
_VAE_LINEAR_AS_CONV = tuple(f"mid.attn_1.{name}.weight" for name in ("q", "k", "v", "proj_out"))  # 1x1 convs there


def vae_key_to_original(key: str) -> str:
    for original, hf in _VAE_MAP:
        key = key.replace(hf, original)
    if "attn_1" in key:
        for original, hf in _VAE_ATTN:
            key = key.replace(hf, original)
    return VAE_PREFIX + key


def text_key_to_original(key: str) -> str:
    # transformers >= 5.6 names CLIPTextModel's weights without the "text_model." level (older files have it); the
    # original layout always has it (diffusers' loader expects cond_stage_model.transformer.text_model.*)
    return TEXT_PREFIX + "text_model." + key.removeprefix("text_model.")


def _to_original(component: str, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, tensor in state_dict.items():
        if component == "unet":
            out[unet_key_to_original(key)] = tensor
        elif component == "vae":
            new = vae_key_to_original(key)
            if new.endswith(_VAE_LINEAR_AS_CONV) and tensor.ndim == 2:
                tensor = tensor.reshape(*tensor.shape, 1, 1)
            out[new] = tensor
        else:
            if key.endswith("position_ids"):  # a buffer some older files hold; not a weight
                continue
            out[text_key_to_original(key)] = tensor
    return out


# ---- what an SD-1.x single file must hold -------------------------------------------------------------------------


def _meta_models(config_dir: Path = SD15_CONFIGS) -> dict[str, Any]:
    """The three networks of `config_dir` on the meta device (shapes only, no memory, no weights)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder")),
        }


@functools.cache
def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor an SD-1.x single file holds, by original name, with its shape (from the shipped configs)."""
    shapes = {}
    for component, model in _meta_models().items():
        shapes.update({k: tuple(v.shape) for k, v in _to_original(component, model.state_dict()).items()})
    return shapes


def _shape_ok(key: str, shape: tuple[int, ...], want: tuple[int, ...]) -> bool:
    if shape == want:
        return True
    if key == CONV_IN:  # any input channel count (4 text-to-image, 9 inpainting, ...): read from the weights
        return len(shape) == 4 and shape[0] == want[0] and shape[2:] == want[2:] and shape[1] >= 1
    if key.endswith(_VAE_LINEAR_AS_CONV):  # some files hold these 1x1 convs as linear weights; diffusers takes both
        return shape == want[:2]
    return False


def _fmt(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def check_tensors(path: Path, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str]) -> int:
    """Raise a one-line UserError naming `path` unless `shapes` (name -> shape of every tensor in the file) holds
    every SD-1.x tensor with its SD-1.x shape in a floating dtype; return the U-Net's input channel count."""
    expected = expected_shapes()
    for group, prefix in GROUPS.items():
        if not any(k.startswith(prefix) for k in shapes):
            found = sorted({k.split(".")[0] for k in shapes})[:4]
            raise UserError(
                f"{path} is not an SD-1.x checkpoint: it has no {group} weights ({prefix}*; its top-level names: "
                f"{', '.join(found) or 'none'}); expected {_EXPECTED}")
    missing = [k for k in expected if k not in shapes]
    if missing:
        raise UserError(
            f"{path} is not a complete SD-1.x checkpoint: {len(missing)} of its {len(expected)} tensors are missing "
            f"(e.g. {missing[0]}); expected {_EXPECTED}")
    for key, want in expected.items():
        if not _shape_ok(key, shapes[key], want):
            raise UserError(
                f"{path} is not an SD-1.x checkpoint: {key} has shape {_fmt(shapes[key])} where SD-1.x has "
                f"{_fmt(want)} (another architecture, e.g. SD 2.x or SDXL?); expected {_EXPECTED}")
        if dtypes[key] not in ("F16", "BF16", "F32", "F64"):
            raise UserError(
                f"{path}: {key} holds {dtypes[key]} values, not floating-point weights; expected {_EXPECTED}")
    return shapes[CONV_IN][1]


_SAFETENSORS_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64"}


def _read_safetensors_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Names, shapes and dtypes of a safetensors file from its header, without reading the tensors. Also checks that
    the file is as long as its header says (a truncated download is refused here, not half-way through loading)."""
    from safetensors import SafetensorError, safe_open

    def bad(why: str) -> UserError:
        return UserError(f"{path} is not a readable safetensors file ({why}); expected {_EXPECTED}")

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, too short for a header")
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > 100 << 20:
                raise bad("its header length is impossible: truncated, or another kind of file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise bad("its header is not a JSON object")
        header.pop("__metadata__", None)
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        if 8 + n + end != size:
            raise bad(f"it is {size} bytes but its header describes {8 + n + end}: truncated or damaged")
        with safe_open(str(path), "pt") as f:  # the library's own checks (offsets, dtypes) on top of ours
            names = set(f.keys())
        shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in header.items() if k in names}
        dtypes = {k: str(v["dtype"]) for k, v in header.items() if k in names}
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, SafetensorError) as e:
        # OSError: unreadable; ValueError: not JSON / not UTF-8; the rest: a header of the wrong form
        text = str(e)
        raise bad(type(e).__name__ + (f": {text}" if text and "\n" not in text and len(text) < 200 else "")) from None
    return shapes, dtypes


def _load_ckpt(path: Path) -> dict[str, Any]:
    """A .ckpt's state dict, unpickled weights-only (tensors, containers and numbers; never arbitrary objects)."""
    import torch

    try:
        mmap = zipfile.is_zipfile(path)  # torch.save's format since 1.6: tensors mapped, not read
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch's message for what weights-only unpickling refuses spans many lines; its first names the reason
        first = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
        raise UserError(
            f"{path} holds pickled Python objects besides tensors, which are not loaded (loading them could run any "
            f"code{': ' + first[:160] if first else ''}); expected {_EXPECTED} as a weights-only .ckpt or a "
            ".safetensors file (convert it with a tool you trust)") from None
    except (OSError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
        text = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(f"{path} is not a readable .ckpt file ({text}); expected {_EXPECTED}") from None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # Lightning checkpoints nest it
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a dict of tensors; expected {_EXPECTED}")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _torch_dtype_code(tensor: Any) -> str:
    return _SAFETENSORS_DTYPES.get(str(tensor.dtype).removeprefix("torch."), str(tensor.dtype))


def check_file(path: str | os.PathLike) -> int:
    """Check that `path` is an SD-1.x single file (see check_tensors); return the U-Net's input channels."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} {'is a folder' if path.is_dir() else 'does not exist'}; expected {_EXPECTED}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return check_tensors(path, *_read_safetensors_header(path))
    if suffix == ".ckpt":
        # read whole (memory-mapped for torch.save's zip format, so cheap); diffusers reads it again to load it,
        # also weights-only (diffusers.models.model_loading_utils.load_state_dict)
        tensors = _load_ckpt(path)
        return check_tensors(path, {k: tuple(v.shape) for k, v in tensors.items()},
                             {k: _torch_dtype_code(v) for k, v in tensors.items()})
    raise UserError(f"{path} has neither a .safetensors nor a .ckpt name; expected {_EXPECTED}")


@contextlib.contextmanager
def _config_dir(in_channels: int) -> Iterator[Path]:
    """The shipped config folder, or for another U-Net input width (inpainting: 9) a temporary copy of it whose
    unet/config.json says so (diffusers builds the U-Net from the config, then loads the weights into it)."""
    if in_channels == 4:
        yield SD15_CONFIGS
        return
    with tempfile.TemporaryDirectory(prefix="ldm_app_sd15_") as tmp:
        tmp = Path(tmp)
        for entry in SD15_CONFIGS.iterdir():
            if entry.name != "unet":
                os.symlink(entry, tmp / entry.name)
        (tmp / "unet").mkdir()
        config = json.loads((SD15_CONFIGS / "unet" / "config.json").read_text(encoding="utf-8"))
        config["in_channels"] = in_channels
        (tmp / "unet" / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        yield tmp


def load_single_file(path: str | os.PathLike, pipeline_class: type | None = None, **kwargs: Any):
    """Load an SD-1.x single-file checkpoint (`.safetensors`, or a weights-only `.ckpt`) as a `pipeline_class`
    (default `ldm_app.pipeline.LatentDiffusionPipeline`; any `diffusers.StableDiffusionPipeline` subclass works,
    e.g. `StableDiffusionInpaintPipeline` for a 9-channel U-Net). Weights come in float32 unless `torch_dtype` (or
    `dtype`) is given; other keyword arguments go to diffusers' `from_single_file` (e.g. `scheduler=...`).
    Nothing is fetched from the hub: the configs, tokenizer and scheduler are the shipped SD-1.x ones."""
    import torch

    if pipeline_class is None:
        from .pipeline import LatentDiffusionPipeline as pipeline_class
    path = Path(path)
    in_channels = check_file(path)  # everything the file can be wrong in, as one line, before diffusers sees it
    if "dtype" not in kwargs:
        kwargs.setdefault("torch_dtype", torch.float32)  # an fp16 file runs on the CPU, like our from_pretrained
    with _config_dir(in_channels) as config:
        # diffusers' own loader: with a local config folder and local_files_only it reads only that folder and the
        # file (no hub call, no cache), converts each network's keys and builds the pipeline; checked in the tests
        # with HF_HUB_OFFLINE=1 and no network at all. The tokenizer is the bundled CLIP BPE one (SD-1.x's own),
        # passed in rather than shipped twice.
        if "tokenizer" not in kwargs:
            from .models import load_tokenizer

            kwargs["tokenizer"] = load_tokenizer()
        return pipeline_class.from_single_file(str(path), config=str(config), local_files_only=True, **kwargs)


# ---- writing ------------------------------------------------------------------------------------------------------

# Config keys that change what the networks compute without changing any tensor's shape: the single file cannot
# record them, so a model that differs from SD-1.x in one of them is refused (loaded back it would give other images).
_SHAPE_FREE_KEYS = {
    "unet": ("act_fn", "flip_sin_to_cos", "freq_shift", "norm_eps", "norm_num_groups", "downsample_padding",
             "mid_block_scale_factor", "center_input_sample", "upcast_attention", "resnet_time_scale_shift",
             "time_embedding_type", "class_embed_type", "addition_embed_type", "timestep_post_act",
             "time_cond_proj_dim", "dual_cross_attention", "only_cross_attention", "use_linear_projection",
             "down_block_types", "up_block_types", "mid_block_type", "transformer_layers_per_block",
             "cross_attention_norm", "resnet_skip_time_act", "resnet_out_scale_factor", "attention_type"),
    "vae": ("act_fn", "norm_num_groups", "scaling_factor", "shift_factor", "latents_mean", "latents_std",
            "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention", "down_block_types",
            "up_block_types"),
    "text_encoder": ("hidden_act", "layer_norm_eps", "num_attention_heads", "max_position_embeddings"),
    "scheduler": ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "prediction_type"),
}
# What a scheduler config without the key means (the defaults of diffusers' DDPM/DDIM/PNDM/DPM-Solver schedulers).
_SCHEDULER_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                       "trained_betas": None, "prediction_type": "epsilon"}


def _config_of(obj: Any) -> dict[str, Any]:
    config = getattr(obj, "config", obj)
    return dict(config.to_dict() if hasattr(config, "to_dict") else config)


def _norm(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        value = [_norm(v) for v in value]
        return value[0] if value and all(v == value[0] for v in value) else value  # [8, 8, 8, 8] means 8
    if isinstance(value, float):
        return round(value, 9)
    return value


def _check_configs(source: str, configs: Mapping[str, Mapping[str, Any]]) -> None:
    """`configs` (complete configs, as the models hold them) agree with SD-1.x's wherever the file cannot say."""
    shipped = {name: _config_of(model) for name, model in _meta_models().items()}
    shipped["scheduler"] = {**_SCHEDULER_DEFAULTS, **json.loads(
        (SD15_CONFIGS / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))}

    def refuse(component: str, key: str, have: Any, want: Any) -> UserError:
        return UserError(
            f"{source}: its {component} has {key}={have!r} where SD-1.x has {want!r}; the single-file layout cannot "
            "record that, so the file would load as a different model: keep it as a folder")

    for component, keys in _SHAPE_FREE_KEYS.items():
        theirs = configs.get(component)
        if theirs is None:
            continue
        if component == "scheduler":
            theirs = {**_SCHEDULER_DEFAULTS, **theirs}
        for key in keys:
            have, want = theirs.get(key), shipped[component].get(key)
            if _norm(have) != _norm(want):
                raise refuse(component, key, have, want)
    unet = configs["unet"]  # diffusers' historical naming: num_attention_heads, else attention_head_dim, is the heads
    heads = _norm(unet.get("num_attention_heads") or unet.get("attention_head_dim"))
    want = _norm(shipped["unet"].get("num_attention_heads") or shipped["unet"].get("attention_head_dim"))
    if heads != want:
        key = "num_attention_heads" if unet.get("num_attention_heads") else "attention_head_dim"
        raise refuse("unet", key, unet.get(key), want)


def _read_json(path: Path, folder: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}: cannot read {path.relative_to(folder)} ({type(e).__name__}); expected an SD-1.x "
                        "folder in diffusers' layout") from None
    if not isinstance(value, dict):
        raise UserError(f"{folder}: {path.relative_to(folder)} is not a JSON object")
    return value


def _folder_configs(folder: Path) -> dict[str, dict[str, Any]]:
    """The complete configs of a diffusers folder's networks (defaults filled in by building them on the meta
    device) and its scheduler config; the weight files checked to exist."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    if not folder.is_dir() or not (folder / "model_index.json").is_file():
        raise UserError(f"{folder} is not a diffusers pipeline folder (no model_index.json); expected an SD-1.x "
                        "folder in diffusers' layout or a loaded pipeline")
    for rel in _FOLDER_WEIGHTS.values():
        if not (folder / rel).is_file():
            raise UserError(f"{folder} has no {rel}; expected an SD-1.x folder with safetensors weights (as "
                            "save_pretrained writes them)")
    raw = {c: _read_json(folder / c / "config.json", folder) for c in _FOLDER_WEIGHTS}
    if raw["vae"].get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise UserError(f"{folder} has a {raw['vae'].get('_class_name')} autoencoder; the SD-1.x single-file layout "
                        "holds a KL autoencoder (AutoencoderKL) only")
    try:
        with torch.device("meta"):
            configs = {"unet": _config_of(UNet2DConditionModel.from_config(raw["unet"])),
                       "vae": _config_of(AutoencoderKL.from_config(raw["vae"]))}
        configs["text_encoder"] = CLIPTextConfig.from_dict(raw["text_encoder"]).to_dict()
    except Exception as e:  # a config diffusers cannot build: not an SD-1.x model
        raise UserError(f"{folder}: its configs do not describe an SD-1.x model ({type(e).__name__}); expected an "
                        "SD-1.x folder in diffusers' layout") from None
    scheduler = folder / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        configs["scheduler"] = _read_json(scheduler, folder)
    return configs


def _folder_tensors(folder: Path) -> dict[str, dict[str, Any]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors = {}
    for component, rel in _FOLDER_WEIGHTS.items():
        try:
            tensors[component] = load_file(str(folder / rel))
        except (OSError, SafetensorError) as e:
            raise UserError(f"{folder}: cannot read {rel} ({type(e).__name__}: damaged or not safetensors)") from None
    return tensors


def to_single_file_state_dict(pipe_or_folder: Any) -> dict[str, Any]:
    """The single-file (original-layout) state dict of a pipeline or a diffusers folder, checked: exactly the
    SD-1.x tensors with their shapes (any U-Net input width), configs SD-1.x's where the file cannot say otherwise.
    A folder's configs are checked before its weights are read."""
    if isinstance(pipe_or_folder, (str, os.PathLike)):
        folder = Path(pipe_or_folder)
        source = str(folder)
        configs = _folder_configs(folder)
        _check_configs(source, configs)
        tensors = _folder_tensors(folder)
    else:
        pipe = pipe_or_folder
        source = f"the {type(pipe).__name__}"
        modules = {c: getattr(pipe, c, None) for c in _FOLDER_WEIGHTS}
        absent = [c for c, m in modules.items() if m is None]
        if absent:
            raise UserError(f"{source} has no {absent[0]}; expected an SD-1.x pipeline")
        if type(modules["vae"]).__name__ != "AutoencoderKL":
            raise UserError(f"{source} has a {type(modules['vae']).__name__} autoencoder; the SD-1.x single-file "
                            "layout holds a KL autoencoder (AutoencoderKL) only")
        configs = {c: _config_of(m) for c, m in modules.items()}
        if getattr(pipe, "scheduler", None) is not None:
            configs["scheduler"] = _config_of(pipe.scheduler)
        _check_configs(source, configs)
        tensors = {c: m.state_dict() for c, m in modules.items()}
    state = {}
    for component, sd in tensors.items():
        state.update(_to_original(component, sd))
    expected = expected_shapes()
    extra = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if extra or missing:
        what = f"{len(missing)} SD-1.x tensors missing (e.g. {missing[0]})" if missing else \
            f"{len(extra)} tensors SD-1.x does not have (e.g. {extra[0]})"
        raise UserError(f"{source} is not an SD-1.x model: {what}; the single-file layout holds SD-1.x only")
    for key, want in expected.items():
        shape = tuple(state[key].shape)
        if not _shape_ok(key, shape, want) or (key.endswith(_VAE_LINEAR_AS_CONV) and shape != want):
            raise UserError(f"{source} is not an SD-1.x model: {key} has shape {_fmt(shape)} where SD-1.x has "
                            f"{_fmt(want)}; the single-file layout holds SD-1.x only")
    return state


def save_single_file(pipe_or_folder: Any, dest: str | os.PathLike, dtype: Any = None, overwrite: bool = False) -> Path:
    """Write an SD-1.x pipeline (object or diffusers folder) as one CompVis/A1111-layout safetensors file at `dest`
    (atomically: a temporary file next to it, renamed into place; an existing `dest` only with `overwrite`).
    `dtype` (e.g. torch.float16) casts the floating weights; by default they are written as they are. Returns
    `dest`."""
    from safetensors.torch import save_file

    dest = Path(dest)
    if dest.suffix.lower() != ".safetensors":
        raise UserError(f"{dest}: a single-file checkpoint is written as .safetensors; give a path ending .safetensors")
    if dest.is_symlink() or (dest.exists() and not (overwrite and dest.is_file())):
        how = "give a new path" if dest.is_dir() or dest.is_symlink() else "give a new path, or overwrite=True"
        raise UserError(f"{dest} already exists; refusing to replace it ({how})")
    if not dest.parent.is_dir():
        raise UserError(f"cannot write {dest}: {dest.parent} is not a folder")
    state = to_single_file_state_dict(pipe_or_folder)
    # cast when asked; contiguous CPU tensors (safetensors refuses views of non-contiguous memory and other devices)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().to("cpu").contiguous()
             for k, v in state.items()}
    with atomic_path(dest) as tmp, write_errors(dest):
        save_file(state, str(tmp), metadata={"format": "pt", "written_by": WRITTEN_BY})
    return dest
