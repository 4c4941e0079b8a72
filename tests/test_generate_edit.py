"""generate.py's image-to-image, inpainting and adapter flags: recorded in every PNG, remade exactly from it, and
bad input refused in one line with nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_app.generate import main
from ldm_app.pngmeta import read_params

FAST = ["--steps", "4", "--device", "cpu", "--seed", "7"]


def cli(*argv) -> list[Path]:
    return main([str(a) for a in argv])


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


@pytest.fixture
def inputs(tmp_path) -> tuple[Path, Path]:
    image = np.full((64, 64, 3), 250, np.uint8)
    image[20:44, 10:34] = (200, 40, 40)
    mask = np.zeros((64, 64), np.uint8)
    mask[8:40, 32:64] = 255
    Image.fromarray(image).save(tmp_path / "init.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return tmp_path / "init.png", tmp_path / "mask.png"


def test_img2img_is_recorded_and_remade_exactly(tmp_path, tiny_pipeline_dir, inputs):
    init, _ = inputs
    first = cli("a blue square", "--model", tiny_pipeline_dir, "--init_image", init, "--strength", 0.6,
                "--output", tmp_path / "a.png", *FAST)[0]  # fmt: skip
    p = read_params(first)
    assert (p.init_image, p.strength, p.mask, p.height, p.width) == (str(init.resolve()), 0.6, None, 64, 64)
    again = cli("--from_png", first, "--output", tmp_path / "b.png")[0]
    np.testing.assert_array_equal(pixels(first), pixels(again))
    init.write_bytes(init.read_bytes() + b"\0")  # the input changed: a remake could not be the same image
    with pytest.raises(Exception, match="changed since the PNG was made"):
        cli("--from_png", first, "--output", tmp_path / "c.png")


@pytest.mark.parametrize("size", [None, (64, 48)])
def test_an_init_image_of_any_size_is_resized_to_multiples_of_8_or_to_the_size_asked(tmp_path, tiny_pipeline_dir,
                                                                                      size, caplog):  # fmt: skip
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (47, 65, 3), dtype=np.uint8)).save(tmp_path / "photo.png")  # 65x47
    flags = [] if size is None else ["--width", size[0], "--height", size[1]]
    with caplog.at_level("WARNING"):
        out = cli("a red circle", "--model", tiny_pipeline_dir, "--init_image", tmp_path / "photo.png", *flags,
                  "--output", tmp_path / "o.png", *FAST)[0]  # fmt: skip
    width, height = size or (64, 40)
    assert Image.open(out).size == (width, height)
    assert (read_params(out).width, read_params(out).height) == (width, height)
    assert "resizing the init image from 65x47" in caplog.text


@pytest.mark.parametrize("method", ["blend", "repaint"])
def test_inpainting_with_paste_back_keeps_the_unmasked_pixels_and_is_remade(tmp_path, tiny_pipeline_dir, inputs,
                                                                             method):  # fmt: skip
    init, mask = inputs
    out = cli("a green circle", "--model", tiny_pipeline_dir, "--init_image", init, "--mask", mask, "--inpaint", method,
              "--paste_back", "--jump_length", 2, "--jump_n_sample", 2, "--output", tmp_path / "in.png", *FAST)[0]  # fmt: skip
    p = read_params(out)
    assert (p.inpaint, p.paste_back, p.strength, p.mask) == (method, True, 1.0, str(mask.resolve()))
    keep = np.asarray(Image.open(mask)) == 0
    np.testing.assert_array_equal(pixels(out)[keep], pixels(init)[keep])
    again = cli("--from_png", out, "--output", tmp_path / "again.png")[0]
    np.testing.assert_array_equal(pixels(out), pixels(again))


def test_inpainting_defaults_to_repaint_with_paste_back_and_records_them(tmp_path, tiny_pipeline_dir, inputs):
    init, mask = inputs
    out = cli("a cat", "--model", tiny_pipeline_dir, "--init_image", init, "--mask", mask, "--output",
              tmp_path / "x.png", *FAST)[0]  # fmt: skip
    p = read_params(out)
    assert (p.inpaint, p.paste_back, p.harmonize, p.jump_length, p.jump_n_sample) == ("repaint", True, 0.3, 5, 5)
    assert "Inpaint: repaint" in Image.open(out).text["parameters"]
    off = cli("a cat", "--model", tiny_pipeline_dir, "--init_image", init, "--mask", mask, "--inpaint", "blend",
              "--no_paste_back", "--output", tmp_path / "y.png", *FAST)[0]  # fmt: skip
    assert (read_params(off).inpaint, read_params(off).paste_back, read_params(off).harmonize) == ("blend", False, None)


def test_a_lora_changes_the_image_and_is_recorded(tmp_path, tiny_pipeline_dir):
    from test_adapters import peft_lora, save_diffusers_lora

    lora = save_diffusers_lora(tmp_path, "style.safetensors", *peft_lora(seed=1))
    plain = cli("a cat", "--model", tiny_pipeline_dir, "--output", tmp_path / "plain.png", *FAST)[0]
    styled = cli("a cat", "--model", tiny_pipeline_dir, "--lora", f"{lora}:0.8", "--output", tmp_path / "s.png",
                 *FAST)[0]  # fmt: skip
    assert read_params(styled).loras == (f"{lora.resolve()}:0.8",)
    assert np.abs(pixels(plain) - pixels(styled)).mean() > 0.3  # tiny random model: small but clear
    again = cli("--from_png", styled, "--output", tmp_path / "again.png")[0]
    np.testing.assert_array_equal(pixels(styled), pixels(again))


def test_weighting_syntax_without_weighting_gets_a_notice(tmp_path, tiny_pipeline_dir, capsys):
    cli("a (red:1.4) cat", "--model", tiny_pipeline_dir, "--output", tmp_path / "w.png", *FAST)
    assert "--weighting" in capsys.readouterr().err
    out = cli("a (red:1.4) cat", "--model", tiny_pipeline_dir, "--weighting", "--output", tmp_path / "w2.png",
              *FAST)[0]  # fmt: skip
    assert read_params(out).weighting is True


BAD = {
    "missing init": (["--init_image", "{tmp}/nope.png"], "no such file"),
    "not an image": (["--init_image", "{tmp}/junk.png"], "not a readable image"),
    "mask without init": (["--mask", "{mask}"], "--mask needs --init_image"),
    "mask size": (["--init_image", "{init}", "--mask", "{tmp}/small.png"], "expected a mask of the image's size"),
    "all white": (["--init_image", "{init}", "--mask", "{tmp}/white.png"], "all white"),
    "all black": (["--init_image", "{init}", "--mask", "{tmp}/black.png"], "all black"),
    "strength": (["--init_image", "{init}", "--strength", "1.5"], r"--strength must be in \(0, 1\]"),
    "strength alone": (["--strength", "0.5"], "--strength needs --init_image"),
    "paste_back alone": (["--init_image", "{init}", "--paste_back"], "need --mask"),
    "harmonize": (["--init_image", "{init}", "--mask", "{mask}", "--harmonize", "1"], r"--harmonize must be in \[0, 1\)"),
    "missing lora": (["--lora", "{tmp}/none.safetensors"], "no such file"),
    "misfit lora": (["--lora", "{tmp}/junk.png"], "LoRA"),
    "lora scale not a number": (["--lora", "{init}:abc"], "scale 'abc' is not a number"),
    "single file junk": (["--model", "{tmp}/junk.safetensors"], "junk.safetensors"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_edit_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, tiny_pipeline_dir, inputs, capsys):
    from ldm_app.errors import run_cli

    init, mask = inputs
    (tmp_path / "junk.png").write_bytes(b"not an image")
    (tmp_path / "junk.safetensors").write_bytes(b"not weights")
    Image.new("L", (32, 32), 255).save(tmp_path / "small.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "white.png")
    Image.new("L", (64, 64), 0).save(tmp_path / "black.png")
    flags, message = BAD[case]
    flags = [f.format(tmp=tmp_path, init=init, mask=mask) for f in flags]
    model = [] if "--model" in flags else ["--model", str(tiny_pipeline_dir)]
    out = tmp_path / "out"
    code = run_cli(main, ["a cat", *model, *flags, "--output", str(out), *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert re.search(message, err[0]), err[0]
    assert not out.exists()


import re  # noqa: E402
