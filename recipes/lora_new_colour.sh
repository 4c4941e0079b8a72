#!/usr/bin/env bash
# A concept the bundled model has never seen: the colour "pink" (ldm_app/data/shapes.py EXTRA_COLOURS, outside the
# fixed vocabulary). A LoRA on the bundled model learns it from a small shapes set where 40% of the colour draws
# are pink and the rest keep the old vocabulary, then the new colour and the old vocabulary are measured
# (ldm_app/evaluation/new_concept.py; figures in docs/lora_concept/).
#
#   bash recipes/lora_new_colour.sh [OUT]      # OUT defaults to runs/lora_pink
#   NPROC=1 bash recipes/lora_new_colour.sh    # one process instead of two
#
# Stages are skipped when their output exists; training resumes from its latest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-runs/lora_pink}
NPROC=${NPROC:-2}
SEED=${SEED:-0}
BASE=ldm_app/assets/default_model
STEPS=${STEPS:-1200}
source recipes/common.sh

# Seed 1: none of these scenes is one the evaluation draws (its prompts come from other seed streams).
stage data "$OUT/data/metadata.jsonl" \
    python -m ldm_app.data.shapes --out "$OUT/data" --num_images 4000 --resolution 64 --seed 1 \
    --two_object_fraction 0.25 --extra_colours pink --extra_colour_fraction 0.4

stage lora "$OUT/lora/pytorch_lora_weights.safetensors" \
    launch train_ldm.py --pretrained_model "$BASE" --lora_rank 16 --train_data_dir "$OUT/data" \
    --output_dir "$OUT/lora" --seed "$SEED" --max_train_steps "$STEPS" --train_batch_size 32 --learning_rate 1e-3 \
    --cache_latents --checkpointing_steps 200 --checkpoints_total_limit 2 --validation_steps 100000 \
    --set train.lr_scheduler=constant_with_warmup --set train.lr_warmup_steps=50 --set ldm.ema_decay=0.99 \
    --resume_from_checkpoint latest

stage eval "$OUT/eval/new_concept.json" \
    python -m ldm_app.evaluation.new_concept --model "$BASE" --lora "$OUT/lora" --colour pink --out "$OUT/eval"

cat "$TIMES"
