#!/usr/bin/env bash
# The window x length x ratio grid on one GPU, one process per (window, length) side by side: a 135M model at batch 1
# leaves most of a GPU idle, so the processes share it (how much faster than one process this is has not been timed).
#
#   bash benchmarks/windows_grid_gpu.sh OUTDIR SECONDS [WINDOW...]     (WINDOW as SINK/RECENT/BLOCK; default all)
#
# LENGTHS (environment, e.g. "8192 4096") picks the context lengths. Without WINDOWs or LENGTHS the script reads
# the grid's own (leank_ref.evaluate.windows_grid: WINDOW_SETTINGS, LENGTHS), so the lists live in one place.
#
# Each process writes OUTDIR/<sink>-<recent>_<length>/eval_w<sink>-<recent>.* and a log beside it. A run cut short
# at SECONDS keeps its finished samples (.partial.jsonl); the same command resumes it. Join the lengths afterwards
# with `python -m leank_ref evaluate --windows-grid --window W --merge-from DIR --out results` (one DIR per length).
set -uo pipefail
out=$1
seconds=$2
shift 2
grid() { python -c "from leank_ref.evaluate import windows_grid as g; print(' '.join(map(str, $1)))"; }
if [ $# -gt 0 ]; then windows=("$@"); else read -r -a windows <<<"$(grid "[f'{w.sink}/{w.recent}/{w.block}' for w in g.WINDOW_SETTINGS]")"; fi
read -r -a lengths <<<"${LENGTHS:-$(grid g.LENGTHS)}"
mkdir -p "$out"
python -c "from leank_ref.models import load_model; load_model()" >"$out/warm_cache.log" 2>&1  # one cache writer
pids=()
for window in "${windows[@]}"; do
    IFS=/ read -r sink recent _ <<<"$window"
    for length in "${lengths[@]}"; do
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
