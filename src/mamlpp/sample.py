"""`mamlpp sample RUN_DIR --out samples.png`: what a trained generative model (the Neural Statistician)
draws when it is conditioned on a set. Support sets come from the test split's fixed tasks (classes
never seen in training); each row of the PNG is one set: its images on the left, a blank column,
then new images generated from the set's context on the right (Bernoulli means, ink dark as in the data).
"""
from __future__ import annotations

import math
import sys

from .config import METHODS, ConfigError

PAD = 2  # pixels between the cells of the grid and around it


def grid_size(rows: int, columns: int, size: int, scale: int) -> tuple[int, int]:
    """(width, height) in pixels of a grid of rows x columns images of size x size, scaled."""
    return (PAD + columns * (size + PAD)) * scale, (PAD + rows * (size + PAD)) * scale


def draw_grid(support, samples, scale: int):
    """support [S, K, C, s, s] and samples [S, n, C, s, s] in [0, 1] -> a PIL image, one set per row."""
    import numpy as np
    from PIL import Image

    sets, shots, channels, size = support.shape[0], support.shape[1], support.shape[2], support.shape[-1]
    columns = shots + 1 + samples.shape[1]
    width, height = grid_size(sets, columns, size, 1)
    canvas = np.full((height, width, channels), 255, dtype=np.uint8)
    for row in range(sets):
        for col, image in [(c, support[row, c]) for c in range(shots)] + \
                          [(shots + 1 + j, samples[row, j]) for j in range(samples.shape[1])]:
            y, x = PAD + row * (size + PAD), PAD + col * (size + PAD)
            canvas[y:y + size, x:x + size] = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    picture = Image.fromarray(canvas[..., 0] if channels == 1 else canvas, "L" if channels == 1 else "RGB")
    return picture.resize((width * scale, height * scale), Image.NEAREST) if scale > 1 else picture


def cmd_sample(args) -> int:
    import torch

    from .data import build_tasks
    from .distributed import select_device
    from .rundir import RunDir
    from .trainer import Trainer

    for key in ("sets", "shots", "samples", "scale"):
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key} {getattr(args, key)}: must be >= 1")
    run = RunDir(args.run_dir)
    cfg = run.read_config()
    if not hasattr(METHODS.get(cfg.method.name), "sample"):
        raise ConfigError(f"{run}: method.name={cfg.method.name} is not a generative model; mamlpp sample draws "
                          "from the Neural Statistician (method.name=statistician)")
    best = run.best_checkpoint()
    if best is None:
        raise FileNotFoundError(f"no checkpoint in {run.checkpoints}: train the run first")
    device = select_device(args.device or cfg.train.device)
    cfg = cfg.copy()
    cfg.data.shots = args.shots  # support sets of --shots images of one test class
    tasks = build_tasks(cfg, device, data_dir=args.data_dir)
    trainer = Trainer(cfg, tasks, device)
    trainer.load_state_dict(run.load_checkpoint(best[0], device))
    episodes = tasks.eval_batch("test", 0, math.ceil(args.sets / cfg.data.ways))
    xs = episodes["xs"]  # [T, N*K, C, s, s], class-major: one class's K images are one set
    support = xs.reshape(-1, args.shots, *xs.shape[2:])[: args.sets]
    sets = torch.arange(args.sets, device=device).repeat_interleave(args.shots)
    torch.manual_seed(args.seed)  # the samples' randomness (the checkpoint's RNG state is not used)
    # All sets go through as one task, so that batch statistics (model.bn_eval=batch) see every set.
    samples = trainer.method.sample(trainer.params, trainer.state, support.reshape(1, -1, *xs.shape[2:]),
                                    sets.unsqueeze(0), args.sets, args.samples)[0]
    draw_grid(support, samples, args.scale).save(args.out)
    print(f"wrote {args.out}: {args.sets} test sets of {args.shots} (left) and {args.samples} samples each (right), "
          f"from the {best[1]}", file=sys.stdout)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sample", help="images a trained Neural Statistician generates, conditioned on test-split sets",
        description="Draw --sets sets of --shots images of one class each from the test split, and --samples new "
                    "images conditioned on each set, from the run's best validation checkpoint; write a PNG grid, one "
                    "set per row: the set on the left, its samples on the right.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run of method.name=statistician")
    p.add_argument("--out", default="samples.png", help="PNG to write (default: samples.png)")
    p.add_argument("--sets", type=int, default=8, help="sets, one per row (default 8)")
    p.add_argument("--shots", type=int, default=5, help="images per set (default 5, the training set size)")
    p.add_argument("--samples", type=int, default=5, help="generated images per set (default 5)")
    p.add_argument("--scale", type=int, default=2, help="pixel magnification of the PNG (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples' randomness")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    p.add_argument("--data-dir", default=None, help="data root (default: $MAMLPP_DATA, then the user cache)")
    p.set_defaults(func=cmd_sample)
