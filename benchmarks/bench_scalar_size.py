"""Does the scalar control the object's size? A text+scalar shapes model against the text-only bundled model.

    python benchmarks/bench_scalar_size.py --model NAME=RUN_DIR [--model ...] [--baseline ldm_app/assets/default_model]
        [--num_prompts 60] [--seed 1000] [--per_range 3] [--steps 20] [--guidance 3] [--out docs/scalar_conditioning]

Prompts: `num_prompts` fresh one-object scenes drawn as ldm_app.data.shapes draws them, scene k from the generator
(seed, k) (training used seed 0: shapes --seed 0 draws scene i from (0, i)), captioned exactly like the training
data ("a small red circle on the left on a gray background"). Requested sizes: `per_range` values evenly spaced over
the caption's own range (small 0.20-0.30, large 0.45-0.60 of the image side). Every (prompt, size) cell uses the
prompt's seed, so a row differs only by the scalar; the text-only model gets the prompt alone (one image per prompt,
compared with each size of its row: it cannot know the exact size, and its error is the baseline). Both models
sample with the same sampler, steps and guidance.

Measured two independent ways:
1. pixels: background = the median colour of the one-pixel border; foreground = pixels more than 40 RGB from it;
   the object = the largest connected component; its size = the larger side of its bounding box, in pixels,
   against the requested side * 64: mean absolute error (pixels), Pearson r (all cells, and within each caption
   range, where the text-only model's r is 0 by construction: the same image for every size of a row), with 95%
   intervals from resampling the prompts. The rule is
   first run on true renders of the same scenes at the requested sizes: its error there is the measuring floor.
2. the attribute judge (ldm_app.evaluation.judge, the cached 64 px seed-0 judge, >= 99% on held-out renders): its
   `size` head agreeing with the caption's small/large (the scalar must not break what the caption says), and its
   colour/shape/position heads agreeing with the caption.
3. the scalar alone: the same cells with the empty prompt (the model saw it through caption dropout), pixels as in 1
   and the judge's size head against the requested size's range.
Writes scalar_size.json and, per scalar model, scalar_size_grid_NAME.png (rows = the first 12 prompts; columns =
the text-only image, then the requested sizes) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

FOREGROUND_DISTANCE = 40.0
GRID_ROWS = 12


def measured_side(image: np.ndarray) -> float:
    """The object's bounding-box side in pixels read from a (H, W, 3) uint8 image by the rule above (0: none)."""
    from scipy import ndimage

    a = image.astype(np.float64)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    fg = np.linalg.norm(a - np.median(border, axis=0), axis=-1) > FOREGROUND_DISTANCE
    parts, n = ndimage.label(fg)
    if n == 0:
        return 0.0
    sizes = ndimage.sum(fg, parts, range(1, n + 1))
    ys, xs = np.nonzero(parts == 1 + int(np.argmax(sizes)))  # the largest blob (generated images may have strays)
    return float(max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1))


def scenes(num: int, seed: int, resolution: int) -> list:
    from ldm_app.data.shapes import sample_scene

    return [sample_scene(np.random.default_rng([seed, k]), resolution, two_object_fraction=0.0) for k in range(num)]


def requested_sizes(size_word: str, per_range: int) -> list[float]:
    from ldm_app.data.shapes import SIZES

    lo, hi = SIZES[size_word]
    return [round(float(v), 3) for v in np.linspace(lo, hi, per_range)]


def true_render(scene, width: float, resolution: int, seed: int) -> np.ndarray:
    """The scene redrawn with the object at `width` (its centre re-drawn for that width, as the generator does)."""
    from ldm_app.data.shapes import _sample_center, render_scene

    (obj,) = scene.objects
    inset = max(0.01, 1.0 / resolution)
    center = _sample_center(np.random.default_rng(seed), obj.position, width, inset)
    scene = replace(scene, objects=(replace(obj, width=width, center=center),))
    return np.asarray(render_scene(scene, resolution))


def _mae_r(m: np.ndarray, r: np.ndarray) -> tuple[float, float]:
    corr = float(np.corrcoef(m, r)[0, 1]) if m.std() > 1e-9 and r.std() > 1e-9 else 0.0
    return float(np.abs(m - r).mean()), corr


def pixel_stats(measured: list[float], requested: list[float], side: int, words: list[str], prompts: list[int],
                resamples: int = 1000) -> dict:
    """MAE (pixels) and Pearson r over all cells and within each caption range, with 95% intervals from resampling
    the prompts (a prompt's cells share its seed and caption, so they are not independent)."""
    m, r = np.array(measured), np.array(requested) * side
    prompts_arr, word_arr = np.array(prompts), np.array(words)
    rng = np.random.default_rng(0)

    def stats(keep: np.ndarray) -> dict:
        mae, corr = _mae_r(m[keep], r[keep])
        ids = np.unique(prompts_arr[keep])
        by_prompt = {i: np.nonzero(keep & (prompts_arr == i))[0] for i in ids}
        boot = []
        for _ in range(resamples):
            idx = np.concatenate([by_prompt[i] for i in rng.choice(ids, len(ids))])
            boot.append(_mae_r(m[idx], r[idx]))
        lo, hi = np.percentile(np.array(boot), [2.5, 97.5], axis=0)
        return {"mae_px": mae, "mae_px_95": [float(lo[0]), float(hi[0])], "pearson_r": corr,
                "pearson_r_95": [float(lo[1]), float(hi[1])], "mean_signed_error_px": float((m[keep] - r[keep]).mean()),
                "cells": int(keep.sum())}

    out = {**stats(np.ones(len(m), bool)), "none_found": int((m == 0).sum())}
    for word in ("small", "large"):
        out[word] = stats(word_arr == word)
    return out


def judge_stats(judge, images: list[np.ndarray], scene_list: list) -> dict:
    from ldm_app.evaluation.judge import HEADS

    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    pred = judge.predict(x)
    out = {}
    for head, attr in (("size", "size"), ("colour", "colour"), ("shape", "shape"), ("position", "position")):
        right = [HEADS[head][int(pred[head][k])] == getattr(s.objects[0], attr) for k, s in enumerate(scene_list)]
        out[f"{head}_right"] = float(np.mean(right))
    return out


def sample(pipe, prompts: list[str], seeds: list[int], args, scalars: list[float] | None = None) -> list[np.ndarray]:
    from ldm_app.pipeline import make_generators

    images = []
    for i in range(0, len(prompts), args.batch_size):
        gens = [g for s in seeds[i : i + args.batch_size] for g in make_generators(s, 1)]
        extra = {} if scalars is None else {"scalars": scalars[i : i + args.batch_size]}
        out = pipe(prompts[i : i + args.batch_size], num_inference_steps=args.steps, guidance_scale=args.guidance,
                   sampler=args.sampler, generator=gens, output_type="np", height=64, width=64, **extra)  # fmt: skip
        images += [(im * 255).round().astype(np.uint8) for im in out.images]
    return images


def save_grid(path: Path, rows: list[list[np.ndarray]], header: list[str], captions: list[str], zoom: int = 2) -> None:
    from PIL import Image, ImageDraw

    cell, label_w, head_h = 64 * zoom, 420, 18
    grid = Image.new("RGB", (label_w + cell * len(header), head_h + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, text in enumerate(header):
        draw.text((label_w + j * cell + 4, 3), text, fill="black")
    for i, (row, caption) in enumerate(zip(rows, captions)):
        draw.text((4, head_h + i * cell + cell // 2 - 6), caption, fill="black")
        for j, image in enumerate(row):
            tile = Image.fromarray(image).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (label_w + j * cell, head_h + i * cell))
    grid.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                   help="a text+scalar model folder and the name it gets in the report; repeatable")
    p.add_argument("--baseline", default="ldm_app/assets/default_model", help="a text-only model folder")
    p.add_argument("--num_prompts", type=int, default=60)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--per_range", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--sampler", default="dpm++")
    p.add_argument("--batch_size", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="docs/scalar_conditioning")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = dict(spec.split("=", 1) for spec in args.model)

    from ldm_app.evaluation.judge import JudgeConfig, load_or_train_judge
    from ldm_app.fileio import atomic_write_text
    from ldm_app.pipeline import LatentDiffusionPipeline

    side = 64
    scene_list = scenes(args.num_prompts, args.seed, side)
    captions = [s.caption for s in scene_list]
    words = [s.objects[0].size for s in scene_list]
    # cells: prompt-major, then the requested sizes of the prompt's caption range
    cells = [(k, size) for k, w in enumerate(words) for size in requested_sizes(w, args.per_range)]
    cell_words = [words[k] for k, _ in cells]
    cell_scenes = [scene_list[k] for k, _ in cells]
    requested = [size for _, size in cells]
    cell_prompts = [k for k, _ in cells]
    seeds = [args.seed + k for k, _ in cells]

    # the measuring floor: the pixel rule on true renders of the same scenes at the requested sizes
    floor = [measured_side(true_render(scene_list[k], size, side, args.seed + k)) for k, size in cells]
    floor_stats = pixel_stats(floor, requested, side, cell_words, cell_prompts)
    report: dict = {"settings": {**vars(args), "prompts": captions, "requested": requested},
                    "pixels": {"true renders (measuring floor)": floor_stats},
                    "judge": {}, "pixels_empty_prompt": {}, "judge_empty_prompt": {}, "seconds": {}}
    judge = load_or_train_judge(JudgeConfig())

    def timed(fn):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        return out, {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}

    def load(folder):
        pipe = LatentDiffusionPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # the text-only model: one image per prompt, scored against each requested size of its row
    base = "text only (bundled)"
    per_prompt, secs = timed(lambda: sample(load(args.baseline), captions, [args.seed + k for k in range(len(captions))],
                                            args))  # fmt: skip
    images = {base: [per_prompt[k] for k, _ in cells]}
    report["pixels"][base] = pixel_stats([measured_side(im) for im in images[base]], requested, side, cell_words,
                                           cell_prompts)
    report["judge"][base] = judge_stats(judge, per_prompt, scene_list)
    report["seconds"][base] = {**secs, "images": len(per_prompt)}
    for name, folder in models.items():
        pipe = load(folder)
        images[name], secs = timed(lambda: sample(pipe, [captions[k] for k, _ in cells], seeds, args, requested))
        report["pixels"][name] = pixel_stats([measured_side(im) for im in images[name]], requested, side, cell_words,
                                             cell_prompts)
        report["judge"][name] = judge_stats(judge, images[name], cell_scenes)
        report["seconds"][name] = {**secs, "images": len(cells)}
        # the scalar alone: the empty prompt (trained through caption dropout), the same seeds and sizes
        alone = sample(pipe, [""] * len(cells), seeds, args, requested)
        report["pixels_empty_prompt"][name] = pixel_stats([measured_side(im) for im in alone], requested, side,
                                                          cell_words, cell_prompts)  # fmt: skip
        report["judge_empty_prompt"][name] = {"size_right": judge_stats(judge, alone, cell_scenes)["size_right"]}
        images[f"{name} (empty prompt)"] = alone
        print(name, json.dumps(report["pixels"][name]), json.dumps(report["judge"][name]), flush=True)
    print(base, json.dumps(report["pixels"][base]), json.dumps(report["judge"][base]), flush=True)
    report["cells"] = [{"prompt": k, "requested": size,
                        "measured_px": {n: measured_side(ims[i]) for n, ims in images.items()}}
                       for i, (k, size) in enumerate(cells)]  # fmt: skip

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "scalar_size.json", json.dumps(report, indent=1) + "\n")
    # one grid per scalar model: the first prompts as drawn; columns: text-only, then the requested sizes
    n = args.per_range
    labels = [f"{c}  [{', '.join(f'{s:g}' for s in requested_sizes(words[k], n))}]"
              for k, c in enumerate(captions[:GRID_ROWS])]  # fmt: skip
    for name in models:
        rows = [[images[base][k * n]] + images[name][k * n : (k + 1) * n] for k in range(len(labels))]
        path = out / f"scalar_size_grid_{name}.png"
        save_grid(path, rows, ["text only"] + [f"size {j + 1}/{n} of range" for j in range(n)], labels)
        print(f"wrote {path}")
    print(f"wrote {out / 'scalar_size.json'}")
    print_table(report)


def print_table(report: dict) -> None:
    def interval(d: dict, key: str) -> str:
        lo, hi = d[f"{key}_95"]
        return f"{d[key]:.2f} [{lo:.2f}, {hi:.2f}]"

    print("| model | prompt | MAE px (all) | r (all) | r within small | r within large | judge size right |")
    print("|---|---|---|---|---|---|---|")
    for section, judged, prompt in (("pixels", "judge", "caption"), ("pixels_empty_prompt", "judge_empty_prompt", "empty")):
        for name, d in report[section].items():
            size = report[judged].get(name, {}).get("size_right")
            print(f"| {name} | {prompt if 'floor' not in name else '-'} | {interval(d, 'mae_px')} | "
                  f"{interval(d, 'pearson_r')} | {interval(d['small'], 'pearson_r')} | "
                  f"{interval(d['large'], 'pearson_r')} | {'-' if size is None else f'{size:.3f}'} |")


if __name__ == "__main__":
    main()
