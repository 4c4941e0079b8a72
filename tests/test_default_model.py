"""The bundled default model (ldm_app.DEFAULT_MODEL, made by recipes/shapes.sh): small, safetensors only, loads
offline in our pipeline and in diffusers', and generate.py with no --model writes a real image with the model's
own stored sampling settings."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_app import DEFAULT_MODEL
from ldm_app.generate import main as generate_main
from ldm_app.pipeline import LatentDiffusionPipeline, read_sampling_defaults
from ldm_app.pngmeta import read_params

FOLDER = Path(DEFAULT_MODEL)
MAX_BYTES = 30 * 2**20


def test_bundled_model_is_small_and_safetensors_only():
    files = [p for p in FOLDER.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES
    assert {p.suffix for p in files} <= {".json", ".txt", ".safetensors"}  # no pickles, no stray binaries
    assert {p.parent.name for p in files if p.suffix == ".safetensors"} == {"unet", "vae", "text_encoder"}


def test_bundled_model_loads_offline_with_its_sampling_defaults():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: any hub access would fail
    pipe = LatentDiffusionPipeline.from_pretrained(DEFAULT_MODEL)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}  # fp16 on disk
    defaults = read_sampling_defaults(FOLDER)
    assert set(defaults) == {"sampler", "num_inference_steps", "guidance_scale", "height", "width", "timesteps"}
    assert pipe.sampling_defaults == defaults


def test_bundled_model_loads_in_diffusers_stable_diffusion_pipeline():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        DEFAULT_MODEL, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        torch_dtype=torch.float32,
    )
    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels


def test_generate_without_model_uses_bundled_model_and_its_defaults(tmp_path):
    (path,) = generate_main(["a large red circle in the center on a white background", "--seed", "0",
                             "--output", str(tmp_path), "--device", "cpu"])
    defaults = read_sampling_defaults(FOLDER)
    params = read_params(path)
    assert Path(params.model) == FOLDER.resolve()
    assert (params.sampler, params.steps, params.guidance_scale) == (
        defaults["sampler"], defaults["num_inference_steps"], defaults["guidance_scale"])
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert pixels.shape == (defaults["height"], defaults["width"], 3)
    assert pixels.std() > 10  # not blank: a shape on a background


@pytest.mark.parametrize("prompt, channel", [("a large red square in the center on a white background", 0),
                                             ("a large blue circle in the center on a white background", 2)])
def test_bundled_model_draws_the_asked_colour(prompt, channel, tmp_path):
    """A smoke check that the text conditioning reached the image: the dominant non-background channel of the
    centre matches the prompt's colour (the full measurement is `python -m ldm_app.evaluate ldm`)."""
    pipe = LatentDiffusionPipeline.from_pretrained(DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    h, w, _ = image.shape
    centre = image[h * 3 // 8 : h * 5 // 8, w * 3 // 8 : w * 5 // 8].reshape(-1, 3).mean(0)
    assert centre.argmax() == channel


def test_plain_diffusers_loads_the_bundled_model_as_a_user_types_it():
    """`diffusers.StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL)` with no other argument: every component
    in float32 (the text encoder's weights are fp16 on disk) and the same image as ours, with no safety-checker
    warning (the folder says it has none)."""
    import logging as std_logging

    from diffusers import StableDiffusionPipeline

    records: list[str] = []
    handler = std_logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    std_logging.getLogger("diffusers").addHandler(handler)
    try:
        theirs = StableDiffusionPipeline.from_pretrained(FOLDER)
    finally:
        std_logging.getLogger("diffusers").removeHandler(handler)
    assert {theirs.text_encoder.dtype, theirs.unet.dtype, theirs.vae.dtype} == {torch.float32}
    assert not any("safety checker" in r for r in records)
    ours = LatentDiffusionPipeline.from_pretrained(FOLDER)
    for pipe in (theirs, ours):
        pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=4, guidance_scale=3.0, height=64, width=64, output_type="np")
    # at the stored sampler and steps ours samples on the stored grid: diffusers takes it as its own timesteps=
    grid = read_sampling_defaults(FOLDER)["timesteps"]
    a = theirs("a small blue square", generator=torch.Generator().manual_seed(0), timesteps=grid, **kwargs).images
    b = ours("a small blue square", generator=torch.Generator().manual_seed(0), sampler=None, **kwargs).images
    assert np.abs(a - b).max() < 2 / 255
