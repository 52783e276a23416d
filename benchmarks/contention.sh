#!/usr/bin/env bash
# The CPU path under contention, in one command: the cross-entropy, Perplexity and linear
# cross-entropy benchmarks quiet and with 2 busy-looping processes (lossplug ÷ anchor ratios,
# worst and median of several rounds), then the main job (examples/finetune.py) timed with 2
# busy processes; one summary table at the end.
#
# Usage: benchmarks/contention.sh [BUSY] [ROUNDS]      (defaults: 2 busy processes, 3 rounds)
set -euo pipefail
cd "$(dirname "$0")/.."
BUSY=${1:-2}
ROUNDS=${2:-3}
PY=${PYTHON:-python}
OUT=$(mktemp -d)
BUSY_PIDS=()

stop_busy() {
    for pid in "${BUSY_PIDS[@]:-}"; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done
    BUSY_PIDS=()
}
trap 'stop_busy; rm -rf "$OUT"' EXIT
trap 'exit 130' INT TERM

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'), git $(git rev-parse --short HEAD)"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"

"$PY" benchmarks/cross_entropy.py --busy "$BUSY" --rounds "$ROUNDS" \
    --only "eval 4x512x32000 fp32" --only "train 4x512x32000 fp32" | tee "$OUT/ce.txt"
# peak memory beside torch.compile(F.cross_entropy) (memory does not depend on load)
"$PY" benchmarks/cross_entropy.py --only "train 4x512x32000 fp32" --max-background 100 \
    | tee "$OUT/ce_memory.txt"
"$PY" benchmarks/metrics.py --busy "$BUSY" --rounds "$ROUNDS" --only "4x512x32000 fp32" \
    | tee "$OUT/metrics.txt"
"$PY" benchmarks/linear_cross_entropy.py --busy "$BUSY" --rounds "$ROUNDS" --only main \
    | tee "$OUT/lce.txt"

# the main job with BUSY busy-looping processes beside it
for _ in $(seq "$BUSY"); do
    "$PY" -c "while True: pass" &
    BUSY_PIDS+=($!)
done
load_job=$(cut -d' ' -f1 /proc/loadavg)
start=$(date +%s.%N)
job_rc=0
"$PY" examples/finetune.py > "$OUT/finetune.txt" 2>&1 || job_rc=$?
job_s=$(echo "$(date +%s.%N) - $start" | bc)
stop_busy

echo
echo "## Summary (busy = $BUSY busy-looping processes, $ROUNDS rounds; ratio = lossplug ÷ anchor)"
echo
echo "| benchmark | group | pair | busy procs | median ms (ours / anchor) | worst ratio | median ratio | load (1 min) per round |"
echo "|---|---|---|---|---|---|---|---|"
for name in ce metrics lce; do
    # the body rows of the contention table, prefixed with the benchmark's name
    awk '/^### Contention/ {on = 1; next} on && /^\|/ && !/^\| group/ && !/^\|---/' \
        "$OUT/$name.txt" | sed "s/^|/| $name |/"
done
echo
echo "peak extra memory, train 4x512x32000 fp32 (MiB):"
grep -E '^\| 4x512x32000 \| fp32 \| +(lossplug|  F.cross_entropy|  torch.compile)' "$OUT/ce_memory.txt" \
    | awk -F'|' '{gsub(/^ +| +$/, "", $4); gsub(/^ +| +$/, "", $6); print "  " $4 ": " $6}'
echo
printf 'main job (examples/finetune.py) with %s busy processes: %.1f s, exit %s, load at start %s\n' \
    "$BUSY" "$job_s" "$job_rc" "$load_job"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
