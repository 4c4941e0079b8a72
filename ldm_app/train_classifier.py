"""Train a noise-aware latent classifier for classifier guidance (Dhariwal & Nichol 2021) on a model's latents.

    python -m ldm_app.train_classifier --model PIPELINE_DIR --output_dir OUT
        [--num_images 4000] [--num_heldout 600] [--steps 2000] [--batch_size 128] [--lr 1e-3] [--seed 0]

Data: one-object shapes scenes (ldm_app.data.shapes: any background, size and position), rendered in memory at the
model's resolution; scene i of the training set comes from its own generator seeded (seed, 0, i), held-out scene i
from (seed, 1, i). The label is colour x shape, 18 classes in this order (`CLASS_NAMES`):

    label = 3 * colour_index + shape_index,  colours (red, green, blue, yellow, purple, orange),
                                             shapes (circle, square, triangle)

so 0 = "red circle", 1 = "red square", ..., 17 = "orange triangle". Each image is encoded once by the model's
autoencoder (the posterior mean and std, ldm_app.first_stage); every step draws a fresh posterior sample
x0 = (mean + std * n) * scaling_factor (as the LDM is trained), a uniformly random t in [0, T) and
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps under the model's own noise schedule, and minimises the cross-entropy
of p(y | x_t, t). At the end the held-out accuracy is measured in 5 noise-level buckets of t (fixed draws).

OUT is written atomically (classifier.safetensors, classifier_config.json, training.json); an existing OUT is
replaced only if it is a classifier folder written here, anything else is refused before any work.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from ldm_app.errors import ArgumentParser, UserError, raise_if_stopped, run_cli

CONFIG_NAMES = ("classifier.safetensors", "classifier_config.json", "training.json")
NUM_BUCKETS = 5


def class_names() -> list[str]:
    from ldm_app.data.shapes import COLOURS, SHAPES

    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def label_of(colour: str, shape: str) -> int:
    from ldm_app.data.shapes import COLOURS, SHAPES

    return list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)


def render_labelled(num: int, resolution: int, seed: int, stream: int):
    """(pixels (num, 3, R, R) in [-1, 1], labels (num,) long) of one-object scenes seeded (seed, stream, i)."""
    import numpy as np
    import torch

    from ldm_app.data.shapes import render_scene, sample_scene

    images = np.empty((num, resolution, resolution, 3), dtype=np.uint8)
    labels = []
    for i in range(num):
        scene = sample_scene(np.random.default_rng([seed, stream, i]), resolution, two_object_fraction=0.0)
        images[i] = np.asarray(render_scene(scene, resolution))
        labels.append(label_of(scene.objects[0].colour, scene.objects[0].shape))
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels, torch.tensor(labels, dtype=torch.long)


def encode(vae, pixels, batch_size: int = 64):
    import torch

    from ldm_app.first_stage import latent_stats

    means, stds = [], []
    for i in range(0, len(pixels), batch_size):
        mean, std = latent_stats(vae, pixels[i : i + batch_size])
        means.append(mean.cpu())
        stds.append(std.cpu() if std is not None else None)
    return torch.cat(means), (None if stds[0] is None else torch.cat(stds))


def _check_previous(out: Path) -> None:
    from ldm_app.classifier import is_classifier_folder

    extra = sorted(p.name for p in out.iterdir() if p.name not in CONFIG_NAMES)
    if not is_classifier_folder(out) or extra:
        from ldm_app.fileio import some_entries

        raise UserError(f"--output_dir {out} holds other files ({some_entries(out)}), not a classifier written "
                        "by train_classifier: give a new path, an empty folder or an earlier classifier folder")


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m ldm_app.train_classifier", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="pipeline folder (diffusers layout) whose latents to classify")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--num_images", type=int, default=4000, help="training renders")
    p.add_argument("--num_heldout", type=int, default=600, help="held-out renders")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--block_out_channels", default="64,128", help="channels per down level, comma-separated")
    p.add_argument("--layers_per_block", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log_every", type=int, default=100)
    return p


def _check_args(args) -> tuple[int, ...]:
    for name in ("num_images", "steps", "batch_size", "log_every", "layers_per_block"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.num_heldout < 0:
        raise UserError(f"--num_heldout must be >= 0, got {args.num_heldout}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UserError(f"--lr must be a positive number, got {args.lr}")
    try:
        channels = tuple(int(c) for c in args.block_out_channels.split(","))
    except ValueError:
        channels = ()
    if not channels or any(c < 1 or c % 32 for c in channels):
        raise UserError(f"--block_out_channels must be positive multiples of 32, comma-separated; got "
                        f"{args.block_out_channels!r}")  # fmt: skip
    return channels


def heldout_accuracy(model, x0, labels, alphas_cumprod, seed: int, batch_size: int = 256) -> dict[str, dict]:
    """Accuracy on held-out latents x0 (N, C, h, w) at fixed random t in each of NUM_BUCKETS equal ranges of t."""
    import torch

    T = len(alphas_cumprod)
    gen = torch.Generator().manual_seed(seed + 1)
    result = {}
    model.eval()
    for b in range(NUM_BUCKETS):
        lo, hi = b * T // NUM_BUCKETS, (b + 1) * T // NUM_BUCKETS
        t = torch.randint(lo, hi, (len(x0),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        abar = alphas_cumprod[t].float().view(-1, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        with torch.no_grad():
            pred = torch.cat([model(x_t[i : i + batch_size], t[i : i + batch_size]).argmax(1)
                              for i in range(0, len(x0), batch_size)])  # fmt: skip
        right = pred == labels
        colour_right = (pred // 3) == (labels // 3)
        shape_right = (pred % 3) == (labels % 3)
        result[f"t={lo}-{hi - 1}"] = {"accuracy": float(right.float().mean()),
                                      "colour": float(colour_right.float().mean()),
                                      "shape": float(shape_right.float().mean())}  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    channels = _check_args(args)
    out = Path(args.output_dir)
    from ldm_app.fileio import check_replaceable_dir

    check_replaceable_dir(out, "a new path, an empty folder or an earlier classifier folder", _check_previous)
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise UserError(f"--model {model_dir} is not a folder: give a pipeline folder (diffusers layout)")

    import torch
    from diffusers import DDPMScheduler

    from ldm_app.classifier import ClassifierConfig, LatentClassifier, save_classifier
    from ldm_app.first_stage import latent_channels, sample_x0
    from ldm_app.pipeline import LatentDiffusionPipeline

    start = time.perf_counter()
    pipe = LatentDiffusionPipeline.from_pretrained(str(model_dir))
    vae = pipe.vae.float().eval()
    size = pipe.unet.config.sample_size
    resolution = size * pipe.vae_scale_factor
    print(f"rendering {args.num_images} + {args.num_heldout} one-object scenes at {resolution}px", flush=True)
    pixels, labels = render_labelled(args.num_images, resolution, args.seed, stream=0)
    held_pixels, held_labels = render_labelled(args.num_heldout, resolution, args.seed, stream=1)
    print("encoding with the model's autoencoder", flush=True)
    mean, std = encode(vae, pixels)
    held_mean, held_std = encode(vae, held_pixels) if args.num_heldout else (None, None)
    sf = vae.config.scaling_factor
    prep_seconds = time.perf_counter() - start

    alphas_cumprod = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod  # (T,) float32
    T = len(alphas_cumprod)
    torch.manual_seed(args.seed)
    config = ClassifierConfig(num_classes=len(class_names()), in_channels=latent_channels(vae), sample_size=size,
                              block_out_channels=channels, layers_per_block=args.layers_per_block,
                              class_names=class_names())  # fmt: skip
    model = LatentClassifier(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(1, min(100, args.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    gen = torch.Generator().manual_seed(args.seed)
    print(f"training a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter classifier "
          f"({config.num_classes} classes) for {args.steps} steps x {args.batch_size}", flush=True)  # fmt: skip
    t0, losses, hits = time.perf_counter(), [], []
    model.train()
    for step in range(1, args.steps + 1):
        raise_if_stopped()  # a SIGTERM/Ctrl-C that C code swallowed during the last step (ldm_app.errors)
        idx = torch.randint(0, len(mean), (args.batch_size,), generator=gen)
        x0 = sample_x0(mean[idx], None if std is None else std[idx], sf, gen)
        t = torch.randint(0, T, (args.batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        abar = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        logits = model(x_t, t)
        loss = torch.nn.functional.cross_entropy(logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        hits.append(float((logits.argmax(1) == labels[idx]).float().mean()))
        if step % args.log_every == 0 or step == args.steps:
            rate = step / (time.perf_counter() - t0)
            print(f"step {step}/{args.steps} loss {sum(losses) / len(losses):.4f} train acc "
                  f"{sum(hits) / len(hits):.3f} ({rate:.1f} steps/s)", flush=True)  # fmt: skip
            losses, hits = [], []
    train_seconds = time.perf_counter() - t0

    heldout = {}
    if args.num_heldout:
        held_x0 = sample_x0(held_mean, held_std, sf, torch.Generator().manual_seed(args.seed + 2))
        heldout = heldout_accuracy(model, held_x0, held_labels, alphas_cumprod, args.seed)
        print("held-out accuracy (colour x shape) by t: " + ", ".join(
            f"{k} {v['accuracy']:.3f}" for k, v in heldout.items()), flush=True)  # fmt: skip
    training = {
        "model": str(model_dir),
        "args": {k: v for k, v in vars(args).items()},
        "label_order": "label = 3 * colour_index + shape_index over COLOURS x SHAPES of ldm_app.data.shapes",
        "class_names": class_names(),
        "heldout_accuracy_by_t": heldout,
        "chance_accuracy": 1.0 / config.num_classes,
        "prepare_seconds": round(prep_seconds, 1),
        "train_seconds": round(train_seconds, 1),
    }
    save_classifier(model.eval(), out, training)
    print(f"wrote {out} ({time.perf_counter() - start:.0f}s)", flush=True)


if __name__ == "__main__":
    sys.exit(run_cli(main))
