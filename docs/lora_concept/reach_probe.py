"""What the bundled model can draw that it was never asked for: the reach a textual-inversion embedding is bound by
(docs/lora_concept/README.md, "What an embedding can reach").

An embedding changes only the text encoder's input, so what it can make the model draw is what the frozen U-Net
draws for *some* conditioning, passed through the frozen autoencoder. Two measurements:

1. the U-Net: the text encoder's outputs for two prompts that differ in one attribute (red / orange, small /
   large, on the left / at the top, white / gray background) mixed (1 - a) * E1 + a * E2, and what the model draws
   for each a (16 seeds): is the attribute a continuum (in-between mixes give in-between objects) or two classes
   (every image is one end or the other)?
2. the autoencoder: renders of colours beyond the palette's midpoints (`colour_probe.py` has the midpoints), encoded
   and decoded: how many come back nearer to the new colour than to any of the six old ones.

    python docs/lora_concept/reach_probe.py        # about 2 minutes on 2 CPU cores
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import torch

from ldm_app.data import shapes
from ldm_app.evaluation.adherence import render
from ldm_app.evaluation.new_concept import nearest_palette_colour, object_box, object_core, pixel_colour, to_uint8
from ldm_app.pipeline import LatentDiffusionPipeline

MODEL = "ldm_app/assets/default_model"
SEEDS = 16
MIXES = (0.0, 0.25, 0.4, 0.45, 0.5, 0.55, 0.6, 0.75, 1.0)
BASE = "a {size} {colour} circle {position} on a {background} background"
ENDS = {"colour": ("red", "orange"), "size": ("small", "large"), "position": ("left", "top"),
        "background": ("white", "gray")}
DEFAULTS = {"colour": "red", "size": "large", "position": "center", "background": "white"}


def prompt(values: dict[str, str]) -> str:
    return BASE.format(**{**values, "position": shapes.POSITIONS[values["position"]]})


def reading(attribute: str, image) -> float | None:
    """The one number each attribute is read as: colour, the object's mean RGB projected on the red -> orange axis
    (0 at red, 1 at orange); size, its box's longer side / the image side; position, the angle of its centre from
    the image centre (0 degrees: straight left, 90: straight up); background, the border's gray level."""
    if attribute == "background":
        _, bg = object_core(image)
        return float(bg.mean())
    if attribute == "colour":
        mean = pixel_colour(image)[1]
        if mean is None:
            return None
        red, orange = (np.array(shapes.COLOURS[c], np.float64) for c in ENDS["colour"])
        return float((np.array(mean) - red) @ (orange - red) / ((orange - red) @ (orange - red)))
    if attribute == "size":
        box = object_box(image)
        return None if box is None else max(box.shape) / to_uint8(image).shape[1]
    core, _ = object_core(image)
    ys, xs = np.nonzero(core)
    if not len(xs):
        return None
    half = (core.shape[0] - 1) / 2
    return float(np.degrees(np.arctan2(half - ys.mean(), half - xs.mean())))


def mixes_through_the_unet(pipe) -> None:
    print("prompt embeddings mixed between two values of one attribute (16 seeds each): the reading's mean and the "
          "share of images nearer the middle than either end")
    for attribute, (a, b) in ENDS.items():
        prompts = [prompt({**DEFAULTS, attribute: v}) for v in (a, b)]
        with torch.no_grad():
            e1, e2 = (pipe.encode_prompt(p, "cpu", 1, False)[0] for p in prompts)
        rows = []
        for mix in MIXES:
            images = pipe(prompt_embeds=((1 - mix) * e1 + mix * e2).repeat(SEEDS, 1, 1), output_type="pt",
                          generator=[torch.Generator().manual_seed(s) for s in range(SEEDS)]).images
            values = np.array([v for x in images if (v := reading(attribute, x)) is not None])
            rows.append((mix, values))
        ends = (np.median(rows[0][1]), np.median(rows[-1][1]))
        lo, hi = min(ends), max(ends)
        print(f"  {attribute}: '{prompts[0]}' -> '{prompts[1]}' (ends read {ends[0]:.2f} and {ends[1]:.2f})")
        for mix, values in rows:
            middle = np.mean((values > lo + (hi - lo) / 4) & (values < hi - (hi - lo) / 4))
            print(f"    a={mix:.2f}: mean {values.mean():7.2f}, std {values.std():6.2f}, in the middle half "
                  f"{middle:.2f} ({len(values)} objects)")


def colours_through_the_autoencoder(vae) -> None:
    candidates = {"maroon": (128, 20, 20), "crimson": (200, 20, 50), "brown": (150, 80, 20),
                  "dark orange": (200, 100, 20), "gold": (220, 170, 20), "salmon": (250, 120, 110),
                  "light red": (250, 80, 80), "magenta": (220, 40, 160), "lime": (120, 220, 40),
                  "teal": (20, 150, 150), "navy": (20, 40, 130)}
    print("\ncolours beyond the midpoints, 80 renders each through the autoencoder: nearer to the new colour than to "
          "any old one")
    for name, rgb in candidates.items():
        palette = {**shapes.COLOURS, "new": rgb}
        scenes = []
        for i in range(80):  # a one-object scene of the old vocabulary, recoloured with the same jitter
            scene = shapes.sample_scene(np.random.default_rng([9, i]), 64, 0.0)
            obj = scene.objects[0]
            jittered = np.clip(np.add(rgb, np.subtract(obj.rgb, shapes.PALETTE[obj.colour])), 0, 255)
            scenes.append(replace(scene, objects=(replace(obj, rgb=tuple(int(v) for v in jittered)),)))
        renders = render(scenes, 64)
        with torch.no_grad():
            recon = ((vae.decode(vae.encode(renders * 2 - 1).latent_dist.mode()).sample + 1) / 2).clamp(0, 1)
        named = Counter(nearest_palette_colour(m, palette) if (m := pixel_colour(x)[1]) is not None else "none"
                        for x in recon)
        nearest = min(np.linalg.norm(np.subtract(rgb, c)) for c in shapes.COLOURS.values())
        print(f"  {name:12s} {str(rgb):16s} {nearest:5.0f} from the nearest old colour: {named['new'] / 80:.2f} "
              f"(instead: {dict((k, v) for k, v in named.most_common(3) if k != 'new')})")


def main() -> None:
    torch.manual_seed(0)
    pipe = LatentDiffusionPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    mixes_through_the_unet(pipe)
    colours_through_the_autoencoder(pipe.vae.float().eval())


if __name__ == "__main__":
    main()
