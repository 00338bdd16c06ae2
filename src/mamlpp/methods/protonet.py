"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017; methods spec section 9).

A class's prototype is the mean of its embedded support examples; a query's logits are the negative
squared Euclidean distances to the prototypes. Training may use more classes per episode than
testing (data.train_ways, 60-way for Omniglot as published).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import METHODS
from .metric import MetricMethod


def prototypes(support: torch.Tensor, ys: torch.Tensor, ways: int) -> torch.Tensor:
    """Class means of the support embeddings: support [B, ns, d], ys [B, ns] -> [B, ways, d]."""
    onehot = F.one_hot(ys, ways).to(support.dtype)  # [B, ns, ways]
    return onehot.transpose(1, 2) @ support / onehot.sum(1).unsqueeze(-1)


def squared_distance_logits(query: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """-||q - c||^2 for query [B, nq, d] and centres [B, ways, d] -> [B, nq, ways]."""
    return 2 * query @ centres.transpose(1, 2) - query.pow(2).sum(-1, keepdim=True) - centres.pow(2).sum(-1).unsqueeze(1)


@METHODS.register("protonet")
class PrototypicalNetworks(MetricMethod):
    backbones = ("conv4", "resnet12")

    def log_probs(self, params, support, ys, query, ways, training):
        return squared_distance_logits(query, prototypes(support, ys, ways))
