"""The first 12 free-form prompts of seed 0 (evaluate ldm's own prompts and image seeds), one row each: the bundled
model at 8 steps, the bundled model at 4 steps on its grid, and the trajectory student at 4 steps on the same grid.

    python docs/few_step/trajectory_student_grid.py runs/trajectory/student   # writes trajectory_student_grid.png
"""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_app.evaluation.adherence import sample_prompts
from ldm_app.pipeline import LatentDiffusionPipeline

student = sys.argv[1] if len(sys.argv) > 1 else "runs/trajectory/student"
torch.set_num_threads(1)
prompts = sample_prompts(12, 0, 0, 64, "free")
rows = []
for model, steps in (("ldm_app/assets/default_model", 8), ("ldm_app/assets/default_model", 4), (student, 4)):
    pipe = LatentDiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    images = [pipe(p.text, num_inference_steps=steps, generator=torch.Generator().manual_seed(p.seed),
                   output_type="np").images[0] for p in prompts]
    rows.append(np.concatenate([(np.clip(i, 0, 1) * 255).astype(np.uint8) for i in images], axis=1))
out = Path(__file__).with_name("trajectory_student_grid.png")
Image.fromarray(np.concatenate(rows)).resize((12 * 96, 3 * 96), Image.Resampling.NEAREST).save(out)
for i, p in enumerate(prompts):
    print(i, p.text)
