"""ldm_app: a small, hackable latent diffusion (Stable Diffusion 1.x style) toolkit.

Heavy imports (torch, diffusers) are lazy so that `python generate.py --help` and error paths start fast.
"""

from pathlib import Path

__version__ = "0.1.0"

# The bundled default model: a Stable-Diffusion-1.x-layout folder made by recipes/shapes.sh (fp16 safetensors,
# loaded in float32), with its recommended sampling settings in ldm_app.json.
DEFAULT_MODEL = str(Path(__file__).parent / "assets" / "default_model")

_LAZY = {"LatentDiffusionPipeline": "ldm_app.pipeline"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ldm_app' has no attribute {name!r}")


__all__ = ["DEFAULT_MODEL", "LatentDiffusionPipeline", "__version__"]
