"""Classifier guidance (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", sec. 4) for the
latent diffusion models of ldm_app.

A *noise-aware* classifier p_phi(y | x_t, t) is trained on noisy latents x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
at uniformly random t (`python -m ldm_app.train_classifier`). At sampling time its gradient steers the score: with
an eps-prediction model, eps(x_t) ~ -sqrt(1 - abar_t) grad log p(x_t), so adding s * grad log p(y | x_t) to the
score gives the guided prediction of their Algorithm 2 (DDIM form)

    eps_hat = eps(x_t) - sqrt(1 - abar_t) * s * grad_{x_t} log p_phi(y | x_t, t)

which the DDIM update then uses in place of eps. With classifier-free guidance on the text model (Ho & Salimans
2022) eps is first eps_u + w (eps_c - eps_u); the prompt "" with w = 1 is the unconditional model.

The classifier is "the U-Net's down half" (ADM's classifier): diffusers' sinusoidal `Timesteps` +
`TimestepEmbedding`, a conv_in, `get_down_block` levels (ResNet blocks with the time embedding added), a final
GroupNorm-SiLU, a mean pool and a linear head over `num_classes`. No batch norm: every image's gradient depends on
that image only, so guiding a batch is guiding each image.

    clf = load_classifier("runs/classifier")
    images = classifier_guided_sample(pipe, clf, class_labels=[0, 5, 17], classifier_scale=10.0).images

A classifier folder holds `classifier.safetensors` and `classifier_config.json` (the `ClassifierConfig` and the
class names), and, when `train_classifier` wrote it, `training.json` (its settings and held-out accuracies).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm_app.errors import UserError
from ldm_app.fileio import atomic_dir

WEIGHTS_FILE = "classifier.safetensors"
CONFIG_FILE = "classifier_config.json"
TRAINING_FILE = "training.json"
FORMAT = "ldm_app.classifier/1"  # the config file's "format": what load_classifier accepts


@dataclass
class ClassifierConfig:
    """Architecture of a `LatentClassifier` (everything needed to rebuild it before loading the weights)."""

    num_classes: int
    in_channels: int = 4  # latent channels of the autoencoder it guides
    sample_size: int = 8  # latent side (height = width) it was trained at
    block_out_channels: tuple[int, ...] = (64, 128)  # one down level each (all but the last halve the resolution)
    layers_per_block: int = 2
    down_block_type: str = "DownBlock2D"  # any of diffusers' get_down_block types without cross-attention
    norm_num_groups: int = 32
    flip_sin_to_cos: bool = True  # SD's time embedding
    freq_shift: int = 0
    class_names: list[str] = field(default_factory=list)  # optional, len == num_classes when given

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if not (isinstance(self.num_classes, int) and self.num_classes >= 2):
            raise ValueError(f"num_classes must be an integer >= 2, got {self.num_classes!r}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        if not self.block_out_channels or any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"block_out_channels {self.block_out_channels} must divide by {self.norm_num_groups}")

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d


class LatentClassifier(nn.Module):
    """p(y | x_t, t): noisy latents (B, C, h, w) and timesteps (B,) or () -> logits (B, num_classes)."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.unets.unet_2d_blocks import get_down_block

        self.config = config
        ch = config.block_out_channels
        temb_dim = 4 * ch[0]
        self.time_proj = Timesteps(ch[0], config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(ch[0], temb_dim)
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList()
        for i, out_ch in enumerate(ch):
            self.down_blocks.append(get_down_block(
                config.down_block_type, num_layers=config.layers_per_block, in_channels=ch[max(i - 1, 0)],
                out_channels=out_ch, temb_channels=temb_dim, add_downsample=i < len(ch) - 1, resnet_eps=1e-5,
                resnet_act_fn="silu", resnet_groups=config.norm_num_groups, downsample_padding=1,
                attention_head_dim=8,  # unused by attention-free blocks; silences diffusers' warning
            ))  # fmt: skip
        self.norm_out = nn.GroupNorm(config.norm_num_groups, ch[-1], eps=1e-5)
        self.head = nn.Linear(ch[-1], config.num_classes)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        temb = self.time_embedding(self.time_proj(t).to(x_t.dtype))  # (B, 4 * ch0)
        h = self.conv_in(x_t)
        for block in self.down_blocks:
            h, _ = block(h, temb)
        h = F.silu(self.norm_out(h)).mean(dim=(2, 3))  # (B, C): mean pool
        return self.head(h)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes


# ---- files ---------------------------------------------------------------------------------------------------------


def write_classifier_files(model: LatentClassifier, folder: Path, training: dict[str, Any] | None = None) -> None:
    """Write the weights, the config (and training.json) into an existing folder (not atomic: see save_classifier)."""
    from safetensors.torch import save_file

    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, "config": model.config.to_json()}, indent=2) + "\n")
    if training is not None:
        (folder / TRAINING_FILE).write_text(json.dumps(training, indent=2) + "\n")


def save_classifier(model: LatentClassifier, folder: str | os.PathLike, training: dict[str, Any] | None = None) -> Path:
    """Write `model` to `folder` atomically (replacing it as a whole): classifier.safetensors + classifier_config.json
    (+ training.json)."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        write_classifier_files(model, tmp, training)
    return folder


def is_classifier_folder(folder: Path) -> bool:
    """A folder written by save_classifier (its config file names our format)."""
    try:
        return json.loads((folder / CONFIG_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_classifier(folder: str | os.PathLike, device: Any = "cpu") -> LatentClassifier:
    """The classifier saved in `folder` (safetensors weights only), in eval mode; a missing, incomplete or corrupt
    folder is one UserError line."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"classifier folder {folder} does not exist "
                        "(train one with python -m ldm_app.train_classifier)")
    try:
        info = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        if info.get("format") != FORMAT:
            raise ValueError(f"format {info.get('format')!r} is not {FORMAT!r}")
        model = LatentClassifier(ClassifierConfig(**info["config"]))
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    except Exception as e:  # noqa: BLE001 - whatever is wrong in the folder, the user gets one line
        reason = " ".join(str(e).split())[:300]
        raise UserError(f"cannot load the classifier in {folder} ({type(e).__name__}: {reason})") from None
    return model.to(device).eval()


def read_training_report(folder: str | os.PathLike) -> dict[str, Any] | None:
    try:
        return json.loads((Path(folder) / TRAINING_FILE).read_text())
    except (OSError, ValueError):
        return None


# ---- checks ---------------------------------------------------------------------------------------------------------


def _latent_shape(pipe: Any, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
    factor = pipe.vae_scale_factor
    size = pipe.unet.config.sample_size
    h = (height // factor) if height else size
    w = (width // factor) if width else size
    return pipe.unet.config.in_channels, h, w


def check_fits(classifier: LatentClassifier, pipe: Any, height: int | None = None, width: int | None = None) -> None:
    """The classifier must see the latents this pipeline samples: same channels and size (one UserError line)."""
    c, h, w = _latent_shape(pipe, height, width)
    cfg = classifier.config
    if cfg.in_channels != c or (cfg.sample_size, cfg.sample_size) != (h, w):
        raise UserError(
            f"the classifier was trained on {cfg.in_channels}x{cfg.sample_size}x{cfg.sample_size} latents but this "
            f"model samples {c}x{h}x{w}: train a classifier on this model (python -m ldm_app.train_classifier)"
        )


def check_labels(class_labels: Any, num_classes: int, num_images: int | None = None) -> torch.Tensor:
    """Class labels as a (B,) long tensor: integers in [0, num_classes), one per image (one UserError line)."""
    if isinstance(class_labels, int) and not isinstance(class_labels, bool):
        class_labels = [class_labels]
    if isinstance(class_labels, torch.Tensor):
        class_labels = class_labels.flatten().tolist()
    if not isinstance(class_labels, Sequence) or isinstance(class_labels, str) or len(class_labels) == 0:
        raise UserError(f"class_labels must be a non-empty list of integers, got {class_labels!r:.80}")
    for y in class_labels:
        if isinstance(y, bool) or not isinstance(y, int) or not 0 <= y < num_classes:
            raise UserError(f"class label {y!r:.40} is out of range: expected an integer in 0..{num_classes - 1}")
    if num_images is not None and len(class_labels) != num_images:
        raise UserError(f"{len(class_labels)} class labels for {num_images} images: give one label per image")
    return torch.tensor(class_labels, dtype=torch.long)


# ---- guided sampling -------------------------------------------------------------------------------------------------


def classifier_log_prob_grad(
    classifier: nn.Module, x_t: torch.Tensor, t: torch.Tensor | int, labels: torch.Tensor
) -> torch.Tensor:
    """grad_{x_t} log p(y | x_t, t) for each image (B, C, h, w), float32 (the classifier acts per image, so the
    gradient of the batch's summed log-probabilities is each image's own)."""
    with torch.enable_grad():
        x = x_t.detach().float().requires_grad_(True)
        logits = classifier(x, t).float()
        log_p = F.log_softmax(logits, dim=-1).gather(1, labels.to(x.device)[:, None]).sum()
        (grad,) = torch.autograd.grad(log_p, x)
    return grad


def guided_eps(eps: torch.Tensor, grad: torch.Tensor, alpha_bar_t: float | torch.Tensor, scale: float) -> torch.Tensor:
    """Dhariwal & Nichol's Algorithm 2: eps_hat = eps - sqrt(1 - abar_t) * s * grad log p(y | x_t)."""
    return eps - (1.0 - torch.as_tensor(alpha_bar_t, dtype=torch.float64)).sqrt().item() * scale * grad.to(eps.dtype)


@dataclass
class GuidedOutput:
    images: Any  # as the pipeline's output_type: PIL list, numpy (B, H, W, 3), tensor (B, 3, H, W), or latents
    class_labels: list[int]


def check_guidable(unet_config: Any) -> None:
    """Guided DDIM calls the U-Net with x_t, t and the text alone: a model that also needs class labels, scalars
    or a mask and a masked image (an inpainting model) is refused in one line."""
    c = unet_config
    if c.num_class_embeds is not None or c.class_embed_type is not None or c.in_channels != c.out_channels:
        raise UserError("classifier guidance samples a text-to-image (or unconditional) model; this one is "
                        "class-, scalar- or image-conditioned (its U-Net needs class labels, scalars or a mask; a "
                        "class-conditional model takes its class without a classifier)")  # fmt: skip


@torch.no_grad()
def classifier_guided_sample(
    pipe: Any,
    classifier: LatentClassifier | None,
    class_labels: Any = None,
    classifier_scale: float = 0.0,
    prompt: str | list[str] = "",
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    output_type: str = "pil",
    height: int | None = None,
    width: int | None = None,
    num_images: int | None = None,
    negative_prompt: str | list[str] | None = None,
) -> GuidedOutput:
    """Deterministic DDIM (eta = 0) on the pipeline's U-Net, noise schedule and autoencoder, with classifier
    guidance of strength `classifier_scale` toward `class_labels` (one per image) and, when `guidance_scale` > 1,
    classifier-free guidance toward `prompt` (a string for every image, or one per image). "" with
    guidance_scale 1 is the unconditional model. With classifier_scale 0 this is exactly the pipeline's own
    `sampler="ddim"` call (same latents from the same generator, same steps): tests check it.

    Without class labels (and scale 0) `num_images` (default: the number of prompts) sets the batch."""
    from ldm_app.samplers import make_scheduler, set_timesteps_checked

    check_guidable(pipe.unet.config)
    scale = float(classifier_scale)
    if scale != scale or abs(scale) == float("inf"):  # NaN / inf
        raise UserError(f"classifier_scale must be a finite number, got {classifier_scale!r}")
    if class_labels is None:
        if scale != 0.0:
            raise UserError("a classifier scale needs class labels: give class_labels (one per image)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = num_images or len(prompts)
        labels = None
    else:
        if classifier is None:
            raise UserError("class labels need a classifier: load one with load_classifier")
        labels = check_labels(class_labels, classifier.num_classes, num_images)
        batch = len(labels)
    if scale != 0.0 and classifier is None:
        raise UserError("a classifier scale needs a classifier: load one with load_classifier")
    prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
    if len(prompts) == 1 and batch > 1:
        prompts = prompts * batch
    if len(prompts) != batch:
        raise UserError(f"{len(prompts)} prompts for {batch} images: give one prompt, or one per image")
    if classifier is not None:
        check_fits(classifier, pipe, height, width)
    if isinstance(generator, list) and len(generator) != batch:
        raise UserError(f"{len(generator)} generators for {batch} images: give one, or one per image")

    device = pipe._execution_device
    do_cfg = guidance_scale > 1.0
    cond, uncond = pipe.encode_prompt(prompts, device, 1, do_cfg, negative_prompt)
    embeds = torch.cat([uncond, cond]) if do_cfg else cond

    scheduler = make_scheduler("ddim", pipe.scheduler.config)
    set_timesteps_checked(scheduler, num_inference_steps, device=device, label="ddim")
    c, h, w = _latent_shape(pipe, height, width)
    from diffusers.utils.torch_utils import randn_tensor

    # as the pipeline's prepare_latents, scaled by *our* scheduler's initial sigma (the model's may be Euler's)
    latents = randn_tensor((batch, c, h, w), generator=generator, device=device, dtype=embeds.dtype)
    latents = latents * scheduler.init_noise_sigma
    if classifier is not None:
        classifier = classifier.to(device)
    alphas_cumprod = scheduler.alphas_cumprod
    for t in scheduler.timesteps:
        model_in = torch.cat([latents] * 2) if do_cfg else latents
        model_in = scheduler.scale_model_input(model_in, t)
        eps = pipe.unet(model_in, t, encoder_hidden_states=embeds, return_dict=False)[0]
        if do_cfg:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        if scale != 0.0:
            grad = classifier_log_prob_grad(classifier, latents, t, labels)
            eps = guided_eps(eps, grad, alphas_cumprod[int(t)], scale)
        latents = scheduler.step(eps, t, latents, return_dict=False)[0]

    out_labels = labels.tolist() if labels is not None else []
    if output_type == "latent":
        return GuidedOutput(latents, out_labels)
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    image = pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=[True] * batch)
    return GuidedOutput(image, out_labels)
