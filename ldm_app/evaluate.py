"""Evaluation commands (one subcommand per trained part).

    python -m ldm_app.evaluate vae --model OUT --data DIR [--num_images N] [--grid PATH] [--json PATH]
    python -m ldm_app.evaluate ldm --model M ...     (prompt adherence: ldm_app/evaluation/adherence.py;
                                                      --prompt_style free: free-form prompts, scored on what they state)
    python -m ldm_app.evaluate sweep --model M ...   (settings sweep, defaults by measurement: .../sweep.py)
    python -m ldm_app.evaluate edit --model M ...    (recolouring and inpainting: .../edit.py)
    python -m ldm_app.evaluate ceiling --model VAE   (what an autoencoder lets through: .../ceiling.py)

`vae`: reconstruct the held-out images of the training run (the indices train_vae.py recorded in
OUT/vae/holdout.json, never trained on) and report PSNR, SSIM (Wang et al. 2004) and, for a VQ model, codebook
usage: the fraction of the codebook's entries that quantise at least one latent of those images. KL models
reconstruct from the posterior mode (deterministic); VQ models from the quantised encoder output.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import ArgumentParser, UserError, run_cli
from .fileio import check_report_file
from .first_stage import HOLDOUT_FILE, TRAIN_CONFIG_FILE, is_vq, reconstruct  # noqa: F401 (reconstruct: public here)

logger = logging.getLogger("evaluate")

GRID_COLUMNS = 8  # images shown in the reconstruction grid
# the evaluations in ldm_app/evaluation/: (subcommand, module, its add-arguments function, its run function, help)
SUBCOMMANDS = (
    ("ldm", "ldm_app.evaluation.adherence", "add_ldm_arguments", "run_ldm",
     "prompt adherence (attribute judge) and domain KID of a shapes text-to-image model"),
    ("sweep", "ldm_app.evaluation.sweep", "add_sweep_arguments", "run_sweep_cli",
     "adherence and speed under several sampling settings; choose the defaults"),
    ("edit", "ldm_app.evaluation.edit", "add_edit_arguments", "run_edit_cli",
     "image-to-image recolouring and inpainting, judged by the judge and by pixels"),
    ("classes", "ldm_app.evaluation.classes", "add_classes_arguments", "run_classes_cli",
     "class-conditional sampling: class accuracy per guidance scale"),
    ("ceiling", "ldm_app.evaluation.ceiling", "add_ceiling_arguments", "run_ceiling_cli",
     "what an autoencoder lets through of the adherence prompts (renders encoded and decoded, both judges)"),
)  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Autoencoder


def resolve_model_dir(path: str | Path) -> Path:
    """A train_vae.py output folder (the model is in its vae/) or the model folder itself."""
    path = Path(path)
    return path / "vae" if (path / "vae" / "config.json").is_file() else path


def heldout_indices(model_dir: Path, num_images: int) -> list[int]:
    """The held-out indices recorded at training time, checked against the data folder's size."""

    record_file = model_dir / HOLDOUT_FILE
    if not record_file.is_file():
        logger.warning("%s has no %s: scoring every image (some may have been trained on)", model_dir, HOLDOUT_FILE)
        return list(range(num_images))
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
        record["num_images"], record["indices"]  # noqa: B018 - the keys train_vae.py writes
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{record_file} is unreadable or not train_vae.py's held-out record "
                        f"({e.__class__.__name__}): remove it to score every image") from None
    if record["num_images"] != num_images:
        raise UserError(f"--data has {num_images} images but the model was trained on a folder of "
                        f"{record['num_images']}: pass the training data folder so the held-out split matches")
    if not record["indices"]:
        logger.warning("the model was trained without held-out images (holdout_fraction 0): scoring every image")
        return list(range(num_images))
    return record["indices"]


def _data_config(model_dir: Path, sample_size: int) -> Any:
    """The training run's data settings (train_config.yaml next to the weights), else defaults at the model's
    resolution. Evaluation always centre-crops and never flips."""
    from .config import DataConfig, from_dict, read_yaml

    saved = model_dir / TRAIN_CONFIG_FILE
    if not saved.is_file():
        return DataConfig(resolution=sample_size)
    return from_dict(DataConfig, read_yaml(saved).get("data"), "data")


def _training_data_of(model: str | Path, model_dir: Path) -> None:
    """Without --data the model folder must name its training data (train_vae.py's train_config.yaml); say what
    the folder is when it does not."""

    if (model_dir / TRAIN_CONFIG_FILE).is_file():
        return
    model = Path(model)
    if (model / "model_index.json").is_file():
        found = f"{str(model)!r} is a pipeline folder (model_index.json) whose vae/ has no {TRAIN_CONFIG_FILE}"
    else:
        found = f"{str(model_dir)!r} is an autoencoder folder without {TRAIN_CONFIG_FILE}"
    raise UserError(f"{found}, so the data it was trained on is unknown: expected a train_vae.py output folder "
                    "(or its vae/), or pass --data DIR (an image folder to score the autoencoder on)")


def score_autoencoder(vae: Any, dataset: Any, batch_size: int, device: Any) -> tuple[dict[str, float], list, list]:
    """PSNR / SSIM (per image, averaged) and VQ codebook usage over `dataset`; plus the first GRID_COLUMNS
    originals and reconstructions (tensors (3, H, W))."""
    from torch.utils.data import DataLoader

    from .data.dataset import collate_fn
    from .losses import ssim
    from .training.common import psnr

    psnrs, ssims, codes, skipped = [], [], set(), 0
    originals, recons = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn):
        skipped += batch["num_skipped"]
        x0 = batch["pixel_values"].to(device)
        if not x0.shape[0]:
            continue
        x_rec, indices = reconstruct(vae, x0)
        psnrs.append(psnr(x_rec, x0).cpu())
        ssims.append(ssim(x_rec, x0).cpu())
        if indices is not None:
            codes.update(indices.flatten().tolist())
        room = GRID_COLUMNS - len(originals)
        originals += list(x0[:room].cpu())
        recons += list(x_rec[:room].cpu())
    if not psnrs:
        raise UserError(f"no readable image to evaluate: {skipped} of {skipped} held-out images skipped "
                        f"(first: {getattr(dataset, 'first_error', None)})")
    metrics = {"num_images": int(sum(len(p) for p in psnrs)), "skipped_images": int(skipped),
               "psnr": float(torch.cat(psnrs).mean()), "ssim": float(torch.cat(ssims).mean())}
    if is_vq(vae):
        size = vae.config.num_vq_embeddings
        metrics.update(codes_used=len(codes), codebook_size=size, codebook_usage=len(codes) / size)
    return metrics, originals, recons


def save_grid(originals: list[torch.Tensor], recons: list[torch.Tensor], path: str | Path) -> None:
    """Originals on the top row, their reconstructions below; written atomically as PNG."""
    from diffusers.utils import make_image_grid
    from PIL import Image

    from .fileio import atomic_path

    def to_pil(x: torch.Tensor) -> Image.Image:  # (3, H, W) in [-1, 1]
        return Image.fromarray(((x.float() + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())

    from .fileio import write_errors

    grid = make_image_grid([to_pil(x) for x in originals + recons], rows=2, cols=len(originals))
    path = Path(path)
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".png") as tmp:
            grid.save(tmp, format="PNG")


def evaluate_vae(model: str | Path, data_dir: str | Path | None, num_images: int | None = None,
                 grid: str | Path | None = None, json_path: str | Path | None = None, batch_size: int = 16,
                 overwrite: bool = False,
                 device: Any = None) -> dict[str, float]:
    """Score an autoencoder on its held-out images (see the module docstring); returns the metrics."""
    if num_images is not None and num_images < 1:
        raise UserError(f"--num_images must be >= 1, got {num_images}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"--batch_size must be an integer >= 1, got {batch_size!r}")
    model_dir = resolve_model_dir(model)
    if not (model_dir / "config.json").is_file():  # checked before the slow imports
        raise UserError(f"{str(model)!r} is not an autoencoder folder (no config.json): pass a train_vae.py "
                        "output folder or its vae/ folder")
    if data_dir is None:
        _training_data_of(model, model_dir)  # refuse a folder that does not say where its data is, before work
    for flag, dest in (("--grid", grid), ("--json", json_path)):
        if dest:
            check_report_file(flag, dest, overwrite)
    from .data.dataset import build_dataset
    from .fileio import atomic_write_text
    from .models import load_autoencoder

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    vae = load_autoencoder(model_dir).to(device).eval()
    d = _data_config(model_dir, vae.config.sample_size)
    dataset = build_dataset(str(data_dir) if data_dir else d.train_data_dir, None if data_dir else d.dataset_name,
                            d.resolution, center_crop=True, random_flip=False, caption_column=d.caption_column,
                            image_column=d.image_column, max_samples=d.max_samples)
    indices = heldout_indices(model_dir, len(dataset))[:num_images]
    metrics, originals, recons = score_autoencoder(vae, dataset.select(indices), batch_size, device)
    if grid:
        save_grid(originals, recons, grid)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)  # checked by check_report_file
        atomic_write_text(json_path, json.dumps(metrics, indent=2) + "\n")
    return metrics


def format_vae_metrics(metrics: dict[str, float]) -> str:
    line = (f"{metrics['num_images']} held-out images: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}")
    if "codebook_usage" in metrics:
        line += (f", codebook usage {metrics['codebook_usage']:.1%} "
                 f"({metrics['codes_used']}/{metrics['codebook_size']} codes)")
    if metrics["skipped_images"]:
        line += f" ({metrics['skipped_images']} unreadable images skipped)"
    return line


def _run_vae(args: argparse.Namespace) -> None:
    metrics = evaluate_vae(args.model, args.data, args.num_images, args.grid, args.json, args.batch_size,
                           overwrite=args.overwrite)
    print(format_vae_metrics(metrics))
    if args.grid:
        print(f"reconstruction grid (originals top, reconstructions below): {args.grid}")


# --------------------------------------------------------------------------------------------------------------
# Command line




def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m ldm_app.evaluate", description="Evaluate trained models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    vae = sub.add_parser("vae", help="reconstruction quality of an autoencoder on its held-out images")
    vae.add_argument("--model", required=True, help="train_vae.py output folder (or its vae/ folder)")
    vae.add_argument("--data", help="the training data folder (default: the one in the model's train_config.yaml)")
    vae.add_argument("--num_images", type=int, help="score only the first N held-out images")
    vae.add_argument("--grid", help="write a reconstruction grid PNG here")
    vae.add_argument("--json", help="write the metrics as JSON here")
    vae.add_argument("--overwrite", action="store_true", help="replace --grid / --json files that exist")
    vae.add_argument("--batch_size", type=int, default=16)
    vae.set_defaults(run=_run_vae)
    for name, module, add, run, help_text in SUBCOMMANDS:
        evaluation = importlib.import_module(module)
        sub_parser = sub.add_parser(name, help=help_text)
        getattr(evaluation, add)(sub_parser)
        sub_parser.set_defaults(run=getattr(evaluation, run))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(format="%(name)s %(levelname)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
