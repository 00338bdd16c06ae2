"""Peak memory of one second-order MAML++ meta-iteration with and without train.checkpoint_inner.

    python benchmarks/memory_inner.py [PRESET] [KEY=VALUE ...] [--epoch E] [--json]

Defaults: `mini-5w1s-mamlpp-resnet12` (ResNet-12, 84x84, 5-way 1-shot, 15 queries, 5 inner steps, MSL)
at meta-batch 2 in one pass (outer.meta_batch=2 train.chunk=2: the whole meta-batch's graph, as on a
GPU), synthetic episodes, at the first epoch that is second order (the preset's DA runs first order
before it). Each setting runs in a fresh process, so that one measurement cannot inherit the other's
heap: on a GPU the peak is torch.cuda.max_memory_allocated over the iteration; on a CPU the
process's peak resident set (VmHWM, exact, not sampled) and the resident set just before the
iteration. Time is wall-clock and, on a CPU shared with other jobs the steadier measure, the process's
CPU time. Overrides follow the preset, e.g. `model.widths=16,40,80,160` or `train.device=cuda`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

DEFAULTS = ["outer.meta_batch=2", "train.chunk=2", "train.dtype=float32"]


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(preset: str, overrides: list[str], epoch: int | None) -> dict:
    """One meta-iteration in this process (the child)."""
    import torch

    from mamlpp.bench import SyntheticTasks, device_name
    from mamlpp.distributed import select_device
    from mamlpp.presets import resolve
    from mamlpp.schedules import second_order_at
    from mamlpp.trainer import Trainer

    cfg = resolve(preset, DEFAULTS + overrides)
    if epoch is None:
        epoch = max(cfg.inner.da_epochs + 1, 0)
    if not second_order_at(cfg, epoch):
        raise SystemExit(f"epoch {epoch} is first order for this config; pass --epoch")
    device = select_device(cfg.train.device)
    tasks = SyntheticTasks(cfg, device, getattr(torch, cfg.train.dtype))
    trainer = Trainer(cfg, tasks, device)
    batch = tasks.train_batch(0, cfg.outer.meta_batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    else:
        before = _status_mb("VmRSS")
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.meta_step(batch, epoch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _status_mb("VmHWM")
    return {"checkpoint_inner": cfg.train.checkpoint_inner, "preset": preset, "overrides": DEFAULTS + overrides,
            "epoch": epoch, "arch": cfg.model.arch, "widths": list(cfg.model.widths), "meta_batch": cfg.outer.meta_batch,
            "chunk": cfg.train.chunk, "ways": cfg.data.ways, "shots": cfg.data.shots, "queries": cfg.data.queries,
            "inner_steps": cfg.inner.steps, "image": list(tasks.input_shape), "dtype": cfg.train.dtype,
            "peak_mb": round(peak, 1), "before_mb": round(before, 1), "iteration_mb": round(peak - before, 1),
            "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2), "device_name": device_name(device), "torch_version": torch.__version__,
            "date": datetime.date.today().isoformat()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", nargs="?", default="mini-5w1s-mamlpp-resnet12")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--epoch", type=int, default=None, help="schedule epoch (default: the first second-order one)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.preset, args.overrides, args.epoch)))
        return 0
    results = []
    for on in ("false", "true"):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", args.preset, *args.overrides,
               f"train.checkpoint_inner={on}"] + (["--epoch", str(args.epoch)] if args.epoch is not None else [])
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout  # stderr passes through
        results.append(json.loads(out.strip().splitlines()[-1]))
        r = results[-1]
        print(json.dumps(r) if args.json else
              f"checkpoint_inner={on:5}: peak {r['peak_mb']:9.1f} MB (before the iteration {r['before_mb']:.1f} MB, "
              f"the iteration {r['iteration_mb']:.1f} MB), {r['seconds']:.1f} s ({r['cpu_seconds']:.1f} s of CPU time)",
              flush=True)
    off, on_ = results
    if not args.json:
        print(f"peak {off['peak_mb'] / on_['peak_mb']:.2f}x lower with checkpoint_inner (iteration's own memory "
              f"{off['iteration_mb'] / on_['iteration_mb']:.2f}x), {on_['seconds'] / off['seconds']:.2f}x the time "
              f"({on_['cpu_seconds'] / off['cpu_seconds']:.2f}x the CPU time); "
              f"{off['arch']} widths {off['widths']}, {off['ways']}-way {off['shots']}-shot {off['queries']} queries, "
              f"B={off['meta_batch']} (chunk {off['chunk']}), {off['inner_steps']} steps, image {off['image']}, "
              f"epoch {off['epoch']}; {off['device_name']}, torch {off['torch_version']}, {off['date']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
