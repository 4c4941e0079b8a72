"""Distil a model: into a few-step latent consistency model (LCM), or with distill.method=guidance into one that needs
no classifier-free guidance (text-to-image or inpainting): python -m ldm_app.train_distill --help
(ldm_app/training/distill.py has the maths; docs/distill/README.md and the README's inpainting section the runs)."""

import sys

from ldm_app.errors import run_cli
from ldm_app.training.distill import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
