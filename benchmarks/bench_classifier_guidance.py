"""Classifier guidance vs classifier-free guidance on the bundled model (issue 17, part 4).

    python benchmarks/bench_classifier_guidance.py --classifier DIR [--num 60] [--steps 25]
        [--scales 0,1,3,10,30] [--cfg 3] [--out docs/classifier_guidance]

Every setting samples the same `num` (class label, seed) pairs (labels uniform over the 18 colour x shape classes of
ldm_app.train_classifier) with deterministic DDIM at `steps` steps (ldm_app.classifier.classifier_guided_sample):
- classifier guidance: prompt "" at guidance 1 (the bundled model's unconditional model: 10% caption dropout),
  classifier scale s;
- the classifier-free baseline: the prompt "a {colour} {shape}" (colour and shape only, not the training captions'
  full form) at guidance w, no classifier. Not the same task (the text model was trained on full captions).

Judged: (1) the attribute judge's colour and shape heads (ldm_app.evaluation.judge); (2) a plain pixel check: the
background is the palette background nearest the median border pixel, the foreground the pixels > 40 RGB from it,
of which the largest connected component is the object; colour = palette colour nearest its mean RGB, shape = from
its fill of its bounding box
(square ~1.0, circle ~0.79, triangle ~0.5; cut at 0.89 / 0.64), checked on fresh renders first. Diversity/quality:
KID on the judge's features against fresh one-object renders (and the renders-vs-renders floor).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FOREGROUND_DISTANCE = 40.0
FILL_CUTS = (0.64, 0.89)  # triangle < 0.64 <= circle < 0.89 <= square


def pixel_check(image: np.ndarray) -> tuple[str, str]:
    """(colour, shape) read from a (H, W, 3) uint8 image by the plain pixel rules above ("none" when empty)."""
    from scipy import ndimage

    from ldm_app.data.shapes import BACKGROUNDS, COLOURS

    a = image.astype(np.float64)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    med = np.median(border, axis=0)
    bg_names = list(BACKGROUNDS)
    nearest = int(np.argmin([np.linalg.norm(med - np.array(v)) for v in BACKGROUNDS.values()]))
    bg = np.array(BACKGROUNDS[bg_names[nearest]])
    fg = np.linalg.norm(a - bg, axis=-1) > FOREGROUND_DISTANCE
    parts, n = ndimage.label(fg)
    if n == 0:
        return "none", "none"
    sizes = ndimage.sum(fg, parts, range(1, n + 1))
    fg = parts == 1 + int(np.argmax(sizes))  # the largest object (a generated image may have stray blobs)
    if fg.sum() < 4:
        return "none", "none"
    mean = a[fg].mean(axis=0)
    names = list(COLOURS)
    colour = names[int(np.argmin([np.linalg.norm(mean - np.array(v)) for v in COLOURS.values()]))]
    ys, xs = np.nonzero(fg)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = fg.sum() / box
    shape = "triangle" if fill < FILL_CUTS[0] else "circle" if fill < FILL_CUTS[1] else "square"
    return colour, shape


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def render_one_object(num: int, seed: int, stream: int, resolution: int = 64):
    from ldm_app.data.shapes import render_scene, sample_scene

    scenes = [sample_scene(np.random.default_rng([seed, stream, i]), resolution, 0.0) for i in range(num)]
    pixels = np.stack([np.asarray(render_scene(s, resolution)) for s in scenes])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0, scenes


def judge_scores(judge, images: torch.Tensor, colours: list[str], shapes: list[str]) -> dict[str, float]:
    from ldm_app.evaluation.judge import HEADS

    pred = judge.predict(images)
    c = np.array([HEADS["colour"][i] == col for i, col in zip(pred["colour"].tolist(), colours)])
    s = np.array([HEADS["shape"][i] == sh for i, sh in zip(pred["shape"].tolist(), shapes)])
    one = np.array([HEADS["count"][i] == "one" for i in pred["count"].tolist()])
    backgrounds = [HEADS["background"][i] for i in pred["background"].tolist()]
    return {"colour_and_shape": float((c & s).mean()), "colour": float(c.mean()), "shape": float(s.mean()),
            "one_object": float(one.mean()),
            "background_fractions": {b: backgrounds.count(b) / len(backgrounds) for b in HEADS["background"]}}


def pixel_scores(images: torch.Tensor, colours: list[str], shapes: list[str]) -> dict[str, float]:
    seen = [pixel_check(im) for im in to_uint8(images)]
    c = np.array([a[0] == b for a, b in zip(seen, colours)])
    s = np.array([a[1] == b for a, b in zip(seen, shapes)])
    return {"colour_and_shape": float((c & s).mean()), "colour": float(c.mean()), "shape": float(s.mean())}


def save_grid(rows: list[tuple[str, torch.Tensor]], header: list[str], path: Path, columns: int = 12) -> None:
    from PIL import Image, ImageDraw

    side, label_w, head_h = 64, 150, 28
    grid = Image.new("RGB", (label_w + columns * side, head_h + len(rows) * side), "white")
    draw = ImageDraw.Draw(grid)
    for j, text in enumerate(header[:columns]):
        colour, shape = text.split()
        draw.text((label_w + j * side + 2, 2), colour, fill="black")
        draw.text((label_w + j * side + 2, 14), shape, fill="black")
    for i, (name, images) in enumerate(rows):
        draw.text((4, head_h + i * side + 26), name, fill="black")
        for j, im in enumerate(to_uint8(images[:columns])):
            grid.paste(Image.fromarray(im), (label_w + j * side, head_h + i * side))
    grid.save(path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--classifier", required=True)
    p.add_argument("--num", type=int, default=60)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--scales", default="0,1,3,10,30")
    p.add_argument("--cfg", default="3")
    p.add_argument("--combined", default="", help="classifier scale with the colour+shape prompt at guidance 3")
    p.add_argument("--batch_size", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/classifier_guidance")
    args = p.parse_args()

    import ldm_app
    from ldm_app.classifier import classifier_guided_sample, load_classifier, read_training_report
    from ldm_app.evaluation.adherence import kid
    from ldm_app.evaluation.judge import load_or_train_judge
    from ldm_app.fileio import atomic_write_text
    from ldm_app.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(ldm_app.DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    clf = load_classifier(args.classifier)
    names = clf.config.class_names
    judge = load_or_train_judge()
    rng = np.random.default_rng(args.seed)
    labels = rng.integers(0, len(names), args.num).tolist()
    colours = [names[y].split()[0] for y in labels]
    shapes = [names[y].split()[1] for y in labels]
    seeds = [int(s) for s in rng.integers(0, 2**31, args.num)]

    # sanity of the pixel check and the KID floor on fresh renders
    real, scenes = render_one_object(args.num, args.seed, stream=7)
    ref, _ = render_one_object(max(200, args.num), args.seed, stream=8)
    real_c = [s.objects[0].colour for s in scenes]
    real_s = [s.objects[0].shape for s in scenes]
    ref_features = judge.features(ref)
    floor = {"judge": judge_scores(judge, real, real_c, real_s), "pixels": pixel_scores(real, real_c, real_s),
             "kid_vs_renders": kid(judge.features(real), ref_features, subset_size=min(50, args.num))}  # fmt: skip
    print("fresh renders:", json.dumps(floor), flush=True)

    settings = [(f"classifier s={s}", dict(prompt="", guidance_scale=1.0, classifier_scale=float(s)))
                for s in args.scales.split(",") if s]  # fmt: skip
    settings += [(f"CFG w={w} 'a colour shape'", dict(prompt=[f"a {c} {s}" for c, s in zip(colours, shapes)],
                                                      guidance_scale=float(w), classifier_scale=0.0))
                 for w in args.cfg.split(",") if w]  # fmt: skip
    settings += [(f"CFG w=3 + classifier s={s}", dict(prompt=[f"a {c} {s_}" for c, s_ in zip(colours, shapes)],
                                                      guidance_scale=3.0, classifier_scale=float(s)))
                 for s in args.combined.split(",") if s]  # fmt: skip
    rows, table = [], []
    for name, kw in settings:
        start = time.perf_counter()
        images = []
        for b in range(0, args.num, args.batch_size):
            sl = slice(b, b + args.batch_size)
            prompt = kw["prompt"][sl] if isinstance(kw["prompt"], list) else kw["prompt"]
            out = classifier_guided_sample(
                pipe, clf, labels[sl], kw["classifier_scale"], prompt=prompt, num_inference_steps=args.steps,
                guidance_scale=kw["guidance_scale"], output_type="pt",
                generator=[torch.Generator().manual_seed(s) for s in seeds[sl]])  # fmt: skip
            images.append(out.images.float().cpu())
        seconds = time.perf_counter() - start
        images = torch.cat(images)
        row = {"setting": name, "classifier_scale": kw["classifier_scale"], "guidance_scale": kw["guidance_scale"],
               "prompt": "" if kw["prompt"] == "" else "a {colour} {shape}",
               "judge": judge_scores(judge, images, colours, shapes), "pixels": pixel_scores(images, colours, shapes),
               "kid_vs_renders": kid(judge.features(images), ref_features, subset_size=min(50, args.num)),
               "s_per_image": seconds / args.num}  # fmt: skip
        table.append(row)
        rows.append((name, images))
        print(f"{name}: judge {row['judge']['colour_and_shape']:.3f} (colour {row['judge']['colour']:.3f}, shape "
              f"{row['judge']['shape']:.3f}, one object {row['judge']['one_object']:.2f}, gray background "
              f"{row['judge']['background_fractions']['gray']:.2f}) pixels {row['pixels']['colour_and_shape']:.3f} KID "
              f"{row['kid_vs_renders']['mean']:.4f}+-{row['kid_vs_renders']['std']:.4f} "
              f"{row['s_per_image']:.3f} s/image", flush=True)  # fmt: skip

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "model": "ldm_app.DEFAULT_MODEL", "sampler": f"DDIM eta=0, {args.steps} steps",
        "num_images_per_setting": args.num, "labels": "uniform over 18 colour x shape classes, seed "
        f"{args.seed}", "chance_colour_and_shape": 1 / 18,
        "classifier": {"folder": str(args.classifier), "training": read_training_report(args.classifier)},
        "fresh_renders": floor, "table": table, "torch_threads": torch.get_num_threads(),
    }  # fmt: skip
    atomic_write_text(out / "classifier_guidance.json", json.dumps(report, indent=2) + "\n")
    save_grid(rows, [names[y] for y in labels], out / "classifier_guidance_grid.png")
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
