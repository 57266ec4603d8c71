#!/usr/bin/env bash
# Thin wrapper: `fedcompute stack status` with the project's environment (see README.md here).
# Extra arguments are passed through, e.g. --state-dir DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [ ! -x "$PY" ]; then
  echo "error: $PY not found; run 'make setup' first" >&2
  exit 1
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$PY" -m fedcompute.cli.main stack status "$@"
