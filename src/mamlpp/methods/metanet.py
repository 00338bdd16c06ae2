"""Meta Networks (Munkhdalai & Yu, ICML 2017; methods spec section 6).

Two networks of the same shape, written as pure functions over explicit weight trees:

    b  the base learner: slow weights W (trained), fast weights W* (generated per example, read per query)
    u  the representation function: slow weights Q (trained), task-level fast weights Q* (generated per task)

Every layer of both is augmented (spec 6.3): act(W h) + act(W* h); the output layer sums before the
softmax, logits = W h + W* h. `augmented` is that layer, for a conv kernel or a matrix.

The meta learner turns loss gradients into fast weights, coordinate by coordinate, after the
preprocessing of spec 6.2 (`preprocess`, p = 7):

    task level (spec 6.4)     the support set cut into T chunks; grad_t = d loss_emb(u(Q, chunk_t)) / dQ;
                              an LSTM d (weights G) reads grad_1..T, a linear 20 -> 1 maps its last output to Q*
    example level (spec 6.5)  grad_i = d CE(b(W, x_i), y_i) / dW for every support example;
                              an MLP m (weights Z) maps each to W*_i, the memory value; its key is r_i = u(Q, Q*, x_i)
    query (spec 6.6)          r = u(Q, Q*, x); a = softmax(cosine(r, R)); W*_x = a M; logits b(W, W*_x, x)

Separate m and d networks for conv kernels and for fc matrices (the code). The gradients fed in are
constants of the meta-graph (spec 6.1: computed by their own backward pass, fed in as new leaves), so
the meta-gradient flows into W, Q, Z and G through the query loss, the attention, the keys and the
generated weights, never through a gradient. u's classification head (used only for loss_emb)
therefore receives no meta-gradient and is not trained (`MetaNet.trainable`).

Per-example gradients without a loop: each support example gets its own copy of the weights
(a [B, n, ...] leaf), the copies run folded into convolution groups, and one backward of the sum of
the examples' losses gives every copy the gradient of its own example's loss. That is exact because
nothing couples examples in these networks (no batch norm): example i's loss depends on copy i only.
The chunks of spec 6.4 use the same trick with one copy per chunk.

All tasks of a meta-batch run together (a leading task axis); `meta_loss_loop` is the plain per-task,
per-example, per-query oracle the tests hold it to.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import METHODS, Config, ConfigError, MethodConfig
from ..distributed import Shard
from ..network import activation
from ..objective import task_accuracy
from .base import Method, leaves

Tree = dict[str, torch.Tensor]


@dataclass
class MetaNetConfig(MethodConfig):
    name: str = "metanet"
    hidden: int = 20  # width of m's two hidden layers and of d's LSTM (spec 6.4, 6.5)
    p: float = 7.0  # gradient preprocessing: (max(log(|g| + eps) / p, -1), clip(g e^p, -1, 1))
    chunks: int = 5  # T: support chunks read by d (the code's IT: 5 Omniglot, 10 Mini-ImageNet); at most n
    query_loss: str = "sum"  # a task's loss over its queries: "sum" (the code) or "mean"


def preprocess(g: torch.Tensor, p: float) -> torch.Tensor:
    """Spec 6.2: g -> (max(log(|g| + eps) / p, -1), clip(g e^p, -1, 1)), eps the dtype's machine epsilon."""
    eps = torch.finfo(g.dtype).eps
    return torch.stack([((g.abs() + eps).log() / p).clamp_min(-1.0), (g * math.exp(p)).clamp(-1.0, 1.0)], -1)


# ---- the networks b and u -------------------------------------------------------------------------------------
def layer_names(cfg: Config) -> list[str]:
    return [f"conv{i}" for i in range(cfg.model.stages)] + ["fc1", "fc2"]


def feature_size(cfg: Config, input_shape) -> int:
    size = input_shape[1]
    for _ in range(cfg.model.stages):
        size = -(-size // 2)  # 2x2 pooling, stride 2, ceil rounding (Chainer's cover_all)
    return cfg.model.filters * size * size


def apply_layer(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """h [B, n, ...] through one weight set per task (w [B, ...]) or per example (w [B, n, ...]): a 3x3 conv
    (padding 1, no bias) for 4-d kernels, a matrix (no bias) otherwise. Tasks (or examples) are folded into
    convolution groups."""
    tasks, n = h.shape[:2]
    conv = h.dim() == 5
    per_example = w.dim() == (6 if conv else 4)
    if not conv:
        return torch.einsum("bnf,bnof->bno" if per_example else "bnf,bof->bno", h, w)
    if per_example:
        y = F.conv2d(h.reshape(1, -1, *h.shape[3:]), w.reshape(-1, *w.shape[3:]), padding=1, groups=tasks * n)
        return y.view(tasks, n, -1, *y.shape[2:])
    y = F.conv2d(h.transpose(0, 1).reshape(n, -1, *h.shape[3:]), w.reshape(-1, *w.shape[2:]), padding=1, groups=tasks)
    return y.view(n, tasks, -1, *y.shape[2:]).transpose(0, 1)


def augmented(cfg: Config, h: torch.Tensor, slow: torch.Tensor, fast: torch.Tensor | None, last: bool = False):
    """Spec 6.3, one layer: act(slow h) + act(fast h); the output layer (last) sums before any activation."""
    if last:
        return apply_layer(h, slow) + (apply_layer(h, fast) if fast is not None else 0)
    out = activation(cfg.model.activation, apply_layer(h, slow))
    return out + activation(cfg.model.activation, apply_layer(h, fast)) if fast is not None else out


def _pool(cfg: Config, h: torch.Tensor) -> torch.Tensor:
    x = h.flatten(0, 1)
    x = F.max_pool2d(x, 2, ceil_mode=True) if cfg.model.pooling == "max" else F.avg_pool2d(x, 2, ceil_mode=True)
    return x.view(*h.shape[:2], *x.shape[1:])


def network(cfg: Config, slow: Tree, fast: Tree | None, x: torch.Tensor, key: bool = False) -> torch.Tensor:
    """b or u: x [B, n, C, H, W] -> logits [B, n, N] (key: u's key, the fc1 output before its activation).
    Slow weights have a task axis [B, ...] or an example axis [B, n, ...]; fast weights alike, or None."""
    h = x
    for i in range(cfg.model.stages):
        k = f"conv{i}"
        h = _pool(cfg, augmented(cfg, h, slow[k], None if fast is None else fast[k]))
    h = h.flatten(2)
    f1 = None if fast is None else fast["fc1"]
    if key:
        return augmented(cfg, h, slow["fc1"], f1, last=True)
    h = augmented(cfg, h, slow["fc1"], f1)
    return augmented(cfg, h, slow["fc2"], None if fast is None else fast["fc2"], last=True)


# ---- the meta learner: m (example level) and d (task level) ---------------------------------------------------
def group_of(name: str) -> str:
    return "conv" if name.startswith("conv") else "fc"


def m_net(meta: Tree, group: str, x: torch.Tensor) -> torch.Tensor:
    """m: [..., 2] -> [...], a coordinate-wise MLP 2 -> H (ReLU) -> H (ReLU) -> 1."""
    w = lambda k: meta[f"m_{group}.{k}"]  # noqa: E731
    h = torch.relu(x @ w("w1").T + w("b1"))
    h = torch.relu(h @ w("w2").T + w("b2"))
    return (h @ w("w3").T + w("b3")).squeeze(-1)


def d_net(meta: Tree, group: str, xs: list[torch.Tensor]) -> torch.Tensor:
    """d: an LSTM read coordinate-wise over the T preprocessed gradients xs[t] [..., 2], then a linear H -> 1
    on its last output -> [...]. Gate order (i, f, g, o), as torch.nn.LSTMCell."""
    w = lambda k: meta[f"d_{group}.{k}"]  # noqa: E731
    hidden = w("weight_hh").shape[1]
    h = c = xs[0].new_zeros(*xs[0].shape[:-1], hidden)
    for x in xs:
        gates = x @ w("weight_ih").T + w("bias_ih") + h @ w("weight_hh").T + w("bias_hh")
        i, f, g, o = gates.chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
    return (h @ w("out.weight").T + w("out.bias")).squeeze(-1)


def chunk_count(cfg: Config, n: int) -> int:
    """T: the largest divisor of n that is at most method.chunks (equal chunks of the support set)."""
    return max(t for t in range(1, min(cfg.method.chunks, n) + 1) if n % t == 0)


def per_example_grads(cfg: Config, weights: Tree, names: list[str], x: torch.Tensor, y: torch.Tensor,
                      groups: int) -> Tree:
    """Gradients of each group's loss w.r.t. the weights: x [B, n, ...] in `groups` equal consecutive groups
    (n: one per example, the summed CE; fewer: chunks, the mean CE of each); -> {name: [B, groups, ...]}.
    One copy of the weights per group, one backward of the summed losses: exact, as groups share nothing."""
    tasks, n = x.shape[:2]
    size = n // groups
    with torch.enable_grad():
        copies = {k: v.detach().unsqueeze(1).expand(-1, groups, *v.shape[1:]).clone().requires_grad_(True)
                  for k, v in weights.items()}
        index = torch.arange(n, device=x.device) // size
        spread = {k: v[:, index] for k, v in copies.items()}  # [B, n, ...]: example i uses its group's copy
        out = network(cfg, spread, None, x)
        losses = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none")
        grads = torch.autograd.grad(losses.sum() / size, [copies[k] for k in names])
    return dict(zip(names, grads))


def generate(cfg: Config, params: dict[str, Tree], xs: torch.Tensor, ys: torch.Tensor, constants: dict | None = None):
    """The meta learner on a support set: (memory values M {name: [B, n, ...]}, keys R [B, n, D], Q*
    {name: [B, ...]}, the gradient constants fed in). `constants` replays recorded gradients (the tests'
    surrogate for the meta-gradient, which treats them as constants)."""
    b, u, meta, p = params["b"], params["u"], params["meta"], cfg.method.p
    tasks, n = xs.shape[:2]
    names = layer_names(cfg)
    u_names = names[:-1]  # u's fc2 is its loss_emb head; its fast weight would never be used (spec 6.7)
    if constants is None:
        u_slow = {k: v.unsqueeze(0).expand(tasks, *v.shape) for k, v in u.items()}
        b_slow = {k: v.unsqueeze(0).expand(tasks, *v.shape) for k, v in b.items()}
        constants = {"u": per_example_grads(cfg, u_slow, u_names, xs, ys, chunk_count(cfg, n)),
                     "b": per_example_grads(cfg, b_slow, names, xs, ys, n)}
    q_star = {k: d_net(meta, group_of(k), [preprocess(g, p) for g in constants["u"][k].unbind(1)]) for k in u_names}
    q_star["fc2"] = None
    memory = {k: m_net(meta, group_of(k), preprocess(constants["b"][k], p)) for k in names}
    keys = network(cfg, {k: v.unsqueeze(0).expand(tasks, *v.shape) for k, v in u.items()}, q_star, xs, key=True)
    return memory, keys, q_star, constants


def cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """a [B, q, D], b [B, n, D] -> [B, q, n] cosine similarities."""
    return (a @ b.transpose(1, 2)) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1)[:, None, :]).clamp_min(eps)


def read(memory: Tree, keys: torch.Tensor, r: torch.Tensor) -> tuple[Tree, torch.Tensor]:
    """Spec 6.6: attention a = softmax over the support of cosine(r, R); W*_x = a M -> ({name: [B, q, ...]}, a)."""
    att = torch.softmax(cosine(r, keys), -1)
    return {k: torch.einsum("bqn,bn...->bq...", att, v) for k, v in memory.items()}, att


def query_logits(cfg: Config, params: dict[str, Tree], xs, ys, xq, constants: dict | None = None):
    """Logits [B, q, N] of the queries, and the gradient constants the support gave."""
    tasks = xq.shape[0]
    memory, keys, q_star, constants = generate(cfg, params, xs, ys, constants)
    expand = lambda tree: {k: v.unsqueeze(0).expand(tasks, *v.shape) for k, v in tree.items()}  # noqa: E731
    r = network(cfg, expand(params["u"]), q_star, xq, key=True)
    fast, _ = read(memory, keys, r)
    return network(cfg, expand(params["b"]), fast, xq), constants


def _query_losses(cfg: Config, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
    return ce.sum(1) if cfg.method.query_loss == "sum" else ce.mean(1)


@METHODS.register("metanet")
class MetaNet(Method):
    Options = MetaNetConfig
    backbones = ("conv4",)  # builds its own b and u (model.filters, model.stages, activation, pooling)

    takes_backbone = False  # generates fast weights for every layer of its own networks

    @classmethod
    def check(cls, cfg: Config, backbone) -> None:
        super().check(cfg, backbone)
        if cfg.model.pooling == "stride" or cfg.model.bnwb or cfg.model.bnrs or cfg.outer.msl:
            raise ConfigError("method.name=metanet: its networks have no strided variant, batch norm or multi-step "
                              "loss (model.pooling=max or avg, model.bnwb/bnrs=false, outer.msl=false)")
        if cfg.data.train_ways not in (0, cfg.data.ways):
            raise ConfigError(f"data.train_ways={cfg.data.train_ways}: MetaNet's heads have data.ways outputs")
        if cfg.method.chunks < 1 or cfg.method.hidden < 1 or cfg.method.query_loss not in ("sum", "mean"):
            raise ConfigError(f"method.chunks={cfg.method.chunks}, method.hidden={cfg.method.hidden} must be >= 1 and "
                              f"method.query_loss={cfg.method.query_loss!r} sum or mean")

    def activation_elements(self) -> int:
        return self.cfg.model.filters * self.input_shape[1] * self.input_shape[2]

    def init(self, generator, dtype, device):
        """Conv and fc weights: LeCun normal, N(0, 1/fan_in) (Chainer's default initialiser, which the code
        keeps); m, d: PyTorch's Linear/LSTMCell default U(+-1/sqrt(fan_in)) ([U], ours)."""
        cfg, hid = self.cfg, self.cfg.method.hidden
        f, c, feat = cfg.model.filters, self.input_shape[0], feature_size(cfg, self.input_shape)
        shapes = {f"conv{i}": (f, c if i == 0 else f, 3, 3) for i in range(cfg.model.stages)}
        shapes.update(fc1=(feat, feat), fc2=(self.num_outputs, feat))

        def lecun(shape):
            return (torch.randn(shape, generator=generator, dtype=dtype) / math.sqrt(math.prod(shape[1:]))).to(device)

        def uniform(shape, fan_in):
            bound = 1 / math.sqrt(fan_in)
            return ((torch.rand(shape, generator=generator, dtype=dtype) * 2 - 1) * bound).to(device)

        b = {k: lecun(s) for k, s in shapes.items()}
        u = {k: lecun(s) for k, s in shapes.items()}
        meta = {}
        for g in ("conv", "fc"):
            meta.update({f"m_{g}.w1": uniform((hid, 2), 2), f"m_{g}.b1": uniform((hid,), 2),
                         f"m_{g}.w2": uniform((hid, hid), hid), f"m_{g}.b2": uniform((hid,), hid),
                         f"m_{g}.w3": uniform((1, hid), hid), f"m_{g}.b3": uniform((1,), hid)})
            meta.update({f"d_{g}.weight_ih": uniform((4 * hid, 2), hid), f"d_{g}.weight_hh": uniform((4 * hid, hid), hid),
                         f"d_{g}.bias_ih": uniform((4 * hid,), hid), f"d_{g}.bias_hh": uniform((4 * hid,), hid),
                         f"d_{g}.out.weight": uniform((1, hid), hid), f"d_{g}.out.bias": uniform((1,), hid)})
        return leaves({"b": b, "u": u, "meta": meta}), {}

    def trainable(self, params):
        """Everything but u's loss_emb head, which only shapes the (constant) gradients fed to d."""
        return [t for g, tree in params.items() for k, t in tree.items() if (g, k) != ("u", "fc2")]

    def meta_loss(self, params, state, episodes, epoch, shard: Shard = Shard()):
        out, _ = query_logits(self.cfg, params, episodes["xs"], episodes["ys"], episodes["xq"])
        losses = _query_losses(self.cfg, out, episodes["yq"])
        with torch.no_grad():
            ce = F.cross_entropy(out.flatten(0, 1), episodes["yq"].flatten())
            metrics = {"loss": ce, "accuracy": task_accuracy(out, episodes["yq"]).mean()}
        return shard.combine(losses, self.cfg.outer.task_reduction), metrics, state

    def predict(self, params, state, episodes):
        with torch.no_grad():
            out, _ = query_logits(self.cfg, params, episodes["xs"], episodes["ys"], episodes["xq"])
        ce = F.cross_entropy(out.flatten(0, 1), episodes["yq"].flatten(), reduction="none").view(episodes["yq"].shape)
        return {"loss": ce.mean(1), "output": out, "accuracy": task_accuracy(out, episodes["yq"])}


# ---- the per-task oracle: one task, one example, one query at a time, plain unbatched layers ---------------------
def _network_one(cfg: Config, slow: Tree, fast: Tree | None, x: torch.Tensor, key: bool = False) -> torch.Tensor:
    act = lambda v: activation(cfg.model.activation, v)  # noqa: E731
    pool = (lambda v: F.max_pool2d(v, 2, ceil_mode=True)) if cfg.model.pooling == "max" else \
        (lambda v: F.avg_pool2d(v, 2, ceil_mode=True))
    h = x
    for i in range(cfg.model.stages):
        k = f"conv{i}"
        y = act(F.conv2d(h, slow[k], padding=1))
        if fast is not None:
            y = y + act(F.conv2d(h, fast[k], padding=1))
        h = pool(y)
    h = h.flatten(1)
    if key:
        return F.linear(h, slow["fc1"]) + (F.linear(h, fast["fc1"]) if fast is not None else 0)
    y = act(F.linear(h, slow["fc1"]))
    h = y + act(F.linear(h, fast["fc1"])) if fast is not None else y
    return F.linear(h, slow["fc2"]) + (F.linear(h, fast["fc2"]) if fast is not None and fast["fc2"] is not None else 0)


def meta_loss_loop(cfg: Config, params: dict[str, Tree], episodes: dict) -> torch.Tensor:
    """MetaNet.meta_loss's loss, task by task, with per-example and per-chunk gradients by explicit loops."""
    return Shard().combine(torch.stack([_task_loop(cfg, params, {k: v[b] for k, v in episodes.items()})[0]
                                        for b in range(episodes["xs"].shape[0])]), cfg.outer.task_reduction)


def _task_loop(cfg: Config, params: dict[str, Tree], ep: dict):
    b, u, meta, p = params["b"], params["u"], params["meta"], cfg.method.p
    names = layer_names(cfg)
    n = ep["xs"].shape[0]
    T = chunk_count(cfg, n)
    size = n // T
    grads_u = []  # per chunk: {name: gradient of the chunk's mean CE through u's slow weights}
    for t in range(T):
        with torch.enable_grad():
            w = {k: v.detach().requires_grad_(True) for k, v in u.items()}
            x, y = ep["xs"][t * size:(t + 1) * size], ep["ys"][t * size:(t + 1) * size]
            loss = F.cross_entropy(_network_one(cfg, w, None, x), y)
            grads_u.append(dict(zip(names[:-1], torch.autograd.grad(loss, [w[k] for k in names[:-1]]))))
    q_star = {k: d_net(meta, group_of(k), [preprocess(g[k], p) for g in grads_u]) for k in names[:-1]}
    q_star["fc2"] = None
    values = []
    for i in range(n):
        with torch.enable_grad():
            w = {k: v.detach().requires_grad_(True) for k, v in b.items()}
            loss = F.cross_entropy(_network_one(cfg, w, None, ep["xs"][i:i + 1]), ep["ys"][i:i + 1])
            g = dict(zip(names, torch.autograd.grad(loss, [w[k] for k in names])))
        values.append({k: m_net(meta, group_of(k), preprocess(g[k], p)) for k in names})
    keys = _network_one(cfg, u, q_star, ep["xs"], key=True)  # [n, D]
    outs = []
    for j in range(ep["xq"].shape[0]):
        r = _network_one(cfg, u, q_star, ep["xq"][j:j + 1], key=True)[0]
        sims = torch.stack([r @ keys[i] / (r.norm() * keys[i].norm()).clamp_min(1e-8) for i in range(n)])
        att = torch.softmax(sims, 0)
        fast = {k: sum(att[i] * values[i][k] for i in range(n)) for k in names}
        outs.append(_network_one(cfg, b, fast, ep["xq"][j:j + 1])[0])
    out = torch.stack(outs)
    return _query_losses(cfg, out[None], ep["yq"][None])[0], out
