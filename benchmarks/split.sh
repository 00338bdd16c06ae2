#!/usr/bin/env bash
# The process/thread split on a CPU: one process with two intra-op threads (and the per-task loop in
# it, the baseline) against two single-thread processes that each take half of the meta-batch
# (torchrun, gloo; gradients all-reduced as in training, what `mamlpp train` starts itself where
# train.processes=0 picks two). Same preset, same batches; rank 0 reports its own peak memory and all
# processes' together. Extra arguments go to both (e.g. --synthetic; --impl parallel --eval-tasks 600).
# Usage: MAMLPP_DATA=../shared/data bash benchmarks/split.sh [PRESET] [KEY=VALUE | bench option ...]
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-omniglot-20w1s-mamlpp-reference}; shift || true
.venv/bin/mamlpp bench "$preset" train.threads=2 --impl both "$@" --iters 3 --warmup 1 --json
OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node=2 \
    -m mamlpp bench "$preset" train.threads=1 "$@" --iters 3 --warmup 1 --json
