"""Classifier guidance vs classifier-free guidance on the bundled model (issue 17, part 4).

    python benchmarks/bench_classifier_guidance.py --classifier DIR [--num 60] [--steps 25]
        [--scales 0,1,3,10,30] [--cfg 1.5,3,5] [--combined 10] [--class_model DIR --class_cfg 1,2,3,5]
        [--out docs/classifier_guidance]

Every setting samples the same `num` (class label, seed) pairs (labels uniform over the 18 colour x shape classes of
ldm_app.train_classifier) with deterministic DDIM (eta 0), in one run so that the times are comparable:
- classifier guidance (ldm_app.classifier.classifier_guided_sample, `steps` steps): prompt "" at guidance 1 (the
  bundled model's unconditional model: 10% caption dropout), classifier scale s;
- text classifier-free guidance on the bundled model: the prompt "a {colour} {shape}" (colour and shape only, not
  the training captions' full form) at guidance w, no classifier, at `steps` steps and at equal time;
- `--combined`: that prompt at guidance 3 plus classifier scale s;
- `--class_model`: a class-conditional shapes model (a LatentDiffusionPipeline folder whose U-Net has
  num_class_embeds = 18 classes + the null class, trained on ldm_app.data.shapes' `class_label`, which is the same
  numbering as train_classifier's: checked below), prompt "", class_labels = the same labels, guidance w over
  classes (the null class as the unconditional branch), the pipeline's DDIM sampler, at `steps` steps and, for
  w > 1, at equal time.

Equal time: CFG runs the U-Net on a doubled batch, so at equal steps it costs more per image than classifier guidance
(whose extra cost is one classifier forward + backward per step). For each CFG group (text; class model w > 1) the
equal-time step count is round(steps * t_classifier / t_group), t_classifier = the measured s/image of the best
classifier row (highest judge colour+shape), t_group = the group's mean measured s/image at `steps` steps; the
equal-time rows then record their own measured s/image. Fixed per-image costs (text encoding, decoding) make this
proportional rule slightly off; the table shows by how much. Time is the process's CPU time (time.process_time) on
`--threads` torch threads (default 1), which a busy machine disturbs far less than wall time; wall time is recorded
too.

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
import sys
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

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

    side, label_w, head_h = 64, 230, 28
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


def check_label_numbering(names: list[str], class_unet_config=None) -> None:
    """The classifier's class names are train_classifier's, whose numbering is ldm_app.data.shapes.class_label's (the
    label a class-conditional shapes model is trained on), and a class model has one embedding per class + null."""
    from ldm_app.data.shapes import class_label, sample_scene
    from ldm_app.train_classifier import class_names, label_of

    if list(names) != class_names():
        raise SystemExit(f"the classifier's class names {names} are not train_classifier's {class_names()}")
    seen = set()
    for i in range(600):  # one-object scenes as the shapes data writes them (its `label` = class_label(scene))
        scene = sample_scene(np.random.default_rng([12345, i]), 64, 0.0)
        (obj,), scene_label = scene.objects, class_label(scene)
        if scene_label != label_of(obj.colour, obj.shape) or names[scene_label] != f"{obj.colour} {obj.shape}":
            raise SystemExit(f"label numbering differs for {obj.colour} {obj.shape}: {scene_label}")
        seen.add(scene_label)
    if len(seen) != len(names):
        raise SystemExit(f"only {len(seen)} of {len(names)} classes seen in the numbering check")
    if class_unet_config is not None and class_unet_config.num_class_embeds != len(names) + 1:
        raise SystemExit(f"the class model has {class_unet_config.num_class_embeds} class embeddings, expected "
                         f"{len(names)} classes + the null class")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--classifier", required=True)
    p.add_argument("--num", type=int, default=60)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--scales", default="0,1,3,10,30")
    p.add_argument("--cfg", default="1.5,3,5", help="text classifier-free guidance scales ('a {colour} {shape}')")
    p.add_argument("--combined", default="", help="classifier scale with the colour+shape prompt at guidance 3")
    p.add_argument("--class_model", default="", help="a class-conditional shapes LatentDiffusionPipeline folder")
    p.add_argument("--class_cfg", default="1,2,3,5", help="its classifier-free guidance scales over classes")
    p.add_argument("--batch_size", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grid_columns", type=int, default=12)
    p.add_argument("--out", default="docs/classifier_guidance")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run_start = time.perf_counter()

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
    class_pipe = None
    if args.class_model:
        class_pipe = LatentDiffusionPipeline.from_pretrained(args.class_model)
        class_pipe.set_progress_bar_config(disable=True)
    check_label_numbering(names, class_pipe.unet.config if class_pipe is not None else None)
    judge = load_or_train_judge()
    rng = np.random.default_rng(args.seed)
    labels = rng.integers(0, len(names), args.num).tolist()
    colours = [names[y].split()[0] for y in labels]
    shapes = [names[y].split()[1] for y in labels]
    seeds = [int(s) for s in rng.integers(0, 2**31, args.num)]
    text_prompts = [f"a {c} {s}" for c, s in zip(colours, shapes)]

    # sanity of the pixel check and the KID floor on fresh renders
    real, scenes = render_one_object(args.num, args.seed, stream=7)
    ref, _ = render_one_object(max(200, args.num), args.seed, stream=8)
    real_c = [s.objects[0].colour for s in scenes]
    real_s = [s.objects[0].shape for s in scenes]
    ref_features = judge.features(ref)
    floor = {"judge": judge_scores(judge, real, real_c, real_s), "pixels": pixel_scores(real, real_c, real_s),
             "kid_vs_renders": kid(judge.features(real), ref_features, subset_size=min(50, args.num))}  # fmt: skip
    print("fresh renders:", json.dumps(floor), flush=True)

    def sample(kw: dict, sl: slice) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(s) for s in seeds[sl]]
        if kw["kind"] == "class_cfg":
            out = class_pipe(prompt=[""] * len(labels[sl]), class_labels=labels[sl], sampler="ddim", eta=0.0,
                             num_inference_steps=kw["steps"], guidance_scale=kw["guidance_scale"],
                             output_type="pt", generator=gens)  # fmt: skip
            return out.images.float().cpu()
        prompt = text_prompts[sl] if kw["prompt"] else ""
        out = classifier_guided_sample(
            pipe, clf, labels[sl], kw["classifier_scale"], prompt=prompt, num_inference_steps=kw["steps"],
            guidance_scale=kw["guidance_scale"], output_type="pt", generator=gens)  # fmt: skip
        return out.images.float().cpu()

    # warm-up (first calls allocate and pick kernels): not timed
    warm = slice(0, min(args.batch_size, args.num))
    sample(dict(kind="classifier", prompt=False, guidance_scale=1.0, classifier_scale=1.0, steps=2), warm)
    sample(dict(kind="classifier", prompt=True, guidance_scale=3.0, classifier_scale=0.0, steps=2), warm)
    if class_pipe is not None:
        sample(dict(kind="class_cfg", guidance_scale=3.0, steps=2), warm)

    rows, table = [], []

    def run(name: str, kw: dict) -> dict:
        start, cpu_start = time.perf_counter(), time.process_time()
        images = torch.cat([sample(kw, slice(b, b + args.batch_size)) for b in range(0, args.num, args.batch_size)])
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        row = {"setting": name, "kind": kw["kind"], "steps": kw["steps"],
               "model": args.class_model if kw["kind"] == "class_cfg" else "ldm_app.DEFAULT_MODEL",
               "classifier_scale": kw.get("classifier_scale", 0.0), "guidance_scale": kw["guidance_scale"],
               "prompt": "a {colour} {shape}" if kw.get("prompt") else "",
               "class_labels": kw["kind"] == "class_cfg", "equal_time": kw.get("equal_time", False),
               "judge": judge_scores(judge, images, colours, shapes), "pixels": pixel_scores(images, colours, shapes),
               "kid_vs_renders": kid(judge.features(images), ref_features, subset_size=min(50, args.num)),
               "s_per_image": cpu_seconds / args.num, "wall_s_per_image": seconds / args.num}  # fmt: skip
        table.append(row)
        rows.append((name, images))
        print(f"{name}: judge {row['judge']['colour_and_shape']:.3f} (colour {row['judge']['colour']:.3f}, shape "
              f"{row['judge']['shape']:.3f}, one object {row['judge']['one_object']:.2f}, gray background "
              f"{row['judge']['background_fractions']['gray']:.2f}) pixels {row['pixels']['colour_and_shape']:.3f} KID "
              f"{row['kid_vs_renders']['mean']:.4f}+-{row['kid_vs_renders']['std']:.4f} "
              f"{row['s_per_image']:.3f} CPU s/image ({row['wall_s_per_image']:.3f} wall)", flush=True)  # fmt: skip
        return row

    n = args.steps
    clf_rows = [run(f"classifier s={s}", dict(kind="classifier", prompt=False, guidance_scale=1.0,
                                              classifier_scale=float(s), steps=n))
                for s in args.scales.split(",") if s]  # fmt: skip
    cfg_ws = [float(w) for w in args.cfg.split(",") if w]
    text_rows = [run(f"text CFG w={w:g}, {n} steps", dict(kind="text_cfg", prompt=True, guidance_scale=w,
                                                          classifier_scale=0.0, steps=n))
                 for w in cfg_ws]  # fmt: skip
    class_ws = [float(w) for w in args.class_cfg.split(",") if w] if class_pipe is not None else []
    class_rows = [run(f"class model w={w:g}, {n} steps", dict(kind="class_cfg", guidance_scale=w, steps=n))
                  for w in class_ws]  # fmt: skip

    guided = [r for r in clf_rows if r["classifier_scale"] != 0.0] or clf_rows
    best = max(guided, key=lambda r: (r["judge"]["colour_and_shape"], -r["classifier_scale"]))
    t_clf = best["s_per_image"]
    equal_time = {"reference": best["setting"], "reference_s_per_image": t_clf, "time": "process CPU seconds",
                  "rule": "steps = round(steps * t_reference / t_group), t_group = the group's mean s/image at "
                  f"{n} steps"}  # fmt: skip

    def equal_steps(group: list[dict]) -> tuple[int, float]:
        t = float(np.mean([r["s_per_image"] for r in group]))
        return max(1, round(n * t_clf / t)), t

    if text_rows:
        m, t = equal_steps(text_rows)
        equal_time["text_cfg"] = {"s_per_image_at_steps": t, "steps": m}
        for w in cfg_ws if m != n else []:  # the same steps: the rows above are already the equal-time rows
            kw = dict(kind="text_cfg", prompt=True, guidance_scale=w, classifier_scale=0.0, steps=m, equal_time=True)
            run(f"text CFG w={w:g}, {m} steps (equal time)", kw)
    for s in [s for s in args.combined.split(",") if s]:
        run(f"text CFG w=3 + classifier s={s}, {n} steps", dict(kind="combined", prompt=True, guidance_scale=3.0,
                                                                classifier_scale=float(s), steps=n))  # fmt: skip
    guided_class = [r for r in class_rows if r["guidance_scale"] > 1.0]
    if guided_class:
        m, t = equal_steps(guided_class)
        equal_time["class_cfg"] = {"s_per_image_at_steps": t, "steps": m}
        for r in guided_class if m != n else []:
            w = r["guidance_scale"]
            run(f"class model w={w:g}, {m} steps (equal time)", dict(kind="class_cfg", guidance_scale=w, steps=m,
                                                                     equal_time=True))  # fmt: skip
    for r in table:
        r["time_vs_reference"] = r["s_per_image"] / t_clf

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "model": "ldm_app.DEFAULT_MODEL", "class_model": args.class_model or None,
        "sampler": f"DDIM eta=0, {n} steps unless the row says otherwise",
        "num_images_per_setting": args.num, "labels": "uniform over 18 colour x shape classes, seed "
        f"{args.seed}; the same (label, seed) pairs in every row", "chance_colour_and_shape": 1 / 18,
        "label_numbering": "label = 3 * colour_index + shape_index (train_classifier.label_of == "
        "data.shapes.class_label, checked in this run)",
        "classifier": {"folder": str(args.classifier), "training": read_training_report(args.classifier)},
        "fresh_renders": floor, "equal_time": equal_time, "table": table, "torch_threads": torch.get_num_threads(),
        "wall_seconds": time.perf_counter() - run_start, "argv": sys.argv[1:],
    }  # fmt: skip
    atomic_write_text(out / "classifier_guidance.json", json.dumps(report, indent=2) + "\n")
    save_grid(rows, [names[y] for y in labels], out / "classifier_guidance_grid.png", args.grid_columns)
    print(markdown_table(table), flush=True)
    print(f"wrote {out} in {time.perf_counter() - run_start:.0f}s", flush=True)


def markdown_table(table: list[dict]) -> str:
    lines = ["| setting | steps | judge colour+shape | judge colour | judge shape | pixels colour+shape | one object "
             "(judge) | gray background (judge) | KID vs renders | CPU s/image | wall s/image |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in table:
        j = r["judge"]
        lines.append(f"| {r['setting']} | {r['steps']} | {j['colour_and_shape']:.2f} | {j['colour']:.2f} | "
                     f"{j['shape']:.2f} | {r['pixels']['colour_and_shape']:.2f} | {j['one_object']:.2f} | "
                     f"{j['background_fractions']['gray']:.2f} | {r['kid_vs_renders']['mean']:.3f} ± "
                     f"{r['kid_vs_renders']['std']:.3f} | {r['s_per_image']:.3f} | "
                     f"{r['wall_s_per_image']:.3f} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
