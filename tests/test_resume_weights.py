"""A resumed run must start from the same files it began with, not merely the same paths: run_config.json records a
sha256 of the weights each trainer took from disk (the autoencoder, a pretrained U-Net or text encoder, a teacher),
and a resume from other files behind those paths is one `error:` line, with nothing in the folder touched. Changed
training data is allowed but said: the resumed run is no longer exactly an uninterrupted one."""

from __future__ import annotations

import functools
import json
import shutil

import pytest
import torch
from ldm_helpers import CONFIG, ROOT, LDMFiles, run_args, run_in_process

from ldm_app.checkpointing import LOADED_WEIGHTS, list_checkpoints
from ldm_app.config import AutoencoderConfig
from ldm_app.data.shapes import make_dataset
from ldm_app.errors import run_cli
from ldm_app.models import build_autoencoder
from ldm_app.training.common import weights_sha256
from ldm_app.training.ldm import main as train_ldm
from ldm_app.training.vae import main as train_vae

pytestmark = pytest.mark.usefixtures("fresh_accelerate")

TINY_VAE = AutoencoderConfig(block_out_channels=(8, 8, 8), norm_num_groups=8, latent_channels=4, sample_size=32)


def _cli(main, argv: list[str]) -> int:
    """A trainer's CLI in this process (exit status as `run_cli` gives it), accelerate's singletons reset after."""
    return run_in_process(functools.partial(run_cli, main), argv)


def _replace_vae(folder, seed: int) -> None:
    """Other weights behind the same path (as when a folder is overwritten by another training run)."""
    torch.manual_seed(seed)
    shutil.rmtree(folder)
    build_autoencoder(TINY_VAE).save_pretrained(folder)


def _folder_state(out) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _assert_resume_refused(main, argv: list[str], out, capsys, words: str) -> None:
    """main(argv) exits 2 with one `error:` line holding `words`, and the run folder is byte for byte as it was."""
    before = _folder_state(out)
    capsys.readouterr()
    rc = _cli(main, argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
    assert _folder_state(out) == before  # nothing written, nothing removed


def test_the_digest_sees_values_and_scale_but_not_library_versions():
    torch.manual_seed(0)
    vae = build_autoencoder(TINY_VAE)
    digest = weights_sha256(vae)
    assert digest == weights_sha256(vae)
    vae.register_to_config(_diffusers_version="0.0.1", _name_or_path="/elsewhere")  # not the weights
    assert weights_sha256(vae) == digest
    vae.register_to_config(scaling_factor=0.5)  # the latents the LDM sees change with it
    scaled = weights_sha256(vae)
    assert scaled != digest
    with torch.no_grad():
        next(vae.parameters()).view(-1)[0] += 1e-6
    assert weights_sha256(vae) != scaled


def test_train_ldm_refuses_to_resume_on_another_autoencoder_behind_the_same_path(tmp_path, capsys):
    files_vae = tmp_path / "vae"
    torch.manual_seed(0)
    build_autoencoder(TINY_VAE).save_pretrained(files_vae)
    make_dataset(tmp_path / "data", num_images=8, resolution=32, seed=0)
    files = LDMFiles(tmp_path / "data", files_vae, tmp_path)
    out = tmp_path / "out"
    assert _cli(train_ldm, run_args(files, out, "--max_train_steps", "2", "--checkpointing_steps", "2",
                                    "--validation_steps", "0")) == 0
    saved = json.loads((out / "run_config.json").read_text())
    assert set(saved[LOADED_WEIGHTS]) == {"autoencoder"}  # the from-scratch U-Net and text encoder are seeded

    _replace_vae(files_vae, seed=1)
    _assert_resume_refused(train_ldm, run_args(files, out, "--max_train_steps", "4", "--checkpointing_steps", "2",
                                               "--validation_steps", "0", "--resume_from_checkpoint", "latest"),
                           out, capsys, "other autoencoder weights")

    # the files it started from: it resumes
    _replace_vae(files_vae, seed=0)
    assert _cli(train_ldm, run_args(files, out, "--max_train_steps", "4", "--checkpointing_steps", "2",
                                    "--validation_steps", "0", "--resume_from_checkpoint", "latest")) == 0
    assert [c.name for c in list_checkpoints(out)][-1] == "checkpoint-4"


def test_a_run_saved_before_the_record_resumes_as_before(ldm_files, tmp_path):
    out = tmp_path / "out"
    argv = run_args(ldm_files, out, "--max_train_steps", "2", "--checkpointing_steps", "2", "--validation_steps", "0")
    assert _cli(train_ldm, argv) == 0
    config = json.loads((out / "run_config.json").read_text())
    del config[LOADED_WEIGHTS]
    (out / "run_config.json").write_text(json.dumps(config))
    argv = run_args(ldm_files, out, "--max_train_steps", "3", "--checkpointing_steps", "3", "--validation_steps", "0",
                    "--resume_from_checkpoint", "latest")
    assert _cli(train_ldm, argv) == 0
    assert LOADED_WEIGHTS in json.loads((out / "run_config.json").read_text())  # and it has the record from now on


def test_train_vae_refuses_to_resume_from_another_starting_autoencoder(tmp_path, capsys):
    make_dataset(tmp_path / "data", num_images=8, resolution=32, seed=0)
    start = tmp_path / "start"
    torch.manual_seed(0)
    build_autoencoder(TINY_VAE).save_pretrained(start)
    out = tmp_path / "out"
    argv = ["--config", str(ROOT / "configs" / "vae" / "tiny.yaml"), "--train_data_dir", str(tmp_path / "data"),
            "--output_dir", str(out), "--pretrained_vae", str(start),
            "--set", "train.train_batch_size=2", "--set", "train.checkpointing_steps=2"]
    assert _cli(train_vae, [*argv, "--set", "train.max_train_steps=2"]) == 0
    assert set(json.loads((out / "run_config.json").read_text())[LOADED_WEIGHTS]) == {"autoencoder"}
    _replace_vae(start, seed=1)
    _assert_resume_refused(train_vae, [*argv, "--set", "train.max_train_steps=4", "--resume_from_checkpoint", "latest"],
                           out, capsys, "other autoencoder weights")


def test_a_lora_run_refuses_to_resume_on_another_base_u_net(ldm_files, tiny_pipeline_dir, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    base = shutil.copytree(tiny_pipeline_dir, tmp_path / "base")
    out = tmp_path / "out"
    argv = ["--config", str(CONFIG), "--train_data_dir", str(ldm_files.data), "--pretrained_model",
            str(base), "--output_dir", str(out), "--lora_rank", "4", "--validation_steps", "0",
            "--checkpointing_steps", "2"]
    assert _cli(train_ldm, [*argv, "--max_train_steps", "2"]) == 0
    assert set(json.loads((out / "run_config.json").read_text())[LOADED_WEIGHTS]) == {"autoencoder", "U-Net",
                                                                                       "text encoder"}
    unet = UNet2DConditionModel.from_pretrained(base / "unet")  # the base fine-tuned elsewhere, saved in place
    with torch.no_grad():
        unet.conv_out.bias += 0.01
    unet.save_pretrained(base / "unet")
    _assert_resume_refused(train_ldm, [*argv, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"], out,
                           capsys, "other U-Net weights")


def test_a_resume_on_changed_training_data_goes_on_and_says_it_is_no_longer_exact(ldm_files, tmp_path, caplog):
    data = shutil.copytree(ldm_files.data, tmp_path / "data")
    files = LDMFiles(data, ldm_files.vae, tmp_path)
    out = tmp_path / "out"

    def resume(steps: str) -> list[str]:
        caplog.clear()
        argv = run_args(files, out, "--max_train_steps", steps, "--checkpointing_steps", "2", "--validation_steps", "0",
                        "--resume_from_checkpoint", "latest")
        with caplog.at_level("WARNING", logger="ldm_app.checkpointing"):
            assert _cli(train_ldm, argv) == 0
        return [r.getMessage() for r in caplog.records if "training data changed" in r.getMessage()]

    assert resume("2") == []  # a fresh start
    assert resume("4") == []  # the same rows: nothing to say
    lines = (data / "metadata.jsonl").read_text().splitlines()
    (data / "metadata.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # one image fewer
    warned = resume("6")
    assert len(warned) == 1 and "no longer exactly an uninterrupted run" in warned[0]
    assert [c.name for c in list_checkpoints(out)][-1] == "checkpoint-6"  # it went on
    assert resume("8") == []  # the record now holds the rows it went on with
