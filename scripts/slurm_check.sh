#!/usr/bin/env bash
# A real single-node SLURM on this machine, then an experiment through it (lmcx.slurm), compared with a
# local run of the same experiment. Needs root and Debian/Ubuntu apt; daemons are started directly (no
# systemd). Usage, from the repository root:
#
#   scripts/slurm_check.sh [CONFIG]          (default configs/quickstart.yaml)
#
# Environment: PYTHON (default python3; the one with lmcx and submitit), WORK (default
# /tmp/lmcx-slurm-check: local/ and cluster/ runs), LOCAL (an existing local run of CONFIG to compare
# with; `lmcx run` skips its finished steps), TOL (relative tolerance of the comparison, default 1e-6).
# Prints PASS and exits 0 when every figure of cluster/summary.csv equals local/summary.csv within TOL.
set -euo pipefail

CONFIG=${1:-configs/quickstart.yaml}
PYTHON=${PYTHON:-python3}
WORK=${WORK:-/tmp/lmcx-slurm-check}
LOCAL=${LOCAL:-$WORK/local}
TOL=${TOL:-1e-6}
HOST=$(hostname -s)
say() { echo "== $*"; }

[ "$(id -u)" = 0 ] || { echo "error: run as root (installs and starts slurm and munge)"; exit 2; }
"$PYTHON" -c "import lmcx, submitit" || { echo "error: $PYTHON lacks lmcx or submitit: pip install -e '.[slurm]'"; exit 2; }

say "1. packages"
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi
dpkg-query -W -f '${Package} ${Version}\n' slurm-wlm slurmctld slurmd munge

say "2. munge"
[ -s /etc/munge/munge.key ] || { mungekey --create --keyfile /etc/munge/munge.key; chown munge: /etc/munge/munge.key; }
mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge: /run/munge /var/log/munge /var/lib/munge
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
munge -n | unmunge | grep STATUS

say "3. slurm.conf: $HOST is controller and only node"
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<EOF
ClusterName=lmcx-check
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
$(slurmd -C | head -1) State=UNKNOWN
PartitionName=check Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
grep -E '^(NodeName|PartitionName)' /etc/slurm/slurm.conf

say "4. daemons"
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do
    state=$(sinfo -h -N -n "$HOST" -o %t 2>/dev/null || true)
    [ "$state" = idle ] && break
    case "$state" in down*|drain*) scontrol update nodename="$HOST" state=resume || true ;; esac
    sleep 1
done
sinfo
[ "$state" = idle ] || { echo "error: node $HOST is '$state', not idle; see /var/log/slurm/"; exit 1; }

say "5. local run: $LOCAL"
"$PYTHON" -m lmcx run "$CONFIG" --out "$LOCAL" 2>&1 | tail -2

say "6. the same experiment through SLURM: $WORK/cluster"
rm -rf "$WORK/cluster"
submit() {
    "$PYTHON" -m lmcx run "$CONFIG" --out "$WORK/cluster" --launcher slurm --set slurm.partition=check 2>&1 \
        | tee "$WORK/submitted.txt"
}
# Waits on squeue rather than `--wait`: without slurmdbd there is no sacct, and submitit, polling it,
# prints a warning each time (it still finds the result: `lmcx run --launcher slurm --wait` works).
# Only the jobs just submitted (the id column lmcx printed) are waited for.
drain() {
    local ids
    ids=$(awk '/^ +[0-9]+(_[0-9]+)?  / {sub(/_.*/, "", $1); print $1}' "$WORK/submitted.txt" | sort -u | paste -sd,)
    sleep 3
    squeue -j "$ids" -o '%.8i %.20j %.8T %.45E'
    while [ -n "$(squeue -h -j "$ids" -o %i 2>/dev/null)" ]; do sleep 2; done
}
submit
drain
[ -s "$WORK/cluster/report.md" ] || { echo "error: no report; see the logs in $WORK/cluster/slurm/"; exit 1; }
count_steps='import collections, json, sys; s = json.load(open(sys.argv[1])); print("steps.json:", dict(collections.Counter(v["status"] for v in s.values())))'
"$PYTHON" -c "$count_steps" "$WORK/cluster/steps.json"
say "   a re-submission runs only what is missing (here nothing but the report):"
submit
drain
"$PYTHON" -c "$count_steps" "$WORK/cluster/steps.json"

say "7. compare summary.csv"
"$PYTHON" - "$LOCAL/summary.csv" "$WORK/cluster/summary.csv" "$TOL" <<'EOF'
import csv, math, sys
local, slurm = ([row for row in csv.DictReader(open(p))] for p in sys.argv[1:3])
tol = float(sys.argv[3])
assert len(local) == len(slurm) > 0 and list(local[0]) == list(slurm[0]), "different rows or columns"
worst, cells = 0.0, 0
for a, b in zip(local, slurm):
    for key in a:
        if a[key] == b[key]:
            cells += 1
            continue
        x, y = float(a[key]), float(b[key])  # a text cell that differs is a failure (ValueError)
        worst = max(worst, abs(x - y) / max(abs(x), abs(y), 1e-12))
        cells += 1
print(f"{len(local)} rows, {cells} cells, largest relative difference {worst:.3g} (tolerance {tol:g})")
sys.exit(0 if worst <= tol else 1)
EOF
say "PASS: $CONFIG through SLURM matches the local run ($SECONDS s in all)"
