"""The meta-objective: adapt every task, score its query set, and combine the tasks (spec 2.2, 3, 5.4).

meta_loss   training: MSL-weighted query losses, first/second order by DA, sum or mean over tasks,
            and the BNRS running statistics folded in; returns a new state.
evaluate    validation/test: the final-step query predictions after adaptation, with no
            second-order graph, many tasks at once; never changes the state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import Config
from .distributed import Shard
from .inner import inner_step, task_batched
from .network import update_running_stats
from .schedules import second_order_at, step_weights

Tree = dict[str, torch.Tensor]


def task_losses(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean loss of each task: cross-entropy over its queries, or MSE for regression. -> [B]"""
    if kind == "classification":
        return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)
    return (out - y).pow(2).flatten(1).mean(1)


def task_accuracy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.argmax(-1) == y).to(out.dtype).mean(1)


def adapt_and_score(model, params: dict[str, Tree], state: Tree, episodes: dict, cfg: Config, *, kind: str,
                    steps: int, weights: list[float], create_graph: bool, training: bool):
    """Run `steps` inner steps for all tasks and the weighted query losses (shared by train and eval).

    BN slot i serves the support pass of step i and the query pass after update i (spec 2.2).
    Returns (weighted query loss per task [B], final query output, BN passes for BNRS).

    With train.checkpoint_inner (training only), activations are recomputed in the meta-backward
    instead of kept: each query pass is checkpointed, and with second order each whole inner step
    (support forward, its create_graph gradient and the update), whose double-backward graph is
    what second-order MAML keeps. torch's non-reentrant checkpoint replays the same operations on
    the same saved inputs (and the same global RNG state, for DropBlock), so the meta-gradient is
    the same; the BN statistics returned are the original pass's, the replay's are discarded.
    First-order steps are not checkpointed: their support graph is freed by the step already.
    """
    xs, ys, xq, yq = episodes["xs"], episodes["ys"], episodes["xq"], episodes["yq"]
    use_running = not training and cfg.model.bn_eval == "running"
    want_stats = training and bool(state)
    slots = cfg.inner.steps
    recompute = training and cfg.train.checkpoint_inner

    def forward(fast, bn, x, slot, running, stats):
        return model.forward(fast, bn, state, x, slot, running, stats, training=training)

    def maybe_checkpoint(on: bool, fn, *args):
        return checkpoint(fn, *args, use_reentrant=False) if on else fn(*args)

    def loss_fn(out, y):
        return task_losses(kind, out, y)

    fast = task_batched(params["net"], xs.shape[0], detach=not training)
    total, out, passes = 0.0, None, []
    if steps == 0:  # no adaptation: the meta-initialisation's own predictions
        with torch.set_grad_enabled(training):
            out, _ = forward(fast, params["bn"], xq, 0, use_running, False)
        return task_losses(kind, out, yq), out, passes
    for i in range(steps):
        slot = min(i, slots - 1)
        fast, _, stats = maybe_checkpoint(recompute and create_graph, inner_step, forward, fast, params, cfg.inner,
                                          slot, (xs, ys), loss_fn, create_graph, use_running, want_stats)
        passes.append((slot, stats))
        if not training:
            fast = {k: v.detach().requires_grad_(True) for k, v in fast.items()}
        if weights[i] != 0.0:
            with torch.set_grad_enabled(training):
                out, stats = maybe_checkpoint(recompute, forward, fast, params["bn"], xq, slot, use_running,
                                              want_stats)
            passes.append((slot, stats))
            total = total + weights[i] * task_losses(kind, out, yq)
    return total, out, passes


def adapt(model, params: dict[str, Tree], state: Tree, xs: torch.Tensor, ys: torch.Tensor, cfg: Config, kind: str,
          steps: int) -> Tree:
    """Every task's fast weights after `steps` inner steps on its support set, as evaluation adapts
    (first order, no meta-graph): {name: [B, ...]} for `query_output`."""
    use_running = cfg.model.bn_eval == "running"

    def forward(fast, bn, x, slot, running, stats):
        return model.forward(fast, bn, state, x, slot, running, stats)

    fast = task_batched(params["net"], xs.shape[0], detach=True)
    with torch.enable_grad():
        for i in range(steps):
            fast, _, _ = inner_step(forward, fast, params, cfg.inner, min(i, cfg.inner.steps - 1), (xs, ys),
                                    lambda out, y: task_losses(kind, out, y), False, use_running, False)
            fast = {k: v.detach().requires_grad_(True) for k, v in fast.items()}
    return {k: v.detach() for k, v in fast.items()}


def query_output(model, params: dict[str, Tree], state: Tree, fast: Tree, xq: torch.Tensor, cfg: Config,
                 steps: int) -> torch.Tensor:
    """The query predictions [B, n, ...] of fast weights adapted for `steps` steps (the BN slot of the last step)."""
    slot = min(max(steps, 1), cfg.inner.steps) - 1
    with torch.no_grad():
        return model.forward(fast, params["bn"], state, xq, slot, cfg.model.bn_eval == "running", False)[0]


def meta_loss(model, params: dict[str, Tree], state: Tree, episodes: dict, cfg: Config, epoch: int, kind: str,
              shard: Shard = Shard()):
    """Training meta-loss of one meta-batch (or of this process's shard of it).
    Returns (loss, metrics, new_state).

    metrics holds detached tensors (no host sync): the final-step query loss and accuracy averaged
    over tasks, which is what the reference logs.
    """
    steps = cfg.inner.steps
    weights = step_weights(cfg, epoch, steps, training=True)
    losses, out, passes = adapt_and_score(model, params, state, episodes, cfg, kind=kind, steps=steps,
                                          weights=weights, create_graph=second_order_at(cfg, epoch),
                                          training=True)
    loss = shard.combine(losses, cfg.outer.task_reduction)
    new_state = update_running_stats(state, passes, cfg.model.bn_momentum, shard) if state else state
    with torch.no_grad():
        metrics = {"loss": task_losses(kind, out, episodes["yq"]).mean()}
        if kind == "classification":
            metrics["accuracy"] = task_accuracy(out, episodes["yq"]).mean()
    return loss, metrics, new_state


def evaluate(model, params: dict[str, Tree], state: Tree, episodes: dict, cfg: Config, kind: str,
             steps: int | None = None):
    """Adapt each task (first order, no meta-graph) and score its queries after the last step.

    Returns per-task tensors: {"loss": [B], "accuracy": [B] (classification), "output": [B, n, ...]}.
    """
    steps = cfg.inner.test_steps if steps is None else steps
    weights = [0.0] * max(steps - 1, 0) + [1.0]
    with torch.enable_grad():  # the inner loop needs support gradients even under no_grad callers
        losses, out, _ = adapt_and_score(model, params, state, episodes, cfg, kind=kind, steps=steps,
                                         weights=weights, create_graph=False, training=False)
    result = {"loss": losses.detach(), "output": out.detach()}
    if kind == "classification":
        result["accuracy"] = task_accuracy(out.detach(), episodes["yq"])
    return result
