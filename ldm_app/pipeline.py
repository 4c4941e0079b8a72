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

import contextlib
import contextvars
import copy
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
from typing import Any, Iterator

import torch
from transformers.utils import logging as _transformers_logging

# Importing diffusers' SD pipelines imports transformers' CLIPImageProcessor (for the safety checker we don't use),
# and transformers 5 then warns, on every import, that torchvision is not installed: not our users' concern.
_verbosity = _transformers_logging.get_verbosity()
_transformers_logging.set_verbosity_error()
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    VQModel,
)
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput  # noqa: E402

_transformers_logging.set_verbosity(_verbosity)
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from safetensors import SafetensorError, safe_open
from transformers import CLIPTextModel, CLIPTokenizer

from ldm_app import limits
from ldm_app.errors import UserError
from ldm_app.fileio import atomic_dir, atomic_write_text
from ldm_app.first_stage import is_vq
from ldm_app.limits import check_timestep_grid, shown
from ldm_app.pngmeta import check_unicode
from ldm_app.samplers import (check_sampler_name, make_scheduler, sampler_name, samplers_taking,
                              scheduler_from_config, set_timesteps_checked)
from ldm_app.vocabulary import Vocabulary, unknown_words_note

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
    "timesteps": list,  # the stored sampler's own grid at the stored steps (a tuned few-step schedule)
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
# Each call logs the prompt words the model never saw (vocabulary.json); a caller that makes many calls for one
# request (generate.py: a call per batch) says it once itself and turns the per-call line off in its context (a
# ContextVar: per thread, so one server thread's run does not silence another's).
_NOTE_UNKNOWN_WORDS = contextvars.ContextVar("ldm_app_note_unknown_words", default=True)


@contextlib.contextmanager
def unknown_words_noted_by_caller():
    """Within this block (this thread), pipeline calls do not log the unknown-words line: the caller does."""
    token = _NOTE_UNKNOWN_WORDS.set(False)
    try:
        yield
    finally:
        _NOTE_UNKNOWN_WORDS.reset(token)


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
        if "timesteps" in sampling:
            check_timestep_grid(sampling["timesteps"], sampling.get("num_inference_steps"), "sampling.timesteps")
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


def check_model_folder(folder: Path, match_configs: bool = True) -> None:
    """Fail early, in one line, on what diffusers would report as a long traceback (or a hub download attempt).
    `match_configs=False` leaves out check_weights_match_config (it builds each model on the meta device:
    from_pretrained checks the loaded models instead, in ~5 ms: see check_loaded_weights)."""
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
        if match_configs:
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
    e.g. a unet/ folder that holds the VAE's weights. The model is built on the meta device (no memory, but a
    U-Net's construction takes ~0.1 s) only to list the names it expects; a class we cannot import is left to the
    loader."""
    try:
        cls = getattr(importlib.import_module(str(library)), str(class_name))
    except (ImportError, AttributeError, ValueError):
        return
    expected = _expected_weight_names(cls, component_dir)
    if expected is not None:
        _check_names(component_dir, cls, expected)


def check_loaded_weights(component_dir: Path, model: Any) -> None:
    """check_weights_match_config for a model already loaded from `component_dir`: the names it holds are the
    ones its config calls for, so nothing needs building. Catches what the loaders accept silently (transformers
    initializes missing tensors at random)."""
    _check_names(component_dir, type(model), set(model.state_dict()))


def _check_names(component_dir: Path, cls: type, expected: set[str]) -> None:
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
    """One pipeline call's checked arguments (diffusers' keyword arguments, defaults filled in) and its own
    scheduler (timesteps checked)."""

    args: dict[str, Any]
    scheduler: SchedulerMixin
    output_type: str
    extras: dict[str, Any]  # ours, not diffusers' (inpainting: method, RePaint schedule, mask blur, paste-back)


@contextlib.contextmanager
def _library_warnings_off() -> Iterator[None]:
    """diffusers' and transformers' loggers at ERROR for the block (process-wide: keep the block short)."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    saved = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(saved[0])
        transformers_logging.set_verbosity(saved[1])


def latent_safe(scheduler: SchedulerMixin) -> SchedulerMixin:
    """The scheduler with the two fixes diffusers' StableDiffusionPipeline applies on load, so both pipelines give
    the same image from one folder: no clipping of the predicted x0 (latents are not bounded to [-1, 1]) and
    steps_offset=1 (the SD 1.x timestep grid). Applied before diffusers' own __init__ so it has nothing to fix (and
    no deprecation warning to print)."""
    if scheduler is None:  # a pipeline of some components only (diffusers' from_pipe, encode_prompt tests)
        return scheduler
    fixes = {}
    if getattr(scheduler.config, "clip_sample", False):
        fixes["clip_sample"] = False
    if getattr(scheduler.config, "steps_offset", 1) != 1:
        fixes["steps_offset"] = 1
    return scheduler_from_config(type(scheduler), scheduler.config, **fixes) if fixes else scheduler


# What diffusers' __call__ stores on the pipeline object during a call (guidance_scale, num_timesteps, interrupt...).
# A call runs on a shallow copy of the pipeline; these are copied back afterwards, so `pipe.num_timesteps` and
# friends read as in diffusers (the last call's values).
_CALL_STATE = ("_guidance_scale", "_guidance_rescale", "_clip_skip", "_cross_attention_kwargs", "_num_timesteps",
               "_interrupt")  # fmt: skip


def _call_arguments(frame_locals: dict[str, Any]) -> dict[str, Any]:
    """A __call__'s own arguments (its locals() at entry) as one keyword dict, **kwargs merged in."""
    args = {k: v for k, v in frame_locals.items() if k not in ("self", "__class__", "kwargs")}
    args.update(frame_locals.get("kwargs") or {})
    return args


def _image_size(image: Any, latent_factor: int = 8) -> tuple[int, int] | None:
    """(height, width) in pixels of a PIL image, an (H, W, C) / (B, H, W, C) array, a (C, H, W) / (B, C, H, W)
    tensor (a 4-channel one: latents, `latent_factor` pixels each), or the first of a list; None when unknown."""
    import numpy as np
    from PIL import Image

    if isinstance(image, list) and image:
        image = image[0]
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray) and image.ndim >= 3:
        return image.shape[-3], image.shape[-2]
    if isinstance(image, torch.Tensor) and image.ndim >= 3:
        if image.shape[-3] == 4:  # latents (diffusers takes image latents too): f = 8 pixels per latent
            return image.shape[-2] * latent_factor, image.shape[-1] * latent_factor
        return image.shape[-2], image.shape[-1]
    return None


def _mask_range(mask: Any) -> tuple[float, float] | None:
    """(min, max) of a mask in [0, 1] (PIL in 0..255 scaled), or None for a form we don't read."""
    import numpy as np
    from PIL import Image

    masks = mask if isinstance(mask, list) else [mask]
    lows, highs = [], []
    for m in masks:
        if isinstance(m, Image.Image):
            a = np.asarray(m.convert("L"), dtype=np.float32) / 255.0
        elif isinstance(m, np.ndarray):
            a = m.astype(np.float32)
        elif isinstance(m, torch.Tensor):
            a = m.detach().float().cpu().numpy()
        else:
            return None
        lows.append(float(a.min()))
        highs.append(float(a.max()))
    return min(lows), max(highs)


def check_mask_coverage(mask: Any) -> None:
    """Refuse a mask that repaints nothing (all black) or everything (all white): for the command line and the web
    API, where either is a mistake. The pipeline itself takes both, as diffusers' does."""
    low_high = _mask_range(mask)
    if low_high is not None and low_high[1] < 0.5:
        raise UserError("the mask is all black: nothing to repaint (white = repaint, black = keep)")
    if low_high is not None and low_high[0] >= 0.5:
        raise UserError("the mask is all white: everything would be repainted; use text-to-image (or image-to-image) "
                        "instead (white = repaint, black = keep)")


class LdmAppPipelineMixin:
    """What ldm_app adds to diffusers' Stable Diffusion pipelines; everything else is theirs (the call, encode_prompt,
    LoRA / textual inversion / IP-adapter / single-file loaders, FreeU, VAE slicing and tiling, offload...).

    - loading: one-line errors, safetensors only, float32 unless asked, the folder's sampling defaults
      (ldm_app.json) used for arguments the caller leaves out, and `sampler=` (a name from ldm_app.samplers);
    - every call argument checked against `ldm_app.limits` and the model before anything is allocated;
    - thread safety: a call runs on a shallow copy of the pipeline with its own scheduler (see the module doc);
    - VQ autoencoders (diffusers' SD pipelines decode with `generator=`, which VQModel.decode does not take).
    """

    # the diffusers pipeline class a subclass extends (its __call__ runs; its name goes into model_index.json)
    _diffusers_class: type[DiffusionPipeline] = StableDiffusionPipeline
    # the latent tensor's channels a call's `latents=` must have
    _latent_channels_from = "unet"

    def __init__(
        self,
        vae: AutoencoderKL | VQModel,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        safety_checker: Any = None,
        feature_extractor: Any = None,
        image_encoder: Any = None,
        requires_safety_checker: bool = False,
    ):
        # No safety checker by default: our models are the user's own; a folder that has one still loads it.
        super().__init__(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=latent_safe(scheduler),
            safety_checker=safety_checker, feature_extractor=feature_extractor, image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )  # fmt: skip
        self.sampling_defaults: dict[str, Any] = {}
        self.vocabulary: Vocabulary | None = None  # the training captions' words (vocabulary.json), None: unknown

    # ---- loading and saving -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, sampler: str | None = None,
                        **kwargs):  # fmt: skip
        """Load a local model folder (ours or one saved by diffusers' StableDiffusionPipeline); errors are one-line
        UserErrors (also ValueErrors, as diffusers raises). `sampler` overrides the folder's recommended sampler."""
        folder = Path(pretrained_model_name_or_path)
        # The weights-vs-config check runs on the loaded models (below; on a load failure, by rebuilding them on
        # the meta device to explain it): building each model once more only to list its names cost every cold
        # start ~0.05 s of CPU (0.1-0.3 s wall on a busy 2-core machine).
        check_model_folder(folder, match_configs=False)
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
            check_model_folder(folder)  # another component's weights (shape mismatches): said in our words
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(f"cannot load model folder {folder}: {first_line}") from e
        for name in ("unet", "vae", "text_encoder"):
            check_loaded_weights(folder / name, getattr(pipe, name))
            if any(p.is_meta for p in getattr(pipe, name).parameters()):
                raise ModelLoadError(f"{folder / name}: the weights do not match its config.json (some tensors "
                                     "are missing); are these another component's weights?")  # fmt: skip
        if "timesteps" in defaults:  # against this model's training timesteps, known now that its scheduler is
            check_timestep_grid(defaults["timesteps"], None, f"{folder / DEFAULTS_FILE}: sampling.timesteps",
                                pipe.scheduler.config.num_train_timesteps)
        pipe.sampling_defaults = defaults
        pipe.vocabulary = Vocabulary.read(folder)
        if sampler is not None:
            pipe.set_sampler(sampler)
        return pipe

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs):
        """diffusers' from_pipe (the same modules, no copy: e.g. text-to-image -> inpainting), keeping the model's
        sampling defaults."""
        from diffusers.utils import logging as diffusers_logging

        # diffusers' from_pipe casts to float32 unless told otherwise (an fp16 GPU pipeline would double in memory)
        # and then warns, on every model, about fp32-kept modules even when there are none
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            kwargs["dtype"] = pipeline.unet.dtype if getattr(pipeline, "unet", None) is not None else torch.float32
        modeling = diffusers_logging.get_logger("diffusers.models.modeling_utils")
        level = modeling.level
        modeling.setLevel(logging.ERROR)
        try:
            new = super().from_pipe(pipeline, **kwargs)
        finally:
            modeling.setLevel(level)
        new.sampling_defaults = dict(getattr(pipeline, "sampling_defaults", {}))
        new.vocabulary = getattr(pipeline, "vocabulary", None)
        new.adapter_words = getattr(pipeline, "adapter_words", frozenset())  # the same modules, the same LoRAs
        return new

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True, **kwargs) -> None:
        """Write the model folder atomically, plus ldm_app.json when sampling defaults are set. Weights are always
        safetensors (`safe_serialization=False` is accepted for diffusers' API and ignored: we never write pickles,
        and never load them).

        model_index.json names `StableDiffusionPipeline` for a KL autoencoder, so `DiffusionPipeline.from_pretrained`
        in plain diffusers resolves the folder too; a VQ folder (which SD can't decode) keeps our class name.
        """
        with atomic_dir(save_directory) as tmp:
            super().save_pretrained(tmp, safe_serialization=True, **kwargs)
            index_path = tmp / "model_index.json"
            index = json.loads(index_path.read_text(encoding="utf-8"))
            is_kl = isinstance(self.vae, AutoencoderKL)
            index["_class_name"] = self._diffusers_class.__name__ if is_kl else type(self).__name__
            index.pop("_name_or_path", None)  # where it was loaded from: stale once saved elsewhere
            atomic_write_text(index_path, json.dumps(index, indent=2, sort_keys=True) + "\n")
            for component_config in tmp.glob("*/config.json"):  # each component's, read and written once
                config = json.loads(component_config.read_text(encoding="utf-8"))
                # diffusers' models record the folder they were loaded from: a path on the maker's machine (often
                # a temporary folder of an export), meaningless and private in a folder that is shared
                changed = config.pop("_name_or_path", None) is not None
                if component_config.parent.name == "text_encoder":
                    # transformers 5 loads a model in its config's dtype, diffusers' models load in float32: a
                    # folder stored in fp16 would give `StableDiffusionPipeline.from_pretrained(folder)` an fp16 text
                    # encoder beside an fp32 U-Net ("mat1 and mat2 must have the same dtype"). The stored weights
                    # keep their precision; the config says float32, like diffusers' default (a dtype= argument
                    # still wins).
                    config["dtype"] = "float32"
                    changed = True
                if changed:
                    atomic_write_text(component_config, json.dumps(config, indent=2, sort_keys=True) + "\n")
            if self.sampling_defaults:
                write_sampling_defaults(tmp, self.sampling_defaults)

    # ---- configuration ------------------------------------------------------------------------------------

    def unknown_words_note(self, prompts: str | list[str], negative_prompts: str | list[str] = ()) -> str | None:
        """The line naming the prompt words this model never saw in training ("words unknown to this model: corgi,
        sushi"), or None: all known, or no vocabulary.json with the model. Tokens added to the tokenizer (a loaded
        textual-inversion embedding) and the caption words of loaded LoRAs (adapters.lora_words) count as known."""
        vocabulary = getattr(self, "vocabulary", None)
        if vocabulary is None:
            return None
        added = list(self.tokenizer.get_added_vocab()) if getattr(self, "tokenizer", None) is not None else []
        added += getattr(self, "adapter_words", ())
        return unknown_words_note(vocabulary.with_words(added), prompts, negative_prompts)

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

    # ---- text ---------------------------------------------------------------------------------------------

    def encode_prompt(
        self,
        prompt,
        device,
        num_images_per_prompt,
        do_classifier_free_guidance,
        negative_prompt=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ):
        """diffusers' encode_prompt (returns (prompt_embeds, negative_prompt_embeds)), under the tokenizer lock (a
        fast tokenizer's padding settings are shared state, and a LoRA scale is set on the shared text encoder for
        the call), and in the U-Net's dtype: the text encoder may be kept in another precision."""
        with _TOKENIZER_LOCK, self._truncation_noted(prompt if prompt_embeds is None else None,
                                                     negative_prompt if negative_prompt_embeds is None else None):
            prompt_embeds, negative_prompt_embeds = super().encode_prompt(
                prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt,
                prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, lora_scale=lora_scale,
                clip_skip=clip_skip,
            )  # fmt: skip
        if self.unet is not None:
            prompt_embeds = prompt_embeds.to(self.unet.dtype)
            if negative_prompt_embeds is not None:
                negative_prompt_embeds = negative_prompt_embeds.to(self.unet.dtype)
        return prompt_embeds, negative_prompt_embeds

    @contextlib.contextmanager
    def _truncation_noted(self, *texts: Any) -> Iterator[None]:
        """A prompt longer than the text encoder takes gets one warning line of ours (how long, the limit, the words
        left out) in place of the libraries' two (transformers' "will result in indexing errors", which is not so
        here, and diffusers' list of the cut words); both are silenced for the call, which encodes as before."""
        tokenizer = getattr(self, "tokenizer", None)
        prompts = list(dict.fromkeys(t for group in texts for t in ([group] if isinstance(group, str) else group or ())
                                     if isinstance(t, str)))  # fmt: skip
        if tokenizer is None or not prompts:
            yield
            return
        with _library_warnings_off():  # transformers' own "indexing errors" line, for a long one
            token_ids = tokenizer(prompts, truncation=False)["input_ids"]
        limit = tokenizer.model_max_length
        long = [ids for ids in token_ids if len(ids) > limit]
        for ids in long:
            logger.warning("the prompt is %d tokens, above the %d this model's text encoder takes: it is truncated, "
                           "%r is left out", len(ids), limit, tokenizer.decode(ids[limit - 1 : -1]))  # fmt: skip
        with _library_warnings_off() if long else contextlib.nullcontext():
            yield

    # ---- checks -------------------------------------------------------------------------------------------

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

    def stored_timesteps(self, base: Any, sampler: str | None, steps: int) -> list[int] | None:
        """The model's stored timestep grid (ldm_app.json sampling.timesteps) when the call samples as stored: the
        stored sampler (none asked for, and the pipeline's own not changed) at the stored number of steps. Any
        other sampler or step count uses the sampler's own spacing."""
        d = self.sampling_defaults
        grid = d.get("timesteps")
        if grid is None or steps != d.get("num_inference_steps") or (sampler or sampler_name(base)) != d.get("sampler"):
            return None
        return grid

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
        prompt: Any = None,
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
        **more: Any,
    ) -> CallPlan:
        """Every argument of a call checked against `ldm_app.limits` and the model, before anything is allocated
        (UserError otherwise); returns the plan: diffusers' keyword arguments with our defaults filled in and the
        call's own scheduler. `generate.py` calls it too, to refuse a request before its first image."""
        args = dict(more, prompt=prompt, negative_prompt=negative_prompt, generator=generator, latents=latents,
                    output_type=output_type, num_images_per_prompt=num_images_per_prompt)  # fmt: skip
        if sampler is not None:
            check_sampler_name(sampler)
        if self.unet.config.in_channels != self.unet.config.out_channels and not isinstance(
                self, StableDiffusionInpaintPipeline):  # fmt: skip
            raise UserError(f"this is an inpainting model (its U-Net takes {self.unet.config.in_channels} input "
                            "channels: latents, mask, masked image): it needs an image and a mask "
                            "(LatentDiffusionInpaintPipeline, or generate.py --init_image IMG --mask MASK)")
        prompt_embeds = args.get("prompt_embeds")
        if prompt is None and prompt_embeds is None:
            raise UserError("give a prompt (or prompt_embeds)")
        if prompt is not None:
            prompts, negatives = self.check_prompts(prompt, negative_prompt)
            n_prompts = len(prompts)
            # as lists both: diffusers refuses a str prompt with a list of negatives
            args["prompt"] = prompts
            if negative_prompt is not None:
                args["negative_prompt"] = negatives
        else:
            if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != 3:
                raise UserError(f"prompt_embeds must be a (batch, tokens, width) tensor, got {shown(prompt_embeds)}")
            n_prompts = prompt_embeds.shape[0]
        if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
            raise UserError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {shown(output_type)}")
        takes_size = self._takes_size()
        image_size = _image_size(args.get("image"), self.vae_scale_factor) if "image" in args else None
        if takes_size and (height is None and width is None) and image_size is not None:
            height, width = image_size  # inpainting: the image's own size unless asked otherwise
        height, width, steps, guidance_scale = self.resolve_defaults(height, width, num_inference_steps, guidance_scale)
        if not takes_size and image_size is not None:
            height, width = image_size  # image-to-image: always the image's size
        f = self.vae_scale_factor
        height = limits.check_image_side("height", height, multiple=f if takes_size and image_size is None else 1)
        width = limits.check_image_side("width", width, multiple=f if takes_size and image_size is None else 1)
        smallest = self.smallest_side()
        for name, value in (("height", height), ("width", width)):
            if value < smallest:
                raise UserError(f"{name} is {value} pixels, below the {smallest} this model can take (its U-Net "
                                "halves the latents too often for smaller images)")  # fmt: skip
        guidance_scale = limits.check_guidance_scale(guidance_scale)
        if prompt is not None and any(negatives):
            # a negative prompt acts only through diffusers' unconditional pass, which runs only for a U-Net without
            # a guidance embedding at guidance > 1: otherwise diffusers would drop it without a word
            if getattr(self.unet.config, "time_cond_proj_dim", None) is not None:  # a distilled LCM
                raise UserError("this model has guidance built into its U-Net (a distilled, few-step model), so a "
                                "negative prompt has no effect: leave it out")
            if guidance_scale <= 1:  # e.g. a guidance-distilled model's stored 1
                raise UserError(f"a negative prompt acts only through classifier-free guidance, which runs at "
                                f"guidance_scale > 1; at {guidance_scale:g} it has no effect: leave it out or raise "
                                "guidance_scale")
        per_prompt = limits.check_count("num_images_per_prompt", num_images_per_prompt,
                                        limits.current().max_images_per_call)  # fmt: skip
        batch_size = n_prompts * per_prompt
        limits.check_batch(batch_size, height, width)
        base = self.scheduler  # read once: another thread may set_sampler meanwhile
        label = sampler or sampler_name(base) or type(base).__name__
        self.check_generator(generator, batch_size)
        if latents is not None:
            channels = self.unet.config.in_channels if self._latent_channels_from == "unet" else \
                self.vae.config.latent_channels  # fmt: skip
            shape = (batch_size, channels, height // f, width // f)
            if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
                got = f"a {latents.dtype} tensor" if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise UserError(f"latents must be a floating-point torch.Tensor of shape {shape}, got {got}")
            if tuple(latents.shape) != shape:
                raise UserError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
            if not torch.isfinite(latents).all():
                raise UserError("latents contain NaN or infinite values")
        scheduler = (make_scheduler(sampler, base.config) if sampler is not None
                     else scheduler_from_config(type(base), base.config))  # fmt: skip
        custom = args.get("timesteps") if args.get("timesteps") is not None else args.get("sigmas")
        stored = self.stored_timesteps(base, sampler, steps)
        grid_name = "timesteps"
        if custom is None and stored is not None and "image" not in args:  # text-to-image at the stored settings
            custom = args["timesteps"] = list(stored)  # one per stored step: checked when the folder loaded
            grid_name = "sampling.timesteps"
        if custom is not None:  # the caller's own grid: diffusers checks the values, we that the sampler takes one
            limits.check_count("len(timesteps)", len(custom), limits.current().max_steps)
            kind = "timesteps" if args.get("timesteps") is not None else "sigmas"
            if kind not in inspect.signature(scheduler.set_timesteps).parameters:
                raise UserError(f"the {label} sampler cannot take a {kind} grid ({kind}=): use one that can "
                                f"({', '.join(samplers_taking(kind))}) or give num_inference_steps")
            if kind == "timesteps":  # beyond the training timesteps, DPM-Solver's sigma lookup clamps silently
                check_timestep_grid(list(custom), None, grid_name, base.config.num_train_timesteps)
        else:
            steps = limits.check_steps(steps, base.config.num_train_timesteps, label)
            set_timesteps_checked(scheduler, steps, device=self._execution_device, label=label)
        args.update(num_inference_steps=steps, guidance_scale=guidance_scale, num_images_per_prompt=per_prompt)
        if takes_size:
            args.update(height=height, width=width)
        extras = self.check_images(args, steps)
        extras["class_labels"] = self.check_class_labels(args.pop("class_labels", None), n_prompts, per_prompt)
        extras["scalars"] = self.check_scalars(args.pop("scalars", None), n_prompts, per_prompt)
        return CallPlan(args, scheduler, output_type, extras)

    def check_class_labels(self, class_labels: Any, num_prompts: int, per_prompt: int) -> torch.Tensor | None:
        """One class label per image for a class-conditional U-Net (num_class_embeds = classes + the null class),
        none for any other; UserError otherwise."""
        from ldm_app.conditioning import class_labels_for_call

        rows = self.unet.config.num_class_embeds
        if rows is None:
            if class_labels is not None:
                raise UserError("this model is not class-conditional (its U-Net has no class embedding); drop "
                                "class_labels")  # fmt: skip
            return None
        if class_labels is None:
            raise UserError(f"this model is class-conditional: give class_labels (0..{rows - 2})")
        return class_labels_for_call(class_labels, num_prompts, per_prompt, rows - 1)

    def check_scalars(self, scalars: Any, num_prompts: int, per_prompt: int) -> torch.Tensor | None:
        """One scalar per image for a scalar-conditioned U-Net (ldm_app.conditioning), none for any other;
        UserError otherwise."""
        from ldm_app.conditioning import is_scalar_unet, scalars_for_call

        if not is_scalar_unet(self.unet.config):
            if scalars is not None:
                raise UserError("this model is not scalar-conditioned (its U-Net has no scalar embedding); drop "
                                "scalars")  # fmt: skip
            return None
        if scalars is None:
            raise UserError("this model is scalar-conditioned: give scalars (a number per prompt or per image, e.g. "
                            "the object size as a fraction of the image side)")  # fmt: skip
        return scalars_for_call(scalars, num_prompts, per_prompt)

    def _takes_size(self) -> bool:
        return "height" in inspect.signature(type(self).__call__).parameters

    def call_defaults(self) -> dict[str, Any]:
        """__call__'s defaults, for what a direct check_call (generate.py checks before its first image) leaves out."""
        return {name: p.default for name, p in inspect.signature(type(self).__call__).parameters.items()}

    def check_images(self, args: dict[str, Any], steps: int) -> dict[str, Any]:
        """Checks of `image=`, `mask_image=`, `strength=` (image-to-image and inpainting pipelines); pops and returns
        the call arguments that are ours rather than diffusers'."""
        return {}

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

    # ---- the call -----------------------------------------------------------------------------------------

    def _needs_exclusive_call(self, args: dict[str, Any] | None = None) -> bool:
        """Offload (accelerate or diffusers hooks) moves weights between devices around each call, caching hooks
        keep state between steps, and a LoRA scale in cross_attention_kwargs is set on the shared U-Net for the
        call: such calls are not safe to run from several threads at once."""
        if args and isinstance(args.get("cross_attention_kwargs"), dict) and "scale" in args["cross_attention_kwargs"]:
            return True
        if getattr(self, "_all_hooks", None) or getattr(self, "_offload_device", None) is not None:
            return True
        for component in self.components.values():
            if not isinstance(component, torch.nn.Module):
                continue
            registry = getattr(component, "_diffusers_hook", None)
            if hasattr(component, "_hf_hook") or (registry is not None and getattr(registry, "hooks", None)):
                return True
        return False

    def _ldm_call(self, args: dict[str, Any]) -> Any:
        """Check, then run diffusers' call on a shallow copy of this pipeline that has the call's own scheduler (or,
        when the pipeline has offload hooks, on this pipeline, one call at a time, its scheduler swapped for the
        call); decode VQ latents ourselves; copy diffusers' per-call state back (num_timesteps, guidance_scale)."""
        sampler = args.pop("sampler", None)
        return_dict = args.pop("return_dict", True)
        try:
            plan = self.check_call(sampler=sampler, **args)
        except UserError as e:
            raise CallArgumentError(str(e)) from None
        if _NOTE_UNKNOWN_WORDS.get() and plan.args.get("prompt") is not None:
            note = self.unknown_words_note(plan.args["prompt"], plan.args.get("negative_prompt") or ())
            if note:
                logger.warning("%s", note)
        # the call's own scheduler, and for a class- or scalar-conditioned U-Net one that passes the call's labels
        swaps = {"scheduler": plan.scheduler}
        if plan.extras.get("class_labels") is not None:
            swaps["unet"] = ClassConditionedUNet(self.unet, plan.extras["class_labels"])
        elif plan.extras.get("scalars") is not None:
            from ldm_app.conditioning import null_scalar_condition, scalar_condition

            swaps["unet"] = ClassConditionedUNet(self.unet, scalar_condition(plan.extras["scalars"]),
                                                 null_scalar_condition(1)[0])  # fmt: skip
        if self._needs_exclusive_call(plan.args):
            with _EXCLUSIVE_CALL_LOCK:
                saved = {name: getattr(self, name) for name in swaps}
                for name, value in swaps.items():
                    object.__setattr__(self, name, value)
                try:
                    images = self._sample(plan)
                finally:
                    for name, value in saved.items():
                        object.__setattr__(self, name, value)
                self.maybe_free_model_hooks()
        else:
            runner = copy.copy(self)  # shares the modules and config; has its own per-call attributes
            for name, value in swaps.items():
                object.__setattr__(runner, name, value)  # bypasses the config update of __setattr__
            images = runner._sample(plan)
            for name in _CALL_STATE:
                if name in runner.__dict__:
                    setattr(self, name, runner.__dict__[name])
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None) if return_dict else \
            (images, None)  # fmt: skip

    def _sample(self, plan: CallPlan) -> Any:
        """diffusers' __call__ of the pipeline class we extend (on latents for a VQ autoencoder), then our decoding."""
        args = dict(plan.args)
        vq = is_vq(self.vae)
        if vq:
            args["output_type"] = "latent"
        images = self._diffusers_class.__call__(self, **args, return_dict=True).images
        if vq and plan.output_type != "latent":
            images = self.decode_to_images(images, plan.output_type)
        return images

    def decode_to_images(self, latents: torch.Tensor, output_type: str) -> Any:
        """x0 latents (B, C, h, w) -> images in `output_type` (PIL list, (B, H, W, 3) numpy or (B, 3, H, W) tensor
        in [0, 1]). A VQ autoencoder quantizes in decode, as in LDM's VQ models."""
        if output_type == "latent":
            return latents
        latents = latents.to(self.vae.dtype)
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]  # in [-1, 1]
        self.maybe_free_model_hooks()
        return self.image_processor.postprocess(image, output_type=output_type)


class ClassConditionedUNet:
    """A class- or scalar-conditioned U-Net as diffusers' pipelines call it (they pass no class_labels): every call
    gets the call's labels, and under classifier-free guidance ([uncond; cond] batches) the null condition for the
    first half. Labels are (B,) class indices (null: the last class embedding) or (B, D) float rows, a scalar
    model's [s, 1] (null: `null`, [0, 0]); float rows take the U-Net's dtype (an fp16 model's projection would
    refuse float32 input). Attributes (config, dtype, device...) are the U-Net's. One per call: the shared U-Net
    is not changed."""

    def __init__(self, unet: UNet2DConditionModel, labels: torch.Tensor, null: torch.Tensor | None = None):
        self.unet = unet
        self.labels = labels  # (B,) or (B, D)
        self.null = torch.tensor(unet.config.num_class_embeds - 1) if null is None else null  # () or (D,)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.unet, name)

    def __call__(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        labels = self.labels
        if sample.shape[0] == 2 * len(labels):  # classifier-free guidance: the null condition for the uncond half
            labels = torch.cat([self.null.to(labels).expand_as(labels), labels])
        labels = labels.to(sample.device, dtype=sample.dtype if labels.is_floating_point() else labels.dtype)
        return self.unet(sample, timestep, *args, class_labels=labels, **kwargs)


class ModelLoadError(UserError, ValueError):
    """A model folder that can't be loaded: a UserError for our scripts, a ValueError as diffusers raises."""


class CallArgumentError(UserError, ValueError):
    """A bad pipeline call argument: a UserError for our scripts, a ValueError as diffusers raises."""


class LatentDiffusionPipeline(LdmAppPipelineMixin, StableDiffusionPipeline):
    """Text-to-image with a latent diffusion model (CLIP text encoder, conditional U-Net, KL or VQ autoencoder):
    diffusers' `StableDiffusionPipeline` with ldm_app's loading, defaults, checks, samplers and thread safety."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        sampler: str | None = None,
        class_labels: int | list[int] | torch.Tensor | None = None,
        scalars: float | list[float] | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> StableDiffusionPipelineOutput | tuple:
        """diffusers' StableDiffusionPipeline call. Arguments left None come from the model's sampling defaults
        (ldm_app.json), else 50 steps, guidance 7.5 and the U-Net's native size; `sampler` (a name from
        ldm_app.samplers) applies to this call only; `class_labels` (for a class-conditional model): one int, one
        per prompt or one per image; `scalars` (for a scalar-conditioned model): one number, one per prompt or one
        per image. Image order: all images of prompt 0, then of prompt 1, ... Safe to call from
        several threads at once (see the module doc)."""
        return self._ldm_call(_call_arguments(locals()))


IMAGE_TYPES = "a PIL image, a numpy array or a torch tensor (or a list of them)"


def check_image_argument(name: str, image: Any, latent_factor: int = 8) -> tuple[int, int]:
    """An init image / mask in one of the forms diffusers' image processor takes; returns its (height, width)."""
    size = _image_size(image, latent_factor)
    if image is None:
        raise UserError(f"{name} is required: {IMAGE_TYPES}")
    if size is None:
        hint = " (open files with PIL.Image.open)" if isinstance(image, (str, os.PathLike)) else ""
        raise UserError(f"{name} must be {IMAGE_TYPES}, got {shown(image, 80)}{hint}")
    return size


def check_strength(strength: Any, steps: int) -> float:
    """SDEdit's strength in (0, 1]: the fraction of the noise schedule the init image is taken back along; at
    least one of the `steps` sampling steps must remain."""
    strength = limits.check_number("strength", strength)
    if not 0.0 < strength <= 1.0:
        raise UserError(f"strength must be in (0, 1], got {strength:g}")
    if int(steps * strength) < 1:
        raise UserError(f"strength {strength:g} with {steps} steps leaves no sampling step; raise one or the other")
    return strength


class LatentDiffusionImg2ImgPipeline(LdmAppPipelineMixin, StableDiffusionImg2ImgPipeline):
    """Image-to-image (SDEdit, Meng et al. 2022): the init image is encoded, noised to level `strength` along the
    model's forward process, and denoised under the prompt. diffusers' `StableDiffusionImg2ImgPipeline` with
    ldm_app's loading, defaults, checks, samplers and thread safety; build it from a text-to-image pipeline with
    `LatentDiffusionImg2ImgPipeline.from_pipe(pipe)` (the same modules, no copy)."""

    _diffusers_class = StableDiffusionImg2ImgPipeline

    def check_images(self, args: dict[str, Any], steps: int) -> dict[str, Any]:
        check_image_argument("image", args.get("image"), self.vae_scale_factor)
        args["strength"] = check_strength(args.get("strength", self.call_defaults()["strength"]), steps)
        return {}

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        strength: float = 0.8,
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        sampler: str | None = None,
        class_labels: int | list[int] | torch.Tensor | None = None,
        scalars: float | list[float] | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> StableDiffusionPipelineOutput | tuple:
        """diffusers' StableDiffusionImg2ImgPipeline call; the output has the init image's size. Steps and guidance
        left None come from the model's sampling defaults; of `num_inference_steps`, int(steps * strength) run."""
        return self._ldm_call(_call_arguments(locals()))


INPAINT_METHODS = ("blend", "repaint", "model")


class LatentDiffusionInpaintPipeline(LdmAppPipelineMixin, StableDiffusionInpaintPipeline):
    """Inpainting: `image=` and `mask_image=` (white = repaint, black = keep; diffusers' and A1111's convention).

    `inpaint=` chooses how:
    - "blend" (default for a 4-channel U-Net, any text-to-image model): after each step the latents outside the
      mask are replaced by the init image's latents noised to that step (diffusers' own 4-channel path);
    - "repaint": RePaint (Lugmayr et al. 2022) in latent space: the same replacement, plus resampling: every
      `jump_length` steps the latents are taken back `jump_length` steps along the forward process and denoised
      again, `jump_n_sample` times in all, so the new content harmonizes with what is kept (diffusers'
      RePaintScheduler); costs about jump_n_sample times the U-Net calls (jump_n_sample=1: blending without
      resampling). The last `harmonize` fraction of the steps (default 0.3) runs free of the known region: the
      latents end as the model's own, self-consistent code instead of a splice of two encodings, which a small
      autoencoder with attention cannot decode (measured on the bundled model: the splice of two images' own
      encodings decodes with a cream background and shifted colours on gray backgrounds; new object right on gray
      0.15 with no free tail, 0.90 with 30%). Outside the mask the output then drifts a little: use paste_back;
    - "model" (the only choice for a 9-channel SD-inpainting U-Net: latents + mask + masked-image latents).
    `mask_blur` (pixels) softens the mask's edge and `paste_back=True` puts the unmasked pixels of the init image
    back exactly after decoding (through the blurred mask). Built with `from_pipe(pipe)` from a text-to-image
    pipeline; diffusers' `StableDiffusionInpaintPipeline` otherwise.
    """

    _diffusers_class = StableDiffusionInpaintPipeline
    _latent_channels_from = "vae"

    def check_images(self, args: dict[str, Any], steps: int) -> dict[str, Any]:
        defaults = self.call_defaults()
        ours = ("inpaint", "jump_length", "jump_n_sample", "harmonize", "mask_blur", "paste_back")
        extras = {name: args.pop(name, defaults[name]) for name in ours}
        image_size = check_image_argument("image", args.get("image"), self.vae_scale_factor)
        mask_size = check_image_argument("mask_image", args.get("mask_image"), self.vae_scale_factor)
        if mask_size != image_size:
            raise UserError(f"mask_image is {mask_size[1]}x{mask_size[0]} pixels but image is "
                            f"{image_size[1]}x{image_size[0]}; give a mask of the image's size")  # fmt: skip
        nine = self.unet.config.in_channels == 9
        method = extras["inpaint"] or ("model" if nine else "blend")
        if method not in INPAINT_METHODS:
            raise UserError(f"unknown inpaint method {shown(method)}; expected one of: {', '.join(INPAINT_METHODS)}")
        if nine != (method == "model"):
            raise UserError("inpaint='model' needs an inpainting model (a 9-channel U-Net) and such a model takes "
                            f"no other method; this U-Net has {self.unet.config.in_channels} input channels")
        for name in ("jump_length", "jump_n_sample"):
            extras[name] = limits.check_count(name, extras[name], limits.current().max_steps)
        harmonize = limits.check_number("harmonize", extras["harmonize"])
        if not 0 <= harmonize < 1:
            raise UserError(f"harmonize must be in [0, 1), got {harmonize:g}")
        blur = limits.check_number("mask_blur", extras["mask_blur"])
        if not 0 <= blur <= 256:
            raise UserError(f"mask_blur must be in [0, 256] pixels, got {blur:g}")
        args["strength"] = check_strength(args.get("strength", defaults["strength"]), steps)
        if method == "repaint" and args["strength"] != 1.0:
            raise UserError("inpaint='repaint' starts from pure noise (strength 1); drop strength or use 'blend'")
        return dict(extras, inpaint=method, paste_back=bool(extras["paste_back"]))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        mask_image: Any = None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 1.0,
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        sampler: str | None = None,
        class_labels: int | list[int] | torch.Tensor | None = None,
        scalars: float | list[float] | torch.Tensor | None = None,
        inpaint: str | None = None,
        jump_length: int = 5,
        jump_n_sample: int = 5,
        harmonize: float = 0.3,
        mask_blur: float = 0,
        paste_back: bool = False,
        **kwargs: Any,
    ) -> StableDiffusionPipelineOutput | tuple:
        """diffusers' StableDiffusionInpaintPipeline call plus `inpaint` ("blend", "repaint" or "model"; default:
        "model" for a 9-channel U-Net, else "blend", diffusers' own behaviour), RePaint's `jump_length`,
        `jump_n_sample` and `harmonize`, `mask_blur` and `paste_back` (see the class doc). The output has the
        image's size unless height/width are given."""
        return self._ldm_call(_call_arguments(locals()))

    def _sample(self, plan: CallPlan) -> Any:
        want = plan.output_type
        if plan.extras["paste_back"] and want != "latent":
            plan = CallPlan({**plan.args, "output_type": "pt"}, plan.scheduler, "pt", plan.extras)
        if plan.extras["inpaint"] == "repaint":
            images = self._repaint(plan)
        else:
            images = super()._sample(plan)
        if plan.extras["paste_back"] and want != "latent":
            images = self._paste_back(images, plan, want)
        return images

    def _paste_back(self, generated: torch.Tensor, plan: CallPlan, output_type: str) -> Any:
        """Init image outside the (blurred) mask, generated inside: out = m * generated + (1 - m) * init, in [0, 1]
        pixels, so unmasked pixels come back exactly (A1111's "inpaint only masked" paste-back)."""
        from diffusers.image_processor import VaeImageProcessor

        a = plan.args
        height, width = generated.shape[-2:]
        init = (self.image_processor.preprocess(a["image"], height=height, width=width) + 1) / 2  # (1|B, 3, H, W)
        mask = a["mask_image"]
        if plan.extras["mask_blur"] > 0:
            masks = mask if isinstance(mask, list) else [mask]
            mask = [self.mask_processor.blur(m.convert("L"), blur_factor=plan.extras["mask_blur"]) if hasattr(m, "convert")
                    else m for m in masks]  # fmt: skip
        soft = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=False,
                                 do_convert_grayscale=True).preprocess(mask, height=height, width=width)  # fmt: skip
        init, soft = init.to(generated), soft.to(generated)
        out = soft * generated + (1 - soft) * init
        return self.image_processor.postprocess(out, output_type=output_type, do_denormalize=[False] * out.shape[0])

    def _repaint(self, plan: CallPlan) -> Any:
        """RePaint's loop in latent space with diffusers' RePaintScheduler (the model's noise schedule, its
        `step` for the known/unknown combination and `undo_step` for the jumps back), under classifier-free
        guidance. The latent mask is max-pooled: a latent cell with any masked pixel is regenerated."""
        from diffusers import RePaintScheduler
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
        from diffusers.utils.torch_utils import randn_tensor

        a, e = plan.args, plan.extras
        device = self._execution_device
        guided = a["guidance_scale"] > 1.0
        embeds, negative = self.encode_prompt(
            a.get("prompt"), device, a["num_images_per_prompt"], guided, a.get("negative_prompt"),
            prompt_embeds=a.get("prompt_embeds"), negative_prompt_embeds=a.get("negative_prompt_embeds"),
            clip_skip=a.get("clip_skip"),
        )  # fmt: skip
        context = torch.cat([negative, embeds]) if guided else embeds  # [uncond; cond]
        batch = embeds.shape[0]
        height, width, f = a["height"], a["width"], self.vae_scale_factor
        image = self.image_processor.preprocess(a["image"], height=height, width=width)
        image = image.to(device=device, dtype=self.vae.dtype)
        known = retrieve_latents(self.vae.encode(image), sample_mode="argmax") * self.vae.config.scaling_factor
        known = known.repeat(batch // known.shape[0], 1, 1, 1).to(embeds.dtype)
        mask = self.mask_processor.preprocess(a["mask_image"], height=height, width=width).to(device)
        keep = 1.0 - torch.nn.functional.max_pool2d(mask, kernel_size=f)  # 1 = known latent cell
        keep = keep.repeat(batch // keep.shape[0], 1, 1, 1).to(embeds.dtype)

        known_keys = inspect.signature(RePaintScheduler.__init__).parameters  # the noise schedule, not the sampler's
        schedule = {k: v for k, v in self.scheduler.config.items() if k in known_keys}
        scheduler = RePaintScheduler.from_config(schedule, eta=a.get("eta", 0.0), clip_sample=False)
        scheduler.set_timesteps(a["num_inference_steps"], e["jump_length"], e["jump_n_sample"], device=device)
        generator = a.get("generator")
        x = a.get("latents")
        if x is None:
            shape = (batch, self.vae.config.latent_channels, height // f, width // f)
            x = randn_tensor(shape, generator=generator, device=device, dtype=embeds.dtype)
        x = x.to(device=device, dtype=embeds.dtype)
        self._num_timesteps = len(scheduler.timesteps)
        # the last `harmonize` fraction of the steps runs without imposing the known region (see the class doc)
        free_below = round(e["harmonize"] * a["num_inference_steps"]) * (
            scheduler.config.num_train_timesteps // scheduler.num_inference_steps)
        t_last = scheduler.timesteps[0] + 1
        callback = a.get("callback_on_step_end")
        self._interrupt = False
        with self.progress_bar(total=len(scheduler.timesteps)) as progress:
            for i, t in enumerate(scheduler.timesteps):
                if self._interrupt:  # as in diffusers' loops: the remaining steps are skipped, the latents decoded
                    break
                if t < t_last:  # a reverse step x_t -> x_{t-1}, known region from q(x_{t-1} | x0)
                    model_input = torch.cat([x, x]) if guided else x
                    eps = self.unet(model_input, t, encoder_hidden_states=context,
                                    cross_attention_kwargs=a.get("cross_attention_kwargs"), return_dict=False)[0]  # fmt: skip
                    if guided:
                        uncond, cond = eps.chunk(2)
                        eps = uncond + a["guidance_scale"] * (cond - uncond)
                    pinned = keep if t >= free_below else torch.zeros_like(keep)  # the harmonizing tail: free
                    x = scheduler.step(eps, t, x, known, pinned, generator=generator).prev_sample
                else:  # a jump back: x_{t-1} -> x_t along the forward process
                    x = scheduler.undo_step(x, t_last, generator=generator)
                t_last = t
                if callback is not None:  # diffusers' callback_on_step_end; a step here is a step or a jump back
                    names = a.get("callback_on_step_end_tensor_inputs") or ["latents"]
                    out = callback(self, i, t, {"latents": x} if "latents" in names else {})
                    x = out.get("latents", x)
                progress.update()
        return self.decode_to_images(x, plan.output_type)
