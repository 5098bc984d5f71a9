#!/usr/bin/env bash
# A throw-away one-node SLURM cluster on this machine (munged + slurmctld -D + slurmd -D, no systemd, no
# cgroups), for the tests and CI.  Recipe and pitfalls: docs/cluster.md ("A real SLURM on one machine").
#
#   bash scripts/slurm_local.sh install        # Debian/Ubuntu, as root: slurmctld slurmd slurm-client munge
#   D=$(bash scripts/slurm_local.sh up)        # start; prints the cluster folder as the last stdout line
#   export SLURM_CONF=$D/slurm.conf            # then sbatch/squeue/srun talk to it (partition "debug")
#   bash scripts/slurm_local.sh down "$D"      # stop only what 'up' started (by PID) and remove the folder
#
# Environment: SLURM_LOCAL_DIR (folder to use), SLURM_LOCAL_TIMEOUT (seconds to wait for the node, 60),
# SLURM_LOCAL_KEEP_DIR=1 (keep the folder on down), SLURM_LOCAL_PORTS="ctld,slurmd" (default: two free ports).
set -euo pipefail
log() { echo "[slurm-local] $*" >&2; }

have_slurm() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null
}

cmd_install() {
  have_slurm && { log "already installed"; return 0; }
  [ "$(id -u)" = 0 ] || { echo "error: installing SLURM needs root (apt-get)" >&2; exit 2; }
  command -v apt-get >/dev/null || { echo "error: no apt-get: install slurmctld, slurmd, slurm-client and munge with your package manager" >&2; exit 2; }
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
  have_slurm || { echo "error: SLURM still missing after apt-get install" >&2; exit 2; }
  log "installed: $(sbatch --version)"
}

free_port() {
  local p
  for p in $(shuf -i 20000-60000 -n 50 2>/dev/null || seq 26817 26866); do
    (echo >"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return 0; }
  done
  return 1
}

cmd_up() {
  have_slurm || { echo "error: SLURM is not installed (run: bash scripts/slurm_local.sh install)" >&2; exit 2; }
  [ "$(id -u)" = 0 ] || { echo "error: the local cluster runs its daemons as root; run as root" >&2; exit 2; }
  local t0 D state deadline f NODE NCPU CPORT DPORT
  t0=$(date +%s%N)
  D=${SLURM_LOCAL_DIR:-$(mktemp -d /tmp/slurm-local.XXXXXX)}
  mkdir -p "$D/state" "$D/spool" "$D/log"

  # munge: the key (the package's postinst normally makes it) and the daemon, as user munge
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  if ! munge -n >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
    cp /run/munge/munged.pid "$D/munged.bgpid"   # only a munged started here is stopped by 'down'
  fi
  munge -n | unmunge >/dev/null

  NODE=$(hostname -s); NCPU=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys those two
  if [ -n "${SLURM_LOCAL_PORTS:-}" ]; then CPORT=${SLURM_LOCAL_PORTS%,*}; DPORT=${SLURM_LOCAL_PORTS#*,}
  else CPORT=$(free_port); DPORT=$(free_port); [ "$DPORT" != "$CPORT" ] || DPORT=$((CPORT + 1)); fi
  cat > "$D/slurm.conf" <<CONF
ClusterName=localci
SlurmctldHost=${NODE}(127.0.0.1)
SlurmctldPort=${CPORT}
SlurmdPort=${DPORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
StateSaveLocation=${D}/state
SlurmdSpoolDir=${D}/spool
SlurmctldPidFile=${D}/slurmctld.pid
SlurmdPidFile=${D}/slurmd.pid
SlurmctldLogFile=${D}/log/slurmctld.log
SlurmdLogFile=${D}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${NCPU} RealMemory=${SLURM_LOCAL_MEM_MB:-4000} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  export SLURM_CONF=$D/slurm.conf
  slurmctld -D </dev/null >"$D/log/slurmctld.stdout" 2>&1 & echo $! >"$D/slurmctld.bgpid"
  slurmd -D    </dev/null >"$D/log/slurmd.stdout"    2>&1 & echo $! >"$D/slurmd.bgpid"
  deadline=$(( $(date +%s) + ${SLURM_LOCAL_TIMEOUT:-60} ))
  while :; do
    for f in slurmctld slurmd; do   # fail fast when a daemon died
      if ! kill -0 "$(cat "$D/$f.bgpid")" 2>/dev/null; then
        log "$f exited; logs:"; tail -n 20 "$D"/log/*.stdout "$D"/log/*.log >&2 2>/dev/null || true
        cmd_down "$D"; exit 1
      fi
    done
    state=$(timeout 15 sinfo -h -N -o %t 2>/dev/null | head -1) || true
    [ "$state" = idle ] && break
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "node not idle (state '$state'); logs:"; tail -n 20 "$D"/log/*.stdout >&2 2>/dev/null || true
      cmd_down "$D"; exit 1
    fi
    sleep 0.2
  done
  log "node $NODE idle after $(( ($(date +%s%N) - t0) / 1000000 )) ms (ports $CPORT/$DPORT)"
  echo "$D"
}

cmd_down() {
  local D=${1:?usage: slurm_local.sh down DIR} f p
  for f in slurmd slurmctld munged; do
    p=$(cat "$D/$f.bgpid" 2>/dev/null) || continue
    kill "$p" 2>/dev/null || continue
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  done
  [ -n "${SLURM_LOCAL_KEEP_DIR:-}" ] || rm -rf "$D"
  true
}

case "${1:-}" in
  install) cmd_install ;;
  up) cmd_up ;;
  down) shift; cmd_down "$@" ;;
  *) echo "usage: $0 install | up | down DIR" >&2; exit 2 ;;
esac
