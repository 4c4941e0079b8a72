"""Grids of the images whose shape the geometric judge rejects, for looking at by eye.

    OMP_NUM_THREADS=1 python docs/geometry_judge/failure_grid.py [--model ldm_app/assets/default_model]

Generates the default `evaluate ldm` prompts (100 one-object + 50 two-object, seed 0, the model's sampling
defaults) and writes failures_one_object.png / failures_two_object.png next to this file: each cell is a rejected
object's image, labelled "prompt index, the prompt's shape (one-object), the best-fitting template" and its fill
ratio (f), solidity (s) and fitted-template IoU (i).
"""

import argparse
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ldm_app.evaluation import geometry
from ldm_app.evaluation.adherence import TWO, generate, sample_prompts
from ldm_app.pipeline import LatentDiffusionPipeline


def grid(cells, path, columns=8, cell=128):
    font = ImageFont.load_default(size=11)
    rows = max(1, (len(cells) + columns - 1) // columns)
    out = Image.new("RGB", (columns * (cell + 4), rows * (cell + 32)), "white")
    draw = ImageDraw.Draw(out)
    for i, (image, text) in enumerate(cells):
        x, y = (i % columns) * (cell + 4), (i // columns) * (cell + 32)
        pixels = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
        out.paste(Image.fromarray(pixels).resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        draw.multiline_text((x, y + cell + 1), text, fill=(0, 0, 0), font=font, spacing=1)
    out.save(path)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ldm_app/assets/default_model")
    parser.add_argument("--max_cells", type=int, default=32)
    args = parser.parse_args()
    pipe = LatentDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    height, _, steps, guidance = pipe.resolve_defaults(None, None, None, None)
    prompts = sample_prompts(100, 50, 0, height)
    images = generate(pipe, prompts, steps, guidance, 16, log=lambda _: None)
    cells = {False: [], True: []}
    for k, (prompt, image) in enumerate(zip(prompts, images)):
        two = prompt.kind == TWO
        wanted = "" if two else prompt.scene.objects[0].shape[:3] + " "
        for o in geometry.measure(image)["objects"][:2]:
            if o["shape"] is None:
                text = f"{k} {wanted}{o['template_shape'][:3]}\nf{o['fill']:.2f} s{o['solidity']:.2f} i{o['iou']:.2f}"
                cells[two].append((image, text))
    here = Path(__file__).parent
    grid(cells[False][: args.max_cells], here / "failures_one_object.png")
    grid(cells[True][: args.max_cells], here / "failures_two_object.png")
    print(f"rejected objects: {len(cells[False])} in one-object images, {len(cells[True])} in two-object images")


if __name__ == "__main__":
    main()
