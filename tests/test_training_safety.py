"""Nothing lost, nothing silently wrong: the trainers and their data under bad conditions.

- unreadable data ends with one error line, never a hang; a few readable images still train (with a count);
- image modes (16-bit, float, alpha, palette, CMYK, 1-bit) decode to the pixels they mean, or are refused;
- a run folder is locked while a trainer writes into it, and a killed run leaves no stale lock;
- a full disk while checkpointing is one error line naming the path, leaves no .tmp, keeps earlier checkpoints;
- bad input (non-UTF-8 files, NaN settings, batch size 0, read-only outputs, a huge resolution, the wrong kind of
  model folder) is one `error:` line with exit status 2 and leaves nothing behind.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ldm_helpers import CONFIG as LDM_TINY
from ldm_helpers import ROOT, run_args, subprocess_env
from PIL import Image

from ldm_app.checkpointing import LOCK_FILE, check_checkpoint, list_checkpoints, resolve_resume
from ldm_app.data.dataset import build_dataset, to_rgb
from ldm_app.data.shapes import make_dataset
from ldm_app.errors import UserError, run_cli

VAE_TINY = str(ROOT / "configs" / "vae" / "tiny.yaml")


# ---- helpers -------------------------------------------------------------------------------------------------


def one_error_line(rc: int, err: str, *words: str) -> str:
    """Exit status 2 and exactly one stderr line, `error: ...`, holding `words`; returns that line."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err[-3000:]
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def cli(main, argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = run_cli(main, argv)
    return rc, capsys.readouterr().err


def vae_main(argv):
    from ldm_app.training.vae import main

    return main(argv)


def ldm_main(argv):
    from ldm_app.training.ldm import main

    return main(argv)


def eval_main(argv):
    from ldm_app.evaluate import main

    return main(argv)


def vae_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", VAE_TINY, "--train_data_dir", str(data), "--output_dir", str(out), *extra]


def script(name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / name), *args], capture_output=True, text=True,
                          env=subprocess_env(), cwd=ROOT, timeout=timeout)


def image_folder(folder: Path, images: dict[str, Image.Image | bytes]) -> Path:
    """An imagefolder: each image saved under its name (bytes written as they are), one caption each."""
    folder.mkdir(parents=True)
    with (folder / "metadata.jsonl").open("w") as f:
        for name, image in images.items():
            if isinstance(image, bytes):
                (folder / name).write_bytes(image)
            else:
                image.save(folder / name)
            f.write(json.dumps({"file_name": name, "text": f"image {name}"}) + "\n")
    return folder


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safety_data") / "shapes"
    make_dataset(out, num_images=12, resolution=32, seed=0)
    return out


@pytest.fixture(scope="module")
def unreadable(tmp_path_factory) -> Path:
    """12 files listed in metadata.jsonl, none of them an image."""
    return image_folder(tmp_path_factory.mktemp("unreadable") / "data",
                        {f"{i:02d}.png": b"not an image" for i in range(12)})


def corrupt_all_but(src: Path, dest: Path, keep: int) -> Path:
    shutil.copytree(src, dest)
    for png in sorted(dest.glob("*.png"))[keep:]:
        png.write_bytes(b"garbage")
    return dest


# ---- 1. unreadable data: an error, never a hang ----------------------------------------------------------------


@pytest.mark.parametrize("trainer", ["train_vae.py", "train_ldm.py"])
def test_a_folder_of_unreadable_images_is_an_error_not_a_hang(trainer, unreadable, ldm_files, tmp_path):
    out = tmp_path / "out"
    if trainer == "train_vae.py":
        args = vae_args(unreadable, out, "--set", "data.holdout_fraction=0")
    else:
        args = ["--config", str(LDM_TINY), "--train_data_dir", str(unreadable), "--pretrained_vae",
                str(ldm_files.vae), "--output_dir", str(out)]
    proc = script(trainer, *args, timeout=90)  # hung forever before (killed at 60 s / 180 s)
    one_error_line(proc.returncode, proc.stderr, "no readable image in", str(unreadable), "12 of 12 skipped",
                   "first: 00.png: cannot identify image file")
    assert not out.exists()  # refused before the output folder was touched


def test_a_few_readable_images_still_train_with_a_count(ldm_files, tmp_path, fresh_accelerate, caplog):
    data = corrupt_all_but(ldm_files.data, tmp_path / "data", keep=3)  # 3 of 8 readable
    result = ldm_main(run_args(ldm_files, tmp_path / "out", "--train_data_dir", str(data), "--max_train_steps", "3",
                               "--checkpointing_steps", "3", "--set", "ldm.use_ema=false"))
    assert result.step == 3
    assert "skipped 5 unreadable images of 8" in caplog.text  # left out up front, one line with the count


def test_an_epoch_without_a_usable_batch_stops_the_loop():
    from ldm_app.training.common import EmptyBatchGuard

    class Data:
        first_error = "a.png: broken"

        def __len__(self):
            return 8

    guard = EmptyBatchGuard(8, 2, 1)  # 4 batches an epoch -> stops after 12 empty batches in a row
    for _ in range(11):
        assert guard.skip(True, 5, Data())
    assert guard.skip(False, 5, Data()) is False  # a usable batch resets the count
    for _ in range(11):
        guard.skip(True, 5, Data())
    with pytest.raises(UserError, match="12 batches in a row .*first: a.png: broken"):
        guard.skip(True, 5, Data())


# ---- 2. image modes decode to the pixels they mean ------------------------------------------------------------


def test_image_modes_decode_to_the_pixels_they_mean(tmp_path):
    ramp16 = np.array([[0, 257, 32896, 65535], [1000, 20000, 40000, 65000]], dtype=np.uint16)
    la = Image.fromarray(np.array([[[100, 0], [100, 255], [0, 128], [200, 255]]] * 2, dtype=np.uint8), mode="LA")
    rgba = Image.fromarray(np.array([[[255, 0, 0, 0], [255, 0, 0, 255], [0, 0, 0, 128], [0, 0, 255, 64]]] * 2,
                                    dtype=np.uint8), mode="RGBA")
    pal = Image.new("P", (4, 2))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putdata([0, 1, 0, 1, 1, 0, 1, 0])
    pal.info["transparency"] = 0  # palette entry 0 (red) is transparent
    cmyk = Image.new("CMYK", (4, 2))
    cmyk.putdata([(255, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 255), (0, 255, 255, 0)] * 2)
    one = Image.fromarray(np.array([[0, 1, 0, 1]] * 2, dtype=bool))
    images = {
        "i16.png": Image.fromarray(ramp16),  # mode I;16 (16-bit grayscale PNG)
        "i32.tif": Image.fromarray(ramp16.astype(np.int32)),  # mode I
        "f.tif": Image.fromarray(np.array([[0.0, 0.25, 0.5, 1.0]] * 2, dtype=np.float32)),  # mode F
        "la.png": la, "rgba.png": rgba, "p.png": pal, "cmyk.tif": cmyk, "one.png": one,
        "l.png": Image.fromarray(np.array([[0, 50, 150, 255]] * 2, dtype=np.uint8)),
    }
    folder = image_folder(tmp_path / "modes", images)
    assert Image.open(folder / "i16.png").mode == "I;16" and Image.open(folder / "i32.tif").mode == "I"
    ds = build_dataset(str(folder), None, 2, cache_dir=str(tmp_path / "cache"))
    got = {Path(ds.image_name(i)).name: np.asarray(ds.load_image(i)) for i in range(len(ds))}
    assert all(a.dtype == np.uint8 and a.shape == (2, 4, 3) for a in got.values())

    def gray(values) -> np.ndarray:
        return np.repeat(np.asarray(values, dtype=np.uint8)[..., None], 3, axis=-1)

    scaled16 = np.round(ramp16 / 257).astype(np.uint8)  # 16-bit scaled to 8-bit, not clipped to 255
    assert np.array_equal(got["i16.png"], gray(scaled16)) and scaled16.tolist()[0] == [0, 1, 128, 255]
    assert np.array_equal(got["i32.tif"], gray(scaled16))
    assert np.array_equal(got["f.tif"], gray([[0, 64, 128, 255]] * 2))
    # alpha is composited onto white: transparent -> white, opaque -> the colour, half -> between
    assert np.abs(got["la.png"][0].astype(int) - gray([255, 100, 127, 200]).astype(int)).max() <= 1
    expect_rgba = [[255, 255, 255], [255, 0, 0], [127, 127, 127], [191, 191, 255]]
    assert np.abs(got["rgba.png"][0].astype(int) - np.array(expect_rgba)).max() <= 1
    assert got["p.png"][0].tolist() == [[255, 255, 255], [0, 0, 255], [255, 255, 255], [0, 0, 255]]
    assert got["cmyk.tif"][0].tolist() == [[0, 255, 255], [255, 255, 255], [0, 0, 0], [255, 0, 0]]
    assert got["one.png"][0].tolist() == gray([0, 255, 0, 255]).tolist()
    assert np.array_equal(got["l.png"], gray([[0, 50, 150, 255]] * 2))
    assert ds.num_skipped == 0


def test_images_without_a_defined_rgb_meaning_are_refused_and_counted(tmp_path, caplog):
    images = {
        "ok.png": Image.new("RGB", (4, 4), (10, 20, 30)),
        "f_range.tif": Image.fromarray(np.full((4, 4), 2.0, dtype=np.float32)),  # float outside [0, 1]
        "f_nan.tif": Image.fromarray(np.full((4, 4), np.nan, dtype=np.float32)),
        "i_negative.tif": Image.fromarray(np.full((4, 4), -5, dtype=np.int32)),
    }
    ds = build_dataset(str(image_folder(tmp_path / "bad", images)), None, 4, cache_dir=str(tmp_path / "cache"))
    loaded = [ds.load_image(i) for i in range(len(ds))]
    assert [img is not None for img in loaded] == [True, False, False, False]
    assert ds.num_skipped == 3 and "outside [0, 1]" in caplog.text and "outside the 16-bit range" in caplog.text
    with pytest.raises(Exception, match="outside"):
        to_rgb(Image.fromarray(np.full((2, 2), 70000, dtype=np.int32)))


# ---- 3. one run per output folder ----------------------------------------------------------------------------


def lock_is_held(out: Path) -> bool:
    try:
        fd = os.open(out / LOCK_FILE, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_a_second_trainer_on_a_busy_folder_is_refused_and_a_killed_run_leaves_no_lock(shapes, tmp_path,
                                                                                         fresh_accelerate):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, str(ROOT / "train_vae.py"),
                              *vae_args(shapes, out, "--max_train_steps", "100000", "--checkpointing_steps",
                                        "100000")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
                             cwd=ROOT)
    try:
        deadline = time.time() + 60
        while not (lock_is_held(out) and (out / LOCK_FILE).read_text().strip()):
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.time() < deadline, "the first trainer never took the lock"
            time.sleep(0.2)
        assert (out / LOCK_FILE).read_text().strip() == str(first.pid)
        start = time.time()
        second = script("train_vae.py", *vae_args(shapes, out), timeout=60)
        one_error_line(second.returncode, second.stderr, "in use by another run", str(out), str(first.pid))
        assert time.time() - start < 30  # fails fast, without training
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert not lock_is_held(out)  # the kernel dropped the dead run's lock
    assert not list(out.glob(".checkpoint-*"))
    # a new run takes the folder (the killed one saved no checkpoint: latest starts fresh)
    result = vae_main(vae_args(shapes, out, "--max_train_steps", "1", "--resume_from_checkpoint", "latest",
                               "--set", "eval_num_images=0"))
    assert result.step == 1 and not lock_is_held(out)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_a_refused_two_process_run_ends_every_process(ldm_files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run holds the folder
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train_ldm.py"), *run_args(ldm_files, out, "--max_train_steps", "2")]
        start = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=120)
    finally:
        os.close(fd)
    assert proc.returncode != 0 and "error: output dir" in proc.stderr and "in use by another run" in proc.stderr
    assert time.time() - start < 110  # the peer did not wait for the process group
    # the peer, waiting in C for rank 0 to join the process group, ended on torchrun's SIGTERM instead of sitting
    # out its 30 s grace until SIGKILL (our Python SIGTERM handler cannot run during that wait)
    assert "SIGKILL" not in proc.stderr, proc.stderr[-1500:]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written


# ---- 4. a full disk while checkpointing -----------------------------------------------------------------------


def test_full_disk_at_the_first_checkpoint_is_one_line_and_leaves_no_tmp(ldm_files, small_disk, fresh_accelerate,
                                                                         capsys):
    out = small_disk / "out"
    rc, err = cli(ldm_main, run_args(ldm_files, out, "--max_train_steps", "2", "--checkpointing_steps", "1"), capsys)
    one_error_line(rc, err, "cannot write", str(out / "checkpoint-1"), "No space left on device")
    assert not list(out.glob(".checkpoint-*")) and not list_checkpoints(out)
    assert not lock_is_held(out)


def test_full_disk_keeps_the_earlier_checkpoint_resumable(shapes, tmp_path, fresh_accelerate, monkeypatch, capsys):
    from accelerate import Accelerator

    out = tmp_path / "out"
    real_save_state = Accelerator.save_state
    calls = []

    def save_state(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 2:  # the second checkpoint finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_state(self, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    rc, err = cli(vae_main, vae_args(shapes, out), capsys)  # checkpoints at steps 3 and 6
    one_error_line(rc, err, "cannot write", str(out / "checkpoint-6"), "No space left on device")
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"]
    assert not list(out.glob(".checkpoint-*")) and not (out / "vae").exists()
    assert check_checkpoint(out / "checkpoint-3") is None and resolve_resume(out, "latest") == out / "checkpoint-3"
    monkeypatch.setattr(Accelerator, "save_state", real_save_state)  # space freed: the run resumes and ends
    result = vae_main(vae_args(shapes, out, "--resume_from_checkpoint", "latest", "--set", "eval_num_images=0"))
    assert result.step == 6 and (out / "vae").is_dir()


def test_torch_and_safetensors_write_failures_become_one_line(tmp_path):
    from safetensors import SafetensorError

    from ldm_app.checkpointing import _as_write_error

    dest = tmp_path / "checkpoint-4"
    torch_error = RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0 "
                               "basic_ios::clear: iostream error")
    st_error = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                               '"No space left on device" })')
    ro_error = SafetensorError('Error while serializing: IoError(Os { code: 30, kind: ReadOnlyFilesystem, '
                               'message: "Read-only file system" })')
    for error, words in ((torch_error, "No space left"), (st_error, "No space left"),
                         (ro_error, "Read-only file system"), (OSError(errno.EDQUOT, "Disk quota exceeded"),
                                                               "quota")):
        message = str(_as_write_error(error, dest))
        assert message.startswith(f"cannot write {dest}") and words in message, message
    assert _as_write_error(RuntimeError("shape mismatch"), dest) is None  # a bug stays a bug
    assert _as_write_error(OSError(errno.EIO, "I/O error"), dest) is None


# ---- 5. bad input: one line, exit 2, nothing left behind -----------------------------------------------------


@pytest.fixture
def latin1_data(shapes, tmp_path) -> Path:
    data = tmp_path / "latin1"
    shutil.copytree(shapes, data)
    lines = (data / "metadata.jsonl").read_text().splitlines()
    lines[5] = json.dumps({"file_name": "000005.png", "text": "caf\u00e9"}, ensure_ascii=False)
    (data / "metadata.jsonl").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return data


def test_non_utf8_metadata_is_one_line(latin1_data, ldm_files, tiny_vae_dir, tmp_path, fresh_accelerate, capsys):
    words = ("metadata.jsonl", "not UTF-8", "line 6")
    out = tmp_path / "out"
    one_error_line(*cli(vae_main, vae_args(latin1_data, out), capsys), *words)
    one_error_line(*cli(ldm_main, run_args(ldm_files, out, "--train_data_dir", str(latin1_data)), capsys), *words)
    one_error_line(*cli(eval_main, ["vae", "--model", str(tiny_vae_dir), "--data", str(latin1_data)], capsys), *words)
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory) -> Path:
    import torch

    from ldm_app.config import AutoencoderConfig
    from ldm_app.models import build_autoencoder

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_vae") / "vae"
    build_autoencoder(AutoencoderConfig(block_out_channels=(8, 8, 8, 8), norm_num_groups=8,
                                        sample_size=32)).save_pretrained(folder, safe_serialization=True)
    return folder


def test_non_utf8_validation_prompts_file_is_one_line(ldm_files, tmp_path, fresh_accelerate, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a red circle\nun caf\u00e9\n".encode("latin-1"))
    out = tmp_path / "out"
    rc, err = cli(ldm_main, run_args(ldm_files, out, "--validation_prompts", str(prompts)), capsys)
    one_error_line(rc, err, "--validation_prompts", str(prompts), "not UTF-8")
    assert not out.exists()


@pytest.mark.parametrize("extra", [["--learning_rate", "nan"], ["--learning_rate", "inf"],
                                   ["--set", "train.adam_beta2=.nan"], ["--set", "loss.kl_weight=nan"],
                                   ["--set", "train.max_grad_norm=1e400"]])
def test_non_finite_settings_are_refused_before_anything_is_written(extra, shapes, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = cli(vae_main, vae_args(shapes, out, *extra), capsys)
    one_error_line(rc, err, "must be a finite number")
    assert not out.exists()
    # the folder is not poisoned: a corrected run could start there (the config check passes)
    from ldm_app.checkpointing import check_run_folder

    check_run_folder(out, {"train": {}}, resuming=False)


def test_non_finite_ldm_setting_is_refused(ldm_files, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = cli(ldm_main, run_args(ldm_files, out, "--set", "ldm.snr_gamma=nan"), capsys)
    one_error_line(rc, err, "snr_gamma", "finite")
    assert not out.exists()


def test_huge_resolutions_are_refused_by_the_limit_before_allocating(shapes, ldm_files, tmp_path, capsys):
    out = tmp_path / "out"
    start = time.time()
    rc, err = cli(vae_main, vae_args(shapes, out, "--set", "data.resolution=8192", "--set",
                                     "autoencoder.sample_size=8192"), capsys)
    one_error_line(rc, err, "resolution", "8192", "above the limit of 2048")
    rc, err = cli(ldm_main, run_args(ldm_files, out, "--set", "data.resolution=65536", "--set",
                                     "unet.sample_size=16384"), capsys)
    one_error_line(rc, err, "resolution", "65536", "above the limit")
    assert time.time() - start < 20 and not out.exists()


def test_evaluate_vae_bad_arguments_are_one_line(tiny_vae_dir, shapes, tiny_pipeline_dir, readonly_dir, capsys):
    base = ["vae", "--model", str(tiny_vae_dir), "--data", str(shapes)]
    one_error_line(*cli(eval_main, [*base, "--batch_size", "0"], capsys), "--batch_size", ">= 1")
    for flag, name in (("--grid", "grid.png"), ("--json", "report.json")):
        for dest in (readonly_dir / name, readonly_dir / "sub" / name):
            one_error_line(*cli(eval_main, [*base, flag, str(dest)], capsys), "cannot write", str(dest.parent))
    assert not list(readonly_dir.iterdir())
    # a pipeline (LDM) folder: say what it is and what is expected, not "give exactly one of train_data_dir..."
    line = one_error_line(*cli(eval_main, ["vae", "--model", str(tiny_pipeline_dir)], capsys),
                          "pipeline folder", "--data")
    assert "exactly one of" not in line


def test_evaluate_never_writes_over_a_file_it_was_not_told_to_replace(tiny_vae_dir, shapes, tmp_path, capsys):
    base = ["vae", "--model", str(tiny_vae_dir), "--data", str(shapes), "--num_images", "4"]
    captions = tmp_path / "metadata.jsonl"
    notes, photo = tmp_path / "notes.json", tmp_path / "photo.png"
    for path, content in ((captions, b'{"file_name": "a.png", "text": "mine"}\n'), (notes, b'{"my": "notes"}'),
                          (photo, b"\x89PNG not really")):
        path.write_bytes(content)
    cases = (("--json", captions, "give a path ending in .json"), ("--json", notes, "exists; pass --overwrite"),
             ("--grid", photo, "exists; pass --overwrite"), ("--grid", tmp_path / "g.jpg", "ending in .png"))
    for flag, dest, words in cases:
        one_error_line(*cli(eval_main, [*base, flag, str(dest)], capsys), str(dest), words)
    assert captions.read_bytes().startswith(b'{"file_name"') and notes.read_bytes() == b'{"my": "notes"}'
    assert photo.read_bytes() == b"\x89PNG not really" and not (tmp_path / "g.jpg").exists()
    eval_main([*base, "--json", str(notes), "--overwrite"])  # asked: replaced
    assert json.loads(notes.read_text())["num_images"] == 4


def test_unreadable_held_out_images_are_one_line(tiny_vae_dir, unreadable, capsys):
    rc, err = cli(eval_main, ["vae", "--model", str(tiny_vae_dir), "--data", str(unreadable)], capsys)
    one_error_line(rc, err, "no readable image", "first: ")
