"""Matching Networks (Vinyals et al. 2016) as pure functions, for B tasks at once (methods spec §3).

Embeddings come in as [B, n, d] tensors (support and queries of B episodes); nothing here loops
over tasks. The FCE parameters are a flat tree "fce.{cell}.{weight_ih,weight_hh,bias_ih,bias_hh}"
with the shapes and gate order (i, f, g, o) of torch.nn.LSTMCell, shared by all tasks.

Choices the paper leaves open (spec §3.2-3.4):
  - f = g before FCE: one shared embedding network gives g'(x) and f'(x) (the caller's Conv4).
  - FCE initial states are zero: biLSTM states, and h_0 = c_0 = 0 of the attLSTM, so its first
    read r_0 is the plain mean of g(S).
  - The attLSTM recurrent input [h, r] is an LSTMCell with input cat(f'(x), r) and state (h, c),
    the state passed on being the post-skip h_k = ĥ_k + f'(x) (twitter-research's FCE-embedding.lua).
  - Processing steps K: default 3 (twitter-research); the caller passes it.
  - The biLSTM reads the support set in the order given (the sampler's, shuffled per episode).
  - Loss/scores: log(clamp(P, eps, 1)) with eps = 1e-8, as oscarknagg clamps before the log.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import METHODS, ConfigError, MethodConfig
from .metric import MetricMethod

Tree = dict[str, torch.Tensor]
FCE_STEPS = 3
CELLS = {"support_fw": 1, "support_bw": 1, "query": 2}  # input width in units of d


def init_fce(width: int, generator: torch.Generator, dtype=torch.float32, device="cpu") -> Tree:
    """FCE parameters: biLSTM cells (in d, hidden d) and attLSTM cell (in 2d = [f', r], hidden d).

    Initialised as nn.LSTMCell (uniform(-1/sqrt(d), 1/sqrt(d))), drawn from `generator` on the CPU
    in a fixed key order so that the values do not depend on the device.
    """
    bound, p = 1.0 / math.sqrt(width), {}
    for cell, k in CELLS.items():
        shapes = {"weight_ih": (4 * width, k * width), "weight_hh": (4 * width, width),
                  "bias_ih": (4 * width,), "bias_hh": (4 * width,)}
        for name, shape in shapes.items():
            u = torch.rand(shape, generator=generator, dtype=dtype)
            p[f"fce.{cell}.{name}"] = ((u * 2 - 1) * bound).to(device)
    return p


def lstm_cell(x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, p: Tree, prefix: str):
    """One LSTM step with explicit weights p[prefix + ".weight_ih"] etc.: x [..., in], h, c [..., d]
    -> (h, c) [..., d]. Same gate order (i, f, g, o) and result as torch.nn.LSTMCell; plain autograd
    ops, so it supports double backward."""
    gates = (F.linear(x, p[f"{prefix}.weight_ih"], p[f"{prefix}.bias_ih"])
             + F.linear(h, p[f"{prefix}.weight_hh"], p[f"{prefix}.bias_hh"]))
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def fce_support(params: Tree, g: torch.Tensor) -> torch.Tensor:
    """g(x_i, S) = →h_i + ←h_i + g'(x_i): biLSTM over the support sequence g' [B, ns, d] -> [B, ns, d].

    The loop runs over the ns sequence positions, each step batched over the B tasks.
    """
    zero = g.new_zeros(g.shape[0], g.shape[2])
    outs = {}
    for cell, order in (("support_fw", range(g.shape[1])), ("support_bw", reversed(range(g.shape[1])))):
        h, c, outs[cell] = zero, zero, [None] * g.shape[1]
        for i in order:
            h, c = lstm_cell(g[:, i], h, c, params, f"fce.{cell}")
            outs[cell][i] = h
    return torch.stack(outs["support_fw"], 1) + torch.stack(outs["support_bw"], 1) + g


def fce_query(params: Tree, f: torch.Tensor, g: torch.Tensor, steps: int = FCE_STEPS) -> torch.Tensor:
    """f(x̂, S) = h_K of the attLSTM: queries f' [B, nq, d] read the FCE support g [B, ns, d] K times.

    r_{k-1} = Σ_i softmax_i(h_{k-1}ᵀ g_i) g_i (dot product); (ĥ_k, c_k) = LSTMCell(cat(f', r_{k-1}),
    (h_{k-1}, c_{k-1})); h_k = ĥ_k + f'. Each query is independent; B and nq run together.
    Returns [B, nq, d]. The read is a weighted sum, so h_K does not depend on the order of g.
    """
    if steps < 1:
        raise ValueError(f"FCE needs at least one processing step, got {steps}")
    h, c = torch.zeros_like(f), torch.zeros_like(f)
    for _ in range(steps):
        r = torch.softmax(h @ g.transpose(1, 2), dim=-1) @ g  # [B, nq, ns] @ [B, ns, d]
        h, c = lstm_cell(torch.cat([f, r], dim=-1), h, c, params, "fce.query")
        h = h + f
    return h


def cosine_log_probs(support: torch.Tensor, ys: torch.Tensor, query: torch.Tensor, ways: int,
                     eps: float = 1e-8) -> torch.Tensor:
    """The Matching Nets classifier: support [B, ns, d], labels ys int64 [B, ns] in [0, ways),
    query [B, nq, d] -> log P(y = n | x̂, S) [B, nq, ways].

    a(x̂, x_i) = softmax_i of the cosine similarity (no temperature); P(n) = Σ_{i: y_i = n} a.
    Returned as log(clamp(P, eps, 1)): cosines lie in [-1, 1], so every attention weight is at least
    e^-2 / ns and the lower clamp only acts on a class without support items (P = 0, log = -inf);
    the upper bound only guards rounding. These are the method's logits: the P's sum to one, so
    softmax(log P) = P (exactly when no clamp is active), and cross-entropy on them is -log P(y).
    """
    cos = F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).transpose(1, 2)  # [B, nq, ns]
    onehot = F.one_hot(ys, ways).to(cos.dtype)  # [B, ns, ways]
    return (torch.softmax(cos, dim=-1) @ onehot).clamp(eps, 1.0).log()


def matching_log_probs(params: Tree, support_emb: torch.Tensor, ys: torch.Tensor, query_emb: torch.Tensor,
                       ways: int, fce: bool = False, fce_steps: int = FCE_STEPS) -> torch.Tensor:
    """log P(y | x̂, S) [B, nq, ways] from the embeddings g'(S) [B, ns, d], f'(x̂) [B, nq, d]; with fce,
    the support goes through the biLSTM and the queries attend to those FCE support embeddings."""
    if fce:
        support_emb = fce_support(params, support_emb)
        query_emb = fce_query(params, query_emb, support_emb, fce_steps)
    return cosine_log_probs(support_emb, ys, query_emb, ways)


@dataclass
class MatchingNetConfig(MethodConfig):
    name: str = "matchingnet"
    fce: bool = False  # Full Context Embeddings (the paper uses them on Mini-ImageNet, not Omniglot)
    fce_steps: int = FCE_STEPS  # K, the attLSTM's reads of the support set


@METHODS.register("matchingnet")
class MatchingNetworks(MetricMethod):
    Options = MatchingNetConfig
    backbones = ("conv4",)

    @classmethod
    def check(cls, cfg, backbone) -> None:
        super().check(cfg, backbone)
        if cfg.method.fce_steps < 1:
            raise ConfigError(f"method.fce_steps={cfg.method.fce_steps}: must be >= 1")

    def init_head(self, generator, dtype, device):
        return {"fce": init_fce(self.backbone.features, generator, dtype, device)} if self.cfg.method.fce else {}

    def log_probs(self, params, support, ys, query, ways, training):
        if training and self.cfg.method.fce:
            # The biLSTM reads the support set in order: shuffle it per episode so that it cannot learn
            # the sampler's class-sorted positions (global RNG: saved in checkpoints, so resume is exact).
            order = torch.rand(ys.shape, device=ys.device).argsort(1)
            support = support.gather(1, order.unsqueeze(-1).expand_as(support))
            ys = ys.gather(1, order)
        return matching_log_probs(params.get("fce", {}), support, ys, query, ways,
                                  self.cfg.method.fce, self.cfg.method.fce_steps)
