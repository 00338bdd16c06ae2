#!/usr/bin/env bash
# train.precision=bf16 against float32 on the short schedule of issue 13: Omniglot 5-way 1-shot
# `-reference` preset, 3 epochs of 100 iterations, B=8, top-3 ensemble on 600 test tasks, seeds 0-2.
# The two precisions of a seed run side by side with one thread each (2-core machine); the test
# accuracies go to benchmarks/results/precision-learning.jsonl and a table to stdout.
#     MAMLPP_DATA=../shared/data bash benchmarks/precision_learning.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/precision-learning}
mkdir -p "$out" benchmarks/results
short="train.epochs=3 train.iters_per_epoch=100 train.top_k=3 train.eval_tasks=600 train.threads=1"
for seed in 0 1 2; do
  for precision in full bf16; do
    dir="$out/$precision-seed$seed"
    [ -f "$dir/test.json" ] && continue
    rm -rf "$dir"
    .venv/bin/mamlpp train omniglot-5w1s-mamlpp-reference $short train.seed=$seed train.precision=$precision \
      --out "$dir" --no-progress > "$dir.log" 2>&1 &
  done
  wait
done
.venv/bin/python - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
rows = []
for precision in ("full", "bf16"):
    accs = []
    for seed in range(3):
        run = Path(sys.argv[1]) / f"{precision}-seed{seed}"
        test = json.loads((run / "test.json").read_text())
        accs.append(test["accuracy"])
        rows.append({"precision": precision, "seed": seed, "accuracy": test["accuracy"],
                     "ci95": test.get("ci95")})
    print(f"| {precision} | " + " | ".join(f"{a:.4f}" for a in accs) +
          f" | {statistics.mean(accs):.4f} | {min(accs):.4f}-{max(accs):.4f} |")
Path("benchmarks/results/precision-learning.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
PY
