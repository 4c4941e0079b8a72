"""LatentDiffusionPipeline: interop with diffusers both ways, seeds, guidance, outputs, loading errors, defaults."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler, StableDiffusionPipeline, VQModel
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

from ldm_app.errors import UserError
from ldm_app.pipeline import LatentDiffusionPipeline, make_generators, resolve_device_dtype, write_sampling_defaults

TOL = 2 / 255  # max per-pixel difference allowed between two runs that should give the same image
STEPS = 3


def generate(pipe, prompt="a red cube on a table", seed=0, **kwargs) -> np.ndarray:
    """(B, 64, 64, 3) images in [0, 1]."""
    kwargs = {"num_inference_steps": STEPS, "output_type": "np", **kwargs}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images


def load(folder, **kwargs) -> LatentDiffusionPipeline:
    pipe = LatentDiffusionPipeline.from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


class UNetCalls:
    """Records the batch size of every U-Net forward call."""

    def __init__(self, unet):
        self.batch_sizes: list[int] = []
        unet.register_forward_hook(lambda module, args, output: self.batch_sizes.append(args[0].shape[0]))


# ---- interop with diffusers -----------------------------------------------------------------------------------


def test_loads_a_folder_saved_by_diffusers(tiny_components, tmp_path):
    sd = StableDiffusionPipeline(
        **tiny_components(), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    sd.set_progress_bar_config(disable=True)
    sd.save_pretrained(tmp_path / "sd")
    index = json.loads((tmp_path / "sd" / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None]  # the entries our pipeline has to tolerate

    ours = load(tmp_path / "sd")
    kwargs = dict(negative_prompt="blurry", guidance_scale=7.5)
    expected = generate(sd, **kwargs)
    assert max_diff(generate(ours, **kwargs), expected) <= TOL
    assert expected.std() > 0.01  # not a blank image: the comparison means something


def test_diffusers_loads_a_folder_saved_by_us(tiny_pipeline_dir):
    ours = load(tiny_pipeline_dir)
    sd = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    sd.set_progress_bar_config(disable=True)
    assert max_diff(generate(sd), generate(ours)) <= TOL
    # model_index.json names StableDiffusionPipeline, so plain diffusers resolves the folder by itself too
    assert json.loads((tiny_pipeline_dir / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert type(DiffusionPipeline.from_pretrained(tiny_pipeline_dir)) is StableDiffusionPipeline


def test_save_load_round_trip(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path / "m")
    assert not list((tmp_path / "m").rglob("*.bin"))  # safetensors only
    assert max_diff(generate(load(tmp_path / "m")), generate(tiny_pipeline)) <= TOL


def test_a_saved_folder_does_not_record_where_its_parts_were_loaded_from(tiny_pipeline_dir, tmp_path):
    private = tmp_path / "alice_private_project"
    shutil.copytree(tiny_pipeline_dir, private)
    loaded = load(private)
    assert loaded.unet.config._name_or_path == str(private / "unet")  # diffusers records it on load ...
    loaded.save_pretrained(tmp_path / "shared")
    written = [p.read_text() for p in (tmp_path / "shared").rglob("*.json")]
    assert len(written) >= 5 and not any("alice_private_project" in text for text in written)  # ... we drop it
    assert max_diff(generate(load(tmp_path / "shared")), generate(loaded)) <= TOL


def test_bundled_model_records_no_maker_paths_in_its_component_configs():
    from pathlib import Path

    from ldm_app import DEFAULT_MODEL

    configs = list(Path(DEFAULT_MODEL).glob("*/config.json"))
    assert len(configs) >= 3 and not any("_name_or_path" in json.loads(p.read_text()) for p in configs)


def test_vq_autoencoder_round_trip(tiny_components, tmp_path):
    pipe = LatentDiffusionPipeline(**tiny_components(vae="vq"))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "vq")
    index = json.loads((tmp_path / "vq" / "model_index.json").read_text())
    assert index["_class_name"] == "LatentDiffusionPipeline" and index["vae"] == ["diffusers", "VQModel"]
    loaded = load(tmp_path / "vq")
    assert isinstance(loaded.vae, VQModel)
    assert max_diff(generate(loaded), generate(pipe)) <= TOL


# ---- seeds, guidance, outputs ---------------------------------------------------------------------------------


def test_same_seed_same_pixels(tiny_pipeline):
    assert max_diff(generate(tiny_pipeline, seed=3), generate(tiny_pipeline, seed=3)) == 0
    assert max_diff(generate(tiny_pipeline, seed=3), generate(tiny_pipeline, seed=4)) > TOL


def test_batch_of_prompts_follows_the_seed_rule(tiny_pipeline):
    """Image i of a batch (prompt-major order) comes from generator i."""
    prompts = ["a cat", "a dog"]
    batch = tiny_pipeline(prompts, num_images_per_prompt=2, num_inference_steps=STEPS, output_type="np",
                          generator=make_generators(100, 4)).images
    assert batch.shape == (4, 64, 64, 3)
    assert max_diff(batch[3], generate(tiny_pipeline, "a dog", seed=103)[0]) <= TOL
    assert max_diff(batch[0], generate(tiny_pipeline, "a cat", seed=100)[0]) <= TOL


def test_guidance_batches_uncond_and_cond_in_one_unet_call(tiny_pipeline):
    calls = UNetCalls(tiny_pipeline.unet)
    generate(tiny_pipeline, ["a", "b"], guidance_scale=7.5)
    assert calls.batch_sizes == [4] * STEPS  # [uncond; cond] for 2 prompts, once per step


def test_guidance_scale_one_is_conditional_only(tiny_pipeline):
    calls = UNetCalls(tiny_pipeline.unet)
    generate(tiny_pipeline, guidance_scale=1.0)
    assert calls.batch_sizes == [1] * STEPS
    # there is no unconditional pass for a negative prompt to act through: refused, not silently dropped
    with pytest.raises(UserError, match="negative prompt acts only through classifier-free guidance"):
        generate(tiny_pipeline, guidance_scale=1.0, negative_prompt="ugly")
    guided = [generate(tiny_pipeline, guidance_scale=5.0, negative_prompt=n) for n in ("ugly", "something else")]
    assert max_diff(*guided) > 0  # ...whereas with guidance the negative prompt does matter


def test_output_types(tiny_pipeline):
    pil = generate(tiny_pipeline, output_type="pil")
    assert len(pil) == 1 and isinstance(pil[0], Image.Image) and pil[0].size == (64, 64)
    pt = generate(tiny_pipeline, output_type="pt")
    assert pt.shape == (1, 3, 64, 64) and 0 <= pt.min() and pt.max() <= 1
    latent = generate(tiny_pipeline, output_type="latent")
    assert latent.shape == (1, 4, 8, 8)
    as_tuple = tiny_pipeline("a", num_inference_steps=1, output_type="np", return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].shape == (1, 64, 64, 3)


def test_progress_bar_config(tiny_pipeline, capsys):
    tiny_pipeline.set_progress_bar_config(disable=False, desc="sampling")
    generate(tiny_pipeline)
    shown = capsys.readouterr().err
    assert "sampling: 100%" in shown and f"{STEPS}/{STEPS}" in shown
    tiny_pipeline.set_progress_bar_config(disable=True)
    generate(tiny_pipeline)
    assert "sampling" not in capsys.readouterr().err


def test_long_prompt_is_truncated_with_one_warning_of_ours(tiny_pipeline, caplog):
    long_prompt = " ".join(["word"] * 100) + " tail"
    libraries = [logging.getLogger("diffusers"), logging.getLogger("transformers")]  # they don't propagate
    for lib in libraries:
        lib.addHandler(caplog.handler)
    try:
        image = generate(tiny_pipeline, long_prompt)
    finally:
        for lib in libraries:
            lib.removeHandler(caplog.handler)
    assert image.shape == (1, 64, 64, 3)
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(messages) == 1 and "tokens, above the 77 this model's text encoder takes" in messages[0], messages
    assert "is truncated" in messages[0] and messages[0].endswith("word tail' is left out"), messages


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=60), "height"),
        (dict(width=0), "width"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(prompt=[]), "prompt"),
        (dict(prompt=["a", "b"], negative_prompt=["x"]), "negative_prompt"),
        (dict(output_type="jpg"), "output_type"),
        (dict(guidance_scale="high"), "guidance_scale"),
        (dict(negative_prompt=3), "negative_prompt"),
        (dict(generator=make_generators(0, 2)), "generators"),
        (dict(latents=torch.zeros(1, 4, 4, 4)), "latents"),
    ],
)
def test_bad_arguments_are_user_errors(tiny_pipeline, kwargs, message):
    kwargs = {"prompt": "a", "num_inference_steps": 1, **kwargs}
    with pytest.raises(UserError, match=message):
        tiny_pipeline(**kwargs)


# ---- sampling defaults stored with the model ------------------------------------------------------------------


def test_fallback_defaults_without_file(tiny_pipeline_dir):
    pipe = load(tiny_pipeline_dir)
    assert pipe.sampling_defaults == {}
    assert pipe.resolve_defaults(None, None, None, None) == (64, 64, 50, 7.5)


def test_sampling_defaults_file_is_read_used_and_saved(tiny_pipeline_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_pipeline_dir, folder)
    defaults = {"sampler": "euler", "num_inference_steps": 2, "guidance_scale": 1.0, "height": 32, "width": 48}
    (folder / "ldm_app.json").write_text(json.dumps({"sampling": defaults}))

    pipe = load(folder)
    assert pipe.sampling_defaults == defaults
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    calls = UNetCalls(pipe.unet)
    image = pipe("a cat").images[0]
    assert image.size == (48, 32) and calls.batch_sizes == [1, 1]  # 2 steps, guidance 1: no uncond branch
    pipe("a cat", num_inference_steps=3, guidance_scale=3.0)  # the caller's values win
    assert calls.batch_sizes[2:] == [2, 2, 2]

    pipe.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "ldm_app.json").read_text()) == {"sampling": defaults}
    assert type(load(tmp_path / "saved", sampler="ddpm").scheduler).__name__ == "DDPMScheduler"  # explicit wins


def test_a_stored_timestep_grid_is_used_at_the_stored_settings_only(tiny_pipeline_dir, tmp_path):
    """sampling.timesteps (a tuned few-step grid) is the U-Net's timesteps when a call samples as stored (stored
    sampler, stored steps: also when the caller names them), and the same image as diffusers' `timesteps=`; another
    step count or sampler uses the sampler's own spacing."""
    folder = tmp_path / "m"
    shutil.copytree(tiny_pipeline_dir, folder)
    grid = [999, 600, 300, 80]
    write_sampling_defaults(folder, {"sampler": "dpm++", "num_inference_steps": 4, "guidance_scale": 1.0,
                                     "timesteps": grid})
    pipe = load(folder)
    seen: list[int] = []
    pipe.unet.register_forward_hook(lambda module, args, output: seen.append(int(args[1].flatten()[0])))

    def run(**kwargs):
        seen.clear()
        image = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images
        return list(seen), image

    stored, image = run()
    assert stored == grid
    assert run(num_inference_steps=4, sampler="dpm++")[0] == grid  # named, but as stored
    assert np.array_equal(run(timesteps=grid)[1], image)  # diffusers' own argument, same grid: same image
    own = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    own.set_timesteps(5)
    assert run(num_inference_steps=5)[0] == own.timesteps.tolist()  # the sampler's own spacing
    assert run(num_inference_steps=4, sampler="euler")[0] != grid
    assert run(timesteps=[999, 500])[0] == [999, 500]  # the caller's grid wins
    with pytest.raises(UserError, match="the ddim sampler cannot take a timesteps grid.*dpm\\+\\+"):
        run(timesteps=[999, 500], sampler="ddim")


@pytest.mark.parametrize(
    "content, message",
    [
        ({"sampling": {"steps": 3}}, "sampling.steps"),
        ({"sampling": {"guidance_scale": "high"}}, "sampling.guidance_scale"),
        ({"sampling": {"sampler": "heun"}}, "heun"),
        ({"sampling": {"num_inference_steps": 2, "timesteps": [999, 999]}}, "strictly decreasing"),
        ({"sampling": {"num_inference_steps": 3, "timesteps": [999, 500]}}, "one per step"),
        ({"sampling": {"timesteps": [999.5]}}, "whole timesteps"),
        ({"sampling": {"num_inference_steps": 2, "timesteps": [1200, 500]}},
         "ldm_app.json: sampling.timesteps starts at 1200, beyond this model's 1000 training timesteps"),
        ({"other": {}}, "sampling"),
    ],
)
def test_bad_sampling_defaults_file(tiny_pipeline_dir, tmp_path, content, message):
    folder = tmp_path / "m"
    shutil.copytree(tiny_pipeline_dir, folder)
    (folder / "ldm_app.json").write_text(json.dumps(content))
    with pytest.raises(UserError, match=message):
        load(folder)


# ---- loading errors -------------------------------------------------------------------------------------------


@pytest.fixture
def model_copy(tiny_pipeline_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_pipeline_dir, folder)
    return folder


def test_unknown_sampler_is_refused_before_loading(tiny_pipeline_dir):
    with pytest.raises(UserError, match="euler_a"):  # the message lists the valid names
        load(tiny_pipeline_dir, sampler="nope")


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load(tmp_path / "nope")


def test_missing_component_is_named(model_copy):
    shutil.rmtree(model_copy / "vae")
    with pytest.raises(UserError, match="'vae'"):
        load(model_copy)


@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_truncated_weights_name_the_file(model_copy, component):
    weights = next((model_copy / component).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match=weights.name) as err:
        load(model_copy)
    assert "\n" not in str(err.value)


def test_pickle_weights_are_never_loaded(model_copy):
    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(UserError, match="safetensors"):
        load(model_copy)


def test_broken_component_config_is_a_user_error(model_copy):
    (model_copy / "unet" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot load"):
        load(model_copy)


# ---- devices, attention, scheduler fixes ----------------------------------------------------------------------


def test_resolve_device_dtype():
    assert resolve_device_dtype("cpu", "auto") == (torch.device("cpu"), torch.float32)
    with pytest.raises(UserError, match="fp16"):
        resolve_device_dtype("cpu", "fp16")
    with pytest.raises(UserError, match="device"):
        resolve_device_dtype("tpu", "auto")
    with pytest.raises(UserError, match="dtype"):
        resolve_device_dtype("cpu", "fp8")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="not available"):
            resolve_device_dtype("cuda", "auto")
        assert resolve_device_dtype("auto", "auto")[1] == torch.float32


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="tests the fallback without xformers")
def test_xformers_request_falls_back_to_sdpa(tiny_pipeline, caplog):
    with caplog.at_level(logging.INFO, logger="ldm_app.pipeline"):
        tiny_pipeline.enable_xformers_memory_efficient_attention()
    assert len(caplog.records) == 1 and "xformers" in caplog.records[0].getMessage()
    assert all(isinstance(p, AttnProcessor2_0) for p in tiny_pipeline.unet.attn_processors.values())
    assert generate(tiny_pipeline).shape == (1, 64, 64, 3)


def test_scheduler_is_made_latent_safe(tiny_components):
    """Like diffusers' SD pipeline: no x0 clipping in latent space and steps_offset=1, so both give one image."""
    components = tiny_components(scheduler="ddpm")
    components["scheduler"] = type(components["scheduler"]).from_config(
        components["scheduler"].config, clip_sample=True, steps_offset=0
    )
    pipe = LatentDiffusionPipeline(**components)
    assert pipe.scheduler.config.clip_sample is False and pipe.scheduler.config.steps_offset == 1


@pytest.mark.parametrize("component, source", [("unet", "vae"), ("text_encoder", "vae"), ("vae", "unet")])
def test_weights_of_another_component_are_one_line_error(model_copy, component, source):
    """diffusers left such weights on the meta device (a "meta tensor" error at the first call) and transformers
    initialized them at random (a text encoder that silently ignores the prompt)."""
    target = next((model_copy / component).glob("*.safetensors"))
    shutil.copy(next((model_copy / source).glob("*.safetensors")), target)
    with pytest.raises(UserError, match=f"{component}: the weights do not match its config.json") as err:
        load(model_copy)
    assert "\n" not in str(err.value) and "another component's weights" in str(err.value)


def test_sampler_argument_is_for_one_call_only(tiny_pipeline):
    own = tiny_pipeline.scheduler
    per_call = generate(tiny_pipeline, seed=1, sampler="euler_a")
    assert tiny_pipeline.scheduler is own and own.num_inference_steps is None  # never stepped
    tiny_pipeline.set_sampler("euler_a")
    assert max_diff(per_call, generate(tiny_pipeline, seed=1)) == 0
    tiny_pipeline.scheduler = own
    assert max_diff(per_call, generate(tiny_pipeline, seed=1)) > TOL  # ddim gives another image


def test_calls_do_not_share_scheduler_state(tiny_pipeline):
    """dpm++ keeps its previous outputs between steps: a second call with other steps starts clean."""
    tiny_pipeline.set_sampler("dpm++")
    first = generate(tiny_pipeline, seed=2)
    generate(tiny_pipeline, seed=3, num_inference_steps=5)
    assert max_diff(first, generate(tiny_pipeline, seed=2)) == 0
