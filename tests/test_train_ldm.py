"""train_ldm.py end to end on tiny CPU models: the loss goes down, checkpoints and the output folder load as
pipelines (with the EMA weights), a run killed with SIGKILL resumes to the same weights, and bad input is one
`error:` line with exit status 2, before any work.

"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ldm_helpers import (
    CONFIG,
    LDMFiles,
    ROOT,
    kill_after_first_checkpoint,
    max_abs_diff,
    run_args,
    subprocess_env,
    swallow_a_stop_in,
    weights,
)

from ldm_app.checkpointing import list_checkpoints, resolve_resume, write_run_config
from ldm_app.config import to_dict
from ldm_app.errors import run_cli
from ldm_app.training.ldm import LDMRunConfig, main

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


# ---- one trained run, inspected by several tests -------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(ldm_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    argv = run_args(ldm_files, out, "--max_train_steps", "30", "--checkpointing_steps", "15",
                    "--validation_steps", "15", "--validation_prompts", "a red circle",
                    "--validation_prompts", "a blue square", "--set", "train.learning_rate=3e-3")
    torch.set_num_threads(1)
    result = main(argv)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return out, result


def test_a_few_steps_reduce_the_loss(trained):
    _, result = trained
    assert result.step == 30 and len(result.losses) == 30
    first, last = sum(result.losses[:8]) / 8, sum(result.losses[-8:]) / 8
    assert last < 0.85 * first, (first, last)


def test_checkpoints_and_output_load_as_pipelines_with_ema_weights(trained):
    from ldm_app.pipeline import LatentDiffusionPipeline

    out, _ = trained
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-15", "checkpoint-30"]
    for folder in (out / "checkpoint-15", out):
        pipe = LatentDiffusionPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        images = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                      output_type="np").images
        assert images.shape == (1, 32, 32, 3) and float(images.std()) > 0
    # the pipeline's U-Net holds the EMA weights, which differ from the raw trained weights
    ema = weights(out / "checkpoint-30" / "ema.safetensors")
    unet = weights(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert max_abs_diff({k: ema[f"unet.{k}"] for k in unet}, unet) == 0
    raw = weights(out / "checkpoint-30" / "model.safetensors")
    assert max_abs_diff(raw, unet) > 1e-4
    assert json.loads((out / "checkpoint-30" / "training_state.json").read_text())["step"] == 30
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-0000015.png", "step-0000030.png"]
    assert any((out / "logs").rglob("events.out.tfevents.*"))


def test_output_loads_in_diffusers_stable_diffusion_pipeline(trained):
    from diffusers import StableDiffusionPipeline

    out, _ = trained
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(trained, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    (out / "checkpoint-30" / "model.safetensors").write_bytes(b"truncated")
    result = main(run_args(trained_files(trained), out, "--max_train_steps", "31", "--checkpointing_steps", "15",
                           "--resume_from_checkpoint", "latest", "--set", "train.learning_rate=3e-3"))
    assert "checkpoint-30 is corrupt" in caplog.text
    assert result.step == 31 and len(result.losses) == 16  # resumed at step 15


def trained_files(trained) -> LDMFiles:
    cfg = json.loads((trained[0] / "run_config.json").read_text())
    return LDMFiles(Path(cfg["data"]["train_data_dir"]), Path(cfg["ldm"]["pretrained_vae"]), trained[0].parent)


# ---- exact resume after SIGKILL --------------------------------------------------------------------------------


def test_resume_after_sigkill_ends_with_the_same_weights(ldm_files, tmp_path):
    # accumulation 2 over 4 batches an epoch: checkpoint-5 is mid-epoch (epoch 2, batch 2)
    extra = ("--max_train_steps", "10", "--checkpointing_steps", "5", "--gradient_accumulation_steps", "2")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    main(run_args(ldm_files, straight, *extra))

    kill_after_first_checkpoint([sys.executable, str(ROOT / "train_ldm.py"), *run_args(ldm_files, killed, *extra)],
                                killed, tmp_path / "killed.log")
    assert not (killed / "model_index.json").exists()  # killed before the end

    result = main(run_args(ldm_files, killed, *extra, "--resume_from_checkpoint", "latest"))
    assert result.step == 10 and len(result.losses) == 5  # resumed from checkpoint-5
    assert json.loads((killed / "checkpoint-5" / "training_state.json").read_text())["batch"] == 2
    for name in ("model.safetensors", "model_1.safetensors", "ema.safetensors"):
        a, b = weights(straight / "checkpoint-10" / name), weights(killed / "checkpoint-10" / name)
        assert max_abs_diff(a, b) <= 1e-5, name
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert max_abs_diff(weights(straight / unet), weights(killed / unet)) <= 1e-5


# ---- bad input: one line, exit 2, before any work ------------------------------------------------------------


def cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    rc = run_cli(main, argv)
    return rc, capsys.readouterr().err.strip().splitlines()


def assert_one_error_line(rc: int, lines: list[str], *words: str) -> None:
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    for w in words:
        assert w in lines[0], lines[0]


def test_bad_input_from_the_command_line_is_one_line_without_traceback(ldm_files, tmp_path):
    argv = run_args(ldm_files, tmp_path / "out", "--set", "train.no_such_key=1")
    proc = subprocess.run([sys.executable, str(ROOT / "train_ldm.py"), *argv], capture_output=True, text=True,
                          env=subprocess_env(), cwd=ROOT, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert_one_error_line(proc.returncode, lines, "no_such_key")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["missing_data", "empty_data", "not_a_vae", "missing_vae", "unknown_key",
                                  "channel_mismatch", "size_mismatch", "negative_seed", "huge_seed",
                                  "cache_dir_is_a_file", "vae_is_a_file", "digits_for_text"])
def test_bad_input_is_a_one_line_error(case, ldm_files, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not a model")
    files, extra, words = ldm_files, [], []
    if case == "missing_data":
        files, words = LDMFiles(tmp_path / "nope", ldm_files.vae, tmp_path), ["nope"]
    elif case == "empty_data":
        files, words = LDMFiles(tmp_path / "empty", ldm_files.vae, tmp_path), ["empty"]
    elif case == "not_a_vae":
        files, words = LDMFiles(ldm_files.data, tmp_path / "junk", tmp_path), ["junk"]
    elif case == "missing_vae":
        files, words = LDMFiles(ldm_files.data, tmp_path / "novae", tmp_path), ["novae"]
    elif case == "unknown_key":
        extra, words = ["--set", "ldm.captoin_dropout=0.2"], ["captoin_dropout"]
    elif case == "channel_mismatch":
        extra, words = ["--set", "unet.in_channels=3"], ["in_channels", "latent channels (4)"]
    elif case == "size_mismatch":
        extra, words = ["--set", "unet.sample_size=16"], ["sample_size"]
    elif case in ("negative_seed", "huge_seed"):  # numpy / torch tracebacks before
        seed = "-1" if case == "negative_seed" else str(10**20)
        extra, words = ["--seed", seed], ["seed", seed, "4294967295"]
    elif case == "vae_is_a_file":
        files, words = LDMFiles(ldm_files.data, tmp_path / "junk" / "notes.txt", tmp_path), ["is a file"]
    elif case == "digits_for_text":  # YAML reads 0123 as the octal number 83
        extra, words = ["--set", "data.caption_column=0123"], ["data.caption_column must be text", "quote it"]
    elif case == "cache_dir_is_a_file":  # a FileExistsError traceback before, after encoding the whole cache
        extra, words = ["--cache_latents", "--cache_dir", str(tmp_path / "junk" / "notes.txt")], ["is a file"]
    rc, lines = cli(run_args(files, tmp_path / "out", *extra), capsys)
    assert_one_error_line(rc, lines, *words)
    assert not (tmp_path / "out").exists()


def test_output_dir_of_another_run_is_refused(ldm_files, tmp_path, capsys):
    out = tmp_path / "out"
    other = to_dict(LDMRunConfig())
    write_run_config(out, other)
    rc, lines = cli(run_args(ldm_files, out), capsys)
    assert_one_error_line(rc, lines, "different run")
    (out / "checkpoint-5").mkdir()  # un-resumed work must not be silently overwritten
    rc, lines = cli(run_args(ldm_files, out), capsys)
    assert_one_error_line(rc, lines, "--resume_from_checkpoint")


def test_corrupt_checkpoint_given_explicitly_is_refused(ldm_files, tmp_path, capsys):
    ckpt = tmp_path / "out" / "checkpoint-3"
    ckpt.mkdir(parents=True)
    (ckpt / "training_state.json").write_text("{not json")
    rc, lines = cli(run_args(ldm_files, tmp_path / "out", "--resume_from_checkpoint", str(ckpt)), capsys)
    assert_one_error_line(rc, lines, "cannot be resumed")


def test_resume_latest_without_checkpoints_starts_fresh(ldm_files, tmp_path, caplog):
    result = main(run_args(ldm_files, tmp_path / "out", "--max_train_steps", "2", "--resume_from_checkpoint",
                           "latest"))
    assert result.step == 2 and len(result.losses) == 2
    assert "no checkpoint" in caplog.text


def fine_tune_args(trained, out: Path, *extra: str) -> list[str]:
    """train_ldm.py arguments that fine-tune the module's trained pipeline folder on its own data."""
    return ["--config", str(CONFIG), "--train_data_dir", str(trained_files(trained).data), "--pretrained_model",
            str(trained[0]), "--output_dir", str(out), *extra]


def test_fine_tune_from_a_pipeline_folder(trained, tmp_path):
    src = trained[0]
    argv = fine_tune_args(trained, tmp_path / "ft", "--max_train_steps", "2", "--set", "ldm.use_ema=false")
    assert main(argv).step == 2
    before = weights(src / "unet" / "diffusion_pytorch_model.safetensors")
    after = weights(tmp_path / "ft" / "unet" / "diffusion_pytorch_model.safetensors")
    assert 0 < max_abs_diff(before, after) < 0.05  # started from the pipeline's weights, then trained 2 steps
    text = "text_encoder/model.safetensors"
    assert max_abs_diff(weights(src / text), weights(tmp_path / "ft" / text)) == 0  # frozen when fine-tuning


def test_a_fine_tune_keeps_the_base_models_stored_sampling_unless_the_config_sets_it(trained, tmp_path):
    from ldm_app.pipeline import read_sampling_defaults, write_sampling_defaults

    base = tmp_path / "base"
    shutil.copytree(trained[0], base)
    stored = {"sampler": "dpm++", "num_inference_steps": 3, "guidance_scale": 1.0, "timesteps": [999, 500, 100]}
    write_sampling_defaults(base, stored)  # a guidance-distilled model's, sampled at guidance 1 on a grid
    config = tmp_path / "no_validation_keys.yaml"  # configs/ldm/tiny.yaml less its validation sampling keys
    config.write_text("".join(line for line in CONFIG.read_text().splitlines(keepends=True)
                              if not line.strip().startswith(("validation_sampler", "validation_num", "validation_guid"))))
    common = ["--train_data_dir", str(trained_files(trained).data), "--pretrained_model", str(base),
              "--max_train_steps", "1", "--set", "ldm.use_ema=false"]
    main(["--config", str(config), *common, "--output_dir", str(tmp_path / "kept")])
    assert read_sampling_defaults(tmp_path / "kept") == stored
    main(["--config", str(CONFIG), *common, "--output_dir", str(tmp_path / "set")])  # the config's own keys win
    assert read_sampling_defaults(tmp_path / "set") == {"sampler": "ddim", "num_inference_steps": 4,
                                                         "guidance_scale": 3.0}


# ---- --train_text_encoder: full fine-tuning of the text encoder too -------------------------------------------


def test_fine_tune_with_train_text_encoder_trains_it_and_resumes_exactly(trained, tmp_path):
    """The text encoder of --pretrained_model trains with the U-Net; the output loads in diffusers with the trained
    text encoder; a run resumed from its step-2 checkpoint ends with the same weights as the straight run."""
    from diffusers import StableDiffusionPipeline

    src = trained[0]
    text = "text_encoder/model.safetensors"

    def argv(out: Path, *extra: str) -> list[str]:
        return fine_tune_args(trained, out, "--max_train_steps", "4", "--checkpointing_steps", "2",
                              "--train_text_encoder", "--set", "train.learning_rate=1e-3", *extra)

    straight = tmp_path / "straight"
    assert main(argv(straight)).step == 4
    assert json.loads((straight / "run_config.json").read_text())["ldm"]["train_text_encoder"] is True
    trained_text = weights(straight / text)
    assert 0 < max_abs_diff(weights(src / text), trained_text) < 0.05
    pipe = StableDiffusionPipeline.from_pretrained(straight, safety_checker=None, requires_safety_checker=False)
    assert max_abs_diff(dict(pipe.text_encoder.state_dict()), trained_text) == 0

    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for name in ("checkpoint-4", "text_encoder", "unet", "model_index.json"):
        path = resumed / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    result = main(argv(resumed, "--resume_from_checkpoint", "latest"))
    assert result.step == 4 and len(result.losses) == 2  # resumed at step 2
    assert max_abs_diff(weights(resumed / text), trained_text) <= 1e-6
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert max_abs_diff(weights(resumed / unet), weights(straight / unet)) <= 1e-6


@pytest.mark.parametrize("case", ["from_scratch", "with_lora", "with_embedding"])
def test_train_text_encoder_refusals(case, trained, ldm_files, tmp_path, capsys):
    out = tmp_path / "out"
    if case == "from_scratch":
        argv, words = run_args(ldm_files, out, "--train_text_encoder"), ["--train_text_encoder", "--pretrained_model"]
    else:
        extra = ["--lora_rank", "2"] if case == "with_lora" else ["--train_embedding", "<new>"]
        argv = fine_tune_args(trained, out, "--train_text_encoder", *extra)
        words = ["--train_text_encoder", "--lora_text_encoder" if case == "with_lora" else "--train_embedding"]
    rc, lines = cli(argv, capsys)
    assert_one_error_line(rc, lines, *words)
    assert not out.exists()


# ---- the output folder never overwrites what the run starts from, or a model no run made -------------------------


def folder_digest(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_output_dir_that_is_or_holds_a_source_or_a_foreign_model_is_refused_untouched(ldm_files, tmp_path, capsys):
    vae_copy = tmp_path / "mine" / "vae"
    shutil.copytree(ldm_files.vae, vae_copy)
    (tmp_path / "mine" / "notes.txt").write_text("my model")
    before = folder_digest(tmp_path / "mine")
    args = ["--config", str(CONFIG), "--train_data_dir", str(ldm_files.data), "--pretrained_vae", str(vae_copy)]
    for out, words in ((vae_copy, ("is --pretrained_vae",)), (tmp_path / "mine", ("holds --pretrained_vae",))):
        rc, lines = cli([*args, "--output_dir", str(out)], capsys)
        assert_one_error_line(rc, lines, str(out), *words, "write over the weights it starts from")
    # a model folder that no run made (save_pretrained's: no run_config.json), given as the output of another run
    foreign = tmp_path / "foreign"
    shutil.copytree(ldm_files.vae, foreign / "vae")
    rc, lines = cli(run_args(ldm_files, foreign), capsys)
    assert_one_error_line(rc, lines, "holds a model (vae/config.json) that no training run made")
    assert folder_digest(tmp_path / "mine") == before and not (foreign / ".lock").exists()


def test_output_dir_inside_the_data_folder_is_refused_untouched(ldm_files, tmp_path, capsys):
    """The data reader takes every image under --train_data_dir: a run folder inside it would add the run's
    validation grids to the data of the next run (or of this one, resumed)."""
    data = tmp_path / "data"
    shutil.copytree(ldm_files.data, data)
    before = folder_digest(data)
    for out in (data / "runs" / "ldm", data):
        rc, lines = cli(run_args(ldm_files, out, "--train_data_dir", str(data)), capsys)
        assert_one_error_line(rc, lines, str(out), "inside --train_data_dir", "read as training data")
    assert folder_digest(data) == before


def test_an_older_checkpoint_is_not_resumed_under_newer_ones_and_pruning_keeps_the_good(ldm_files, tmp_path, capsys,
                                                                                        caplog):  # fmt: skip
    out = tmp_path / "out"
    main(run_args(ldm_files, out, "--max_train_steps", "4", "--checkpointing_steps", "2"))
    assert main(run_args(ldm_files, out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")).step == 4
    assert "at step 4 already, at or past max_train_steps 3: nothing to train" in caplog.text
    capsys.readouterr()  # the runs' progress bars
    rc, lines = cli(run_args(ldm_files, out, "--max_train_steps", "6", "--resume_from_checkpoint",
                             str(out / "checkpoint-2")), capsys)  # fmt: skip
    assert_one_error_line(rc, lines, "older than checkpoint-4", "fork the run")
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    # a corrupt newest checkpoint: `latest` falls back to the one below it, and saving on from there must not
    # count the corrupt one (it would prune the good ones and keep itself)
    (out / "checkpoint-4" / "training_state.json").write_text("{")
    main(run_args(ldm_files, out, "--max_train_steps", "3", "--checkpointing_steps", "1", "--resume_from_checkpoint",
                  "latest", "--set", "train.checkpoints_total_limit=1"))  # fmt: skip
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3", "checkpoint-4"]
    assert resolve_resume(out, "latest") == out / "checkpoint-3"
    main(run_args(ldm_files, out, "--max_train_steps", "5", "--checkpointing_steps", "1", "--resume_from_checkpoint",
                  "latest", "--set", "train.checkpoints_total_limit=1"))  # fmt: skip
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-5"]  # step 4's save replaced the corrupt one


def test_a_checkpoint_of_another_run_is_refused(ldm_files, tmp_path, capsys):
    first = tmp_path / "first"
    main(run_args(ldm_files, first, "--max_train_steps", "2", "--checkpointing_steps", "2"))
    capsys.readouterr()  # the run's progress bar
    rc, lines = cli(run_args(ldm_files, tmp_path / "other", "--max_train_steps", "4", "--set", "train.seed=5",
                             "--resume_from_checkpoint", str(first / "checkpoint-2")), capsys)  # fmt: skip
    assert_one_error_line(rc, lines, "is of a different run", "train.seed")
    lone = tmp_path / "lone" / "checkpoint-2"
    shutil.copytree(first / "checkpoint-2", lone)  # no run_config.json beside it
    rc, lines = cli(run_args(ldm_files, tmp_path / "other", "--resume_from_checkpoint", str(lone)), capsys)
    assert_one_error_line(rc, lines, "which run it belongs to is unknown")
    result = main(run_args(ldm_files, tmp_path / "branch", "--max_train_steps", "4", "--resume_from_checkpoint",
                           str(first / "checkpoint-2")))  # the same run's config: a branch of it, allowed
    assert result.step == 4


def test_a_stop_swallowed_during_a_step_ends_the_run_before_the_next(ldm_files, tmp_path, monkeypatch):
    """A SIGTERM whose exception C code cleared (as numpy can, ldm_app.errors) stops training at the next step:
    exit status 143, no step after it, no final pipeline written as if the run had finished."""
    import signal

    from ldm_app.training.ldm import LDMTrainer

    calls = swallow_a_stop_in(monkeypatch, LDMTrainer, "train_step", signal.SIGTERM)
    out = tmp_path / "run"
    assert run_cli(main, run_args(ldm_files, out, "--max_train_steps", "6", "--checkpointing_steps", "3")) == 143
    assert len(calls) == 2 and not (out / "model_index.json").exists() and not list_checkpoints(out)
