#!/usr/bin/env bash
# A one-node Slurm cluster on this host for the real-Slurm tests (issue #28): `.ci/slurm.sh start|stop|status`.
#
# start: installs Debian's packages (slurmctld, slurmd, slurm-client, munge; slurmdbd + MariaDB so that sacct,
#   which submitit polls, answers), writes /etc/slurm/slurm.conf for this node (its real CPUs and memory), a
#   default partition `debug` and a high-priority partition `high` whose jobs preempt (requeue) `debug` jobs,
#   starts munged, MariaDB, slurmdbd, slurmctld and slurmd, and waits until the node is idle.
# stop: stops exactly the daemons start started, read from the PID files under $STATE (never a broad kill).
# Runs as root (apt-get, /etc/slurm). Everything it writes besides /etc/slurm/*.conf lives under $STATE.
set -euo pipefail

STATE=${ROBUSTFT_SLURM_STATE:-/var/lib/robustft-slurm}
MARK="# written by robustft .ci/slurm.sh"
PIDS="$STATE/pids"
DAEMONS=(slurmd slurmctld slurmdbd mariadb munged)  # stop order: the reverse of start

log() { echo "slurm.sh: $*" >&2; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v munged >/dev/null \
     && command -v mariadbd >/dev/null && command -v sinfo >/dev/null; then
    return
  fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    slurmctld slurmd slurm-client slurmdbd munge mariadb-server
}

write_conf() {
  local host cpus mem
  host=$(hostname -s)
  # what slurmd measures (not nproc, which follows OMP_NUM_THREADS); memory minus 5% (slurmd refuses a node
  # that reports less than configured)
  cpus=$(slurmd -C | sed -n 's/.* CPUs=\([0-9]*\).*/\1/p')
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  mem=$((mem * 95 / 100))
  if [ -f /etc/slurm/slurm.conf ] && ! grep -q "^$MARK" /etc/slurm/slurm.conf; then
    log "/etc/slurm/slurm.conf exists and is not ours; not touching it"; exit 1
  fi
  mkdir -p "$STATE"/{ctld,spool,log,pids} /run/munge /run/mysqld
  chown munge:munge /run/munge
  chown mysql:mysql /run/mysqld
  cat >/etc/slurm/slurm.conf <<EOF
$MARK
ClusterName=robustft-ci
SlurmctldHost=$host(localhost)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
# a high partition's job requeues a running debug job (the preemption test)
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
JobRequeue=1
# a requeued job may start again after cred_expire seconds (default 120: two idle minutes per requeue test)
AuthInfo=cred_expire=10
# seconds between SIGTERM and SIGKILL (scancel, requeue, preemption): Slurm's default. robustft exits well
# before it; 10 s was too short on a machine loaded 10x (the interpreter's exit alone took 6 s there)
KillWait=30
MessageTimeout=10
MinJobAge=300
ReturnToService=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
NodeName=$host NodeAddr=localhost CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=high Nodes=$host MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
  cat >/etc/slurm/slurmdbd.conf <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$PIDS/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=robustft-ci
EOF
  chmod 600 /etc/slurm/slurmdbd.conf
}

wait_for() {  # wait_for <seconds> <what> <command...>
  local n=$1 what=$2
  shift 2
  for _ in $(seq $((n * 5))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  log "timed out waiting for $what (logs: $STATE/log)"; return 1
}

node_idle() { [ "$(sinfo -h -N -o %t 2>/dev/null | head -1)" = idle ]; }

start() {
  local t0=$SECONDS
  install
  log "packages ready after $((SECONDS - t0)) s"
  write_conf
  rm -f /run/munge/robustft-munged.pid
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/robustft-munged.pid
  # munged writes its pid file as the munge user (in its own folder): keep a copy with the others
  wait_for 10 munged test -s /run/munge/robustft-munged.pid
  cp /run/munge/robustft-munged.pid "$PIDS/munged.pid"
  # mariadbd started as root drops to the mysql user itself, so $! is the daemon (runuser would sit between)
  /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/robustft-mariadb.pid \
    --log-error=/run/mysqld/robustft-mariadb.log --socket=/run/mysqld/mysqld.sock --bind-address=127.0.0.1 &
  echo $! >"$PIDS/mariadb.pid"
  wait_for 30 mariadb mysqladmin --socket=/run/mysqld/mysqld.sock ping
  mysql --socket=/run/mysqld/mysqld.sock -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'robustft-ci';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  slurmdbd
  wait_for 30 slurmdbd sacctmgr -n list cluster
  sacctmgr -i add cluster robustft-ci >/dev/null 2>&1 || true
  slurmctld
  wait_for 30 slurmctld scontrol ping
  slurmd
  wait_for 60 "the node to be idle" node_idle
  log "up in $((SECONDS - t0)) s: $(sinfo -h -o '%P %a %D %c %m %t' | tr '\n' ';')"
}

stop() {
  local name pid
  for name in "${DAEMONS[@]}"; do
    [ -f "$PIDS/$name.pid" ] || continue
    pid=$(cat "$PIDS/$name.pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      if kill -0 "$pid" 2>/dev/null; then log "$name ($pid) ignores SIGTERM; SIGKILL"; kill -9 "$pid"; fi
    fi
    rm -f "$PIDS/$name.pid"
  done
  log "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) sinfo && squeue ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
