#!/usr/bin/env bash
# Run a command against a throwaway single-node SLURM cluster on this machine.
#
#   tests/slurm/with_slurm.sh CMD [ARGS...]
#
# Installs Debian's slurm-wlm and munge when absent (needs root and apt), writes a
# slurm.conf for this host (one node, 2 CPUs, one partition "simgen", no default
# partition) into a temporary folder, starts munged, slurmctld and slurmd from it (no
# systemd), runs CMD with SLURM_CONF and SIMGEN_SLURM_PARTITION exported, then cancels
# every job and stops the daemons on exit, also when CMD fails or is interrupted.
# Only loopback traffic. Exit status: CMD's, or non-zero when the cluster did not come up.
set -euo pipefail

PARTITION=simgen
NODE_CPUS=2
NODE_MEM_MB=4096

log() { echo "with_slurm: $*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $# -ge 1 ]] || die "usage: $0 CMD [ARGS...]"
[[ $(id -u) -eq 0 ]] || die "needs root (installs packages, runs slurmd as root)"

install_slurm() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null && return 0
    log "installing slurm-wlm and munge from Debian (once) ..."
    local policy=/usr/sbin/policy-rc.d created=0
    if [[ ! -e $policy ]]; then  # keep the packages' scripts from starting daemons
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created=1
    fi
    local rc=0
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends slurm-wlm munge; } >/tmp/with_slurm-apt.log 2>&1 || rc=$?
    [[ $created -eq 1 ]] && rm -f "$policy"
    [[ $rc -eq 0 ]] || { tail -5 /tmp/with_slurm-apt.log >&2; die "apt-get install failed"; }
}

for name in slurmctld slurmd; do
    if pgrep -x "$name" >/dev/null; then
        die "a $name is already running here; stop it first (this script runs its own)"
    fi
done

install_slurm

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

HOST=$(hostname -s)
WORK=$(mktemp -d /tmp/simgen-slurm.XXXXXX)
chmod 700 "$WORK"
mkdir -p "$WORK/state" "$WORK/spool" "$WORK/munge"
chmod 700 "$WORK/munge"
CTLD_PORT=$(free_port)
SLURMD_PORT=$(free_port)
STEPD_BEFORE=$(pgrep -x slurmstepd || true)
PIDS=()
CMD_PID=""

cleanup() {
    local rc=$?
    set +e
    if [[ -n $CMD_PID ]] && kill -0 "$CMD_PID" 2>/dev/null; then
        kill -TERM -- "-$CMD_PID" 2>/dev/null
        for _ in $(seq 20); do kill -0 "$CMD_PID" 2>/dev/null || break; sleep 0.5; done
        kill -KILL -- "-$CMD_PID" 2>/dev/null
    fi
    if [[ -f $WORK/slurm.conf ]] && command -v scancel >/dev/null; then
        export SLURM_CONF=$WORK/slurm.conf
        if [[ -n $(squeue -h -o %i 2>/dev/null) ]]; then
            scancel --quiet $(squeue -h -o %i 2>/dev/null) 2>/dev/null
            for _ in $(seq 30); do  # let slurmd end the jobs' steps
                [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
                sleep 1
            done
        fi
    fi
    for ((k = ${#PIDS[@]} - 1; k >= 0; k--)); do  # slurmd, slurmctld, then munged
        kill -TERM "${PIDS[k]}" 2>/dev/null
    done
    for _ in $(seq 20); do
        local alive=0
        for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [[ $alive -eq 0 ]] && break
        sleep 0.5
    done
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
    # job steps our slurmd started and that outlived it
    for p in $(pgrep -x slurmstepd); do
        grep -qx "$p" <<<"$STEPD_BEFORE" || kill -KILL "$p" 2>/dev/null
    done
    wait 2>/dev/null
    if [[ $rc -ne 0 ]]; then
        for f in slurmctld.log slurmd.log munged.log; do
            [[ -s $WORK/$f ]] && { log "--- tail of $f"; tail -n 15 "$WORK/$f" >&2; }
        done
    fi
    rm -rf "$WORK"
    log "slurm stopped (exit $rc)"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# -- munge: own key, socket and logs in $WORK ------------------------------------------
dd if=/dev/urandom of="$WORK/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$WORK/munge/munge.key"
SOCKET=$WORK/munge/munge.socket
munged --force --foreground --key-file="$WORK/munge/munge.key" --socket="$SOCKET" \
    --pid-file="$WORK/munge/munged.pid" --log-file="$WORK/munged.log" \
    --seed-file="$WORK/munge/munged.seed" >/dev/null 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do [[ -S $SOCKET ]] && break; sleep 0.1; done
[[ -S $SOCKET ]] || die "munged did not start"

# -- slurm.conf for this host: one node, one partition, no default partition -----------
cat >"$WORK/slurm.conf" <<CONF
ClusterName=simgen-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$WORK/jobcomp.txt
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/slurmctld.log
SlurmdLogFile=$WORK/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=$HOST NodeAddr=127.0.0.1 NodeHostname=$HOST CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=NO MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$WORK/slurm.conf

slurmctld -D -i -f "$SLURM_CONF" >/dev/null 2>&1 &
PIDS+=($!)
slurmd -D -f "$SLURM_CONF" -N "$HOST" >/dev/null 2>&1 &
PIDS+=($!)

state=""
for _ in $(seq 60); do
    state=$(sinfo -h -N -p "$PARTITION" -o %T 2>/dev/null || true)
    [[ $state == idle ]] && break
    sleep 1
done
[[ $state == idle ]] || die "node $HOST did not become idle (state: ${state:-no answer})"
log "slurm up: node $HOST ($NODE_CPUS CPUs), partition $PARTITION, SLURM_CONF=$SLURM_CONF"

export SIMGEN_SLURM_PARTITION=$PARTITION
# CMD in its own process group, waited for: a TERM/INT to this script (a CI timeout, make
# interrupted) runs cleanup at once, which ends CMD's whole group before stopping slurm
set -m
"$@" &
CMD_PID=$!
set +m
set +e
wait "$CMD_PID"
rc=$?
CMD_PID=""
set -e
exit "$rc"
