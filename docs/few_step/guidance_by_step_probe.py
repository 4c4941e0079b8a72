"""Guidance by sampling step, measured before distilling it: a teacher (not guidance-distilled) sampled with
DPM-Solver++ on the 4-step grid 999/700/400/100 under classifier-free guidance whose scale differs per step, scored
by evaluate ldm's own code (run_adherence, both judges) on 200 one-object + 200 two-object prompts.

    python docs/few_step/guidance_by_step_probe.py TEACHER SEED {free,canonical} OUT.json 2,1.5,1.5,1.5

How: the pipeline runs with guidance G = 2 (so it makes the unconditional and conditional passes); a forward hook
on the U-Net replaces the unconditional output u by c - k (c - u), k = (w - 1) / (G - 1), so that the pipeline's
u' + G (c - u') equals u + w (c - u), w being the scale given for that step. diffusers' pipeline takes one scale
per call, hence the hook.
"""

import json
import sys

import torch

from ldm_app.evaluation.adherence import run_adherence
from ldm_app.evaluation.sweep import judge_score
from ldm_app.pipeline import LatentDiffusionPipeline

GRID = [999, 700, 400, 100]
G = 2.0

model, seed, style, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
scales = [float(x) for x in sys.argv[5].split(",")]
assert len(scales) == len(GRID), f"one scale per step of {GRID}"
pipe = LatentDiffusionPipeline.from_pretrained(model)
pipe.set_progress_bar_config(disable=True)


def by_step(module, args, kwargs, output):
    t = args[1] if len(args) > 1 else kwargs["timestep"]
    t = int(t.flatten()[0]) if torch.is_tensor(t) else int(t)
    w = scales[min(range(len(GRID)), key=lambda i: abs(GRID[i] - t))]
    sample = output[0] if isinstance(output, tuple) else output.sample
    u, c = sample.chunk(2)
    k = (w - 1) / (G - 1)
    new = torch.cat([c - k * (c - u), c])
    return (new,) if isinstance(output, tuple) else type(output)(sample=new)


pipe.unet.register_forward_hook(by_step, with_kwargs=True)
report = run_adherence(pipe, 200, 200, seed, sampler="dpm++", steps=4, guidance_scale=G, prompt_style=style,
                       timesteps=GRID, log=lambda s: None).report
with open(out, "w") as f:
    json.dump(report, f, default=str)
one, two = report["one_object"], report["two_object"]
print(f"{sys.argv[5]}: score CNN / geometric {judge_score(report):.3f} / {judge_score(report, geometric=True):.3f}; "
      f"colour {one['accuracy']['colour']:.3f} / {one['accuracy_geometry']['colour']:.3f}, "
      f"relation {two['accuracy']['relation']:.3f} / {two['accuracy_geometry']['relation']:.3f}")
