"""Text-to-image inference: a latent diffusion pipeline (Rombach et al. 2022) in the Stable Diffusion 1.x layout.

Sampling: prompt -> CLIP text embeddings c (B, 77, D); x_T ~ N(0, I) in latent space (B, C, H/f, W/f); the
scheduler (a sampler from `ldm_app.samplers`) denoises x_t -> x_{t-1} with the U-Net's prediction under
classifier-free guidance; the autoencoder decodes x0 / scaling_factor to pixels.

The model folder is diffusers' own (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/, weights
only as safetensors), so a folder moves both ways between this pipeline and `diffusers.StableDiffusionPipeline`.
We subclass diffusers' `DiffusionPipeline` (loading, saving, devices, offload, progress bars) rather than
`StableDiffusionPipeline` because we also accept a VQ autoencoder and want no safety-checker/IP-adapter machinery.
Extra file of ours: `ldm_app.json`, the recommended sampling settings stored with the model.

Threads: one pipeline object may be called from several threads at once (a web server with one loaded model). A
call never mutates the pipeline: it samples with its own scheduler, built from `self.scheduler`'s config (the
schedulers keep per-call state: timesteps, step index, DPM-Solver's previous outputs), tokenizes under a lock (the
fast tokenizer's padding/truncation settings are shared state), and the models run in eval mode under no_grad.
Calls are serialized only when offload or other hooks move or cache model state between calls.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel, VQModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from safetensors import SafetensorError, safe_open
from transformers import CLIPTextModel, CLIPTokenizer

from ldm_app import limits
from ldm_app.errors import UserError
from ldm_app.fileio import atomic_dir, atomic_write_text
from ldm_app.limits import shown
from ldm_app.pngmeta import check_unicode
from ldm_app.samplers import check_sampler_name, make_scheduler, sampler_name, set_timesteps_checked

logger = logging.getLogger(__name__)

DEFAULTS_FILE = "ldm_app.json"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Keys allowed under "sampling" in ldm_app.json, with their types.
SAMPLING_KEYS: dict[str, type | tuple[type, ...]] = {
    "sampler": str,
    "num_inference_steps": int,
    "guidance_scale": (int, float),
    "height": int,
    "width": int,
}
# Used when neither the caller nor ldm_app.json gives a value (diffusers' StableDiffusionPipeline defaults).
FALLBACK_STEPS = 50
FALLBACK_GUIDANCE = 7.5
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# A fast (Rust) tokenizer keeps its padding/truncation settings as shared state and each call resets them: two
# threads tokenizing at once could pad with the other's settings (or fail with "Already borrowed"). Tokenizing
# takes microseconds, so one lock for all tokenizers costs nothing.
_TOKENIZER_LOCK = threading.Lock()
# Offload hooks move weights between devices around each call; such pipelines run one call at a time.
_EXCLUSIVE_CALL_LOCK = threading.RLock()


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Turn user choices ("auto|cpu|cuda[:n]|mps", "auto|fp32|fp16|bf16") into a checked (device, dtype).

    auto device: cuda, else mps, else cpu. auto dtype: fp16 on cuda, fp32 elsewhere. Half precision on CPU is
    refused: CPU kernels for it are slow or missing, and fp32 is what diffusers uses there too.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; expected auto, cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if dev.type not in available:
        raise UserError(f"unknown device {device!r}; expected auto, cpu, cuda, cuda:N or mps")
    if not available[dev.type]:
        raise UserError(f"device {device!r} is not available on this machine; use --device cpu or auto")
    if dtype == "auto":
        dtype = "fp16" if dev.type == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; expected auto, fp32, fp16 or bf16")
    if dev.type == "cpu" and dtype != "fp32":
        raise UserError(f"dtype {dtype} is not supported on CPU; use fp32 (half precision needs a GPU)")
    return dev, DTYPES[dtype]


def make_generators(seed: int, n: int, device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per image, seeded seed, seed+1, ...: image k of a batch then equals a run of its prompt alone
    with seed+k. CPU generators (the default) give the same noise whatever device the model runs on."""
    return [torch.Generator(device).manual_seed(seed + k) for k in range(n)]


def check_sampling_defaults(sampling: Any, where: str) -> dict[str, Any]:
    """Validate the "sampling" object of ldm_app.json: known keys, right types, a known sampler name."""
    if not isinstance(sampling, dict):
        raise UserError(f"{where}: 'sampling' must be an object with keys among {', '.join(SAMPLING_KEYS)}")
    for key, value in sampling.items():
        if key not in SAMPLING_KEYS:
            raise UserError(f"{where}: unknown key 'sampling.{key}'; expected some of {', '.join(SAMPLING_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, SAMPLING_KEYS[key]):
            raise UserError(f"{where}: 'sampling.{key}' has the wrong type ({shown(value)})")
    try:
        if "sampler" in sampling:
            check_sampler_name(sampling["sampler"])
        # validity only (a NaN guidance would silently turn guidance off); the configurable limits apply per call,
        # so lowering a limit never makes a model unloadable
        if "guidance_scale" in sampling:
            value = limits.check_number("sampling.guidance_scale", sampling["guidance_scale"])
            if value < 0:
                raise UserError(f"sampling.guidance_scale must be >= 0, got {value:g}")
        for key in ("num_inference_steps", "height", "width"):
            if key in sampling and sampling[key] < 1:
                raise UserError(f"sampling.{key} must be >= 1, got {sampling[key]}")
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return dict(sampling)


def read_sampling_defaults(folder: str | os.PathLike) -> dict[str, Any]:
    """The recommended sampling settings stored in `folder/ldm_app.json`, or {} when the file is absent."""
    path = Path(folder) / DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, or an integer of more than 4300 digits
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or set(data) - {"sampling"}:
        raise UserError(f"{path}: expected an object with the single key 'sampling'")
    return check_sampling_defaults(data.get("sampling", {}), str(path))


def write_sampling_defaults(folder: str | os.PathLike, sampling: dict[str, Any]) -> None:
    """Store recommended sampling settings as `folder/ldm_app.json` (checked, written atomically)."""
    sampling = check_sampling_defaults(sampling, "sampling defaults")
    atomic_write_text(Path(folder) / DEFAULTS_FILE, json.dumps({"sampling": sampling}, indent=2) + "\n")


def check_model_folder(folder: Path) -> None:
    """Fail early, in one line, on what diffusers would report as a long traceback (or a hub download attempt)."""
    index_path = folder / "model_index.json"
    if not os.path.isdir(folder):  # os.path: False (not an OSError) for a name too long or with a NUL
        raise UserError(f"model folder not found: {folder} (expected a folder with model_index.json, unet/, vae/...)")
    if not index_path.is_file():
        raise UserError(f"{folder} is not a model folder: model_index.json is missing")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{index_path} is not valid JSON ({e})") from None
    for name in COMPONENTS:
        entry = index.get(name)
        if not isinstance(entry, list) or entry[0] is None or not (folder / name).is_dir():
            raise UserError(f"{folder}: component '{name}' is missing (expected {name}/ listed in model_index.json)")
    for name in ("unet", "vae", "text_encoder"):
        check_weights(folder / name)
        check_weights_match_config(folder / name, *(index[name] + [None, None])[:2])


def check_weights(component_dir: Path) -> None:
    """Every weight file must be safetensors with a readable header covering the whole file (catches truncation)."""
    files = sorted(component_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{component_dir}: no .safetensors weights (pickle .bin weights are never loaded)")
    for path in files:
        try:
            with safe_open(path, framework="pt"):
                pass
        except SafetensorError as e:
            raise UserError(f"corrupt or truncated weights file {path}: {e}") from None


def check_weights_match_config(component_dir: Path, library: Any, class_name: Any) -> None:
    """The weight files hold every tensor the component's config.json calls for.

    Otherwise diffusers leaves the missing parameters on the "meta" device (the first call fails with "Tensor on
    device meta") and transformers initializes them at random (a text encoder that silently ignores the prompt):
    e.g. a unet/ folder that holds the VAE's weights. The model is built on the meta device (no memory, no time)
    only to list the names it expects; a class we cannot import is left to the loader."""
    try:
        cls = getattr(importlib.import_module(str(library)), str(class_name))
    except (ImportError, AttributeError, ValueError):
        return
    expected = _expected_weight_names(cls, component_dir)
    if expected is None:
        return
    present: set[str] = set()
    for path in sorted(component_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            present.update(f.keys())
    prefixes = {"text_model", getattr(cls, "base_model_prefix", None)} - {None, ""}
    missing = sorted(_normalized(expected, prefixes) - _normalized(present, prefixes))
    if missing:
        raise UserError(
            f"{component_dir}: the weights do not match its config.json ({len(missing)} of the {len(expected)} "
            f"tensors it needs are missing, e.g. {missing[0]!r}); are these another component's weights?"
        )


def _expected_weight_names(cls: type, component_dir: Path) -> set[str] | None:
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if issubclass(cls, ModelMixin):
                model = cls.from_config(cls.load_config(component_dir))
            elif issubclass(cls, PreTrainedModel):
                model = cls(cls.config_class.from_pretrained(component_dir))
            else:
                return None
    except (OSError, ValueError, TypeError) as e:  # a broken config: the loader says it in its own words
        logger.debug("cannot build %s from %s: %s", cls.__name__, component_dir, e)
        return None
    return set(model.state_dict())


def _normalized(names: set[str], prefixes: set[str]) -> set[str]:
    """Weight names as diffusers/transformers match them on load: without a base-model prefix (transformers 4
    saved CLIP as `text_model.*`) and with the legacy attention names diffusers converts (query -> to_q, ...)."""
    legacy = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    out = set()
    for name in names:
        first, _, rest = name.partition(".")
        if first in prefixes and rest:
            name = rest
        for old, new in legacy.items():
            name = name.replace(old, new)
        out.add(name)
    return out


@dataclass
class CallPlan:
    """One pipeline call's checked arguments and its own scheduler (timesteps set)."""

    prompts: list[str]
    negatives: list[str]
    height: int
    width: int
    guidance_scale: float
    num_images_per_prompt: int
    batch_size: int
    generator: torch.Generator | list[torch.Generator] | None
    latents: torch.Tensor | None
    output_type: str
    scheduler: SchedulerMixin


def latent_safe(scheduler: SchedulerMixin) -> SchedulerMixin:
    """The scheduler with the two fixes diffusers' StableDiffusionPipeline applies on load, so both pipelines give
    the same image from one folder: no clipping of the predicted x0 (latents are not bounded to [-1, 1]) and
    steps_offset=1 (the SD 1.x timestep grid)."""
    fixes = {}
    if getattr(scheduler.config, "clip_sample", False):
        fixes["clip_sample"] = False
    if getattr(scheduler.config, "steps_offset", 1) != 1:
        fixes["steps_offset"] = 1
    return type(scheduler).from_config(scheduler.config, **fixes) if fixes else scheduler


class LatentDiffusionPipeline(DiffusionPipeline):
    """Text-to-image with a latent diffusion model: CLIP text encoder, conditional U-Net, KL or VQ autoencoder."""

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(
        self,
        vae: AutoencoderKL | VQModel,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
    ):
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=latent_safe(scheduler)
        )
        # f: each autoencoder level but the last halves the resolution (f=8 for SD's 4 levels)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.sampling_defaults: dict[str, Any] = {}

    # ---- loading and saving -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *, sampler: str | None = None, **kwargs
    ) -> LatentDiffusionPipeline:
        """Load a local model folder (ours or one saved by diffusers' StableDiffusionPipeline); errors are one-line
        UserErrors. `sampler` overrides the folder's recommended sampler (ldm_app.json), if any."""
        folder = Path(pretrained_model_name_or_path)
        check_model_folder(folder)
        defaults = read_sampling_defaults(folder)
        sampler = check_sampler_name(sampler) if sampler is not None else defaults.get("sampler")
        kwargs["use_safetensors"] = True  # never unpickle .bin files
        # float32 unless asked otherwise, whatever precision the folder stores (the bundled model is fp16 on disk):
        # diffusers' models would load in float32 but transformers' text encoder would stay in its stored dtype.
        # `dtype` and `torch_dtype` both accepted (diffusers >= 0.36 renamed the second, older ones know only it).
        kwargs["torch_dtype"] = kwargs.pop("dtype", None) or kwargs.get("torch_dtype") or torch.float32
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
                pipe = super().from_pretrained(str(folder), **kwargs)
        except (OSError, ValueError, SafetensorError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot load model folder {folder}: {first_line}") from e
        for name in ("unet", "vae", "text_encoder"):  # what check_weights_match_config could not foresee
            if any(p.is_meta for p in getattr(pipe, name).parameters()):
                raise UserError(f"{folder / name}: the weights do not match its config.json (some tensors are "
                                "missing); are these another component's weights?")
        pipe.sampling_defaults = defaults
        if sampler is not None:
            pipe.set_sampler(sampler)
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write the model folder atomically (safetensors only), plus ldm_app.json when sampling defaults are set.

        model_index.json names `StableDiffusionPipeline` for a KL autoencoder, so `DiffusionPipeline.from_pretrained`
        in plain diffusers resolves the folder too; a VQ folder (which SD can't run) keeps our class name. Our own
        `from_pretrained` ignores the name, and so does `StableDiffusionPipeline.from_pretrained`.
        """
        with atomic_dir(save_directory) as tmp:
            super().save_pretrained(tmp, safe_serialization=True, **kwargs)
            index_path = tmp / "model_index.json"
            index = json.loads(index_path.read_text(encoding="utf-8"))
            is_kl = isinstance(self.vae, AutoencoderKL)
            index["_class_name"] = "StableDiffusionPipeline" if is_kl else type(self).__name__
            index.pop("_name_or_path", None)  # where it was loaded from: stale once saved elsewhere
            atomic_write_text(index_path, json.dumps(index, indent=2, sort_keys=True) + "\n")
            if self.sampling_defaults:
                write_sampling_defaults(tmp, self.sampling_defaults)

    # ---- configuration ------------------------------------------------------------------------------------

    def set_sampler(self, name: str) -> None:
        """Swap the scheduler for sampler `name` (see ldm_app.samplers.SAMPLERS), keeping the model's noise schedule.
        For one call only, pass `sampler=` to the call instead (safe while other threads sample)."""
        self.scheduler = make_scheduler(name, self.scheduler.config)

    def enable_xformers_memory_efficient_attention(self, attention_op=None) -> None:
        """diffusers' xformers attention when xformers is installed; otherwise PyTorch's scaled_dot_product_attention,
        which gives the same memory savings on torch >= 2 (one notice, no error: the request is only a speed-up)."""
        if importlib.util.find_spec("xformers") is not None:
            super().enable_xformers_memory_efficient_attention(attention_op)
            return
        logger.warning("xformers is not installed; using PyTorch scaled_dot_product_attention instead")
        self.unet.set_attn_processor(AttnProcessor2_0())

    # ---- sampling steps -----------------------------------------------------------------------------------

    def encode_prompt(
        self, prompts: list[str], negatives: list[str] | None, num_images_per_prompt: int, device: torch.device
    ) -> torch.Tensor:
        """CLIP last hidden states, one row per image: (N*P, 77, D), or (2*N*P, 77, D) as [uncond; cond] when
        `negatives` is given (for classifier-free guidance). One text-encoder call for both halves."""
        texts = (negatives or []) + prompts
        input_ids = self.tokenize(texts).to(device)  # (len(texts), 77)
        embeds = self.text_encoder(input_ids, return_dict=False)[0]  # (len(texts), 77, D)
        # in the U-Net's dtype: the text encoder may be kept in another precision
        return embeds.to(self.unet.dtype).repeat_interleave(num_images_per_prompt, dim=0)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids padded/truncated to CLIP's context (77); a longer text is cut with a warning, not refused."""
        max_length = self.tokenizer.model_max_length
        with _TOKENIZER_LOCK:
            lengths = [len(ids) for ids in self.tokenizer(texts, verbose=False).input_ids]
            tokens = self.tokenizer(
                texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
            )
        for text, length in zip(texts, lengths):
            if length > max_length:
                logger.warning("prompt truncated to CLIP's %d tokens (it has %d): %.60r...", max_length, length, text)
        return tokens.input_ids

    def prepare_latents(
        self,
        batch_size: int,
        height: int,
        width: int,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        device: torch.device,
        dtype: torch.dtype,
        scheduler: SchedulerMixin | None = None,
    ) -> torch.Tensor:
        """x_T ~ N(0, I) (B, C, H/f, W/f), scaled by the scheduler's initial sigma (1 for DDPM/DDIM, larger for
        Euler; `scheduler`: the call's, default self.scheduler). With a list of generators, image k draws from
        generator k only (randn_tensor does this)."""
        f = self.vae_scale_factor
        shape = (batch_size, self.unet.config.in_channels, height // f, width // f)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise UserError(f"got {len(generator)} generators for {batch_size} images; pass one per image")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise UserError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        latents = latents.to(device=device, dtype=dtype)
        return latents * (scheduler or self.scheduler).init_noise_sigma

    def predict_noise(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        text_embeds: torch.Tensor,
        guidance_scale: float,
        scheduler: SchedulerMixin | None = None,
    ) -> torch.Tensor:
        """The U-Net's prediction (eps, or v/x0 per the scheduler's prediction_type) for x_t (B, C, h, w).

        Classifier-free guidance (Ho & Salimans 2022): eps = eps(x_t, ∅) + w * (eps(x_t, c) - eps(x_t, ∅)), with
        both halves in ONE U-Net call on the batch [x_t; x_t] against [uncond; cond] embeddings; w <= 1 skips it.
        """
        guided = guidance_scale > 1.0
        model_input = torch.cat([x_t, x_t]) if guided else x_t  # (2B or B, C, h, w)
        model_input = (scheduler or self.scheduler).scale_model_input(model_input, t)
        out = self.unet(model_input, t, encoder_hidden_states=text_embeds, return_dict=False)[0]
        if not guided:
            return out
        uncond, cond = out.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def decode_latents(self, latents: torch.Tensor, output_type: str) -> Any:
        """x0 latents (B, C, h, w) -> images in `output_type` (PIL list, (B, H, W, 3) numpy or (B, 3, H, W) tensor
        in [0, 1]). A VQ autoencoder quantizes in decode, as in LDM's VQ models."""
        if output_type == "latent":
            return latents
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]  # in [-1, 1]
        return self.image_processor.postprocess(image, output_type=output_type)

    def step_kwargs(
        self, generator: torch.Generator | list[torch.Generator] | None, scheduler: SchedulerMixin | None = None
    ) -> dict[str, Any]:
        """Ancestral samplers (ddpm, euler_a) take the generator for their per-step noise; others take none."""
        accepts = "generator" in inspect.signature((scheduler or self.scheduler).step).parameters
        return {"generator": generator} if accepts else {}

    # ---- the call -----------------------------------------------------------------------------------------

    def resolve_defaults(
        self, height: int | None, width: int | None, steps: int | None, guidance_scale: float | None
    ) -> tuple[int, int, int, float]:
        """Caller's value, else the model's ldm_app.json value, else the diffusers-like fallback."""
        size = self.unet.config.sample_size
        default_h, default_w = (size, size) if isinstance(size, int) else size
        d = self.sampling_defaults
        return (
            height if height is not None else d.get("height", default_h * self.vae_scale_factor),
            width if width is not None else d.get("width", default_w * self.vae_scale_factor),
            steps if steps is not None else d.get("num_inference_steps", FALLBACK_STEPS),
            guidance_scale if guidance_scale is not None else d.get("guidance_scale", FALLBACK_GUIDANCE),
        )

    @staticmethod
    def check_prompts(prompt: Any, negative_prompt: Any) -> tuple[list[str], list[str]]:
        """Prompts and negative prompts as two lists of equal length (a single negative applies to every prompt),
        all valid Unicode text."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise UserError(f"prompt must be a string or a non-empty list of strings, got {shown(prompt, 200)}")
        if negative_prompt is not None and not isinstance(negative_prompt, (str, list)):
            raise UserError(f"negative_prompt must be a string or a list of strings, got {shown(negative_prompt)}")
        negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * len(prompts)
        if len(negatives) != len(prompts) or not all(isinstance(n, str) for n in negatives):
            raise UserError(f"negative_prompt must be a string or a list of {len(prompts)} strings (one per prompt)")
        for text in prompts:
            check_unicode("prompt", text)
        for text in negatives:
            check_unicode("negative_prompt", text)
        return prompts, negatives

    def check_call(
        self,
        prompt: Any,
        negative_prompt: Any = None,
        height: Any = None,
        width: Any = None,
        num_inference_steps: Any = None,
        guidance_scale: Any = None,
        num_images_per_prompt: Any = 1,
        generator: Any = None,
        latents: Any = None,
        output_type: Any = "pil",
        sampler: Any = None,
    ) -> CallPlan:
        """Every argument of a call checked against `ldm_app.limits` and the model, before anything is allocated
        (UserError otherwise); returns the plan with the call's own scheduler, its timesteps set. `generate.py`
        calls it too, to refuse a request before its first image."""
        if sampler is not None:
            check_sampler_name(sampler)
        prompts, negatives = self.check_prompts(prompt, negative_prompt)
        if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
            raise UserError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {shown(output_type)}")
        height, width, steps, guidance_scale = self.resolve_defaults(height, width, num_inference_steps, guidance_scale)
        f = self.vae_scale_factor
        height = limits.check_image_side("height", height, multiple=f)
        width = limits.check_image_side("width", width, multiple=f)
        smallest = self.smallest_side()
        for name, value in (("height", height), ("width", width)):
            if value < smallest:
                raise UserError(f"{name} is {value} pixels, below the {smallest} this model can take (its U-Net "
                                "halves the latents too often for smaller images)")  # fmt: skip
        guidance_scale = limits.check_guidance_scale(guidance_scale)
        per_prompt = limits.check_count("num_images_per_prompt", num_images_per_prompt,
                                        limits.current().max_images_per_call)  # fmt: skip
        batch_size = len(prompts) * per_prompt
        limits.check_batch(batch_size, height, width)
        base = self.scheduler  # read once: another thread may set_sampler meanwhile
        label = sampler or sampler_name(base) or type(base).__name__
        steps = limits.check_steps(steps, base.config.num_train_timesteps, label)
        self.check_generator(generator, batch_size)
        if latents is not None:
            shape = (batch_size, self.unet.config.in_channels, height // f, width // f)
            if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
                got = f"a {latents.dtype} tensor" if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise UserError(f"latents must be a floating-point torch.Tensor of shape {shape}, got {got}")
            if tuple(latents.shape) != shape:
                raise UserError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
            if not torch.isfinite(latents).all():
                raise UserError("latents contain NaN or infinite values")
        scheduler = (make_scheduler(sampler, base.config) if sampler is not None
                     else type(base).from_config(base.config))  # fmt: skip
        set_timesteps_checked(scheduler, steps, device=self._execution_device, label=label)
        return CallPlan(prompts, negatives, height, width, guidance_scale, per_prompt, batch_size, generator, latents,
                        output_type, scheduler)  # fmt: skip

    def smallest_side(self) -> int:
        """The smallest image side in pixels: latents that keep 2x2 pixels after the U-Net's last downsampling (32 px
        for the bundled model, 128 for SD 1.x). Smaller ones reach a group norm with one value per group, a
        ValueError deep in torch (found by the fuzz test on the tiny model at 8 and 16 px)."""
        downsamplings = len(self.unet.config.down_block_types) - 1
        size = self.unet.config.sample_size
        native = min(size) if isinstance(size, (list, tuple)) else size  # what it was trained on is never refused
        return self.vae_scale_factor * min(2 ** (downsamplings + 1), native)

    def check_generator(self, generator: Any, batch_size: int) -> None:
        """None, one torch.Generator, or one per image; on the CPU or the model's device type."""
        generators = generator if isinstance(generator, list) else [generator] if generator is not None else []
        if isinstance(generator, list) and len(generator) != batch_size:
            raise UserError(f"got {len(generator)} generators for {batch_size} images; pass one per image")
        device_type = self._execution_device.type
        for g in generators:
            if not isinstance(g, torch.Generator):
                raise UserError(f"generator must be a torch.Generator or a list of them, got {shown(g, 100)}")
            if g.device.type not in ("cpu", device_type):
                raise UserError(f"a generator on {g.device} cannot draw noise for a model on {device_type}; "
                                "use CPU generators (the same noise on every device)")  # fmt: skip

    def _needs_exclusive_call(self) -> bool:
        """Offload (accelerate or diffusers hooks) moves weights between devices around each call, and caching hooks
        keep state between steps: such a pipeline is not safe to call from several threads at once."""
        if getattr(self, "_all_hooks", None) or getattr(self, "_offload_device", None) is not None:
            return True
        for component in self.components.values():
            if not isinstance(component, torch.nn.Module):
                continue
            registry = getattr(component, "_diffusers_hook", None)
            if hasattr(component, "_hf_hook") or (registry is not None and getattr(registry, "hooks", None)):
                return True
        return False

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        sampler: str | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate `num_images_per_prompt` images for each prompt; arguments left None come from the model's
        sampling defaults (`self.sampling_defaults`, read from ldm_app.json), else 50 steps, guidance 7.5 and the
        U-Net's native size. `sampler` (a name from ldm_app.samplers) applies to this call only. Image order: all
        images of prompt 0, then of prompt 1, ... Safe to call from several threads at once (see the module doc)."""
        plan = self.check_call(
            prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
            generator, latents, output_type, sampler,
        )  # fmt: skip
        if self._needs_exclusive_call():
            with _EXCLUSIVE_CALL_LOCK:
                images = self._sample(plan)
                self.maybe_free_model_hooks()
        else:
            images = self._sample(plan)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _sample(self, plan: CallPlan) -> Any:
        scheduler = plan.scheduler
        guided = plan.guidance_scale > 1.0
        device = self._execution_device
        text_embeds = self.encode_prompt(
            plan.prompts, plan.negatives if guided else None, plan.num_images_per_prompt, device
        )
        x_t = self.prepare_latents(plan.batch_size, plan.height, plan.width, plan.generator, plan.latents, device,
                                   text_embeds.dtype, scheduler)  # fmt: skip
        step_kwargs = self.step_kwargs(plan.generator, scheduler)
        with self.progress_bar(total=len(scheduler.timesteps)) as progress:
            for t in scheduler.timesteps:
                eps = self.predict_noise(x_t, t, text_embeds, plan.guidance_scale, scheduler)
                x_t = scheduler.step(eps, t, x_t, **step_kwargs, return_dict=False)[0]  # x_t -> x_{t-1}
                progress.update()
        return self.decode_latents(x_t, plan.output_type)
