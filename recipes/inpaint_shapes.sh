#!/usr/bin/env bash
# An inpainting model (image conditioning by concatenation, SD-inpainting's 9-channel U-Net) fine-tuned from the
# bundled text-to-image model: its U-Net input widened with zero weights for the mask and the masked image's
# latents, trained on random masks (ldm_app/masks.py: whole image, object boxes, rectangles, strokes) over renders
# like the bundled model's data; then guidance-distilled (train_distill, distill.method=guidance) into a model that
# needs no classifier-free guidance (one U-Net pass a step); then both compared with RePaint and blending on
# `evaluate edit` (same scenes and seeds, in one run).
#
#   bash recipes/inpaint_shapes.sh [OUT]      # OUT defaults to runs/inpaint_shapes; NPROC=1 for one process
#
# Each stage is skipped when its output exists. Measured on a 2-core CPU: see README.md ("Inpainting").
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-runs/inpaint_shapes}
NPROC=${NPROC:-2}
STEPS=${STEPS:-3000}          # the inpainting model (teacher): steps x 64 images at LR $LR
LR=${LR:-2e-4}
DISTILL_STEPS=${DISTILL_STEPS:-600}
NUM=${NUM:-300}               # scenes in the evaluation
source recipes/common.sh

stage data "$OUT/data/metadata.jsonl" python -m ldm_app.data.shapes --out "$OUT/data" --num_images 30000 \
    --resolution 64 --two_object_fraction 0.5
stage train "$OUT/run/model_index.json" launch train_ldm.py --config configs/ldm/shapes64_cpu.yaml \
    --train_data_dir "$OUT/data" --pretrained_model ldm_app/assets/default_model --output_dir "$OUT/run" \
    --set conditioning.concat=inpaint --set ldm.cache_latents=false --max_train_steps "$STEPS" \
    --learning_rate "$LR" --set train.lr_warmup_steps=100 --set ldm.validation_steps=0 \
    --set ldm.validation_guidance_scale=3 --resume_from_checkpoint latest
# guidance distillation: the student gives in one U-Net pass a step what the teacher gives in two under guidance 3
stage distill "$OUT/distilled/model_index.json" launch -m ldm_app.train_distill --teacher "$OUT/run" \
    --train_data_dir "$OUT/data" --output_dir "$OUT/distilled" --config configs/distill/inpaint_guidance.yaml \
    --max_train_steps "$DISTILL_STEPS" --resume_from_checkpoint latest
python -m ldm_app.evaluate edit --model ldm_app/assets/default_model --inpaint_model "$OUT/run" \
    --inpaint_model "$OUT/distilled" --num "$NUM" --json "$OUT/edit_eval.json" --grid "$OUT/edit_eval_grid.png" \
    --overwrite
