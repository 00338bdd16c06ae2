"""`mamlpp data prepare|check|show`: build a data set's cache, report on it, draw one episode.

The cmd_* functions take an already-resolved mamlpp.config.Config; `register` adds the argparse
subcommand for a CLI that supplies `resolve_config(preset, dataset, overrides) -> Config`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import DataError, ImageTasks, build_image_tasks, load_image_set


def cmd_prepare(cfg, data_dir: str | None = None, force: bool = False) -> int:
    """Build (force: rebuild) the cache of cfg.data's data set, downloading Omniglot or CIFAR-100 if missing."""
    data = load_image_set(cfg.data, data_dir, force=force)
    print(f"{data.dataset}: {len(data.images)} images of {len(data.class_names)} classes, "
          f"{'x'.join(map(str, data.images.shape[1:]))} uint8, cached in {data.cache_path}")
    return 0


def cmd_check(cfg, data_dir: str | None = None) -> int:
    """Print sources with checksums and split sizes, and check N/K/T against every split."""
    data = load_image_set(cfg.data, data_dir)
    split = cfg.data.split if data.dataset == "omniglot" else (data.split_source or "own")
    print(f"data set   {data.dataset} (split: {split})")
    print(f"cache      {data.cache_path}")
    print(f"images     {len(data.images)} of shape {tuple(data.images.shape[1:])}, {len(data.class_names)} classes")
    for source, checksum in data.sources.items():
        print(f"source     {source}  {checksum}")
    counts = data.counts
    print(f"{'split':<6} {'classes':>8} {'images':>8} {'min/class':>10} {'max/class':>10}")
    for name, split in data.splits.items():
        c = counts[split.classes]
        print(f"{name:<6} {len(c):>8} {int(c.sum()):>8} {int(c.min()) if len(c) else 0:>10} {int(c.max()) if len(c) else 0:>10}")
    d = cfg.data
    ImageTasks(data, d.ways, d.shots, d.queries, seed=cfg.train.seed, augment=False)  # raises if too small
    print(f"ok: {d.ways}-way {d.shots}-shot {d.queries}-query tasks fit every split")
    return 0


def render_episode(tasks: ImageTasks, episode: dict, task: int = 0) -> Image.Image:
    """One task as a picture: support rows (one per label) above, query rows below."""
    n, k, q = tasks.ways, tasks.shots, tasks.queries
    c, h, w = tasks.input_shape
    scale = max(1, 56 // max(h, w))
    cell_w, cell_h, pad, left, title = w * scale + 4, h * scale + 4, 4, 44, 16
    width = left + max(k, q) * cell_w + pad
    height = 2 * title + 2 * n * cell_h + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for part, xs, ys, per in (("support", "xs", "ys", k), ("query", "xq", "yq", q)):
        draw.text((pad, y + 2), f"{part} ({per} per class)", fill="black")
        y += title
        pixels = tasks.to_uint8(episode[xs][task])  # [n*per, C, H, W]
        if tasks.data.norm == "none" and pixels.max() <= 1:  # Omniglot's {0, 1}
            pixels = pixels * np.uint8(255)
        labels = episode[ys][task].tolist()
        for row in range(n):
            draw.text((pad, y + cell_h // 2 - 6), f"{labels[row * per]:>3}", fill="black")
            for col in range(per):
                a = pixels[row * per + col]
                img = Image.fromarray(a[0] if c == 1 else np.ascontiguousarray(a.transpose(1, 2, 0)))
                img = img.convert("RGB").resize((w * scale, h * scale), Image.NEAREST)
                x0 = left + col * cell_w
                draw.rectangle([x0, y, x0 + cell_w - 2, y + cell_h - 2], outline=(160, 160, 160))
                canvas.paste(img, (x0 + 1, y + 1))
            y += cell_h
    return canvas


def cmd_show(cfg, data_dir: str | None, out_png: str, split: str = "train") -> Path:
    """Write a PNG of task 0 of `split` (train: with the training augmentation)."""
    tasks = build_image_tasks(cfg, torch.device("cpu"), torch.float32, data_dir)
    episode = tasks.train_batch(0, 1) if split == "train" else tasks.eval_batch(split, 0, 1)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    render_episode(tasks, episode).save(out)
    print(f"wrote {out}: task 0 of {split}, {tasks.ways}-way {tasks.shots}-shot {tasks.queries}-query")
    return out


def register(subparsers, resolve_config) -> None:
    """Add `data prepare|check|show [PRESET] [--dataset NAME] [--data-dir DIR] [KEY=VALUE ...]`.
    resolve_config(preset, dataset, overrides) -> Config is supplied by the main CLI."""
    parser = subparsers.add_parser("data", help="prepare, check or look at an image data set")
    sub = parser.add_subparsers(dest="data_command", required=True)
    helps = {"prepare": "decode the data set into its cache (downloads Omniglot or CIFAR-100 if missing)",
             "check": "print split sizes and source checksums, check ways/shots/queries",
             "show": "write a PNG of one sampled episode"}
    for name, text in helps.items():
        p = sub.add_parser(name, help=text)
        p.add_argument("preset", nargs="?", help="preset name (or give --dataset)")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.ways=5")
        p.add_argument("--dataset", help="data set without a preset: omniglot, mini_imagenet, cifar_fs, fc100, "
                                         "tiered_imagenet, cub, folder")
        p.add_argument("--data-dir", default=None, help="data root (folder data set: the image folder)")
        if name == "prepare":
            p.add_argument("--force", action="store_true", help="rebuild the cache even if it exists")
        if name == "show":
            p.add_argument("--out", default="episode.png", help="PNG to write (default episode.png)")
            p.add_argument("--split", default="train", choices=("train", "val", "test"))
    parser.set_defaults(func=lambda args: _dispatch(args, resolve_config))


def _dispatch(args, resolve_config) -> int:
    preset, overrides = args.preset, list(args.overrides)
    if preset and "=" in preset:  # argparse hands the first KEY=VALUE to the optional positional
        preset, overrides = None, [preset, *overrides]
    try:
        cfg = resolve_config(preset, args.dataset, overrides)
        if args.data_command == "prepare":
            return cmd_prepare(cfg, args.data_dir, force=args.force)
        if args.data_command == "check":
            return cmd_check(cfg, args.data_dir)
        cmd_show(cfg, args.data_dir, args.out, args.split)
        return 0
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
