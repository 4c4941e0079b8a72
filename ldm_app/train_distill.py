"""Distil a text-to-image model into a few-step latent consistency model: python -m ldm_app.train_distill --help
(ldm_app/training/distill.py has the maths; docs/distill/README.md the measured run)."""

import sys

from ldm_app.errors import run_cli
from ldm_app.training.distill import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
