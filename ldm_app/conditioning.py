"""The conditioning stage: what the denoising U-Net is conditioned on, made from a batch's captions, in one place
for training, the latent cache and evaluation (the pipeline uses diffusers' encode_prompt, which does the same).

Text by cross-attention (LDM, Rombach et al. 2022): captions -> CLIP token ids (B, 77) -> the text encoder's last
hidden states c (B, 77, D), the U-Net's `encoder_hidden_states`. The null condition of classifier-free guidance
(Ho & Salimans 2022) is the empty caption: training drops captions to "" with probability p, sampling uses
eps(x_t, "") as the unconditional prediction.
"""

from __future__ import annotations

from typing import Any

import torch

NULL_CAPTION = ""  # the unconditional input of classifier-free guidance


def drop_captions(captions: list[str], p: float, generator: torch.Generator) -> list[str]:
    """Replace each caption by the null caption with probability p (classifier-free guidance's training)."""
    drop = torch.rand(len(captions), generator=generator) < p  # (B,)
    return [NULL_CAPTION if d else c for c, d in zip(captions, drop.tolist())]


def tokenize(tokenizer: Any, captions: list[str]) -> torch.Tensor:
    """Token ids (B, L), padded and truncated to the tokenizer's context (77 for CLIP)."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids  # fmt: skip


def encode_text(tokenizer: Any, text_encoder: Any, captions: list[str], device: Any = None) -> torch.Tensor:
    """c = the text encoder's last hidden states (B, L, D) for the captions, on `device` (default: the text
    encoder's; pass it for a DDP-wrapped encoder). Keeps the graph when grad is enabled (a text encoder trained
    jointly, LDM's trainable conditioning stage)."""
    ids = tokenize(tokenizer, captions).to(device if device is not None else text_encoder.device)
    return text_encoder(ids, return_dict=False)[0]


@torch.no_grad()
def encode_text_batched(tokenizer: Any, text_encoder: Any, captions: list[str], batch_size: int = 64) -> torch.Tensor:
    """encode_text in batches, as float32 on the CPU (the latent cache stores them)."""
    return torch.cat([encode_text(tokenizer, text_encoder, captions[i : i + batch_size]).float().cpu()
                      for i in range(0, len(captions), batch_size)])  # fmt: skip


# ---- class labels (an embedding added to the timestep embedding: diffusers' num_class_embeds) --------------------


def read_labels(dataset: Any, column: str, num_classes: int) -> torch.Tensor:
    """The integer class label of every row of `dataset` (an ldm_app ImageCaptionDataset, or anything with a
    `hf_dataset`), checked against 0..num_classes-1 (one-line UserError), as a (N,) long tensor."""
    from ldm_app.errors import UserError

    hf = getattr(dataset, "hf_dataset", dataset)
    if column not in getattr(hf, "column_names", []):
        raise UserError(f"the dataset has no label column {column!r} (columns: {', '.join(hf.column_names)}); "
                        "add a 'label' to each metadata.jsonl line, use class sub-folders, or set "
                        "conditioning.label_column")  # fmt: skip
    values = list(hf[column])
    for row, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_classes:
            raise UserError(f"label {value!r} in row {row} is not a class number in 0..{num_classes - 1} "
                            f"(conditioning.num_classes={num_classes})")
    return torch.tensor(values, dtype=torch.long)


def drop_labels(labels: torch.Tensor, num_classes: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each label by the null class (index num_classes) with probability p (classifier-free guidance)."""
    drop = torch.rand(len(labels), generator=generator) < p  # (B,)
    return torch.where(drop, torch.full_like(labels, num_classes), labels)


def class_labels_for_call(class_labels: Any, num_prompts: int, per_prompt: int, num_classes: int) -> torch.Tensor:
    """A call's class labels, one per image: an int (every image), or one per prompt (repeated per image of the
    prompt), or one per image; each in 0..num_classes-1 (UserError otherwise). (num_prompts * per_prompt,) long."""
    from ldm_app.errors import UserError
    from ldm_app.limits import shown

    values = [class_labels] if isinstance(class_labels, int) and not isinstance(class_labels, bool) else class_labels
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise UserError(f"class_labels must be an int or a list of ints, got {shown(class_labels, 60)}")
    for v in values:
        if not 0 <= v < num_classes:
            raise UserError(f"class label {v} is outside 0..{num_classes - 1} (this model has {num_classes} classes)")
    return torch.tensor(one_per_image(values, num_prompts, per_prompt, "class labels"), dtype=torch.long)


def one_per_image(values: list[Any], num_prompts: int, per_prompt: int, what: str) -> list[Any]:
    """A call's per-image values from one value (every image), one per prompt (repeated per image of the prompt) or
    one per image; UserError for any other count."""
    from ldm_app.errors import UserError

    if len(values) == 1:
        return list(values) * (num_prompts * per_prompt)
    if len(values) == num_prompts:
        return [v for v in values for _ in range(per_prompt)]
    if len(values) != num_prompts * per_prompt:
        raise UserError(f"got {len(values)} {what} for {num_prompts} prompts x {per_prompt} images; give one, one per "
                        "prompt or one per image")  # fmt: skip
    return list(values)


# ---- a scalar (an MLP of [s, 1] added to the timestep embedding: diffusers' class_embed_type="projection") ------

# The U-Net's class_labels for a scalar model are (B, 2) floats: [s, 1] for a value s, [0, 0] for the null condition.
# The second entry tells "no value" from s = 0, which a bare (B, 1) input could not.
SCALAR_INPUT_DIM = 2
# Values are meant to be O(1) (see ConditioningConfig); beyond this magnitude the projection overflows float32 on
# the way (1e30 gives NaN latents: a black image) long before anything meaningful: refused in one line instead.
MAX_ABS_SCALAR = 1e6


def scalar_condition(values: torch.Tensor) -> torch.Tensor:
    """(B,) values -> the U-Net's (B, 2) class_labels [s, 1]."""
    values = values.float().reshape(-1, 1)
    return torch.cat([values, torch.ones_like(values)], dim=1)


def null_scalar_condition(n: int) -> torch.Tensor:
    """(n, 2) zeros: the null condition of a scalar model (classifier-free guidance's unconditional input)."""
    return torch.zeros(n, SCALAR_INPUT_DIM)


def is_scalar_unet(config: Any) -> bool:
    """Whether a U-Net config is a scalar model's: diffusers' projection class embedding from [s, 1]."""
    return (getattr(config, "class_embed_type", None) == "projection"
            and getattr(config, "projection_class_embeddings_input_dim", None) == SCALAR_INPUT_DIM)  # fmt: skip


def read_scalars(dataset: Any, column: str) -> torch.Tensor:
    """The number in `column` of every row of `dataset` (an ldm_app ImageCaptionDataset, or anything with a
    `hf_dataset`), finite (one-line UserError naming the row otherwise), as a (N,) float32 tensor."""
    import math
    from pathlib import Path

    from ldm_app.errors import UserError
    from ldm_app.limits import shown

    hf = getattr(dataset, "hf_dataset", dataset)
    if column not in getattr(hf, "column_names", []):
        raise UserError(f"the dataset has no scalar column {column!r} (columns: {', '.join(hf.column_names)}); add "
                        f"a {column!r} number to each metadata.jsonl line (python -m ldm_app.data.shapes --sizes "
                        "writes 'size') or set conditioning.scalar_column")  # fmt: skip
    values = list(hf[column])
    for row, value in enumerate(values):
        number = not isinstance(value, bool) and isinstance(value, (int, float))
        if not number or not math.isfinite(value) or abs(value) > MAX_ABS_SCALAR:
            name = f" ({Path(dataset.image_name(row)).name})" if hasattr(dataset, "image_name") else ""
            raise UserError(f"{column} {shown(value, 40)} in row {row}{name} is not a "
                            f"{f'finite number within +-{MAX_ABS_SCALAR:g}' if number else 'number'}")  # fmt: skip
    return torch.tensor(values, dtype=torch.float32)


def drop_scalars(condition: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each row [s, 1] of `condition` (B, 2) by the null condition [0, 0] with probability p."""
    drop = torch.rand(len(condition), generator=generator) < p  # (B,)
    return torch.where(drop[:, None], torch.zeros_like(condition), condition)


def scalars_for_call(scalars: Any, num_prompts: int, per_prompt: int) -> torch.Tensor:
    """A call's scalars, one per image: a number (every image), or one per prompt (repeated per image of the
    prompt), or one per image; each finite (UserError otherwise). (num_prompts * per_prompt,) float32."""
    import math
    from numbers import Real

    from ldm_app.errors import UserError
    from ldm_app.limits import shown

    values = scalars.flatten().tolist() if isinstance(scalars, torch.Tensor) else scalars
    if isinstance(values, Real) and not isinstance(values, bool):
        values = [values]
    if (not isinstance(values, (list, tuple)) or not values
            or not all(isinstance(v, Real) and not isinstance(v, bool) for v in values)):  # fmt: skip
        raise UserError(f"scalars must be a number or a list of numbers, got {shown(scalars, 60)}")
    for v in values:
        if not math.isfinite(v):
            raise UserError(f"scalars must be finite numbers, got {v}")
        if abs(v) > MAX_ABS_SCALAR:
            raise UserError(f"scalar {v:g} is beyond +-{MAX_ABS_SCALAR:g}; a scalar model takes values of order 1 "
                            "(e.g. a size as a fraction of the image side)")
    values = one_per_image(values, num_prompts, per_prompt, "scalars")
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


# ---- an image by channel-wise concatenation: the inpainting model (SD-inpainting's 9-channel U-Net) ------------

CONCAT_KINDS = ("none", "inpaint")


def concat_channels(concat: str, latent_channels: int) -> int:
    """Channels concatenated to the noisy latents at the U-Net's input: for "inpaint", the mask (1) and the masked
    image's latents (C), diffusers' StableDiffusionInpaintPipeline layout [x_t, mask, masked-image latents]."""
    return 1 + latent_channels if concat == "inpaint" else 0


def masked_image(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image with the region to repaint set to 0 (mid-gray in [-1, 1]), as diffusers' pipeline prepares it:
    pixels (B, 3, H, W), mask (B, 1, H, W), 1 = repaint."""
    return pixels * (mask < 0.5)


def unet_input(x_t: torch.Tensor, concat: torch.Tensor | None) -> torch.Tensor:
    """What the U-Net takes: x_t, with an image-conditioned model's condition concatenated after it on the channels
    ([x_t, mask, masked latents] for an inpainting model)."""
    return x_t if concat is None else torch.cat([x_t, concat], dim=1)


def inpaint_condition(mask: torch.Tensor, masked_latents: torch.Tensor) -> torch.Tensor:
    """(B, 1 + C, h, w): the pixel mask resized to the latents (nearest, as diffusers' prepare_mask_latents) and the
    masked image's scaled latents, the channels concatenated after x_t."""
    small = torch.nn.functional.interpolate(mask, size=masked_latents.shape[-2:])
    return torch.cat([small.to(masked_latents), masked_latents], dim=1)
