#!/usr/bin/env bash
# Intra-op threads with the machine loaded: a second process keeps one core busy while `mamlpp bench`
# times the sinusoid MLP and Omniglot 5-way 1-shot MAML++ with one and with two threads, then Omniglot
# in two single-thread processes (what `mamlpp train` chooses for it on two cores) (BENCHMARKS.md).
# Usage: MAMLPP_DATA=../shared/data bash benchmarks/threads.sh
set -euo pipefail
python3 -c "while True: pass" &
hog=$!
trap 'kill $hog' EXIT
for threads in 1 2; do
    mamlpp bench sinusoid-maml train.threads=$threads --iters 200 --warmup 20 --json
    mamlpp bench omniglot-5w1s-mamlpp-reference train.threads=$threads --iters 3 --warmup 1 --json
done
OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node=2 \
    -m mamlpp bench omniglot-5w1s-mamlpp-reference train.threads=1 --iters 3 --warmup 1 --json
