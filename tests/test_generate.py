"""generate.py on the tiny random-weight model (CPU, 2 sampling steps): bad input, seeds, batching, metadata, files.

The CLI runs in-process through `ldm_app.generate.main` (via `run_cli` for exit codes); two subprocess runs check
the real exit status, stderr and import cost.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ldm_app.generate as gen_module
from ldm_app.errors import run_cli
from ldm_app.generate import generate, main, slugify
from ldm_app.pngmeta import ImageParams, read_params, read_text_chunks, save_png
from ldm_app.samplers import SAMPLERS

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "2", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def cli(*argv) -> list[Path]:
    return main([str(a) for a in argv])


# ---- bad input: one line on stderr, exit 2, nothing written -----------------------------------------------------


@pytest.fixture
def broken_models(tmp_path, tiny_pipeline_dir):
    """Copies of the tiny model with a component missing and with truncated U-Net weights."""
    no_vae = shutil.copytree(tiny_pipeline_dir, tmp_path / "no_vae")
    shutil.rmtree(no_vae / "vae")
    truncated = shutil.copytree(tiny_pipeline_dir, tmp_path / "truncated")
    weights = next((truncated / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return {"no_vae": no_vae, "truncated": truncated}


BAD_INPUTS = {
    "height not multiple of 8": (["x", "--height", "30"], "--height: '30' is not a positive multiple of 8"),
    "width zero": (["x", "--width", "0"], "--width: '0' is not a positive multiple of 8"),
    "steps zero": (["x", "--steps", "0"], "--steps: 0 is too small; expected an integer >= 1"),
    "num_images zero": (["x", "--num_images", "0"], "--num_images: 0 is too small"),
    "seed not numeric": (["x", "--seed", "abc"], "--seed: 'abc' is not a whole number"),
    "unknown scheduler": (
        ["x", "--scheduler", "nope"],
        "unknown sampler 'nope'; expected one of: " + ", ".join(SAMPLERS),
    ),
    "unknown dtype": (["x", "--dtype", "fp8"], "invalid choice: 'fp8'"),
    "half precision on cpu": (["x", "--dtype", "fp16"], "dtype fp16 is not supported on CPU"),
    "unknown device": (["x", "--device", "tpu"], "unknown device 'tpu'"),
    "missing model": (["x", "--model", "{tmp}/nope"], "model folder not found: {tmp}/nope"),
    "component missing": (["x", "--model", "{no_vae}"], "component 'vae' is missing"),
    "truncated weights": (["x", "--model", "{truncated}"], "corrupt or truncated weights file"),
    "no prompt": ([], "no prompt"),
    "blank prompt": (["  "], "no prompt"),
    "prompt and file": (["x", "--from_file", "{tmp}/p.txt"], "expected only one of a prompt, --from_file or"),
    "missing prompt file": (["--from_file", "{tmp}/missing.txt"], "prompt file not found"),
    "empty prompt file": (["--from_file", "{tmp}/empty.txt"], "has no prompts"),
    "missing png": (["--from_png", "{tmp}/missing.png"], "PNG file not found"),
    "output parent is a file": (["x", "--output", "{tmp}/afile/x.png"], "afile is a file; expected a folder"),
    "output png is a folder": (["x", "--output", "{tmp}/adir.png"], "is a folder; expected a .png file path"),
    "output folder is a file": (["x", "--output", "{tmp}/afile"], "is a file; expected a folder"),
    "output not png": (["x", "--output", "{tmp}/x.jpg"], "only PNG is written"),
    "class label on a text model": (["x", "--class_label", "1"],
                                    "not class-conditional (its U-Net has no class embedding); drop --class_label\n"),
    "output png with a slash": (["x", "--output", "{tmp}/new.png/"], "ends with a slash (a folder) but names a .png"),
    "unknown flag": (["x", "--bogus"], "unrecognized arguments: --bogus"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, tiny_pipeline_dir, broken_models, capsys):
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "adir.png").mkdir()
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "p.txt").write_text("a prompt\n")
    argv, expected = BAD_INPUTS[case]
    names = {"tmp": tmp_path, **broken_models}
    # defaults first: a flag given again by the case wins (argparse keeps the last)
    defaults = ["--model", str(tiny_pipeline_dir), "--output", str(tmp_path / "out"), *FAST]
    argv = defaults + [a.format(**names) for a in argv]
    before = sorted(tmp_path.rglob("*"))

    assert run_cli(main, argv) == 2

    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected.format(**names) in err
    assert sorted(tmp_path.rglob("*")) == before  # no image, no output folder
    assert "wrote" not in out


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_folder_is_refused_before_generating(tmp_path, tiny_pipeline_dir, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert run_cli(main, ["x", "--model", str(tiny_pipeline_dir), "--output", str(locked / "sub"), *FAST]) == 2
    assert "locked is not writable" in capsys.readouterr().err
    assert list(locked.iterdir()) == []


def test_missing_default_model_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gen_module, "DEFAULT_MODEL", str(tmp_path / "default_model"))
    assert run_cli(main, ["a corgi", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "bundled default model is missing" in err and "--model DIR" in err
    assert not (tmp_path / "out").exists()


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_subprocess_error_paths_exit_2_without_traceback(tmp_path, broken_models):
    # the arguments are checked before torch is imported (that is what keeps --help and mistakes fast)
    probe = _run("-c", "import sys, ldm_app.generate as g; g.build_parser(); print('torch' in sys.modules)")
    assert probe.stdout.strip() == "False", probe.stderr

    out = tmp_path / "out.png"
    bad_seed = _run("generate.py", "x", "--seed", "abc", "--output", str(out))
    assert (bad_seed.returncode, bad_seed.stdout) == (2, "")
    assert bad_seed.stderr.startswith("error: argument --seed") and bad_seed.stderr.count("\n") == 1

    # an error raised deep in the model loader still reaches the user as one line
    corrupt = _run("generate.py", "x", "--model", str(broken_models["truncated"]), "--output", str(out), *FAST)
    assert (corrupt.returncode, corrupt.stdout) == (2, ""), corrupt.stderr
    assert corrupt.stderr.startswith("error: corrupt or truncated weights file"), corrupt.stderr
    assert corrupt.stderr.count("\n") == 1 and "Traceback" not in corrupt.stderr
    assert not out.exists()


# ---- seeds and batches ------------------------------------------------------------------------------------------


def test_batch_image_k_equals_single_run_with_seed_plus_k(tmp_path, tiny_pipeline_dir):
    # euler_a draws fresh noise at every step, so this also checks the per-image generators of the sampler steps
    common = ["--model", tiny_pipeline_dir, "--scheduler", "euler_a", "--height", 32, "--width", 32, *FAST]
    batch = cli("a red circle", "--num_images", 3, "--batch_size", 3, "--seed", 10, "--output", tmp_path / "b", *common)
    assert len(batch) == 3
    singles = [cli("a red circle", "--seed", 10 + k, "--output", tmp_path / f"s{k}.png", *common)[0] for k in range(3)]
    for k, (b, s) in enumerate(zip(batch, singles)):
        assert read_params(b).seed == read_params(s).seed == 10 + k
        assert np.abs(pixels(b) - pixels(s)).max() <= 2  # 2/255: batched vs single matmuls may round differently
    assert np.abs(pixels(singles[0]) - pixels(singles[1])).max() > 10  # the seed matters
    # same seed + settings = same pixels: see the --from_png test


def test_metadata_and_from_png_reproduce_the_image_exactly(tmp_path, tiny_pipeline_dir, capsys):
    first = cli(
        "a blue square, on the left", "--model", tiny_pipeline_dir, "--negative_prompt", "green",
        "--guidance_scale", 3, "--scheduler", "ddpm", "--height", 32, "--width", 48, "--output", tmp_path / "a.png",
        *FAST,
    )[0]  # fmt: skip
    assert first == tmp_path / "a.png"
    params = read_params(first)
    assert (params.prompt, params.negative_prompt, params.guidance_scale) == ("a blue square, on the left", "green", 3)
    assert (params.sampler, params.steps, params.height, params.width) == ("ddpm", 2, 32, 48)
    assert params.model == str(tiny_pipeline_dir.resolve())
    assert pixels(first).shape == (32, 48, 3)
    assert read_text_chunks(first)["parameters"].startswith("a blue square, on the left\nNegative prompt: green\n")

    out = capsys.readouterr().out
    # the effective settings, with the random seed (printed and stored)
    settings = "sampler: ddpm | steps: 2 | guidance: 3.0 | size: 48x32 | device: cpu | dtype: torch.float32"
    assert f"{settings} | seed: {params.seed} (random)" in out

    again = cli("--from_png", first, "--output", tmp_path / "b.png", "--device", "cpu")[0]
    assert read_params(again) == params
    assert np.array_equal(pixels(again), pixels(first))  # same seed + settings = same pixels


def test_from_png_warns_about_another_version(tmp_path, tiny_pipeline_dir, caplog, capsys):
    params = ImageParams("a cat", "", 1, 2, 7.5, "ddim", 32, 32, str(tiny_pipeline_dir), version="0.0.1")
    png = save_png(Image.new("RGB", (32, 32)), tmp_path / "old.png", params)
    # stop at the (unwritable) output: the warning comes first, with the parameters read
    assert run_cli(main, ["--from_png", str(png), "--output", str(png / "x.png")]) == 2
    assert any("made by ldm_app 0.0.1" in r.getMessage() for r in caplog.records)
    assert "old.png is a file" in capsys.readouterr().err


# ---- files --------------------------------------------------------------------------------------------------------


def test_grid_and_png_numbering(tmp_path, tiny_pipeline_dir):
    paths = cli("a cat", "--model", tiny_pipeline_dir, "--num_images", 3, "--batch_size", 2, "--seed", 1, "--grid",
                "--height", 32, "--width", 32, "--output", tmp_path / "cat.png", *FAST)  # fmt: skip
    names = [p.name for p in paths]
    assert names == ["cat-0000.png", "cat-0001.png", "cat-0002.png", "cat-grid.png"]
    grid = pixels(paths[-1])
    assert grid.shape == (64, 64, 3)  # 3 images of 32x32 -> 2x2 cells
    assert np.array_equal(grid[32:, :32], pixels(paths[2]))  # image 2 in the bottom-left cell
    assert np.all(grid[32:, 32:] == 255)  # the unused cell stays white
    assert "cat-0001.png" in read_text_chunks(paths[-1])["parameters"]


def test_folder_output_is_numbered_and_never_overwrites(tmp_path, tiny_pipeline_dir):
    out = tmp_path / "outputs"
    out.mkdir()
    (out / "00007-1-old.png").write_bytes(b"keep me")
    paths = generate(["A corgi, in a sushi house!"], tiny_pipeline_dir, seed=5, num_images=2, batch_size=2,
                     steps=2, height=32, width=32, device="cpu", output=out)  # fmt: skip
    assert [p.name for p in paths] == ["00008-5-a-corgi-in-a-sushi-house.png", "00009-6-a-corgi-in-a-sushi-house.png"]
    assert (out / "00007-1-old.png").read_bytes() == b"keep me"
    assert sorted(p.name for p in out.iterdir()) == ["00007-1-old.png", *[p.name for p in paths]]  # no temp files


def test_from_file_skips_blank_lines_and_truncates_long_prompts(tmp_path, tiny_pipeline_dir, caplog):
    long_prompt = "corgi " * 100  # > 77 CLIP tokens: cut with a warning, not refused
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a red circle\n\n   \n{long_prompt}\n", encoding="utf-8")
    diffusers_logger = logging.getLogger("diffusers")  # the truncation warning is diffusers' (no propagation)
    diffusers_logger.addHandler(caplog.handler)
    try:
        paths = cli("--from_file", prompts, "--model", tiny_pipeline_dir, "--seed", 3, "--batch_size", 2,
                    "--height", 32, "--width", 32, "--output", tmp_path / "out", *FAST)  # fmt: skip
    finally:
        diffusers_logger.removeHandler(caplog.handler)
    assert [read_params(p).prompt for p in paths] == ["a red circle", long_prompt.strip()]
    assert [read_params(p).seed for p in paths] == [3, 3]  # each prompt starts at the seed: comparable images
    assert any("truncated" in r.getMessage() for r in caplog.records)


def test_defaults_come_from_the_model_folder(tmp_path, tiny_pipeline_dir, capsys):
    model = shutil.copytree(tiny_pipeline_dir, tmp_path / "model")
    sampling = {"num_inference_steps": 3, "guidance_scale": 1.0, "sampler": "euler", "height": 32, "width": 40}
    (model / "ldm_app.json").write_text(json.dumps({"sampling": sampling}))
    path = cli("a dog", "--model", model, "--seed", 0, "--output", tmp_path / "dog.png", "--device", "cpu")[0]
    p = read_params(path)
    assert (p.steps, p.guidance_scale, p.sampler, p.height, p.width) == (3, 1.0, "euler", 32, 40)
    assert "sampler: euler | steps: 3 | guidance: 1.0 | size: 40x32" in capsys.readouterr().out
    # a flag still wins over the stored default
    p2 = read_params(cli("a dog", "--model", model, "--seed", 0, "--steps", 2, "--output", tmp_path / "d2.png")[0])
    assert (p2.steps, p2.sampler) == (2, "euler")


def test_slugify():
    assert slugify("A corgi, in a sushi house!") == "a-corgi-in-a-sushi-house"
    assert slugify("!!!") == "image"
    assert len(slugify("word " * 50)) <= 40


# ---- never overwrite ------------------------------------------------------------------------------------------------


def test_existing_files_are_never_overwritten(tmp_path, tiny_pipeline_dir, capsys):
    common = ["--model", tiny_pipeline_dir, "--height", 32, "--width", 32, *FAST]
    (tmp_path / "k.png").write_bytes(b"keep me")
    first = cli("a cat", "--seed", 1, "--output", tmp_path / "k.png", *common)
    second = cli("a cat", "--seed", 2, "--output", tmp_path / "k.png", *common)
    assert [p.name for p in first + second] == ["k-1.png", "k-2.png"]
    assert (tmp_path / "k.png").read_bytes() == b"keep me"
    assert "wrote " + str(tmp_path / "k-1.png") + " (k.png exists; --overwrite replaces it)" in capsys.readouterr().out
    assert [read_params(p).seed for p in first + second] == [1, 2]

    # numbered images and the grid: each taken name gets its own next free name
    multi = ["--num_images", 2, "--grid", "--output", tmp_path / "n.png", *common]
    cli("a dog", "--seed", 3, *multi)
    again = cli("a dog", "--seed", 4, *multi)
    assert [p.name for p in again] == ["n-0000-1.png", "n-0001-1.png", "n-grid-1.png"]
    assert read_params(tmp_path / "n-0000.png").seed == 3 and read_params(again[0]).seed == 4

    # --overwrite replaces, atomically (no temporary file left)
    replaced = cli("a cat", "--seed", 5, "--output", tmp_path / "k.png", "--overwrite", *common)
    assert replaced == [tmp_path / "k.png"] and read_params(tmp_path / "k.png").seed == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_python_api_overwrite_flag(tmp_path, tiny_pipeline_dir):
    kwargs = dict(seed=1, steps=1, height=32, width=32, device="cpu", output=tmp_path / "a.png")
    assert generate("a cat", tiny_pipeline_dir, **kwargs) == [tmp_path / "a.png"]
    assert generate("a cat", tiny_pipeline_dir, **kwargs) == [tmp_path / "a-1.png"]
    assert generate("a cat", tiny_pipeline_dir, overwrite=True, **kwargs) == [tmp_path / "a.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-1.png", "a.png"]


def test_folder_numbers_taken_meanwhile_are_skipped(tmp_path, tiny_pipeline_dir, monkeypatch):
    """Another process takes the number this one computed (between its listing and its write): the image goes to
    the next number, nothing is replaced."""
    out = tmp_path / "outputs"
    out.mkdir()
    real_listdir = os.listdir

    def listdir_then_race(folder):
        names = real_listdir(folder)
        (Path(folder) / "00000-9-rival.png").write_bytes(b"the other process")  # after the listing
        (Path(folder) / "00000-1-a-cat.png").write_bytes(b"same name even")
        return names

    monkeypatch.setattr(gen_module.os, "listdir", listdir_then_race)
    paths = generate("a cat", tiny_pipeline_dir, seed=1, steps=1, height=32, width=32, device="cpu", output=out)
    assert [p.name for p in paths] == ["00001-1-a-cat.png"]
    assert (out / "00000-1-a-cat.png").read_bytes() == b"same name even"


# ---- one-line errors instead of tracebacks --------------------------------------------------------------------------


def test_non_utf8_prompt_is_one_line_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "generate.py", b"\xff\xfe", "--output", str(tmp_path / "o")],
                          capture_output=True, cwd=ROOT, env=env, timeout=300)  # fmt: skip
    assert (done.returncode, done.stdout) == (2, b""), done.stderr
    assert done.stderr.startswith(b"error: the prompt is not valid UTF-8 text") and done.stderr.count(b"\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_non_utf8_output_path_works(tmp_path, tiny_pipeline_dir, capsys):
    """A folder name whose bytes are not UTF-8 is a valid path: written, and printed escaped."""
    out = Path(os.fsdecode(bytes(tmp_path) + b"/d\xff"))
    paths = cli("a cat", "--model", tiny_pipeline_dir, "--seed", 1, "--height", 32, "--width", 32,
                "--output", out / "x.png", *FAST)  # fmt: skip
    assert paths[0].is_file() and read_params(paths[0]).seed == 1
    assert "d\\udcff" in capsys.readouterr().out


def test_read_only_output_is_one_line_error(readonly_dir, tiny_pipeline_dir, capsys):
    argv = ["a cat", "--model", str(tiny_pipeline_dir), "--output", str(readonly_dir / "x.png"), *map(str, FAST)]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not writable" in err
    assert os.listdir(readonly_dir) == []


def test_full_disk_is_one_line_error_and_leaves_no_partial_file(small_disk, tiny_pipeline_dir, capsys):
    (small_disk / "filler").write_bytes(b"\0" * (2 * 2**20 - 4096))  # leave less than one 64 px PNG
    argv = ["a cat", "--model", str(tiny_pipeline_dir), "--seed", "1", "--output", str(small_disk / "x.png"),
            *map(str, FAST)]  # fmt: skip
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err  # the sampling progress bar, then the error
    assert err.endswith(f"\nerror: cannot write {small_disk / 'x.png'}: No space left on device\n"), err
    assert "Traceback" not in err
    assert os.listdir(small_disk) == ["filler"]
