"""Where one meta-iteration's time goes: torch.profiler op categories for both paths, the FLOP count
of the iteration (torch.utils.flop_counter) and this machine's measured convolution rate, giving the
arithmetic floor (FLOPs / rate) beside the measured time.

The FLOPs are counted on the per-task loop: the counter's formula for a grouped convolution's
weight gradient counts every group's full weight (B times too much on the parallel path), while
both paths do the same arithmetic.

    python benchmarks/breakdown.py omniglot-20w1s-mamlpp-reference [KEY=VALUE ...] [--synthetic]
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from mamlpp.bench import SyntheticTasks, device_name
from mamlpp.cli import resolve_config
from mamlpp.tasks import build_tasks
from mamlpp.trainer import Trainer, select_device

CATEGORIES = [  # first match wins
    ("convolution", ("conv",)),
    ("max-pool", ("max_pool",)),
    ("batch norm", ("batch_norm", "var", "native_batch")),
    ("matmul", ("bmm", "mm", "addmm", "baddbmm", "linear")),
    ("element-wise", ("mul", "add", "sub", "div", "fill", "leaky_relu", "threshold", "neg", "where", "clamp",
                      "pow", "sqrt", "rsqrt", "exp", "log", "copy", "sum", "mean", "cat", "zero", "expand")),
]


def category(name: str) -> str:
    name = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "other"


def measure_conv_rate(device, filters=64, batch=160, size=14, reps=20) -> float:
    """GFLOP/s of a 3x3 convolution of the base learner's typical shape (forward only)."""
    x = torch.randn(batch, filters, size, size, device=device)
    w = torch.randn(filters, filters, 3, 3, device=device)
    for _ in range(3):
        F.conv2d(x, w, padding=1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        F.conv2d(x, w, padding=1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    flops = 2 * batch * filters * filters * 9 * size * size * reps
    return flops / (time.perf_counter() - start) / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    cfg = resolve_config(args.preset, args.overrides)
    device = select_device(cfg.train.device)
    dtype = getattr(torch, cfg.train.dtype)
    tasks = SyntheticTasks(cfg, device, dtype) if args.synthetic else build_tasks(cfg, device)
    batch = tasks.train_batch(0, cfg.outer.meta_batch)
    report = {"preset": cfg.name, "meta_batch": cfg.outer.meta_batch, "device_name": device_name(device),
              "torch_version": torch.__version__, "conv_gflops_per_s": measure_conv_rate(device)}
    for impl in ("parallel", "loop"):
        c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, impl=impl))
        trainer = Trainer(c, tasks, device)
        trainer.meta_step(batch, 0)  # warm-up
        if impl == "loop":
            with FlopCounterMode(display=False) as counter:
                trainer.meta_step(batch, 0)
            report["gflop"] = counter.get_total_flops() / 1e9
        start = time.perf_counter()
        trainer.meta_step(batch, 0)
        seconds = time.perf_counter() - start
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])) as prof:
            trainer.meta_step(batch, 0)
        use_cuda = device.type == "cuda"
        totals = collections.Counter()
        for e in prof.key_averages():
            totals[category(e.key)] += (e.self_device_time_total if use_cuda else e.self_cpu_time_total)
        all_time = sum(totals.values())
        report[impl] = {"seconds": seconds,
                        "breakdown_percent": {k: round(100 * v / all_time, 1) for k, v in totals.most_common()}}
    report["floor_seconds"] = report["gflop"] / report["conv_gflops_per_s"]
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['preset']} B={report['meta_batch']} on {report['device_name']}, torch {report['torch_version']}")
    print(f"measured 3x3 convolution rate: {report['conv_gflops_per_s']:.0f} GFLOP/s; one iteration: "
          f"{report['gflop']:.1f} GFLOP; floor {report['floor_seconds']:.3f} s")
    for impl in ("parallel", "loop"):
        r = report[impl]
        print(f"\n{impl}: {r['seconds']:.3f} s/iter ({r['seconds'] / report['floor_seconds']:.1f}x the floor)")
        print("| category | share of time |\n|---|---|")
        for k, v in r["breakdown_percent"].items():
            print(f"| {k} | {v}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
