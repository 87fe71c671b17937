#!/usr/bin/env bash
# Regenerate every number and plot of docs/RESULTS.md from scratch on CPU (2 cores: 2 h 05 min measured
# on shared cores, see docs/RESULTS.md). Finished steps are skipped, so an interrupted reproduction continues where it
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
# Two lanes, one core each (measured: strong weight decay 1 h 39 min, then ResNet-20 44 min; weak and no
# weight decay about 57 min each)
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
"$(dirname "$(command -v "$lmcx")")/python" scripts/results_tables.py outputs/cpu > docs/results/tables.md
echo "reports copied to docs/results/, tables side by side in docs/results/tables.md"
