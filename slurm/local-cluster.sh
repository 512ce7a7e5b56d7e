#!/usr/bin/env bash
# A real single-node SLURM on this machine, for the tests and for trying the cluster path by hand.
#
#   bash slurm/local-cluster.sh up       # install (Debian packages, once), configure, start the daemons
#   bash slurm/local-cluster.sh status   # the daemons this script started, and `sinfo`
#   bash slurm/local-cluster.sh down     # stop exactly the daemons this script started (by pid)
#
# Debian's slurm-wlm with munge, and slurmdbd on MariaDB for accounting: without accounting submitit cannot
# tell that a job died without a result, and waits for ever (research/tooling.md section 7, pitfall 5).
# Needs root (apt-get, daemons). The packages start no services (no systemd), so every daemon is started here.
# Everything the script starts is recorded in $STATE/pids; `down` stops those pids and nothing else.
set -euo pipefail

STATE=${REPRO_SLURM_STATE:-/run/repro-slurm}
CLUSTER=repro
PARTITION=debug
NODE=$(hostname -s)
MARK="# written by repro slurm/local-cluster.sh"

log() { echo "[local-cluster] $*" >&2; }
die() { echo "[local-cluster] error: $*" >&2; exit 2; }

install_packages() {
    local missing=()
    for exe in slurmctld:slurm-wlm slurmd:slurm-wlm munged:munge slurmdbd:slurmdbd mariadbd:mariadb-server; do
        command -v "${exe%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${exe%%:*}" ] || missing+=("${exe##*:}")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing slurm-wlm munge slurmdbd mariadb-server (apt-get; about 30 s, 240 MB)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends slurm-wlm munge slurmdbd mariadb-server mariadb-client >/dev/null
}

write_file() {  # write_file PATH MODE: stdin -> PATH, refusing to overwrite a file this script did not write
    local path=$1 mode=$2 tmp
    if [ -e "$path" ] && ! grep -qF "$MARK" "$path"; then
        die "$path exists and was not written by this script: move it away first (this script never overwrites it)"
    fi
    tmp=$(mktemp "$path.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [ -e "$path" ] && cmp -s "$tmp" "$path"; then rm -f "$tmp"; return 0; fi
    mv "$tmp" "$path"
    CHANGED=1
}

configure() {
    local cpus mem hw
    # What slurmd measures (not `nproc`, which answers OMP_NUM_THREADS when it is set).
    hw=$(/usr/sbin/slurmd -C 2>/dev/null | head -1)
    cpus=$(echo "$hw" | sed -n 's/.* CPUs=\([0-9]*\).*/\1/p')
    cpus=${cpus:-$(getconf _NPROCESSORS_ONLN)}
    mem=$(echo "$hw" | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mem=$(( ${mem:-4000} * 85 / 100 ))  # RealMemory must not exceed what slurmd measures
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm "$STATE"
    write_file /etc/slurm/slurm.conf 644 <<EOF
$MARK
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
AuthType=auth/munge
# Job credentials live 20 s (default 120): this is also how long a requeued job waits before it starts again.
AuthInfo=cred_expire=20
CryptoType=crypto/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
MailProg=/bin/true
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    write_file /etc/slurm/slurmdbd.conf 600 <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=repro-local
StorageLoc=slurm_acct_db
EOF
}

running() { [ -f "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local t=$1 what=$2; shift 2
    for _ in $(seq $((t * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    die "$what did not come up within ${t}s (logs: /var/log/slurm/, /var/log/mysql/)"
}

start() {
    # munge: the authentication every SLURM message carries.
    if ! running munged; then
        mkdir -p /run/munge && chown munge:munge /run/munge
        [ -f /etc/munge/munge.key ] || { /usr/sbin/mungekey --create 2>/dev/null || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
        su -s /bin/sh munge -c "/usr/sbin/munged --pid-file=/run/munge/repro-munged.pid"
        wait_for 10 munged test -s /run/munge/repro-munged.pid
        cp /run/munge/repro-munged.pid "$STATE/munged.pid"
    fi
    # MariaDB for slurmdbd (accounting).
    if ! running mariadbd; then
        mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
        setsid /usr/sbin/mariadbd --user=mysql --socket=/run/mysqld/mysqld.sock --bind-address=127.0.0.1 \
            --pid-file=/run/mysqld/repro-mariadbd.pid >/var/log/slurm/mariadbd.out 2>&1 < /dev/null &
        wait_for 30 mariadbd mariadb -u root -e "SELECT 1"
        cp /run/mysqld/repro-mariadbd.pid "$STATE/mariadbd.pid"
        mariadb -u root <<'SQL'
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'repro-local';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
    fi
    if ! running slurmdbd; then
        /usr/sbin/slurmdbd
        wait_for 30 slurmdbd test -s "$STATE/slurmdbd.pid"
        wait_for 30 "slurmdbd (port 6819)" sacctmgr -n show cluster
    fi
    if [ "${CHANGED:-0}" = 1 ]; then  # running daemons read the old configuration: restart the two that use it
        for name in slurmd slurmctld; do running "$name" && stop_one "$name"; done
    fi
    if ! running slurmctld; then
        /usr/sbin/slurmctld
        wait_for 30 slurmctld scontrol ping
        # A fresh controller restores the jobs of its last run: on this throwaway cluster they are stale.
        squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
    fi
    if ! running slurmd; then
        /usr/sbin/slurmd
        wait_for 30 slurmd test -s "$STATE/slurmd.pid"
    fi
    # The cluster registers itself in the accounting database; wait until the node takes jobs.
    wait_for 60 "node $NODE idle" sh -c "sinfo -h -n $NODE -o %t | grep -Eq '^(idle|mix|alloc)'"
    log "up: cluster $CLUSTER, partition $PARTITION, node $NODE ($(sinfo -h -n "$NODE" -o %c) CPUs); stop with: bash $0 down"
}

stop_one() {
    local name=$1 pid
    [ -f "$STATE/$name.pid" ] || return 0
    pid=$(cat "$STATE/$name.pid")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
        log "stopped $name (pid $pid)"
    fi
    rm -f "$STATE/$name.pid"
}

stop() {
    local name
    for name in slurmd slurmctld slurmdbd mariadbd munged; do stop_one "$name"; done
}

status() {
    local name
    for name in munged mariadbd slurmdbd slurmctld slurmd; do
        if running "$name"; then echo "$name: running (pid $(cat "$STATE/$name.pid"))"; else echo "$name: not running"; fi
    done
    sinfo 2>/dev/null || true
}

[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages and starts daemons)"
case "${1:-}" in
    up) install_packages; configure; start ;;
    down) stop ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
