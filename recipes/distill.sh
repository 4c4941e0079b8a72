#!/usr/bin/env bash
# Few-step sampling for the model of recipes/shapes.sh: latent consistency distillation (LCM) of OUT/default_model
# into a model that samples in 4 steps of one U-Net pass each (guidance folded in), then the sweep that compares
# it with its teacher on the same prompts, an fp16 export and the evaluation. Run it after recipes/shapes.sh:
#
#   bash recipes/shapes.sh runs/shapes && bash recipes/distill.sh runs/shapes
#   TEACHER=ldm_app/assets/default_model bash recipes/distill.sh runs/shapes   # distil the bundled model instead
#
# Measured end to end once (bundled teacher, 36 min on 2 shared cores): the 4-step student scored 0.946 vs the
# teacher's 0.982, below a 500-step pilot's 0.962, so the 2,000 steps are too many (docs/distill/README.md).
# Each stage is skipped when its output exists; the distillation resumes from its latest checkpoint. The pilot
# run and its figures: docs/distill/README.md (it trained far fewer steps than configs/distill/shapes64_lcm.yaml's
# 2,000 on a shared CPU).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-runs/shapes}
NPROC=${NPROC:-2}
SEED=${SEED:-0}
TEACHER=${TEACHER:-$OUT/default_model}
source recipes/common.sh

stage data "$OUT/data/metadata.jsonl" \
    python -m ldm_app.data.shapes --out "$OUT/data" --num_images 30000 --resolution 64 --seed "$SEED" \
    --two_object_fraction 0.5

stage distill "$OUT/distill/model_index.json" \
    launch -m ldm_app.train_distill --teacher "$TEACHER" --train_data_dir "$OUT/data" --output_dir "$OUT/distill" \
    --config configs/distill/shapes64_lcm.yaml --seed "$SEED" --resume_from_checkpoint latest

# Student at 4 / 2 / 1 steps (guidance 3, the distilled range is 2..4) and the teacher's stored default, on the
# same 150 prompts and seeds; each setting's report (both judges) is in OUT/distill_sweep/<setting>/.
stage sweep_student "$OUT/distill_sweep/student/sweep.json" \
    python -m ldm_app.evaluate sweep --model "$OUT/distill" --out "$OUT/distill_sweep/student" --guidance_scales \
    --setting lcm:4:3 --setting lcm:2:3 --setting lcm:1:3 --setting lcm:4:2 --setting lcm:4:4

stage sweep_teacher "$OUT/distill_sweep/teacher/sweep.json" \
    python -m ldm_app.evaluate sweep --model "$TEACHER" --out "$OUT/distill_sweep/teacher" --guidance_scales \
    --setting dpm++:20:3

stage export "$OUT/default_model_lcm/model_index.json" \
    python -m ldm_app.export --model "$OUT/distill" --out "$OUT/default_model_lcm" --dtype fp16

stage eval "$OUT/eval_lcm/adherence.json" \
    python -m ldm_app.evaluate ldm --model "$OUT/default_model_lcm" --out "$OUT/eval_lcm"

echo "== done: $OUT/default_model_lcm ($(du -sh "$OUT/default_model_lcm" | cut -f1)); stage times in $TIMES"
cat "$TIMES"
