#!/usr/bin/env bash
# Train every (width, seed) of a sweep with the plain `lmcx train`, several processes at a time.
#
#   scripts/sweep.sh CONFIG OUT "WIDTHS" "SEEDS" [PARALLEL_JOBS]
#   scripts/sweep.sh configs/mnist_mlp.yaml outputs/sweep "1 2 4 8" "0 1 2" 2
#
# Safe to start twice on the same OUT (say on two machines sharing a disk) or to re-run after a crash:
# each run directory is claimed with a lock, finished runs are skipped, interrupted ones resume; a run
# another process is training (`lmcx train` exits 3) is left to it.
# Extra `lmcx train` flags go in LMCX_TRAIN_ARGS, e.g. LMCX_TRAIN_ARGS="--data-root /tmp/lmcx-data".
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,11p' "$0" >&2
  exit 2
fi
config=$1 out=$2 widths=$3 seeds=$4 jobs=${5:-2}
lmcx=${LMCX:-lmcx}
# One share of the cores per job: more threads than cores makes every job many times slower.
cores=$(nproc 2>/dev/null || echo 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / jobs > 0 ? cores / jobs : 1 ))}
for w in $widths; do for s in $seeds; do printf '%s %s\n' "$w" "$s"; done; done |
  xargs -P "$jobs" -L 1 sh -c \
    '"$0" train -c "$1" --out "$2/w$4-s$5" --width "$4" --seed "$5" $3; rc=$?; [ $rc -eq 3 ] && rc=0; exit $rc' \
    "$lmcx" "$config" "$out" "${LMCX_TRAIN_ARGS:-}"
