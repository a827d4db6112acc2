#!/usr/bin/env bash
# Start a one-machine Ray cluster (a head node) to try the cluster path of hgdpo locally:
# the same `ray job submit` you would run against a real cluster, against this machine.
#
#   cluster/start_local_head.sh                 # from the repository root
#   RAY_NUM_CPUS=8 RAY_NUM_GPUS=1 cluster/start_local_head.sh
#
# Settings (environment variables, all optional):
#   RAY_BIN              the `ray` executable (default: `ray` on PATH, else ./.venv/bin/ray)
#   RAY_HEAD_HOST        address the head advertises and the dashboard binds (default 127.0.0.1;
#                        other machines can only join if you set a reachable address)
#   RAY_PORT             GCS port (default 6379)
#   RAY_DASHBOARD_PORT   dashboard / job-submission port (default 8265)
#   RAY_AGENT_PORT       the dashboard agent's HTTP port, which runs submitted jobs (default 52365)
#   RAY_CLIENT_PORT      the Ray Client server port (default 10001)
#                        These four are fixed by default; a `ray.init()` running on the same
#                        machine also takes 52365, and the head then starts but every submit
#                        fails with "No available agent to submit job": pick other ports.
#   RAY_NUM_CPUS         CPUs the head offers (default: all cores, at least 2: the pool job's
#                        generator and scorer actors take one CPU each by default)
#   RAY_NUM_GPUS         GPUs the head offers (default: Ray detects them)
#   RAY_TEMP_DIR         Ray's session/log/spill directory (default Ray's /tmp/ray; keep the
#                        path short, Ray puts unix sockets under it)
#   RAY_AUTH_MODE        `token` (default) or `disabled`. Ray 2.60 turns token authentication on
#                        for a `ray start --head` as soon as ~/.ray/auth_token exists (any earlier
#                        `ray.init()` creates it), and the job CLI then needs RAY_AUTH_MODE=token
#                        to send it. This script makes the choice explicit instead.
#
# Stop the head with `ray stop` (note: `ray stop` stops every Ray process of your user on
# this machine, including local `ray.init()` sessions of other programs).
set -euo pipefail

HOST="${RAY_HEAD_HOST:-127.0.0.1}"
PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
AUTH_MODE="${RAY_AUTH_MODE:-token}"

source "$(dirname "${BASH_SOURCE[0]}")/find_executable.sh"
RAY="$(find_executable ray RAY_BIN)"

CORES="$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)"
NUM_CPUS="${RAY_NUM_CPUS:-$(( CORES < 2 ? 2 : CORES ))}"

case "$AUTH_MODE" in
  token | disabled) ;;
  *) echo "error: RAY_AUTH_MODE must be token or disabled (got '$AUTH_MODE')" >&2; exit 1 ;;
esac

# The job's entrypoint (`python jobs/build_pool.py`) is run by a shell that inherits the head's
# environment: put the directory of this `ray` first on PATH so that `python` is the interpreter
# hgdpo and torch are installed in, not whatever `python` the system has.
ENV_BIN="$(cd "$(dirname "$RAY")" && pwd)"
export PATH="$ENV_BIN:$PATH"
export RAY_AUTH_MODE="$AUTH_MODE"
if [[ "$AUTH_MODE" == token ]]; then
  "$RAY" get-auth-token --generate >/dev/null   # creates ~/.ray/auth_token once; keeps an existing one
fi

args=(start --head
  --port="$PORT"
  --node-ip-address="$HOST"
  --dashboard-host="$HOST"
  --dashboard-port="$DASHBOARD_PORT"
  --dashboard-agent-listen-port="${RAY_AGENT_PORT:-52365}"
  --ray-client-server-port="${RAY_CLIENT_PORT:-10001}"
  --include-dashboard=true
  --num-cpus="$NUM_CPUS"
  --disable-usage-stats)
[[ -n "${RAY_NUM_GPUS:-}" ]] && args+=(--num-gpus="$RAY_NUM_GPUS")
[[ -n "${RAY_TEMP_DIR:-}" ]] && args+=(--temp-dir="$RAY_TEMP_DIR")

echo "+ RAY_AUTH_MODE=$AUTH_MODE $RAY ${args[*]}"
"$RAY" "${args[@]}"

prefix=""
[[ "$AUTH_MODE" == token ]] && prefix="RAY_AUTH_MODE=token "
cat <<EOF

Ray head is up: dashboard http://$HOST:$DASHBOARD_PORT ($NUM_CPUS CPUs, auth: $AUTH_MODE).

Build the example pool on it (from the repository root; .venv/, runs/ and the rest of
.gitignore are not uploaded; the upload limit is 100 MiB):

  ${prefix}ray job submit --address http://$HOST:$DASHBOARD_PORT --working-dir . -- python jobs/build_pool.py --config examples/pool.yaml

The job runs in Ray's copy of the repository (under the session directory), so relative
paths such as output: runs/pool-example and the default MLflow store ./mlflow.db land in that
copy: pass absolute ones to keep the results, e.g.
  ... --config examples/pool.yaml output=\$PWD/runs/pool-cluster mlflow_uri=sqlite:///\$PWD/mlflow.db

Stop the head with:

  ray stop
EOF
