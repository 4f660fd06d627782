#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for trying AVO's Slurm launcher and for its tests.
#
#   slurm/cluster.sh start    install (Debian/Ubuntu, as root) and start munge, MariaDB, slurmdbd,
#                             slurmctld and slurmd; idempotent, about 15-25 s from scratch
#   slurm/cluster.sh stop     stop the daemons this script started (by pid), nothing else
#   slurm/cluster.sh status   which daemons run, and sinfo
#
# The node declares AVO_SLURM_GPUS (default 2) `gpu` GRES backed by character devices
# (/dev/null clones), so GPU requests are scheduled and CUDA_VISIBLE_DEVICES is set as on a real
# cluster; no job can use them as GPUs. Accounting runs through slurmdbd + MariaDB because
# submitit reads job states with sacct. Timers are short so that requeued jobs restart within
# seconds (cred_expire=10, sched_interval=5).
#
# Configuration lives in /etc/slurm (written only when absent or written by this script) and the
# state, logs and pid files in $AVO_SLURM_STATE (default /var/lib/avo-slurm).
set -euo pipefail

STATE=${AVO_SLURM_STATE:-/var/lib/avo-slurm}
GPUS=${AVO_SLURM_GPUS:-2}
ETC=/etc/slurm
MARK="# written by AVO slurm/cluster.sh"
PKGS=(munge mariadb-server mariadb-client slurmctld slurmd slurm-client slurmdbd)
HOST=$(hostname -s)

say() { echo "cluster: $*"; }
die() { echo "cluster: error: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts system daemons)"; }

install_packages() {
  local missing=()
  for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} = 0 ] && return
  command -v apt-get >/dev/null || die "packages ${missing[*]} are missing and there is no apt-get to install them"
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# write a file only if it is absent or ours: a site's own Slurm configuration is never touched
write_conf() {
  local path=$1 content=$2
  if [ -e "$path" ] && ! grep -qF "$MARK" "$path"; then
    die "$path exists and was not written by this script; move it away to use the test cluster"
  fi
  printf '%s\n%s\n' "$MARK" "$content" > "$path"
}

write_configs() {
  mkdir -p "$ETC" "$STATE"/{ctld,spool,log,pids,dev}
  local mem_mb cpus gres_line=""
  cpus=$(nproc)
  mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
  if [ "$GPUS" -gt 0 ]; then
    for i in $(seq 0 $((GPUS - 1))); do
      [ -c "$STATE/dev/gpu$i" ] || mknod "$STATE/dev/gpu$i" c 1 3
    done
    gres_line="Gres=gpu:$GPUS"
    write_conf "$ETC/gres.conf" "AutoDetect=off
NodeName=$HOST Name=gpu File=$STATE/dev/gpu[0-$((GPUS - 1))]"
  fi
  write_conf "$ETC/slurm.conf" "ClusterName=avo
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/pids/slurmctld.daemon.pid
SlurmdPidFile=$STATE/pids/slurmd.daemon.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5,sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$((mem_mb / cpus))
KillWait=10
MinJobAge=600
JobRequeue=1
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb $gres_line State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  write_conf "$ETC/slurmdbd.conf" "AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$STATE/pids/slurmdbd.daemon.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=avo_slurm_acct"
  chmod 600 "$ETC/slurmdbd.conf"
}

alive() { local f="$STATE/pids/$1.pid"; [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; }

# start NAME CMD...: run a daemon in the foreground of its own session, remember its pid
start() {
  local name=$1; shift
  if alive "$name"; then say "$name already running (pid $(cat "$STATE/pids/$name.pid"))"; return; fi
  setsid "$@" >>"$STATE/log/$name.out" 2>&1 < /dev/null &
  echo $! > "$STATE/pids/$name.pid"
}

# wait_for NAME SECONDS CHECK...: poll CHECK until it succeeds; on timeout show the daemon's log
wait_for() {
  local name=$1 secs=$2; shift 2
  local t=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if ! alive "$name"; then
      tail -n 20 "$STATE/log/$name.out" "$STATE/log/$name.log" 2>/dev/null >&2 || true
      die "$name exited during start-up (logs in $STATE/log)"
    fi
    if [ $SECONDS -ge $t ]; then
      tail -n 20 "$STATE/log/$name.out" "$STATE/log/$name.log" 2>/dev/null >&2 || true
      die "$name not ready after ${secs}s (logs in $STATE/log)"
    fi
    sleep 0.5
  done
  say "$name ready"
}

node_idle() { sinfo -h -n "$HOST" -o %T | grep -Eq '^(idle|mixed|allocated)'; }

do_start() {
  need_root
  local t0=$SECONDS
  install_packages
  write_configs
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile /etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /run/mysqld; chown munge:munge /run/munge; chown mysql:mysql /run/mysqld
  start munged runuser -u munge -- munged --foreground
  wait_for munged 20 bash -c 'munge -n | unmunge'
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  start mariadb mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
    --pid-file=/run/mysqld/avo-mariadb.pid --skip-networking=0 --bind-address=127.0.0.1
  wait_for mariadb 60 mariadb-admin --socket=/run/mysqld/mysqld.sock ping
  start slurmdbd slurmdbd -D
  wait_for slurmdbd 60 sacctmgr -n list cluster
  sacctmgr -n list cluster format=cluster | grep -qw avo || sacctmgr -i add cluster avo >/dev/null
  start slurmctld slurmctld -D -i
  wait_for slurmctld 60 scontrol ping
  start slurmd slurmd -D
  wait_for slurmd 60 node_idle
  # a node left DOWN/DRAIN by an earlier run comes back
  scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
  say "up in $((SECONDS - t0)) s: partition debug, $(nproc) CPUs, $GPUS gpu GRES on $HOST"
}

do_stop() {
  local name pid
  for name in slurmd slurmctld slurmdbd mariadb munged; do
    alive "$name" || { rm -f "$STATE/pids/$name.pid"; continue; }
    pid=$(cat "$STATE/pids/$name.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    if kill -0 "$pid" 2>/dev/null; then say "$name (pid $pid) ignored SIGTERM; killing"; kill -9 "$pid" || true; fi
    rm -f "$STATE/pids/$name.pid"
    say "stopped $name"
  done
}

do_status() {
  local name up=0
  for name in munged mariadb slurmdbd slurmctld slurmd; do
    if alive "$name"; then echo "$name: running (pid $(cat "$STATE/pids/$name.pid"))"; up=$((up + 1))
    else echo "$name: stopped"; fi
  done
  [ $up = 5 ] && sinfo -N -o '%N %T %c %m %G' && return 0
  return 3
}

case "${1:-}" in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  restart) do_stop; do_start ;;
  *) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
