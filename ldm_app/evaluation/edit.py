"""Image editing on the shapes domain: image-to-image recolouring and inpainting, each judged twice, independently.

    python -m ldm_app.evaluate edit --model M [--num 50] [--json PATH] [--grid PATH] [--seed 1]

Every input is a FRESH render (scene i of a task from its own generator seeded (seed, task stream, i); the default
seed 1 and the task streams are used by no training set, judge set or adherence prompt), and every output is read
back twice:
- by the attribute judge (ldm_app/evaluation/judge.py, the cached 64 px one, >= 99% on its own held-out renders);
- by a plain pixel check written here, which knows where the objects were drawn: the mean colour of a known region
  matched to the nearest palette colour (the background colour counts as "nothing there"), foreground masks
  (pixels farther than FOREGROUND_DISTANCE from the background colour) compared by IoU, and the pixel difference
  outside the inpainting mask.

1. Recolouring (LatentDiffusionImg2ImgPipeline, SDEdit): a one-object scene, prompted with the same scene in
   another colour, at each strength. New colour right: judge colour == target; pixels: the mean colour of the
   source object's interior (pixels the object fully covers) is nearest the target colour. Kept: judge position
   and size (and shape) == the source's; pixels: IoU of the output's foreground with the source's >= IOU_KEPT.
2. Inpainting (LatentDiffusionInpaintPipeline): a two-object scene; a white box (the object's box plus
   `mask_margin` pixels, never past the middle of the gap to the other object) masks one object; the prompt
   describes the scene with a new colour and a new shape there (a colour neither object had). For each of
   INPAINT_SETTINGS (diffusers' "blend", RePaint without and with its free harmonizing tail, and RePaint with no
   resampling), without and with paste_back: the new object right (judge: colour and shape of that object;
   pixels: the mean colour of the foreground inside the mask, which must cover at least MIN_OBJECT_FRACTION of
   the old object's area), the other object kept (judge: its colour and shape; pixels: its interior colour and
   foreground IoU >= IOU_KEPT, in its box), and outside the mask the max / mean absolute difference from the
   input (0..255; paste_back must give exactly 0), beside the autoencoder's own round-trip error of the input
   there (decode(encode(x).mode)), which is what a method without paste_back can at best reach; and the seam: the
   mean difference across the mask's edge (`seam`; the input's own value is the floor). With `--inpaint_model`, an
   inpainting model (9-channel U-Net, train_ldm.py conditioning.concat=inpaint) runs on the same examples and
   seeds with the same sampler, steps and guidance ("model", MODEL_SETTINGS).

Each setting of an example uses the same generator seed, so settings differ only in the method. Seconds per image
are wall time of the pipeline calls (batched, `--batch_size`) over the number of images, on this machine's load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm_app.data.shapes import BACKGROUNDS, COLOURS, SHAPES, Scene, ShapeObject, caption, render_scene, sample_scene
from ldm_app.errors import UserError
from ldm_app.evaluation.judge import HEADS, Judge, scene_labels

DEFAULT_SEED = 1  # the shapes dataset, the judge and `evaluate ldm` all use seed 0
RECOLOUR_STREAM, INPAINT_STREAM = 101, 102  # seed streams of the two tasks' scenes (and of their image seeds)
STRENGTHS = (0.3, 0.5, 0.7, 0.9)
# (method, paste_back, extra call arguments): diffusers' blending, RePaint without its free harmonizing tail (as in
# the paper), RePaint as ldm_app runs it (5 x 5 resampling, the last 30% of the steps free) and its fast form (no
# resampling: blending with the free tail)
INPAINT_SETTINGS: tuple[tuple[str, bool, dict[str, Any]], ...] = (
    ("blend", False, {}), ("blend", True, {}),
    ("repaint", False, {"harmonize": 0.0}), ("repaint", True, {"harmonize": 0.0}),
    ("repaint", False, {}), ("repaint", True, {}),
    ("repaint", True, {"jump_n_sample": 1}),
)
# an inpainting model's settings (`--inpaint_model`): the 9-channel U-Net with the same sampler, steps and guidance as
# the other methods, and with half the steps (RePaint's resampling costs ~4x the U-Net calls of its steps: the issue's
# target compares accuracy at equal steps and the time a method needs)
MODEL_SETTINGS: tuple[tuple[str, bool, dict[str, Any]], ...] = (
    ("model", False, {}), ("model", True, {}), ("model", True, {"num_inference_steps": 10}),
)
TARGET_NEW_OBJECT_RIGHT = 0.90  # the issue's target for inpainting

FOREGROUND_DISTANCE = 40.0  # RGB distance from the background colour above which a pixel is foreground (the
# closest palette colour to a background, purple on gray, is 86 away, at least ~60 with the colour jitter)
IOU_KEPT = 0.5  # foreground IoU at which an object counts as kept in place and size (PASCAL VOC's threshold)
MIN_OBJECT_FRACTION = 0.25  # inpainting: foreground inside the mask needed to count an object as drawn there
NOTHING = "background"  # what the pixel colour check calls a region nearest the background colour


# ---- the pixel check -------------------------------------------------------------------------------------------


def to_uint8(image: Any) -> np.ndarray:
    """A PIL image, a (H, W, 3) uint8 array or a (H, W, 3) float array in [0, 1] -> (H, W, 3) uint8 (floats rounded
    as diffusers' numpy_to_pil does)."""
    a = np.asarray(image)
    if a.dtype == np.uint8:
        return a[..., :3]
    return (np.clip(a[..., :3], 0.0, 1.0) * 255).round().astype(np.uint8)


def nearest_colour(rgb: np.ndarray, background: str) -> str:
    """The palette colour nearest `rgb` (3,), or NOTHING when the background colour is nearer than all of them."""
    names = [*COLOURS, NOTHING]
    refs = np.array([*COLOURS.values(), BACKGROUNDS[background]], dtype=np.float64)
    return names[int(np.argmin(np.linalg.norm(refs - np.asarray(rgb, dtype=np.float64), axis=1)))]


def region_colour(image: Any, region: np.ndarray, background: str) -> str:
    """The colour of the pixels of `region` (bool (H, W)): their mean RGB's nearest palette colour; NOTHING for an
    empty region."""
    if not region.any():
        return NOTHING
    return nearest_colour(to_uint8(image)[region].astype(np.float64).mean(axis=0), background)


def colour_right(image: Any, region: np.ndarray, target: str, background: str) -> bool:
    """Pixel check: is the mean colour of `region` nearest the palette colour `target`?"""
    return region_colour(image, region, background) == target


def foreground(image: Any, background: str) -> np.ndarray:
    """bool (H, W): pixels farther than FOREGROUND_DISTANCE (RGB, 0..255) from the background colour."""
    a = to_uint8(image).astype(np.float64)
    return np.linalg.norm(a - np.array(BACKGROUNDS[background], dtype=np.float64), axis=-1) > FOREGROUND_DISTANCE


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks; 1.0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def abs_diff(a: Any, b: Any, region: np.ndarray) -> dict[str, float]:
    """Max and mean absolute difference (0..255, over pixels of `region` and channels) of two images."""
    if not region.any():
        return {"max": 0.0, "mean": 0.0}
    d = np.abs(to_uint8(a).astype(np.int16) - to_uint8(b).astype(np.int16))[region]
    return {"max": float(d.max()), "mean": float(d.mean())}


def seam(image: Any, mask: np.ndarray) -> float:
    """How visible the mask's edge is: the mean, over pairs of 4-adjacent pixels on either side of the edge (one in
    the mask, one out), of their largest channel difference (0..255). Objects sit inside the evaluation's masks, so
    in the input these pairs are background on both sides (0 up to the colour jitter): what rises above the input's
    value is a seam the method drew. 0.0 for a mask without an edge."""
    a = to_uint8(image).astype(np.int16)
    diffs = []
    for axis in (0, 1):
        first = [slice(None)] * 2
        second = [slice(None)] * 2
        first[axis], second[axis] = slice(None, -1), slice(1, None)
        across = mask[tuple(first)] != mask[tuple(second)]  # pairs straddling the edge
        d = np.abs(a[tuple(first)] - a[tuple(second)]).max(axis=-1)
        diffs.append(d[across])
    pairs = np.concatenate(diffs)
    return float(pairs.mean()) if pairs.size else 0.0


def object_coverage(obj: ShapeObject, resolution: int) -> np.ndarray:
    """float (R, R) in [0, 1]: how much of each pixel the object covers (rendered alone, white on black)."""
    alone = Scene(background="black", objects=(dataclasses.replace(obj, rgb=(255, 255, 255)),))
    return np.asarray(render_scene(alone, resolution), dtype=np.float64)[..., 0] / 255.0


def object_box(obj: ShapeObject, resolution: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) pixel bounds (x1, y1 exclusive) of the object's bounding box, rounded outwards."""
    half = obj.width / 2
    x0, x1 = (obj.center[0] - half) * resolution, (obj.center[0] + half) * resolution
    y0, y1 = (obj.center[1] - half) * resolution, (obj.center[1] + half) * resolution
    return int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)), int(np.ceil(y1))


def box_mask(box: tuple[int, int, int, int], resolution: int) -> np.ndarray:
    x0, y0, x1, y1 = (int(np.clip(v, 0, resolution)) for v in box)
    m = np.zeros((resolution, resolution), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def inpaint_mask(scene: Scene, index: int, resolution: int, margin: int) -> np.ndarray:
    """bool (R, R): object `index`'s box grown by `margin` pixels, but on the scene's axis never past the middle of
    the gap between the two objects' boxes (so the other object is never masked)."""
    x0, y0, x1, y1 = object_box(scene.objects[index], resolution)
    ox0, oy0, ox1, oy1 = object_box(scene.objects[1 - index], resolution)
    x0, y0, x1, y1 = x0 - margin, y0 - margin, x1 + margin, y1 + margin
    if scene.objects[index].position in ("left", "right"):
        if x1 <= ox0 + margin:  # the masked object is on the left
            x1 = min(x1, (x1 - margin + ox0) // 2 + 1)
        else:
            x0 = max(x0, (ox1 + x0 + margin) // 2)
    elif y1 <= oy0 + margin:  # on top
        y1 = min(y1, (y1 - margin + oy0) // 2 + 1)
    else:
        y0 = max(y0, (oy1 + y0 + margin) // 2)
    return box_mask((x0, y0, x1, y1), resolution)


# ---- the examples ------------------------------------------------------------------------------------------------


def _seed(*entropy: int) -> int:
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


@dataclass(frozen=True)
class RecolourExample:
    source: Scene
    target: Scene  # the same scene, the object in another colour
    image_seed: int

    @property
    def prompt(self) -> str:
        return caption(self.target)


@dataclass(frozen=True)
class InpaintExample:
    source: Scene
    target: Scene  # object `index` replaced by another colour and shape
    index: int  # which object is masked and replaced
    mask: np.ndarray  # bool (R, R), True = repaint
    image_seed: int

    @property
    def prompt(self) -> str:
        return caption(self.target)


def recolour_examples(num: int, seed: int, resolution: int = 64) -> list[RecolourExample]:
    """Example i depends only on (seed, i): a fresh one-object scene and a new colour for its object."""
    out = []
    for i in range(num):
        rng = np.random.default_rng([seed, RECOLOUR_STREAM, i])
        scene = sample_scene(rng, resolution, two_object_fraction=0.0)
        (obj,) = scene.objects
        colour = str(rng.choice([c for c in COLOURS if c != obj.colour]))
        new = dataclasses.replace(obj, colour=colour, rgb=COLOURS[colour])
        out.append(RecolourExample(scene, dataclasses.replace(scene, objects=(new,)), _seed(seed, RECOLOUR_STREAM, i)))
    return out


def inpaint_examples(num: int, seed: int, resolution: int = 64, margin: int = 4) -> list[InpaintExample]:
    """Example i depends only on (seed, i): a fresh two-object scene, the object to replace, its new colour (one
    neither object has) and new shape, and the mask."""
    out = []
    for i in range(num):
        rng = np.random.default_rng([seed, INPAINT_STREAM, i])
        scene = sample_scene(rng, resolution, two_object_fraction=1.0)
        index = int(rng.integers(2))
        old = scene.objects[index]
        colour = str(rng.choice([c for c in COLOURS if c not in {o.colour for o in scene.objects}]))
        shape = str(rng.choice([s for s in SHAPES if s != old.shape]))
        objects = list(scene.objects)
        objects[index] = dataclasses.replace(old, colour=colour, rgb=COLOURS[colour], shape=shape)
        target = dataclasses.replace(scene, objects=tuple(objects))
        mask = inpaint_mask(scene, index, resolution, margin)
        out.append(InpaintExample(scene, target, index, mask, _seed(seed, INPAINT_STREAM, i)))
    return out


def _slot(scene: Scene, index: int) -> str:
    """The judge's name ("first" / "second") for object `index` of a two-object scene (top/left one first)."""
    return "first" if scene.objects[index].position in ("top", "left") else "second"


# ---- scoring -----------------------------------------------------------------------------------------------------


def _judged(judge: Judge, images: list[np.ndarray]) -> list[dict[str, str]]:
    """Class names per head for uint8 (H, W, 3) images."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    pred = judge.predict(x)
    return [{h: HEADS[h][int(pred[h][k])] for h in HEADS} for k in range(len(images))]


def score_recolour(judge: Judge, examples: list[RecolourExample], outputs: list[np.ndarray]) -> list[dict[str, Any]]:
    """One record per example: judge and pixel verdicts on colour right and object kept."""
    records = []
    for ex, out, seen in zip(examples, outputs, _judged(judge, outputs)):
        (src,) = ex.source.objects
        (tgt,) = ex.target.objects
        resolution = out.shape[0]
        source_pixels = np.asarray(render_scene(ex.source, resolution))
        interior = object_coverage(src, resolution) >= 1.0
        overlap = iou(foreground(out, ex.source.background), foreground(source_pixels, ex.source.background))
        judge_keys = {"colour_right": seen["colour"] == tgt.colour, "position_kept": seen["position"] == src.position,
                      "size_kept": seen["size"] == src.size, "shape_kept": seen["shape"] == src.shape,
                      "background_kept": seen["background"] == ex.source.background}  # fmt: skip
        judge_keys["kept"] = judge_keys["position_kept"] and judge_keys["size_kept"]
        seen_colour = region_colour(out, interior, ex.source.background)
        records.append({
            "prompt": ex.prompt, "source": caption(ex.source), "seed": ex.image_seed,
            "judge": judge_keys, "judged_colour": seen["colour"],
            "pixels": {"colour_right": seen_colour == tgt.colour, "iou": overlap, "kept": overlap >= IOU_KEPT},
            "pixel_colour": seen_colour,
        })  # fmt: skip
    return records


def score_inpaint(
    judge: Judge, examples: list[InpaintExample], outputs: list[np.ndarray], inputs: list[np.ndarray]
) -> list[dict[str, Any]]:
    """One record per example: the new object right, the other object kept (judge and pixels), and the pixel
    difference from the input outside the mask."""
    records = []
    for ex, out, inp, seen in zip(examples, outputs, inputs, _judged(judge, outputs)):
        resolution, bg = out.shape[0], ex.source.background
        new, old, other = ex.target.objects[ex.index], ex.source.objects[ex.index], ex.source.objects[1 - ex.index]
        slot, other_slot = _slot(ex.source, ex.index), _slot(ex.source, 1 - ex.index)
        labels = scene_labels(ex.target)
        j_colour, j_shape = seen[f"{slot}_colour"] == new.colour, seen[f"{slot}_shape"] == new.shape
        j_other = seen[f"{other_slot}_colour"] == other.colour and seen[f"{other_slot}_shape"] == other.shape
        j_layout = seen["count"] == "two" and seen["axis"] == HEADS["axis"][labels["axis"]]
        fg_out, fg_in = foreground(out, bg), foreground(inp, bg)
        drawn = fg_out & ex.mask
        old_area = max(1, int((fg_in & ex.mask).sum()))
        present = drawn.sum() >= MIN_OBJECT_FRACTION * old_area
        new_colour = region_colour(out, drawn, bg) if present else NOTHING
        other_box = box_mask(object_box(other, resolution), resolution) & ~ex.mask
        other_iou = iou(fg_out & other_box, fg_in & other_box)
        other_colour = region_colour(out, (object_coverage(other, resolution) >= 1.0) & ~ex.mask, bg)
        records.append({
            "prompt": ex.prompt, "source": caption(ex.source), "seed": ex.image_seed, "background": bg,
            "replaced": f"{old.colour} {old.shape} -> {new.colour} {new.shape}",
            "judge": {"new_right": j_colour and j_shape, "new_colour_right": j_colour, "new_shape_right": j_shape,
                      "other_kept": j_other, "all_right": j_colour and j_shape and j_other and j_layout},
            "judged": f"{seen[f'{slot}_colour']} {seen[f'{slot}_shape']}, other {seen[f'{other_slot}_colour']} "
                      f"{seen[f'{other_slot}_shape']}, {seen['count']} objects",
            "pixels": {"new_present": bool(present), "new_colour_right": new_colour == new.colour,
                       "other_kept": other_colour == other.colour and other_iou >= IOU_KEPT, "other_iou": other_iou,
                       "outside_mask": abs_diff(out, inp, ~ex.mask), "seam": seam(out, ex.mask)},
            "pixel_colour": new_colour,
        })  # fmt: skip
    return records


def _mean(records: list[dict[str, Any]], group: str, key: str) -> float:
    return float(np.mean([r[group][key] for r in records]))


def summarize_recolour(records: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "num": len(records),
        "judge": {k: _mean(records, "judge", k) for k in records[0]["judge"]},
        "pixels": {"colour_right": _mean(records, "pixels", "colour_right"),
                   "kept_iou_ge_0.5": _mean(records, "pixels", "kept"), "mean_iou": _mean(records, "pixels", "iou")},
    }  # fmt: skip


def summarize_inpaint(records: list[dict[str, Any]]) -> dict[str, Any]:
    outside = [r["pixels"]["outside_mask"] for r in records]
    by_background = {}
    for bg in BACKGROUNDS:
        some = [r for r in records if r["background"] == bg]
        if some:
            by_background[bg] = {"num": len(some), "judge_new_right": _mean(some, "judge", "new_right"),
                                 "outside_mask_mean_abs_diff": float(np.mean([r["pixels"]["outside_mask"]["mean"]
                                                                              for r in some]))}  # fmt: skip
    return {
        "num": len(records),
        "judge": {k: _mean(records, "judge", k) for k in records[0]["judge"]},
        "pixels": {
            "new_present": _mean(records, "pixels", "new_present"),
            "new_colour_right": _mean(records, "pixels", "new_colour_right"),
            "other_kept": _mean(records, "pixels", "other_kept"),
            "other_mean_iou": _mean(records, "pixels", "other_iou"),
            "outside_mask_max_abs_diff": max(o["max"] for o in outside),
            "outside_mask_mean_abs_diff": float(np.mean([o["mean"] for o in outside])),
            "seam": _mean(records, "pixels", "seam"),
        },
        "by_background": by_background,
    }


# ---- running -----------------------------------------------------------------------------------------------------


def _pil(a: np.ndarray):
    """uint8 (H, W, 3) -> RGB image; bool (H, W) -> "L" mask, white (255) where True."""
    from PIL import Image

    return Image.fromarray(a if a.dtype == np.uint8 else a.astype(np.uint8) * 255)


def _run_batched(call: Callable[..., Any], prompts: list[str], seeds: list[int], batch_size: int,
                 per_image: dict[str, list[Any]], **fixed: Any) -> tuple[list[np.ndarray], float, float]:  # fmt: skip
    """Outputs (uint8 (H, W, 3)) of `call` over batches (the `per_image` arguments sliced alike, `fixed` ones
    passed as they are), image k from a CPU generator seeded seeds[k]; and the seconds spent in `call`: wall time and
    this process's CPU time (all its threads; on a CPU shared with other jobs, the figure that does not depend on
    their load)."""
    outputs, seconds, cpu = [], 0.0, 0.0
    for start in range(0, len(prompts), batch_size):
        stop = start + batch_size
        kwargs = {name: values[start:stop] for name, values in per_image.items()}
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[start:stop]]
        t, c = time.perf_counter(), time.process_time()
        images = call(prompts[start:stop], generator=generators, output_type="np", **kwargs, **fixed).images
        seconds, cpu = seconds + time.perf_counter() - t, cpu + time.process_time() - c
        outputs += [to_uint8(im) for im in images]
    return outputs, seconds, cpu


def autoencoder_roundtrip(pipe, images: list[np.ndarray]) -> list[np.ndarray]:
    """The autoencoder's reconstruction (evaluate.reconstruct: the posterior mode, or the VQ code) of uint8 images, as
    uint8: what a method that decodes the whole image can at best give back outside the mask."""
    from ldm_app.first_stage import reconstruct

    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    y, _ = reconstruct(pipe.vae, x.to(device=pipe.device, dtype=pipe.vae.dtype))
    return [to_uint8(im) for im in ((y.float() + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()]


@dataclass
class EditResult:
    report: dict[str, Any]
    recolour: tuple[list[RecolourExample], dict[float, list[np.ndarray]]]
    inpaint: tuple[list[InpaintExample], dict[str, list[np.ndarray]]]


def setting_name(method: str, paste_back: bool, extra: dict[str, Any] | None = None) -> str:
    shown = "".join(f" {k}={v:g}" for k, v in sorted((extra or {}).items()))
    return (f"{method}+paste_back" if paste_back else method) + shown


def run_edit(
    pipe,
    judge: Judge,
    num: int,
    seed: int = DEFAULT_SEED,
    batch_size: int = 10,
    strengths: tuple[float, ...] = STRENGTHS,
    settings: tuple[tuple[str, bool, dict[str, Any]], ...] = INPAINT_SETTINGS,
    mask_margin: int = 4,
    log: Callable[[str], None] = print,
    inpaint_model=None,
) -> EditResult:
    """Both tasks on `num` fresh scenes each (see the module doc), with the model's sampling defaults. With
    `inpaint_model` (a pipeline over a 9-channel inpainting U-Net on the same autoencoder, or a list of them),
    MODEL_SETTINGS run too for each, on the same examples and seeds, with `pipe`'s sampler, steps and guidance;
    a guidance-distilled model (train_distill's distill.method=guidance: stored guidance 1) keeps guidance 1. Their
    rows are "model...", then "model2...", ... in the order given."""
    from ldm_app.pipeline import LatentDiffusionImg2ImgPipeline, LatentDiffusionInpaintPipeline

    check_num(num, batch_size)
    height, width, steps, guidance = pipe.resolve_defaults(None, None, None, None)
    if height != width:
        raise UserError(f"the edit evaluation needs square images; the model generates {height}x{width}")
    resolution = height
    img2img = LatentDiffusionImg2ImgPipeline.from_pipe(pipe)
    inpaint = LatentDiffusionInpaintPipeline.from_pipe(pipe)
    for p in (img2img, inpaint):
        p.set_progress_bar_config(disable=True)
    models: dict[str, Any] = {}  # row label -> inpainting pipeline
    given = [] if inpaint_model is None else inpaint_model if isinstance(inpaint_model, list) else [inpaint_model]
    for k, model in enumerate(given):
        if model.unet.config.in_channels != 9:
            raise UserError(f"the inpainting model's U-Net takes {model.unet.config.in_channels} input "
                            "channels; an inpainting model (conditioning.concat=inpaint) takes 9")
        distilled = model.sampling_defaults.get("guidance_scale") == 1
        model = LatentDiffusionInpaintPipeline.from_pipe(model)
        model.sampling_defaults = {**pipe.sampling_defaults, "guidance_scale": 1.0 if distilled else guidance}
        model.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        model.set_progress_bar_config(disable=True)
        label = "model" if k == 0 else f"model{k + 1}"
        models[label] = model
        settings = tuple(settings) + tuple((label, pb, extra) for _, pb, extra in MODEL_SETTINGS)

    # 1. recolouring
    rec = recolour_examples(num, seed, resolution)
    rec_inputs = [np.asarray(render_scene(ex.source, resolution)) for ex in rec]
    rec_outputs: dict[float, list[np.ndarray]] = {}
    recolour_report: dict[str, Any] = {}
    baseline = summarize_recolour(score_recolour(judge, rec, rec_inputs))
    recolour_report["source (no edit)"] = baseline
    per_example: dict[str, list] = {}
    for strength in strengths:
        outs, seconds, cpu = _run_batched(img2img, [ex.prompt for ex in rec], [ex.image_seed for ex in rec], batch_size,
                                     {"image": [_pil(a) for a in rec_inputs]}, strength=strength)  # fmt: skip
        rec_outputs[strength] = outs
        records = score_recolour(judge, rec, outs)
        recolour_report[f"strength {strength:g}"] = {"strength": strength, **summarize_recolour(records),
                                                     "seconds_per_image": seconds / num,
                                                     "cpu_seconds_per_image": cpu / num}  # fmt: skip
        per_example[f"recolour strength {strength:g}"] = records
        log(f"recolour strength {strength:g}: {num} images in {seconds:.1f}s")

    # 2. inpainting
    inp = inpaint_examples(num, seed, resolution, mask_margin)
    inp_inputs = [np.asarray(render_scene(ex.source, resolution)) for ex in inp]
    inp_outputs: dict[str, list[np.ndarray]] = {}
    inpaint_report: dict[str, Any] = {}
    inpaint_report["input (no edit)"] = summarize_inpaint(score_inpaint(judge, inp, inp_inputs, inp_inputs))
    roundtrip = autoencoder_roundtrip(pipe, inp_inputs)
    inpaint_report["autoencoder round trip (no edit)"] = summarize_inpaint(score_inpaint(judge, inp, roundtrip,
                                                                                         inp_inputs))  # fmt: skip
    inp_outputs["autoencoder round trip"] = roundtrip
    for method, paste_back, extra in settings:
        name = setting_name(method, paste_back, extra)
        outs, seconds, cpu = _run_batched(
            models.get(method, inpaint), [ex.prompt for ex in inp], [ex.image_seed for ex in inp], batch_size,
            {"image": [_pil(a) for a in inp_inputs], "mask_image": [_pil(ex.mask) for ex in inp]},
            inpaint="model" if method in models else method, paste_back=paste_back, **extra,
        )
        inp_outputs[name] = outs
        records = score_inpaint(judge, inp, outs, inp_inputs)
        summary = summarize_inpaint(records)
        summary["judge"]["meets_target"] = summary["judge"]["new_right"] >= TARGET_NEW_OBJECT_RIGHT
        inpaint_report[name] = {"method": "model" if method in models else method, "paste_back": paste_back,
                                **({"guidance_scale": models[method].sampling_defaults["guidance_scale"]}
                                   if method in models else {}), **summary,
                                "seconds_per_image": seconds / num, "cpu_seconds_per_image": cpu / num}
        per_example[f"inpaint {name}"] = records
        without = inp_outputs.get(setting_name(method, False, extra))
        if paste_back and without is not None:  # same seeds: inside the mask it must be the run without paste_back
            inpaint_report[name]["inside_mask_max_abs_diff_vs_without_paste_back"] = max(
                abs_diff(a, b, ex.mask)["max"] for a, b, ex in zip(outs, without, inp))
        log(f"inpaint {name}: {num} images in {seconds:.1f}s")

    settings_record = {
        "num": num, "seed": seed, "resolution": resolution, "sampler": _sampler_name(pipe), "steps": steps,
        "guidance_scale": guidance, "batch_size": batch_size, "strengths": list(strengths),
        "inpaint_settings": [setting_name(*setting) for setting in settings], "mask_margin": mask_margin,
        "jump_length": 5, "jump_n_sample": 5, "harmonize": 0.3, "mask_blur": 0, "device": str(pipe.device),
        "dtype": str(pipe.unet.dtype).removeprefix("torch."), "torch_threads": torch.get_num_threads(),
        "foreground_distance": FOREGROUND_DISTANCE, "iou_kept": IOU_KEPT, "min_object_fraction": MIN_OBJECT_FRACTION,
        "target_new_object_right": TARGET_NEW_OBJECT_RIGHT,
    }  # fmt: skip
    report = {
        "settings": settings_record,
        "recolour": recolour_report,
        "inpaint": inpaint_report,
        "judge": {"folder": str(judge.folder) if judge.folder else None, "config": dataclasses.asdict(judge.config),
                  "heldout_accuracy": judge.heldout_accuracy},
        "per_example": per_example,
    }  # fmt: skip
    return EditResult(report, (rec, {0.0: rec_inputs, **rec_outputs}), (inp, {"input": inp_inputs, **inp_outputs}))


def _sampler_name(pipe) -> str:
    from ldm_app.samplers import sampler_name

    return sampler_name(pipe.scheduler) or type(pipe.scheduler).__name__


def check_num(num: int, batch_size: int = 1) -> None:
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise UserError(f"--num must be an integer >= 1, got {num!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"--batch_size must be an integer >= 1, got {batch_size!r}")


# ---- outputs -----------------------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{x:6.1%}"


def table_lines(report: dict[str, Any]) -> list[str]:
    """The two tables (recolouring, inpainting), judge and pixel columns side by side."""
    s = report["settings"]
    lines = [f"{s['num']} fresh renders per setting, seed {s['seed']}, {s['sampler']} {s['steps']} steps, guidance "
             f"{s['guidance_scale']:g}, {s['torch_threads']} torch thread(s), batch {s['batch_size']}",
             "",
             "recolouring (image-to-image): new colour right | object kept (judge: position and size; pixels: "
             f"foreground IoU >= {IOU_KEPT})",
             f"{'setting':<18} {'colour judge':>12} {'colour pixels':>13} {'kept judge':>10} {'kept pixels':>11} "
             f"{'mean IoU':>8} {'shape kept':>10} {'s/image':>8}"]  # fmt: skip
    for name, r in report["recolour"].items():
        j, p = r["judge"], r["pixels"]
        sec = f"{r['seconds_per_image']:8.3f}" if "seconds_per_image" in r else f"{'':>8}"
        lines.append(f"{name:<18} {_pct(j['colour_right']):>12} {_pct(p['colour_right']):>13} {_pct(j['kept']):>10} "
                     f"{_pct(p['kept_iou_ge_0.5']):>11} {p['mean_iou']:8.3f} {_pct(j['shape_kept']):>10} {sec}")
    lines += ["",
              f"inpainting (mask margin {s['mask_margin']} px): new object right (judge: colour and shape; pixels: "
              f"colour) | other object kept | outside the mask vs the input (0..255); target new object >= "
              f"{TARGET_NEW_OBJECT_RIGHT:.0%} (judge)",
              f"{'setting':<40} {'new judge':>9} {'colour j':>8} {'shape j':>7} {'colour px':>9} {'other j':>7} "
              f"{'other px':>8} {'out max':>7} {'out mean':>8} {'seam':>5} {'s/image':>8} {'cpu s/img':>9}"]  # fmt: skip
    for name, r in report["inpaint"].items():
        j, p = r["judge"], r["pixels"]
        sec = f"{r['seconds_per_image']:8.3f}" if "seconds_per_image" in r else f"{'':>8}"
        sec += f" {r['cpu_seconds_per_image']:9.3f}" if "cpu_seconds_per_image" in r else f" {'':>9}"
        lines.append(f"{name:<40} {_pct(j['new_right']):>9} {_pct(j['new_colour_right']):>8} "
                     f"{_pct(j['new_shape_right']):>7} {_pct(p['new_colour_right']):>9} {_pct(j['other_kept']):>7} "
                     f"{_pct(p['other_kept']):>8} {p['outside_mask_max_abs_diff']:7.0f} "
                     f"{p['outside_mask_mean_abs_diff']:8.3f} {p['seam']:5.1f} {sec}")  # fmt: skip
    return lines


def save_grid(result: EditResult, path: str | Path, rows: int = 6) -> None:
    """Examples as a PNG: recolouring rows (input | each strength), then inpainting rows (input | mask | the
    autoencoder round trip | each setting). Under each output: the judge's and the pixel check's verdict on the
    new colour (recolouring) or the new object (inpainting; pixels: its colour), green right, red wrong."""
    from PIL import Image, ImageDraw, ImageFont

    from ldm_app.fileio import atomic_path

    rec, rec_images = result.recolour
    inp, inp_images = result.inpaint
    per = result.report["per_example"]
    cell, pad, label_h = 128, 4, 14
    font = ImageFont.load_default(size=11)
    rec_cols = ["input", *(f"strength {s:g}" for s in rec_images if s)]
    inp_cols = ["input", "mask", *(k for k in inp_images if k != "input")]
    columns = max(len(rec_cols), len(inp_cols))
    n_rec, n_inp = min(rows, len(rec)), min(rows, len(inp))
    row_h = label_h + cell + label_h + pad
    height = 2 * label_h + (n_rec + n_inp) * row_h + 2 * label_h + pad
    grid = Image.new("RGB", (columns * (cell + pad) + pad, height), "white")
    draw = ImageDraw.Draw(grid)
    green, red, black = (0, 120, 0), (200, 0, 0), (0, 0, 0)

    def paste(a: np.ndarray, col: int, y: int) -> None:
        grid.paste(_pil(a).convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (pad + col * (cell + pad), y))

    def verdict(col: int, y: int, judge_ok: bool, pixels_ok: bool) -> None:
        x = pad + col * (cell + pad)
        draw.text((x, y), f"judge {'ok' if judge_ok else 'no'}", fill=green if judge_ok else red, font=font)
        draw.text((x + 64, y), f"pixels {'ok' if pixels_ok else 'no'}", fill=green if pixels_ok else red, font=font)

    def header(y: int, title: str, names: list[str]) -> int:
        draw.text((pad, y), title, fill=black, font=font)
        for c, name in enumerate(names):
            draw.text((pad + c * (cell + pad), y + label_h), name, fill=black, font=font)
        return y + 2 * label_h

    y = header(0, "recolouring (image-to-image): verdicts on the new colour", rec_cols)
    for k in range(n_rec):
        draw.text((pad, y), f"{rec[k].prompt} (was {rec[k].source.objects[0].colour})", fill=black, font=font)
        paste(rec_images[0.0][k], 0, y + label_h)
        for c, s in enumerate((s for s in rec_images if s), start=1):
            r = per[f"recolour strength {s:g}"][k]
            paste(rec_images[s][k], c, y + label_h)
            verdict(c, y + label_h + cell, r["judge"]["colour_right"], r["pixels"]["colour_right"])
        y += row_h
    y = header(y, "inpainting: verdicts on the new object (judge: colour and shape; pixels: colour)", inp_cols)
    for k in range(n_inp):
        draw.text((pad, y), f"{inp[k].prompt} ({inp[k].source.objects[inp[k].index].colour} "
                            f"{inp[k].source.objects[inp[k].index].shape} before)", fill=black, font=font)  # fmt: skip
        paste(inp_images["input"][k], 0, y + label_h)
        paste(inp[k].mask, 1, y + label_h)
        for c, name in enumerate((n for n in inp_images if n != "input"), start=2):
            paste(inp_images[name][k], c, y + label_h)
            if name in result.report["inpaint"] and f"inpaint {name}" in per:
                r = per[f"inpaint {name}"][k]
                verdict(c, y + label_h + cell, r["judge"]["new_right"], r["pixels"]["new_colour_right"])
        y += row_h
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        grid.save(tmp, format="PNG")


# ---- command line ------------------------------------------------------------------------------------------------


def add_edit_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `python -m ldm_app.evaluate edit`."""
    from ldm_app.evaluation.adherence import add_judge_arguments

    parser.add_argument("--model", required=True, help="model folder (LatentDiffusionPipeline.save_pretrained)")
    parser.add_argument("--num", type=int, default=50, help="fresh scenes per task (each setting edits all of them)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the scenes and of the images")
    parser.add_argument("--json", default=None, help="write the report (with per-example verdicts) as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace --json / --grid files that exist")
    parser.add_argument("--grid", default=None, help="write a PNG of examples here (input | mask | outputs)")
    parser.add_argument("--batch_size", type=int, default=10)
    parser.add_argument("--mask_margin", type=int, default=4, help="pixels added around the masked object's box")
    parser.add_argument("--inpaint_model", action="append", default=[],
                        help="also an inpainting model folder (9-channel U-Net, train_ldm.py conditioning.concat="
                             "inpaint) on the same examples, with --model's sampler, steps and guidance (guidance 1 "
                             "for a guidance-distilled one); repeat for more (rows model, model2, ...)")
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda[:n]|mps")
    parser.add_argument("--dtype", default="auto", help="auto|fp32|fp16|bf16")
    add_judge_arguments(parser)


def run_edit_cli(args: argparse.Namespace) -> dict[str, Any]:
    from ldm_app.evaluation.adherence import judge_from_args
    from ldm_app.fileio import atomic_write_text, check_report_file
    from ldm_app.pipeline import LatentDiffusionPipeline, check_model_folder, resolve_device_dtype

    check_num(args.num, args.batch_size)
    if args.mask_margin < 0:
        raise UserError(f"--mask_margin must be >= 0, got {args.mask_margin}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    check_model_folder(Path(args.model))  # before the judge, which may take minutes to train on a new machine
    for folder in args.inpaint_model:
        check_model_folder(Path(folder))
    for flag, dest in (("--json", args.json), ("--grid", args.grid)):
        if dest:
            check_report_file(flag, dest, args.overwrite)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    judge = judge_from_args(args)
    pipe = LatentDiffusionPipeline.from_pretrained(args.model, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    judge.net.to(device)
    from ldm_app.pipeline import LatentDiffusionInpaintPipeline

    models = [LatentDiffusionInpaintPipeline.from_pretrained(folder, dtype=dtype).to(device)
              for folder in args.inpaint_model]
    result = run_edit(pipe, judge, args.num, args.seed, args.batch_size, mask_margin=args.mask_margin,
                      inpaint_model=models)
    result.report["model"] = str(Path(args.model).resolve())
    for k, folder in enumerate(args.inpaint_model):  # "inpaint_model" for the first (the rows "model...")
        result.report["inpaint_model" if k == 0 else f"inpaint_model{k + 1}"] = str(Path(folder).resolve())
    for line in table_lines(result.report):
        print(line)
    if args.json:
        atomic_write_text(args.json, json.dumps(result.report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.grid:
        save_grid(result, args.grid)
        print(f"wrote {args.grid}")
    return result.report
