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


def test_a1111_text_says_how_weighting_syntax_was_read():
    # an A1111 reader applies (word:1.3) by default: the text says when it was read as plain characters
    assert format_parameters(_params(prompt="a (red:1.3) cat")).endswith(
        f"Model: tiny, Weighting: plain text, Version: ldm_app {__version__}")  # fmt: skip
    assert "Weighting: plain text" in format_parameters(_params(negative_prompt="[blurry]"))
    assert "Weighting: A1111" in format_parameters(_params(prompt="a (red:1.3) cat", weighting=True))
    assert "Weighting" not in format_parameters(_params())  # no syntax, no weighting: the text as before


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


# ---- never overwrite, race-free --------------------------------------------------------------------------------


def test_save_png_never_overwrites_unless_asked(tmp_path):
    (tmp_path / "a.png").write_bytes(b"keep")
    assert save_png(_image(), tmp_path / "a.png", _params(seed=1)) == tmp_path / "a-1.png"
    assert save_png(_image(), tmp_path / "a.png", _params(seed=2)) == tmp_path / "a-2.png"
    named = [tmp_path / "x.png", tmp_path / "y.png"]
    assert save_png(_image(), tmp_path / "a.png", _params(seed=3), alternatives=named) == tmp_path / "x.png"
    assert (tmp_path / "a.png").read_bytes() == b"keep"
    assert save_png(_image(), tmp_path / "a.png", _params(seed=4), overwrite=True) == tmp_path / "a.png"
    assert read_params(tmp_path / "a.png").seed == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-1.png", "a-2.png", "a.png", "x.png"]  # no temp file


def test_save_png_respects_the_umask(tmp_path):
    import os

    old = os.umask(0o027)
    try:
        path = save_png(_image(), tmp_path / "m.png", _params())
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640


WRITER = """
import sys
from PIL import Image
from ldm_app.pngmeta import save_png
folder, writer, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(count):
    save_png(Image.new("RGB", (8, 8), (writer, i, 0)), f"{folder}/k.png", None, text=f"{writer} {i}")
"""


def test_processes_writing_one_name_at_once_never_replace_each_other(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    writers, count = 4, 15
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(w), str(count)], cwd=root)
             for w in range(writers)]  # fmt: skip
    assert all(p.wait(timeout=120) == 0 for p in procs)
    files = sorted(tmp_path.iterdir())
    assert len(files) == writers * count and not [f for f in files if f.name.startswith(".")]
    seen = set()
    for f in files:
        with Image.open(f) as im:  # every file a complete PNG, each image exactly once
            seen.add(im.getpixel((0, 0))[:2])
            assert read_text_chunks(f)[TEXT_KEY] == "{} {}".format(*im.getpixel((0, 0))[:2])
    assert seen == {(w, i) for w in range(writers) for i in range(count)}


def test_full_disk_leaves_nothing(small_disk):
    (small_disk / "filler").write_bytes(b"\0" * (2 * 2**20 - 2048))
    noisy = Image.frombytes("RGB", (256, 256), bytes(range(256)) * 768)  # does not compress into 2 KiB
    with pytest.raises(UserError, match=r"cannot write .*n\.png: No space left on device"):
        save_png(noisy, small_disk / "n.png", _params())
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_non_utf8_model_path_is_stored(tmp_path):
    params = _params(model="/models/d\udcff")
    path = save_png(_image(), tmp_path / "s.png", params)
    assert read_params(path) == params  # the JSON chunk keeps the bytes (escaped); the text chunk shows them
    assert "Model: d\\udcff" in read_text_chunks(path)[TEXT_KEY]
