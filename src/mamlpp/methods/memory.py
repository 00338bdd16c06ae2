"""The Memory Module (Kaiser, Nachum, Roy & Bengio, ICLR 2017, "Learning to Remember Rare Events";
methods spec section 5) as pure functions over an explicit memory, for B episodes at once.

A memory is keys [B, m, k] (unit rows), values [B, m] (labels; -1 marks a slot never written) and
ages [B, m]: one memory per episode, on a leading task axis, so episodes never interact. Queries are
q = normalise(embedding @ P) with a learned k x k projection P (the code's query_proj).

  lookup       the choose_k most similar written slots; the prediction is the value of the first
  memory_loss  max(0, q.K[b] - q.K[p] + margin): p the most similar candidate with the true label,
               b the most similar with another (0 when there is none); gradients reach q only
  update       top-1 correct: K[n1] <- normalise(q + K[n1]), age 0; otherwise q and its label go to
               the oldest slot, argmax(age + noise); every other slot ages by one

Episodes (spec 5.5-5.6): the memory starts empty for every episode, training and evaluation alike,
as the published code clears it before every batch of episodes; so no memory outlives a call and
the trainer's `state` holds only the embedding's batch-norm statistics. A training episode (N classes
x (K + T) images) is presented class by class in rounds, every class's first image before any second
one; each step looks up, adds its memory loss, then updates with the true label. Evaluation writes
the support set the same way (no gradient, no age noise) and looks the queries up without writing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..config import METHODS, ConfigError, MethodConfig
from ..distributed import Shard
from ..network import update_running_stats
from .base import task_uniforms
from .metric import MetricMethod

Tree = dict[str, torch.Tensor]
EMPTY = -1  # the value of a slot never written


class Memory(NamedTuple):
    keys: torch.Tensor  # [B, m, k] float, unit rows (zero while empty)
    values: torch.Tensor  # [B, m] int64 labels, EMPTY while never written
    ages: torch.Tensor  # [B, m] float, steps since the slot was last written or merged (since the clear if never)


def empty_memory(tasks: int, size: int, key_dim: int, dtype=torch.float32, device="cpu") -> Memory:
    """A cleared memory: zero keys and ages, no values (the code's clear, with values marked empty)."""
    return Memory(torch.zeros(tasks, size, key_dim, dtype=dtype, device=device),
                  torch.full((tasks, size), EMPTY, dtype=torch.int64, device=device),
                  torch.zeros(tasks, size, dtype=dtype, device=device))


def lookup(memory: Memory, q: torch.Tensor, choose_k: int):
    """The min(choose_k, m) written slots most similar to q [B, k], most similar first:
    (similarities [B, c] (differentiable in q), slots [B, c], values [B, c]). Past the written slots
    the similarity is -inf and the value EMPTY; the prediction is values[:, 0] (EMPTY: none)."""
    sims = torch.einsum("bk,bmk->bm", q, memory.keys).masked_fill(memory.values == EMPTY, float("-inf"))
    top, slots = sims.topk(min(choose_k, sims.shape[1]), dim=1)
    return top, slots, memory.values.gather(1, slots)


def memory_loss(sims: torch.Tensor, values: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """max(0, q.K[b] - q.K[p] + margin) per query [B], from a lookup's candidates (sims, values [B, c])
    and the true labels [B]: p the most similar candidate holding the label, b the most similar
    holding another; a missing one counts as similarity 0 (as the code)."""
    written = values != EMPTY
    best = []
    for kind in (written & (values == labels[:, None]), written & (values != labels[:, None])):
        score = sims.masked_fill(~kind, float("-inf")).max(1).values
        best.append(torch.where(kind.any(1), score, torch.zeros_like(score)))
    positive, negative = best
    return F.relu(negative - positive + margin)


def update(memory: Memory, q: torch.Tensor, labels: torch.Tensor, nearest: torch.Tensor, predicted: torch.Tensor,
           noise: torch.Tensor) -> Memory:
    """The memory after writing queries q [B, k] (unit, no gradient) with their true labels [B].

    nearest [B]: the top-1 slot of the lookup, predicted [B]: its value. Where it is right, the slot's
    key becomes normalise(q + key) and its age 0; elsewhere the slot argmax(ages + noise) (noise
    [B, m]; zeros pick the oldest, the lowest index among equals) gets key q, the label, age 0.
    Every other slot ages by one. Returns a new Memory; the input is not modified.
    """
    correct = predicted == labels
    merged = F.normalize(q + memory.keys.gather(1, nearest[:, None, None].expand(-1, 1, q.shape[1])).squeeze(1), dim=1)
    slot = torch.where(correct, nearest, (memory.ages + noise).argmax(1))
    key = torch.where(correct[:, None], merged, q)
    keys = memory.keys.scatter(1, slot[:, None, None].expand(-1, 1, q.shape[1]), key.unsqueeze(1))
    values = memory.values.scatter(1, slot[:, None], labels[:, None])
    ages = (memory.ages + 1).scatter(1, slot[:, None], torch.zeros_like(memory.ages[:, :1]))
    return Memory(keys, values, ages)


def presentation_order(labels: torch.Tensor, ways: int) -> torch.Tensor:
    """Indices [B, n] that present items with labels [B, n] round by round: each class's first item
    (in the given order) before any class's second one, classes in label order within a round."""
    onehot = F.one_hot(labels, ways)
    rank = ((onehot.cumsum(1) - 1) * onehot).sum(-1)  # position of each item among its class's items
    return (rank * ways + labels).argsort(dim=1)  # keys are distinct


def softmax_temperature(choose_k: int, margin: float) -> float:
    """The code's inverse temperature for a softmax over the candidates: max(1, ln(0.2 kk) / margin)."""
    return max(1.0, math.log(0.2 * choose_k) / margin)


@dataclass
class MemoryConfig(MethodConfig):
    name: str = "memory"
    memory_size: int = 0  # slots per episode; 0: one per item the episode writes (the code's default)
    choose_k: int = 256  # nearest neighbours a lookup considers (the code's choose_k)
    margin: float = 0.1  # alpha of the memory loss
    age_noise: float = 8.0  # U(-a, a) added to the ages when choosing the slot to overwrite, in training
    keep_prob: float = 0.3  # dropout keep probability on the embedding in training (1: no dropout)


@METHODS.register("memory")
class MemoryModule(MetricMethod):
    Options = MemoryConfig
    backbones = ("lenet", "conv4")

    @classmethod
    def check(cls, cfg, backbone) -> None:
        super().check(cfg, backbone)
        m = cfg.method
        if m.memory_size < 0 or m.choose_k < 1:
            raise ConfigError(f"method.memory_size={m.memory_size}, method.choose_k={m.choose_k}: the size must be "
                              ">= 0 (0: one slot per item an episode writes) and choose_k >= 1")
        if m.margin <= 0 or m.age_noise < 0 or not 0 < m.keep_prob <= 1:
            raise ConfigError(f"method.margin={m.margin}, method.age_noise={m.age_noise}, method.keep_prob="
                              f"{m.keep_prob}: need margin > 0, age_noise >= 0 and keep_prob in (0, 1]")

    def init_head(self, generator, dtype, device):
        # The query projection P (k x k), truncated N(0, 0.01) as the code.
        d = self.backbone.features
        p = torch.nn.init.trunc_normal_(torch.empty(d, d, dtype=dtype), 0.0, 0.01, -0.02, 0.02, generator=generator)
        return {"memory": {"proj": p.to(device)}}

    def queries(self, params, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(feats @ params["memory"]["proj"], dim=-1)

    def _size(self, written: int) -> int:
        return self.cfg.method.memory_size or written

    def write(self, memory: Memory, q: torch.Tensor, labels: torch.Tensor, ways: int, noise=None):
        """Present items q [B, n, k] with labels [B, n] in order (presentation_order), each looked up
        then written. Returns the memory and, per step in presentation order [B, n]: the memory loss,
        the prediction, the true label and the item's rank among its class's items (0 for a class's
        first). noise [B, n, m] or None (no age noise)."""
        m = self.cfg.method
        order = presentation_order(labels, ways)
        q = q.gather(1, order.unsqueeze(-1).expand_as(q))
        labels = labels.gather(1, order)
        losses, predictions = [], []
        # The memory an item sees depends on what every earlier item wrote (merge or overwrite follows
        # the lookup), so the steps of an episode run in order; each step is batched over the episodes.
        for t in range(q.shape[1]):
            sims, slots, values = lookup(memory, q[:, t], m.choose_k)
            losses.append(memory_loss(sims, values, labels[:, t], m.margin))
            predictions.append(values[:, 0])
            step_noise = torch.zeros_like(memory.ages) if noise is None else noise[:, t]
            memory = update(memory, q[:, t].detach(), labels[:, t], slots[:, 0], values[:, 0], step_noise)
        onehot = F.one_hot(labels, ways)
        rank = ((onehot.cumsum(1) - 1) * onehot).sum(-1)
        return memory, torch.stack(losses, 1), torch.stack(predictions, 1), labels, rank

    def log_probs(self, params, support, ys, query, ways, training):
        """Write the support set into a cleared memory, then read the queries without writing: per
        class, t times the best similarity among the lookup's candidates holding that label (-t when
        none does), t the code's softmax temperature. The argmax is the memory's returned value."""
        m = self.cfg.method
        memory = empty_memory(support.shape[0], self._size(support.shape[1]), support.shape[2], support.dtype,
                              support.device)
        memory, *_ = self.write(memory, self.queries(params, support), ys, ways)
        q = self.queries(params, query)
        sims = (q @ memory.keys.transpose(1, 2)).masked_fill((memory.values == EMPTY).unsqueeze(1), float("-inf"))
        kth = sims.topk(min(m.choose_k, sims.shape[2]), dim=2).values[..., -1:]  # the last candidate's similarity
        member = F.one_hot(memory.values.clamp(min=0), ways).bool() & (memory.values != EMPTY).unsqueeze(-1)
        best = sims.unsqueeze(-1).masked_fill(~member.unsqueeze(1), float("-inf")).amax(2)  # [B, nq, ways]
        best = torch.where(best.isfinite() & (best >= kth), best, torch.full_like(best, -1.0))
        return softmax_temperature(m.choose_k, m.margin) * best

    def meta_loss(self, params, state, episodes, epoch, shard: Shard = Shard()):
        """The memory loss of every step of each training episode (mean over steps), the memory
        cleared at the start of each episode. The episode's images are embedded in one pass first:
        the parameters do not change within a call (one optimiser step per batch of episodes)."""
        m = self.cfg.method
        x = torch.cat([episodes["xs"], episodes["xq"]], 1)
        y = torch.cat([episodes["ys"], episodes["yq"]], 1)
        tasks, n = y.shape
        ways = episodes["xs"].shape[1] // self.cfg.data.shots
        feats, stats = self.features(params, state, x, training=True)
        size, d = self._size(n), feats.shape[-1]
        u = task_uniforms(shard, tasks, n * d + n * size, x)
        if m.keep_prob < 1:
            feats = feats * (u[:, : n * d].view_as(feats) < m.keep_prob) / m.keep_prob
        noise = (2 * u[:, n * d:].view(tasks, n, size) - 1) * m.age_noise
        memory = empty_memory(tasks, size, d, feats.dtype, feats.device)
        _, losses, predictions, labels, rank = self.write(memory, self.queries(params, feats), y, ways, noise)
        per_task = losses.mean(1)
        loss = shard.combine(per_task, self.cfg.outer.task_reduction)
        new_state = update_running_stats(state, [(0, stats)], self.cfg.model.bn_momentum, shard) if state else state
        with torch.no_grad():
            # Episode accuracy: the lookups of items whose class had shown its K support images already.
            later = rank >= self.cfg.data.shots
            hits = ((predictions == labels) & later).sum(1).to(feats.dtype) / later.sum(1).to(feats.dtype)
            metrics = {"loss": per_task.mean().detach(), "accuracy": hits.mean()}
        return loss, metrics, new_state
