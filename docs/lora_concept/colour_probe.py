"""Two measurements behind the choice and the limit of the `vermilion` concept (docs/lora_concept/README.md):

1. every colour half-way between two old ones, rendered (80 one-object scenes each) and passed through the bundled
   autoencoder: how many come back nearer to it than to any old colour (pink, by the same check: none);
2. the bundled model's own colour precision: 100 red and 100 orange prompts at its stored settings, the spread of
   the object's mean colour along the red -> orange axis against the training jitter's.

    python docs/lora_concept/colour_probe.py        # about 1 minute on 2 CPU cores
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import replace

import numpy as np
import torch

from ldm_app.data import shapes
from ldm_app.evaluation.adherence import Prompt, _seed, generate, render
from ldm_app.evaluation.new_concept import nearest_palette_colour, pixel_colour
from ldm_app.pipeline import LatentDiffusionPipeline

MODEL = "ldm_app/assets/default_model"


def mean_colour(image) -> list[float] | None:
    """The object core's mean RGB, as the pixel measure reads it (None: no object)."""
    return pixel_colour(image)[1]


def midpoints_through_the_autoencoder(vae) -> None:
    print("colour half-way between        rgb              renders  reconstructions (small / large)  drawn instead")
    for a, b in itertools.combinations(shapes.COLOURS, 2):
        mid = tuple(int(round((x + y) / 2)) for x, y in zip(shapes.COLOURS[a], shapes.COLOURS[b]))
        palette = {**shapes.COLOURS, "new": mid}
        rng_scenes = [np.random.default_rng([9, i]) for i in range(80)]
        scenes = []
        for rng in rng_scenes:  # a one-object scene of the old vocabulary, recoloured to `mid` with the same jitter
            scene = shapes.sample_scene(rng, 64, 0.0)
            obj = scene.objects[0]
            rgb = tuple(int(v) for v in np.clip(np.add(mid, np.subtract(obj.rgb, shapes.PALETTE[obj.colour])), 0, 255))
            scenes.append(replace(scene, objects=(replace(obj, rgb=rgb),)))
        renders = render(scenes, 64)
        with torch.no_grad():
            recon = ((vae.decode(vae.encode(renders * 2 - 1).latent_dist.mode()).sample + 1) / 2).clamp(0, 1)

        def named(images):
            return [nearest_palette_colour(m, palette) if (m := mean_colour(x)) is not None else "none" for x in images]

        seen_r, seen = named(renders), named(recon)
        small = np.array([s.objects[0].size == "small" for s in scenes])
        ok = np.array([c == "new" for c in seen])
        print(f"{a + ' / ' + b:30s} {str(mid):16s} {np.mean([c == 'new' for c in seen_r]):.2f}     "
              f"{ok.mean():.2f} ({ok[small].mean():.2f} / {ok[~small].mean():.2f})               "
              f"{dict(Counter(c for c in seen if c != 'new').most_common(3))}")


def colour_spread() -> None:
    pipe = LatentDiffusionPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    axis = np.subtract(shapes.COLOURS["orange"], shapes.COLOURS["red"]).astype(np.float64)
    axis /= np.linalg.norm(axis)
    jitter_std = shapes.COLOUR_JITTER / np.sqrt(3) * np.linalg.norm(axis)  # uniform +-J per channel
    half_gap = np.linalg.norm(np.subtract(shapes.EXTRA_COLOURS["vermilion"], shapes.COLOURS["red"])) / 2
    print(f"\ntraining jitter along red -> orange: std {jitter_std:.1f}; vermilion's half-gap to each: {half_gap:.1f}")
    for colour in ("red", "orange"):
        prompts = []
        for i in range(100):
            scene = shapes.sample_scene(np.random.default_rng([11, 3, i]), 64, 0.0)
            scene = replace(scene, objects=(replace(scene.objects[0], colour=colour),))
            prompts.append(Prompt(shapes.caption(scene), scene, _seed(11, 3, i)))
        images = generate(pipe, prompts, steps=4, guidance_scale=1.0, batch_size=25, log=lambda *_: None)
        means = np.array([m for x in images if (m := mean_colour(x)) is not None])
        proj = (means - np.array(shapes.COLOURS[colour])) @ axis
        toward = (proj > half_gap) if colour == "red" else (proj < -half_gap)
        print(f"{colour:6s} prompts ({len(means)} images, stored settings): spread along the axis std {proj.std():.1f},"
              f" mean {proj.mean():+.1f}; past the half-gap toward vermilion: {int(toward.sum())}")


def main() -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained(MODEL, subfolder="vae").float().eval()
    midpoints_through_the_autoencoder(vae)
    colour_spread()


if __name__ == "__main__":
    main()
