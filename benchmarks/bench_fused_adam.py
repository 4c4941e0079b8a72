"""Training step time with torch's fused AdamW (train.fused_adam, the default) vs its per-parameter loop.

The CPU recipe trains its text encoder from scratch with the U-Net, so the optimiser (and its EMA) runs over the
text encoder's 49,408 x D token-embedding table every step: on a CPU the loop AdamW over ~11M parameters is a
large fixed cost per step. Both variants run the same LDMTrainer.train_step on cached latents, same weights and
batches, in alternating rounds (so drifting machine load hits both alike); one process, one thread by default.

    python benchmarks/bench_fused_adam.py                                     # configs/ldm/shapes64_cpu.yaml
    python benchmarks/bench_fused_adam.py --batch_size 32 --json out.json

Prints images/s for both and the ratio.
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

from ldm_app.config import load_config  # noqa: E402
from ldm_app.training.ldm import LDMRunConfig, LDMTrainer, build_models, build_train_dataset  # noqa: E402


def make_trainer(args: argparse.Namespace, tmp: Path, fused: bool, name: str | None = None) -> LDMTrainer:
    """A trainer of args.config on cached latents of a small shapes set in `tmp` (built once), seeded weights;
    `name` (default: the fused flag) names its output folder. bench_cpu_step.py builds its variants with it."""
    from bench_train import make_inputs

    from ldm_app.training.common import make_accelerator

    if not (tmp / "data").exists():
        make_inputs(tmp, args)
    overrides = {"data": {"train_data_dir": str(tmp / "data"), "resolution": args.resolution,
                          "holdout_fraction": 0.0},
                 "unet": {"sample_size": args.resolution // 8},
                 "train": {"train_batch_size": args.batch_size, "max_train_steps": 10**6, "fused_adam": fused},
                 "ldm": {"pretrained_vae": str(tmp / "vae"), "validation_prompts": []}}
    cfg = load_config(LDMRunConfig, args.config, overrides)  # text encoder built from the config: trained
    torch.manual_seed(0)
    out = tmp / f"out-{fused if name is None else name}"
    trainer = LDMTrainer(cfg, build_models(cfg), build_train_dataset(cfg), make_accelerator(cfg.train, out, cpu=True),
                         out)
    trainer.use_cache(tmp / "cache")
    return trainer


def time_steps(trainer: LDMTrainer, stream, steps: int) -> float:
    """images/s of `steps` optimisation steps, EMA update included (as in LDMTrainer.run)."""
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(stream)[1])
        trainer._after_optimizer_step()
    return steps * trainer.cfg.train.train_batch_size / (time.perf_counter() - start)


def step_parser(doc: str, batch_size: int, batch_help: str | None = None) -> argparse.ArgumentParser:
    """The options of a side-by-side CPU training-step benchmark (this one's and bench_cpu_step.py's)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--config", default="configs/ldm/shapes64_cpu.yaml")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=batch_size, help=batch_help)
    p.add_argument("--num_images", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="steps per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the figures to this JSON file")
    return p


def parse_step_args(p: argparse.ArgumentParser) -> argparse.Namespace:
    args = p.parse_args()
    args.vae_levels, args.text_dim, args.workers = 4, 128, 0  # for bench_train.make_inputs
    torch.set_num_threads(args.threads)
    return args


def main() -> None:
    from bench_train import report

    args = parse_step_args(step_parser(__doc__, 64))

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        trainers = {fused: make_trainer(args, tmp, fused) for fused in (True, False)}
        streams = {fused: t.data_stream() for fused, t in trainers.items()}
        speeds: dict[bool, list[float]] = {True: [], False: []}
        for fused in (True, False):  # warm-up
            time_steps(trainers[fused], streams[fused], 2)
        for _ in range(args.rounds):
            for fused in (True, False):
                speeds[fused].append(time_steps(trainers[fused], streams[fused], args.steps))

    fused, loop = statistics.median(speeds[True]), statistics.median(speeds[False])
    n_params = sum(p.numel() for t in trainers[True].trainables for p in t.parameters())
    figures = {"device": f"cpu ({args.threads} threads)", "config": args.config, "batch_size": args.batch_size,
               "trained_params_M": round(n_params / 1e6, 2), "fused_images_per_s": round(fused, 2),
               "loop_images_per_s": round(loop, 2), "speedup": round(fused / loop, 2),
               "rounds": args.rounds, "steps_per_round": args.steps}
    report(figures, args.json)


if __name__ == "__main__":
    main()
