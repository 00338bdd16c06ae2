"""Siamese Networks (Koch, Zemel & Salakhutdinov 2015; methods spec section 2), for B episodes at once.

Twin towers with tied weights embed two images (one pass embeds every image of an episode); the
head scores a pair as p = sigmoid(sum_j alpha_j |h1_j - h2_j| + bias), and training minimises the
binary cross-entropy of same/different pairs. Evaluation needs no training on the task: a query's
score for class c combines its similarities to c's support images (spec 2.6).

Pairs (spec 2.5) come from the training episodes the sampler draws, which hold only training
classes: a training episode is data.train_ways classes x (data.shots + data.train_queries) images,
and `sample_pairs` draws method.pairs pairs from it, exactly half of them same-class, uniformly
among the episode's same-class pairs and among its different-class pairs (no image with itself).
With method.distort every training image gets its own random affine distortion first (Koch's 8
distortions per pair, drawn afresh each time instead of stored). The random numbers come from
base.task_uniforms: exact on resume, and the same per task under torchrun.

The towers are model.arch=conv4 (the headless Conv4 of the metric methods, MAML++'s capacity) or
model.arch=koch (the paper's network, data.image_size=105).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..config import METHODS, ConfigError, MethodConfig
from ..distributed import Shard
from ..network import update_running_stats
from ..objective import task_accuracy
from .base import task_uniforms
from .metric import MetricMethod

Tree = dict[str, torch.Tensor]

# Koch's distortion ranges (spec 2.5), each component kept with probability 1/2. The translation is
# +-2 pixels of a 105-pixel image, kept as that fraction of the image at other sizes (affine_grid's
# coordinates run from -1 to 1 across the image, so 2 px = 4/105 of them).
ROTATION, SHEAR, SCALE, SHIFT = math.radians(10.0), 0.3, (0.8, 1.2), 4.0 / 105.0
DISTORTION_DRAWS = 14  # 7 components (theta, shear x/y, scale x/y, shift x/y) and 7 keep flags


def pair_logits(head: Tree, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The similarity's logit z = sum_j alpha_j |a_j - b_j| + bias for embeddings a, b [..., d]
    (broadcast) -> [...]; p = sigmoid(z). Symmetric in a and b by construction."""
    return F.linear((a - b).abs(), head["weight"], head["bias"]).squeeze(-1)


def sample_pairs(labels: torch.Tensor, pairs: int, keys: torch.Tensor):
    """Balanced pairs of each episode's images: labels [B, n], keys [B, n, n] uniform numbers.

    Returns (left, right, same): indices [B, pairs] into the episode's images and targets [B, pairs]
    (1 for same class). The first half are same-class pairs, the second half different-class
    pairs; each half is the pairs i < j of its kind with the smallest keys, i.e. drawn uniformly
    without replacement. The caller checks that each kind has at least pairs/2 candidates.
    """
    n, half = labels.shape[1], pairs // 2
    upper = torch.ones(n, n, dtype=torch.bool, device=labels.device).triu(1)
    same = labels[:, :, None] == labels[:, None, :]
    picks = []
    for kind in (same & upper, ~same & upper):
        flat = keys.masked_fill(~kind, 2.0).flatten(1)  # non-candidates sort last
        picks.append(flat.topk(half, dim=1, largest=False).indices)
    index = torch.cat(picks, 1)
    target = torch.cat([torch.ones(half), torch.zeros(half)]).to(keys.dtype).to(keys.device)
    return index // n, index % n, target.expand(labels.shape[0], -1)


def distort(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Koch's random affine distortion, one per image: x [B, n, C, H, W], u [B, n, 14] uniforms.

    T = (theta, rho_x, rho_y, s_x, s_y, t_x, t_y), each component drawn uniformly from its range and
    kept with probability 1/2 (else the identity's value); the map is rotation . shear . scale plus
    the shift, applied as the sampling grid's transform, bilinear, edges repeated (Omniglot's border
    is background).
    """
    v, keep = u[..., :7], u[..., 7:] < 0.5

    def component(i, lo, hi, identity):
        return torch.where(keep[..., i], lo + (hi - lo) * v[..., i], torch.full_like(v[..., i], identity))

    theta = component(0, -ROTATION, ROTATION, 0.0)
    shear_x, shear_y = component(1, -SHEAR, SHEAR, 0.0), component(2, -SHEAR, SHEAR, 0.0)
    scale_x, scale_y = component(3, *SCALE, 1.0), component(4, *SCALE, 1.0)
    shift = torch.stack([component(5, -SHIFT, SHIFT, 0.0), component(6, -SHIFT, SHIFT, 0.0)], -1)
    cos, sin = theta.cos(), theta.sin()
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    one = torch.ones_like(theta)
    shear = torch.stack([torch.stack([one, shear_x], -1), torch.stack([shear_y, one], -1)], -2)
    matrix = rotation @ shear * torch.stack([scale_x, scale_y], -1).unsqueeze(-2)  # R . Sh . diag(s)
    affine = torch.cat([matrix, shift.unsqueeze(-1)], -1).flatten(0, 1)  # [B*n, 2, 3]
    images = x.flatten(0, 1)
    grid = F.affine_grid(affine, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.view_as(x)


def class_log_scores(z: torch.Tensor, ys: torch.Tensor, ways: int, combine: str = "mean") -> torch.Tensor:
    """Per-class scores from the pair logits z [B, nq, ns] of queries against support items with
    labels ys [B, ns] -> [B, nq, ways]: log of the mean similarity p over the class's items (spec
    2.6; for one shot, log p of Koch's rule), or log of the largest (combine='max'). Monotone in the
    similarity, so the argmax is the published prediction; these are the method's logits."""
    log_p = F.logsigmoid(z).unsqueeze(-1)  # [B, nq, ns, 1]
    member = F.one_hot(ys, ways).bool().unsqueeze(1)  # [B, 1, ns, ways]
    masked = log_p.masked_fill(~member, float("-inf"))
    if combine == "max":
        return masked.amax(2)
    count = member.sum(2).clamp(min=1).to(z.dtype)  # [B, 1, ways]
    return masked.logsumexp(2) - count.log()


@dataclass
class SiameseConfig(MethodConfig):
    name: str = "siamese"
    pairs: int = 128  # pairs per training episode, half same-class (Koch's minibatch of 128)
    distort: bool = False  # Koch's random affine distortions of the training images (spec 2.5)
    combine: Literal["mean", "max"] = "mean"  # K-shot: a class's score from its K similarities


@METHODS.register("siamese")
class SiameseNetworks(MetricMethod):
    Options = SiameseConfig
    backbones = ("conv4", "koch")

    @classmethod
    def check(cls, cfg, backbone) -> None:
        super().check(cfg, backbone)
        d, pairs = cfg.data, cfg.method.pairs
        if pairs < 2 or pairs % 2:
            raise ConfigError(f"method.pairs={pairs}: must be an even number >= 2 (half same-class, half different)")
        ways, per_class = d.train_ways or d.ways, d.shots + (d.train_queries or d.queries)
        same = ways * per_class * (per_class - 1) // 2
        different = ways * (ways - 1) // 2 * per_class ** 2
        if min(same, different) < pairs // 2:
            raise ConfigError(
                f"method.pairs={pairs}: a training episode of {ways} classes (data.train_ways) x {per_class} images "
                f"(data.shots + data.train_queries) has {same} same-class and {different} different-class pairs, "
                f"fewer than the {pairs // 2} of each kind asked for; lower method.pairs or enlarge the episode")

    def init_head(self, generator, dtype, device):
        # The paper's dense-layer initialisation (spec 2.4): weights N(0, 0.2), bias N(0.5, 0.01).
        weight = torch.randn(1, self.backbone.features, generator=generator, dtype=dtype) * 0.2
        bias = torch.randn(1, generator=generator, dtype=dtype) * 0.01 + 0.5
        return {"head": {"weight": weight.to(device), "bias": bias.to(device)}}

    def log_probs(self, params, support, ys, query, ways, training):
        z = pair_logits(params["head"], query.unsqueeze(2), support.unsqueeze(1))  # [B, nq, ns]
        return class_log_scores(z, ys, ways, self.cfg.method.combine)

    def meta_loss(self, params, state, episodes, epoch, shard: Shard = Shard()):
        """Binary cross-entropy of method.pairs balanced pairs per training episode (mean over pairs)."""
        m = self.cfg.method
        x = torch.cat([episodes["xs"], episodes["xq"]], 1)
        y = torch.cat([episodes["ys"], episodes["yq"]], 1)
        tasks, n = y.shape
        u = task_uniforms(shard, tasks, n * n + (n * DISTORTION_DRAWS if m.distort else 0), x)
        left, right, target = sample_pairs(y, m.pairs, u[:, : n * n].view(tasks, n, n))
        if m.distort:
            x = distort(x, u[:, n * n:].view(tasks, n, DISTORTION_DRAWS))
        feats, stats = self.features(params, state, x, training=True)
        pick = lambda idx: feats.gather(1, idx.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))  # noqa: E731
        z = pair_logits(params["head"], pick(left), pick(right))
        losses = F.binary_cross_entropy_with_logits(z, target, reduction="none").mean(1)
        loss = shard.combine(losses, self.cfg.outer.task_reduction)
        new_state = update_running_stats(state, [(0, stats)], self.cfg.model.bn_momentum, shard) if state else state
        with torch.no_grad():
            ns = episodes["xs"].shape[1]
            ways = ns // self.cfg.data.shots
            out = self.log_probs(params, feats[:, :ns], episodes["ys"], feats[:, ns:], ways, False)
            metrics = {"loss": losses.mean(), "accuracy": task_accuracy(out, episodes["yq"]).mean()}
        return loss, metrics, new_state
