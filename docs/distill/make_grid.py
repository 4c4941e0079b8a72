"""The student-vs-teacher grid of docs/distill/README.md: one row per setting, one column per prompt, same seeds.

    python docs/distill/make_grid.py --student OUT --teacher ldm_app/assets/default_model --out grid.png
"""

from __future__ import annotations

import argparse

import torch

PROMPTS = [
    "a large red circle in the center on a white background",
    "a small blue square on the left on a black background",
    "a large yellow triangle at the top on a gray background",
    "a small purple circle at the bottom on a white background",
    "a large green square on the right on a black background",
    "a small orange triangle in the center on a gray background",
    "a small green triangle above a small orange circle on a white background",
    "a small red square to the left of a small blue circle on a gray background",
]


def main() -> None:
    from diffusers.utils import make_image_grid

    from ldm_app.pipeline import LatentDiffusionPipeline, make_generators

    p = argparse.ArgumentParser()
    p.add_argument("--student", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rows = []
    teacher = LatentDiffusionPipeline.from_pretrained(args.teacher)
    student = LatentDiffusionPipeline.from_pretrained(args.student)
    for pipe in (teacher, student):
        pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        rows.append(teacher(PROMPTS, sampler="dpm++", num_inference_steps=20, guidance_scale=3.0,
                            generator=make_generators(args.seed, len(PROMPTS))).images)
        for steps in (4, 2, 1):
            rows.append(student(PROMPTS, sampler="lcm", num_inference_steps=steps, guidance_scale=args.guidance,
                                generator=make_generators(args.seed, len(PROMPTS))).images)
    images = [im.resize((128, 128), resample=0) for row in rows for im in row]
    make_image_grid(images, rows=len(rows), cols=len(PROMPTS)).save(args.out)
    print(f"wrote {args.out}: rows teacher dpm++ 20 g3, student lcm 4 / 2 / 1 g{args.guidance:g}")


if __name__ == "__main__":
    main()
