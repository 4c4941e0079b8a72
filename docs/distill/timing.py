"""Seconds per image of the teacher's default (DPM-Solver++ 20 steps, guidance 3: two U-Net passes a step) and the
student at 4 / 2 / 1 LCM steps (one pass a step), measured in ONE process, interleaved, so that a shared machine's
load falls on every setting alike (the sweep's s/image come from separate runs at different loads).

    python docs/distill/timing.py --student OUT --teacher ldm_app/assets/default_model [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    from ldm_app.pipeline import LatentDiffusionPipeline, make_generators

    p = argparse.ArgumentParser()
    p.add_argument("--student", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    teacher = LatentDiffusionPipeline.from_pretrained(args.teacher)
    student = LatentDiffusionPipeline.from_pretrained(args.student)
    settings = {"teacher dpm++ 20 g3": (teacher, "dpm++", 20), "teacher pndm 50 g7.5": (teacher, "pndm", 50),
                "student lcm 4 g3": (student, "lcm", 4), "student lcm 2 g3": (student, "lcm", 2),
                "student lcm 1 g3": (student, "lcm", 1)}
    prompts = ["a large red circle in the center on a white background"] * args.batch
    times: dict[str, list[float]] = {name: [] for name in settings}
    for pipe in (teacher, student):
        pipe.set_progress_bar_config(disable=True)
        pipe(prompts[:2], num_inference_steps=2)  # warm-up
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, (pipe, sampler, steps) in settings.items():
                guidance = 7.5 if sampler == "pndm" else 3.0
                t0 = time.perf_counter()
                pipe(prompts, sampler=sampler, num_inference_steps=steps, guidance_scale=guidance,
                     generator=make_generators(0, len(prompts)), output_type="np")
                times[name].append((time.perf_counter() - t0) / len(prompts))
    base = statistics.median(times["teacher dpm++ 20 g3"])
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name}: {med:.4f} s/image (median of {len(values)}), {base / med:.1f}x the teacher's default speed")


if __name__ == "__main__":
    main()
