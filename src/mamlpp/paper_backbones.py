"""The comparison methods' own networks, as backbones (the `Backbone` interface of network.py):

  koch   Koch, Zemel & Salakhutdinov's Siamese tower (methods spec 2.2): valid 10/7/4/4 convolutions
         with ReLU, three 2x2 max-pools, a 4096-unit sigmoid layer; 105x105 Omniglot in the paper.
  lenet  the Memory Module code's embedder ("LeNet" in tensorflow/models learning_to_remember_rare_events,
         spec 5.5): two 3x3 conv pairs of 64 and 128 channels with ReLU, 2x2 max-pools, a linear 128-d layer.

Both are fixed published architectures: model.filters, stages, pooling and activation do not apply,
and neither has batch norm, so the model.bn* keys change nothing (their state is empty). num_outputs
adds a linear head on the features (MAML can use them like Conv4); 0 gives the features.

Every net tensor has a leading task axis, as the interface says. When the tasks share their weights
(shared tensors expanded over the task axis, as the metric methods pass them: stride 0), the images
of all tasks run as one ordinary batch; otherwise the tasks fold into convolution groups as Conv4
does, each with its own weights.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import BACKBONES, ConfigError, ModelConfig
from .network import linear

Tree = dict[str, torch.Tensor]
DEFAULT_SIZE = {"omniglot": 28, "mini_imagenet": 84, "folder": 84}


def _normal(shape, mean, std, generator, dtype, device) -> torch.Tensor:
    """N(mean, std^2), drawn on the CPU from `generator` so that values do not depend on the device."""
    return (torch.randn(shape, generator=generator, dtype=dtype) * std + mean).to(device)


def _truncated(shape, std, generator, dtype, device) -> torch.Tensor:
    """TensorFlow's truncated_normal_initializer: N(0, std^2) redrawn outside two standard deviations."""
    t = torch.empty(shape, dtype=dtype)
    return torch.nn.init.trunc_normal_(t, 0.0, std, -2 * std, 2 * std, generator=generator).to(device)


def _shared(net: Tree, tasks: int) -> bool:
    """Whether every task has the same weights: tensors expanded over the task axis (stride 0)."""
    return tasks > 1 and all(t.stride(0) == 0 for t in net.values())


class _TaskBatch:
    """Convolutions and dense layers for B tasks' images x [B, n, C, H, W], with shared weights (one
    batch of B*n images) or per-task weights (tasks folded into groups)."""

    def __init__(self, net: Tree, x: torch.Tensor):
        self.tasks, self.n = x.shape[:2]
        self.shared = _shared(net, self.tasks)
        if self.shared:
            self.net = {k: v[0] for k, v in net.items()}
            self.h = x.reshape(self.tasks * self.n, *x.shape[2:])
        else:
            self.net = net
            self.h = x.transpose(0, 1).reshape(self.n, self.tasks * x.shape[2], *x.shape[3:])

    def conv(self, name: str, padding: int) -> None:
        w, b = self.net[f"{name}.weight"], self.net[f"{name}.bias"]
        if self.shared:
            self.h = F.conv2d(self.h, w, b, padding=padding)
        else:
            self.h = F.conv2d(self.h, w.reshape(-1, *w.shape[2:]), b.reshape(-1), padding=padding, groups=self.tasks)

    def apply(self, fn) -> None:
        self.h = fn(self.h)

    def flat(self) -> torch.Tensor:
        """[B, n, features] in (C, H, W) order per image."""
        if self.shared:
            return self.h.reshape(self.tasks, self.n, -1)
        return self.h.reshape(self.n, self.tasks, -1).transpose(0, 1)

    def dense(self, feats: torch.Tensor, name: str) -> torch.Tensor:
        w, b = self.net[f"{name}.weight"], self.net[f"{name}.bias"]
        return F.linear(feats, w, b) if self.shared else linear(feats, w, b)


def _size_error(arch: str, size: int, need: int, paper: str) -> ConfigError:
    return ConfigError(f"model.arch={arch} needs images of at least {need} pixels, these have {size} "
                       f"(set data.image_size; {paper})")


@BACKBONES.register("koch")
class Koch:
    """Koch et al.'s largest Omniglot tower (spec 2.2, paper Fig. 4): 38,947,648 parameters at
    105x105 (38,951,745 with the Siamese head). Initialised as the paper says (spec 2.4): conv weights
    N(0, 0.01), conv biases N(0.5, 0.01), dense weights N(0, 0.2), dense biases N(0.5, 0.01)."""

    inputs = "image"
    CONVS = ((64, 10, True), (128, 7, True), (128, 4, True), (256, 4, False))  # filters, kernel, max-pool after
    FC = 4096
    MIN_SIZE = 65  # the smallest input that leaves the last convolution a pixel

    @staticmethod
    def spatial(size: int) -> int:
        for _, kernel, pool in Koch.CONVS:
            size = size - kernel + 1
            size = size // 2 if pool else size
        return size

    @staticmethod
    def check(cfg) -> None:
        size = cfg.data.image_size or DEFAULT_SIZE.get(cfg.data.dataset, 84)
        if Koch.spatial(size) < 1:
            raise _size_error("koch", size, Koch.MIN_SIZE, "the paper used 105: data.image_size=105")

    def __init__(self, cfg: ModelConfig, input_shape: tuple[int, int, int], num_outputs: int, bn_slots: int):
        self.cfg, self.input_shape, self.num_outputs = cfg, input_shape, num_outputs
        c, h, w = input_shape
        self.out_hw = (self.spatial(h), self.spatial(w))
        if min(self.out_hw) < 1:
            raise _size_error("koch", min(h, w), self.MIN_SIZE, "the paper used 105: data.image_size=105")
        self.features = self.FC
        first = self.CONVS[0]
        self.activation_elements = first[0] * (h - first[1] + 1) * (w - first[1] + 1)

    def init(self, generator: torch.Generator, dtype=torch.float32, device="cpu") -> tuple[dict[str, Tree], Tree]:
        net, channels = {}, self.input_shape[0]
        for i, (filters, kernel, _) in enumerate(self.CONVS):
            net[f"conv{i}.weight"] = _normal((filters, channels, kernel, kernel), 0.0, 1e-2, generator, dtype, device)
            net[f"conv{i}.bias"] = _normal((filters,), 0.5, 1e-2, generator, dtype, device)
            channels = filters
        layers = [("fc", self.FC, channels * math.prod(self.out_hw))]
        if self.num_outputs:
            layers.append(("linear", self.num_outputs, self.FC))
        for name, out, inp in layers:
            net[f"{name}.weight"] = _normal((out, inp), 0.0, 2e-1, generator, dtype, device)
            net[f"{name}.bias"] = _normal((out,), 0.5, 1e-2, generator, dtype, device)
        return {"net": net, "bn": {}}, {}

    def forward(self, net: Tree, bn: Tree, state: Tree, x: torch.Tensor, slot: int,
                use_running: bool = False, want_stats: bool = False, training: bool = False):
        """x [B, n, C, H, W] -> sigmoid features [B, n, 4096] (or head outputs), no BN statistics."""
        t = _TaskBatch(net, x)
        for i, (_, _, pool) in enumerate(self.CONVS):
            t.conv(f"conv{i}", padding=0)
            t.apply(lambda h: F.relu(F.max_pool2d(h, 2)) if pool else F.relu(h))  # ReLU commutes with max
        feats = torch.sigmoid(t.dense(t.flat(), "fc"))
        return (t.dense(feats, "linear") if self.num_outputs else feats), {}


@BACKBONES.register("lenet")
class LeNet:
    """The Memory Module's Omniglot embedder (spec 5.5; the code calls it LeNet): conv 3x3 64, ReLU,
    conv 3x3 64, ReLU, 2x2 max-pool; conv 3x3 128, ReLU, conv 3x3 128, ReLU, 2x2 max-pool ('SAME'
    padding: 28 -> 14 -> 7); a linear layer to 128 features (no activation). Weights truncated
    N(0, 0.1), biases 0, as the code."""

    inputs = "image"
    CONVS = ((64, False), (64, True), (128, False), (128, True))  # filters, max-pool after
    FEATURES = 128

    def __init__(self, cfg: ModelConfig, input_shape: tuple[int, int, int], num_outputs: int, bn_slots: int):
        self.cfg, self.input_shape, self.num_outputs = cfg, input_shape, num_outputs
        c, h, w = input_shape
        self.out_hw = (math.ceil(math.ceil(h / 2) / 2), math.ceil(math.ceil(w / 2) / 2))  # 'SAME' pools
        self.features = self.FEATURES
        self.activation_elements = self.CONVS[0][0] * h * w

    def init(self, generator: torch.Generator, dtype=torch.float32, device="cpu") -> tuple[dict[str, Tree], Tree]:
        net, channels = {}, self.input_shape[0]
        for i, (filters, _) in enumerate(self.CONVS):
            net[f"conv{i}.weight"] = _truncated((filters, channels, 3, 3), 0.1, generator, dtype, device)
            net[f"conv{i}.bias"] = torch.zeros(filters, dtype=dtype, device=device)
            channels = filters
        layers = [("fc", self.FEATURES, channels * math.prod(self.out_hw))]
        if self.num_outputs:
            layers.append(("linear", self.num_outputs, self.FEATURES))
        for name, out, inp in layers:
            net[f"{name}.weight"] = _truncated((out, inp), 0.1, generator, dtype, device)
            net[f"{name}.bias"] = torch.zeros(out, dtype=dtype, device=device)
        return {"net": net, "bn": {}}, {}

    def forward(self, net: Tree, bn: Tree, state: Tree, x: torch.Tensor, slot: int,
                use_running: bool = False, want_stats: bool = False, training: bool = False):
        """x [B, n, C, H, W] -> linear features [B, n, 128] (or head outputs), no BN statistics."""
        t = _TaskBatch(net, x)
        for i, (_, pool) in enumerate(self.CONVS):
            t.conv(f"conv{i}", padding=1)
            t.apply(lambda h: F.relu(F.max_pool2d(h, 2, ceil_mode=True)) if pool else F.relu(h))
        feats = t.dense(t.flat(), "fc")
        return (t.dense(feats, "linear") if self.num_outputs else feats), {}
