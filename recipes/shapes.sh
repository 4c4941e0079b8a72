#!/usr/bin/env bash
# The bundled default model, reproduced from nothing on a CPU: data -> autoencoder -> text-to-image LDM ->
# guidance sweep (stores the chosen sampling defaults with the model) -> fp16 export -> evaluation.
#
#   bash recipes/shapes.sh [OUT]            # OUT defaults to runs/shapes
#   NPROC=1 bash recipes/shapes.sh          # one process instead of two
#
# Deterministic for its seeds (same machine type, same NPROC). Each stage is skipped when its output exists and
# the training stages resume from their latest checkpoint, so an interrupted recipe continues where it stopped.
# Measured on a 2-core CPU with NPROC=2: see README.md ("The default model"). Then install the model with
#   rm -rf ldm_app/assets/default_model && cp -r OUT/default_model ldm_app/assets/default_model
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-runs/shapes}
NPROC=${NPROC:-2}
SEED=${SEED:-0}
source recipes/common.sh

stage data "$OUT/data/metadata.jsonl" \
    python -m ldm_app.data.shapes --out "$OUT/data" --num_images 30000 --resolution 64 --seed "$SEED" \
    --two_object_fraction 0.5

stage vae "$OUT/vae/vae/config.json" \
    launch train_vae.py --config configs/vae/shapes64.yaml --train_data_dir "$OUT/data" --output_dir "$OUT/vae" \
    --seed "$SEED" --resume_from_checkpoint latest

stage vae_eval "$OUT/vae/eval.json" \
    python -m ldm_app.evaluate vae --model "$OUT/vae" --data "$OUT/data" --grid "$OUT/vae/recon_grid.png" \
    --json "$OUT/vae/eval.json"

stage ldm "$OUT/ldm/model_index.json" \
    launch train_ldm.py --config configs/ldm/shapes64_cpu.yaml --train_data_dir "$OUT/data" \
    --pretrained_vae "$OUT/vae/vae" --output_dir "$OUT/ldm" --seed "$SEED" --resume_from_checkpoint latest

# Sampling defaults chosen by measurement: adherence at guidance 1 / 3 / 5 / 7.5 with DPM-Solver++ 20 steps; the
# best mean adherence wins (ties: the lower scale) and is written to the model's ldm_app.json.
stage sweep "$OUT/sweep/sweep.json" \
    python -m ldm_app.evaluate sweep --model "$OUT/ldm" --out "$OUT/sweep" --sampler dpm++ --steps 20 \
    --guidance_scales 1 3 5 7.5 --write_defaults

stage export "$OUT/default_model/model_index.json" \
    python -m ldm_app.export --model "$OUT/ldm" --out "$OUT/default_model" --dtype fp16

stage eval "$OUT/eval/adherence.json" \
    python -m ldm_app.evaluate ldm --model "$OUT/default_model" --out "$OUT/eval"

echo "== done: $OUT/default_model ($(du -sh "$OUT/default_model" | cut -f1)); stage times in $TIMES"
cat "$TIMES"
