"""How far the float32 and bf16 meta-gradients are from float64's, on real task batches.

For each of a few meta-batches of a preset, the meta-gradient of one meta-iteration (second order at
--epoch 0 of a -reference preset: MSL, 5 steps) is computed three times from the same float64 initial
parameters: in float64 (the reference), in float32, and with train.precision=bf16. Printed: the
relative error ||g - g64|| / ||g64|| over all meta-parameters, per batch and as a median. float32's
own error is several per cent on Omniglot (max-pool windows whose largest value flips between
precisions route the gradient elsewhere: docs/design.md), so bf16 is judged against that, not zero.

    python benchmarks/precision.py omniglot-5w1s-mamlpp-reference [KEY=VALUE ...] [--batches 5] [--synthetic] [--json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys

import torch

from mamlpp.bench import SyntheticTasks, device_name
from mamlpp.data import build_tasks
from mamlpp.distributed import select_device
from mamlpp.methods import flatten
from mamlpp.presets import resolve
from mamlpp.trainer import Trainer


def meta_gradient(trainer: Trainer, reference: dict[str, torch.Tensor], episodes: dict, epoch: int) -> torch.Tensor:
    """The flattened meta-gradient at the reference parameters (cast to the trainer's dtype)."""
    flat = flatten(trainer.params)
    with torch.no_grad():
        for k, v in flat.items():
            v.copy_(reference[k])
    trainer.optimizer.zero_grad(set_to_none=True)
    episodes = {k: v.to(trainer.dtype) if v.is_floating_point() else v for k, v in episodes.items()}
    with trainer.precision():
        loss, _, _ = trainer.method.meta_loss(trainer.params, trainer.state, episodes, epoch)
    loss.backward()
    return torch.cat([(v.grad if v.grad is not None else torch.zeros_like(v)).double().flatten()
                      for v in flat.values()])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--synthetic", action="store_true", help="random episodes of the preset's shapes")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    base = resolve(args.preset, args.overrides)
    device = select_device(base.train.device)
    variants = {"float64": ("float64", "full"), "float32": ("float32", "full"), "bf16": ("float32", "bf16")}
    trainers = {}
    for name, (dtype, precision) in variants.items():
        cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, dtype=dtype, precision=precision))
        tasks = (SyntheticTasks(cfg, device, getattr(torch, dtype)) if args.synthetic
                 else build_tasks(cfg, device, args.data_dir))
        trainers[name] = Trainer(cfg, tasks, device)
    reference = {k: v.detach().clone() for k, v in flatten(trainers["float64"].params).items()}
    errors: dict[str, list[float]] = {"float32": [], "bf16": []}
    with trainers["float64"].threads():
        for i in range(args.batches):
            episodes = trainers["float64"].tasks.train_batch(i, base.outer.meta_batch)
            exact = meta_gradient(trainers["float64"], reference, episodes, args.epoch)
            for name in errors:
                g = meta_gradient(trainers[name], reference, episodes, args.epoch)
                errors[name].append(((g - exact).norm() / exact.norm()).item())
    report = {"preset": base.name, "meta_batch": base.outer.meta_batch, "epoch": args.epoch,
              "device_name": device_name(device), "torch_version": torch.__version__,
              "relative_error": errors, "median": {k: statistics.median(v) for k, v in errors.items()}}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['preset']} B={report['meta_batch']} epoch {args.epoch} on {report['device_name']}, torch "
          f"{report['torch_version']}: meta-gradient relative error against float64")
    print("| precision | median | per batch |\n|---|---|---|")
    for name, v in errors.items():
        print(f"| {name} | {report['median'][name]:.2e} | {', '.join(f'{e:.2e}' for e in v)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
