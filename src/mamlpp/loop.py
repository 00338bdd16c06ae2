"""The plain per-task loop: the test oracle for the task-parallel path, and `impl=loop` in benchmarks.

Written the way the reference code runs (spec 2.2): one task after another, ordinary unbatched
conv2d / linear calls, torch.autograd.grad per task, and running statistics updated in place by
F.batch_norm's own momentum update on a copy of the state. It shares no forward code with
network.py, so agreement between the two is evidence, not tautology. Same signatures and outputs
as objective.meta_loss / objective.evaluate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import Config
from .inner import step_rate
from .network import BN_EPS, MLP, activation
from .distributed import Shard
from .objective import task_accuracy, task_losses
from .resnet import DROPBLOCK_BLOCKS, DROPBLOCK_SIZE, LEAK, ResNet12
from .schedules import second_order_at, step_weights

Tree = dict[str, torch.Tensor]


def _batch_norm(h, bn: Tree, state: Tree, name: str, slot: int, use_running: bool, track: bool, momentum: float):
    """F.batch_norm with the slot's gamma/beta; with track, the slot's running statistics updated in place."""
    gamma, beta = bn[f"{name}.weight"], bn[f"{name}.bias"]
    if gamma.dim() == 2:
        gamma, beta = gamma[slot], beta[slot]
    if use_running or track:
        mean, var = state[f"{name}.mean"][slot], state[f"{name}.var"][slot]
        return F.batch_norm(h, mean, var, gamma, beta, training=not use_running, momentum=momentum, eps=BN_EPS)
    return F.batch_norm(h, None, None, gamma, beta, training=True, eps=BN_EPS)


def _drop_block_one(h: torch.Tensor, p: float) -> torch.Tensor:
    """MetaOptNet's DropBlock on one task's activations [n, C, H, W]: Bernoulli seeds where a block
    fits, each block laid out from its seed by explicit slicing, kept activations rescaled."""
    n, c, height, width = h.shape
    size = min(DROPBLOCK_SIZE, height, width)
    gamma = p / size ** 2 * height * width / ((height - size + 1) * (width - size + 1))
    seeds = torch.bernoulli(torch.full((n, c, height - size + 1, width - size + 1), min(gamma, 1.0),
                                       dtype=h.dtype, device=h.device))
    dropped = torch.zeros_like(h)
    for i, j in seeds.nonzero()[:, 2:].unique(dim=0).tolist():
        dropped[:, :, i:i + size, j:j + size] += seeds[:, :, i:i + 1, j:j + 1]
    keep = (dropped == 0).to(h.dtype)
    return h * keep * (keep.numel() / keep.sum().clamp(min=1))


def _resnet_one(model, net: Tree, bn: Tree, state: Tree, x: torch.Tensor, slot: int, use_running: bool,
                track: bool, training: bool) -> torch.Tensor:
    """ResNet-12 for one task, in MetaOptNet's order (activation, then pool, then DropBlock)."""
    cfg = model.cfg

    def act(h):
        return F.leaky_relu(h, LEAK) if cfg.activation == "leaky_relu" else activation(cfg.activation, h)

    def norm(h, name):
        return _batch_norm(h, bn, state, name, slot, use_running, track, cfg.bn_momentum)

    h, blocks = x, len(model.widths)
    for j in range(blocks):
        residual = norm(F.conv2d(h, net[f"block{j}.shortcut.weight"]), f"block{j}.shortcut_bn")
        out = act(norm(F.conv2d(h, net[f"block{j}.conv0.weight"], padding=1), f"block{j}.bn0"))
        out = act(norm(F.conv2d(out, net[f"block{j}.conv1.weight"], padding=1), f"block{j}.bn1"))
        out = norm(F.conv2d(out, net[f"block{j}.conv2.weight"], padding=1), f"block{j}.bn2")
        h = act(out + residual)
        h = F.max_pool2d(h, 2) if cfg.pooling == "max" else F.avg_pool2d(h, 2)
        if training and cfg.dropblock > 0 and j >= blocks - DROPBLOCK_BLOCKS:
            h = _drop_block_one(h, cfg.dropblock)
    h = F.adaptive_avg_pool2d(h, 1).flatten(1)
    if not model.num_outputs:
        return h
    return F.linear(h, net["linear.weight"], net["linear.bias"])


def forward_one(model, net: Tree, bn: Tree, state: Tree, x: torch.Tensor, slot: int,
                use_running: bool, track: bool, training: bool = False) -> torch.Tensor:
    """One task, unbatched weights: x [n, ...] -> [n, outputs]. With track, updates state in place.
    `training`: a meta-training pass (ResNet-12's DropBlock)."""
    cfg = model.cfg
    if isinstance(model, MLP):
        layers = len(model.sizes) - 1
        for i in range(layers):
            x = F.linear(x, net[f"fc{i}.weight"], net[f"fc{i}.bias"])
            x = activation(cfg.activation, x) if i < layers - 1 else x
        return x
    if isinstance(model, ResNet12):
        return _resnet_one(model, net, bn, state, x, slot, use_running, track, training)
    h = x
    for i in range(cfg.stages):
        h = F.conv2d(h, net[f"conv{i}.weight"], net[f"conv{i}.bias"], stride=model.stride, padding=1)
        h = _batch_norm(h, bn, state, f"bn{i}", slot, use_running, track, cfg.bn_momentum)
        h = activation(cfg.activation, h)
        if cfg.pooling == "max":
            h = F.max_pool2d(h, 2, 2)
        elif cfg.pooling == "avg":
            h = F.avg_pool2d(h, 2, 2)
    if cfg.pooling == "stride":
        h = h.mean((2, 3))
    return F.linear(h.flatten(1), net["linear.weight"], net["linear.bias"])


def _run_task(model, params, state, xs, ys, xq, yq, cfg: Config, kind: str, steps: int,
              weights: list[float], create_graph: bool, training: bool):
    use_running = not training and cfg.model.bn_eval == "running"
    track = training and bool(state)
    if training:
        fast = dict(params["net"])
    else:
        fast = {k: v.detach().requires_grad_(True) for k, v in params["net"].items()}
    loss, out = 0.0, None
    if steps == 0:
        with torch.set_grad_enabled(training):
            out = forward_one(model, fast, params["bn"], state, xq, 0, use_running, False, training)
        return task_losses(kind, out[None], yq[None])[0], out
    for i in range(steps):
        slot = min(i, cfg.inner.steps - 1)
        support = forward_one(model, fast, params["bn"], state, xs, slot, use_running, track, training)
        support_loss = task_losses(kind, support[None], ys[None])[0]
        names = list(fast)
        grads = torch.autograd.grad(support_loss, [fast[k] for k in names], create_graph=create_graph)
        fast = {k: fast[k] - step_rate(params["lr"], cfg.inner, k, slot) * g for k, g in zip(names, grads)}
        if not training:
            fast = {k: v.detach().requires_grad_(True) for k, v in fast.items()}
        if weights[i] != 0.0:
            with torch.set_grad_enabled(training):
                out = forward_one(model, fast, params["bn"], state, xq, slot, use_running, track, training)
            loss = loss + weights[i] * task_losses(kind, out[None], yq[None])[0]
    return loss, out


def meta_loss_loop(model, params, state, episodes, cfg: Config, epoch: int, kind: str, shard: Shard = Shard()):
    if state and (not shard.carry or shard.total not in (None, episodes["xs"].shape[0])):
        # The oracle folds running statistics task by task, as the reference does: whole meta-batches only.
        raise ValueError("the per-task loop runs whole meta-batches in one process (train.chunk=0, no torchrun); "
                         "use train.impl=parallel to split them")
    steps = cfg.inner.steps
    weights = step_weights(cfg, epoch, steps, training=True)
    create_graph = second_order_at(cfg, epoch)
    new_state = {k: v.clone() for k, v in state.items()}
    losses, outs = [], []
    for b in range(episodes["xs"].shape[0]):
        loss, out = _run_task(model, params, new_state, episodes["xs"][b], episodes["ys"][b],
                              episodes["xq"][b], episodes["yq"][b], cfg, kind, steps, weights,
                              create_graph, training=True)
        losses.append(loss)
        outs.append(out)
    losses, out = torch.stack(losses), torch.stack(outs)
    loss = shard.combine(losses, cfg.outer.task_reduction)
    with torch.no_grad():
        metrics = {"loss": task_losses(kind, out, episodes["yq"]).mean()}
        if kind == "classification":
            metrics["accuracy"] = task_accuracy(out, episodes["yq"]).mean()
    return loss, metrics, new_state


def evaluate_loop(model, params, state, episodes, cfg: Config, kind: str, steps: int | None = None):
    steps = cfg.inner.test_steps if steps is None else steps
    weights = [0.0] * max(steps - 1, 0) + [1.0]
    losses, outs = [], []
    with torch.enable_grad():
        for b in range(episodes["xs"].shape[0]):
            loss, out = _run_task(model, params, state, episodes["xs"][b], episodes["ys"][b],
                                  episodes["xq"][b], episodes["yq"][b], cfg, kind, steps, weights,
                                  create_graph=False, training=False)
            losses.append(loss.detach())
            outs.append(out.detach())
    result = {"loss": torch.stack(losses), "output": torch.stack(outs)}
    if kind == "classification":
        result["accuracy"] = task_accuracy(result["output"], episodes["yq"])
    return result
