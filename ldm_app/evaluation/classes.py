"""Class-conditional sampling on the shapes domain, judged twice:

    python -m ldm_app.evaluate classes --model M [--per_class 10] [--guidance 1,2,3,5] [--json PATH] [--grid PATH]

For each guidance scale, `per_class` images of every class (colour x shape, ldm_app.data.shapes.class_label's
order), each from its own seed, read back by
- the attribute judge (ldm_app/evaluation/judge.py): class right = the judged colour and shape are the class's;
- a pixel check written here, which knows no shapes: the background is the most common of the palette's
  background colours along the image border, the foreground the pixels farther than FOREGROUND_DISTANCE from it,
  and the colour right when the foreground's mean colour is nearest the class's colour (colour only: shape has no
  plain pixel reading).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm_app.data.shapes import BACKGROUNDS, COLOURS, NUM_CLASSES, SHAPES
from ldm_app.errors import UserError
from ldm_app.evaluation.edit import FOREGROUND_DISTANCE, NOTHING, foreground, nearest_colour, to_uint8
from ldm_app.evaluation.judge import HEADS, Judge


def class_name(label: int) -> tuple[str, str]:
    """(colour, shape) of class `label` (colour-major, as ldm_app.data.shapes.class_label)."""
    return list(COLOURS)[label // len(SHAPES)], SHAPES[label % len(SHAPES)]


def border_background(image: np.ndarray) -> str:
    """The palette background nearest the median colour of the image's one-pixel border."""
    a = to_uint8(image).astype(np.float64)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    median = np.median(border, axis=0)
    names = list(BACKGROUNDS)
    refs = np.array(list(BACKGROUNDS.values()), dtype=np.float64)
    return names[int(np.argmin(np.linalg.norm(refs - median, axis=1)))]


def pixel_colour(image: np.ndarray) -> str:
    """The colour the pixels show: the foreground's mean colour nearest a palette colour (NOTHING if no foreground)."""
    background = border_background(image)
    fg = foreground(image, background)
    if fg.sum() < 4:
        return NOTHING
    return nearest_colour(to_uint8(image)[fg].astype(np.float64).mean(axis=0), background)


def score(judge: Judge, labels: list[int], images: list[np.ndarray]) -> dict[str, Any]:
    x = torch.from_numpy(np.stack([to_uint8(i) for i in images])).permute(0, 3, 1, 2).float() / 255.0
    pred = judge.predict(x)
    judged = [(HEADS["colour"][int(pred["colour"][k])], HEADS["shape"][int(pred["shape"][k])])
              for k in range(len(images))]  # fmt: skip
    right = [judged[k] == class_name(y) for k, y in enumerate(labels)]
    colour_right = [judged[k][0] == class_name(y)[0] for k, y in enumerate(labels)]
    pixels = [pixel_colour(image) == class_name(y)[0] for image, y in zip(images, labels)]
    per_class = {f"{c} {s}": float(np.mean([r for r, y in zip(right, labels) if class_name(y) == (c, s)]))
                 for c, s in map(class_name, sorted(set(labels)))}  # fmt: skip
    return {"judge": {"class_right": float(np.mean(right)), "colour_right": float(np.mean(colour_right)),
                      "shape_right": float(np.mean([j[1] == class_name(y)[1] for j, y in zip(judged, labels)]))},
            "pixels": {"colour_right": float(np.mean(pixels))}, "per_class": per_class}  # fmt: skip


def run_classes(pipe: Any, judge: Judge, per_class: int, guidances: list[float], seed: int = 1,
                batch_size: int = 18, log=print) -> tuple[dict[str, Any], dict[float, list[np.ndarray]]]:  # fmt: skip
    num_classes = pipe.unet.config.num_class_embeds
    if num_classes is None:
        raise UserError("the model is not class-conditional (its U-Net has no class embedding)")
    if num_classes - 1 != NUM_CLASSES:
        raise UserError(f"the model has {num_classes - 1} classes; the shapes classes are {NUM_CLASSES} (colour x shape)")
    labels = [y for _ in range(per_class) for y in range(NUM_CLASSES)]
    report: dict[str, Any] = {"per_class": per_class, "seed": seed, "guidance": {}}
    outputs = {}
    for g in guidances:
        images, start = [], time.perf_counter()
        for i in range(0, len(labels), batch_size):
            chunk = labels[i : i + batch_size]
            generators = [torch.Generator().manual_seed(seed * 1_000_003 + i + k) for k in range(len(chunk))]
            out = pipe([""] * len(chunk), class_labels=chunk, guidance_scale=g, generator=generators,
                       output_type="np").images  # fmt: skip
            images += [(o * 255).round().astype(np.uint8) for o in out]
        seconds = time.perf_counter() - start
        report["guidance"][f"{g:g}"] = {**score(judge, labels, images), "seconds_per_image": seconds / len(labels)}
        outputs[g] = images
        r = report["guidance"][f"{g:g}"]
        log(f"guidance {g:g}: class right (judge) {r['judge']['class_right']:.3f}, colour (pixels) "
            f"{r['pixels']['colour_right']:.3f}, {r['seconds_per_image']:.3f} s/image")
    return report, outputs


def add_classes_arguments(parser: argparse.ArgumentParser) -> None:
    from ldm_app.evaluation.adherence import add_judge_arguments

    parser.add_argument("--model", required=True, help="a class-conditional pipeline folder (shapes classes)")
    parser.add_argument("--per_class", type=int, default=10, help="images per class and guidance scale")
    parser.add_argument("--guidance", default="1,2,3,5", help="comma-separated guidance scales")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--overwrite", action="store_true", help="replace --json / --grid files that exist")
    parser.add_argument("--grid", default=None, help="write a PNG: one row per guidance, the first image of each class")
    add_judge_arguments(parser)


def run_classes_cli(args: argparse.Namespace) -> dict[str, Any]:
    from diffusers.utils import make_image_grid
    from PIL import Image

    from ldm_app.evaluation.adherence import judge_from_args
    from ldm_app.fileio import atomic_path, atomic_write_text, check_report_file
    from ldm_app.pipeline import LatentDiffusionPipeline

    if args.per_class < 1:
        raise UserError(f"--per_class must be >= 1, got {args.per_class}")
    try:
        guidances = [float(g) for g in args.guidance.split(",")]
    except ValueError:
        raise UserError(f"--guidance must be comma-separated numbers, got {args.guidance!r}") from None
    for flag, dest in (("--json", args.json), ("--grid", args.grid)):
        if dest:
            check_report_file(flag, dest, args.overwrite)
    pipe = LatentDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    judge = judge_from_args(args)
    report, outputs = run_classes(pipe, judge, args.per_class, guidances, args.seed)
    report["settings"] = {"model": str(Path(args.model).resolve()), "sampler": type(pipe.scheduler).__name__,
                          "steps": pipe.resolve_defaults(None, None, None, None)[2],
                          "foreground_distance": FOREGROUND_DISTANCE}  # fmt: skip
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(report, indent=1) + "\n")
    if args.grid:
        rows = [Image.fromarray(im) for g in guidances for im in outputs[g][:NUM_CLASSES]]
        grid = make_image_grid(rows, rows=len(guidances), cols=NUM_CLASSES)
        with atomic_path(Path(args.grid)) as tmp:
            grid.save(tmp, format="PNG")
    return report
