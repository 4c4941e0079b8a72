"""Image-to-image and inpainting pipelines, in our words: what they keep, what they change, what they refuse."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_app.errors import UserError
from ldm_app.pipeline import (
    LatentDiffusionImg2ImgPipeline,
    LatentDiffusionInpaintPipeline,
    LatentDiffusionPipeline,
    check_mask_coverage,
)

STEPS = 6


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def init_image() -> Image.Image:
    pixels = np.full((64, 64, 3), 255, np.uint8)
    pixels[16:48, 8:40] = (220, 30, 30)  # a red block left of centre
    return Image.fromarray(pixels)


@pytest.fixture
def box_mask() -> Image.Image:
    mask = np.zeros((64, 64), np.uint8)
    mask[8:40, 32:64] = 255  # repaint the top right
    return Image.fromarray(mask)


@pytest.fixture(params=["kl", "vq"])
def base(request, tiny_components) -> LatentDiffusionPipeline:
    pipe = LatentDiffusionPipeline(**tiny_components(vae=request.param))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_siblings_share_the_modules_and_the_sampling_defaults(base):
    base.sampling_defaults = {"num_inference_steps": 3}
    for cls in (LatentDiffusionImg2ImgPipeline, LatentDiffusionInpaintPipeline):
        sibling = cls.from_pipe(base)
        assert sibling.unet is base.unet and sibling.vae is base.vae and sibling.text_encoder is base.text_encoder
        assert sibling.sampling_defaults == {"num_inference_steps": 3}
        assert sibling.unet.dtype == base.unet.dtype


def test_img2img_strength_moves_away_from_the_init_image(base, init_image):
    pipe = LatentDiffusionImg2ImgPipeline.from_pipe(base)
    source = np.asarray(init_image, dtype=np.float32) / 255
    distance = []
    for strength in (0.2, 1.0):
        out = pipe("a cat", image=init_image, strength=strength, num_inference_steps=10, generator=_gen(),
                   output_type="np").images[0]  # fmt: skip
        assert out.shape == (64, 64, 3)
        distance.append(np.abs(out - source).mean())
    assert distance[0] < distance[1]  # little noise keeps more of the image (random weights: only the order)


def test_img2img_runs_strength_times_steps_and_the_seed_fixes_the_image(base, init_image):
    pipe = LatentDiffusionImg2ImgPipeline.from_pipe(base)
    a = pipe("a cat", image=init_image, strength=0.5, num_inference_steps=8, generator=_gen(3), output_type="np")
    assert pipe.num_timesteps == 4
    b = pipe("a cat", image=init_image, strength=0.5, num_inference_steps=8, generator=_gen(3), output_type="np")
    np.testing.assert_array_equal(a.images, b.images)


@pytest.mark.parametrize("method", ["blend", "repaint"])
def test_paste_back_keeps_every_unmasked_pixel_exactly(base, init_image, box_mask, method):
    pipe = LatentDiffusionInpaintPipeline.from_pipe(base)
    out = pipe("a cat", image=init_image, mask_image=box_mask, inpaint=method, paste_back=True,
               num_inference_steps=STEPS, jump_length=2, jump_n_sample=2, generator=_gen()).images[0]  # fmt: skip
    got, want, keep = np.asarray(out), np.asarray(init_image), np.asarray(box_mask) == 0
    np.testing.assert_array_equal(got[keep], want[keep])
    assert np.abs(got[~keep].astype(int) - want[~keep]).mean() > 1  # the masked part was generated


@pytest.mark.parametrize("method", ["blend", "repaint"])
def test_the_unmasked_latents_end_as_the_init_images_own(base, init_image, box_mask, method):
    """Outside the mask the final latents are the init image's encoding (so the output there is the autoencoder's
    reconstruction of the input). RePaint encodes with the posterior mode; diffusers' blend samples the KL
    posterior (its own choice), so blend is compared exactly only for a VQ autoencoder (deterministic)."""
    from diffusers import VQModel

    if method == "blend" and not isinstance(base.vae, VQModel):
        pytest.skip("diffusers' blend samples the KL posterior with the call's generator")
    pipe = LatentDiffusionInpaintPipeline.from_pipe(base)
    latents = pipe("a cat", image=init_image, mask_image=box_mask, inpaint=method, num_inference_steps=STEPS,
                   jump_length=2, jump_n_sample=2, harmonize=0.0, generator=_gen(), output_type="latent").images  # fmt: skip
    image = pipe.image_processor.preprocess(init_image)
    encoded = pipe.vae.encode(image)
    own = (encoded.latents if isinstance(pipe.vae, VQModel) else encoded.latent_dist.mode()) * \
        pipe.vae.config.scaling_factor  # fmt: skip
    kept = torch.ones(8, 8, dtype=torch.bool)
    kept[1:5, 4:] = False  # the mask's box [8:40, 32:64] in 8-pixel latent cells
    torch.testing.assert_close(latents[0][:, kept], own[0][:, kept], atol=1e-5, rtol=1e-5)
    assert (latents[0][:, ~kept] - own[0][:, ~kept]).abs().mean() > 1e-2


def test_harmonize_frees_the_last_steps_from_the_known_region(base, init_image, box_mask):
    """harmonize=0: the kept latents end as the init image's encoding; harmonize=0.5: the last half of the steps
    is free, so they end as the model's own (different) latents; paste_back still restores the pixels."""
    pipe = LatentDiffusionInpaintPipeline.from_pipe(base)
    kwargs = dict(image=init_image, mask_image=box_mask, inpaint="repaint", num_inference_steps=STEPS,
                  jump_n_sample=1, generator=_gen())  # fmt: skip
    pinned = pipe("a cat", harmonize=0.0, output_type="latent", **kwargs).images
    free = pipe("a cat", harmonize=0.5, output_type="latent", **dict(kwargs, generator=_gen())).images
    kept = torch.ones(8, 8, dtype=torch.bool)
    kept[1:5, 4:] = False
    assert (pinned[0][:, kept] - free[0][:, kept]).abs().mean() > 1e-3
    out = pipe("a cat", harmonize=0.5, paste_back=True, **dict(kwargs, generator=_gen())).images[0]
    keep = np.asarray(box_mask) == 0
    np.testing.assert_array_equal(np.asarray(out)[keep], np.asarray(init_image)[keep])


def test_repaint_resamples_and_blend_does_not(base, init_image, box_mask):
    pipe = LatentDiffusionInpaintPipeline.from_pipe(base)
    calls = []
    hook = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        for method in ("blend", "repaint"):
            calls.clear()
            pipe("a cat", image=init_image, mask_image=box_mask, inpaint=method, num_inference_steps=10,
                 jump_length=2, jump_n_sample=3, guidance_scale=1.0, generator=_gen())  # fmt: skip
            if method == "blend":
                assert len(calls) == 10
            else:  # every 2 steps, jump back 2 steps twice more: (10 + 2 * 2 * 4) model calls of the schedule
                assert len(calls) == 10 + 2 * 2 * 4 and pipe.num_timesteps == 10 + 2 * (2 * 2 * 4)
    finally:
        hook.remove()


def test_the_pipelines_are_safe_to_call_from_several_threads(base, init_image, box_mask):
    pipe = LatentDiffusionInpaintPipeline.from_pipe(base)
    kwargs = dict(image=init_image, mask_image=box_mask, num_inference_steps=4, output_type="np")
    expected = {m: pipe("a cat", inpaint=m, generator=_gen(), **kwargs).images for m in ("blend", "repaint")}
    results, errors = {}, []

    def run(k: int) -> None:
        method = ("blend", "repaint")[k % 2]
        try:
            results[k] = (method, pipe("a cat", inpaint=method, generator=_gen(), **kwargs).images)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for method, images in results.values():
        np.testing.assert_array_equal(images, expected[method])


def test_a_nine_channel_unet_runs_the_model_path(tiny_components, init_image, box_mask):
    from diffusers import UNet2DConditionModel

    components = tiny_components()
    config = dict(components["unet"].config)
    config["in_channels"] = 9
    components["unet"] = UNet2DConditionModel.from_config(config).eval()
    pipe = LatentDiffusionInpaintPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a cat", image=init_image, mask_image=box_mask, num_inference_steps=3, output_type="np").images
    assert out.shape == (1, 64, 64, 3)
    with pytest.raises(UserError, match="needs an inpainting model|takes no other method"):
        pipe("a cat", image=init_image, mask_image=box_mask, inpaint="repaint", num_inference_steps=3)


BAD_CALLS = {
    "no image": (dict(image=None), "image is required"),
    "a path": (dict(image="cat.png"), "open files with PIL.Image.open"),
    "strength 0": (dict(strength=0.0), r"strength must be in \(0, 1\]"),
    "strength nan": (dict(strength=float("nan")), "strength"),
    "strength 2": (dict(strength=2.0), r"strength must be in \(0, 1\]"),
    "no step left": (dict(strength=0.05, num_inference_steps=10), "leaves no sampling step"),
    "mask size": (dict(mask_image=Image.new("L", (32, 32), 255)), "give a mask of the image's size"),
    "method": (dict(inpaint="magic"), "unknown inpaint method"),
    "repaint strength": (dict(inpaint="repaint", strength=0.5), "starts from pure noise"),
    "blur": (dict(mask_blur=-1), "mask_blur"),
    "jumps": (dict(inpaint="repaint", jump_length=0), "jump_length"),
    "harmonize": (dict(inpaint="repaint", harmonize=1.0), r"harmonize must be in \[0, 1\)"),
}


@pytest.mark.parametrize("case", BAD_CALLS, ids=list(BAD_CALLS))
def test_bad_edit_arguments_are_one_line_errors_that_are_also_value_errors(case, base, init_image, box_mask):
    pipe = LatentDiffusionInpaintPipeline.from_pipe(base)
    kwargs = {**dict(image=init_image, mask_image=box_mask, num_inference_steps=4), **BAD_CALLS[case][0]}
    with pytest.raises(UserError, match=BAD_CALLS[case][1]) as err:
        pipe("a cat", **kwargs)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_all_black_and_all_white_masks_are_refused_for_the_command_line():
    with pytest.raises(UserError, match="all black"):
        check_mask_coverage(Image.new("L", (8, 8), 0))
    with pytest.raises(UserError, match="all white"):
        check_mask_coverage(Image.new("L", (8, 8), 255))
    check_mask_coverage(Image.fromarray(np.eye(8, dtype=np.uint8) * 255))


def test_a_direct_check_call_fills_strength_from_the_call_defaults(base, init_image, box_mask):
    """check_call without strength (as a caller checking before its first image may do) takes __call__'s default
    (diffusers': 0.8 for image-to-image, 1.0 for inpainting) instead of refusing None."""
    img2img = LatentDiffusionImg2ImgPipeline.from_pipe(base)
    inpaint = LatentDiffusionInpaintPipeline.from_pipe(base)
    assert img2img.check_call("a red circle", image=init_image).args["strength"] == 0.8
    assert inpaint.check_call("a red circle", image=init_image, mask_image=box_mask).args["strength"] == 1.0
