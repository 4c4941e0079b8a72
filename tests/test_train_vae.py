"""train_vae.py on a tiny f=4 autoencoder and 24 images of 32 px: training helps, resume is exact (also after a
real SIGKILL), the exported model loads with diffusers and has a measured scaling factor, bad input is one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ldm_helpers import swallow_a_stop_in
from safetensors.torch import load_file

from ldm_app.data.shapes import make_dataset
from ldm_app.errors import UserError, run_cli
from ldm_app.training import vae as train_vae

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "vae" / "tiny.yaml")
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vae_data") / "shapes"
    make_dataset(out, num_images=24, resolution=32, seed=0)
    return out


def run(data_dir: Path, out: Path, *extra: str) -> train_vae.TrainResult:
    return train_vae.main(["--config", TINY, "--train_data_dir", str(data_dir), "--output_dir", str(out), *extra])


def script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "train_vae.py"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / WEIGHTS))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, f"weights differ by {worst}"


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory) -> train_vae.TrainResult:
    """6 uninterrupted steps (GAN on from step 2), checkpoints at 3 and 6: the reference for the resume tests."""
    return run(data_dir, tmp_path_factory.mktemp("straight"))


def _train_images(data_dir: Path, n: int) -> torch.Tensor:
    cfg = train_vae.load_config(train_vae.VAERunConfig, TINY, {"data": {"train_data_dir": str(data_dir)}})
    train_set, _ = train_vae.build_datasets(cfg)
    return torch.stack([train_set[i]["pixel_values"] for i in range(n)])


def test_training_reduces_the_reconstruction_loss(data_dir, tmp_path):
    from diffusers import AutoencoderKL

    from ldm_app.models import build_autoencoder

    result = run(data_dir, tmp_path / "run", "--max_train_steps", "12", "--set", "loss.disc_start=1000")
    cfg = train_vae.load_config(train_vae.VAERunConfig, TINY)
    torch.manual_seed(cfg.train.seed)  # the trainer's initial weights (accelerate's set_seed)
    before = build_autoencoder(cfg.autoencoder).eval()
    after = AutoencoderKL.from_pretrained(result.model_dir).eval()
    x0 = _train_images(data_dir, 12)
    with torch.no_grad():
        l1 = [(m.decode(m.encode(x0).latent_dist.mode()).sample - x0).abs().mean().item() for m in (before, after)]
    assert l1[1] < 0.9 * l1[0], l1
    assert result.metrics["num_images"] == 6 and result.metrics["psnr"] > 0  # held-out scores at the end


def test_exported_model_loads_encodes_to_one_quarter_and_is_scaled(straight, data_dir):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(straight.model_dir, use_safetensors=True).eval()
    x0 = _train_images(data_dir, 16)  # the images the scale was measured on (scale_num_images: 16)
    with torch.no_grad():
        z = vae.encode(x0).latent_dist.sample(generator=torch.Generator().manual_seed(1))
    assert z.shape == (16, 4, 8, 8)  # 32 px / 4: the tiny config is f=4, the latents configs/ldm/tiny.yaml expects
    assert (z * vae.config.scaling_factor).std().item() == pytest.approx(1.0, abs=0.05)
    assert vae.config.scaling_factor != 1.0
    saved = train_vae.load_config(train_vae.VAERunConfig, straight.model_dir / train_vae.TRAIN_CONFIG_FILE)
    assert saved.autoencoder.scaling_factor == pytest.approx(vae.config.scaling_factor)


def test_holdout_is_recorded_and_disjoint_from_training(straight, data_dir):
    record = json.loads((straight.model_dir / train_vae.HOLDOUT_FILE).read_text())
    assert record["num_images"] == 24 and len(record["indices"]) == 6  # holdout_fraction 0.25
    cfg = train_vae.load_config(train_vae.VAERunConfig, TINY, {"data": {"train_data_dir": str(data_dir)}})
    train_set, _ = train_vae.build_datasets(cfg)
    train_names = {train_set.image_name(i) for i in range(len(train_set))}
    assert len(train_names) == 18
    heldout = {f"{i:06d}.png" for i in record["indices"]}
    assert not heldout & {Path(n).name for n in train_names}


def test_resume_gives_the_same_weights(straight, data_dir, tmp_path):
    out = tmp_path / "resumed"
    run(data_dir, out, "--max_train_steps", "3")
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-3"]
    resumed = run(data_dir, out, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    assert resumed.step == 6
    assert_same_weights(weights(straight.model_dir), weights(resumed.model_dir))


def test_resume_after_sigkill_gives_the_same_weights(straight, data_dir, tmp_path):
    """A run killed (SIGKILL) after its first checkpoint, resumed by a new process, ends where an uninterrupted run
    does. The killed run checkpoints every step and has a far budget so that it is surely still running."""
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_vae.py"), "--config", TINY, "--train_data_dir",
                             str(data_dir), "--output_dir", str(out), "--max_train_steps", "1000",
                             "--checkpointing_steps", "1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while not (out / "checkpoint-2").is_dir() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    steps = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert steps and max(steps) < 6, steps
    resumed = run(data_dir, out, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    assert_same_weights(weights(straight.model_dir), weights(resumed.model_dir))


def test_vq_run_exports_a_vqmodel(data_dir, tmp_path):
    from diffusers import VQModel

    result = run(data_dir, tmp_path / "vq", "--set", "autoencoder.kind=vq", "--max_train_steps", "3")
    vae = VQModel.from_pretrained(result.model_dir, use_safetensors=True)
    assert vae.config.num_vq_embeddings == 16
    assert 0 < result.metrics["codebook_usage"] <= 1


def test_restart_dead_codes_moves_unused_codes_onto_encoder_outputs():
    codebook = torch.full((4, 2), 9.0)
    counts = torch.tensor([3.0, 0.0, 1.0, 0.0])
    h = torch.arange(8.0).reshape(1, 2, 2, 2)  # (B, C, h, w): 4 latent vectors (0, 4), (1, 5), (2, 6), (3, 7)
    restarted = train_vae.restart_dead_codes(codebook, counts, h, torch.Generator().manual_seed(0))
    assert restarted == 2 and counts.eq(0).all()
    assert codebook[[0, 2]].eq(9.0).all()  # used codes stay
    latents = {tuple(v) for v in h.permute(0, 2, 3, 1).reshape(-1, 2).tolist()}
    assert {tuple(v) for v in codebook[[1, 3]].tolist()} <= latents


def test_vq_resume_with_codebook_restarts_gives_the_same_weights(data_dir, tmp_path):
    """The code counts between restarts are checkpointed: a run resumed between two restarts ends where an
    uninterrupted one does, and the counts do not leak into the exported VQModel."""
    vq = ["--set", "autoencoder.kind=vq", "--set", "loss.codebook_restart_every=2", "--checkpointing_steps", "3"]
    straight = run(data_dir, tmp_path / "straight", *vq, "--max_train_steps", "4")
    run(data_dir, tmp_path / "resumed", *vq, "--max_train_steps", "3")
    resumed = run(data_dir, tmp_path / "resumed", *vq, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    a, b = weights(straight.model_dir), weights(resumed.model_dir)
    assert_same_weights(a, b)
    assert not any("code_counts" in k for k in a)


def test_output_dir_of_another_run_is_refused(straight, data_dir):
    with pytest.raises(UserError, match="already holds checkpoints"):
        run(data_dir, straight.model_dir.parent)
    with pytest.raises(UserError, match="different run"):
        run(data_dir, straight.model_dir.parent, "--resume_from_checkpoint", "latest", "--learning_rate", "0.5")


def test_missing_data_folder_is_one_line_error(tmp_path):
    proc = script("--config", TINY, "--train_data_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train_data_dir") and "is not a folder" in lines[0], \
        proc.stderr


def test_output_dir_inside_the_data_folder_is_refused(tmp_path, data_dir, capsys):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    out = data / "vae_run"
    code = run_cli(train_vae.main, ["--config", TINY, "--train_data_dir", str(data), "--output_dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "inside --train_data_dir" in err[0], err
    assert not out.exists()


def test_unknown_config_key_is_one_line_error(tmp_path, data_dir, capsys):
    code = run_cli(train_vae.main, ["--config", TINY, "--train_data_dir", str(data_dir), "--output_dir",
                                    str(tmp_path / "o"), "--set", "loss.kl_wieght=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: unknown config key 'loss.kl_wieght'"), err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_config_errors_name_the_key():
    with pytest.raises(UserError, match="sample_size"):
        train_vae.load_config(train_vae.VAERunConfig, TINY, ["data.resolution=64"])
    with pytest.raises(UserError, match="disc_start"):
        train_vae.load_config(train_vae.VAERunConfig, TINY, ["loss.disc_start=-1"])
    with pytest.raises(UserError, match="data.buckets is for train_ldm.py"):  # not silently square crops
        train_vae.load_config(train_vae.VAERunConfig, TINY, ["data.buckets=true"])


def test_decoder_only_fine_tune_keeps_the_encoder_and_the_latent_scale(straight, data_dir, tmp_path):
    """--pretrained_vae + train_decoder_only: the encoder and quant_conv come out bit-identical (the latent space an
    LDM was trained on does not move), the decoder changes, and the scaling factor is the pretrained one."""
    base = straight.model_dir
    tuned = run(data_dir, tmp_path / "ft", "--pretrained_vae", str(base), "--set", "train_decoder_only=true",
                "--max_train_steps", "3").model_dir
    before, after = weights(base), weights(tuned)
    assert before.keys() == after.keys()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in before if k.startswith("decoder.")]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    config = lambda d: json.loads((d / "config.json").read_text())  # noqa: E731
    assert config(tuned)["scaling_factor"] == config(base)["scaling_factor"]


def test_pretrained_vae_starts_from_its_weights(straight, data_dir, tmp_path):
    """A full fine-tune from a pretrained folder starts from its weights: at a negligible learning rate (Adam moves
    each weight by about the learning rate a step) it ends where it began."""
    out = run(data_dir, tmp_path / "lr0", "--pretrained_vae", str(straight.model_dir), "--learning_rate", "1e-12",
              "--max_train_steps", "2", "--set", "loss.disc_start=100").model_dir
    assert_same_weights(weights(straight.model_dir), weights(out))


def test_bad_pretrained_vae_is_a_one_line_error_before_anything_is_written(straight, data_dir, tmp_path, capsys):
    for extra, message in (
        (["--pretrained_vae", str(tmp_path / "missing")], "expected an autoencoder folder"),
        (["--pretrained_vae", str(straight.model_dir), "--set", "autoencoder.latent_channels=8"],
         "does not match the config's autoencoder section"),
        (["--set", "train_decoder_only=true"], "train_decoder_only needs a trained autoencoder"),
    ):
        out = tmp_path / "o"
        code = run_cli(train_vae.main, ["--config", TINY, "--train_data_dir", str(data_dir), "--output_dir", str(out),
                                        *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert not out.exists()


def test_a_stop_swallowed_during_a_step_ends_the_run_before_the_next(data_dir, tmp_path, monkeypatch):
    """As train_ldm: a Ctrl-C whose exception C code cleared stops the run at the next step (exit status 130)."""
    calls = swallow_a_stop_in(monkeypatch, train_vae.VAETrainer, "train_step", signal.SIGINT)
    out = tmp_path / "run"
    argv = ["--config", TINY, "--train_data_dir", str(data_dir), "--output_dir", str(out), "--max_train_steps", "6",
            "--checkpointing_steps", "3", "--set", "loss.disc_start=1000"]
    assert run_cli(train_vae.main, argv) == 130
    assert len(calls) == 2 and not list(out.glob("checkpoint-*"))
