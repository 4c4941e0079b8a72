"""What a new user meets when training on their own folder (issue: 64 photos, a CPU machine):

- the tiny configs compose: configs/vae/tiny.yaml makes the f=4 autoencoder configs/ldm/tiny.yaml expects (both
  entry points, as subprocesses, on a folder with .txt caption files and one unreadable image);
- train_ldm.py has a progress bar (ETA, loss, img/s) like train_vae.py, from the shared `TrainProgress`;
- a local folder loads without `datasets`' "Downloading data" bars;
- .txt captions beside the images; unreadable images left out up front with one warning line, none readable is
  one error line;
- a launch that does not fit the machine (GPU config without a GPU, more processes than cores, mixed precision
  that cannot apply) is one warning line per mismatch;
- --report_to picks accelerate's trackers; a missing one is one error line.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ldm_helpers import ROOT, subprocess_env
from PIL import Image

from ldm_app.config import TrainConfig
from ldm_app.data.dataset import build_dataset
from ldm_app.data.shapes import make_dataset
from ldm_app.errors import UserError, run_cli
from ldm_app.training.common import (Machine, TrainProgress, check_launch, check_launchable, check_report_to, log_image,
                                     make_accelerator)

VAE_TINY = str(ROOT / "configs" / "vae" / "tiny.yaml")
LDM_TINY = str(ROOT / "configs" / "ldm" / "tiny.yaml")


def sidecar_folder(src: Path, dest: Path) -> Path:
    """The images of an imagefolder with their captions moved into .txt files beside them (no metadata.jsonl)."""
    dest.mkdir(parents=True)
    for line in (src / "metadata.jsonl").read_text().splitlines():
        record = json.loads(line)
        shutil.copy(src / record["file_name"], dest / record["file_name"])
        (dest / record["file_name"]).with_suffix(".txt").write_text(record["text"] + "\n")
    return dest


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ux_data") / "shapes", num_images=12, resolution=32, seed=0)


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf_cache")  # keep `datasets`' Arrow cache out of the user's home


# ---- the documented smoke run: tiny VAE, then tiny LDM on its output (real entry points) ------------------------


@pytest.fixture(scope="module")
def smoke(shapes, tmp_path_factory):
    """train_vae.py (tiny config, 2 steps) on `shapes`, then train_ldm.py (tiny config, 2 steps) on the same images
    with .txt captions and one unreadable image, with --report_to none. Returns (root, vae run, ldm run)."""
    root = tmp_path_factory.mktemp("smoke")
    env = {**subprocess_env(), "HF_DATASETS_CACHE": str(root / "hf_cache")}

    def run(script: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, env=env,
                              cwd=ROOT, timeout=240)

    vae = run("train_vae.py", "--config", VAE_TINY, "--train_data_dir", str(shapes), "--output_dir",
              str(root / "vae"), "--max_train_steps", "2")
    captioned = sidecar_folder(shapes, root / "captioned")
    (captioned / "broken.png").write_bytes(b"not an image")
    (captioned / "broken.txt").write_text("a broken file")
    ldm = run("train_ldm.py", "--config", LDM_TINY, "--train_data_dir", str(captioned), "--pretrained_vae",
              str(root / "vae" / "vae"), "--output_dir", str(root / "ldm"), "--max_train_steps", "2",
              "--checkpointing_steps", "2", "--report_to", "none")
    return root, vae, ldm


def test_tiny_vae_feeds_tiny_ldm(smoke):
    root, vae, ldm = smoke
    assert vae.returncode == 0, vae.stderr[-3000:]
    assert ldm.returncode == 0, ldm.stderr[-3000:]
    assert len(json.loads((root / "vae" / "vae" / "config.json").read_text())["block_out_channels"]) == 3  # f=4
    assert json.loads((root / "ldm" / "unet" / "config.json").read_text())["sample_size"] == 8
    assert (root / "ldm" / "model_index.json").is_file()


def test_train_ldm_shows_a_progress_bar_like_train_vae(smoke):
    _, vae, ldm = smoke
    assert "train_vae: 100%" in vae.stderr and "loss=" in vae.stderr
    bar = [line for line in ldm.stderr.replace("\r", "\n").splitlines() if line.startswith("train_ldm: 100%")]
    assert bar, ldm.stderr[-3000:]
    assert "2/2" in bar[-1] and "step/s" in bar[-1] and "loss=" in bar[-1] and "img/s=" in bar[-1], bar[-1]


def test_a_local_folder_loads_without_download_bars(smoke):
    _, vae, ldm = smoke
    for proc in (vae, ldm):
        assert "Downloading data" not in proc.stderr and "Generating train split" not in proc.stderr, proc.stderr


def test_unreadable_image_is_one_warning_line_and_training_goes_on(smoke):
    root, _, ldm = smoke
    lines = [line for line in ldm.stderr.splitlines() if "unreadable" in line]
    assert len(lines) == 1, lines
    assert "skipped 1 unreadable images of 13" in lines[0] and "first: " in lines[0], lines[0]
    assert str(root / "captioned" / "broken.png") in lines[0] and "cannot identify image file" in lines[0]


def test_report_to_none_and_tensorboard(smoke):
    root, _, _ = smoke
    assert any((root / "vae" / "logs").rglob("events.out.tfevents.*"))  # the default: TensorBoard
    assert not (root / "ldm" / "logs").exists()  # --report_to none


# ---- .txt captions and unreadable images (in process) -------------------------------------------------------


def test_txt_captions_beside_the_images(shapes, tmp_path, cache):
    folder = sidecar_folder(shapes, tmp_path / "captioned")
    (folder / "000003.txt").write_bytes("\ufeffa red circle\nnear the top  \n\n".encode())  # BOM, two lines
    ds = build_dataset(str(folder), None, 32, cache_dir=cache)
    expected = [json.loads(line)["text"] for line in (shapes / "metadata.jsonl").read_text().splitlines()]
    expected[3] = "a red circle near the top"
    assert [Path(ds.image_name(i)).name for i in range(len(ds))] == sorted(p.name for p in folder.glob("*.png"))
    assert ds.captions == expected
    assert ds[3]["caption"] == "a red circle near the top"


def _error(*args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        build_dataset(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_caption_problems_are_one_line(shapes, tmp_path, cache):
    folder = sidecar_folder(shapes, tmp_path / "captioned")
    (folder / "000005.txt").unlink()
    message = _error(str(folder), None, 32, cache_dir=cache)
    assert "1 of 12 images" in message and "000005.png has no 000005.txt" in message
    (folder / "000005.txt").write_bytes(b"caf\xe9")
    assert "000005.txt is not UTF-8" in _error(str(folder), None, 32, cache_dir=cache)

    bare = tmp_path / "bare"  # images only: neither metadata.jsonl nor caption files
    bare.mkdir()
    shutil.copy(shapes / "000000.png", bare)
    message = _error(str(bare), None, 32, cache_dir=cache)
    assert "has no metadata.jsonl and no .txt caption files" in message and "0001.png + 0001.txt" in message


def test_unreadable_images_are_left_out_up_front(shapes, tmp_path, cache, caplog):
    folder = tmp_path / "broken"
    shutil.copytree(shapes, folder)
    (folder / "000002.png").write_bytes(b"garbage")
    (folder / "000007.png").unlink()  # listed in metadata.jsonl but missing
    ds = build_dataset(str(folder), None, 32, cache_dir=cache)
    with caplog.at_level(logging.WARNING):
        kept = ds.readable("the folder")
    assert len(caplog.records) == 1, caplog.text
    message = caplog.records[0].getMessage()
    assert message.startswith("skipped 2 unreadable images of 12 in the folder: first: ")
    assert str(folder / "000002.png") in message and "(cannot identify image file" in message
    names = [Path(kept.image_name(i)).name for i in range(len(kept))]
    assert names == [f"{i:06d}.png" for i in range(12) if i not in (2, 7)]
    assert [kept[i]["caption"] for i in range(len(kept))] == [ds.captions[i] for i in range(12) if i not in (2, 7)]
    again = build_dataset(str(folder), None, 32, cache_dir=cache).readable("the folder")  # the same rows: resume
    assert [again.image_name(i) for i in range(len(again))] == [kept.image_name(i) for i in range(len(kept))]
    clean = build_dataset(str(shapes), None, 32, cache_dir=cache)
    assert clean.readable("shapes") is clean


def test_a_truncated_jpeg_is_caught_by_the_reduced_scale_check(tmp_path, cache):
    folder = tmp_path / "photos"
    folder.mkdir()
    noise = Image.effect_noise((512, 384), 60).convert("RGB")
    noise.save(folder / "a.jpg", quality=90)
    data = (folder / "a.jpg").read_bytes()
    (folder / "b.jpg").write_bytes(data[: len(data) // 2])
    for name in ("a", "b"):
        (folder / f"{name}.txt").write_text(f"photo {name}")
    kept = build_dataset(str(folder), None, 32, cache_dir=cache).readable("photos")
    assert [Path(kept.image_name(i)).name for i in range(len(kept))] == ["a.jpg"]
    assert kept[0]["pixel_values"].shape == (3, 32, 32)


def test_no_readable_image_is_one_error_line(tmp_path, cache):
    folder = tmp_path / "junk"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(b"junk")
        (folder / f"{i}.txt").write_text("a caption")
    with pytest.raises(UserError) as info:
        build_dataset(str(folder), None, 32, cache_dir=cache).readable(str(folder))
    message = str(info.value)
    assert "\n" not in message and "no readable image in" in message and "3 of 3 skipped" in message
    assert "first: 0.png: cannot identify image file" in message


def test_datasets_progress_bars_are_restored_after_a_local_load(shapes, cache, capfd):
    import datasets

    assert datasets.is_progress_bar_enabled()
    build_dataset(str(shapes), None, 32, cache_dir=cache)
    err = capfd.readouterr().err
    assert "Downloading data" not in err and "Generating train split" not in err
    assert datasets.is_progress_bar_enabled()  # hub loads (real downloads) keep their bars


# ---- the progress bar -------------------------------------------------------------------------------------


def test_progress_bar_reads_figures_only_when_it_redraws(capsys):
    calls = []

    def figures():
        calls.append(1)
        return {"loss": 0.25}

    with TrainProgress("demo", total=5, initial=1, images_per_step=8, enabled=True) as bar:
        for _ in range(4):
            bar.update(figures)
    err = capsys.readouterr().err
    assert len(calls) == 1  # not a terminal: redrawn every 30 s, and at the last step
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("demo: 100%") and "5/5" in last and "loss=0.25" in last and "img/s=" in last, last

    with TrainProgress("other", total=3, initial=0, images_per_step=8, enabled=False) as bar:  # not main process
        for _ in range(3):
            bar.update(figures)
    assert len(calls) == 1 and "other" not in capsys.readouterr().err


# ---- launches that do not fit the machine -------------------------------------------------------------------

CPU_2 = Machine(cuda=False, gpus=0, gpu_bf16=False, cores=2)
# what `accelerate launch --config_file configs/accelerate/ddp.yaml` set in each process (measured on this machine)
DDP_8 = {"ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_DYNAMO_BACKEND": "NO", "WORLD_SIZE": "8",
         "LOCAL_WORLD_SIZE": "8", "RANK": "0"}


def test_gpu_launch_config_on_a_two_core_cpu_machine():
    precision, on_cpu, warnings = check_launch("no", False, DDP_8, CPU_2)
    assert precision == "no" and on_cpu and len(warnings) == 3, warnings
    gpu, cores, mixed = warnings
    assert gpu.startswith("GPU launch without a GPU: accelerate launch of 8 processes") and "runs on the CPU" in gpu
    assert cores.startswith("more processes than CPU cores: 8 training processes on 2 core(s)")
    assert "asks for bf16" in mixed and "precision is 'no'" in mixed and "--mixed_precision bf16" in mixed


@pytest.mark.parametrize("precision, machine, env, want, words", [
    ("fp16", CPU_2, {}, "no", ["fp16 is not available", "needs a GPU", "precision is 'no'", "bf16 works"]),
    ("bf16", Machine(True, 1, False, 8), {}, "no", ["bf16 is not available", "does not support bf16"]),
    ("no", Machine(True, 2, True, 8), {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}, "no",
     ["more processes than GPUs: 4 training processes on 2 GPU(s)"]),
    ("no", CPU_2, {"CUDA_VISIBLE_DEVICES": "0"}, "no", ["GPU launch without a GPU: CUDA_VISIBLE_DEVICES=0"]),
    ("no", CPU_2, {"ACCELERATE_USE_DEEPSPEED": "true"}, "no", ["GPU launch without a GPU: DeepSpeed"]),
    ("no", CPU_2, {"ACCELERATE_USE_FSDP": "true"}, "no", ["GPU launch without a GPU: FSDP", "plain DDP"]),
])
def test_each_mismatch_is_one_warning(precision, machine, env, want, words):
    got, _, warnings = check_launch(precision, False, env, machine)
    assert got == want and len(warnings) == 1, warnings
    assert all(w in warnings[0] for w in words), warnings[0]


@pytest.mark.parametrize("precision, cpu, env, machine", [
    ("no", False, {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, CPU_2),  # torchrun --nproc_per_node 2 on 2 cores
    ("bf16", False, {}, CPU_2),  # bf16 autocast works on the CPU
    ("bf16", False, {"ACCELERATE_MIXED_PRECISION": "bf16", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8"},
     Machine(True, 8, True, 64)),  # ddp.yaml where it belongs, with --mixed_precision bf16
    ("no", True, {"ACCELERATE_MIXED_PRECISION": "no"}, Machine(True, 1, True, 8)),  # --cpu on a GPU machine
])
def test_a_launch_that_fits_has_no_warning(precision, cpu, env, machine):
    got, _, warnings = check_launch(precision, cpu, env, machine)
    assert got == precision and warnings == []


# what `accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2` sets that matters here
FSDP_2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_SYNC_MODULE_STATES": "true", "FSDP_VERSION": "1", "WORLD_SIZE": "2",
          "LOCAL_WORLD_SIZE": "2"}


def test_fsdp_that_torch_refuses_on_cpus_is_one_line_before_the_run_folder(shapes, tmp_path, monkeypatch, capsys,
                                                                           cache):  # fmt: skip
    """fsdp.yaml's sync_module_states on a machine without a GPU: torch stopped both processes in its own
    RuntimeError; now one line before anything is written. Launches torch runs are let through."""
    with pytest.raises(UserError, match="needs GPUs .* torchrun --nproc_per_node"):
        check_launchable(False, FSDP_2, CPU_2)
    for fits, machine in (({**FSDP_2, "FSDP_SYNC_MODULE_STATES": "false"}, CPU_2),  # runs, as plain DDP
                          ({**FSDP_2, "FSDP_VERSION": "2"}, CPU_2),  # FSDP2 has no sync_module_states
                          ({**FSDP_2, "ACCELERATE_USE_CPU": "true"}, CPU_2),  # --cpu: one process, no FSDP
                          ({**FSDP_2, "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}, CPU_2),
                          (FSDP_2, Machine(True, 2, True, 16))):  # where it belongs
        check_launchable(False, fits, machine)
    check_launchable(True, FSDP_2, CPU_2)  # the trainer's --cpu
    for name, value in FSDP_2.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(Machine, "here", classmethod(lambda cls: CPU_2))
    monkeypatch.setenv("HF_DATASETS_CACHE", cache)
    out = tmp_path / "run"
    from ldm_app.training import vae as train_vae

    code = run_cli(train_vae.main, ["--config", VAE_TINY, "--train_data_dir", str(shapes), "--output_dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "FSDP launch with fsdp_sync_module_states needs GPUs" in err[0], err
    assert not out.exists()


def test_make_accelerator_applies_and_logs_the_checks(tmp_path, monkeypatch, caplog, fresh_accelerate):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # a launch config's bf16, one process
    with caplog.at_level(logging.WARNING, logger="ldm_app.training.common"):
        acc = make_accelerator(TrainConfig(mixed_precision="fp16"), tmp_path, report_to="none", machine=CPU_2)
    assert acc.mixed_precision == "no"  # fp16 cannot apply on the CPU: accelerate would accept and ignore it
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "mixed precision fp16 is not available" in messages[0], messages
    assert acc.trackers == []


# ---- --report_to --------------------------------------------------------------------------------------------


def test_report_to_a_missing_tracker_is_one_error_line(tmp_path, monkeypatch, capsys):
    import accelerate.utils

    from ldm_app.training import ldm, vae

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    with pytest.raises(UserError, match="--report_to wandb needs the wandb package"):
        check_report_to("wandb")
    check_report_to("none")
    check_report_to("all")
    for main, extra in ((vae.main, []), (ldm.main, ["--pretrained_vae", str(tmp_path)])):
        out = tmp_path / "out"
        assert run_cli(main, ["--config", VAE_TINY if main is vae.main else LDM_TINY, "--train_data_dir",
                              str(tmp_path), "--output_dir", str(out), "--report_to", "wandb", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [err[0]] and err[0].startswith("error: --report_to wandb needs the wandb package"), err
        assert not out.exists()


def test_validation_image_goes_to_tensorboard(tmp_path, fresh_accelerate):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = Accelerator(log_with="tensorboard", project_config=ProjectConfiguration(
        project_dir=str(tmp_path), logging_dir=str(tmp_path / "logs")))
    acc.init_trackers("t")
    log_image(acc, "validation", Image.new("RGB", (24, 16), (255, 0, 0)), 7)
    acc.end_training()
    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    (image,) = events.Images("validation")
    assert image.step == 7 and (image.width, image.height) == (24, 16)

