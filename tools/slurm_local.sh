#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for testing the sbatch scripts in slurm/.
#
#   tools/slurm_local.sh install   # apt-get slurm-wlm + munge (Debian/Ubuntu; idempotent)
#   tools/slurm_local.sh start     # munged, slurmctld, slurmd -N node1, slurmd -N node2
#   tools/slurm_local.sh env       # prints `export SLURM_CONF=...` for sbatch/squeue/scontrol
#   tools/slurm_local.sh stop      # stops what `start` started
#
# Needs root (slurmd starts jobs as the submitting user) and no systemd: every daemon is started
# by hand. Debian's Slurm (22.05) is built with multiple-slurmd support, so two `slurmd -N nodeX`
# on one host are two real nodes: `srun` starts one task on each and the c10d rendezvous between
# them goes over TCP as it would between machines. The node names are added to /etc/hosts
# (127.0.0.1): the sbatch scripts rendezvous on `scontrol show hostnames | head -n1`, and that
# name must resolve. Settings that work without systemd or cgroups: proctrack/linuxproc (tracks
# a step's processes by parent pid), task/none, no accounting.
#
# Overrides: SLURM_LOCAL_DIR (state, logs, config; default /tmp/megatron-simpo-slurm),
# SLURM_LOCAL_CPUS (CPUs declared per node; default: this machine's count — both nodes share
# the cores, which is fine for tiny CPU models), SLURM_LOCAL_PORT (slurmctld port; the nodes use
# the next two).
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/megatron-simpo-slurm}
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}
PORT=${SLURM_LOCAL_PORT:-6817}
NODES=(node1 node2)
CONF="$DIR/slurm.conf"

die() { echo "slurm_local.sh: $*" >&2; exit 1; }

install() {
    if command -v sbatch >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    command -v apt-get >/dev/null || die "needs slurm-wlm and munge; install them (no apt-get here)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
}

write_conf() {
    mkdir -p "$DIR/state" "$DIR/log"
    local n i=1
    cat >"$CONF" <<EOF
# Written by tools/slurm_local.sh: two nodes (two slurmd) on one host.
ClusterName=local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SchedulerParameters=sched_interval=2
MessageTimeout=20
# SIGTERM-to-SIGKILL grace (default 30 s): short, so a requeued test job restarts quickly.
KillWait=10
MinJobAge=600
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
    for n in "${NODES[@]}"; do
        echo "NodeName=$n NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=$((PORT + i))" \
            "CPUs=$CPUS RealMemory=1000 State=UNKNOWN" >>"$CONF"
        i=$((i + 1))
    done
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0  # a munged is already serving
    fi
    [[ -s /etc/munge/munge.key ]] || { /usr/sbin/mungekey --create 2>/dev/null \
        || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; }
    chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
    touch "$DIR/started-munged"
}

start() {
    [[ $(id -u) == 0 ]] || die "start needs root"
    command -v slurmctld >/dev/null || die "slurm-wlm is not installed: run '$0 install'"
    write_conf
    grep -qE "^127\.0\.0\.1[[:space:]].*\b${NODES[0]}\b" /etc/hosts \
        || echo "127.0.0.1 ${NODES[*]}" >>/etc/hosts
    start_munge
    /usr/sbin/slurmctld -f "$CONF"
    for n in "${NODES[@]}"; do
        mkdir -p "$DIR/spool-$n"
        /usr/sbin/slurmd -f "$CONF" -N "$n"
    done
    export SLURM_CONF="$CONF"
    local i
    for i in $(seq 60); do
        if [[ $(sinfo -h -o '%D %t' 2>/dev/null) == "${#NODES[@]} idle" ]]; then
            echo "slurm_local.sh: ${#NODES[@]} nodes idle; export SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.5
    done
    sinfo -N -l >&2 || true
    die "nodes did not come up; logs in $DIR/log"
}

stop_pidfile() {
    local f=$1 pid
    [[ -s $f ]] || return 0
    pid=$(<"$f")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
}

stop() {
    local n
    # The Slurm daemons shut down in parallel (each takes seconds); munge after them.
    for n in "${NODES[@]}"; do stop_pidfile "$DIR/slurmd-$n.pid" & done
    stop_pidfile "$DIR/slurmctld.pid" &
    wait
    if [[ -e $DIR/started-munged ]]; then
        stop_pidfile /run/munge/munged.pid
        rm -f "$DIR/started-munged"
    fi
    rm -rf "$DIR/state" "$DIR"/spool-*
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) die "usage: $0 install|start|stop|env" ;;
esac
