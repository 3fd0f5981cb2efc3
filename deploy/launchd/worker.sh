#!/bin/sh
# launchd entry point of a farm worker (deploy/launchd/org.sparse-vggt.worker.plist).
# Reads the settings and secrets from a 0600 env file (never from the world-readable plist), then runs
# `prefect worker start` with its output written to a size-rotated log (sparse_vggt.logpipe: 10 MB x 7).
set -eu
HOME_DIR="${SPARSE_VGGT_HOME:-/opt/sparse-vggt}"
ENV_FILE="${SPARSE_VGGT_ENV_FILE:-$HOME_DIR/worker.env}"
[ -r "$ENV_FILE" ] || { echo "worker.sh: $ENV_FILE is missing or unreadable (see deploy/README.md)" >&2; exit 78; }
if stat -c %a "$ENV_FILE" >/dev/null 2>&1; then MODE=$(stat -c %a "$ENV_FILE"); else MODE=$(stat -f %Lp "$ENV_FILE"); fi
case "$MODE" in
  600|400) ;;
  *) echo "worker.sh: $ENV_FILE holds the API auth secret and must not be readable by others: chmod 600 $ENV_FILE (mode is $MODE)" >&2; exit 78 ;;
esac
set -a
. "$ENV_FILE"
set +a
: "${PREFECT_API_URL:?set PREFECT_API_URL in $ENV_FILE}"
: "${SPARSE_VGGT_WORKER_NAME:?set SPARSE_VGGT_WORKER_NAME in $ENV_FILE}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" PREFECT_FLOWS_HEARTBEAT_FREQUENCY="${PREFECT_FLOWS_HEARTBEAT_FREQUENCY:-30}"
mkdir -p "$HOME_DIR/logs"
"$HOME_DIR/.venv/bin/prefect" worker start --pool "${SPARSE_VGGT_POOL:-mac-mini}" --type process \
    --limit "${SPARSE_VGGT_WORKER_LIMIT:-1}" --name "$SPARSE_VGGT_WORKER_NAME" 2>&1 \
  | "$HOME_DIR/.venv/bin/python" -m sparse_vggt.logpipe "$HOME_DIR/logs/worker.log"
