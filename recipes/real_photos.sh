#!/usr/bin/env bash
# The pipeline end to end on natural images, from nothing on a CPU in ~40 minutes: captioned 64 px views of the
# photos scikit-image ships (python -m ldm_app.data.photos; pip install 'ldm_app[photos]') -> autoencoder ->
# reconstruction scores and grid -> text-to-image LDM on cached latents -> a grid of caption prompts x seeds.
#
#   bash recipes/real_photos.sh [OUT]       # OUT defaults to runs/real_photos
#   NPROC=1 bash recipes/real_photos.sh     # one process instead of two
#
# A demonstration, not a model to ship: 3,000 views of 14 photos and a few hundred steps per stage. Deterministic
# for its seeds (same machine type, same NPROC); each stage is skipped when its output exists and the training stages
# resume from their latest checkpoint. Measured: 28.5 minutes on a 2-core CPU shared with other jobs, autoencoder
# 20.67 dB held-out PSNR; figures and the grids in docs/real_photos/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-runs/real_photos}
NPROC=${NPROC:-2}
SEED=${SEED:-0}
source recipes/common.sh

stage data "$OUT/data/metadata.jsonl" \
    python -m ldm_app.data.photos --out "$OUT/data" --num_images 3000 --resolution 64 --seed "$SEED"

stage vae "$OUT/vae/vae/config.json" \
    launch train_vae.py --config configs/vae/photos64.yaml --train_data_dir "$OUT/data" --output_dir "$OUT/vae" \
    --seed "$SEED" --resume_from_checkpoint latest

stage vae_eval "$OUT/vae/eval.json" \
    python -m ldm_app.evaluate vae --model "$OUT/vae" --data "$OUT/data" --grid "$OUT/vae/recon_grid.png" \
    --json "$OUT/vae/eval.json"

stage ldm "$OUT/ldm/model_index.json" \
    launch train_ldm.py --config configs/ldm/photos64.yaml --train_data_dir "$OUT/data" \
    --pretrained_vae "$OUT/vae/vae" --output_dir "$OUT/ldm" --seed "$SEED" --resume_from_checkpoint latest

# Prompts x seeds: every prompt with the same 4 seeds (image k of a prompt uses seed k), DPM-Solver++ 20 steps,
# guidance 3, in one generate.py call (loading the model once); then one grid, a row per prompt.
PROMPTS=(
    "a photo of a cat's face, close-up"
    "a photo of an astronaut in an orange suit, wide view"
    "a photo of a cup of coffee on a saucer, wide view"
    "a photo of a red motorcycle in a garage, wide view"
    "a photo of the retina of an eye, wide view"
    "a photo of galaxies in deep space, wide view"
    "a black and white photo of old coins, wide view"
    "a black and white photo of a brick wall, wide view"
)
samples() {
    local dir=$OUT/samples.tmp
    rm -rf "$dir" && mkdir -p "$dir/images"
    printf '%s\n' "${PROMPTS[@]}" > "$dir/prompts.txt"
    python generate.py --from_file "$dir/prompts.txt" --model "$OUT/ldm" --output "$dir/images/" --num_images 4 \
        --batch_size 4 --seed 0 --sampler dpm++ --steps 20 --guidance_scale 3
    python - "$dir" <<'PY'
import sys
from pathlib import Path
from PIL import Image, ImageDraw
folder = Path(sys.argv[1])
prompts = (folder / "prompts.txt").read_text().splitlines()
files = sorted((folder / "images").glob("*.png"))  # numbered in order: prompt by prompt, seeds 0-3 each
side, label, seeds = 128, 330, 4  # each 64 px sample shown at 2x, its prompt written left of the row
assert len(files) == len(prompts) * seeds, files
grid = Image.new("RGB", (label + seeds * side, len(prompts) * side), "white")
draw = ImageDraw.Draw(grid)
for i, path in enumerate(files):
    k, s = divmod(i, seeds)
    if s == 0:
        draw.text((6, k * side + side // 2 - 6), prompts[k], fill="black")
    image = Image.open(path).convert("RGB").resize((side, side), Image.Resampling.NEAREST)
    grid.paste(image, (label + s * side, k * side))
grid.save(folder / "grid.png")
PY
    rm -rf "$OUT/samples" && mv "$dir" "$OUT/samples"
}
stage samples "$OUT/samples/grid.png" samples

echo "== done: $OUT/ldm; reconstruction grid $OUT/vae/recon_grid.png, samples $OUT/samples/grid.png"
cat "$TIMES"
