#!/usr/bin/env bash
# make test-slurm: bring up a one-node Slurm cluster on localhost, run kdrun's Slurm
# integration tests (tests/slurm/test_slurm.py) against it, and stop what it started.
#
# Needs root (it may install Debian's slurm-wlm and munge, and runs the daemons as
# root). It refuses to run beside a slurmctld it did not start, and it stops only the
# daemons it started, by their process ids. Its state (config, logs, spool) lives in a
# temporary folder, never in /etc/slurm.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}

say() { echo "test-slurm: $*"; }

if [ "$(id -u)" -ne 0 ]; then
    say "needs root (to install and run slurmctld, slurmd and munged); run it as root"; exit 2
fi
if pgrep -x slurmctld > /dev/null; then
    say "a slurmctld is already running on this machine; refusing to start a second one" \
        "or to touch it (stop it first, or run the tests on a machine without Slurm)"; exit 2
fi
if ! command -v slurmctld > /dev/null || ! command -v slurmd > /dev/null \
        || ! command -v munged > /dev/null; then
    say "installing Debian's slurm-wlm and munge with apt-get, as root"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q > /dev/null
    apt-get install -y -q slurm-wlm munge > /dev/null
fi
say "$(slurmctld -V)"

STATE=$(mktemp -d /tmp/kdrun-slurm.XXXXXX)  # config, logs, spool: kept for a look afterwards
STARTED=()  # process ids of the daemons this script started
stop_started() {
    for pid in "${STARTED[@]}"; do kill "$pid" 2> /dev/null || true; done
    for pid in "${STARTED[@]}"; do wait "$pid" 2> /dev/null || true; done
    [ ${#STARTED[@]} -eq 0 ] || say "stopped the daemons it started (pids ${STARTED[*]})"
}
trap stop_started EXIT

if ! pgrep -x munged > /dev/null; then
    [ -s /etc/munge/munge.key ] || { mungekey --create 2> /dev/null || \
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2> /dev/null; }
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    runuser -u munge -- munged --foreground > "$STATE/munged.out" 2>&1 &
    STARTED+=($!)
fi

NODE=$(slurmd -C | head -1)  # NodeName=<host> CPUs=... RealMemory=...
HOST=$(hostname -s)
mkdir -p "$STATE/state" "$STATE/spool"
cat > "$STATE/slurm.conf" <<EOF
ClusterName=kdrun-test
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
$NODE State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$STATE/slurm.conf
slurmctld -D -i -f "$SLURM_CONF" > "$STATE/slurmctld.out" 2>&1 &
STARTED+=($!)
slurmd -D -f "$SLURM_CONF" > "$STATE/slurmd.out" 2>&1 &
STARTED+=($!)
for _ in $(seq 60); do
    sinfo -h -o %t 2> /dev/null | grep -qx idle && break
    sleep 1
done
sinfo -h -o %t | grep -qx idle || { say "the node did not come up"; tail "$STATE"/*.out; exit 1; }
say "one-node cluster up: $(sinfo -h -o '%P %D %c %t')"

start=$(date +%s)
KDRUN_TEST_SLURM=1 "$PYTHON" -m pytest -q -s -p no:cacheprovider tests/slurm "$@"
say "tests passed in $(( $(date +%s) - start )) s"
