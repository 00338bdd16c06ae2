#!/usr/bin/env bash
# The benchmark suite on this machine: JSON in benchmarks/results/, table on stdout.
# GPU: bash benchmarks/run_all.sh h100 --eval-tasks 600 train.device=cuda
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-cpu}; shift || true
exec .venv/bin/python benchmarks/run_all.py --tag "$tag" "$@"
