"""The backbones (base learners) as pure functions of an explicit parameter tree, for B tasks at once.

A backbone is a class registered with `@BACKBONES.register(name)` (the name is `model.arch`) that
provides what `Backbone` below lists; methods build it from the config and call it. Adding one is a
new class (here or in a file of its own that mamlpp imports) plus its registration.

Parameter tree (all plain tensors; nothing is stored in modules):
  params["net"]  the inner-loop-adapted tensors: conv{i}.weight/bias, linear.weight/bias (or fc{i}.*,
                 or ResNet-12's block{j}.conv{k}.weight, block{j}.shortcut.weight: resnet.py)
  params["bn"]   batch-norm gamma/beta, meta-learned only: (C,) shared, or (S, C) with BNWB
  params["lr"]   inner learning rates (see inner.py), empty for a fixed rate
  state          BNRS running statistics bn{i}.mean / bn{i}.var of shape (S, C), or {}

Tasks run together by folding the task axis into convolution groups (engineering notes): inputs
[B, n, C, H, W] become [n, B*C, H, W], per-task weights [B, O, C, 3, 3] become [B*O, C, 3, 3], and
one conv2d(groups=B) computes every task. Batch norm over [n, B*O, H, W] then normalises each
(task, channel) over that task's own n images: per-task statistics, never pooled across tasks.
Forward, backward and double backward are ordinary autograd, so no vmap is involved.
"""
from __future__ import annotations

import math
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from .config import BACKBONES, ConfigError, ModelConfig
from .distributed import Shard
from .kernels import batch_norm_train, conv2d, max_pool2d

Tree = dict[str, torch.Tensor]
BN_EPS = 1e-5


class Backbone(Protocol):
    """The interface every backbone provides.

    Built as Backbone(cfg.model, input_shape, num_outputs, bn_slots): num_outputs=0 means no head
    (forward returns the features, for metric methods); bn_slots is the number of per-step BN slots.
    """

    name: str  # set by the registry
    inputs: Literal["image", "vector"]  # the kind of data it takes (the config checks the data set)
    # Optional: `check(cfg)`, a staticmethod raising ConfigError for configs it cannot run (config.validate).
    features: int  # width of the features in front of the head
    # Elements of the largest activation of one example: the trainer sizes its CPU chunks from it.
    activation_elements: int

    def init(self, generator: torch.Generator, dtype=torch.float32, device="cpu") -> tuple[dict[str, Tree], Tree]:
        """({"net": adapted tensors, "bn": meta-learned-only tensors}, state such as BN running statistics)."""

    def forward(self, net: Tree, bn: Tree, state: Tree, x: torch.Tensor, slot: int,
                use_running: bool = False, want_stats: bool = False,
                training: bool = False) -> tuple[torch.Tensor, dict]:
        """x [B, n, *input_shape], each net tensor with a leading task axis B (a task's own weights,
        or shared ones expanded) -> (outputs or features [B, n, num_outputs or features], BN stats
        {layer: (mean [B, C], var [B, C])} when want_stats, for update_running_stats). `training`
        says the pass is part of meta-training (ResNet-12's DropBlock acts only then); a backbone
        without stochastic layers ignores it. Random draws come from torch's global generator."""


def xavier_uniform(shape: tuple[int, ...], generator: torch.Generator, dtype, device) -> torch.Tensor:
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return ((torch.rand(shape, generator=generator, dtype=dtype) * 2 - 1) * bound).to(device)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-task affine map: x [B, n, in], w [B, out, in], b [B, out] -> [B, n, out]."""
    return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))


def activation(name: str, h: torch.Tensor) -> torch.Tensor:
    if name == "leaky_relu":
        return F.leaky_relu(h, 0.01)
    if name == "relu":
        return F.relu(h)
    return torch.tanh(h)


# ---- batch norm: BNWB (per-step gamma/beta) and BNRS (per-step running statistics) -----------------
def batch_norm(h: torch.Tensor, bn: Tree, state: Tree, name: str, slot: int, tasks: int,
               use_running: bool, want_stats: bool):
    """Batch norm of folded activations h [n, B*C, H, W] (or [n, B*C]).

    BNWB: gamma/beta of shape (S, C) are indexed by the inner-step slot; (C,) is shared.
    BNRS: with use_running, normalise with the slot's running statistics (evaluation in
    bn_eval='running' mode); otherwise with the task's own batch statistics (the reference).
    Returns the output and, when want_stats, the detached per-task (mean, unbiased var) [B, C]
    that update_running_stats folds into the state.
    """
    gamma, beta = bn[f"{name}.weight"], bn[f"{name}.bias"]
    if gamma.dim() == 2:
        gamma, beta = gamma[slot], beta[slot]
    gamma, beta = gamma.repeat(tasks), beta.repeat(tasks)
    if use_running:
        mean, var = state[f"{name}.mean"][slot].repeat(tasks), state[f"{name}.var"][slot].repeat(tasks)
        return F.batch_norm(h, mean, var, gamma, beta, training=False, eps=BN_EPS), None
    out, mean, invstd = batch_norm_train(h, gamma, beta, BN_EPS)  # kernels.py: the fast double backward
    if not want_stats:
        return out, None
    with torch.no_grad():
        count = h.numel() // h.shape[1]
        var = (invstd.pow(-2) - BN_EPS) * (count / max(count - 1, 1))  # unbiased, as running stats use
    return out, (mean.view(tasks, -1), var.view(tasks, -1))


def init_batch_norm(layers: list[tuple[str, int]], cfg: ModelConfig, bn_slots: int, dtype, device) -> tuple[Tree, Tree]:
    """gamma 1 and beta 0 for each (layer, channels), per step (S, C) with BNWB; with BNRS the running
    statistics per step, mean 0 and variance 1: (bn parameters, state)."""
    bn, state = {}, {}
    for name, c in layers:
        shape = (bn_slots, c) if cfg.bnwb else (c,)
        bn[f"{name}.weight"] = torch.ones(shape, dtype=dtype, device=device)
        bn[f"{name}.bias"] = torch.zeros(shape, dtype=dtype, device=device)
        if cfg.bnrs:
            state[f"{name}.mean"] = torch.zeros(bn_slots, c, dtype=dtype, device=device)
            state[f"{name}.var"] = torch.ones(bn_slots, c, dtype=dtype, device=device)
    return bn, state


def update_running_stats(state: Tree, passes: list[tuple[int, dict]], momentum: float, shard=None) -> Tree:
    """BNRS: fold the batch statistics of one meta-batch into the per-step running statistics.

    `passes` lists (slot, {layer: (mean [B, C], var [B, C])}) in the order the reference visits
    them for one task (support pass of step i, then its query pass). The reference processes tasks
    one after another, each pass applying r <- (1 - m) r + m s; the closed form of that sequence,
    task-major, is r_M = (1-m)^M r_0 + sum_j m (1-m)^(M-j) s_j, computed here without a task loop.
    For a part of a meta-batch (shard: a chunk, or a process's share) the terms of its tasks are
    taken at their global positions; a part that does not carry the state returns its terms alone
    (zeros in the slots it does not touch), so the parts' states sum to the whole meta-batch's.
    Returns a new state; the input is not modified.
    """
    shard = shard or Shard()
    new = dict(state) if shard.carry else {k: torch.zeros_like(v) for k, v in state.items()}
    for slot in sorted({slot for slot, _ in passes}):
        per_task = [stats for s, stats in passes if s == slot]  # passes of one task, in order
        for layer in per_task[0]:
            means = torch.stack([p[layer][0] for p in per_task], 1)  # [B, P, C]
            vars_ = torch.stack([p[layer][1] for p in per_task], 1)
            tasks, count = means.shape[:2]
            total = (shard.total or tasks) * count
            order = torch.arange(1, tasks * count + 1, dtype=means.dtype, device=means.device) + shard.offset * count
            coef = (momentum * (1 - momentum) ** (total - order)).view(tasks, count, 1)
            decay = (1 - momentum) ** total if shard.carry else 0.0
            for key, batch in ((f"{layer}.mean", means), (f"{layer}.var", vars_)):
                updated = new[key].clone()
                updated[slot] = decay * new[key][slot] + (coef * batch).sum((0, 1))
                new[key] = updated
    return new


# ---- the base learner: 4 x (conv3x3 -> BN -> leaky ReLU -> 2x2 max-pool) -> linear ------------------
@BACKBONES.register("conv4")
class Conv4:
    """VGG-style base learner of MAML/MAML++ (spec section 1); static hyper-parameters only.
    Without a head (num_outputs=0) it is the 4-block embedding of Matching and Prototypical Networks."""

    inputs = "image"

    @staticmethod
    def check(cfg) -> None:
        """Config errors before any work (config.validate calls it): the pools must leave a pixel."""
        need = 2 ** cfg.model.stages if cfg.model.pooling != "stride" else 1
        if cfg.data.image_size and cfg.data.image_size < need:
            raise ConfigError(f"data.image_size={cfg.data.image_size}: the {cfg.model.stages} pooling stages of "
                              f"model.arch=conv4 need images of at least {need} pixels")

    def __init__(self, cfg: ModelConfig, input_shape: tuple[int, int, int], num_outputs: int, bn_slots: int):
        self.cfg, self.input_shape, self.num_outputs = cfg, input_shape, num_outputs
        self.bn_slots = bn_slots  # S: one BN slot per training inner step
        self.stride = 2 if cfg.pooling == "stride" else 1
        size = input_shape[1]
        for _ in range(cfg.stages):
            size = (size + 1) // 2 if cfg.pooling == "stride" else size // 2
        if size < 1:
            raise ConfigError(f"the data set's {input_shape[1]}-pixel images are too small for the "
                              f"model.stages={cfg.stages} pooling stages of model.arch=conv4 (set data.image_size)")
        self.features = cfg.filters if cfg.pooling == "stride" else cfg.filters * size * size
        first = input_shape[1] // self.stride
        self.activation_elements = cfg.filters * first * first

    def init(self, generator: torch.Generator, dtype=torch.float32, device="cpu") -> tuple[dict[str, Tree], Tree]:
        c, f = self.input_shape[0], self.cfg.filters
        net: Tree = {}
        for i in range(self.cfg.stages):
            net[f"conv{i}.weight"] = xavier_uniform((f, c if i == 0 else f, 3, 3), generator, dtype, device)
            net[f"conv{i}.bias"] = torch.zeros(f, dtype=dtype, device=device)
        if self.num_outputs:
            net["linear.weight"] = xavier_uniform((self.num_outputs, self.features), generator, dtype, device)
            net["linear.bias"] = torch.zeros(self.num_outputs, dtype=dtype, device=device)
        bn, state = init_batch_norm([(f"bn{i}", f) for i in range(self.cfg.stages)], self.cfg, self.bn_slots,
                                    dtype, device)
        return {"net": net, "bn": bn}, state

    def forward(self, net: Tree, bn: Tree, state: Tree, x: torch.Tensor, slot: int,
                use_running: bool = False, want_stats: bool = False, training: bool = False):
        """x [B, n, C, H, W] with per-task weights net[k] [B, ...] -> logits [B, n, N], BN stats."""
        tasks, n = x.shape[:2]
        h = x.transpose(0, 1).reshape(n, tasks * x.shape[2], *x.shape[3:])  # fold tasks into channels
        if h.device.type == "cpu":
            # Channels-last on a CPU: torch's max-pool and batch-norm kernels are faster in it on these shapes,
            # 1.13x for a whole Omniglot 20w1s iteration (BENCHMARKS.md); kernels.py keeps gradients in it.
            h = h.contiguous(memory_format=torch.channels_last)
        stats = {}
        for i in range(self.cfg.stages):
            w = net[f"conv{i}.weight"]
            h = conv2d(h, w.reshape(-1, *w.shape[2:]), net[f"conv{i}.bias"].reshape(-1),
                       stride=self.stride, padding=1, groups=tasks)
            h, s = batch_norm(h, bn, state, f"bn{i}", slot, tasks, use_running, want_stats)
            if s is not None:
                stats[f"bn{i}"] = s
            if self.cfg.pooling == "max":
                # Every activation here is non-decreasing, so it commutes with max-pooling: applying
                # it after the pool gives the same values and gradients on a quarter of the elements.
                h = activation(self.cfg.activation, max_pool2d(h, 2))
            elif self.cfg.pooling == "avg":
                h = F.avg_pool2d(activation(self.cfg.activation, h), 2, 2)
            else:
                h = activation(self.cfg.activation, h)
        if self.cfg.pooling == "stride":
            h = h.mean((2, 3), keepdim=True)
        feats = h.reshape(n, tasks, -1).transpose(0, 1)  # [B, n, O*h*w] in (C, H, W) order per task
        if not self.num_outputs:
            return feats, stats
        return linear(feats, net["linear.weight"], net["linear.bias"]), stats


@BACKBONES.register("mlp")
class MLP:
    """Fully connected ReLU network for regression (MAML's sinusoid: 1-40-40-1), no batch norm."""

    inputs = "vector"

    def __init__(self, cfg: ModelConfig, input_shape: tuple[int], num_outputs: int, bn_slots: int):
        self.cfg, self.sizes = cfg, (input_shape[0], *cfg.hidden, *((num_outputs,) if num_outputs else ()))
        self.features = self.sizes[-2] if num_outputs else self.sizes[-1]
        self.activation_elements = max(self.sizes)

    def init(self, generator: torch.Generator, dtype=torch.float32, device="cpu") -> tuple[dict[str, Tree], Tree]:
        net = {}
        for i, (a, b) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            net[f"fc{i}.weight"] = xavier_uniform((b, a), generator, dtype, device)
            net[f"fc{i}.bias"] = torch.zeros(b, dtype=dtype, device=device)
        return {"net": net, "bn": {}}, {}

    def forward(self, net: Tree, bn: Tree, state: Tree, x: torch.Tensor, slot: int,
                use_running: bool = False, want_stats: bool = False, training: bool = False):
        layers = len(self.sizes) - 1
        for i in range(layers):
            x = linear(x, net[f"fc{i}.weight"], net[f"fc{i}.bias"])
            if i < layers - 1:
                x = activation(self.cfg.activation, x)
        return x, {}


def build_backbone(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int, bn_slots: int,
                   custom=None) -> Backbone:
    """The registered backbone that model.arch names, or `custom`, a factory with the same signature
    (a usermodule.ModuleBackbone)."""
    return (custom or BACKBONES.get(cfg.arch))(cfg, input_shape, num_outputs, bn_slots)
