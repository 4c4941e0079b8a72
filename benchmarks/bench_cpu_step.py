"""CPU training step: the recipe's plain fp32 step vs three ways to make it faster that a CPU user might reach for:
`torch.compile` of the U-Net (inductor), channels-last weights, bf16 autocast (`--mixed_precision bf16`).

Whether any of them shortens `recipes/shapes.sh` (issue #19 asks for the recipe in <= 2 h on 2 cores, and its LDM
stages are the models' own compute: docs/training.md, "Where a CPU step goes"). Every variant runs the same
LDMTrainer.train_step on cached latents (EMA update included), same initial weights and batches, in alternating
rounds so that drifting machine load hits all alike; one process, one thread by default (the recipe runs two
processes of one thread each). torch.compile's first steps (compilation) are timed apart and not counted.

    python benchmarks/bench_cpu_step.py                                       # configs/ldm/shapes64_cpu.yaml
    python benchmarks/bench_cpu_step.py --variants fp32 bf16 --json out.json

Prints images/s per variant and its ratio to fp32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_app.training.ldm import LDMTrainer  # noqa: E402

VARIANTS = ("fp32", "compile", "channels_last", "bf16")


def make_trainer(args: argparse.Namespace, tmp: Path, variant: str) -> LDMTrainer:
    from bench_fused_adam import make_trainer as fused_adam_trainer

    trainer = fused_adam_trainer(args, tmp, True, variant)  # the recipe's step: fused AdamW (its default), fp32
    if variant == "channels_last":
        trainer.unet.to(memory_format=torch.channels_last)
    elif variant == "compile":
        trainer.unet = torch.compile(trainer.unet)
    elif variant == "bf16":
        # what `--mixed_precision bf16` makes accelerate do to a prepared model (its forward under autocast, outputs
        # back to fp32); done by hand because one process holds one AcceleratorState, whose precision is fixed
        from accelerate.utils import convert_outputs_to_fp32

        trainer.unet.forward = convert_outputs_to_fp32(
            torch.autocast("cpu", dtype=torch.bfloat16)(trainer.unet.forward))
    return trainer


def main() -> None:
    from bench_fused_adam import parse_step_args, step_parser, time_steps
    from bench_train import report

    p = step_parser(__doc__, 32, "per process, as in the recipe")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = parse_step_args(p)
    variants = ["fp32"] + [v for v in args.variants if v != "fp32"]

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        trainers = {v: make_trainer(args, tmp, v) for v in variants}
        streams = {v: t.data_stream() for v, t in trainers.items()}
        warmup: dict[str, float] = {}
        for v, t in trainers.items():  # compilation (and the first allocations) outside the timed rounds
            start = time.perf_counter()
            time_steps(t, streams[v], 2)
            warmup[v] = time.perf_counter() - start
        speeds: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for v in variants:
                speeds[v].append(time_steps(trainers[v], streams[v], args.steps))
    figures: dict[str, float] = {"batch_size": args.batch_size, "threads": args.threads}
    for v in variants:
        figures[f"{v}_images_per_s"] = round(statistics.median(speeds[v]), 2)
        figures[f"{v}_warmup_s"] = round(warmup[v], 1)
        if v != "fp32":
            figures[f"{v}_vs_fp32"] = round(statistics.median(speeds[v]) / statistics.median(speeds["fp32"]), 3)
    report(figures, args.json)


if __name__ == "__main__":
    main()
