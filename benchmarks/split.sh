#!/usr/bin/env bash
# The process/thread split on a CPU: one process with two intra-op threads against two single-thread
# processes that each take half of the meta-batch (torchrun, gloo; gradients all-reduced as in
# training). Same preset, same batches; rank 0's peak memory is one process's.
# Usage: MAMLPP_DATA=../shared/data bash benchmarks/split.sh [PRESET] [KEY=VALUE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-omniglot-20w1s-mamlpp-reference}; shift || true
.venv/bin/mamlpp bench "$preset" train.threads=2 "$@" --iters 3 --warmup 1 --json
OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node=2 \
    -m mamlpp bench "$preset" train.threads=1 "$@" --iters 3 --warmup 1 --json
