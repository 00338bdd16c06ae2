"""The inner loop: S steps of theta <- theta - alpha * grad on every task's support set, B tasks at once.

Learning rates alpha (params["lr"]):
  fixed    one scalar for every tensor and step (MAML), taken from the config, not learned;
  lslr     LSLR: one learned scalar per parameter tensor per step, shape (S,), unclamped;
  metasgd  Meta-SGD: one learned rate per parameter element, shared by all steps.
Steps past the trained count (evaluation with more steps) reuse the last step's rate and BN slot.
"""
from __future__ import annotations

from typing import Callable

import torch

from .config import InnerConfig

Tree = dict[str, torch.Tensor]


def init_rates(net: Tree, cfg: InnerConfig, generator: torch.Generator | None = None) -> Tree:
    """LSLR / Meta-SGD rates initialised to cfg.lr, or for Meta-SGD with cfg.lr_range = (lo, hi) each
    element drawn from U[lo, hi] (the Meta-SGD paper); {} for a fixed rate."""
    if cfg.lr_mode == "lslr":
        return {k: torch.full((cfg.steps,), cfg.lr, dtype=v.dtype, device=v.device) for k, v in net.items()}
    if cfg.lr_mode == "metasgd" and cfg.lr_range:
        lo, hi = cfg.lr_range
        return {k: (lo + (hi - lo) * torch.rand(v.shape, generator=generator, dtype=v.dtype)).to(v.device)
                for k, v in net.items()}
    if cfg.lr_mode == "metasgd":
        return {k: torch.full_like(v, cfg.lr) for k, v in net.items()}
    return {}


def step_rate(rates: Tree, cfg: InnerConfig, name: str, slot: int):
    if cfg.lr_mode == "lslr":
        return rates[name][slot]
    if cfg.lr_mode == "metasgd":
        return rates[name]
    return cfg.lr


def task_batched(net: Tree, tasks: int, detach: bool = False) -> Tree:
    """theta_0 for every task: a view of the meta-parameters with a leading task axis."""
    if detach:  # evaluation: a fresh leaf, so no graph reaches the meta-parameters
        return {k: v.detach().requires_grad_(True).expand(tasks, *v.shape) for k, v in net.items()}
    return {k: v.expand(tasks, *v.shape) for k, v in net.items()}


def inner_step(forward: Callable, fast: Tree, params: dict[str, Tree], cfg: InnerConfig, slot: int,
               support: tuple[torch.Tensor, torch.Tensor], loss_fn: Callable, create_graph: bool,
               use_running: bool = False, want_stats: bool = False):
    """One SGD step on the support set of every task.

    The gradient of the *sum* of per-task losses with respect to the task-batched fast weights is,
    slice by slice, each task's own gradient: the tasks share nothing after the fold. With
    create_graph the step is differentiable (second order); without it the gradient is a constant
    and meta-gradients flow only through the identity path, the rates and the forward passes.
    Returns (new fast weights, per-task support losses [B], BN statistics of the pass).
    """
    xs, ys = support
    out, stats = forward(fast, params["bn"], xs, slot, use_running, want_stats)
    losses = loss_fn(out, ys)
    grads = torch.autograd.grad(losses.sum(), list(fast.values()), create_graph=create_graph)
    rates = params["lr"]
    new = {k: w - step_rate(rates, cfg, k, slot) * g for (k, w), g in zip(fast.items(), grads)}
    return new, losses, stats
