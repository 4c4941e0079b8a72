#!/usr/bin/env bash
# A concept the bundled model has never seen, learned by a LoRA and measured (docs/lora_concept/README.md):
#   CONCEPT=cross (default): a new shape, an upright plus sign (ldm_app/data/shapes.py EXTRA_SHAPES);
#   CONCEPT=pink: a new colour (EXTRA_COLOURS);
#   CONCEPT=vermilion: a new colour half-way between red and orange, one the bundled autoencoder can draw
#   (best with DECODER_STEPS=0: no decoder fine-tune, so the old vocabulary is untouched by an embedding);
#   CONCEPT=medium: a new size between small and large (EXTRA_SIZES), also DECODER_STEPS=0.
# The bundled autoencoder's decoder cannot draw either well (its encode-decode turns every pink into an old colour
# and most small crosses into circles), but its latents tell them apart: so the recipe fine-tunes the decoder alone
# on the same data (encoder frozen, so the latents, and the LoRA, are unchanged), and assembles OUT/model: the
# bundled model with that decoder. Use: `generate.py --model OUT/model --lora OUT/lora/pytorch_lora_weights.safetensors`.
# Data: 4,000 renders (seed 1) where 40% of the shape (or colour) draws are the new one and the rest keep the old
# vocabulary; a rank-16 U-Net LoRA on the bundled model; then the new concept and the old vocabulary are measured
# with and without it (ldm_app/evaluation/new_concept.py).
#
#   bash recipes/lora_new_concept.sh [OUT]               # OUT defaults to runs/lora_$CONCEPT
#   CONCEPT=pink bash recipes/lora_new_concept.sh        # the new colour
#   NPROC=1 bash recipes/lora_new_concept.sh             # one process instead of two
#   DECODER_STEPS=0 bash recipes/lora_new_concept.sh     # the LoRA alone, with the bundled decoder
#   ADAPTER=embedding bash recipes/lora_new_concept.sh   # textual inversion instead of the LoRA (OUT/embedding,
#                                                        # OUT/eval_embedding; data and decoder shared with the LoRA's)
#   ADAPTER=embedding NUM_VECTORS=8 EMBEDDING_LR=5e-2 ...  # its vectors per token (1) and learning rate (5e-3);
#                                                        # other values write OUT/embedding_8v_5e-2, OUT/eval_embedding_8v_5e-2
#   ADAPTER=embedding INIT_TOKEN=red ...                 # the old word its vector starts from (default: the concept's
#                                                        # nearest; writes OUT/embedding_from_red, OUT/eval_embedding_from_red)
#   ADAPTER=lora_te bash recipes/lora_new_concept.sh     # U-Net + text-encoder LoRA (OUT/lora_te, OUT/eval_lora_te)
#
#   BASE=path/to/model bash recipes/lora_new_concept.sh  # another ldm_app model folder instead of the bundled one
#
# Stages are skipped when their output exists; training resumes from its latest checkpoint. OUT records the base
# model's files (OUT/base_model.sha256): a later run on another base (a new bundled model, say) stops with one line
# instead of putting the old decoder, LoRA or embedding together with the new model.
set -euo pipefail
cd "$(dirname "$0")/.."

CONCEPT=${CONCEPT:-cross}
ADAPTER=${ADAPTER:-lora}
OUT=${1:-runs/lora_$CONCEPT}
NPROC=${NPROC:-2}
SEED=${SEED:-0}
STEPS=${STEPS:-1200}
DECODER_STEPS=${DECODER_STEPS:-$((1500 / NPROC))}  # 12,000 images seen (batch 8 per process)
# The bundled model samples at guidance 1 (guidance 1.5 is distilled into it); a LoRA trained with the plain
# objective and caption dropout undoes part of that distillation, so base + LoRA is sampled and measured at guidance
# 2 (measured for cross: 1 -> concept 73% / old vocabulary 89%, 2 -> 90% / 96%, 3 -> 91% / 92%)
# ... and in 8 DPM-Solver++ steps on the sampler's own spacing: the bundled model's former default, which every LoRA
# figure in docs/lora_concept was measured at (its 4-step grid was chosen at guidance 1, without adapters).
# An embedding leaves the U-Net as it is, so unless GUIDANCE / SAMPLE_STEPS are given it is measured (and OUT/model
# samples) at the base model's stored settings: for the bundled model guidance 1, 4 steps on its grid (vermilion
# 88% / 86% there against 81% / 82% at guidance 2 and 8 steps). GUIDANCE=2 SAMPLE_STEPS=8 gives the settings of the
# 2026-12-05/06 cross and pink embedding figures.
if [ "$ADAPTER" = embedding ]; then
    GUIDANCE=${GUIDANCE:-} SAMPLE_STEPS=${SAMPLE_STEPS:-}
else
    GUIDANCE=${GUIDANCE:-2} SAMPLE_STEPS=${SAMPLE_STEPS:-8}
fi
SAMPLING=()  # empty: the base model's stored settings
if [ -n "$GUIDANCE" ]; then SAMPLING+=(--guidance_scale "$GUIDANCE"); fi
if [ -n "$SAMPLE_STEPS" ]; then SAMPLING+=(--steps "$SAMPLE_STEPS"); fi
# The concept's data, and the old word of its kind nearest to it (where an embedding's vector starts; INIT_TOKEN=
# picks another). Checked before OUT is made, so a misspelt CONCEPT or ADAPTER leaves nothing behind.
case "$CONCEPT" in
    pink) EXTRA=(--extra_colours pink --extra_colour_fraction 0.4) INIT=purple ;;
    vermilion) EXTRA=(--extra_colours vermilion --extra_colour_fraction 0.4) INIT=orange ;;
    cross) EXTRA=(--extra_shapes cross --extra_shape_fraction 0.4) INIT=square ;;
    medium) EXTRA=(--extra_sizes medium --extra_size_fraction 0.4) INIT=small ;;
    *) echo "error: CONCEPT must be cross, pink, vermilion or medium, got '$CONCEPT'" >&2; exit 2 ;;
esac
case "$ADAPTER" in
    lora|lora_te|embedding) ;;
    *) echo "error: ADAPTER must be lora, lora_te or embedding, got '$ADAPTER'" >&2; exit 2 ;;
esac
BASE=${BASE:-ldm_app/assets/default_model}
[ -e "$BASE/model_index.json" ] || { echo "error: BASE=$BASE is not a model folder (no model_index.json)" >&2; exit 2; }
source recipes/common.sh
# The base's identity: every file of the folder, by content (not by path or mtime, so a copy is the same base).
BASE_SHA=$(cd "$BASE" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-64)
if [ -e "$OUT/base_model.sha256" ]; then
    if [ "$(cat "$OUT/base_model.sha256")" != "$BASE_SHA" ]; then
        echo "error: $OUT was built on another base model than $BASE (its files changed since, e.g. a new bundled" \
             "model); use another OUT, or delete $OUT to start again" >&2
        exit 1
    fi
# (the loop's status is 0 when a stage folder exists: its break; 1 when none: its last compgen)
elif for p in decoder model 'lora*' 'embedding*' 'eval*'; do compgen -G "$OUT/$p" >/dev/null && break; done; then
    echo "error: $OUT holds stages from before base models were recorded, so which model they were built on is" \
         "unknown; use another OUT, or delete all but $OUT/data to start again" >&2
    exit 1
else
    echo "$BASE_SHA" > "$OUT/base_model.sha256.tmp" && mv "$OUT/base_model.sha256.tmp" "$OUT/base_model.sha256"
fi

# Seed 1: none of these scenes is one the evaluation draws (its prompts come from other seed streams).
stage data "$OUT/data/metadata.jsonl" \
    python -m ldm_app.data.shapes --out "$OUT/data" --num_images 4000 --resolution 64 --seed 1 \
    --two_object_fraction 0.25 "${EXTRA[@]}"

# The decoder alone (the bundled autoencoder's PatchGAN settings, as recipes/shapes.sh sharpened it): 12,000
# images (750 steps x 8 x 2 processes), about 4 minutes.
assemble_model() {  # OUT/model: the bundled model with the fine-tuned decoder, sampling as measured (SAMPLING)
    rm -rf "$OUT/model.tmp" && cp -r "$BASE" "$OUT/model.tmp" && rm -rf "$OUT/model.tmp/vae"
    cp -r "$OUT/decoder/vae" "$OUT/model.tmp/vae"
    python - "$OUT/model.tmp" "$GUIDANCE" "$SAMPLE_STEPS" <<'PY'
import sys
from ldm_app.pipeline import read_sampling_defaults, write_sampling_defaults
folder, guidance, steps = sys.argv[1:4]  # empty: keep the base's
defaults = read_sampling_defaults(folder)
if guidance:
    defaults["guidance_scale"] = float(guidance)
if steps and int(steps) != defaults.get("num_inference_steps"):  # the stored grid holds for the stored steps only
    defaults = {k: v for k, v in defaults.items() if k != "timesteps"} | {"num_inference_steps": int(steps)}
write_sampling_defaults(folder, defaults)
PY
    mv "$OUT/model.tmp" "$OUT/model"
}
VAE_ARGS=()
if [ "$DECODER_STEPS" -gt 0 ]; then
    stage decoder "$OUT/decoder/vae/config.json" \
        launch train_vae.py --config configs/vae/shapes64.yaml --train_data_dir "$OUT/data" --output_dir "$OUT/decoder" \
        --pretrained_vae "$BASE/vae" --set train_decoder_only=true --set train.learning_rate=5e-4 \
        --set train.max_train_steps="$DECODER_STEPS" --set loss.disc_start=0 --seed "$SEED" \
        --resume_from_checkpoint latest
    VAE_ARGS=(--vae "$OUT/decoder/vae")
    stage assemble "$OUT/model/model_index.json" assemble_model
fi

COMMON=(--pretrained_model "$BASE" --train_data_dir "$OUT/data" --seed "$SEED" --max_train_steps "$STEPS"
    --train_batch_size 32 --cache_latents --checkpointing_steps 200 --checkpoints_total_limit 2
    --validation_steps 100000 --set train.lr_scheduler=constant_with_warmup --set train.lr_warmup_steps=50
    --set ldm.ema_decay=0.99 --resume_from_checkpoint latest)
if [ "$ADAPTER" != embedding ]; then
    EVAL=eval TE=()
    if [ "$ADAPTER" = lora_te ]; then EVAL=eval_lora_te TE=(--lora_text_encoder); fi
    stage "$ADAPTER" "$OUT/$ADAPTER/pytorch_lora_weights.safetensors" \
        launch train_ldm.py "${COMMON[@]}" --lora_rank 16 "${TE[@]}" --learning_rate 1e-3 --output_dir "$OUT/$ADAPTER"
    stage "$EVAL" "$OUT/$EVAL/new_concept.json" \
        python -m ldm_app.evaluation.new_concept --model "$BASE" --lora "$OUT/$ADAPTER" "${VAE_ARGS[@]}" \
        --concept "$CONCEPT" "${SAMPLING[@]}" --out "$OUT/$EVAL"
else
    # The concept's own word is the token (neither word is one token of the bundled model's pruned tokenizer, so
    # the prompts read as the LoRA's do); its vector starts from INIT (above).
    NUM_VECTORS=${NUM_VECTORS:-1} EMBEDDING_LR=${EMBEDDING_LR:-5e-3}
    EMB=embedding
    if [ "$NUM_VECTORS" != 1 ] || [ "$EMBEDDING_LR" != 5e-3 ]; then EMB=embedding_${NUM_VECTORS}v_$EMBEDDING_LR; fi
    if [ -n "${INIT_TOKEN:-}" ]; then INIT=$INIT_TOKEN EMB=${EMB}_from_$INIT_TOKEN; fi
    stage "$EMB" "$OUT/$EMB/learned_embeds.safetensors" \
        launch train_ldm.py "${COMMON[@]}" --train_embedding "$CONCEPT" --initializer_token "$INIT" \
        --num_vectors "$NUM_VECTORS" --learning_rate "$EMBEDDING_LR" --output_dir "$OUT/$EMB"
    stage "eval_$EMB" "$OUT/eval_$EMB/new_concept.json" \
        python -m ldm_app.evaluation.new_concept --model "$BASE" --embedding "$OUT/$EMB" "${VAE_ARGS[@]}" \
        --concept "$CONCEPT" "${SAMPLING[@]}" --out "$OUT/eval_$EMB"
fi

cat "$TIMES"
