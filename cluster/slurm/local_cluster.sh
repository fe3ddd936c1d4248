#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests and for trying `agescale slurm` scripts.
#
#   cluster/slurm/local_cluster.sh up       install slurm-wlm + munge if missing (Debian, root),
#                                           write a slurm.conf, start munged, slurmctld, slurmd
#   cluster/slurm/local_cluster.sh down     stop them by the process ids they wrote
#   cluster/slurm/local_cluster.sh status   print whether it runs and the SLURM_CONF to export
#
# Everything lives in $AGESCALE_SLURM_DIR (default /tmp/agescale-slurm): config, munge key and
# socket, spool, logs, pid files. Nothing in /etc is changed, so a machine's own SLURM is left
# alone; clients find this cluster through `export SLURM_CONF=$AGESCALE_SLURM_DIR/slurm.conf`.
# ProctrackType=proctrack/linuxproc and TaskPlugin=task/none: no cgroups needed (containers).
set -euo pipefail

DIR=${AGESCALE_SLURM_DIR:-/tmp/agescale-slurm}
CONF=$DIR/slurm.conf
CTLD_PORT=${AGESCALE_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${AGESCALE_SLURMD_PORT:-6818}
SOCKET=$DIR/munge/munge.socket

log() { echo "local_cluster: $*" >&2; }

install_if_missing() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
      && command -v sbatch >/dev/null; then
    return
  fi
  [ "$(id -u)" = 0 ] || { log "slurm-wlm/munge are not installed and this is not root; install them first"; exit 1; }
  log "installing Debian's slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
}

running() {  # every daemon's pid file names a live process
  for d in munged slurmctld slurmd; do
    [ -f "$DIR/run/$d.pid" ] && kill -0 "$(cat "$DIR/run/$d.pid")" 2>/dev/null || return 1
  done
}

write_conf() {
  local host cpus
  host=$(hostname -s)
  cpus=$(nproc)
  cat > "$CONF" <<EOF
# Written by cluster/slurm/local_cluster.sh: one node ($host), $cpus CPUs, no accounting.
ClusterName=agescale-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=60
SchedulerParameters=defer_batch=0
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

up() {
  if running; then log "already running; export SLURM_CONF=$CONF"; return; fi
  install_if_missing
  down quiet
  mkdir -p "$DIR"/{spool/ctld,spool/d,log,run,munge}
  chmod 700 "$DIR/munge"
  if [ ! -s "$DIR/munge/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
  fi
  write_conf
  munged --force --socket="$SOCKET" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/run/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munge.seed"
  export SLURM_CONF=$CONF
  slurmctld -f "$CONF"
  slurmd -f "$CONF"
  for _ in $(seq 60); do
    state=$(sinfo -h -o %T 2>/dev/null | head -n1 || true)
    if [ "$state" = idle ] && running; then
      log "up: node $(hostname -s) idle; export SLURM_CONF=$CONF"
      return
    fi
    sleep 1
  done
  log "the cluster did not come up; logs in $DIR/log:"
  tail -n 20 "$DIR"/log/*.log >&2 || true
  exit 1
}

down() {
  local d pid
  for d in slurmd slurmctld munged; do
    [ -f "$DIR/run/$d.pid" ] || continue
    pid=$(cat "$DIR/run/$d.pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$DIR/run/$d.pid"
  done
  [ "${1:-}" = quiet ] || log "down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status)
    if running; then echo "running; export SLURM_CONF=$CONF"; else echo "not running"; exit 1; fi ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
