"""Prompt adherence of a text-to-image model on the synthetic shapes domain, read back by the attribute judge.

    python -m ldm_app.evaluate ldm --model M [--num_prompts 100] [--two_object_prompts 50] [--seed 0]
        [--sampler ddim] [--steps 50] [--guidance_scale 7.5] [--batch_size 16] [--out DIR]
        [--prompt_style canonical|free]

Prompts are captions of scenes drawn from the shapes vocabulary (scene i from its own seed, image i from its own
generator), so a figure does not depend on the batch size or on how many prompts are asked for. With
`--prompt_style free` the scenes and image seeds are the same, but each prompt is a free-form caption of its scene
(`shapes.free_caption`, its wording from a seed stream of its own): some attributes left out, phrases in any
order, synonyms. Every prompt is scored on what its text states (`shapes.parse_caption`), so a left-out attribute
("a red circle": size, position and background are "any") is counted for neither judge, and the report gives per
attribute how many prompts stated it (`num_stated`). Reported:
- one-object prompts: accuracy per attribute (colour, shape, size, position, background), the judged object count
  and all five attributes at once;
- two-object prompts: relation accuracy (both objects judged present with the right colour and shape, in the
  right relation), plus the parts;
- every accuracy also by a second, geometric judge (`geometry.py`: segmentation, fill ratio, convexity, template
  IoU, palette distance; no learning), beside the CNN judge's (`accuracy_geometry`, `judged_geometry`);
- a domain KID (Binkowski et al. 2018) on the judge's penultimate features between the generated images and
  fresh renders of independent scenes, with its floor: the same KID for renders of the prompts' own scenes.
"""

from __future__ import annotations

import argparse
import json
import math
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm_app.data.shapes import (
    FREE_CAPTION_STREAM,
    POSITIONS,
    Scene,
    caption,
    free_caption,
    parse_caption,
    render_scene,
    sample_scene,
)
from ldm_app.errors import UserError, raise_if_stopped
from ldm_app.evaluation.geometry import GeometryJudge
from ldm_app.evaluation.judge import (
    AXES,
    DEFAULT_THRESHOLD,
    HEADS,
    ONE_OBJECT_HEADS,
    TWO_OBJECT_HEADS,
    Judge,
    JudgeConfig,
    load_or_train_judge,
    scene_labels,
)
from ldm_app.fileio import atomic_path, atomic_write_text

REPORT_FILE = "adherence.json"
GRID_FILE = "adherence_grid.png"
ONE, TWO = 0, 1  # prompt kinds; also the seed streams of their scenes
_REFERENCE_STREAM = 2  # seed stream of the independent real renders KID compares against
ONE_OBJECT_ATTRIBUTES = (*ONE_OBJECT_HEADS, "background")
PROMPT_STYLES = ("canonical", "free")  # the caption form of the prompts: see the module docstring
_FIRST_WRITTEN_IS_FIRST = ("above", "to the left of")  # "A above B": A is the top (the judge's first) object


@dataclass(frozen=True)
class Prompt:
    text: str
    scene: Scene  # the scene the text describes: the judge's target
    seed: int  # the image's generator seed

    @property
    def kind(self) -> int:
        return ONE if self.scene.relation is None else TWO


def _seed(*entropy: int) -> int:
    """A 32-bit seed from several integers (numpy's SeedSequence mixes them: no collisions between streams)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


def _scene(seed: int, kind: int, i: int, resolution: int, stream: int | None = None) -> Scene:
    rng = np.random.default_rng([seed, kind if stream is None else stream, i])
    return sample_scene(rng, resolution, two_object_fraction=float(kind == TWO))


def _text(scene: Scene, style: str, seed: int, kind: int, i: int) -> str:
    if style == "canonical":
        return caption(scene)
    # free: the wording from a stream of its own, so the scene and image seed are the canonical prompt's
    return free_caption(scene, np.random.default_rng([seed, FREE_CAPTION_STREAM, kind, i]))[0]


def sample_prompts(
    num_one: int, num_two: int, seed: int, resolution: int = 64, style: str = "canonical"
) -> list[Prompt]:
    """`num_one` one-object then `num_two` two-object prompts; prompt i of a kind depends only on (seed, kind, i).
    `style` "free" gives the same scenes and image seeds with free-form captions."""
    check_prompt_style(style)
    return [
        Prompt(_text(scene, style, seed, kind, i), scene, _seed(seed, kind, i))
        for kind, n in ((ONE, num_one), (TWO, num_two))
        for i in range(n)
        for scene in (_scene(seed, kind, i, resolution),)
    ]


def prompt_labels(text: str) -> dict[str, int]:
    """The judge's class index per head that a prompt's text states, -1 where it states nothing (a left-out
    attribute) or the head does not apply: `judge.scene_labels` of its scene, restricted to what the text says."""
    stated = parse_caption(text)
    labels = {name: -1 for name in HEADS}
    if "background" in stated:
        labels["background"] = HEADS["background"].index(stated["background"])
    if "relation" not in stated:
        labels["count"] = 0
        for head in ONE_OBJECT_HEADS:
            if head in stated:
                labels[head] = HEADS[head].index(stated[head])
        return labels
    relation, objects = stated["relation"], stated["objects"]
    first, second = objects if relation in _FIRST_WRITTEN_IS_FIRST else objects[::-1]
    labels["count"] = 1
    labels["axis"] = AXES.index("vertical" if relation in ("above", "below") else "horizontal")
    for prefix, obj in (("first", first), ("second", second)):
        for attribute in ("colour", "shape"):
            if attribute in obj:
                labels[f"{prefix}_{attribute}"] = HEADS[f"{prefix}_{attribute}"].index(obj[attribute])
    return labels


def _stated_labels(prompt: Prompt) -> dict[str, int]:
    """prompt_labels of its text, checked against its scene: a text that misdescribes its scene is a bug here."""
    stated, truth = prompt_labels(prompt.text), scene_labels(prompt.scene)
    wrong = [head for head, value in stated.items() if value >= 0 and value != truth[head]]
    if wrong:
        raise ValueError(f"prompt {prompt.text!r} contradicts its scene on {', '.join(wrong)}")
    return stated


def generate(
    pipe, prompts: list[Prompt], steps: int, guidance_scale: float, batch_size: int, log: Callable[[str], None] = print,
    output_type: str = "pt", timesteps: list[int] | None = None,
) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] on CPU, image k from a CPU generator seeded prompts[k].seed; with
    output_type="latent" the scaled latents the pipeline would decode (ldm_app.first_stage.decode). `timesteps`:
    a timestep grid instead of the sampler's spacing (none: the model's stored grid where it applies)."""
    grid = {} if timesteps is None else {"timesteps": list(timesteps)}
    images = []
    for start in range(0, len(prompts), batch_size):
        raise_if_stopped()  # a SIGTERM/Ctrl-C that C code swallowed during the last batch (ldm_app.errors)
        batch = prompts[start : start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(p.seed) for p in batch]
        out = pipe(
            [p.text for p in batch],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type=output_type,
            **grid,
        ).images  # (b, 3, H, W) in [0, 1], or latents
        images.append(out.float().cpu())
        log(f"generated {start + len(batch)}/{len(prompts)} images")
    return torch.cat(images)


def render(scenes: list[Scene], resolution: int) -> torch.Tensor:
    """Rendered scenes as (N, 3, R, R) floats in [0, 1], like the pipeline's "pt" output."""
    pixels = np.stack([np.asarray(render_scene(s, resolution)) for s in scenes])  # (N, R, R, 3) uint8
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0


# ---- scoring -----------------------------------------------------------------------------------------------------


def _describe(pred: dict[str, int], kind: int) -> str:
    """What the judge saw, as a caption-like text (two-object scenes in canonical top/left-first order)."""
    name = {head: HEADS[head][pred[head]] if pred[head] >= 0 else "?" for head in HEADS}  # -1: no verdict
    bg = f"on a {name['background']} background"
    if kind == ONE:
        where = POSITIONS.get(name["position"], "at ? (no verdict)")  # the geometric judge may find no place
        return f"a {name['size']} {name['colour']} {name['shape']} {where} {bg}"
    relation = "above" if name["axis"] == "vertical" else "to the left of"
    first, second = f"{name['first_colour']} {name['first_shape']}", f"{name['second_colour']} {name['second_shape']}"
    return f"[{name['count']} objects] a {first} {relation} a {second} {bg}"


def score(judge: Judge, prompts: list[Prompt], images: torch.Tensor) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per-attribute accuracies of `images` against their prompts, and one record per prompt."""
    pred = judge.predict(images)  # head -> (N,)
    records, hits = [], {ONE: {}, TWO: {}}
    for k, prompt in enumerate(prompts):
        target = _stated_labels(prompt)  # only what the prompt states is scored
        p = {head: int(pred[head][k]) for head in HEADS}
        ok = {head: p[head] == target[head] for head in HEADS if target[head] >= 0}
        if prompt.kind == ONE:
            ok["all_attributes"] = all(ok[a] for a in ONE_OBJECT_ATTRIBUTES if a in ok)  # all it states
            correct = ok["all_attributes"]
        else:
            # both present, on the right axis, with the colours and shapes it states
            ok["relation"] = ok["count"] and all(ok[h] for h in TWO_OBJECT_HEADS if h in ok)
            correct = ok["relation"]
        for name, value in ok.items():
            hits[prompt.kind].setdefault(name, []).append(value)
        records.append(
            {"prompt": prompt.text, "seed": prompt.seed, "judged": _describe(p, prompt.kind), "correct": correct}
        )
    summary = {  # num_stated: per attribute, the prompts that state it (= num_prompts for canonical prompts)
        part: {"num_prompts": len(hits[kind].get("count", [])), "accuracy": _means(hits[kind]),
               "num_stated": {name: len(v) for name, v in hits[kind].items()}}
        for part, kind in (("one_object", ONE), ("two_object", TWO))
    }
    summary["two_object"]["relation_accuracy"] = summary["two_object"]["accuracy"].get("relation")
    return summary, records


def _means(hits: dict[str, list[bool]]) -> dict[str, float]:
    return {name: float(np.mean(v)) for name, v in hits.items()}


# ---- KID -----------------------------------------------------------------------------------------------------------


def _polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """k(a, b) = (a.b / d + 1)^3, the kernel of KID (Binkowski et al. 2018): (n, d), (n', d) -> (n, n')."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def kid(x, y, num_subsets: int = 100, subset_size: int | None = None, seed: int = 0) -> dict[str, float]:
    """Kernel Inception Distance between feature sets x (n, d) and y (n', d) (arrays or CPU tensors): the mean and
    std over `num_subsets` random subset pairs of `subset_size` (default: half the smaller set, at most 1000) of the
    unbiased MMD^2 estimate (Binkowski et al. 2018, eq. 3; Gretton et al. 2012).

    Written here because the library implementations (torchmetrics, torch-fidelity) are tied to Inception features.
    The three kernel matrices are computed once and subsets index into them.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = min(len(x), len(y))
    m = subset_size or min(1000, max(2, n // 2))
    if not 2 <= m <= n:
        raise UserError(f"KID subset size must be between 2 and {n} (the smaller feature set), got {m}")
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        i, j = rng.choice(len(x), m, replace=False), rng.choice(len(y), m, replace=False)
        s_xx, s_yy = k_xx[np.ix_(i, i)], k_yy[np.ix_(j, j)]  # (m, m) each
        within = (s_xx.sum() - np.trace(s_xx) + s_yy.sum() - np.trace(s_yy)) / (m * (m - 1))  # off-diagonal means
        values.append(within - 2.0 * k_xy[np.ix_(i, j)].mean())
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "subset_size": m, "num_subsets": num_subsets}


def domain_kid(
    judge: Judge, prompts: list[Prompt], images: torch.Tensor, seed: int, num_subsets: int = 100
) -> dict[str, Any]:
    """KID(generated, reference renders) and its floor KID(renders of the prompts' own scenes, reference renders).

    The reference set has the same one/two-object mix and size as the prompts, from an independent seed stream;
    every set is rendered at the generated size and resized by the judge alike."""
    resolution = images.shape[-1]
    reference = [_scene(seed, p.kind, i, resolution, stream=_REFERENCE_STREAM + p.kind) for i, p in enumerate(prompts)]
    ref_features = judge.features(render(reference, resolution))
    floor_features = judge.features(render([p.scene for p in prompts], resolution))
    return {
        "generated_vs_real": kid(judge.features(images), ref_features, num_subsets, seed=seed),
        "real_vs_real": kid(floor_features, ref_features, num_subsets, seed=seed),
        "features": f"attribute judge penultimate layer ({judge.config.feature_dim}-d)",
    }


# ---- the evaluation ------------------------------------------------------------------------------------------------


@dataclass
class AdherenceResult:
    report: dict[str, Any]
    prompts: list[Prompt]
    images: torch.Tensor  # (N, 3, H, W) in [0, 1]


def run_adherence(
    pipe,
    num_prompts: int,
    two_object_prompts: int,
    seed: int,
    sampler: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 16,
    judge: Judge | None = None,
    kid_subsets: int = 100,
    judge_threshold: float = DEFAULT_THRESHOLD,
    log: Callable[[str], None] = print,
    prompt_style: str = "canonical",
    timesteps: list[int] | None = None,
) -> AdherenceResult:
    """Generate for sampled prompts and score them. `sampler`/`steps`/`guidance_scale` default to the model's
    stored sampling defaults; a given sampler is used for this call only (the pipeline's own is restored). The
    judge (default: the cached 64px one) must pass `judge_threshold` on its held-out renders before generating.
    `prompt_style`: one of PROMPT_STYLES (see the module docstring)."""
    check_counts(num_prompts, two_object_prompts, batch_size)
    check_prompt_style(prompt_style)
    height, width, steps, guidance_scale = pipe.resolve_defaults(None, None, steps, guidance_scale)
    if height != width:
        raise UserError(f"adherence evaluation needs square images; the model generates {height}x{width}")
    if judge is None:
        judge = load_or_train_judge(threshold=judge_threshold, log=log)
    judge.check(judge_threshold)
    prompts = sample_prompts(num_prompts, two_object_prompts, seed, height, prompt_style)
    original_scheduler = pipe.scheduler
    try:
        if sampler is not None:
            pipe.set_sampler(sampler)
        used_sampler = _sampler_name(pipe)
        # the grid the call samples on: the given one, else the model's stored one where it applies, else the
        # sampler's own spacing (None)
        stored = getattr(pipe, "stored_timesteps", None)  # ours; a plain diffusers pipeline stores none
        used_grid = list(timesteps) if timesteps is not None else stored and stored(pipe.scheduler, None, steps)
        start = time.perf_counter()
        images = generate(pipe, prompts, steps, guidance_scale, batch_size, log, timesteps=timesteps)
        seconds = time.perf_counter() - start
    finally:
        pipe.scheduler = original_scheduler
    summary, records = score(judge, prompts, images)
    geo_summary, geo_records = score(GeometryJudge(), prompts, images)
    for part in ("one_object", "two_object"):
        summary[part]["accuracy_geometry"] = geo_summary[part]["accuracy"]
    summary["two_object"]["relation_accuracy_geometry"] = geo_summary["two_object"]["relation_accuracy"]
    for record, geo in zip(records, geo_records):
        record.update(judged_geometry=geo["judged"], correct_geometry=geo["correct"])
    settings = {
        "num_prompts": num_prompts,
        "two_object_prompts": two_object_prompts,
        "seed": seed,
        "prompt_style": prompt_style,
        "sampler": used_sampler,
        "steps": steps,
        "timesteps": used_grid,
        "guidance_scale": guidance_scale,
        "batch_size": batch_size,
        "height": height,
        "width": width,
        "device": str(pipe.device),
        "dtype": str(pipe.unet.dtype).removeprefix("torch."),
    }
    report = {
        "settings": settings,
        **summary,
        "kid": domain_kid(judge, prompts, images, seed, kid_subsets),
        "generation_seconds": seconds,
        "seconds_per_image": seconds / len(prompts),
        "judge": {
            "folder": str(judge.folder) if judge.folder else None,
            "config": asdict(judge.config),
            "heldout_accuracy": judge.heldout_accuracy,
        },
        "per_prompt": records,
    }
    return AdherenceResult(report, prompts, images)


def check_counts(num_prompts: int, two_object_prompts: int, batch_size: int) -> None:
    for name, value in (("num_prompts", num_prompts), ("two_object_prompts", two_object_prompts)):
        if value < 0:
            raise UserError(f"--{name} must be >= 0, got {value}")
    if num_prompts + two_object_prompts < 4:
        raise UserError("need at least 4 prompts in all (--num_prompts + --two_object_prompts) for KID subsets")
    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}")


def check_prompt_style(style: str) -> None:
    if style not in PROMPT_STYLES:
        raise UserError(f"--prompt_style must be one of {', '.join(PROMPT_STYLES)}, got {style!r}")


def _sampler_name(pipe) -> str:
    from ldm_app.samplers import sampler_name

    return sampler_name(pipe.scheduler) or type(pipe.scheduler).__name__


# ---- outputs -------------------------------------------------------------------------------------------------------


def save_grid(result: AdherenceResult, path: str | Path, max_images: int = 64, columns: int = 8) -> None:
    """A PNG grid of generated images (up to `max_images`, two-object ones included) with their prompts beneath,
    green when the judge found the prompt satisfied, red when not."""
    from PIL import Image, ImageDraw, ImageFont

    records = result.report["per_prompt"]
    n_two = sum(p.kind == TWO for p in result.prompts)
    n_one = len(result.prompts) - n_two
    take_two = min(n_two, max_images // 3 if n_one else max_images)
    order = list(range(min(n_one, max_images - take_two))) + list(range(n_one, n_one + take_two))
    cell, pad = 128, 4
    font = ImageFont.load_default(size=11)
    lines_per_cell = 6  # enough for the longest two-object prompt at this cell width
    text_h = lines_per_cell * 13
    rows = math.ceil(len(order) / columns)
    grid = Image.new("RGB", (columns * (cell + pad) + pad, rows * (cell + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    sample = "abcdefghijklmnopqrstuvwxyz "
    chars = max(8, int(cell * len(sample) / font.getlength(sample)) - 1)  # characters per line
    for slot, k in enumerate(order):
        x = pad + (slot % columns) * (cell + pad)
        y = pad + (slot // columns) * (cell + text_h + pad)
        pixels = (result.images[k].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
        grid.paste(Image.fromarray(pixels).resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        text = "\n".join(textwrap.wrap(records[k]["prompt"], chars)[:lines_per_cell])
        draw.multiline_text(
            (x, y + cell + 1), text, fill=(0, 120, 0) if records[k]["correct"] else (200, 0, 0), font=font, spacing=1
        )
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")


def write_outputs(result: AdherenceResult, out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report_path, grid_path = out / REPORT_FILE, out / GRID_FILE
    atomic_write_text(report_path, json.dumps(result.report, indent=2) + "\n")
    save_grid(result, grid_path)
    return report_path, grid_path


def summary_lines(report: dict[str, Any]) -> list[str]:
    one, two, kid_ = report["one_object"], report["two_object"], report["kid"]
    lines = [f"settings: {json.dumps(report['settings'])}"]

    def both(value: float, geo: float | None) -> str:  # "99.0% (judge) / 93.0% (geometry)"
        return f"{value:.1%}" + ("" if geo is None else f" (judge) / {geo:.1%} (geometry)")

    def acc(part: dict, name: str) -> str:
        stated = part.get("num_stated", {}).get(name, part["num_prompts"])
        of = "" if stated == part["num_prompts"] else f" [stated in {stated}]"  # free-form prompts leave some out
        return f"{name} {both(part['accuracy'][name], part.get('accuracy_geometry', {}).get(name))}{of}"

    if one["num_prompts"]:
        text = ", ".join(acc(one, a) for a in (*ONE_OBJECT_ATTRIBUTES, "count", "all_attributes")
                         if a in one["accuracy"])
        lines.append(f"one-object ({one['num_prompts']} prompts): {text}")
    if two["num_prompts"]:
        relation = both(two["relation_accuracy"], two.get("relation_accuracy_geometry"))
        text = ", ".join(acc(two, h) for h in ("count", *TWO_OBJECT_HEADS) if h in two["accuracy"])
        lines.append(f"two-object ({two['num_prompts']} prompts): relation {relation}; {text}")
    g, r = kid_["generated_vs_real"], kid_["real_vs_real"]
    lines.append(
        f"domain KID: {g['mean']:.4f} +- {g['std']:.4f} (floor real vs real {r['mean']:.4f} +- {r['std']:.4f})"
    )
    lines.append(f"{report['seconds_per_image']:.3f} s/image")
    return lines


# ---- command line --------------------------------------------------------------------------------------------------


def add_ldm_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `python -m ldm_app.evaluate ldm`."""
    from ldm_app.samplers import SAMPLERS

    parser.add_argument("--model", required=True, help="model folder (LatentDiffusionPipeline.save_pretrained)")
    parser.add_argument("--num_prompts", type=int, default=100, help="one-object prompts")
    parser.add_argument("--two_object_prompts", type=int, default=50, help="two-object (relation) prompts")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and of the images")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: the model's stored sampler")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's stored number of steps")
    parser.add_argument("--guidance_scale", type=float, default=None, help="default: the model's stored scale")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--out", default=None, help=f"folder for {REPORT_FILE} and {GRID_FILE} (default: MODEL/eval; for the "
                        "bundled model, runs/eval/default_model)")
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda[:n]|mps")
    parser.add_argument("--dtype", default="auto", help="auto|fp32|fp16|bf16")
    parser.add_argument("--kid_subsets", type=int, default=100)
    add_prompt_style_argument(parser)
    add_judge_arguments(parser)


def add_prompt_style_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt_style", choices=PROMPT_STYLES, default="canonical",
                        help="canonical: every attribute in the training captions' form; free: the same scenes "
                        "and seeds, captions stating only some attributes in varied order and words (scored on "
                        "what they state)")


def add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--judge_cache", default=None, help="judge cache root (default: $LDM_APP_CACHE or ~/.cache/ldm_app)"
    )
    parser.add_argument("--judge_seed", type=int, default=0)
    parser.add_argument("--judge_resolution", type=int, default=64)
    parser.add_argument(
        "--judge_threshold", type=float, default=DEFAULT_THRESHOLD, help="min held-out accuracy per attribute"
    )


def judge_from_args(args: argparse.Namespace) -> Judge:
    """The cached judge the --judge_* flags name (trained first if absent), checked against --judge_threshold."""
    return load_or_train_judge(
        JudgeConfig(resolution=args.judge_resolution, seed=args.judge_seed), args.judge_cache, args.judge_threshold
    )


def report_folder(model: Path, name: str) -> Path:
    """Where a report goes by default: MODEL/NAME, but runs/NAME/MODEL_NAME for a model shipped inside the package
    (the bundled one): a report is no part of the model, and the package may be read-only (site-packages)."""
    package = Path(__file__).resolve().parents[1]
    if package in model.resolve().parents:
        return Path("runs") / name / model.resolve().name
    return model / name


def run_ldm(args: argparse.Namespace) -> dict[str, Any]:
    from ldm_app.fileio import check_report_folder
    from ldm_app.pipeline import LatentDiffusionPipeline, check_model_folder, resolve_device_dtype

    check_counts(args.num_prompts, args.two_object_prompts, args.batch_size)
    check_prompt_style(args.prompt_style)
    check_model_folder(Path(args.model))  # before the judge, which may take minutes to train on a new machine
    out = args.out or report_folder(Path(args.model), "eval")
    check_report_folder("--out", out)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    judge = judge_from_args(args)
    pipe = LatentDiffusionPipeline.from_pretrained(args.model, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    judge.net.to(device)
    result = run_adherence(
        pipe,
        args.num_prompts,
        args.two_object_prompts,
        args.seed,
        args.sampler,
        args.steps,
        args.guidance_scale,
        args.batch_size,
        judge,
        args.kid_subsets,
        args.judge_threshold,
        prompt_style=args.prompt_style,
    )
    result.report["model"] = str(Path(args.model).resolve())
    report_path, grid_path = write_outputs(result, out)
    for line in summary_lines(result.report):
        print(line)
    print(f"wrote {report_path} and {grid_path}")
    return result.report
