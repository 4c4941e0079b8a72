"""Sixteen free-form prompts of held-out seed 2 that the 40-pass teacher gets right and the 4-step default gets wrong
(by the CNN judge, in evaluate ldm's run), drawn again one at a time from their recorded image seeds: top row the
default model at its stored 4 steps, bottom row its teacher (DPM-Solver++ 20, guidance 1.5).

    python docs/few_step/free_form_failures.py MODEL TEACHER TEACHER_REPORT OUT.png
    # e.g. ldm_app/assets/default_model runs/long/cont3d runs/long/m_cont3d/teacher_free_s2/adherence.json

TEACHER_REPORT is the teacher's `evaluate ldm --prompt_style free --seed 2 --num_prompts 200
--two_object_prompts 200` report (its per_prompt list gives the prompts and image seeds).
"""

import json
import sys

import torch
from PIL import Image

from ldm_app.pipeline import LatentDiffusionPipeline

model, teacher, report, out = sys.argv[1:5]
per_prompt = json.load(open(report))["per_prompt"]
CHOSEN = [0, 3, 15, 51, 75, 80, 107, 119, 187, 189, 228, 244, 305, 368, 374, 378]
SIDE = 128
rows = []
for folder, settings in ((model, {}), (teacher, {"num_inference_steps": 20, "guidance_scale": 1.5})):
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    rows.append([pipe(per_prompt[i]["prompt"], generator=torch.Generator().manual_seed(per_prompt[i]["seed"]),
                      **settings).images[0].resize((SIDE, SIDE), Image.NEAREST) for i in CHOSEN])
sheet = Image.new("RGB", (SIDE * len(CHOSEN), SIDE * len(rows)))
for r, images in enumerate(rows):
    for c, image in enumerate(images):
        sheet.paste(image, (SIDE * c, SIDE * r))
sheet.save(out)
for c, i in enumerate(CHOSEN):
    print(c + 1, per_prompt[i]["prompt"])
