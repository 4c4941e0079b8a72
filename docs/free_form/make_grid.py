"""The grid in this folder: the bundled model on the first 12 one-object and 4 two-object prompts of
`evaluate ldm --prompt_style free` (seed 0; the same prompts, image seeds and stored sampling defaults, so each
image is the one the evaluation scored), captioned with the prompt and both judges' verdicts on what it states,
plus "objects seen: judge / geometry" when a judge sees more or fewer objects than the prompt has.

    python docs/free_form/make_grid.py [OUT.png]      (default: docs/free_form/grid.png)
"""

from __future__ import annotations

import sys
import textwrap

import torch
from PIL import Image, ImageDraw, ImageFont

from ldm_app import DEFAULT_MODEL
from ldm_app.evaluation.adherence import generate, sample_prompts, score
from ldm_app.evaluation.geometry import GeometryJudge
from ldm_app.evaluation.judge import load_or_train_judge
from ldm_app.fileio import atomic_path
from ldm_app.pipeline import LatentDiffusionPipeline

NUM_ONE, NUM_TWO, COLUMNS, CELL, PAD, TEXT_H = 12, 4, 8, 128, 4, 7 * 13


def main(out: str = "docs/free_form/grid.png") -> None:
    prompts = sample_prompts(100, 50, seed=0, style="free")
    prompts = prompts[:NUM_ONE] + prompts[100 : 100 + NUM_TWO]
    pipe = LatentDiffusionPipeline.from_pretrained(DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    _, _, steps, guidance = pipe.resolve_defaults(None, None, None, None)
    images = generate(pipe, prompts, steps, guidance, batch_size=16, log=lambda _: None)
    judges = {"judge": load_or_train_judge(), "geometry": GeometryJudge()}
    cnn, geo = (score(judge, prompts, images)[1] for judge in judges.values())
    # A one-object prompt's "correct" is its stated attributes (as in the evaluation, where the object count is a
    # figure of its own); the caption adds the count when a judge sees more or fewer objects than the prompt has.
    counts = {name: judge.predict(images)["count"] for name, judge in judges.items()}
    font = ImageFont.load_default(size=11)
    rows = -(-len(prompts) // COLUMNS)
    grid = Image.new("RGB", (COLUMNS * (CELL + PAD) + PAD, rows * (CELL + TEXT_H + PAD) + PAD), "white")
    draw = ImageDraw.Draw(grid)
    for k, prompt in enumerate(prompts):
        x, y = PAD + (k % COLUMNS) * (CELL + PAD), PAD + (k // COLUMNS) * (CELL + TEXT_H + PAD)
        pixels = (images[k].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        grid.paste(Image.fromarray(pixels).resize((CELL, CELL), Image.Resampling.NEAREST), (x, y))
        right = {"judge": cnn[k]["correct"], "geometry": geo[k]["correct"]}
        lines = [f"{name} {'ok' if ok else 'WRONG'}" for name, ok in right.items()]
        seen = {name: int(counts[name][k]) + 1 for name in right}  # count head: 0 = one object, 1 = two
        for name in right:
            right[name] = right[name] and seen[name] == prompt.kind + 1
        if any(n != prompt.kind + 1 for n in seen.values()):
            lines.append(f"objects seen: {seen['judge']} / {seen['geometry']}")
        verdict = "\n".join(lines)
        # green: both judges find what the prompt states, in the right number of objects; orange: one; red: neither
        colour = (0, 120, 0) if all(right.values()) else (200, 110, 0) if any(right.values()) else (200, 0, 0)
        text = "\n".join(textwrap.wrap(prompt.text, 20)[:4] + [verdict])
        draw.multiline_text((x, y + CELL + 1), text, fill=colour, font=font, spacing=1)
        print(f"{prompt.text!r}: {verdict.replace(chr(10), ', ')}; judge saw {cnn[k]['judged']!r}; "
              f"geometry saw {geo[k]['judged']!r}")
    with atomic_path(out) as tmp:
        grid.save(tmp, format="PNG")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
