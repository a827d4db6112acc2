#!/usr/bin/env bash
# Start the MLflow tracking server of a Ray cluster on its head node. Every node reaches it over
# the network, so the runs of every stage (the trainer's metrics come from a worker node) and their
# artifacts (pictures, reports, adapters) land in one place; artifacts are proxied by the server
# (--serve-artifacts) to its artifact store, never written to a worker's disk.
#
#   bash cluster/start_mlflow.sh                                    # on the head, in the foreground
#   nohup bash cluster/start_mlflow.sh > /tmp/mlflow-server.log 2>&1 &
#   MLFLOW_ARTIFACTS_DESTINATION=s3://my-bucket/mlflow bash cluster/start_mlflow.sh
#
# Then give every job the URI it prints (mlflow_uri=http://HEAD:5000, or MLFLOW_TRACKING_URI in the
# nodes' environment, as cluster/ray-cluster.yaml does).
#
# Settings (environment variables, all optional):
#   MLFLOW_HOST                   address to listen on (default: this machine's first private
#                                 address from `hostname -I`, else 127.0.0.1; never 0.0.0.0 unless
#                                 you ask for it: the server has no authentication of its own)
#   MLFLOW_PORT                   port (default 5000)
#   MLFLOW_HOME                   folder of the default stores (default ~/mlflow)
#   MLFLOW_BACKEND_STORE_URI      runs, params, metrics (default sqlite:///$MLFLOW_HOME/mlflow.db; a
#                                 postgresql://... URI for a server that outlives the head)
#   MLFLOW_ARTIFACTS_DESTINATION  where the server keeps artifacts (default $MLFLOW_HOME/artifacts;
#                                 s3://bucket/prefix with AWS credentials in the environment and
#                                 boto3 installed: `pip install boto3`; gs:// needs google-cloud-storage)
#   MLFLOW_ALLOWED_HOSTS          Host headers the server answers besides its own address, localhost
#                                 and private IPs (it refuses others with 403): a DNS name clients
#                                 use, e.g. mlflow.mlflow.svc.cluster.local:5000 for a Kubernetes Service
#   MLFLOW_BIN                    the `mlflow` executable (default: `mlflow` on PATH, else ./.venv/bin/mlflow)
set -euo pipefail

private_address() {
  local addr
  addr="$(hostname -I 2>/dev/null | awk '{print $1}')" || true
  echo "${addr:-127.0.0.1}"
}

HOST="${MLFLOW_HOST:-$(private_address)}"
PORT="${MLFLOW_PORT:-5000}"
HOME_DIR="${MLFLOW_HOME:-$HOME/mlflow}"
BACKEND="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$HOME_DIR/mlflow.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-$HOME_DIR/artifacts}"

source "$(dirname "${BASH_SOURCE[0]}")/find_executable.sh"
MLFLOW="$(find_executable mlflow MLFLOW_BIN)"

if [[ "$BACKEND" == sqlite:///* ]]; then
  mkdir -p "$(dirname "${BACKEND#sqlite:///}")"
fi
if [[ "$ARTIFACTS" != *://* ]]; then
  mkdir -p "$ARTIFACTS"
fi

# Host headers answered: the address it listens on (MLflow's own default holds only localhost and
# the RFC 1918 ranges, so a VPC on another range would get 403), localhost (the UI through an SSH
# tunnel), the private ranges, and MLFLOW_ALLOWED_HOSTS.
allowed="$HOST,$HOST:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*,10.*,192.168.*"
for i in $(seq 16 31); do allowed+=",172.$i.*"; done
[[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]] && allowed+=",$MLFLOW_ALLOWED_HOSTS"

# Printed without a password a database URI may hold.
echo "MLflow tracking server: mlflow_uri=http://$HOST:$PORT (backend $(echo "$BACKEND" | sed -E 's#//([^:/@]*):[^@/]*@#//\1:***@#'), artifacts $ARTIFACTS)"
# The job-execution workers cost ~2 GiB and hgdpo does not use them.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
# MLFLOW_WORKERS: request-serving processes (mlflow's default, 4; each loads mlflow, ~150 MB).
exec "$MLFLOW" server --host "$HOST" --port "$PORT" --backend-store-uri "$BACKEND" --workers "${MLFLOW_WORKERS:-4}" \
  --serve-artifacts --artifacts-destination "$ARTIFACTS" --allowed-hosts "$allowed"
