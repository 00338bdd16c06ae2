"""The per-layer convolution floor of one meta-iteration, beside what the iteration measures.

One meta-iteration of a preset runs under torch.profiler with shapes. Every convolution call it makes
(forward, the backward's input and weight gradients, the transposed convolutions of the second-order
double backward) is recorded with its shapes, groups and FLOPs. Each distinct call is then timed alone
in every formulation available for it, and the fastest is its floor:

  as-run      the call exactly as the iteration made it (its tensors' strides)
  nchw, cl    the same call with contiguous or channels-last tensors
  per-group   one plain convolution per group (what a per-task loop runs), in the as-run layout
  bf16, bf16-cl   the same call in bfloat16 (the `train.precision=bf16` floor, reported apart)

The table lists, per layer and kind of call, the calls, GFLOP, the time measured inside the iteration
(profiler, children included), the float32 floor with its best formulation, and the bfloat16 floor.
The summary adds the iteration's wall time (without the profiler) and the profiler's self time by op
category, so the floor stands beside everything else the iteration spends.

    python benchmarks/floor.py omniglot-20w1s-mamlpp-reference [KEY=VALUE ...] [--impl loop] [--synthetic] [--json]
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from mamlpp.bench import SyntheticTasks, device_name
from mamlpp.data import build_tasks
from mamlpp.distributed import select_device
from mamlpp.presets import resolve
from mamlpp.trainer import Trainer

CONV_OPS = ("aten::convolution", "aten::convolution_backward")
CATEGORIES = [  # first match wins
    ("convolution", ("conv",)),
    ("max-pool", ("max_pool",)),
    ("batch norm", ("batch_norm", "var", "native_batch")),
    ("matmul", ("bmm", "mm", "addmm", "baddbmm", "linear")),
    ("element-wise", ("mul", "add", "sub", "div", "fill", "leaky_relu", "threshold", "neg", "where", "clamp",
                      "pow", "sqrt", "rsqrt", "exp", "log", "copy", "sum", "mean", "cat", "zero", "expand",
                      "_to_copy")),
]


def category(name: str) -> str:
    name = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "other"


@dataclasses.dataclass(frozen=True)
class Call:
    """One distinct convolution call: op, tensor shapes and the non-tensor arguments."""
    op: str
    shapes: tuple  # forward: (input, weight, bias); backward: (grad_output, input, weight)
    strides: tuple  # of the same tensors, as the iteration laid them out
    stride: tuple
    padding: tuple
    transposed: bool
    groups: int
    mask: tuple = ()  # backward only: (input, weight, bias) gradients wanted

    @property
    def weight(self):
        return self.shapes[1] if self.op == "aten::convolution" else self.shapes[2]

    @property
    def x(self):
        return self.shapes[0] if self.op == "aten::convolution" else self.shapes[1]

    def forward_flops(self) -> int:
        """FLOPs of the forward convolution (a transposed one counted from its input side)."""
        w, x = self.weight, self.x
        k = w[2] * w[3]
        if self.transposed:
            return 2 * x[0] * x[1] * x[2] * x[3] * w[1] * k
        ho = (x[2] + 2 * self.padding[0] - w[2]) // self.stride[0] + 1
        wo = (x[3] + 2 * self.padding[1] - w[3]) // self.stride[1] + 1
        return 2 * x[0] * w[0] * ho * wo * w[1] * k

    @property
    def flops(self) -> int:
        if self.op == "aten::convolution":
            return self.forward_flops()
        return self.forward_flops() * (int(self.mask[0]) + int(self.mask[1]))

    @property
    def layer(self) -> str:
        """The base learner's layer in per-task terms: size, input -> output channels."""
        w, x = self.weight, self.x
        cin, cout = (w[0] // self.groups, w[1]) if self.transposed else (w[1], w[0] // self.groups)
        return f"{x[2]}x{x[3]} {cin}->{cout}"

    @property
    def signature(self) -> str:
        x, w = self.x, self.weight
        bias = " +bias" if self.op == "aten::convolution" and self.shapes[2] else ""
        return (f"x{list(x)} w{list(w)} g{self.groups}" + (f" s{self.stride[0]}" if self.stride[0] > 1 else "")
                + bias)

    @property
    def kind(self) -> str:
        if self.op == "aten::convolution":
            return "transposed (2nd-order)" if self.transposed else "forward"
        wanted = [name for name, m in zip(("input", "weight"), self.mask) if m]
        return "backward " + "+".join(wanted) + (" (transposed)" if self.transposed else "")


def record(trainer: Trainer, batch, epoch: int):
    """Profile one meta-iteration: {Call: [microseconds of each call]} and self time per op category."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        trainer.meta_step(batch, epoch)
    calls: dict[Call, list[float]] = collections.defaultdict(list)
    for e in prof.events():
        if e.name not in CONV_OPS:
            continue
        parent = e.cpu_parent
        while parent is not None and parent.name not in CONV_OPS:
            parent = parent.cpu_parent
        if parent is not None:
            continue  # nested inside another convolution call, counted there
        args = e.concrete_inputs
        if e.name == "aten::convolution":
            call = Call(e.name, tuple(tuple(s) for s in e.input_shapes[:3]),
                        tuple(tuple(s) for s in e.structured_input_strides[:3]), tuple(args[3]), tuple(args[4]),
                        bool(args[6]), int(args[8]))
        else:
            call = Call(e.name, tuple(tuple(s) for s in e.input_shapes[:3]),
                        tuple(tuple(s) for s in e.structured_input_strides[:3]), tuple(args[4]), tuple(args[5]),
                        bool(args[7]), int(args[9]), tuple(bool(m) for m in args[10]))
        calls[call].append(e.cpu_time_total)
    categories = collections.Counter()
    for e in prof.key_averages():
        categories[category(e.key)] += e.self_cpu_time_total
    return calls, categories


def _tensors(call: Call, dtype, layout: str, generator: torch.Generator):
    def make(shape, strides):
        t = torch.randn(shape, generator=generator).to(dtype)
        if layout == "as-run":
            return torch.empty_strided(shape, strides, dtype=dtype).copy_(t)
        return t.contiguous(memory_format=torch.channels_last) if layout == "cl" and len(shape) == 4 else t
    return [make(s, st) if s else None for s, st in zip(call.shapes, call.strides)]


def _run(call: Call, tensors, per_group: bool):
    conv, back = torch.ops.aten.convolution, torch.ops.aten.convolution_backward
    dil, outpad = [1, 1], [0, 0]
    groups = [(tensors, call.groups)]
    if per_group and call.groups > 1:  # split every grouped tensor along its group axis
        g = call.groups
        if call.op == "aten::convolution":
            x, w, b = tensors
            groups = [([xi, wi, None if b is None else bi], 1) for xi, wi, bi in
                      zip(x.chunk(g, 1), w.chunk(g, 0), (b.chunk(g) if b is not None else [None] * g))]
        else:
            go, x, w = tensors
            groups = [([gi, xi, wi], 1) for gi, xi, wi in zip(go.chunk(g, 1), x.chunk(g, 1), w.chunk(g, 0))]
    for ts, gr in groups:
        if call.op == "aten::convolution":
            conv(ts[0], ts[1], ts[2], list(call.stride), list(call.padding), dil, call.transposed, outpad, gr)
        else:
            bias = [ts[2].shape[1] * gr] if call.transposed else [ts[2].shape[0]]
            back(ts[0], ts[1], ts[2], bias if call.mask[2] else None, list(call.stride), list(call.padding), dil,
                 call.transposed, outpad, gr, list(call.mask))


def time_alone(call: Call, formulation: str, min_seconds: float = 0.05) -> float:
    """Median microseconds of the call alone in one formulation."""
    dtype = torch.bfloat16 if formulation.startswith("bf16") else torch.float32
    layout = "cl" if formulation.endswith("cl") else "nchw" if formulation == "nchw" else "as-run"
    tensors = _tensors(call, dtype, layout, torch.Generator().manual_seed(0))
    per_group = formulation == "per-group"
    for _ in range(2):
        _run(call, tensors, per_group)
    times: list[float] = []
    while sum(times) < min_seconds * 1e6 or len(times) < 5:
        start = time.perf_counter()
        _run(call, tensors, per_group)
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


FP32 = ("as-run", "nchw", "cl", "per-group")
BF16 = ("bf16", "bf16-cl")


def floor_report(cfg, tasks, device, impl: str, epoch: int) -> dict:
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, impl=impl, chunk=cfg.outer.meta_batch if impl == "loop" else cfg.train.chunk))
    trainer = Trainer(cfg, tasks, device)
    batches = [tasks.train_batch(i, cfg.outer.meta_batch) for i in range(4)]
    with trainer.threads() as threads:
        trainer.meta_step(batches[0], epoch)  # warm-up
        walls = []
        for b in batches[1:3]:
            start = time.perf_counter()
            trainer.meta_step(b, epoch)
            walls.append(time.perf_counter() - start)
        calls, categories = record(trainer, batches[3], epoch)
        rows = []
        for call, times in calls.items():
            alone = {f: time_alone(call, f) for f in FP32 + BF16}
            best = min(FP32, key=alone.get)
            best16 = min(BF16 + FP32, key=alone.get)
            rows.append({"layer": call.layer, "kind": call.kind, "shapes": call.signature, "calls": len(times), "gflop": call.flops * len(times) / 1e9,
                         "measured_ms": sum(times) / 1e3, "floor_ms": alone[best] * len(times) / 1e3, "best": best,
                         "floor_bf16_ms": alone[best16] * len(times) / 1e3, "best_bf16": best16,
                         "alone_us": alone})
    rows.sort(key=lambda r: (r["layer"], r["kind"]))
    total = sum(categories.values())
    chunk = cfg.train.chunk or trainer._auto_chunk(cfg.outer.meta_batch, batches[0])
    return {"preset": cfg.name, "impl": impl, "meta_batch": cfg.outer.meta_batch, "chunk": chunk,
            "device_name": device_name(device), "threads": threads, "torch_version": torch.__version__,
            "wall_seconds": min(walls), "rows": rows,
            "conv_measured_s": sum(r["measured_ms"] for r in rows) / 1e3,
            "floor_s": sum(r["floor_ms"] for r in rows) / 1e3,
            "floor_bf16_s": sum(r["floor_bf16_ms"] for r in rows) / 1e3,
            "gflop": sum(r["gflop"] for r in rows),
            "profile_percent": {k: round(100 * v / total, 1) for k, v in categories.most_common()}}


def print_report(r: dict) -> None:
    print(f"{r['preset']} impl={r['impl']} B={r['meta_batch']} chunk={r['chunk']} on {r['device_name']}, "
          f"{r['threads']}, torch {r['torch_version']}")
    print("| layer | call | shapes | calls | GFLOP | measured ms | as-run alone ms | float32 floor ms (best) | "
          "measured / floor | bf16 floor ms (best) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in r["rows"]:
        alone = row["alone_us"]["as-run"] * row["calls"] / 1e3
        print(f"| {row['layer']} | {row['kind']} | {row['shapes']} | {row['calls']} | {row['gflop']:.2f} | {row['measured_ms']:.0f} | "
              f"{alone:.0f} | {row['floor_ms']:.0f} ({row['best']}) | {row['measured_ms'] / row['floor_ms']:.2f}x | "
              f"{row['floor_bf16_ms']:.0f} ({row['best_bf16']}) |")
    alone = sum(row["alone_us"]["as-run"] * row["calls"] for row in r["rows"]) / 1e3
    print(f"| all convolutions | | | | {r['gflop']:.1f} | {r['conv_measured_s'] * 1e3:.0f} | {alone:.0f} | {r['floor_s'] * 1e3:.0f} | "
          f"{r['conv_measured_s'] / r['floor_s']:.2f}x | {r['floor_bf16_s'] * 1e3:.0f} |")
    print(f"\niteration wall time {r['wall_seconds']:.3f} s (no profiler) = {r['wall_seconds'] / r['floor_s']:.2f}x "
          f"the float32 convolution floor ({r['floor_s']:.3f} s), {r['wall_seconds'] / r['floor_bf16_s']:.2f}x the "
          f"bf16 floor ({r['floor_bf16_s']:.3f} s)")
    print("profiler self time: " + ", ".join(f"{k} {v}%" for k, v in r["profile_percent"].items()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--impl", choices=["parallel", "loop"], default="parallel")
    p.add_argument("--epoch", type=int, default=0, help="epoch the schedules are at (0: MSL on)")
    p.add_argument("--synthetic", action="store_true", help="random episodes of the preset's shapes")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    cfg = resolve(args.preset, args.overrides)
    device = select_device(cfg.train.device)
    if device.type != "cpu":
        raise SystemExit("floor.py times convolutions on the CPU; on a GPU use torch.profiler's CUDA activity")
    if cfg.train.precision != "full":
        raise SystemExit("floor.py profiles the float32 iteration; its bf16 column is bfloat16's floor")
    tasks = (SyntheticTasks(cfg, device, getattr(torch, cfg.train.dtype)) if args.synthetic
             else build_tasks(cfg, device, args.data_dir))
    report = floor_report(cfg, tasks, device, args.impl, args.epoch)
    print(json.dumps(report) if args.json else "", end="\n" if args.json else "")
    if not args.json:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
