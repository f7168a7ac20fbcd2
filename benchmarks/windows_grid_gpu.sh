#!/usr/bin/env bash
# The window x length x ratio grid on one GPU, one process per (window, length) side by side: a 135M model at batch 1
# leaves most of a GPU idle, so the processes share it (how much faster than one process this is has not been timed).
#
#   bash benchmarks/windows_grid_gpu.sh OUTDIR SECONDS [WINDOW...]     (WINDOW as SINK/RECENT/BLOCK; default all)
#
# LENGTHS (environment, default "8192 4096 2048") picks the context lengths.
#
# Each process writes OUTDIR/<sink>-<recent>_<length>/eval_w<sink>-<recent>.* and a log beside it. A run cut short
# at SECONDS keeps its finished samples (.partial.jsonl); the same command resumes it. Join the lengths afterwards
# with `python -m leank_ref evaluate --windows-grid --window W --merge-from DIR --out results` (one DIR per length).
set -uo pipefail
out=$1
seconds=$2
shift 2
windows=("${@:-16/64/32 64/256/64 128/768/128}")
read -r -a windows <<<"${windows[*]}"
mkdir -p "$out"
python -c "from leank_ref.models import load_model; load_model()" >"$out/warm_cache.log" 2>&1  # one cache writer
pids=()
for window in "${windows[@]}"; do
    IFS=/ read -r sink recent _ <<<"$window"
    for length in ${LENGTHS:-8192 4096 2048}; do
        dir="$out/$sink-${recent}_$length"
        mkdir -p "$dir"
        OMP_NUM_THREADS=2 timeout "$seconds" python -m leank_ref evaluate --windows-grid --window "$window" \
            --lengths "$length" --device cuda --out "$dir" >"$dir/run.log" 2>&1 &
        pids+=($!)
    done
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
