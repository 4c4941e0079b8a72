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
