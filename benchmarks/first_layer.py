"""Why the first layer's forward costs more inside an iteration than alone (BENCHMARKS.md, floor section).

Times Conv4's first-layer convolution three ways: every call of one meta-iteration as it runs, the same
call repeated at once inside the iteration, and the call captured from the iteration timed alone in a
loop, once reusing its output buffer (which stays in cache) and once keeping every output alive (fresh
memory each call, as in the iteration, where each output is kept for the backward).

    MAMLPP_DATA=../shared/data python benchmarks/first_layer.py [PRESET] [KEY=VALUE ...]
"""
from __future__ import annotations

import sys
import time

import torch

import mamlpp.kernels as kernels
from mamlpp.data import build_tasks
from mamlpp.presets import resolve
from mamlpp.trainer import Trainer


def per_call_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3


def main() -> int:
    args = sys.argv[1:] or ["omniglot-20w1s-mamlpp-reference"]
    cfg = resolve(args[0], args[1:])
    device = torch.device("cpu")
    tasks = build_tasks(cfg, device)
    trainer = Trainer(cfg, tasks, device)
    conv = kernels._conv
    inside = {"calls": 0, "first": 0.0, "again": 0.0}
    captured: dict = {}

    def timed(x, w, *rest):  # rest: bias, stride, padding, dilation, transposed, output_padding, groups
        if w.shape[1] != 1 or rest[4]:
            return conv(x, w, *rest)
        start = time.perf_counter()
        y = conv(x, w, *rest)
        middle = time.perf_counter()
        conv(x, w, *rest)
        inside["calls"] += 1
        inside["first"] += middle - start
        inside["again"] += time.perf_counter() - middle
        captured.setdefault("args", (x.detach().clone(memory_format=torch.preserve_format), w.detach().clone(),
                                     *[r.detach() if isinstance(r, torch.Tensor) else r for r in rest]))
        return y

    batches = [tasks.train_batch(i, cfg.outer.meta_batch) for i in range(2)]
    with trainer.threads():
        trainer.meta_step(batches[0], 0)
        kernels._conv = timed
        try:
            trainer.meta_step(batches[1], 0)
        finally:
            kernels._conv = conv
        call = captured["args"]
        reused = per_call_ms(lambda: conv(*call))
        kept: list[torch.Tensor] = []
        fresh = per_call_ms(lambda: kept.append(conv(*call)))
    n = inside["calls"]
    print(f"{cfg.name}: first-layer forward, input {list(call[0].shape)}, output "
          f"{list(conv(*call).shape)} ({conv(*call).numel() * 4 / 2**20:.1f} MB), ms per call:")
    print(f"  in the iteration: {inside['first'] / n * 1e3:.2f}; repeated at once there: {inside['again'] / n * 1e3:.2f}")
    print(f"  alone, output buffer reused: {reused:.2f}; alone, every output kept: {fresh:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
