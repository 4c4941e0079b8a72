"""Train the first stage: a KL or VQ autoencoder (see ldm_app/training/vae.py).

    python train_vae.py --config configs/vae/shapes64.yaml --train_data_dir DIR --output_dir OUT
    accelerate launch train_vae.py ...   (several GPUs / processes)
"""

import sys

from ldm_app.errors import run_cli
from ldm_app.training.vae import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
