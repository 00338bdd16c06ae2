"""ResNet-12, the backbone of most few-shot results since 2018, on the task-parallel fast path.

The architecture is MetaOptNet's (Lee et al., CVPR 2019, `models/ResNet12_embedding.py`, itself
after TADAM and SNAIL): len(model.widths) residual blocks (four: 64-160-320-640 channels), each

    x -> conv3x3 -> BN -> leaky ReLU -> conv3x3 -> BN -> leaky ReLU -> conv3x3 -> BN --+--> leaky ReLU -> max-pool 2x2
    x -> conv1x1 -> BN (the shortcut) ---------------------------------------------------+

with convolutions without bias (every one feeds a batch norm, which removes any per-channel
constant), leaky ReLU of slope 0.1 (MetaOptNet's `nn.LeakyReLU(0.1)`; `model.activation=leaky_relu`
means this slope here, 0.01 in Conv4), and Kaiming-normal initialisation (fan-out, gain sqrt(2), as
MetaOptNet's `kaiming_normal_(mode='fan_out', nonlinearity='leaky_relu')`). The head is the common
choice of later work: global average pooling to `widths[-1]` features and a linear layer (MetaOptNet
itself has no head and flattens the 5x5x640 map into 16,000 features for its metric heads; here the
metric methods get the pooled 640). `model.pooling=avg` with `model.activation=tanh` is the smooth
variant the finite-difference tests use.

DropBlock (Ghiasi et al. 2018), `model.dropblock` = the drop probability (0: off, MetaOptNet uses
0.1 on Mini-ImageNet), acts after the pool of the last two blocks with blocks of 5x5 (MetaOptNet's
size; smaller where the feature map is), in training passes only (every support and query pass of
meta-training; never in evaluation). Its masks are drawn from torch's global generator, which runs
seed and checkpoints save and the trainer seeds per pass (so they depend on how a meta-batch is split
into passes), and each task's mask is rescaled by that task's own kept fraction, so the tasks of a
meta-batch stay independent. Not copied from MetaOptNet: its linear warm-up of the drop
rate over the first 40,000 batches (a counter this stateless backbone does not keep) and its plain
dropout in the first two blocks.

Tasks are folded into convolution groups exactly as in Conv4 (network.py): x [B, n, C, H, W] ->
[n, B*C, H, W], per-task weights [B, O, C, k, k] -> [B*O, C, k, k], conv2d(groups=B); every batch
norm goes through network.batch_norm with the inner step's slot, so BNWB and BNRS work unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import BACKBONES, ConfigError, ModelConfig
from .network import Tree, activation, batch_norm, init_batch_norm, linear, xavier_uniform

LEAK = 0.1  # MetaOptNet's leaky ReLU slope
DROPBLOCK_SIZE = 5  # MetaOptNet's block size, in the last two blocks
DROPBLOCK_BLOCKS = 2  # how many of the last blocks drop


def act(name: str, h: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(h, LEAK) if name == "leaky_relu" else activation(name, h)


def kaiming_normal(shape: tuple[int, ...], generator: torch.Generator, dtype, device) -> torch.Tensor:
    """N(0, 2 / fan_out), fan_out = out_channels * k * k: torch's kaiming_normal_(mode='fan_out',
    nonlinearity='leaky_relu') with its default slope argument 0, as MetaOptNet calls it."""
    std = math.sqrt(2.0 / (shape[0] * math.prod(shape[2:])))
    return (torch.randn(shape, generator=generator, dtype=dtype) * std).to(device)


def drop_block(h: torch.Tensor, p: float, tasks: int) -> torch.Tensor:
    """DropBlock of folded activations h [n, B*C, H, W]: seeds ~ Bernoulli(gamma) on the positions
    where a whole block fits, each seed zeroing the block below and right of it (MetaOptNet's
    construction), then every task's activations scaled by (its elements / its kept elements)."""
    size = min(DROPBLOCK_SIZE, h.shape[-2], h.shape[-1])
    free = (h.shape[-2] - size + 1) * (h.shape[-1] - size + 1)
    gamma = p / size ** 2 * h.shape[-2] * h.shape[-1] / free
    with torch.no_grad():
        seeds = torch.bernoulli(torch.full((*h.shape[:2], h.shape[-2] - size + 1, h.shape[-1] - size + 1),
                                           min(gamma, 1.0), dtype=h.dtype, device=h.device))
        keep = 1 - F.max_pool2d(F.pad(seeds, [size - 1] * 4), size, stride=1)
        per_task = keep.view(h.shape[0], tasks, -1).sum((0, 2))
        scale = (keep.numel() // tasks) / per_task.clamp(min=1)  # [B]: a task's elements / its kept ones
        keep = keep * scale.repeat_interleave(h.shape[1] // tasks).view(1, -1, 1, 1)
    return h * keep


@BACKBONES.register("resnet12")
class ResNet12:
    """ResNet-12 as a pure function of its parameter tree, B tasks at once (module docstring)."""

    inputs = "image"

    @staticmethod
    def check(cfg) -> None:
        """Config errors before any work (config.validate calls it)."""
        m = cfg.model
        if not m.widths or min(m.widths) < 1:
            raise ConfigError(f"model.widths={m.widths}: expected one positive channel count per residual block, "
                              "e.g. 64,160,320,640")
        if m.pooling == "stride":
            raise ConfigError("model.pooling=stride is Conv4's strided network; model.arch=resnet12 pools with "
                              "model.pooling=max (or avg, the smooth variant)")
        need = 2 ** len(m.widths)
        if cfg.data.image_size and cfg.data.image_size < need:
            raise ConfigError(f"data.image_size={cfg.data.image_size}: the {len(m.widths)} pooling stages of "
                              f"model.arch=resnet12 need images of at least {need} pixels")

    def __init__(self, cfg: ModelConfig, input_shape: tuple[int, int, int], num_outputs: int, bn_slots: int):
        self.cfg, self.input_shape, self.num_outputs, self.bn_slots = cfg, input_shape, num_outputs, bn_slots
        self.widths = tuple(cfg.widths)
        size, largest = input_shape[1], 0
        for w in self.widths:
            largest = max(largest, w * size * size)  # a block's activations before its pool
            size //= 2
        if size < 1:
            raise ConfigError(f"the data set's {input_shape[1]}-pixel images are too small for the "
                              f"{len(self.widths)} pooling stages of model.arch=resnet12 (set data.image_size)")
        self.features = self.widths[-1]
        self.activation_elements = largest

    def bn_layers(self) -> list[tuple[str, int]]:
        """(name, channels) of every batch norm, in forward order."""
        return [(f"block{j}.{bn}", w) for j, w in enumerate(self.widths)
                for bn in ("bn0", "bn1", "bn2", "shortcut_bn")]

    def init(self, generator: torch.Generator, dtype=torch.float32, device="cpu") -> tuple[dict[str, Tree], Tree]:
        net: Tree = {}
        c = self.input_shape[0]
        for j, w in enumerate(self.widths):
            for k in range(3):
                shape = (w, c if k == 0 else w, 3, 3)
                net[f"block{j}.conv{k}.weight"] = kaiming_normal(shape, generator, dtype, device)
            net[f"block{j}.shortcut.weight"] = kaiming_normal((w, c, 1, 1), generator, dtype, device)
            c = w
        if self.num_outputs:
            net["linear.weight"] = xavier_uniform((self.num_outputs, self.features), generator, dtype, device)
            net["linear.bias"] = torch.zeros(self.num_outputs, dtype=dtype, device=device)
        bn, state = init_batch_norm(list(self.bn_layers()), self.cfg, self.bn_slots, dtype, device)
        return {"net": net, "bn": bn}, state

    def forward(self, net: Tree, bn: Tree, state: Tree, x: torch.Tensor, slot: int,
                use_running: bool = False, want_stats: bool = False, training: bool = False):
        """x [B, n, C, H, W] with per-task weights net[k] [B, ...] -> logits [B, n, N] (features
        [B, n, widths[-1]] without a head), BN stats; DropBlock only when training."""
        tasks, n = x.shape[:2]
        h = x.transpose(0, 1).reshape(n, tasks * x.shape[2], *x.shape[3:])  # fold tasks into channels
        stats, name = {}, self.cfg.activation

        def conv_bn(h, conv, norm, padding):
            w = net[conv]
            h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), None, padding=padding, groups=tasks)
            h, s = batch_norm(h, bn, state, norm, slot, tasks, use_running, want_stats)
            if s is not None:
                stats[norm] = s
            return h

        drop = training and self.cfg.dropblock > 0
        for j in range(len(self.widths)):
            block = f"block{j}"
            out = act(name, conv_bn(h, f"{block}.conv0.weight", f"{block}.bn0", 1))
            out = act(name, conv_bn(out, f"{block}.conv1.weight", f"{block}.bn1", 1))
            out = conv_bn(out, f"{block}.conv2.weight", f"{block}.bn2", 1)
            out = out + conv_bn(h, f"{block}.shortcut.weight", f"{block}.shortcut_bn", 0)
            if self.cfg.pooling == "max":
                # A non-decreasing activation commutes with max-pooling (as in Conv4): the same values
                # and gradients on a quarter of the elements.
                h = act(name, F.max_pool2d(out, 2, 2))
            else:
                h = F.avg_pool2d(act(name, out), 2, 2)
            if drop and j >= len(self.widths) - DROPBLOCK_BLOCKS:
                h = drop_block(h, self.cfg.dropblock, tasks)
        feats = h.mean((2, 3)).view(n, tasks, -1).transpose(0, 1)  # global average pool -> [B, n, widths[-1]]
        if not self.num_outputs:
            return feats, stats
        return linear(feats, net["linear.weight"], net["linear.bias"]), stats
