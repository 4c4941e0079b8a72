"""Sampling-settings sweep: prompt adherence and seconds/image of one model under several settings, and the choice
of the model's recommended sampling defaults by measurement rather than habit.

    python -m ldm_app.evaluate sweep --model M [--sampler dpm++ --steps 20 --guidance_scales 1 3 5 7.5]
        [--setting ddim:50:7.5 ...] [--num_prompts 100 --two_object_prompts 50] [--out DIR] [--write_defaults]
        [--prompt_style canonical|free]

The candidates are `--sampler` x `--steps` x each of `--guidance_scales`; `--setting SAMPLER:STEPS:GUIDANCE`
adds settings that are measured for the table but never chosen (e.g. diffusers' defaults, or DDPM's 1000 steps);
`--candidate SAMPLER:STEPS:GUIDANCE` adds one that may be chosen (e.g. a timestep grid, dpm++:999/700/400/100:1).
Every setting sees the same prompts and seeds. Each judge gives a setting the mean of the accuracies the model is
judged by: one-object colour, shape, size and position, and two-object relation; the setting's score is the
lower of the two judges' (the CNN judge's and the geometric measure's, ldm_app.evaluation.geometry), so a
setting is as good as its harsher judge says. The CNN judge alone is lenient with blurred or distorted shapes:
on the bundled model it preferred guidance 3, where the geometric measure finds lobed circles and pinched
squares that guidance 1.5 does not make. With --write_defaults the best-scoring candidate (ties: the first listed; with `--tolerance T`, the one with the
fewest U-Net passes among those within T of the best) is written to the model's ldm_app.json, its timestep grid
included, which `pipe(prompt)` and generate.py then use when the caller gives no setting. `--prompt_style free` measures every setting on free-form
prompts instead (see adherence.py; each accuracy over the prompts that state its attribute).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ldm_app.errors import UserError
from ldm_app.evaluation.judge import DEFAULT_THRESHOLD
from ldm_app.evaluation.adherence import (
    REPORT_FILE,
    add_judge_arguments,
    add_prompt_style_argument,
    check_counts,
    check_prompt_style,
    judge_from_args,
    report_folder,
    run_adherence,
    write_outputs,
)
from ldm_app.fileio import atomic_write_text, check_report_folder
from ldm_app.limits import check_timestep_grid

SWEEP_FILE = "sweep.json"
SCORED_ATTRIBUTES = ("colour", "shape", "size", "position")  # one-object attributes with targets; plus relation


@dataclass(frozen=True)
class Setting:
    sampler: str
    steps: int
    guidance_scale: float
    timesteps: tuple[int, ...] | None = None  # a timestep grid (diffusers' timesteps=), one per step

    def __post_init__(self) -> None:
        if self.steps < 1 or self.guidance_scale < 0:
            raise UserError(f"steps must be >= 1 and guidance >= 0, got {self.steps} steps and guidance "
                            f"{self.guidance_scale:g}")
        if self.timesteps is not None:
            check_timestep_grid(list(self.timesteps), self.steps, "the timestep grid")

    @property
    def name(self) -> str:
        grid = "" if self.timesteps is None else "-t" + ".".join(map(str, self.timesteps))
        return f"{self.sampler}-{self.steps}-g{self.guidance_scale:g}{grid}"


def parse_setting(text: str) -> Setting:
    """"SAMPLER:STEPS:GUIDANCE", e.g. "ddim:50:7.5"; STEPS may be a timestep grid, "dpm++:999/600/300/80:1"."""
    from ldm_app.samplers import check_sampler_name

    parts = text.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        grid = tuple(int(t) for t in parts[1].split("/")) if "/" in parts[1] else None
        steps, guidance = (len(grid) if grid else int(parts[1])), float(parts[2])
    except ValueError:
        raise UserError(f"--setting {text!r}: expected SAMPLER:STEPS:GUIDANCE, e.g. ddim:50:7.5 (STEPS may be a "
                        "timestep grid, e.g. dpm++:999/600/300/80:1)") from None
    try:
        return Setting(check_sampler_name(parts[0]), steps, guidance, grid)
    except UserError as e:
        raise UserError(f"--setting {text!r}: {e}") from None


def judge_score(report: dict[str, Any], geometric: bool = False) -> float | None:
    """Mean of the targeted accuracies present in an adherence report, by the CNN judge or (`geometric`) by the
    geometric measure; None when the report has no figures of that judge."""
    suffix = "_geometry" if geometric else ""
    accuracy = report["one_object"].get("accuracy" + suffix)
    if accuracy is None:
        return None
    parts = [accuracy[a] for a in SCORED_ATTRIBUTES if accuracy.get(a) is not None]
    relation = report["two_object"].get("relation_accuracy" + suffix)
    if relation is not None:
        parts.append(relation)
    return float(np.mean(parts)) if parts else None


def adherence_score(report: dict[str, Any]) -> float:
    """The lower of the two judges' scores (the CNN judge's alone when the report has no geometric figures)."""
    scores = [s for s in (judge_score(report), judge_score(report, geometric=True)) if s is not None]
    return min(scores)


def sweep_row(setting: Setting, report: dict[str, Any], candidate: bool) -> dict[str, Any]:
    accuracy = report["one_object"]["accuracy"]
    geometry = report["one_object"].get("accuracy_geometry") or {}
    return {
        "setting": setting.name,
        "sampler": setting.sampler,
        "steps": setting.steps,
        "guidance_scale": setting.guidance_scale,
        "timesteps": report.get("settings", {}).get("timesteps"),
        "candidate": candidate,
        **{a: accuracy.get(a) for a in (*SCORED_ATTRIBUTES, "background", "all_attributes")},
        "relation": report["two_object"]["relation_accuracy"],
        **{f"{a}_geometry": geometry.get(a) for a in (*SCORED_ATTRIBUTES, "all_attributes")},
        "relation_geometry": report["two_object"].get("relation_accuracy_geometry"),
        "score_judge": judge_score(report),
        "score_geometry": judge_score(report, geometric=True),
        "score": adherence_score(report),
        "kid": report["kid"]["generated_vs_real"]["mean"],
        "seconds_per_image": report["seconds_per_image"],
    }


def unet_passes(row: dict[str, Any]) -> int:
    """U-Net evaluations per image: one a step, two under classifier-free guidance (scale > 1)."""
    return row["steps"] * (2 if row["guidance_scale"] > 1 else 1)


def choose(rows: list[dict[str, Any]], tolerance: float = 0.0) -> dict[str, Any]:
    """The best-scoring candidate row; ties go to the first listed. With `tolerance` > 0, the candidate with the
    fewest U-Net passes among those scoring within `tolerance` of the best (ties: the higher score, then the first
    listed): a 4-step grid that scores 0.002 below 8 steps is the better default at half the cost."""
    candidates = [r for r in rows if r["candidate"]]
    if not candidates:
        raise UserError("no candidate settings to choose defaults from")
    best = max(candidates, key=lambda r: r["score"])  # max keeps the first of equal scores
    if tolerance <= 0:
        return best
    close = [r for r in candidates if r["score"] >= best["score"] - tolerance]
    return min(close, key=lambda r: (unet_passes(r), -r["score"]))  # min keeps the first of equal keys


def markdown_table(rows: list[dict[str, Any]], chosen: dict[str, Any] | None = None) -> str:
    """One row per setting; each accuracy as "CNN judge / geometric measure", the score the lower of the two."""

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.0%}"

    def both(r: dict[str, Any], name: str) -> str:
        return f"{pct(r[name])} / {pct(r.get(name + '_geometry'))}"

    lines = [
        "| sampler | steps | guidance | colour (CNN / geometric) | shape | size | position | relation "
        "| score (lower judge) | KID | s/image |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = " **(default)**" if chosen is not None and r["setting"] == chosen["setting"] else ""
        cells = " | ".join(both(r, a) for a in (*SCORED_ATTRIBUTES, "relation"))
        steps = r["steps"] if not r.get("timesteps") else f"{r['steps']} ({'/'.join(map(str, r['timesteps']))})"
        lines.append(f"| {r['sampler']}{mark} | {steps} | {r['guidance_scale']:g} | {cells} | {r['score']:.3f} "
                     f"| {r['kid']:.3f} | {r['seconds_per_image']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def run_sweep(
    pipe,
    candidates: list[Setting],
    extra: list[Setting],
    num_prompts: int,
    two_object_prompts: int,
    seed: int,
    batch_size: int,
    judge,
    out: Path,
    judge_threshold: float = DEFAULT_THRESHOLD,
    log: Callable[[str], None] = print,
    prompt_style: str = "canonical",
) -> list[dict[str, Any]]:
    """One adherence evaluation per setting (reports and grids in out/<setting>/); the table rows."""
    rows = []
    for setting, candidate in [(s, True) for s in candidates] + [(s, False) for s in extra]:
        log(f"== {setting.name}")
        result = run_adherence(pipe, num_prompts, two_object_prompts, seed, setting.sampler, setting.steps,
                               setting.guidance_scale, batch_size, judge, judge_threshold=judge_threshold,
                               log=lambda _: None, prompt_style=prompt_style,
                               timesteps=list(setting.timesteps) if setting.timesteps else None)
        write_outputs(result, out / setting.name)
        rows.append(sweep_row(setting, result.report, candidate))
        log(f"   score {rows[-1]['score']:.3f}, {rows[-1]['seconds_per_image']:.3f} s/image")
    return rows


# ---- command line --------------------------------------------------------------------------------------------------


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    from ldm_app.samplers import SAMPLERS

    parser.add_argument("--model", required=True, help="model folder (LatentDiffusionPipeline.save_pretrained)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="dpm++", help="sampler of the candidates")
    parser.add_argument("--steps", type=int, default=20, help="steps of the candidates")
    parser.add_argument("--guidance_scales", type=float, nargs="*", default=[1.0, 3.0, 5.0, 7.5],
                        help="one candidate per scale")
    parser.add_argument("--setting", action="append", default=[], metavar="SAMPLER:STEPS:GUIDANCE",
                        help="also measure this setting (never chosen as the default); repeatable")
    parser.add_argument("--candidate", action="append", default=[], metavar="SAMPLER:STEPS:GUIDANCE",
                        help="one more candidate (may be chosen as the default), e.g. a timestep grid "
                             "dpm++:999/700/400/100:1; repeatable")
    parser.add_argument("--tolerance", type=float, default=0.0,
                        help="choose the candidate with the fewest U-Net passes among those scoring within this "
                             "much of the best (default 0: the best)")
    parser.add_argument("--num_prompts", type=int, default=100, help="one-object prompts")
    parser.add_argument("--two_object_prompts", type=int, default=50, help="two-object (relation) prompts")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and of the images")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--out", default=None, help=f"folder for {SWEEP_FILE} and per-setting reports "
                                                    "(default: MODEL/sweep; for the bundled model, "
                                                    "runs/sweep/default_model)")
    parser.add_argument("--write_defaults", action="store_true",
                        help="store the best candidate as the model's sampling defaults (its ldm_app.json)")
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda[:n]|mps")
    parser.add_argument("--dtype", default="auto", help="auto|fp32|fp16|bf16")
    add_prompt_style_argument(parser)
    add_judge_arguments(parser)


def run_sweep_cli(args: argparse.Namespace) -> list[dict[str, Any]]:
    from ldm_app.pipeline import (
        LatentDiffusionPipeline,
        check_model_folder,
        read_sampling_defaults,
        resolve_device_dtype,
        write_sampling_defaults,
    )

    check_counts(args.num_prompts, args.two_object_prompts, args.batch_size)
    check_prompt_style(args.prompt_style)
    candidates = [Setting(args.sampler, args.steps, g) for g in args.guidance_scales]
    candidates += [parse_setting(s) for s in args.candidate]
    extra = [parse_setting(s) for s in args.setting]
    if not 0 <= args.tolerance < 1:  # NaN fails too
        raise UserError(f"--tolerance must be in [0, 1) (a score difference), got {args.tolerance}")
    if not candidates and not extra:
        raise UserError("nothing to measure: give --guidance_scales or --setting")
    if args.write_defaults and not candidates:
        raise UserError("--write_defaults needs candidates (--guidance_scales or --candidate)")
    model = Path(args.model)
    check_model_folder(model)  # before the judge, which may take minutes to train on a new machine
    out = Path(args.out) if args.out else report_folder(model, "sweep")
    check_report_folder("--out", out)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    judge = judge_from_args(args)
    judge.net.to(device)
    pipe = LatentDiffusionPipeline.from_pretrained(model, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    rows = run_sweep(pipe, candidates, extra, args.num_prompts, args.two_object_prompts, args.seed,
                     args.batch_size, judge, out, args.judge_threshold, prompt_style=args.prompt_style)
    chosen = choose(rows, args.tolerance) if candidates else None
    height, width, _, _ = pipe.resolve_defaults(None, None, None, None)
    result: dict[str, Any] = {
        "model": str(model.resolve()),
        "prompts": {"num_prompts": args.num_prompts, "two_object_prompts": args.two_object_prompts,
                    "seed": args.seed, "prompt_style": args.prompt_style},
        "rows": rows,
        "chosen": chosen["setting"] if chosen else None,
        "tolerance": args.tolerance,
        "defaults_written": bool(args.write_defaults),
    }
    if args.write_defaults:  # what they replace, so that a sweep on a few prompts can be undone
        result["previous_defaults"] = read_sampling_defaults(model)
    # an earlier sweep's per-setting reports in the same --out are left as they are (they are the user's results),
    # but named: beside this sweep.json, whose rows are this sweep's only, they could pass for its own
    measured = {r["setting"] for r in rows}
    others = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name not in measured
                    and (p / REPORT_FILE).is_file())
    if others:
        result["other_reports"] = others
    atomic_write_text(out / SWEEP_FILE, json.dumps(result, indent=2) + "\n")
    print(markdown_table(rows, chosen))
    if others:
        print(f"note: {out} also holds the reports of {len(others)} setting(s) this sweep did not measure (an "
              f"earlier sweep's; {SWEEP_FILE} lists them as other_reports): {', '.join(others)}")
    if chosen is not None:
        rule = f", the fewest U-Net passes within {args.tolerance:g} of the best" if args.tolerance > 0 else ""
        print(f"chosen: {chosen['setting']} (score {chosen['score']:.3f}{rule})")
    if args.write_defaults:
        # the grid the chosen setting sampled on: its own, or the one the model stored for it (kept, not dropped)
        grid = {"timesteps": chosen["timesteps"]} if chosen.get("timesteps") else {}
        write_sampling_defaults(model, {"sampler": chosen["sampler"], "num_inference_steps": chosen["steps"],
                                        "guidance_scale": chosen["guidance_scale"], "height": height,
                                        "width": width, **grid})
        print(f"wrote the model's sampling defaults to {model}/ldm_app.json (the previous ones are in "
              f"{out / SWEEP_FILE}, previous_defaults)")
    print(f"wrote {out / SWEEP_FILE}")
    return rows
