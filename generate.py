"""Generate images from text: `python generate.py "a corgi in a sushi house"` (see --help, ldm_app/generate.py)."""

import sys

from ldm_app.errors import run_cli
from ldm_app.generate import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
