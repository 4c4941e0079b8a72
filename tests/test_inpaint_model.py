"""An inpainting model: image conditioning by channel-wise concatenation (conditioning.concat=inpaint). Random masks,
the 9-channel U-Net (trained from scratch or widened from a text-to-image folder), folders that diffusers' own
StableDiffusionInpaintPipeline loads, exact resume, and one-line errors for what cannot work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_app.conditioning import inpaint_condition, masked_image
from ldm_app.errors import UserError, run_cli
from ldm_app.masks import MASK_KINDS, MASK_SHARES, component, foreground, object_mask, random_masks, stroke_mask
from ldm_app.training.ldm import main as train_main
from ldm_helpers import CONFIG, max_abs_diff, run_args, weights

INPAINT = ["--set", "conditioning.concat=inpaint"]


def _gray_image_with_square(side: int = 32) -> torch.Tensor:
    """(3, side, side) in [-1, 1]: gray, a red square at rows 4..11, columns 6..13, a blue one at rows 20..27."""
    image = torch.zeros(3, side, side)
    image[:, 4:12, 6:14] = torch.tensor([0.8, -0.8, -0.8])[:, None, None]
    image[:, 20:28, 18:26] = torch.tensor([-0.8, -0.6, 0.8])[:, None, None]
    return image


# ---- masks -------------------------------------------------------------------------------------------------------


def test_an_object_mask_is_one_objects_box_grown_by_the_margin():
    image = _gray_image_with_square()
    assert foreground(image).sum() == 2 * 64
    assert component(foreground(image), (5, 7)).sum() == 64  # the red square alone: the blue one is not connected
    for seed in range(20):
        m = object_mask(image, torch.Generator().manual_seed(seed))
        ys, xs = m.nonzero(as_tuple=True)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        red = y0 <= 4 and y1 >= 12 and x0 <= 6 and x1 >= 14 and y1 <= 12 + 6 and x0 >= 6 - 6
        blue = y0 <= 20 and y1 >= 28 and x0 <= 18 and x1 >= 26 and y0 >= 20 - 6
        assert red != blue, (seed, y0, y1, x0, x1)  # exactly one object, whole, margin <= 6
        assert m.sum() == (y1 - y0) * (x1 - x0)  # a filled box
    assert object_mask(torch.zeros(3, 32, 32), torch.Generator()) is None  # nothing but background


def test_random_masks_are_binary_seeded_and_of_every_kind():
    pixels = _gray_image_with_square().repeat(64, 1, 1, 1)
    a = random_masks(pixels, torch.Generator().manual_seed(3))
    b = random_masks(pixels, torch.Generator().manual_seed(3))
    assert a.shape == (64, 1, 32, 32) and torch.equal(a, b)  # the same generator, the same masks (exact resume)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    full = (a.flatten(1).mean(1) == 1).sum()
    assert 1 <= full <= 20  # 10% of 64 whole-image masks
    assert (a.flatten(1).sum(1) > 0).all()
    assert len(MASK_KINDS) == len(MASK_SHARES) and abs(sum(MASK_SHARES) - 1) < 1e-9
    stroke = stroke_mask(32, 32, torch.Generator().manual_seed(0))
    assert 0 < stroke.mean() < 0.9 and set(stroke.unique().tolist()) <= {0.0, 1.0}


def test_the_condition_is_diffusers_layout():
    pixels = _gray_image_with_square()[None]
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :16, :] = 1
    blank = masked_image(pixels, mask)
    assert blank[..., :16, :].abs().max() == 0 and torch.equal(blank[..., 16:, :], pixels[..., 16:, :])
    cond = inpaint_condition(mask, torch.randn(1, 4, 8, 8))
    assert cond.shape == (1, 5, 8, 8) and cond[0, 0, :4].eq(1).all() and cond[0, 0, 4:].eq(0).all()


# ---- training ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inpaint_run(ldm_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("inpaint") / "run"
    train_main(run_args(ldm_files, out, "--max_train_steps", "2", *INPAINT))
    return out


def test_an_inpainting_run_writes_a_folder_diffusers_inpaint_pipeline_runs(inpaint_run):
    from diffusers import StableDiffusionInpaintPipeline

    assert json.loads((inpaint_run / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
    unet = json.loads((inpaint_run / "unet" / "config.json").read_text())
    assert (unet["in_channels"], unet["out_channels"]) == (9, 4)  # [x_t, mask, masked-image latents] -> eps
    pipe = StableDiffusionInpaintPipeline.from_pretrained(inpaint_run, safety_checker=None)  # diffusers itself
    pipe.set_progress_bar_config(disable=True)
    image, mask = Image.new("RGB", (32, 32), (128, 128, 128)), Image.new("L", (32, 32), 255)
    out = pipe("a red circle", image=image, mask_image=mask, num_inference_steps=2, height=32, width=32,
               output_type="np").images  # fmt: skip
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


def test_our_pipeline_runs_the_model_and_refuses_text_to_image(inpaint_run, tmp_path, capsys):
    from ldm_app.generate import main as generate_main
    from ldm_app.pipeline import LatentDiffusionInpaintPipeline, LatentDiffusionPipeline

    pipe = LatentDiffusionInpaintPipeline.from_pretrained(inpaint_run)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.full((32, 32, 3), 200, np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    out = pipe("a red circle", image=image, mask_image=Image.fromarray(mask), num_inference_steps=2,
               paste_back=True, output_type="np").images[0]  # default method: "model"
    outside = (out * 255).round()[mask == 0]
    assert np.abs(outside - 200).max() == 0  # paste-back: exactly the input outside the mask
    with pytest.raises(UserError, match="needs an inpainting model|takes no other method"):
        pipe("a red circle", image=image, mask_image=Image.fromarray(mask), inpaint="repaint", num_inference_steps=2)
    text = LatentDiffusionPipeline.from_pretrained(inpaint_run)
    with pytest.raises(UserError, match="this is an inpainting model"):
        text("a red circle", num_inference_steps=2)
    code = run_cli(generate_main, ["a red circle", "--model", str(inpaint_run), "--output", str(tmp_path / "x.png")])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip() and "Loading weights" not in line]
    assert code == 2 and len(err) == 1 and "inpainting model" in err[0] and not (tmp_path / "x.png").exists()


def test_widening_a_unet_keeps_what_it_computes(tiny_pipeline):
    import copy

    from ldm_app.models import widen_unet_input

    unet = tiny_pipeline.unet
    wide = widen_unet_input(copy.deepcopy(unet), unet.config.in_channels * 2 + 1)
    x, t = torch.randn(2, unet.config.in_channels, 8, 8), torch.tensor([10, 500])
    c = torch.randn(2, 4, unet.config.cross_attention_dim)
    extra = torch.randn(2, unet.config.in_channels + 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(wide(torch.cat([x, extra], 1), t, c).sample, unet(x, t, c).sample)
    assert wide.config.in_channels == 2 * unet.config.in_channels + 1


def test_fine_tuning_a_text_to_image_folder_widens_its_unet(ldm_files, tmp_path):
    text = tmp_path / "text"
    train_main(run_args(ldm_files, text, "--max_train_steps", "1"))
    base = ["--config", str(CONFIG), "--train_data_dir", str(ldm_files.data), "--max_train_steps", "1",
            "--set", "ldm.use_ema=false"]
    argv = [*base, "--pretrained_model", str(text), "--output_dir", str(tmp_path / "ft"), *INPAINT]
    assert train_main(argv).step == 1
    before = weights(text / "unet" / "diffusion_pytorch_model.safetensors")
    after = weights(tmp_path / "ft" / "unet" / "diffusion_pytorch_model.safetensors")
    assert after["conv_in.weight"].shape[1] == 9 and before["conv_in.weight"].shape[1] == 4
    moved = (after["conv_in.weight"][:, :4] - before["conv_in.weight"]).abs().max()
    assert 0 < moved < 0.05  # started from the text-to-image weights, then one step
    # fine-tuning the inpainting folder again: already 9 channels, kept; as a text-to-image run: refused
    again = [*base, "--pretrained_model", str(tmp_path / "ft"), "--output_dir", str(tmp_path / "ft2")]
    with pytest.raises(UserError, match="set conditioning.concat=inpaint"):
        train_main(again)
    assert not (tmp_path / "ft2").exists()


def test_an_inpainting_run_resumes_exactly(ldm_files, tmp_path):
    extra = ("--max_train_steps", "4", "--checkpointing_steps", "2", *INPAINT)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_main(run_args(ldm_files, straight, *extra))
    train_main(run_args(ldm_files, resumed, "--max_train_steps", "2", "--checkpointing_steps", "2", *INPAINT))
    train_main(run_args(ldm_files, resumed, *extra, "--resume_from_checkpoint", "latest"))
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert max_abs_diff(weights(straight / unet), weights(resumed / unet)) <= 1e-5


BAD = {
    "unknown concat": (["--set", "conditioning.concat=depth"], "unknown conditioning.concat 'depth'"),
    "cached latents": ([*INPAINT, "--cache_latents"], "cannot use cached latents"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_inpainting_settings_are_one_line_errors_before_any_work(case, ldm_files, tmp_path, capsys):
    flags, message = BAD[case]
    out = tmp_path / "out"
    code = run_cli(train_main, run_args(ldm_files, out, "--max_train_steps", "1", *flags))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists() or {p.name for p in out.iterdir()} <= {".lock"}


def test_a_vq_autoencoder_is_refused(ldm_files, tmp_path, capsys):
    from ldm_app.config import AutoencoderConfig
    from ldm_app.models import build_autoencoder

    torch.manual_seed(0)
    vq = tmp_path / "vq"
    build_autoencoder(AutoencoderConfig(kind="vq", block_out_channels=(8, 8, 8), norm_num_groups=8,
                                        sample_size=32)).save_pretrained(vq)  # fmt: skip
    argv = run_args(ldm_files, tmp_path / "out", "--max_train_steps", "1", *INPAINT)
    argv[argv.index("--pretrained_vae") + 1] = str(vq)
    code = run_cli(train_main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "needs a KL autoencoder" in err[0]
    assert not (tmp_path / "out").exists()


def test_evaluate_edit_runs_an_inpainting_model_beside_the_other_methods(tiny_pipeline, tiny_judge):
    import copy

    from ldm_app.evaluation.edit import MODEL_SETTINGS, run_edit, setting_name
    from ldm_app.models import widen_unet_input
    from ldm_app.pipeline import LatentDiffusionInpaintPipeline

    components = {k: v for k, v in tiny_pipeline.components.items() if v is not None}
    components["unet"] = widen_unet_input(copy.deepcopy(tiny_pipeline.unet), 9)
    model = LatentDiffusionInpaintPipeline(**components)
    settings = (("blend", False, {}),)
    result = run_edit(tiny_pipeline, tiny_judge, num=2, batch_size=2, strengths=(0.5,), settings=settings,
                      log=lambda _: None, inpaint_model=model)  # fmt: skip
    inp = result.report["inpaint"]
    for method, paste_back, extra in MODEL_SETTINGS:
        r = inp[setting_name(method, paste_back, extra)]
        assert r["method"] == method and r["seconds_per_image"] > 0 and r["cpu_seconds_per_image"] > 0
    assert inp["model+paste_back"]["pixels"]["outside_mask_max_abs_diff"] == 0
    assert inp["model"]["pixels"]["outside_mask_max_abs_diff"] > 0  # a random model changes it
    assert result.report["settings"]["inpaint_settings"][:3] == ["blend", "model", "model+paste_back"]
    assert inp["model"]["guidance_scale"] == tiny_pipeline.resolve_defaults(None, None, None, None)[3]
    with pytest.raises(UserError, match="takes 9"):
        run_edit(tiny_pipeline, tiny_judge, num=2, batch_size=2, strengths=(0.5,), settings=settings,
                 log=lambda _: None, inpaint_model=tiny_pipeline)  # fmt: skip


def test_evaluate_edit_runs_a_guidance_distilled_model_without_guidance(tiny_pipeline, tiny_judge):
    """Two inpainting models in one run (rows model..., model2...): the second stores guidance 1 (train_distill's
    method=guidance) and samples at 1, one U-Net pass a step; the first at the text model's guidance, two."""
    import copy

    from ldm_app.evaluation.edit import run_edit
    from ldm_app.models import widen_unet_input
    from ldm_app.pipeline import LatentDiffusionInpaintPipeline

    components = {k: v for k, v in tiny_pipeline.components.items() if v is not None}
    components["unet"] = widen_unet_input(copy.deepcopy(tiny_pipeline.unet), 9)
    teacher = LatentDiffusionInpaintPipeline(**components)
    student = LatentDiffusionInpaintPipeline(**components)
    teacher.sampling_defaults = {"guidance_scale": 3.0}
    student.sampling_defaults = {"guidance_scale": 1.0}
    batches = []
    forward = components["unet"].forward

    def counting(sample, *a, **kw):
        batches.append(sample.shape[0])
        return forward(sample, *a, **kw)

    components["unet"].forward = counting
    result = run_edit(tiny_pipeline, tiny_judge, num=2, batch_size=2, strengths=(), settings=(),
                      log=lambda _: None, inpaint_model=[teacher, student])  # fmt: skip
    components["unet"].forward = forward
    inp = result.report["inpaint"]
    guidance = tiny_pipeline.resolve_defaults(None, None, None, None)[3]
    assert guidance > 1 and [inp[k]["guidance_scale"] for k in ("model", "model2+paste_back")] == [guidance, 1.0]
    assert all(inp[k]["method"] == "model" for k in ("model", "model2"))
    assert set(batches) == {4, 2}  # CFG batches (2 images x 2) for the teacher, single passes for the student


def test_the_seam_measure_sees_an_edge_and_only_at_the_mask():
    from ldm_app.evaluation.edit import seam

    image = np.full((16, 16, 3), 128, np.uint8)
    mask = np.zeros((16, 16), bool)
    mask[4:12, 4:12] = True
    assert seam(image, mask) == 0.0
    image[4:12, 4:12] = 100  # a flat patch filling the mask exactly: every pair across the edge differs by 28
    assert seam(image, mask) == 28.0
    image[:] = 128
    image[6:10, 6:10] = 0  # an object well inside the mask: no seam
    assert seam(image, mask) == 0.0
    assert seam(image, np.zeros((16, 16), bool)) == 0.0


def test_generate_inpaints_with_the_model(inpaint_run, tmp_path):
    from ldm_app.generate import main as generate_main
    from ldm_app.pngmeta import read_params

    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "scene.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    path = generate_main(["a red circle", "--model", str(inpaint_run), "--init_image", str(tmp_path / "scene.png"),
                          "--mask", str(tmp_path / "mask.png"), "--steps", "2", "--output", str(tmp_path / "o.png")])[0]  # fmt: skip
    assert read_params(path).inpaint == "model"
    with Image.open(path) as im:
        out = np.asarray(im.convert("RGB")).astype(int)
    assert np.abs(out[mask == 0] - 90).max() == 0  # paste-back, generate's default with a mask
