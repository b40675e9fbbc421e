#!/usr/bin/env bash
# Stop the Ray head started by start-local-head.sh, and only that one.
#
#   cluster/stop-local-head.sh        (same RAY_TMPDIR / RAY_PORT as given to the start script)
#
# `ray stop` would kill every Ray process of this user on the machine (it matches process
# names), other clusters and test sessions included. Instead we select this cluster's
# processes: those whose flags point into its session dir under RAY_TMPDIR or name its GCS
# port, plus all their descendants (workers, agents, job drivers). Like `ray stop` we stop the
# raylet first, then the rest, then the GCS last, each with SIGTERM and a share of
# STOP_GRACE_S before SIGKILL.
set -euo pipefail

RAY_TMPDIR="${RAY_TMPDIR:-/tmp/batchgen-ray}"
RAY_TMPDIR="${RAY_TMPDIR%/}"
RAY_PORT="${RAY_PORT:-6380}"
STOP_GRACE_S="${STOP_GRACE_S:-15}"

# Flags like --session-dir=<tmp>/session_..., --raylet_socket_name=<tmp>/session_...;
# the Ray Client server only carries --address=<ip>:<gcs port>.
roots="$(pgrep -f -- "=${RAY_TMPDIR}/session_|--address=[^ ]*:${RAY_PORT}( |$)" || true)"
if [[ -z "$roots" ]]; then
  echo "stop-local-head: no Ray processes found for $RAY_TMPDIR (port $RAY_PORT)"
  exit 0
fi

all="$roots"
frontier="$roots"
while [[ -n "$frontier" ]]; do
  next=""
  for pid in $frontier; do
    next="$next $(pgrep -P "$pid" || true)"
  done
  frontier="$(echo $next)"
  all="$all $frontier"
done
all="$(echo $all | tr ' ' '\n' | sort -un | tr '\n' ' ')"

# A zombie still answers `kill -0` though it is already dead (only waiting to be reaped), so
# read the state letter from /proc: the field after the ")" that closes the command name.
is_running() {
  local line state
  { read -r line < "/proc/$1/stat"; } 2>/dev/null || return 1  # gone
  state="${line##*) }"
  [[ "${state%% *}" != Z ]]
}

comm_of() { cat "/proc/$1/comm" 2>/dev/null || true; }

raylets="" gcs="" rest=""
for pid in $all; do
  case "$(comm_of "$pid")" in
    raylet) raylets="$raylets $pid" ;;
    gcs_server) gcs="$gcs $pid" ;;
    *) rest="$rest $pid" ;;
  esac
done

# stop_group PIDS...: SIGTERM, wait up to a third of STOP_GRACE_S, SIGKILL what is left.
stop_group() {
  [[ $# -eq 0 ]] && return 0
  kill -TERM "$@" 2>/dev/null || true
  local deadline=$((SECONDS + (STOP_GRACE_S + 2) / 3)) alive pid
  while :; do
    alive=""
    for pid in "$@"; do
      if is_running "$pid"; then alive="$alive $pid"; fi
    done
    [[ -z "$alive" ]] && return 0
    (( SECONDS >= deadline )) && break
    sleep 0.2
  done
  echo "stop-local-head: still running after SIGTERM, sending SIGKILL:$alive"
  kill -KILL $alive 2>/dev/null || true
}

echo "stop-local-head: stopping $(echo $all | wc -w) processes: $all"
stop_group $raylets
stop_group $rest
stop_group $gcs
echo "stop-local-head: stopped"
