#!/usr/bin/env bash
# A class-conditional shapes model (class = colour x shape, 18 classes) on the bundled model's autoencoder:
# labelled data -> class-conditional LDM (conditioning.kind=class) -> class accuracy per guidance scale.
#
#   bash recipes/class_shapes.sh [OUT]      # OUT defaults to runs/class_shapes; NPROC=1 for one process
#
# Each stage is skipped when its output exists. Measured on a 2-core CPU: see README.md ("Class conditioning").
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-runs/class_shapes}
NPROC=${NPROC:-2}
STEPS=${STEPS:-4000}
source recipes/common.sh

stage data "$OUT/data/metadata.jsonl" python -m ldm_app.data.shapes --out "$OUT/data" --num_images 20000 \
    --resolution 64 --two_object_fraction 0 --labels
stage train "$OUT/run/model_index.json" launch train_ldm.py --config configs/ldm/shapes64_cpu.yaml \
    --train_data_dir "$OUT/data" --pretrained_vae ldm_app/assets/default_model/vae --output_dir "$OUT/run" \
    --set conditioning.kind=class --set conditioning.num_classes=18 --max_train_steps "$STEPS" \
    --set train.lr_warmup_steps=100 --set ldm.validation_steps=0 --resume_from_checkpoint latest
python -m ldm_app.evaluate classes --model "$OUT/run" --per_class 10 --guidance 1,2,3,5 \
    --json "$OUT/classes.json" --grid "$OUT/classes_grid.png" --overwrite
