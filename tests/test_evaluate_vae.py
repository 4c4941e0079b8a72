"""`python -m ldm_app.evaluate vae` on tiny random-weight autoencoders: held-out selection, metrics, grid, JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_app.config import AutoencoderConfig
from ldm_app.data.shapes import make_dataset
from ldm_app.errors import UserError
from ldm_app.evaluate import evaluate_vae, main, reconstruct
from ldm_app.models import build_autoencoder
from ldm_app.training.vae import HOLDOUT_FILE

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = [1, 4, 7, 9, 11]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval_data") / "shapes"
    make_dataset(out, num_images=12, resolution=32, seed=1)
    return out


def _model(tmp: Path, kind: str) -> Path:
    torch.manual_seed(0)
    vae = build_autoencoder(AutoencoderConfig(kind=kind, block_out_channels=(8, 8, 8, 8), norm_num_groups=8,
                                              num_vq_embeddings=16, sample_size=32))
    folder = tmp / kind / "vae"  # the train_vae.py layout: OUT/vae
    vae.save_pretrained(folder, safe_serialization=True)
    (folder / HOLDOUT_FILE).write_text(json.dumps({"num_images": 12, "holdout_fraction": 0.4, "seed": 0,
                                                   "indices": HELD_OUT}))
    return folder.parent


def test_kl_metrics_grid_and_json(tmp_path, data_dir):
    out = _model(tmp_path, "kl")
    grid, js = tmp_path / "grid.png", tmp_path / "m.json"
    metrics = evaluate_vae(out, data_dir, grid=grid, json_path=js)
    assert metrics["num_images"] == len(HELD_OUT) and "codebook_usage" not in metrics
    assert 0 < metrics["psnr"] < 30 and -1 <= metrics["ssim"] < 0.9  # an untrained model reconstructs badly
    assert json.loads(js.read_text()) == metrics
    image = np.asarray(Image.open(grid))
    assert image.shape == (2 * 32, len(HELD_OUT) * 32, 3)  # originals above reconstructions
    first_heldout = np.asarray(Image.open(data_dir / f"{HELD_OUT[0]:06d}.png").convert("RGB"))
    assert np.array_equal(image[:32, :32], first_heldout)


def test_num_images_limits_the_held_out_set(tmp_path, data_dir):
    metrics = evaluate_vae(_model(tmp_path, "kl"), data_dir, num_images=2)
    assert metrics["num_images"] == 2


def test_vq_reports_codebook_usage(tmp_path, data_dir, capsys):
    main(["vae", "--model", str(_model(tmp_path, "vq") / "vae"), "--data", str(data_dir)])
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(f"{len(HELD_OUT)} held-out images: PSNR") and "codebook usage" in line
    metrics = evaluate_vae(_model(tmp_path, "vq"), data_dir)
    assert 1 <= metrics["codes_used"] <= 16 and metrics["codebook_usage"] == metrics["codes_used"] / 16


def test_kl_reconstruction_is_deterministic(tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(_model(tmp_path, "kl") / "vae")
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    (a, _), (b, _) = reconstruct(vae, x0), reconstruct(vae, x0)
    assert torch.equal(a, b) and a.abs().max() <= 1


def test_data_folder_of_another_size_is_refused(tmp_path, data_dir):
    other = tmp_path / "other"
    make_dataset(other, num_images=5, resolution=32, seed=0)
    with pytest.raises(UserError, match="5 images but the model was trained on a folder of 12"):
        evaluate_vae(_model(tmp_path, "kl"), other)


def test_cli_errors_are_one_line(tmp_path, data_dir):
    proc = subprocess.run([sys.executable, "-m", "ldm_app.evaluate", "vae", "--model", str(tmp_path / "none"),
                           "--data", str(data_dir)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not an autoencoder folder" in lines[0], proc.stderr
    with pytest.raises(UserError, match="invalid choice"):
        main(["ldm-nope"])
