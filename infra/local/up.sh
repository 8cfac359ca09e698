#!/usr/bin/env bash
# Start the local cluster (Ray head + Prometheus [+ Redis]): a thin wrapper over `retort up`.
#   infra/local/up.sh [-c configs/cluster/local.yaml] [key=value ...]
# Then, in your shell:  eval "$(infra/local/up.sh --print-env)"  or copy the printed export lines.
set -euo pipefail
cd "$(dirname "$0")/../.."
RETORT="${RETORT:-.venv/bin/retort}"
if [[ "${1:-}" == "--print-env" ]]; then
  "$RETORT" status | sed -n 's/^ *\(export .*\)$/\1/p'
  exit "${PIPESTATUS[0]}"
fi
exec "$RETORT" up "$@"
