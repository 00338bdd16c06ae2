"""Small builders shared by the core tests: tiny networks and random episodes in float64, a
synthetic image task source, and a sweep job that pauses where a test wants it."""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mamlpp.config import Config
from mamlpp.presets import get_preset
from mamlpp.methods import flatten
from mamlpp.methods.maml import MAML
from mamlpp.sweep import RunJob

F64 = torch.float64


def set_keys(cfg: Config, changes: dict) -> Config:
    """Apply {'section.key': value} to cfg in place (the method section is a frozen dataclass: replaced)."""
    for key, value in changes.items():
        section, name = key.split(".")
        if section == "method":
            cfg.method = dataclasses.replace(cfg.method, **{name: value})
        else:
            setattr(getattr(cfg, section), name, value)
    return cfg


def tiny_config(preset: str = "omniglot-5w1s-mamlpp", **changes) -> Config:
    """A preset shrunk to a few filters and steps; changes are {'section.key': value}."""
    cfg = get_preset(preset)
    cfg.model.filters, cfg.model.stages = 4, 3
    cfg.inner.steps = 3
    return set_keys(cfg, changes)


def smooth(cfg: Config) -> Config:
    """Finite differences need a smooth network: tanh and average pooling, no kinks."""
    cfg.model.activation, cfg.model.pooling = "tanh", "avg"
    return cfg


def init_learner(cfg: Config, shape, ways: int, device, dtype, seed: int):
    """(backbone, params, state) of MAML's learner, as the trainer initialises it."""
    method = MAML(cfg, "classification", shape, ways)
    params, state = method.init(torch.Generator().manual_seed(seed), dtype, device)
    return method.backbone, params, state


def learner(cfg: Config, shape=(1, 12, 12), ways=3, seed=0, perturb_bn=True):
    """(model, params, state) in float64; BN weights/state moved off their init so that every
    per-step slot is distinguishable."""
    model, params, state = init_learner(cfg, shape, ways, "cpu", F64, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        if perturb_bn:
            for t in params["bn"].values():
                t.add_(0.2 * torch.randn(t.shape, generator=g, dtype=F64))
        for t in params["lr"].values():
            t.mul_(1 + 0.3 * torch.rand(t.shape, generator=g, dtype=F64))
    state = {k: v + 0.5 * torch.rand(v.shape, generator=g, dtype=F64) for k, v in state.items()}
    return model, params, state


def episodes(tasks=3, ways=3, shots=2, queries=2, shape=(1, 12, 12), seed=0):
    g = torch.Generator().manual_seed(100 + seed)
    return {
        "xs": torch.randn(tasks, ways * shots, *shape, generator=g, dtype=F64),
        "ys": torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1),
        "xq": torch.randn(tasks, ways * queries, *shape, generator=g, dtype=F64),
        "yq": torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1),
    }


def meta_grad(loss_fn, model, params, state, eps, cfg, epoch=0, kind="classification"):
    """(loss, flat gradient over every meta-parameter, new state)."""
    flat = flatten(params)
    loss, _, new_state = loss_fn(model, params, state, eps, cfg, epoch, kind)
    grads = torch.autograd.grad(loss, list(flat.values()), allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(flat.values(), grads)]
    return loss.detach(), dict(zip(flat, grads)), new_state


def cat(grads: dict) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads.values()])


def image_tasks(cfg: Config, classes: int = 15, per_class: int = 4, size: int = 16, seed: int = 0,
                augment: bool = True):
    """ImageTasks (cfg's N, K, T, seed and dtype) over random 1-channel size x size images, the
    classes split evenly into train/val/test: an image source that needs no data set."""
    import numpy as np

    from mamlpp.data import ImageSet, ImageTasks
    from mamlpp.data.common import offsets_from_counts, plain_split

    images = np.random.default_rng(seed).integers(0, 256, size=(classes * per_class, 1, size, size), dtype=np.uint8)
    names = [f"class{c:02d}" for c in range(classes)]
    splits = {s: plain_split(part, names) for s, part in zip(("train", "val", "test"),
                                                             np.array_split(np.arange(classes), 3))}
    data = ImageSet("synthetic", images, names, offsets_from_counts([per_class] * classes), splits, "unit")
    d = cfg.data
    return ImageTasks(data, d.ways, d.shots, d.queries, seed=cfg.train.seed, augment=augment,
                      dtype=getattr(torch, cfg.train.dtype))


@dataclass
class PausedRunJob(RunJob):
    """A sweep job that pauses the first time training reaches iteration `pause_at`: it writes its
    pid to `marker` and sleeps until a signal ends the process (a pre-emption test's fixed point in
    the run, after the checkpoints of the epochs before). Run again, it does not pause."""
    marker: str = ""
    pause_at: int = 0

    def __call__(self) -> dict:
        from mamlpp.sinusoid import SinusoidTasks

        marker, real = Path(self.marker), SinusoidTasks.train_batch

        def train_batch(tasks, iteration, batch_size):
            if iteration >= self.pause_at and not marker.exists():
                marker.with_suffix(".tmp").write_text(str(os.getpid()))
                os.replace(marker.with_suffix(".tmp"), marker)
                time.sleep(300)  # the test's signal ends this process here
            return real(tasks, iteration, batch_size)

        SinusoidTasks.train_batch = train_batch
        return super().__call__()


def build(cfg: Config, shape=(1, 8, 8), ways=3, seed=0):
    """(method, params, state) of cfg's method, in float64, for tasks of `ways` classes of `shape` images."""
    from mamlpp.methods import build_method

    method = build_method(cfg, "classification", shape, ways)
    params, state = method.init(torch.Generator().manual_seed(seed), F64, "cpu")
    return method, params, state


def training_loss(method, params, state, eps, epoch=0, before_call=None):
    """(loss, inputs): the method's training loss as a function of its flattened parameters, and those
    parameters as fresh leaves, for gradcheck. The global generator is reseeded on every call, so the
    random draws of a method (pairs, shuffles, dropout, noise) repeat; before_call runs first."""
    names = list(flatten(params))

    def loss(*tensors):
        tree = {}
        for name, t in zip(names, tensors):
            group, key = name.split(".", 1)
            tree.setdefault(group, {})[key] = t
        torch.manual_seed(0)
        if before_call:
            before_call()
        return method.meta_loss(tree, state, eps, epoch=epoch)[0]

    return loss, tuple(t.detach().clone().requires_grad_(True) for t in flatten(params).values())

