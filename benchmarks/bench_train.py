"""Training throughput: our cached loop (train_ldm.py --cache_latents) vs a diffusers-style uncached loop.

The uncached loop is what diffusers' examples/text_to_image/train_text_to_image.py does at every step: decode and
transform the images, encode them with the VAE, tokenize and encode the captions with the frozen text encoder,
then one U-Net forward/backward. Ours reads the posterior and the text states from the cache (built once, timed
separately) and does the same U-Net step. Same U-Net (same initial weights), same batch, same device, one run.

    python benchmarks/bench_train.py                      # f=8 VAE, 64 px, the shapes64 U-Net, auto device
    python benchmarks/bench_train.py --config configs/ldm/shapes64_cpu.yaml --text_dim 128 --device cpu
                                                          # the U-Net of the bundled model's CPU recipe
    python benchmarks/bench_train.py --config configs/ldm/tiny.yaml --resolution 32 --vae_levels 3 --steps 10

Prints images/s for both and the speed-up; --json FILE also writes them.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_app.config import AutoencoderConfig, TextEncoderConfig, load_config  # noqa: E402
from ldm_app.training.ldm import LDMRunConfig, LDMTrainer, build_models, build_train_dataset  # noqa: E402


def make_inputs(tmp: Path, args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """A shapes dataset, a random f = 2**(levels-1) KL autoencoder and a random frozen CLIP text encoder."""
    from ldm_app.data.shapes import make_dataset
    from ldm_app.models import build_autoencoder, build_text_encoder

    torch.manual_seed(0)
    channels = (64, 128, 128, 128)[: args.vae_levels]
    build_autoencoder(AutoencoderConfig(block_out_channels=channels, sample_size=args.resolution)).save_pretrained(
        tmp / "vae")
    build_text_encoder(TextEncoderConfig(hidden_size=args.text_dim, num_hidden_layers=4, num_attention_heads=4,
                                         intermediate_size=4 * args.text_dim)).save_pretrained(tmp / "text_encoder")
    make_dataset(tmp / "data", args.num_images, args.resolution, seed=0)
    return tmp / "data", tmp / "vae", tmp / "text_encoder"


def make_trainer(args: argparse.Namespace, tmp: Path, data: Path, vae: Path, te: Path) -> LDMTrainer:
    from ldm_app.training.common import make_accelerator

    f = 2 ** (args.vae_levels - 1)
    overrides = {"data": {"train_data_dir": str(data), "resolution": args.resolution, "holdout_fraction": 0.0,
                          "dataloader_num_workers": args.workers},
                 "unet": {"sample_size": args.resolution // f},
                 "text_encoder": {"pretrained": str(te)},
                 "train": {"train_batch_size": args.batch_size, "max_train_steps": 10**6,
                           "mixed_precision": args.mixed_precision},
                 "ldm": {"pretrained_vae": str(vae), "use_ema": False}}
    cfg = load_config(LDMRunConfig, args.config, overrides)
    acc = make_accelerator(cfg.train, tmp / "out", cpu=args.device == "cpu")
    return LDMTrainer(cfg, build_models(cfg), build_train_dataset(cfg), acc, tmp / "out")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ours(trainer: LDMTrainer, steps: int, warmup: int) -> float:
    """images/s of LDMTrainer.train_step on cached batches."""
    stream = trainer.data_stream()
    for _ in range(warmup):
        trainer.train_step(next(stream)[1])
    sync(trainer.acc.device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(stream)[1])
    sync(trainer.acc.device)
    return steps * trainer.cfg.train.train_batch_size / (time.perf_counter() - start)


def diffusers_style_step(unet, vae, text_encoder, tokenizer, noise_scheduler, optimizer, batch, device, autocast):
    """One step as in train_text_to_image.py: VAE and text encoder run every step."""
    import torch.nn.functional as F

    pixels = batch["pixel_values"].to(device)
    with torch.no_grad(), autocast():
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        ids = tokenizer(batch["captions"], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        states = text_encoder(ids, return_dict=False)[0]
    noise = torch.randn_like(latents)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
    with autocast():
        pred = unet(noise_scheduler.add_noise(latents, noise, t), t, states, return_dict=False)[0]
    loss = F.mse_loss(pred.float(), noise.float())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def time_diffusers_style(trainer: LDMTrainer, dataset, unet: torch.nn.Module, steps: int, warmup: int) -> float:
    from torch.utils.data import DataLoader

    from ldm_app.data.dataset import collate_fn

    m, device = trainer.m, trainer.acc.device
    loader = DataLoader(dataset, batch_size=trainer.cfg.train.train_batch_size, shuffle=True,
                        collate_fn=collate_fn, drop_last=True, num_workers=trainer.cfg.data.dataloader_num_workers)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=trainer.cfg.train.learning_rate)
    batches = iter(loader)

    def step():
        nonlocal batches
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        diffusers_style_step(unet, m.vae, m.text_encoder, m.tokenizer, m.diffusion.scheduler, optimizer, batch,
                             device, trainer.acc.autocast)

    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * trainer.cfg.train.train_batch_size / (time.perf_counter() - start)


def report(figures: dict, json_path: str | None) -> None:
    """Print the figures one per line; with --json also write them to that file."""
    for k, v in figures.items():
        print(f"{k:40s} {v}")
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/ldm/shapes64.yaml")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--vae_levels", type=int, default=4, help="autoencoder levels: f = 2 ** (levels - 1)")
    p.add_argument("--text_dim", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_images", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (both loops)")
    p.add_argument("--device", choices=["auto", "cpu"], default="auto")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data, vae, te = make_inputs(tmp, args)
        trainer = make_trainer(args, tmp, data, vae, te)
        unet_copy = copy.deepcopy(trainer.m.unet)  # same initial weights for the uncached loop
        images = trainer.dataset  # decoded images; use_cache swaps in the cached latents
        start = time.perf_counter()
        trainer.use_cache(tmp / "cache")
        cache_s = time.perf_counter() - start
        ours = time_ours(trainer, args.steps, args.warmup)
        unet_copy = unet_copy.to(trainer.acc.device).train()
        theirs = time_diffusers_style(trainer, images, unet_copy, args.steps, args.warmup)

    device = trainer.acc.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    figures = {"device": name, "batch_size": args.batch_size, "resolution": args.resolution,
               "unet_params_M": round(sum(p.numel() for p in unet_copy.parameters()) / 1e6, 2),
               "cached_images_per_s": round(ours, 2), "uncached_diffusers_style_images_per_s": round(theirs, 2),
               "speedup": round(ours / theirs, 2), "cache_build_s": round(cache_s, 2),
               "cache_images": args.num_images}
    report(figures, args.json)


if __name__ == "__main__":
    main()
