#!/usr/bin/env bash
# make demo: the snapshot DAG end to end, offline, on a generated fixture crawl.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m laion_tasks.demo "$@"
