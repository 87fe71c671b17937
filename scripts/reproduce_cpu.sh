#!/usr/bin/env bash
# Regenerate every number and plot of docs/RESULTS.md from scratch on CPU (2 cores: see docs/RESULTS.md
# for the measured time). Finished steps are skipped, so an interrupted reproduction continues where it
# stopped; delete outputs/cpu to start over.
#
#   scripts/reproduce_cpu.sh [DATA_ROOT]      (default /tmp/lmcx-data; the offline copies are written there)
set -euo pipefail
cd "$(dirname "$0")/.."
data_root=${1:-/tmp/lmcx-data}
lmcx=${LMCX:-lmcx}
python3 ../shared/data/materialize.py "$data_root"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # two experiments at a time, one core each

run() { "$lmcx" run "configs/cpu/$1.yaml" --data-root "$data_root" --out "outputs/cpu/$1" --device cpu; }
# Two lanes, one core each (estimated from one measured epoch per width: about 75 and 65 minutes)
(run mlp_mnist_strong_wd && run resnet20_cifar10) & lane1=$!
(run mlp_mnist_weak_wd && run mlp_mnist_no_wd) & lane2=$!
wait "$lane1"; wait "$lane2"

# The reports and their plots, copied next to docs/RESULTS.md which quotes them.
for name in mlp_mnist_strong_wd mlp_mnist_weak_wd mlp_mnist_no_wd resnet20_cifar10; do
  mkdir -p "docs/results/$name"
  cp "outputs/cpu/$name/report.md" "outputs/cpu/$name/summary.csv" "docs/results/$name/"
  cp -r "outputs/cpu/$name/plots" "docs/results/$name/"
  [ -f "outputs/cpu/$name/three_models.csv" ] && cp "outputs/cpu/$name/three_models.csv" "docs/results/$name/"
done
echo "reports copied to docs/results/"
