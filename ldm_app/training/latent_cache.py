"""`--cache_latents`: encode every training image with the frozen autoencoder once (and every caption once when the
text encoder is frozen), store the result as safetensors and train from it.

What is stored is the encoder's posterior, not a sample of it: for a KL autoencoder the mean and std of
q(z | x) = N(mean, std^2) (B, C, h, w), for a VQ autoencoder the pre-quantisation latents (std = None). Each step
then draws x0 = (mean + std * eps) * scaling_factor with eps from that step's generator, exactly as the uncached
path does after encoding (`sample_x0` serves both), so a cached run trains like an uncached one with the same seed.

The cache file is named and validated by an identity hash of everything that determines its content (the rows and
their image files, the image transforms, the autoencoder's weights, and the frozen text encoder's weights), so a
cache made for other data or another autoencoder is never reused: a new one is written next to it.

diffusers has no latent cache (its train_text_to_image.py encodes with the VAE at every step); this is ours.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..conditioning import encode_text_batched  # the training step's own encoding: cached and live states agree
from ..errors import UserError
from ..fileio import atomic_path
from ..first_stage import latent_stats, sample_x0  # noqa: F401 (sample_x0: the uncached path's draw, re-exported)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


# ---- the cache ----------------------------------------------------------------------------------------------


@dataclass
class LatentCache:
    """Row i of the training dataset: mean[i], std[i] (None for VQ); valid[i] is False for an unreadable image.
    With a frozen text encoder also text_embeds (U, L, D) for the U distinct captions (and ""), by caption_rows."""

    mean: torch.Tensor  # (N, C, h, w) float32
    std: torch.Tensor | None  # (N, C, h, w) float32, or None (VQ)
    valid: torch.Tensor  # (N,) bool
    text_embeds: torch.Tensor | None = None  # (U, L, D) float32
    caption_rows: dict[str, int] | None = None

    def text_states(self, captions: list[str], device: torch.device) -> torch.Tensor:
        """The cached encoder hidden states of each caption, (B, L, D)."""
        rows = torch.tensor([self.caption_rows[c] for c in captions])
        return self.text_embeds[rows].to(device)


class CachedLatentDataset(Dataset):
    """The training dataset with images replaced by their cached posterior; None for an unreadable image, which
    `collate_cached` drops, as `collate_fn` drops it in the uncached path."""

    def __init__(self, cache: LatentCache, captions: list[str]):
        self.cache = cache
        self.captions = captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        if not self.cache.valid[i]:
            return None
        std = self.cache.std[i] if self.cache.std is not None else None
        return {"latent_mean": self.cache.mean[i], "latent_std": std, "caption": self.captions[i], "index": i}


def collate_cached(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Like `ldm_app.data.dataset.collate_fn`, for cached items: latent_mean / latent_std (B, C, h, w)."""
    kept = [item for item in items if item is not None]
    has_std = bool(kept) and kept[0]["latent_std"] is not None
    return {
        "latent_mean": torch.stack([item["latent_mean"] for item in kept]) if kept else torch.empty(0),
        "latent_std": torch.stack([item["latent_std"] for item in kept]) if has_std else None,
        "captions": [item["caption"] for item in kept],
        "indices": torch.tensor([item["index"] for item in kept], dtype=torch.long),
        "num_skipped": len(items) - len(kept),
    }


# ---- identity ----------------------------------------------------------------------------------------------


def _hash_module(h: "hashlib._Hash", module: torch.nn.Module) -> None:
    config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)  # HF vs diffusers
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())


def hash_rows(h: "hashlib._Hash", dataset: Any, fingerprint: bool = True) -> None:
    """The rows (captions) and the files behind them: a changed, added or re-ordered image changes the hash. With
    `fingerprint`, also the `datasets` fingerprint of the table (which may change with a `datasets` upgrade)."""
    h.update(json.dumps(dataset.captions).encode())
    if fingerprint:
        h.update(str(getattr(dataset.hf_dataset, "_fingerprint", "")).encode())
    rows = dataset.hf_dataset
    # slices of 256 rows: an older `datasets` materialises a whole column (a hub dataset's embedded image bytes)
    for source in (s for i in range(0, len(rows), 256) for s in rows[i:i + 256][dataset.image_column]):
        path = source.get("path")
        if source.get("bytes") is not None:
            h.update(hashlib.sha256(source["bytes"]).digest())
        elif path and os.path.exists(path):
            stat = os.stat(path)
            h.update(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        else:
            h.update(f"missing:{path}".encode())


def cache_identity(dataset: Any, vae: Any, text_encoder: Any | None, max_length: int) -> str:
    """sha256 of what the cache content depends on. `text_encoder` is the frozen encoder to cache, or None."""
    h = hashlib.sha256(f"ldm_app latent cache v{FORMAT_VERSION}".encode())
    h.update(json.dumps([dataset.resolution, dataset.center_crop, dataset.random_flip, max_length]).encode())
    hash_rows(h, dataset)
    _hash_module(h, vae)
    if text_encoder is not None:
        _hash_module(h, text_encoder)
    return h.hexdigest()


# ---- building, writing and reading ---------------------------------------------------------------------------


def check_cacheable(dataset: Any, cache_dir: str | None = None) -> None:
    """Cached latents freeze the image transforms, so they must be deterministic; and `cache_dir` (None: the run
    folder's) must be a folder or not yet exist (found before the cache is encoded, not after)."""
    if dataset.random_flip or not dataset.center_crop:
        raise UserError("--cache_latents needs deterministic image transforms: set data.random_flip=false and "
                        "data.center_crop=true (or train without --cache_latents)")
    if cache_dir and Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise UserError(f"--cache_dir {cache_dir!r} is a file, not a folder")


def _encode_shard(accelerator: Any, dataset: Any, vae: Any, collate_fn: Any, batch_size: int,
                  num_workers: int) -> dict[str, torch.Tensor]:
    """This process's share of the rows (every num_processes-th), encoded: indices (n,), mean/std (n, C, h, w)."""
    rows = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    loader = DataLoader(Subset(dataset, rows), batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers)
    indices, means, stds = [], [], []
    for batch in loader:
        if not len(batch["captions"]):
            continue
        with accelerator.autocast():
            mean, std = latent_stats(vae, batch["pixel_values"])
        indices.append(batch["indices"])
        means.append(mean.cpu())
        if std is not None:
            stds.append(std.cpu())
    out = {"indices": torch.cat(indices) if indices else torch.empty(0, dtype=torch.long)}
    if means:
        out["mean"] = torch.cat(means)
    if stds:
        out["std"] = torch.cat(stds)
    return out


def _merge_shards(parts: list[dict[str, torch.Tensor]], n: int) -> dict[str, torch.Tensor]:
    """Shards (indices, mean, std) -> full tensors in row order plus the `valid` mask (rows that were encoded)."""
    filled = [p for p in parts if "mean" in p]
    if not filled:
        raise UserError("--cache_latents: not one training image could be read")
    shape = filled[0]["mean"].shape[1:]
    merged = {"mean": torch.zeros(n, *shape), "valid": torch.zeros(n, dtype=torch.bool)}
    if "std" in filled[0]:
        merged["std"] = torch.zeros(n, *shape)
    for p in filled:
        merged["valid"][p["indices"]] = True
        for key in ("mean", "std"):
            if key in merged:
                merged[key][p["indices"]] = p[key]
    return merged


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _read(path: Path, identity: str) -> LatentCache | None:
    """The cache at `path` if it is complete and was made for `identity`, else None (with the reason logged)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("identity") != identity:
                logger.warning("latent cache %s was made for other data or weights; rebuilding it", path)
                return None
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        logger.warning("latent cache %s is unreadable (%s); rebuilding it", path, str(e).splitlines()[0])
        return None
    captions = json.loads(meta.get("captions", "null"))
    rows = {c: i for i, c in enumerate(captions)} if captions is not None else None
    return LatentCache(tensors["mean"], tensors.get("std"), tensors["valid"], tensors.get("text_embeds"), rows)


def _build(accelerator: Any, path: Path, identity: str, dataset: Any, vae: Any, text_encoder: Any | None,
           tokenizer: Any, collate_fn: Any, batch_size: int, num_workers: int) -> None:
    """Every process encodes its shard; the main process merges the shards and writes the file."""
    shard = _encode_shard(accelerator, dataset, vae, collate_fn, batch_size, num_workers)
    part_file = lambda rank: path.with_name(f".{path.stem}.part{rank}.safetensors")  # noqa: E731
    if accelerator.num_processes > 1 and not accelerator.is_main_process:
        _write(part_file(accelerator.process_index), shard, {})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from safetensors.torch import load_file

        parts = [shard] + [load_file(str(part_file(r))) for r in range(1, accelerator.num_processes)]
        tensors = _merge_shards(parts, len(dataset))
        metadata = {"identity": identity, "format": str(FORMAT_VERSION)}
        if text_encoder is not None:
            captions = sorted(set(dataset.captions) | {""})  # "" is the dropped (unconditional) caption
            tensors["text_embeds"] = encode_text_batched(tokenizer, text_encoder, captions)
            metadata["captions"] = json.dumps(captions)
        _write(path, tensors, metadata)
        for r in range(1, accelerator.num_processes):
            part_file(r).unlink()
    accelerator.wait_for_everyone()


def load_or_build_cache(accelerator: Any, cache_dir: str | Path, dataset: Any, vae: Any, text_encoder: Any | None,
                        tokenizer: Any, collate_fn: Any, batch_size: int, num_workers: int = 0) -> LatentCache:
    """The cache for (dataset, vae, frozen text_encoder or None), read from `cache_dir` or built there first.
    Collective: every process must call it."""
    check_cacheable(dataset)
    identity = cache_identity(dataset, vae, text_encoder, tokenizer.model_max_length)
    path = Path(cache_dir) / f"latents-{identity[:16]}.safetensors"
    cache = _read(path, identity) if path.is_file() else None
    accelerator.wait_for_everyone()  # every process decided from the same file state before anyone rewrites it
    if cache is None:
        start = time.perf_counter()
        _build(accelerator, path, identity, dataset, vae, text_encoder, tokenizer, collate_fn, batch_size,
               num_workers)
        cache = _read(path, identity)
        if cache is None:
            raise UserError(f"latent cache {path} could not be read back after writing it")
        logger.info("cached latents of %d images%s in %.1f s -> %s", int(cache.valid.sum()),
                    " and their captions" if text_encoder is not None else "", time.perf_counter() - start, path)
    else:
        logger.info("reusing latent cache %s (%d images)", path, int(cache.valid.sum()))
    unreadable = len(dataset) - int(cache.valid.sum())
    if unreadable:
        logger.warning("training on the %d readable images of %d: %d unreadable (see the warnings naming them)",
                       int(cache.valid.sum()), len(dataset), unreadable)
    return cache
