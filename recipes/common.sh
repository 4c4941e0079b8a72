# Shared by the recipes (source it after setting OUT and NPROC): one thread per process, no hub, and two helpers.
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1   # one thread per process: 2 processes x 1 thread beat 1 x 2 on 2 cores
mkdir -p "$OUT"
TIMES="$OUT/recipe_times.txt"

launch() {  # a training script on NPROC processes (DDP over gloo on the CPU)
    if [ "$NPROC" -gt 1 ]; then torchrun --standalone --nproc_per_node "$NPROC" "$@"; else python "$@"; fi
}
stage() {  # stage NAME DONE_FILE COMMAND...: run COMMAND unless DONE_FILE exists; log its wall time
    local name=$1 done=$2; shift 2
    if [ -e "$done" ]; then echo "== $name: done already ($done)"; return; fi
    echo "== $name"
    local t0=$SECONDS
    "$@"
    echo "$name $((SECONDS - t0)) s" | tee -a "$TIMES"
}
