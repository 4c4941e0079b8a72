"""LoRA fine-tuning for train_ldm.py (`--lora_rank R --pretrained_model DIR`).

The adapters are peft's: the U-Net's added through diffusers' adapter integration (`unet.add_adapter(
LoraConfig(...))`), the text encoder's (`lora.text_encoder`) by peft's own `inject_adapter_in_model`
(transformers' `add_adapter` does the same but refuses to run with peft < 0.22, and the registry's newest is
0.21.2; diffusers' `load_lora_weights` reads the result through transformers' `load_adapter`, which has no such
check). The file is written by diffusers' `StableDiffusionPipeline.save_lora_weights`, exactly as diffusers'
examples/text_to_image/train_text_to_image_lora.py does; so `pipe.load_lora_weights(folder)` and
`generate.py --lora FILE:SCALE` read it. Its safetensors metadata carries each adapter's LoraConfig (rank, alpha,
target modules), so an alpha other than the rank loads with the right scale.

What train_ldm.py does differently in a LoRA run (ldm.py):
- only the LoRA parameters require gradients; the optimiser, gradient clipping and the EMA see only those (the EMA,
  when ldm.use_ema is on, averages the LoRA weights, and the exported file holds the averaged ones, as a full run's
  pipeline holds the averaged U-Net);
- checkpoints hold accelerate's state (the whole U-Net with its adapters: resuming needs nothing else), the EMA and
  the LoRA file instead of a pipeline folder; the output folder ends with the LoRA file and run_config.json (the base
  model and the LoRA settings), not a pipeline;
- the latent cache works as in full training; with `lora.text_encoder` the text states are computed every step.

The second half is textual inversion (`--train_embedding TOKEN`), the other cheap adaptation: one new token's
embedding vector trains (a gradient hook keeps the other rows' gradients at zero, and they are restored after each
step against weight decay, as diffusers' textual_inversion.py does), the U-Net and the rest of the text encoder are
frozen, and the output is diffusers' learned_embeds.safetensors.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from ..config import LoRAConfig
from ..errors import UserError

logger = logging.getLogger("train_ldm")

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default weight name for load_lora_weights(folder)


def check_lora_run(cfg: Any) -> None:
    """Config-level checks of a LoRA run (train_ldm's LDMRunConfig), before any model is loaded."""
    if cfg.lora.rank is None:
        return
    if not cfg.ldm.pretrained_model:
        raise UserError("LoRA (--lora_rank) adapts a pretrained model: give --pretrained_model PIPELINE_DIR (an "
                        "SD-1.x-layout folder such as ldm_app/assets/default_model)")


def check_lora_base(cfg: Any) -> None:
    """Before loading: refuse a run that would have to add layers to the pretrained U-Net (a widened input
    convolution for conditioning.concat, a new scalar embedding). Those layers start at zero and would stay frozen
    under LoRA, so the run would silently train without the condition. Read from the folder's unet/config.json
    (a folder without one is refused by the loading that follows)."""
    if cfg.lora.rank is None:
        return
    folder = Path(cfg.ldm.pretrained_model) / "unet"
    try:
        unet = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        in_channels, out_channels = unet["in_channels"], unet["out_channels"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    # an eps/v U-Net outputs the latent channels: more inputs than that means the concatenated channels are there
    if cfg.conditioning.concat != "none" and in_channels <= out_channels:
        raise UserError(f"LoRA cannot train conditioning.concat={cfg.conditioning.concat} on {folder}: its U-Net "
                        f"takes {in_channels} input channels and would need a new, trained input layer; fine-tune "
                        "fully (no --lora_rank) or start from an inpainting model")
    if cfg.conditioning.uses_scalar and unet.get("class_embed_type") is None:
        raise UserError(f"LoRA cannot train conditioning.kind={cfg.conditioning.kind} on {folder}: its U-Net has no "
                        "scalar embedding and a new one would stay frozen; fine-tune fully (no --lora_rank)")


def add_lora(unet: Any, text_encoder: Any | None, lora: LoRAConfig, seed: int) -> int:
    """Freeze `unet` (and `text_encoder`, when given) and add a trainable LoRA adapter to each, its initial weights
    a function of `seed` (peft draws them from torch's global generator: seeded here, so two runs with one seed,
    and a resumed run's fresh start, agree); returns the number of trainable parameters."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _add_lora(unet, text_encoder, lora)


def _add_lora(unet: Any, text_encoder: Any | None, lora: LoRAConfig) -> int:
    from peft import LoraConfig, inject_adapter_in_model

    alpha = lora.alpha if lora.alpha is not None else lora.rank
    # init_lora_weights="gaussian": A ~ N(0, 1/r), B = 0 (diffusers' script): the run starts at the base model
    modules = [(unet, "target_modules")] + ([(text_encoder, "text_encoder_target_modules")] if text_encoder else [])
    for module, key in modules:
        module.requires_grad_(False)
        targets = list(getattr(lora, key))
        config = LoraConfig(r=lora.rank, lora_alpha=alpha, lora_dropout=lora.dropout, init_lora_weights="gaussian",
                            target_modules=targets)
        try:
            if module is unet:
                module.add_adapter(config)
            else:  # peft directly: see the module docstring (same adapter, named "default", as add_adapter makes)
                inject_adapter_in_model(config, module, adapter_name="default")
        except ValueError as e:  # peft: "Target modules {...} not found in the base model. ..."
            raise UserError(f"lora.{key} {targets}: {str(e).splitlines()[0][:200]}") from None
    return sum(p.numel() for m, _ in modules for p in m.parameters() if p.requires_grad)


def lora_layers(module: Any) -> dict[str, Any]:
    """The module's LoRA weights in diffusers' naming (what save_lora_weights expects)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(module))


def save_lora(folder: Path, unet: Any, text_encoder: Any | None) -> Path:
    """Write `folder`/pytorch_lora_weights.safetensors (diffusers' format, with the adapters' LoraConfig as
    metadata). The file is written beside its final name and renamed into place, so a reader never sees half a
    file (save_lora_weights itself writes in place)."""
    from diffusers import StableDiffusionPipeline

    staging = folder / ".lora"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        StableDiffusionPipeline.save_lora_weights(
            staging, unet_lora_layers=lora_layers(unet),
            text_encoder_lora_layers=lora_layers(text_encoder) if text_encoder is not None else None,
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
            text_encoder_lora_adapter_metadata=(text_encoder.peft_config["default"].to_dict()
                                                if text_encoder is not None else None),
            weight_name=LORA_FILE, safe_serialization=True)
        os.replace(staging / LORA_FILE, folder / LORA_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder / LORA_FILE


# --------------------------------------------------------------------------------------------------------------
# Textual inversion (--train_embedding TOKEN): the other cheap adaptation, sharing this module's role

EMBEDDING_FILE = "learned_embeds.safetensors"  # diffusers' name: pipe.load_textual_inversion(folder) finds it


def check_embedding_run(cfg: Any) -> None:
    """Config-level checks of a textual-inversion run, before any model is loaded."""
    if cfg.embedding.token is None:
        return
    if not cfg.ldm.pretrained_model:
        raise UserError("textual inversion (--train_embedding) learns a word for a pretrained model: give "
                        "--pretrained_model PIPELINE_DIR")
    if cfg.lora.rank is not None:
        raise UserError("--train_embedding and --lora_rank cannot be combined: train one, then the other")


def check_embedding_captions(cfg: Any, captions: list[str]) -> None:
    """The token must occur in the captions: only a caption that contains it gives its vector a gradient."""
    token = cfg.embedding.token
    if token is not None and not any(token in c for c in captions):
        raise UserError(f"no caption contains the token {token!r}: write it into the captions of the images it "
                        "stands for (e.g. 'a photo of " + token + "')")


def add_embedding(text_encoder: Any, tokenizer: Any, token: str, initializer: str, num_vectors: int = 1) -> slice:
    """Add `token` (and, for num_vectors N > 1, `token_1` ... `token_{N-1}`, diffusers' multi-vector names) to the
    tokenizer and as many rows to the text encoder's input embeddings, each initialised as `initializer`'s; freeze
    the text encoder except that embedding matrix. Returns the new rows (consecutive: added in one call)."""
    import torch

    ids = tokenizer.encode(initializer, add_special_tokens=False)
    if len(ids) != 1:
        raise UserError(f"the initializer token {initializer!r} (embedding.initializer_token) must be one token of "
                        f"the tokenizer; it is {len(ids)}")
    names = [token] + [f"{token}_{i}" for i in range(1, num_vectors)]
    vocab = tokenizer.get_vocab()
    # "circle" is not in CLIP's vocabulary ("circle</w>" is) and add_tokens would accept it, shadowing the word:
    # refuse any token the tokenizer already reads as one token
    if (len(tokenizer.encode(token, add_special_tokens=False)) == 1 or any(n in vocab for n in names)
            or tokenizer.add_tokens(names) != num_vectors):
        raise UserError(f"the token {token!r} is already a word of this model's tokenizer: choose a new one, "
                        "e.g. '<my-style>'")
    first = tokenizer.convert_tokens_to_ids(token)
    rows = slice(first, first + num_vectors)
    assert tokenizer.convert_tokens_to_ids(names) == list(range(rows.start, rows.stop))
    # mean_resizing=False: the new rows are overwritten below (no random draw needed)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[rows] = weight[ids[0]]
    text_encoder.requires_grad_(False)
    weight.requires_grad_(True)
    return rows


def expand_token(captions: list[str], tokenizer: Any) -> list[str]:
    """Each caption with a multi-vector token written out as its N tokens: diffusers' own rewriting
    (TextualInversionLoaderMixin._maybe_convert_prompt, which its pipelines apply to every prompt), so training
    reads a caption exactly as load_textual_inversion + a pipeline will. Single-vector tokens are left as they are."""
    from diffusers.loaders import TextualInversionLoaderMixin

    return [TextualInversionLoaderMixin._maybe_convert_prompt(None, c, tokenizer) for c in captions]


def keep_other_rows(weight: Any, rows: slice) -> Any:
    """A gradient hook (diffusers' script restores the rows after each step instead; we do that too, see
    restore_other_rows): only the token's rows get a gradient, so clipping and the optimiser see those rows alone."""
    import torch

    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    mask[rows] = 1
    return weight.register_hook(lambda g: g * mask.to(g.device, g.dtype))


def restore_other_rows(weight: Any, original: Any, rows: slice) -> None:
    """Put every row but the token's back (AdamW's weight decay moves them even without a gradient)."""
    import torch

    with torch.no_grad():
        weight[:rows.start].copy_(original[:rows.start])
        weight[rows.stop:].copy_(original[rows.stop:])


def save_embedding(folder: Path, token: str, vectors: Any) -> Path:
    """diffusers' learned_embeds.safetensors ({token: (N, D)}), written beside its name and renamed into place."""
    from safetensors.torch import save_file

    tmp = folder / f".{EMBEDDING_FILE}.tmp"
    save_file({token: vectors.detach().reshape(-1, vectors.shape[-1]).float().contiguous().cpu()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / EMBEDDING_FILE)
    return folder / EMBEDDING_FILE
