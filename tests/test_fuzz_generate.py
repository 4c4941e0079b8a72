"""Fuzzing generate.py's command line and the pipeline call's keyword arguments (hypothesis, bounded in time).

Property: any input ends in success or in one `UserError` line: never another exception (a traceback), and never
a file written for an input that was refused. Small limits keep every accepted input cheap (<= 2 steps, 64 px,
2 images).
"""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from ldm_app import limits
from ldm_app.errors import UserError
from ldm_app.generate import main
from ldm_app.pipeline import LatentDiffusionPipeline
from ldm_app.pngmeta import ImageParams, save_png

SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))
SMALL = dict(max_steps=2, max_image_side=64, max_images_per_call=2, max_images_per_command=2)

HOSTILE_NUMBERS = ["nan", "-nan", "inf", "-inf", "1e308", "-1", "0", "1", "2", "3", "8", "16", "64", "72", "1.5",
                   "9" * 30, "-" + "9" * 30, "9" * 5000, "0x10", "1_000", " 2 ", "", "1e-308", "NaN", "Infinity"]  # fmt: skip
ODD_TEXT = st.one_of(
    st.sampled_from(["", " ", "a red circle", "\udcff\udcfe", "a \ud800 b", "-", "--", "--model", "é柴犬",
                     "x" * 300, "../..", ".png", "a\nb", "\t"]),  # fmt: skip
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=12),
    st.text(alphabet=st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF), min_size=1, max_size=3),
)
VALID = [("--steps", "1"), ("--steps", "2"), ("--guidance_scale", "3"), ("--height", "32"), ("--width", "32"),
         ("--num_images", "2"), ("--batch_size", "2"), ("--seed", "7"), ("--scheduler", "euler_a"), ("--grid",)]
NUMBER_FLAGS = ["--steps", "--guidance_scale", "--num_images", "--batch_size", "--height", "--width", "--seed"]
TEXT_FLAGS = ["--negative_prompt", "--scheduler", "--sampler", "--device", "--dtype"]
BARE_FLAGS = ["--grid", "--overwrite"]


@pytest.fixture(scope="module")
def fuzz_files(tmp_path_factory, tiny_pipeline_dir):
    """A valid PNG, one storing NaN guidance, a text file, a prompt file, next to the tiny model."""
    root = tmp_path_factory.mktemp("fuzz_inputs")
    params = ImageParams("a cat", "", 1, 1, 2.0, "ddim", 32, 32, str(tiny_pipeline_dir))
    save_png(Image.new("RGB", (8, 8)), root / "ok.png", params)
    bad = params.to_json().replace('"guidance_scale": 2.0', '"guidance_scale": NaN')
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("ldm_app", bad)
    Image.new("RGB", (8, 8)).save(root / "nan.png", pnginfo=info)
    (root / "notes.txt").write_text("not an image")
    (root / "prompts.txt").write_text("a red circle\n\na blue square\n")
    return root


@pytest.fixture(autouse=True)
def _small_limits():
    torch.set_num_threads(1)
    limits.configure(**SMALL)
    yield
    limits.reset()


def argv_strategy(files):
    number_arg = st.tuples(st.sampled_from(NUMBER_FLAGS), st.sampled_from(HOSTILE_NUMBERS))
    text_arg = st.tuples(st.sampled_from(TEXT_FLAGS), st.one_of(st.sampled_from(["ddim", "euler_a", "dpm++", "ddpm",
                                                                                  "cpu", "auto", "fp32", "fp16"]),
                                                                 ODD_TEXT))  # fmt: skip
    file_arg = st.tuples(st.sampled_from(["--from_png", "--from_file"]),
                         st.sampled_from([str(files / n) for n in ("ok.png", "nan.png", "notes.txt", "prompts.txt",
                                                                   "missing.png")]))  # fmt: skip
    bare = st.sampled_from(BARE_FLAGS).map(lambda f: (f,))
    hostile = st.one_of(number_arg, text_arg, file_arg, bare)
    prompt = st.one_of(st.just(("a red circle",)), st.just(()), ODD_TEXT.map(lambda t: (t,)))
    # a prompt (odd one time in three), valid flags, and 0-2 hostile ones after them
    return st.tuples(prompt, st.lists(st.sampled_from(VALID), max_size=4), st.lists(hostile, max_size=2))


@settings(max_examples=60, **SETTINGS)
@given(data=st.data())
def test_cli_never_tracebacks_and_writes_nothing_when_refused(data, fuzz_files, tiny_pipeline_dir, tmp_path_factory):
    prompt, options, hostile = data.draw(argv_strategy(fuzz_files))
    out = tmp_path_factory.mktemp("out")
    output = data.draw(st.sampled_from([out / "o", out / "k.png", out / "sub" / "k.png", out / "x.jpg"]))
    # defaults first (a later flag wins): the tiny model's own 50 steps are above the small limit
    argv = [*prompt, "--model", str(tiny_pipeline_dir), "--output", str(output), "--device", "cpu", "--steps", "1"]
    for option in options + hostile:
        argv += list(option)
    try:
        paths = main(argv)
    except UserError as e:
        event("cli: refused")
        assert "\n" not in str(e), (argv, str(e))
        assert list(out.rglob("*")) == [], (argv, str(e))  # refused: nothing written, not even a folder
    except SystemExit as e:  # argparse's --help-like exits only (abbreviations such as --h)
        assert e.code == 0, argv
    else:
        event("cli: images written")
        assert paths and all(p.is_file() for p in paths), argv
        assert len(paths) <= SMALL["max_images_per_command"] + 1  # + the grid
    finally:
        shutil.rmtree(out, ignore_errors=True)


ANY = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 2, 8, 32, 64, 72, 1.0, 2.0, "2", "", "np"]), ODD_TEXT, st.lists(st.integers(0, 3), max_size=3),
)  # fmt: skip


def generators(n):
    return [torch.Generator().manual_seed(k) for k in range(n)]


# per keyword: (values that are fine under SMALL, hostile values)
PIPE_ARGS = {
    "prompt": (st.sampled_from(["a cat", ["a", "b"], "", "é柴犬 ☕"]),
               st.one_of(ODD_TEXT, st.lists(ODD_TEXT, max_size=3), ANY)),
    "negative_prompt": (st.sampled_from([None, "", "blurry"]), st.one_of(ODD_TEXT, st.lists(ODD_TEXT, max_size=3), ANY)),
    "height": (st.sampled_from([32, 48, 64]), st.one_of(st.sampled_from([8, 16, 72, 128, 10**9]), ANY)),
    "width": (st.sampled_from([32, 40, 64]), st.one_of(st.sampled_from([8, 16, 72, 128, 10**9]), ANY)),
    "num_inference_steps": (st.sampled_from([1, 2]), st.one_of(st.sampled_from([3, 1000, 10**7]), ANY)),
    "guidance_scale": (st.sampled_from([0.0, 1.0, 3.0, 7]),
                       st.one_of(st.sampled_from([1e308, math.nan, math.inf, -1.0, 51]), ANY)),
    "num_images_per_prompt": (st.just(1), st.one_of(st.sampled_from([2, 3, 10**6]), ANY)),
    "generator": (st.sampled_from([None, 0]).map(lambda n: None if n is None else torch.Generator()),
                  st.one_of(st.integers(0, 3).map(generators), ANY)),
    "latents": (st.none(), st.one_of(
        st.sampled_from([(1, 4, 8, 8), (2, 4, 8, 8), (1, 4, 4, 4), (1, 3, 8, 8)]).map(torch.randn),
        st.just(torch.full((1, 4, 8, 8), math.nan)), st.just(torch.zeros(1, 4, 8, 8, dtype=torch.int32)), ANY)),
    "output_type": (st.sampled_from(["pil", "np", "pt", "latent"]), ANY),
    "sampler": (st.sampled_from(["ddim", "ddpm", "euler_a", "dpm++", "pndm", "euler", "plms"]), ANY),
}  # fmt: skip


@st.composite
def pipe_kwargs(draw):
    """Valid values for some keywords, hostile ones for 0-3 of them (so about a third of the calls are clean)."""
    names = sorted(PIPE_ARGS)
    given_names = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
    hostile = draw(st.lists(st.sampled_from(names), unique=True, max_size=3))
    kwargs = {name: draw(PIPE_ARGS[name][0]) for name in given_names}
    kwargs.update({name: draw(PIPE_ARGS[name][1]) for name in hostile})
    return kwargs


@pytest.fixture(scope="module")
def fuzz_pipeline(tiny_pipeline_dir):
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@settings(max_examples=150, **SETTINGS)
@given(kwargs=pipe_kwargs())
def test_pipeline_call_never_tracebacks(kwargs, fuzz_pipeline):
    kwargs = {"prompt": "a cat", "num_inference_steps": 1, "height": 32, "width": 32, **kwargs}
    try:
        out = fuzz_pipeline(**kwargs)
    except UserError as e:
        event("pipe: refused")
        assert "\n" not in str(e), (kwargs, str(e))
        return
    event("pipe: images made")
    images = out.images
    count = len(images)
    assert 1 <= count <= SMALL["max_images_per_call"]
    if kwargs.get("output_type", "pil") in ("np", "pt", "latent"):
        assert torch.isfinite(torch.as_tensor(images)).all(), kwargs  # an accepted input never gives NaN pixels
    assert fuzz_pipeline.scheduler.num_inference_steps is None  # the call never stepped the shared scheduler
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
