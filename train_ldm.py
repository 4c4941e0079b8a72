"""Train a text-conditioned latent diffusion U-Net: python train_ldm.py --help (see docs/training.md)."""

import sys

from ldm_app.errors import run_cli
from ldm_app.training.ldm import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
