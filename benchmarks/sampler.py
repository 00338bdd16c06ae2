"""Episode-sampler throughput on synthetic uint8 data of the real shapes; prints JSON.

  python benchmarks/sampler.py [--device cpu|cuda] [--seconds 2] [--mini-images-per-class 100]

Omniglot: 1623 classes x 20 images x 1x28x28, reference split (1150 train classes), 20-way 1-shot,
1 query, meta-batch 8, training rotation on. Mini-ImageNet: 64/16/20 classes x M images x 3x84x84
(M = 100 by default instead of 600, to keep the array at 0.2 GB; sampling cost does not depend on M
beyond the per-class argsort), 5-way 1-shot, 15 queries, meta-batch 2. Evaluation is timed for a
chunk of 200 tasks (the trainer's default eval_chunk).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from mamlpp.data import ImageSet, ImageTasks
from mamlpp.data.common import offsets_from_counts, plain_split, shuffled_split
from mamlpp.data.omniglot import REFERENCE_FRACTIONS, REFERENCE_SEED


def synthetic(classes: int, per_class: int, shape, norm: str, splits=None) -> ImageSet:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256 if norm != "none" else 2, size=(classes * per_class, *shape), dtype=np.uint8)
    names = [f"class{i:04d}" for i in range(classes)]
    if splits is None:
        splits = shuffled_split(names, REFERENCE_FRACTIONS, REFERENCE_SEED, exact=True)
    else:
        splits = {k: plain_split(v, names) for k, v in splits.items()}
    return ImageSet("synthetic", images, names, offsets_from_counts([per_class] * classes), splits, norm)


def rate(fn, tasks_per_call: int, seconds: float, sync) -> dict:
    fn()
    sync()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    sync()
    elapsed = time.perf_counter() - start
    return {"tasks_per_s": round(calls * tasks_per_call / elapsed, 1), "ms_per_call": round(1e3 * elapsed / calls, 3)}


def bench(tasks: ImageTasks, batch: int, seconds: float, sync) -> dict:
    it = iter(range(10**9))
    return {
        "train_batch": rate(lambda: tasks.train_batch(next(it), batch), batch, seconds, sync),
        "plan_only": rate(lambda: tasks.plan("train", range(batch)), batch, seconds, sync),
        "eval_batch_200": rate(lambda: tasks.eval_batch("val", 0, 200), 200, seconds, sync),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    parser.add_argument("--mini-images-per-class", type=int, default=100)
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    omniglot = ImageTasks(synthetic(1623, 20, (1, 28, 28), "none"), 20, 1, 1, seed=0, augment=True, device=device)
    m = args.mini_images_per_class
    mini_split = {"train": range(64), "val": range(64, 80), "test": range(80, 100)}
    mini = ImageTasks(synthetic(100, m, (3, 84, 84), "imagenet", mini_split), 5, 1, 15, seed=0, augment=False,
                      device=device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omniglot_20way_1shot_1query_B8": bench(omniglot, 8, args.seconds, sync),
        "mini_imagenet_5way_1shot_15query_B2": {"images_per_class": m, **bench(mini, 2, args.seconds, sync)},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
