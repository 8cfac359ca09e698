#!/usr/bin/env bash
# Stop exactly what `retort up` started: a thin wrapper over `retort down`.
# Exit 0 when it stopped something, 2 when nothing was running.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${RETORT:-.venv/bin/retort}" down "$@"
