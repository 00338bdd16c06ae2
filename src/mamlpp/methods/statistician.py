"""Neural Statistician (Edwards & Storkey, ICLR 2017; methods spec section 4) as a mamlpp method.

A generative model of sets: a set D of images of one character has a context c, each image x its
latents z_1..z_L. Four networks, pure functions of explicit parameter trees, for B tasks at once:

  statistic network   q(c | D)                shared encoder -> per item fc -> mean over the set -> 2 fc -> (mu, logvar)
  inference network   q(z_l | z_{l+1}, x, c)  fc(h) + fc(c) [+ fc(z_{l+1})] -> residual block of 3 fc -> (mu, logvar)
  latent decoder      p(z_l | z_{l+1}, c)     fc(c) [+ fc(z_{l+1})] -> residual block -> (mu, logvar); top layer per set
  observation decoder p(x | z_{1:L}, c)       fc(z) + fc(c) -> fc -> 4f x g x g -> 9 conv / deconv -> Bernoulli logits

Trained on the ELBO with the context term, re-weighted as w R - (C + L) / w, w = 1 + alpha * decay^epoch;
not trained for classification. A few-shot task is classified by the smallest KL divergence between
a query's context posterior q(c | {x}) and each class's q(c | S_n), posterior means only.

Sets: a training episode's class n (its K support and T query images) is one set; the sampler's
same-class images are the "sets of same-class images" of the paper. Images are inverted so that ink
is 1 (mamlpp's Omniglot has background 1), the Bernoulli decoder's convention.

Every hidden conv / fc layer is followed by batch norm and ELU; each (mu, logvar) output by one
"global" batch norm over all its values (conormdurkan's re-implementation), which keeps the first
KLs near 10 nats instead of 1e5. Randomness (one reparameterised sample of c per set and of each z_l
per item) comes from torch's global generator, which every checkpoint saves: resume is exact.

Tensors carry a leading task axis B and an item axis: x [B, M, C, H, W], features [B, M, F]. Sets
are given by a 0/1 membership matrix [B, M, S] (item m belongs to set s), so any grouping of a
task's items (a class's images in training, support sets and single queries in classification)
goes through one statistic-network pass. Batch norm normalises each task over its own items (sets
for the layers after pooling), so tasks are independent: chunks and torchrun shares split a
meta-batch without changing any task's loss. model.bnrs keeps running statistics (explicit state,
folded in task order as the metric methods do), which model.bn_eval=running evaluates with.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from ..config import METHODS, Config, ConfigError, MethodConfig
from ..distributed import Shard
from ..network import update_running_stats
from ..objective import task_accuracy, task_losses
from .base import Method, leaves

Tree = dict[str, torch.Tensor]
BN_EPS, GLOBAL_BN_EPS = 1e-5, 1e-3
ENCODER_STRIDES = (1, 1, 2, 1, 1, 2, 1, 1, 2)  # three stages of three 3x3 convs, the last one strided
RES_LAYERS = 3  # fully connected layers in each residual block


# ---- sizes ----------------------------------------------------------------------------------------
class Shapes:
    """Static sizes of the four networks for images input_shape = (C, s, s): encoder widths
    (f, 2f, 4f) with f = model.filters (64: the paper's 64/128/256), a g x g grid after three
    stride-2 stages (28 -> 14 -> 7 -> 4). The trainer reads activation_elements (one image's first
    activation) to size its CPU chunks, as it does for a backbone."""

    def __init__(self, cfg: Config, input_shape: tuple[int, ...]):
        channels, size = input_shape[0], input_shape[-1]
        if len(input_shape) != 3 or input_shape[1] != size or size % 4:
            raise ConfigError(f"method.name=statistician: its decoder mirrors the encoder on square images whose "
                              f"size is a multiple of 4 (Omniglot 28); these are {'x'.join(map(str, input_shape))}")
        m, f = cfg.method, cfg.model.filters
        self.channels, self.size, self.widths = channels, size, (f, 2 * f, 4 * f)
        self.grid = -(-size // 8)  # three stride-2 convs with padding 1: ceil(s / 2) each
        self.features = 4 * f * self.grid ** 2
        self.c_dim, self.z_dim, self.hidden, self.layers = m.c_dim, m.z_dim, m.hidden, m.stochastic_layers
        self.activation_elements = f * size * size


def _normal(shape, fan_in: int, fan_out: int, generator) -> torch.Tensor:
    """Xavier-normal with the ReLU gain (conormdurkan's init), drawn on the CPU from `generator`."""
    std = math.sqrt(2.0) * math.sqrt(2.0 / (fan_in + fan_out))
    return torch.randn(shape, generator=generator, dtype=torch.float64) * std


def init_params(shapes: Shapes, generator: torch.Generator) -> dict[str, Tree]:
    """Parameter trees {network: {name: tensor}} in float64 on the CPU, drawn in a fixed order.
    Layers followed by batch norm have no bias (BN's beta takes its place: a bias there has a true
    gradient of zero); they carry "{layer}.bn.weight" / "{layer}.bn.bias" instead. The layers that
    output a Gaussian's (mu, logvar) keep their bias and are followed by a "global" batch norm, one
    gamma and beta for all of their outputs (conormdurkan's bn_params)."""
    f1, f2, f4 = shapes.widths
    H, C, Z, L = shapes.hidden, shapes.c_dim, shapes.z_dim, shapes.layers
    trees: dict[str, Tree] = {"encoder": {}, "statistic": {}, "inference": {}, "latent": {}, "observation": {}}

    def affine(tree, name, width, bn):
        if bn:  # gamma, beta of the batch norm after the layer: `width` channels, 1 for the global one
            tree[f"{name}.bn.weight"] = torch.ones(width, dtype=torch.float64)
            tree[f"{name}.bn.bias"] = torch.zeros(width, dtype=torch.float64)

    def dense(tree, name, n_in, n_out, bn=False, gaussian=False):
        tree[f"{name}.weight"] = _normal((n_out, n_in), n_in, n_out, generator)
        if not bn:
            tree[f"{name}.bias"] = torch.zeros(n_out, dtype=torch.float64)
        affine(tree, name, 1 if gaussian else n_out, bn or gaussian)

    def conv(tree, name, n_in, n_out, k=3, bn=True, transposed=False):
        shape = (n_in, n_out, k, k) if transposed else (n_out, n_in, k, k)
        tree[f"{name}.weight"] = _normal(shape, n_in * k * k, n_out * k * k, generator)
        if not bn:
            tree[f"{name}.bias"] = torch.zeros(n_out, dtype=torch.float64)
        affine(tree, name, n_out, bn)

    widths = [shapes.channels, f1, f1, f1, f2, f2, f2, f4, f4, f4]
    for i in range(len(ENCODER_STRIDES)):
        conv(trees["encoder"], f"conv{i}", widths[i], widths[i + 1])
    s = trees["statistic"]
    dense(s, "pre", shapes.features, H, bn=True)
    dense(s, "post0", H, H, bn=True)
    dense(s, "post1", H, H, bn=True)
    dense(s, "out", H, 2 * C, gaussian=True)
    for layer in range(L):  # layer 0 is the top one, z_L in the paper's numbering
        for net, inputs in (("inference", {"h": shapes.features, "c": C}), ("latent", {"c": C})):
            tree, pre = trees[net], f"z{layer}."
            for name, width in inputs.items():
                dense(tree, pre + name, width, H)
            if layer:
                dense(tree, pre + "z", Z, H)
            for i in range(RES_LAYERS):
                dense(tree, f"{pre}res{i}", H, H, bn=True)
            dense(tree, pre + "out", H, 2 * Z, gaussian=True)
    o = trees["observation"]
    dense(o, "z", L * Z, H)
    dense(o, "c", C, H)
    dense(o, "fc", H, f4 * shapes.grid ** 2)
    for name, n_in, n_out, up in (("conv0", f4, f4, 0), ("conv1", f4, f4, 0), ("up0", f4, f4, 1),
                                  ("conv2", f4, f2, 0), ("conv3", f2, f2, 0), ("up1", f2, f2, 1),
                                  ("conv4", f2, f1, 0), ("conv5", f1, f1, 0), ("up2", f1, f1, 1)):
        conv(o, name, n_in, n_out, k=2 if up else 3, transposed=bool(up))
    conv(o, "out", f1, shapes.channels, k=1, bn=False)
    return trees


# ---- batch norm over each task's own items --------------------------------------------------------
@dataclass
class Norm:
    """How batch norm runs in one pass: each task's batch statistics (collecting them for the running
    averages when `collect` is a dict), or the running statistics in `state` (running=True)."""
    state: Tree = field(default_factory=dict)
    running: bool = False
    collect: dict | None = None


def batch_norm(x: torch.Tensor, p: Tree, group: str, layer: str, norm: Norm, eps: float = BN_EPS) -> torch.Tensor:
    """x [B, n, C, ...]: normalise every (task, channel) over the task's n items (and pixels)."""
    gamma, beta = p[f"{layer}.bn.weight"], p[f"{layer}.bn.bias"]
    view = (x.shape[2],) + (1,) * (x.dim() - 3)
    key = f"{group}.{layer}"
    if norm.running:
        mean, var = norm.state[f"{key}.mean"][0].view(view), norm.state[f"{key}.var"][0].view(view)
    else:
        dims = (1, *range(3, x.dim()))
        var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
        if norm.collect is not None:
            b, c = x.shape[0], x.shape[2]
            count = x.numel() // (b * c)
            norm.collect[key] = (mean.detach().reshape(b, c), var.detach().reshape(b, c) * count / max(count - 1, 1))
    return (x - mean) * torch.rsqrt(var + eps) * gamma.view(view) + beta.view(view)


def _conv(x: torch.Tensor, w: torch.Tensor, b=None, stride=1, padding=1, transposed=False) -> torch.Tensor:
    """A shared-weight convolution of x [B, n, C, H, W] (tasks and items folded into the batch)."""
    flat = x.flatten(0, 1)
    out = F.conv_transpose2d(flat, w, b, stride=2) if transposed else F.conv2d(flat, w, b, stride, padding)
    return out.unflatten(0, x.shape[:2])


def _dense(x: torch.Tensor, p: Tree, name: str) -> torch.Tensor:
    return F.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))


def _gaussian(e: torch.Tensor, p: Tree, group: str, layer: str, norm: Norm) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, logvar) from the output layer, whose 2d outputs are batch-normalised together (one channel:
    statistics over the task's items and all 2d values; conormdurkan's 'global' batch norm, eps 1e-3).
    Without it the initial log-variances spread over several units and the first KLs reach 1e5 nats."""
    t = batch_norm(_dense(e, p, layer).unsqueeze(2), p, group, layer, norm, eps=GLOBAL_BN_EPS).squeeze(2)
    mu, logvar = t.chunk(2, dim=-1)
    return mu, logvar


def gaussian_kl(mu_a, logvar_a, mu_b, logvar_b) -> torch.Tensor:
    """KL(N(mu_a, e^logvar_a) || N(mu_b, e^logvar_b)) per dimension (diagonal Gaussians), broadcasting."""
    return 0.5 * (logvar_b - logvar_a + (logvar_a.exp() + (mu_a - mu_b) ** 2) * torch.exp(-logvar_b) - 1)


# ---- the four networks ----------------------------------------------------------------------------
def encode(p: Tree, x: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Shared encoder: x [B, M, C, s, s] -> features h [B, M, 4f * g * g]; conv -> BN -> ELU."""
    h = x
    for i, stride in enumerate(ENCODER_STRIDES):
        h = F.elu(batch_norm(_conv(h, p[f"conv{i}.weight"], stride=stride), p, "encoder", f"conv{i}", norm))
    return h.flatten(2)


def statistic(p: Tree, h: torch.Tensor, member: torch.Tensor, norm: Norm):
    """q(c | D) of every set: h [B, M, F], member [B, M, S] (1 where item m is in set s) ->
    (mu, logvar) [B, S, c_dim]. The per-item layer runs on the items, then each set's mean of them
    (so any set size, and the order of a set's items does not matter) goes through the post-pool layers."""
    e = F.elu(batch_norm(_dense(h, p, "pre"), p, "statistic", "pre", norm))
    e = member.transpose(1, 2) @ e / member.sum(1).unsqueeze(-1)
    for i in range(2):
        e = F.elu(batch_norm(_dense(e, p, f"post{i}"), p, "statistic", f"post{i}", norm))
    return _gaussian(e, p, "statistic", "out", norm)


def _residual(e: torch.Tensor, p: Tree, group: str, prefix: str, norm: Norm) -> torch.Tensor:
    """ELU(e + block(e)), block = RES_LAYERS x (fc -> BN), ELU between them (conormdurkan's FCResBlock)."""
    out = e
    for i in range(RES_LAYERS):
        out = batch_norm(_dense(out, p, f"{prefix}res{i}"), p, group, f"{prefix}res{i}", norm)
        if i < RES_LAYERS - 1:
            out = F.elu(out)
    return F.elu(out + e)


def inference(p: Tree, layer: int, h: torch.Tensor, c: torch.Tensor, z_above: torch.Tensor | None, norm: Norm):
    """q(z_layer | z_above, x, c): h [B, M, F], c [B, M, c_dim] (each item's set context), z_above
    [B, M, z_dim] or None for the top layer -> (mu, logvar) [B, M, z_dim]."""
    pre = f"z{layer}."
    e = _dense(h, p, pre + "h") + _dense(c, p, pre + "c")
    if z_above is not None:
        e = e + _dense(z_above, p, pre + "z")
    return _gaussian(_residual(F.elu(e), p, "inference", pre, norm), p, "inference", pre + "out", norm)


def latent(p: Tree, layer: int, c: torch.Tensor, z_above: torch.Tensor | None, norm: Norm):
    """p(z_layer | z_above, c): the top layer takes c per set [B, S, c_dim] (one prior per set); the
    others c and z_above per item [B, M, ...] -> (mu, logvar)."""
    pre = f"z{layer}."
    e = _dense(c, p, pre + "c")
    if z_above is not None:
        e = e + _dense(z_above, p, pre + "z")
    return _gaussian(_residual(F.elu(e), p, "latent", pre, norm), p, "latent", pre + "out", norm)


def observe(p: Tree, z: torch.Tensor, c: torch.Tensor, size: int, norm: Norm) -> torch.Tensor:
    """p(x | z_{1:L}, c): z [B, M, L * z_dim], c [B, M, c_dim] -> Bernoulli logits [B, M, C, size, size].
    fc to 4f x g x g, then (conv, conv, deconv 2x2 stride 2) x 3 with BN and ELU, and a 1x1 conv. The
    second conv of the last stage drops its padding when the grid overshoots (28: 16 -> 14 -> 28)."""
    e = F.elu(_dense(z, p, "z") + _dense(c, p, "c"))
    width = p["conv0.weight"].shape[1]
    grid = math.isqrt(p["fc.weight"].shape[0] // width)
    e = _dense(e, p, "fc").unflatten(-1, (width, grid, grid))
    overshoot = 4 * grid - size // 2  # 0 or 2 for sizes that are multiples of 4
    for name in ("conv0", "conv1", "up0", "conv2", "conv3", "up1", "conv4", "conv5", "up2"):
        up = name.startswith("up")
        padding = 1 - overshoot // 2 if name == "conv5" else 1
        e = _conv(e, p[f"{name}.weight"], padding=padding, transposed=up)
        e = F.elu(batch_norm(e, p, "observation", name, norm))
    return _conv(e, p["out.weight"], p["out.bias"], padding=0)


# ---- ELBO, classification, sampling ---------------------------------------------------------------
def elbo(params: dict[str, Tree], x: torch.Tensor, sets: torch.Tensor, num_sets: int, noise: dict,
         norm: Norm) -> dict[str, torch.Tensor]:
    """The ELBO's terms for the sets of B tasks, one reparameterised sample of c per set and of each
    z_l per item. x [B, M, C, s, s] with ink = 1; sets [B, M] int64: the set of each item, in
    [0, num_sets); noise {"c": [B, num_sets, c_dim], "z": [L x [B, M, z_dim]]} standard normal.

    Returns per item "recon" = log p(x | z, c) and "kl_z" = sum_l KL(q(z_l | z_{l+1}, x, c) ||
    p(z_l | z_{l+1}, c)) [B, M], per set "kl_c" = KL(q(c | D) || N(0, I)) [B, num_sets], and the
    encoder's "features" [B, M, F]. ELBO of a task = sum recon - sum kl_z - sum kl_c.
    """
    member = F.one_hot(sets, num_sets).to(x.dtype)
    h = encode(params["encoder"], x, norm)
    c_mu, c_logvar = statistic(params["statistic"], h, member, norm)
    c_set = c_mu + torch.exp(0.5 * c_logvar) * noise["c"]
    c = member @ c_set  # each item's own set's context
    zs, kl_z, z = [], 0.0, None
    for layer, eps in enumerate(noise["z"]):
        q_mu, q_logvar = inference(params["inference"], layer, h, c, z, norm)
        if layer == 0:  # p(z_L | c): one prior per set, shared by its items
            p_mu, p_logvar = (member @ t for t in latent(params["latent"], 0, c_set, None, norm))
        else:
            p_mu, p_logvar = latent(params["latent"], layer, c, z, norm)
        z = q_mu + torch.exp(0.5 * q_logvar) * eps
        kl_z = kl_z + gaussian_kl(q_mu, q_logvar, p_mu, p_logvar).sum(-1)
        zs.append(z)
    logits = observe(params["observation"], torch.cat(zs, -1), c, x.shape[-1], norm)
    recon = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(2).sum(-1)
    return {"recon": recon, "kl_z": kl_z, "kl_c": gaussian_kl(c_mu, c_logvar, torch.zeros_like(c_mu),
                                                               torch.zeros_like(c_logvar)).sum(-1),
            "features": h}


def kl_logits(stat: Tree, support: torch.Tensor, ys: torch.Tensor, query: torch.Tensor, ways: int, norm: Norm,
              direction: str = "support-query") -> torch.Tensor:
    """The KL classifier on encoder features: support [B, ns, F] with labels ys [B, ns], query
    [B, nq, F] -> logits [B, nq, ways] = -KL(q(c | S_n) || q(c | {x_q})) ("support-query", spec 4.5)
    or -KL(q(c | {x_q}) || q(c | S_n)) ("query-support"), posterior means and variances (no sampling).
    Support sets and single-query sets go through one statistic-network pass."""
    nq = query.shape[1]
    member = torch.cat([
        torch.cat([F.one_hot(ys, ways).to(support.dtype), support.new_zeros(*ys.shape, nq)], -1),
        torch.cat([query.new_zeros(query.shape[0], nq, ways),
                   torch.eye(nq, dtype=query.dtype, device=query.device).expand(query.shape[0], nq, nq)], -1)], 1)
    mu, logvar = statistic(stat, torch.cat([support, query], 1), member, norm)
    s = (mu[:, None, :ways], logvar[:, None, :ways])  # [B, 1, ways, c]
    q = (mu[:, ways:, None], logvar[:, ways:, None])  # [B, nq, 1, c]
    a, b = (s, q) if direction == "support-query" else (q, s)
    return -gaussian_kl(*a, *b).sum(-1)


def generate(params: dict[str, Tree], x: torch.Tensor, sets: torch.Tensor, num_sets: int, count: int,
             layers: int, norm: Norm) -> torch.Tensor:
    """`count` new images per set conditioned on it: x [B, M, C, s, s] (ink = 1), sets [B, M] ->
    Bernoulli means [B, num_sets, count, C, s, s]. c is the posterior mean of q(c | D); each z_l is
    sampled from p(z_l | z_{l+1}, c) with the global generator (conormdurkan's sample_conditioned)."""
    member = F.one_hot(sets, num_sets).to(x.dtype)
    c_set, _ = statistic(params["statistic"], encode(params["encoder"], x, norm), member, norm)
    b = x.shape[0]
    c = c_set.repeat_interleave(count, 1)  # [B, S * count, c_dim], set-major
    zs, z = [], None
    for layer in range(layers):
        if layer == 0:
            mu, logvar = (t.repeat_interleave(count, 1) for t in latent(params["latent"], 0, c_set, None, norm))
        else:
            mu, logvar = latent(params["latent"], layer, c, z, norm)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, dtype=mu.dtype, device=mu.device)
        zs.append(z)
    probs = torch.sigmoid(observe(params["observation"], torch.cat(zs, -1), c, x.shape[-1], norm))
    return probs.view(b, num_sets, count, *x.shape[2:])


# ---- the method -----------------------------------------------------------------------------------
@dataclass
class StatisticianConfig(MethodConfig):
    name: str = "statistician"
    c_dim: int = 512  # context c (spec 4.3)
    z_dim: int = 16  # each stochastic layer z_l
    hidden: int = 256  # width of the fully connected layers
    stochastic_layers: int = 1  # L (the paper's Omniglot model: 1)
    # Loss re-weighting (spec 4.2, conormdurkan): minimise -(w R - (C + L) / w), w = 1 + alpha * alpha_decay^epoch.
    alpha: float = 1.0
    alpha_decay: float = 0.5
    # Classification: -KL(q(c|S_n) || q(c|x)) ("support-query", spec 4.5) or the reverse direction.
    kl: Literal["support-query", "query-support"] = "support-query"


@METHODS.register("statistician")
class NeuralStatistician(Method):
    Options = StatisticianConfig
    backbones = ("conv4",)  # image inputs; the networks are its own (spec 4.3), model.filters sets their width
    takes_backbone = False

    def __init__(self, cfg: Config, kind: str, input_shape, num_outputs: int, backbone=None):
        super().__init__(cfg, kind, input_shape, num_outputs, backbone)
        self.backbone = Shapes(cfg, tuple(input_shape))
        self.invert = cfg.data.dataset == "omniglot"  # mamlpp's Omniglot has background 1: make ink 1

    @classmethod
    def check(cls, cfg: Config, backbone) -> None:
        super().check(cfg, backbone)
        m = cfg.method
        for key in ("c_dim", "z_dim", "hidden", "stochastic_layers"):
            if getattr(m, key) < 1:
                raise ConfigError(f"method.{key}={getattr(m, key)}: must be >= 1")
        if m.alpha < 0 or not 0 <= m.alpha_decay <= 1:
            raise ConfigError(f"method.alpha={m.alpha}, method.alpha_decay={m.alpha_decay}: expected alpha >= 0 and "
                              "a decay in [0, 1]")
        for key, on in (("model.bnwb", cfg.model.bnwb), ("outer.msl", cfg.outer.msl)):
            if on:
                raise ConfigError(f"{key}=true is per inner step; method.name=statistician has no inner loop")
        if cfg.data.dataset == "mini_imagenet":
            raise ConfigError("method.name=statistician: its Bernoulli decoder models binary images (Omniglot); "
                              "data.dataset=mini_imagenet is not one")
        if cfg.data.image_size % 4:
            raise ConfigError(f"data.image_size={cfg.data.image_size}: method.name=statistician needs a multiple of 4")

    def init(self, generator, dtype, device):
        trees = init_params(self.backbone, generator)
        params = {g: {k: v.to(device, dtype) for k, v in tree.items()} for g, tree in trees.items()}
        state = {}
        if self.cfg.model.bnrs:
            for group, tree in params.items():
                for name, t in tree.items():
                    if name.endswith(".bn.weight"):
                        key = f"{group}.{name[: -len('.bn.weight')]}"
                        state[f"{key}.mean"] = torch.zeros(1, t.numel(), dtype=dtype, device=device)
                        state[f"{key}.var"] = torch.ones(1, t.numel(), dtype=dtype, device=device)
        return leaves(params), state

    def ink(self, x: torch.Tensor) -> torch.Tensor:
        return 1 - x if self.invert else x

    def weight(self, epoch: int) -> float:
        """w = 1 + alpha * alpha_decay^epoch: reconstruction up-weighted, KL down-weighted early on."""
        return 1.0 + self.cfg.method.alpha * self.cfg.method.alpha_decay ** epoch

    def _noise(self, shard: Shard, tasks: int, sets: int, items: int, like: torch.Tensor) -> dict:
        """Standard normal noise for the whole meta-batch from its generator (task_uniforms), the
        part's rows taken: every task gets the noise it gets unsplit."""
        total, lo = shard.total or tasks, shard.offset
        m = self.cfg.method

        def draw(*shape):
            return torch.randn(total, *shape, generator=shard.generator, dtype=like.dtype)[lo:lo + tasks].to(like.device)

        return {"c": draw(sets, m.c_dim), "z": [draw(items, m.z_dim) for _ in range(m.stochastic_layers)]}

    def meta_loss(self, params, state, episodes, epoch, shard: Shard = Shard()):
        xs, ys, xq, yq = episodes["xs"], episodes["ys"], episodes["xq"], episodes["yq"]
        ways = xs.shape[1] // self.cfg.data.shots
        x, sets = self.ink(torch.cat([xs, xq], 1)), torch.cat([ys, yq], 1)  # a class's K + T images: one set
        tasks, items = x.shape[:2]
        norm = Norm(state, collect={} if state else None)
        terms = elbo(params, x, sets, ways, self._noise(shard, tasks, ways, items, x), norm)
        recon, kl = terms["recon"].sum(1), terms["kl_c"].sum(1) + terms["kl_z"].sum(1)
        w = self.weight(epoch)
        losses = -(w * recon - kl / w) / items  # per image, as conormdurkan divides by batch x set size
        loss = shard.combine(losses, self.cfg.outer.task_reduction)
        momentum = self.cfg.model.bn_momentum
        new_state = update_running_stats(state, [(0, norm.collect)], momentum, shard) if state else state
        with torch.no_grad():
            h = terms["features"].detach()
            out = kl_logits(params["statistic"], h[:, : xs.shape[1]], ys, h[:, xs.shape[1]:], ways, Norm(state),
                            self.cfg.method.kl)
            metrics = {"loss": ((kl - recon) / items).mean(),  # the negative ELBO per image, in nats
                       "accuracy": task_accuracy(out, yq).mean()}
        return loss, metrics, new_state

    def _norm(self, state) -> Norm:
        return Norm(state, running=self.cfg.model.bn_eval == "running")

    def predict(self, params, state, episodes):
        """Logits -KL per query and class (the test ensemble averages them); loss: their cross-entropy."""
        xs, xq = episodes["xs"], episodes["xq"]
        ways = xs.shape[1] // self.cfg.data.shots
        with torch.no_grad():
            norm = self._norm(state)
            h = encode(params["encoder"], self.ink(torch.cat([xs, xq], 1)), norm)
            out = kl_logits(params["statistic"], h[:, : xs.shape[1]], episodes["ys"], h[:, xs.shape[1]:], ways, norm,
                            self.cfg.method.kl)
        return {"loss": task_losses("classification", out, episodes["yq"]), "output": out,
                "accuracy": task_accuracy(out, episodes["yq"])}

    def sample(self, params, state, x: torch.Tensor, sets: torch.Tensor, num_sets: int, count: int) -> torch.Tensor:
        """`count` images generated for each set of x [B, M, C, s, s] (sets [B, M]), in the data's own
        convention (Omniglot: background 1) -> [B, num_sets, count, C, s, s]; global generator."""
        with torch.no_grad():
            probs = generate(params, self.ink(x), sets, num_sets, count, self.cfg.method.stochastic_layers,
                             self._norm(state))
        return self.ink(probs)
