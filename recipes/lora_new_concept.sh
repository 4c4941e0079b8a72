#!/usr/bin/env bash
# A concept the bundled model has never seen, learned by a LoRA and measured (docs/lora_concept/README.md):
#   CONCEPT=cross (default): a new shape, an upright plus sign (ldm_app/data/shapes.py EXTRA_SHAPES);
#   CONCEPT=pink: a new colour (EXTRA_COLOURS). The bundled autoencoder cannot draw it: its encode-decode turns
#   pink into an old colour (0% of pink renders survive, measured by the evaluation's "ceiling"), so no U-Net
#   LoRA can learn it; kept to show and measure that.
# Data: 4,000 renders (seed 1) where 40% of the shape (or colour) draws are the new one and the rest keep the old
# vocabulary; a rank-16 U-Net LoRA on the bundled model; then the new concept and the old vocabulary are measured
# with and without it (ldm_app/evaluation/new_concept.py).
#
#   bash recipes/lora_new_concept.sh [OUT]               # OUT defaults to runs/lora_$CONCEPT
#   CONCEPT=pink bash recipes/lora_new_concept.sh        # the new colour
#   NPROC=1 bash recipes/lora_new_concept.sh             # one process instead of two
#
# Stages are skipped when their output exists; training resumes from its latest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."

CONCEPT=${CONCEPT:-cross}
OUT=${1:-runs/lora_$CONCEPT}
NPROC=${NPROC:-2}
SEED=${SEED:-0}
STEPS=${STEPS:-1200}
BASE=ldm_app/assets/default_model
source recipes/common.sh
case "$CONCEPT" in
    pink) EXTRA=(--extra_colours pink --extra_colour_fraction 0.4) ;;
    cross) EXTRA=(--extra_shapes cross --extra_shape_fraction 0.4) ;;
    *) echo "CONCEPT must be cross or pink" >&2; exit 2 ;;
esac

# Seed 1: none of these scenes is one the evaluation draws (its prompts come from other seed streams).
stage data "$OUT/data/metadata.jsonl" \
    python -m ldm_app.data.shapes --out "$OUT/data" --num_images 4000 --resolution 64 --seed 1 \
    --two_object_fraction 0.25 "${EXTRA[@]}"

stage lora "$OUT/lora/pytorch_lora_weights.safetensors" \
    launch train_ldm.py --pretrained_model "$BASE" --lora_rank 16 --train_data_dir "$OUT/data" \
    --output_dir "$OUT/lora" --seed "$SEED" --max_train_steps "$STEPS" --train_batch_size 32 --learning_rate 1e-3 \
    --cache_latents --checkpointing_steps 200 --checkpoints_total_limit 2 --validation_steps 100000 \
    --set train.lr_scheduler=constant_with_warmup --set train.lr_warmup_steps=50 --set ldm.ema_decay=0.99 \
    --resume_from_checkpoint latest

stage eval "$OUT/eval/new_concept.json" \
    python -m ldm_app.evaluation.new_concept --model "$BASE" --lora "$OUT/lora" --concept "$CONCEPT" \
    --out "$OUT/eval"

cat "$TIMES"
