"""Shared test fixtures: tiny random-weight latent diffusion components (CPU, deterministic, 64x64 images).

- `tiny_components(vae="kl"|"vq", scheduler="ddim"|"ddpm", seed=0) -> dict` (fixture returning the factory
  `build_tiny_components`): vae, text_encoder, tokenizer, unet, scheduler — the keyword arguments of both
  `LatentDiffusionPipeline` and (plus safety_checker=None, feature_extractor=None) `StableDiffusionPipeline`.
- `tiny_pipeline`: a fresh `LatentDiffusionPipeline` on those components (KL, DDIM), progress bar off.
- `tiny_pipeline_dir` (session): that pipeline saved once with `save_pretrained`; treat it as read-only (copy it
  with shutil.copytree before changing anything).
"""

from __future__ import annotations

import functools
import os

# Must be set before huggingface_hub is imported: nothing in the tests may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    UNet2DConditionModel,
    VQModel,
)
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

# the vendored diffusers tests run through tests/test_diffusers_contract.py, with their own settings
collect_ignore = ["diffusers_contract"]

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "ldm_app" / "assets" / "tokenizer"
TEXT_DIM = 32  # CLIP hidden size = U-Net cross_attention_dim
IMAGE_SIZE = 64  # pixels; latents are 8x8 (f = 8)

diffusers_logging.disable_progress_bar()  # "Loading pipeline components..." bars
# Tiny models gain nothing from intra-op threads, and on a shared CPU their spin-waits made each U-Net call ~50x
# slower (measured: 1.6 s vs 0.03 s with 2 threads vs 1 under load).
torch.set_num_threads(1)


def _autoencoder(kind: str) -> AutoencoderKL | VQModel:
    # 4 levels -> f = 2**3 = 8 like SD; 8 channels per level with 8 norm groups (channels must divide by groups)
    common = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )
    if kind == "kl":
        return AutoencoderKL(**common)
    if kind == "vq":
        return VQModel(**common, num_vq_embeddings=32, vq_embed_dim=4)
    raise ValueError(f"unknown autoencoder kind {kind!r}; expected 'kl' or 'vq'")


def _scheduler(kind: str) -> DDIMScheduler | DDPMScheduler:
    # SD 1.x's noise schedule (scaled_linear betas 0.00085..0.012 over 1000 steps)
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    if kind == "ddim":
        return DDIMScheduler(**common, set_alpha_to_one=False)
    if kind == "ddpm":
        return DDPMScheduler(**common)
    raise ValueError(f"unknown scheduler kind {kind!r}; expected 'ddim' or 'ddpm'")


@functools.cache
def _tokenizer() -> CLIPTokenizer:
    # loading the real BPE vocab takes ~0.4 s; one shared instance is safe (a tokenizer is not mutated by use)
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR)


def build_tiny_components(vae: str = "kl", scheduler: str = "ddim", seed: int = 0) -> dict:
    """Tiny random-weight components; the same `seed` always gives the same weights."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
    )
    text_config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return {
        "vae": _autoencoder(vae).eval(),
        "text_encoder": CLIPTextModel(text_config).eval(),
        "tokenizer": _tokenizer(),
        "unet": unet.eval(),
        "scheduler": _scheduler(scheduler),
    }


@pytest.fixture
def tiny_components():
    """The factory `build_tiny_components(vae="kl", scheduler="ddim", seed=0) -> dict`."""
    return build_tiny_components


@pytest.fixture
def tiny_pipeline():
    from ldm_app.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline(**build_tiny_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    from ldm_app.pipeline import LatentDiffusionPipeline

    folder = tmp_path_factory.mktemp("models") / "tiny"
    LatentDiffusionPipeline(**build_tiny_components()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_judge():
    """An attribute judge trained in seconds on 16px renders: far below the 99% gate, so tests that judge with it
    pass judge_threshold=0."""
    from ldm_app.evaluation.judge import JudgeConfig, train_judge

    return train_judge(
        JudgeConfig(resolution=16, num_train=64, num_heldout=32, epochs=1, batch_size=32, width=4, feature_dim=16)
    )


@pytest.fixture(scope="session")
def tiny_judge_cache(tiny_judge, tmp_path_factory) -> Path:
    """A judge cache root where the tiny judge sits in place of the default 64px/seed-0 judge, so the evaluation
    CLIs (--judge_cache ROOT) need no full judge training."""
    from ldm_app.evaluation.judge import JudgeConfig, judge_folder, save_judge

    cache = tmp_path_factory.mktemp("judge_cache")
    save_judge(tiny_judge, judge_folder(JudgeConfig(), cache))
    return cache


@pytest.fixture(scope="session")
def ldm_files(tmp_path_factory):
    """Inputs of the train_ldm.py tests: 8 captioned 32 px images and a random f=4 autoencoder."""
    from ldm_helpers import make_ldm_files

    return make_ldm_files(tmp_path_factory.mktemp("ldm_files"))


@pytest.fixture
def fresh_accelerate():
    """Single-threaded torch (see ldm_helpers.subprocess_env), and accelerate's process-wide singletons reset after
    the test, so in-process training runs don't see each other's state."""
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _mount_tmpfs(target: Path, options: str) -> bool:
    """Mount a tmpfs at `target` (needs root, as on this project's machines and CI); False when not permitted."""
    import subprocess

    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
    return done.returncode == 0


def _unmount(target: Path) -> None:
    import subprocess

    subprocess.run(["umount", "-l", str(target)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB file system (tmpfs): writing more than that fails with ENOSPC, as on a full disk.
    Skipped where mounting is not permitted (not root); the ENOSPC paths are also tested without it."""
    target = tmp_path / "small_disk"
    if not _mount_tmpfs(target, "size=2m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield target
    _unmount(target)


@pytest.fixture
def readonly_dir(tmp_path):
    """A real read-only file system (tmpfs mounted ro): writes fail with EROFS even for root, unlike chmod."""
    target = tmp_path / "readonly"
    if not _mount_tmpfs(target, "ro,size=1m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield target
    _unmount(target)
