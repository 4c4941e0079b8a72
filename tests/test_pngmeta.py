"""PNG text-chunk parameters: write, read back, and clear one-line errors for files that don't carry them."""

import json

import pytest
from PIL import Image, PngImagePlugin

from ldm_app import __version__
from ldm_app.errors import UserError
from ldm_app.pngmeta import KEY, TEXT_KEY, ImageParams, format_parameters, read_params, read_text_chunks, save_png


def _params(**changes) -> ImageParams:
    base = dict(
        prompt="a corgi in a sushi house",
        negative_prompt="blurry",
        seed=42,
        steps=20,
        guidance_scale=7.5,
        sampler="euler_a",
        height=64,
        width=32,
        model="/models/tiny",
    )
    return ImageParams(**{**base, **changes})


def _image() -> Image.Image:
    return Image.new("RGB", (8, 8), (10, 200, 30))


def test_round_trip_keeps_every_field_and_pixels(tmp_path):
    params = _params()
    path = save_png(_image(), tmp_path / "a.png", params)
    assert read_params(path) == params
    assert read_params(path).version == __version__
    with Image.open(path) as im:
        assert im.getpixel((3, 3)) == (10, 200, 30)
    assert list(tmp_path.iterdir()) == [path]  # the atomic write left no temporary file


def test_non_latin1_prompt_round_trips(tmp_path):
    params = _params(prompt="柴犬 in a café ☕", negative_prompt="", sampler=None)
    path = save_png(_image(), tmp_path / "u.png", params)
    assert read_params(path) == params
    assert read_text_chunks(path)[TEXT_KEY].startswith("柴犬 in a café ☕\nSteps: 20")


def test_a1111_text_layout():
    text = format_parameters(_params())
    assert text == (
        "a corgi in a sushi house\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: euler_a, CFG scale: 7.5, Seed: 42, Size: 32x64, Model: tiny, "
        f"Version: ldm_app {__version__}"
    )
    assert "Negative prompt" not in format_parameters(_params(negative_prompt=""))


def test_text_only_png_has_no_parameters(tmp_path):
    path = save_png(_image(), tmp_path / "grid.png", None, text="grid of 4 images")
    assert read_text_chunks(path) == {TEXT_KEY: "grid of 4 images"}
    with pytest.raises(UserError, match="no 'ldm_app' parameters"):
        read_params(path)


def _png_with_chunk(path, value: str):
    info = PngImagePlugin.PngInfo()
    info.add_text(KEY, value)
    _image().save(path, pnginfo=info)
    return path


@pytest.mark.parametrize(
    "chunk, match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        (json.dumps({"prompt": "x"}), "lacks negative_prompt, seed"),
        (json.dumps({**json.loads(_params().to_json()), "seed": "42"}), "'seed' .* wrong type"),
        (json.dumps({**json.loads(_params().to_json()), "steps": True}), "'steps' .* wrong type"),
        (json.dumps({**json.loads(_params().to_json()), "eta": 0.0}), "unknown key 'eta'"),
    ],
)
def test_bad_chunks_are_one_line_user_errors(tmp_path, chunk, match):
    path = _png_with_chunk(tmp_path / "bad.png", chunk)
    with pytest.raises(UserError, match=match) as err:
        read_params(path)
    assert "\n" not in str(err.value)


def test_int_guidance_is_accepted(tmp_path):
    data = {**json.loads(_params().to_json()), "guidance_scale": 7}
    assert read_params(_png_with_chunk(tmp_path / "a.png", json.dumps(data))).guidance_scale == 7


def test_missing_non_png_and_garbage_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_params(tmp_path / "missing.png")
    _image().save(tmp_path / "a.jpg", format="JPEG")
    with pytest.raises(UserError, match="is a JPEG image; expected a PNG"):
        read_params(tmp_path / "a.jpg")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(UserError, match="not a readable PNG"):
        read_params(tmp_path / "junk.png")
