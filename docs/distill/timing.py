"""Seconds per image of the teacher's settings (default: DPM-Solver++ 20 steps at guidance 3, two U-Net passes a
step, and diffusers' default settings, PNDM 50 at guidance 7.5, the 1x of the printed ratios) and the student's settings (default: 4 / 2 / 1 LCM steps, one pass a step),
measured in ONE process, interleaved, so that a shared machine's load falls on every setting alike (the sweep's
s/image come from separate runs at different loads).

    python docs/distill/timing.py --student OUT --teacher ldm_app/assets/default_model [--repeats 3]
    python docs/distill/timing.py --student GUIDANCE_DISTILLED --teacher ... --student_settings dpm++:10:1,dpm++:20:1
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
    p.add_argument("--student_settings", default="lcm:4:3,lcm:2:3,lcm:1:3", help="SAMPLER:STEPS:GUIDANCE,...")
    p.add_argument("--teacher_settings", default="dpm++:20:3,pndm:50:7.5",
                   help="SAMPLER:STEPS:GUIDANCE,... (keep pndm:50:7.5: diffusers' default settings, the 1x)")
    args = p.parse_args()
    teacher = LatentDiffusionPipeline.from_pretrained(args.teacher)
    student = LatentDiffusionPipeline.from_pretrained(args.student)
    settings = {}
    for who, pipe, items in (("teacher", teacher, args.teacher_settings), ("student", student, args.student_settings)):
        for item in items.split(","):
            sampler, steps, guidance = item.split(":")
            settings[f"{who} {sampler} {steps} g{guidance}"] = (pipe, sampler, int(steps), float(guidance))
    prompts = ["a large red circle in the center on a white background"] * args.batch
    times: dict[str, list[float]] = {name: [] for name in settings}
    for pipe in (teacher, student):
        pipe.set_progress_bar_config(disable=True)
        pipe(prompts[:2], num_inference_steps=2)  # warm-up
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, (pipe, sampler, steps, guidance) in settings.items():
                t0 = time.perf_counter()
                pipe(prompts, sampler=sampler, num_inference_steps=steps, guidance_scale=guidance,
                     generator=make_generators(0, len(prompts)), output_type="np")
                times[name].append((time.perf_counter() - t0) / len(prompts))
    base = statistics.median(times["teacher pndm 50 g7.5"]) if "teacher pndm 50 g7.5" in times else None
    for name, values in times.items():
        med = statistics.median(values)
        ratio = f", {base / med:.1f}x diffusers' default settings" if base else ""
        print(f"{name}: {med:.4f} s/image (median of {len(values)}){ratio}")


if __name__ == "__main__":
    main()
