"""Classifier guidance (ldm_app.classifier, ldm_app.train_classifier) on the tiny random-weight pipeline."""

from __future__ import annotations

import json

import numpy as np

import pytest
import torch
import torch.nn as nn

from ldm_app.classifier import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ClassifierConfig,
    LatentClassifier,
    check_fits,
    classifier_guided_sample,
    classifier_log_prob_grad,
    load_classifier,
    save_classifier,
)
from ldm_app.errors import UserError

STEPS = 4


def _gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _tiny_classifier(seed: int = 0, **overrides) -> LatentClassifier:
    torch.manual_seed(seed)
    config = ClassifierConfig(num_classes=18, block_out_channels=(32,), layers_per_block=1, **overrides)
    return LatentClassifier(config).eval()


class GaussianClassifier(nn.Module):
    """Hand-made p(y | x): logits_k = -||x - mu_k||^2 / 2 (t ignored), so
    grad_x log p(y | x) = mu_y - sum_k p_k mu_k exactly."""

    def __init__(self, means: torch.Tensor):  # (K, C, h, w)
        super().__init__()
        self.means = means
        self.config = ClassifierConfig(num_classes=len(means), in_channels=means.shape[1], sample_size=means.shape[-1])

    @property
    def num_classes(self) -> int:
        return len(self.means)

    def forward(self, x, t):
        return -0.5 * (x[:, None] - self.means[None]).flatten(2).square().sum(-1)  # (B, K)


def _means() -> torch.Tensor:
    means = torch.zeros(3, 4, 8, 8)
    means[0, 0], means[1, 1], means[2, 2] = 2.0, 2.0, 2.0
    return means


def test_gradient_is_the_log_prob_gradient():
    clf = GaussianClassifier(_means())
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2])
    p = torch.softmax(clf(x, 0), dim=-1)  # (B, K)
    expected = clf.means[y] - torch.einsum("bk,kchw->bchw", p, clf.means)
    torch.testing.assert_close(classifier_log_prob_grad(clf, x, 0, y), expected)


def test_one_step_update_is_algorithm_2(tiny_pipeline):
    """One DDIM step: guided - unguided latents == the DDIM coefficient of eps times -sqrt(1 - abar_t) s grad."""
    from diffusers import DDIMScheduler

    # "trailing" spacing: the one step is at t = 999 (SD's "leading" grid would put it at t = 1, where abar ~ 1)
    tiny_pipeline.scheduler = DDIMScheduler.from_config(tiny_pipeline.scheduler.config, timestep_spacing="trailing")
    clf, labels, s = GaussianClassifier(_means()), [0, 1, 2], 3.0
    kw = dict(num_inference_steps=1, output_type="latent")
    plain = classifier_guided_sample(tiny_pipeline, clf, labels, 0.0, generator=_gens(3), **kw).images
    guided = classifier_guided_sample(tiny_pipeline, clf, labels, s, generator=_gens(3), **kw).images
    x_T = torch.cat([torch.randn(1, 4, 8, 8, generator=g) for g in _gens(3)])
    from ldm_app.samplers import make_scheduler

    sch = make_scheduler("ddim", tiny_pipeline.scheduler.config)
    sch.set_timesteps(1)
    (t,) = sch.timesteps.tolist()
    assert t == 999
    abar, abar_prev = sch.alphas_cumprod[t], sch.final_alpha_cumprod
    coef = (1 - abar_prev).sqrt() - abar_prev.sqrt() * (1 - abar).sqrt() / abar.sqrt()  # d x_{t-1} / d eps
    grad = classifier_log_prob_grad(clf, x_T, t, torch.tensor(labels))
    expected = plain + coef * (-(1 - abar).sqrt() * s * grad)
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(guided, plain)


def test_guidance_moves_samples_toward_the_class(tiny_pipeline):
    clf, labels = GaussianClassifier(_means()), torch.tensor([0, 1, 2, 0, 1, 2])
    log_p = {}
    for s in (0.0, 2.0):
        z = classifier_guided_sample(tiny_pipeline, clf, labels.tolist(), s, num_inference_steps=STEPS,
                                     generator=_gens(6), output_type="latent").images  # fmt: skip
        log_p[s] = torch.log_softmax(clf(z, 0), -1).gather(1, labels[:, None]).squeeze(1)
    # unguided, the random U-Net lands near class y for some images only; guided, every image is classified as y
    assert (log_p[2.0] >= log_p[0.0]).all() and log_p[2.0].sum() > log_p[0.0].sum() + 10, log_p
    assert (log_p[0.0] < -1).any() and (log_p[2.0] > -0.1).all(), log_p


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_scale_zero_is_the_pipelines_ddim(tiny_pipeline, guidance_scale):
    prompt = "a large red circle in the center on a white background"
    ours = classifier_guided_sample(tiny_pipeline, _tiny_classifier(), [0, 5], 0.0, prompt=prompt,
                                    num_inference_steps=STEPS, guidance_scale=guidance_scale, generator=_gens(2),
                                    output_type="pt").images  # fmt: skip
    theirs = tiny_pipeline([prompt] * 2, num_inference_steps=STEPS, guidance_scale=guidance_scale, generator=_gens(2),
                           output_type="pt", sampler="ddim").images  # fmt: skip
    assert torch.equal(ours, theirs)


def test_save_load_round_trip(tiny_pipeline, tmp_path):
    clf = _tiny_classifier(seed=3)
    save_classifier(clf, tmp_path / "clf")
    loaded = load_classifier(tmp_path / "clf")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    assert torch.equal(clf(x, t), loaded(x, t))
    kw = dict(class_labels=[1, 17], classifier_scale=5.0, num_inference_steps=STEPS, output_type="pt")
    a = classifier_guided_sample(tiny_pipeline, clf, generator=_gens(2), **kw).images
    b = classifier_guided_sample(tiny_pipeline, loaded, generator=_gens(2), **kw).images
    assert torch.equal(a, b)
    assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == [WEIGHTS_FILE, CONFIG_FILE]


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(class_labels=[0, 18], classifier_scale=1.0), "out of range"),
        (dict(class_labels=[-1], classifier_scale=1.0), "out of range"),
        (dict(class_labels=["red"], classifier_scale=1.0), "out of range"),
        (dict(class_labels=[], classifier_scale=1.0), "non-empty"),
        (dict(class_labels=[0, 1], classifier_scale=1.0, num_images=3), "one label per image"),
        (dict(class_labels=[0, 1], classifier_scale=1.0, prompt=["a", "b", "c"]), "one per image"),
        (dict(class_labels=None, classifier_scale=2.0), "needs class labels"),
        (dict(class_labels=[0], classifier_scale=float("nan")), "finite"),
    ],
)
def test_bad_inputs_are_one_line_errors(tiny_pipeline, kwargs, expected):
    with pytest.raises(UserError) as excinfo:
        classifier_guided_sample(tiny_pipeline, _tiny_classifier(), num_inference_steps=2, output_type="latent",
                                 **kwargs)
    assert expected in _one_line(excinfo)


def test_latent_shape_mismatch(tiny_pipeline):
    for clf in (_tiny_classifier(sample_size=16), _tiny_classifier(in_channels=3)):
        with pytest.raises(UserError) as excinfo:
            check_fits(clf, tiny_pipeline)
        assert "train a classifier on this model" in _one_line(excinfo)
        with pytest.raises(UserError):
            classifier_guided_sample(tiny_pipeline, clf, [0], 1.0, num_inference_steps=2)


def test_missing_or_corrupt_folder(tmp_path):
    with pytest.raises(UserError) as excinfo:
        load_classifier(tmp_path / "nope")
    assert "does not exist" in _one_line(excinfo)
    folder = save_classifier(_tiny_classifier(), tmp_path / "clf")
    (folder / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(UserError) as excinfo:
        load_classifier(folder)
    assert "cannot load the classifier" in _one_line(excinfo)
    (folder / CONFIG_FILE).write_text("{")
    with pytest.raises(UserError) as excinfo:
        load_classifier(folder)
    assert "cannot load the classifier" in _one_line(excinfo)


def test_train_script_writes_a_loadable_classifier(tiny_pipeline_dir, tiny_pipeline, tmp_path, capsys):
    from ldm_app.train_classifier import class_names, label_of, main

    assert len(class_names()) == 18 and class_names()[label_of("orange", "triangle")] == "orange triangle"
    out = tmp_path / "clf"
    args = ["--model", str(tiny_pipeline_dir), "--output_dir", str(out), "--num_images", "24", "--num_heldout", "10",
            "--steps", "3", "--batch_size", "8", "--block_out_channels", "32", "--layers_per_block", "1",
            "--log_every", "1"]  # fmt: skip
    main(args)
    log = capsys.readouterr().out
    assert "step 3/3 loss" in log and "held-out accuracy" in log
    clf = load_classifier(out)
    check_fits(clf, tiny_pipeline)
    report = json.loads((out / "training.json").read_text())
    assert len(report["heldout_accuracy_by_t"]) == 5 and report["class_names"][0] == "red circle"
    images = classifier_guided_sample(tiny_pipeline, clf, [0, 17], 10.0, num_inference_steps=2, output_type="np")
    assert images.images.shape == (2, 64, 64, 3)
    main(args)  # an earlier classifier folder is replaced
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError) as excinfo:
        main([*args[:2], "--output_dir", str(other), *args[4:]])
    assert "not a classifier" in _one_line(excinfo)
    assert (other / "notes.txt").read_text() == "mine"


def test_generate_cli_guides_with_a_classifier_and_records_it(tiny_pipeline_dir, tmp_path, capsys):
    from PIL import Image

    from ldm_app.errors import run_cli
    from ldm_app.generate import main as generate_main
    from ldm_app.pngmeta import read_params

    folder = save_classifier(_tiny_classifier(), tmp_path / "clf")
    common = ["--model", str(tiny_pipeline_dir), "--steps", "3", "--seed", "2", "--device", "cpu"]
    plain = generate_main(["--class_label", "1", "--classifier", str(folder), *common,
                           "--output", str(tmp_path / "plain.png")])[0]  # fmt: skip
    guided = generate_main(["--class_label", "1", "--classifier", str(folder), "--classifier_scale", "50", *common,
                            "--output", str(tmp_path / "guided.png")])[0]  # fmt: skip
    p = read_params(guided)
    assert (p.classifier, p.classifier_scale, p.class_label, p.sampler) == (str(folder.resolve()), 50.0, 1, "ddim")
    a, b = (np.asarray(Image.open(x).convert("RGB"), dtype=np.int16) for x in (plain, guided))
    assert np.abs(a - b).mean() > 0.5  # the gradient term changed the image
    again = generate_main(["--from_png", str(guided), "--output", str(tmp_path / "again.png")])[0]
    assert np.array_equal(np.asarray(Image.open(again).convert("RGB"), dtype=np.int16), b)
    capsys.readouterr()
    for argv, message in ((["--classifier_scale", "3"], "needs --classifier"),
                          (["--classifier", str(tmp_path)], "not a classifier folder"),
                          (["--classifier", str(folder)], "needs --class_label"),
                          (["--classifier", str(folder), "--class_label", "99"], "outside 0..")):  # fmt: skip
        code = run_cli(generate_main, ["a cat", *argv, *common, "--output", str(tmp_path / "bad.png")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "bad.png").exists()


def test_a_conditioned_unet_is_refused(tiny_pipeline):
    import copy

    from ldm_app.models import widen_unet_input
    from ldm_app.pipeline import LatentDiffusionInpaintPipeline

    components = {k: v for k, v in tiny_pipeline.components.items() if v is not None}
    components["unet"] = widen_unet_input(copy.deepcopy(tiny_pipeline.unet), 9)  # an inpainting model
    with pytest.raises(UserError) as excinfo:
        classifier_guided_sample(LatentDiffusionInpaintPipeline(**components), _tiny_classifier(), [0], 1.0,
                                 num_inference_steps=2)  # fmt: skip
    assert "class-, scalar- or image-conditioned" in _one_line(excinfo)
