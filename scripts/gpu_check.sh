#!/usr/bin/env bash
# Every CUDA path of lmcx in one run of at most 8 minutes on one GPU, printing its figures:
#   1. ResNet-20 on CIFAR-10 (bf16 autocast + channels_last): seed 0 with torch.compile, seed 1 eager,
#      GPU_CHECK_EPOCHS epochs each (default 3), seconds per epoch and img/s;
#   2. weight matching of ResNet-20 x16 (random init) on the GPU (scripts/bench_match.py);
#   3. `lmcx match` (wm) of the two trained models, a 25-point interpolation with BN reset, calibration.
#
#   scripts/gpu_check.sh                         # on a machine with a GPU
#   GPU_CHECK_DEVICE=cpu scripts/gpu_check.sh    # the same steps, tiny, on CPU (checks the script itself)
#
# Data: CIFAR-10 from shared/data (./shared/data, ../shared/data or $LMCX_SHARED_DATA) materialised into a
# temporary folder; without it, synthetic CIFAR-shaped data (3x32x32, 10 classes: img/s are real,
# accuracies are not). Without CUDA (and without GPU_CHECK_DEVICE=cpu) it says so and exits 0 having run
# nothing. Python: $PYTHON, else .venv/bin/python, else python3. Every step has its own time limit, 8
# minutes in all; everything goes to a temporary folder removed at the end (GPU_CHECK_KEEP=1 keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
EPOCHS=${GPU_CHECK_EPOCHS:-3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" LMCX_PROGRESS_INTERVAL=${LMCX_PROGRESS_INTERVAL:-15}

if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: skipped: no CUDA device here (torch.cuda.is_available() is False, or $PY lacks torch)."
    echo "gpu_check: run it on a machine with a GPU; GPU_CHECK_DEVICE=cpu runs the same steps, tiny, on CPU."
    exit 0
fi

WORK=$(mktemp -d /tmp/lmcx-gpu-check.XXXXXX)
if [ "${GPU_CHECK_KEEP:-0}" = 1 ]; then echo "gpu_check: keeping $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
export LMCX_CACHE_DIR="$WORK/cache"
START=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - START )) s in)"; }
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

"$PY" - "$DEVICE" <<'PYEOF'
import sys, torch
d = sys.argv[1]
print(f"torch {torch.__version__}, device {d}" + (f": {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}, "
      f"bf16 {torch.cuda.is_bf16_supported()}" if d == "cuda" else ""))
PYEOF

# --- data: DATA for training; ROOT (data root only) for the steps that read A's dataset -----------------
SHARED=""
for d in "${LMCX_SHARED_DATA:-}" shared/data ../shared/data; do
    if [ -n "$d" ] && [ -f "$d/cifar10-jpeg.tar.xz" ]; then SHARED=$d; break; fi
done
ROOT=(); EXTRA=(); COMPILE=true; WM_WIDTH=16; POINTS=25
if [ "$DEVICE" = cpu ]; then  # tiny, to check the steps, not to measure
    DATA=(--set data.name=synthetic --set 'data.synthetic={train_size: 1200, test_size: 100, num_classes: 10, shape: [3, 32, 32]}'
          --set data.calib_size=200 --set train.batch_size=100)
    EXTRA=(--set train_eval_size=100 --set norm_fix_batches=1 --set norm_fix_batch_size=100)
    EPOCHS=1; WM_WIDTH=2; COMPILE=false; POINTS=5
elif [ -n "$SHARED" ]; then
    step "materialising CIFAR-10 from $SHARED"
    "$PY" "$SHARED/materialize.py" "$WORK/data" >/dev/null
    DATA=(--data-root "$WORK/data"); ROOT=(--data-root "$WORK/data")
else
    echo "gpu_check: no shared/data: synthetic CIFAR-shaped data (img/s are real, accuracies are not)"
    DATA=(--set data.name=synthetic --set 'data.synthetic={train_size: 50000, test_size: 10000, num_classes: 10, shape: [3, 32, 32]}')
fi

# --- 1. training -----------------------------------------------------------------------------------------
train() {  # seed, compile
    timeout 240 "$PY" -m lmcx train -c configs/cifar10_resnet20.yaml --device "$DEVICE" "${DATA[@]}" --seed "$1" \
        --epochs "$EPOCHS" --set train.warmup_epochs=1 --set train.compile="$2" --set train.precision=auto \
        --out "$WORK/s$1" --force
    "$PY" - "$WORK/s$1" "$2" <<'PYEOF'
import csv, json, sys
run, compiled = sys.argv[1], sys.argv[2]
rows = list(csv.DictReader(open(f"{run}/history.csv")))
meta = json.load(open(f"{run}/meta.json"))
m = meta["metrics"]
later = [float(r["seconds"]) for r in rows[1:]] or [float(rows[0]["seconds"])]
print(f"  compile={compiled}: " + ", ".join(f"epoch {r['epoch']} {float(r['seconds']):.1f} s" for r in rows)
      + f" ({sum(later) / len(later):.2f} s per epoch after the first, evaluation included); training img/s over "
      f"the run {m['train_images_per_second']:,.0f} (first epoch and compilation included); test accuracy "
      f"{m['test_accuracy']:.4f}; device {meta['device']}; torch threads {meta.get('threads', {}).get('torch_threads')}")
PYEOF
}
step "1. ResNet-20 training, bf16 + channels_last, compile=$COMPILE, $EPOCHS epoch(s)"
train 0 "$COMPILE"
step "1b. the same, eager"
train 1 false

# --- 2. weight matching on the GPU -----------------------------------------------------------------------
step "2. weight matching, ResNet-20 x$WM_WIDTH, random init, on $DEVICE"
timeout 120 "$PY" scripts/bench_match.py --device "$DEVICE" --arch resnet20 --widths "$WM_WIDTH" --threads 1

# --- 3. match, 25-point interpolation with BN reset, calibration --------------------------------------------
step "3. lmcx match (wm) of the trained pair"
t0=$(date +%s%N)
timeout 120 "$PY" -m lmcx match --method wm --a "$WORK/s0" --b "$WORK/s1" --device "$DEVICE" --out "$WORK/match" --force
echo "  match: $(ms "$t0") ms (process start-up included)"
step "3b. lmcx interpolate: $POINTS points, BN reset, naive and wm"
t0=$(date +%s%N)
timeout 150 "$PY" -m lmcx interpolate --a "$WORK/s0" --b "$WORK/s1" --b "$WORK/s1" --perm none \
    --perm "$WORK/match/permutation.json" --label naive --label wm --points "$POINTS" --norm-fix reset --device "$DEVICE" \
    ${ROOT[@]+"${ROOT[@]}"} ${EXTRA[@]+"${EXTRA[@]}"} --out "$WORK/interp" --force
echo "  interpolate: $(ms "$t0") ms (process start-up included)"
step "3c. lmcx calibrate"
t0=$(date +%s%N)
timeout 90 "$PY" -m lmcx calibrate "$WORK/interp" --device "$DEVICE" ${ROOT[@]+"${ROOT[@]}"}
echo "  calibrate: $(ms "$t0") ms (process start-up included)"
"$PY" - "$WORK/interp" <<'PYEOF'
import json, sys
b = json.load(open(f"{sys.argv[1]}/barrier.json"))
print(f"  device {b.get('device')}, norm fix {b.get('norm_fix')}, {len(b.get('grid', []))} points; timing {b.get('timing')}")
for label, splits in b["results"].items():
    raw, cal = splits["test"]["raw"], splits["test"].get("calibrated") or {}
    print(f"  {label}: test loss barrier raw {raw['loss_barrier']:.4f}, calibrated {cal.get('loss_barrier', float('nan')):.4f}; "
          f"accuracy barrier {raw['accuracy_barrier']:.4f}")
PYEOF

step "done: every step ran on $DEVICE"
