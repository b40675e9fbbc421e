#!/usr/bin/env bash
# Start a single-node Ray head for local development, the way the tests do: every address on
# 127.0.0.1 where Ray lets us choose, token authentication on, fixed ports.
#
#   cluster/start-local-head.sh [extra `ray start` flags...]
#
# Environment (all optional):
#   VENV=.venv            use $VENV/bin/ray when present, else `ray` from PATH
#   RAY_PORT=6380         GCS port (the address drivers connect to)
#   DASHBOARD_PORT=8265   dashboard + Jobs API (`ray job submit`)
#   METRICS_PORT=8080     Prometheus scrape endpoint (batchgen_* metrics live here)
#   CLIENT_PORT=10001     Ray Client server
#   NUM_CPUS=$(nproc)     CPUs the head offers to tasks
#   RAY_TMPDIR=/tmp/batchgen-ray   Ray's temp/session dir; stop-local-head.sh finds the
#                         processes to stop by it, so give both scripts the same value
#   RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH   the cluster token (see below)
#   RAY_JOB_STOP_WAIT_TIME_S=90   how long `ray job stop` waits after its SIGTERM before it
#                         SIGKILLs the driver (Ray's default is 3 s); batchgen's driver needs up
#                         to 60 s to let in-flight shards commit, and a few more to clean up
#
# Ports: all fixed ports sit outside 10002-19999, the range Ray hands out to worker processes
# (--min/max-worker-port defaults), so a worker can never grab one of them first.
#
# Token authentication (Ray >= 2.52; docs.ray.io/en/latest/ray-security/token-auth.html):
# RAY_AUTH_MODE=token must be in the environment of every Ray process, and of every client
# (`ray status`, `ray job submit`, drivers), since it is read from the environment only, never
# from --system-config. The token itself is looked up in this order: RAY_AUTH_TOKEN (the value),
# RAY_AUTH_TOKEN_PATH (a file), then ~/.ray/auth_token. `ray start --head` does NOT create one
# (only a bare `ray.init()` does), so we make one when none exists: in RAY_AUTH_TOKEN_PATH if it
# is set, else via `ray get-auth-token --generate` (writes ~/.ray/auth_token). HTTP clients send
# it as `Authorization: Bearer <token>`; the dashboard asks for it once and keeps a cookie.
#
# Binding: `ray start` rewrites --node-ip-address 127.0.0.1 to the host's routable address
# (services.resolve_ip_for_localhost) and then the GCS, raylet and agents listen on every
# interface. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is Ray's own single-node switch (the default on
# laptops): with it the node IP stays 127.0.0.1 and every Ray server listens on loopback only
# (checked with `ss -ltn`). Clients on this machine must set it too, or they resolve
# 127.0.0.1 to the host address and time out looking for the GCS; env.sh (below) does that.
#
# After a successful start, $RAY_TMPDIR/env.sh holds the client-side variables:
#   source /tmp/batchgen-ray/env.sh && ray status
set -euo pipefail

VENV="${VENV:-.venv}"
if [[ -x "$VENV/bin/ray" ]]; then
  RAY="$VENV/bin/ray"
  PYTHON="$VENV/bin/python"
  # Ray processes inherit this PATH, so a job entrypoint's `python` is the venv's, with batchgen.
  PATH="$(cd "$VENV/bin" && pwd):$PATH"
  export PATH
else
  RAY="$(command -v ray)" || { echo "start-local-head: no ray in $VENV/bin or on PATH" >&2; exit 1; }
  PYTHON="$(command -v python3)"
fi

RAY_PORT="${RAY_PORT:-6380}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
METRICS_PORT="${METRICS_PORT:-8080}"
CLIENT_PORT="${CLIENT_PORT:-10001}"
NUM_CPUS="${NUM_CPUS:-$(nproc)}"
RAY_TMPDIR="${RAY_TMPDIR:-/tmp/batchgen-ray}"

for name in RAY_PORT DASHBOARD_PORT METRICS_PORT CLIENT_PORT; do
  port="${!name}"
  if ! [[ "$port" =~ ^[0-9]+$ ]] || (( port < 1024 || port > 65535 )); then
    echo "start-local-head: $name=$port is not a port number in 1024-65535" >&2; exit 2
  fi
  if (( port >= 10002 && port <= 19999 )); then
    echo "start-local-head: $name=$port is inside Ray's worker port range 10002-19999; pick another" >&2
    exit 2
  fi
done

export RAY_AUTH_MODE=token
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Read by the job supervisor (a Ray worker of this head, so from the `ray start` environment).
export RAY_JOB_STOP_WAIT_TIME_S="${RAY_JOB_STOP_WAIT_TIME_S:-90}"
if [[ -z "${RAY_AUTH_TOKEN:-}" ]]; then
  if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
    if [[ ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
      # Same shape as Ray's own generator: 256 random bits, hex. umask: the file is a secret.
      (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32), end="")' > "$RAY_AUTH_TOKEN_PATH")
      echo "start-local-head: wrote a new token to $RAY_AUTH_TOKEN_PATH"
    fi
  else
    "$RAY" get-auth-token --generate > /dev/null
  fi
fi

mkdir -p "$RAY_TMPDIR"
"$RAY" start --head \
  --node-ip-address 127.0.0.1 \
  --port "$RAY_PORT" \
  --dashboard-host 127.0.0.1 \
  --dashboard-port "$DASHBOARD_PORT" \
  --metrics-export-port "$METRICS_PORT" \
  --ray-client-server-port "$CLIENT_PORT" \
  --num-cpus "$NUM_CPUS" \
  --temp-dir "$RAY_TMPDIR" \
  --disable-usage-stats \
  "$@"

# Client environment for this head. It names the token file, never the token itself.
env_file="$RAY_TMPDIR/env.sh"
{
  echo "export RAY_AUTH_MODE=token"
  echo "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
  echo "export RAY_ADDRESS=127.0.0.1:$RAY_PORT"
  echo "export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT"
  if [[ -z "${RAY_AUTH_TOKEN:-}" && -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
    echo "export RAY_AUTH_TOKEN_PATH=$(realpath "$RAY_AUTH_TOKEN_PATH")"
  fi
} > "$env_file"

cat <<MSG

batchgen: local Ray head is up on 127.0.0.1 (token auth on).
  Dashboard / Jobs API: http://127.0.0.1:$DASHBOARD_PORT  (it asks for the token: \`$RAY get-auth-token\`)
  Prometheus metrics:   http://127.0.0.1:$METRICS_PORT/metrics
  Client environment:   source $env_file
  Submit the demo job (its prompts come from \`make demo\`; paths are absolute because the
  job runs in Ray's temporary copy of this directory, which leaves out git-ignored files like
  demo-out/ and is deleted afterwards; \$PWD is expanded here, by your shell):
    source $env_file && ray job submit --working-dir . -- python -m batchgen run jobs/demo.yaml \\
      --set input.path=\$PWD/demo-out/prompts.parquet --set output.path=\$PWD/demo-out/results/
  Or run the driver here (relative paths are this directory's):
    source $env_file && python -m batchgen run jobs/demo.yaml
  Stop it:
    RAY_TMPDIR=$RAY_TMPDIR RAY_PORT=$RAY_PORT cluster/stop-local-head.sh
MSG
