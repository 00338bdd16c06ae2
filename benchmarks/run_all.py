"""Run the benchmark suite and write benchmarks/results/<tag>.jsonl plus a markdown table.

    python benchmarks/run_all.py --tag cpu-2core [--iters 5] [--loop-up-to 16] [--markdown FILE]

Settings (the issue's headline work: second order, 5 inner steps, MSL on, 64 filters):
Omniglot 20w1s B=8, 5w1s B=8, 20w1s B=16, 20w1s B=32 (real Omniglot when available), and
Mini-ImageNet 5w1s B=2 with 48 filters and 15 queries (synthetic images of the real shape: no
Mini-ImageNet images exist on these machines). Each setting runs the parallel path and, up to
--loop-up-to tasks, the per-task loop in the same process, so ratios compare like with like; with
--bf16 (the default where the machine has native bfloat16) also the parallel path with
train.precision=bf16, right after the float32 one, and its speed-up over it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SETTINGS = [  # (label, preset, meta_batch, synthetic)
    ("Omniglot 20w1s B=8", "omniglot-20w1s-mamlpp-reference", 8, False),
    ("Omniglot 5w1s B=8", "omniglot-5w1s-mamlpp-reference", 8, False),
    ("Omniglot 20w1s B=16", "omniglot-20w1s-mamlpp-reference", 16, False),
    ("Omniglot 20w1s B=32", "omniglot-20w1s-mamlpp-reference", 32, False),
    ("Mini-ImageNet 5w1s B=2", "mini-5w1s-mamlpp-reference", 2, True),
]


def bf16_native(extra: list[str]) -> bool:
    """Whether the device the settings run on (train.device, else a GPU when there is one) has native bfloat16."""
    import torch

    from mamlpp.config import ConfigError
    from mamlpp.trainer import require_bf16
    cuda = "train.device=cuda" in extra or (torch.cuda.is_available() and "train.device=cpu" not in extra)
    try:
        require_bf16(torch.device("cuda" if cuda else "cpu"))
        return True
    except ConfigError:
        return False


def run(preset, batch, synthetic, impl, iters, warmup, eval_tasks, extra):
    cmd = [sys.executable, "-m", "mamlpp", "bench", preset, f"outer.meta_batch={batch}", *extra,
           "--impl", impl, "--iters", str(iters), "--warmup", str(warmup), "--json", "--eval-tasks", str(eval_tasks)]
    if synthetic:
        cmd.append("--synthetic")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def markdown(rows: list[dict]) -> str:
    lines = ["| setting | impl | median s/iter | min | max | tasks/s | peak MB | eval (tasks, s) | speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = (f"{r['speedup_vs_loop']:.2f}x the loop" if "speedup_vs_loop" in r else
                 f"{r['speedup_vs_float32']:.2f}x float32" if "speedup_vs_float32" in r else "")
        ev = f"{r['eval_tasks']}, {r['eval_seconds']:.2f}" if "eval_seconds" in r else ""
        impl = r["impl"] + (" bf16" if r.get("precision") == "bf16" else "")
        lines.append(f"| {r['label']} | {impl} | {r['seconds_per_iter_median']:.3f} | "
                     f"{r['seconds_per_iter_min']:.3f} | {r['seconds_per_iter_max']:.3f} | "
                     f"{r['tasks_per_second']:.2f} | {r['peak_memory_mb']:.0f} | {ev} | {ratio} |")
    first = rows[0]
    lines.append(f"\nDevice: {first['device_name']}; torch {first['torch_version']}; "
                 f"{first['iters']} timed iterations after warm-up; data: real Omniglot, synthetic Mini-ImageNet.")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", required=True, help="names the results file, e.g. cpu-2core or h100")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--loop-up-to", type=int, default=8, help="largest meta-batch that also runs the loop")
    p.add_argument("--eval-tasks", type=int, default=0, help="also time evaluation over this many tasks")
    p.add_argument("--only", default="", help="comma-separated substrings of setting labels to run")
    p.add_argument("--markdown", default=None, help="write the table to this file too")
    p.add_argument("--bf16", choices=["auto", "yes", "no"], default="auto",
                   help="also time train.precision=bf16 (auto: where the machine has native bfloat16)")
    p.add_argument("extra", nargs="*", help="KEY=VALUE overrides for every setting, e.g. train.device=cuda")
    args = p.parse_args()
    rows = []
    bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and bf16_native(args.extra))
    for label, preset, batch, synthetic in SETTINGS:
        if args.only and not any(s in label for s in args.only.split(",")):
            continue
        impl = "both" if batch <= args.loop_up_to else "parallel"
        results = run(preset, batch, synthetic, impl, args.iters, args.warmup, args.eval_tasks, args.extra)
        if len(results) == 2:
            results[0]["speedup_vs_loop"] = results[1]["seconds_per_iter_median"] / results[0]["seconds_per_iter_median"]
        if bf16:
            half = run(preset, batch, synthetic, "parallel", args.iters, args.warmup, args.eval_tasks,
                       [*args.extra, "train.precision=bf16"])[0]
            half["speedup_vs_float32"] = results[0]["seconds_per_iter_median"] / half["seconds_per_iter_median"]
            results.insert(1, half)
        for r in results:
            r["label"] = label
            rows.append(r)
            print(json.dumps(r), flush=True)
    out = Path(__file__).parent / "results" / f"{args.tag}.jsonl"
    out.parent.mkdir(exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = markdown(rows)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
