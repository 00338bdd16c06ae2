"""The Meta-LSTM learner (Ravi & Larochelle, ICLR 2017; methods spec section 7).

A learner network's parameters theta are the cell state of a coordinate-wise two-layer meta-learner:
layer 1 is an LSTM (input: the preprocessed loss and gradient of a coordinate, hidden 20), layer 2
the meta-learner cell, whose gates give each coordinate a learned step size and shrinkage:

    f_t = [h_t, theta_{t-1}, f_{t-1}] . W_F + b_F        i_t = [h_t, theta_{t-1}, i_{t-1}] . W_I + b_I
    theta_t = sigmoid(f_t) * theta_{t-1} - sigmoid(i_t) * grad_t

with theta_0 = c_0 learned, f_0 = i_0 = 0 (pre-sigmoid values, as the code keeps them). The loss and
the gradient fed in are constants of the meta-graph (no second derivatives, as published); the chain
through theta_t, the gates and both LSTM states is differentiated.

The learner is Conv4 (ReLU, batch norm; the published one has 32 filters) whose every parameter,
batch-norm gamma/beta included, is updated by the meta-learner. Batch norm: batch statistics while
meta-training; at meta-test, running statistics reset per episode, accumulated by the T support
passes (model.bn_momentum, running <- (1 - m) running + m batch) and used for the queries.

All tasks of a meta-batch run together: the learner folds tasks into convolution groups with per-task
weights (as MAML's Conv4), and the meta-learner runs on [B, P] coordinates. `meta_loss_loop` is the
plain per-task oracle the tests hold the parallel path to.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import METHODS, Config, ConfigError, MethodConfig
from ..distributed import Shard
from ..network import BN_EPS, activation, linear
from ..objective import task_accuracy, task_losses
from .base import Method, leaves

Tree = dict[str, torch.Tensor]


@dataclass
class MetaLSTMConfig(MethodConfig):
    name: str = "metalstm"
    hidden: int = 20  # layer 1's hidden size
    p: float = 10.0  # preprocessing: log|x| / p, or -1 and e^p x below e^-p
    grad_div_batch: bool = True  # the code's quirk: the batch-mean gradient divided again by the batch size


def preprocess(x: torch.Tensor, p: float) -> torch.Tensor:
    """x -> (log|x| / p, sign x) if |x| >= e^-p, else (-1, e^p x): [...] -> [..., 2] (spec 7.3)."""
    big = x.abs() >= math.exp(-p)
    first = torch.where(big, x.abs().clamp_min(math.exp(-p)).log() / p, torch.full_like(x, -1.0))
    second = torch.where(big, x.sign(), math.exp(p) * x)
    return torch.stack([first, second], -1)


def cell_step(meta: Tree, h: torch.Tensor, theta: torch.Tensor, grad: torch.Tensor, f_prev: torch.Tensor,
              i_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer 2 for every coordinate: h [..., H], theta, grad, f_prev, i_prev [...] -> (theta_t, f_t, i_t)."""
    hidden = h.shape[-1]
    w_f, w_i = meta["cell.w_f"], meta["cell.w_i"]  # [H + 2]: over [h, theta, previous gate]
    f = h @ w_f[:hidden] + theta * w_f[hidden] + f_prev * w_f[hidden + 1] + meta["cell.b_f"]
    i = h @ w_i[:hidden] + theta * w_i[hidden] + i_prev * w_i[hidden + 1] + meta["cell.b_i"]
    return torch.sigmoid(f) * theta - torch.sigmoid(i) * grad, f, i


def lstm_step(meta: Tree, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 1, an LSTM cell with torch.nn.LSTMCell's gate order (i, f, g, o): x [..., 4], h, c [..., H]."""
    gates = x @ meta["lstm.weight_ih"].T + meta["lstm.bias_ih"] + h @ meta["lstm.weight_hh"].T + meta["lstm.bias_hh"]
    i, f, g, o = gates.chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


# ---- the learner: Conv4 whose batch-norm gamma/beta are learner parameters too ------------------------------
def init_learner(cfg: Config, input_shape: tuple[int, ...], ways: int, generator: torch.Generator, dtype,
                 device) -> Tree:
    """c_0: PyTorch's default initialisation of conv and linear layers (U(+-1/sqrt(fan_in))), gamma 1, beta 0."""
    c, f, size = input_shape[0], cfg.model.filters, input_shape[1]
    shapes = {}
    for i in range(cfg.model.stages):
        shapes[f"conv{i}.weight"], shapes[f"conv{i}.bias"] = (f, c if i == 0 else f, 3, 3), (f,)
        size //= 2
    shapes["linear.weight"], shapes["linear.bias"] = (ways, f * size * size), (ways,)
    theta = {}
    for name, shape in shapes.items():
        fan_in = math.prod(shapes[name.replace(".bias", ".weight")][1:])
        theta[name] = ((torch.rand(shape, generator=generator, dtype=dtype) * 2 - 1) / math.sqrt(fan_in)).to(device)
    for i in range(cfg.model.stages):
        theta[f"bn{i}.weight"] = torch.ones(f, dtype=dtype, device=device)
        theta[f"bn{i}.bias"] = torch.zeros(f, dtype=dtype, device=device)
    return theta


def learner_forward(cfg: Config, theta: Tree, x: torch.Tensor, running: Tree | None = None,
                    momentum: float | None = None) -> tuple[torch.Tensor, Tree | None]:
    """Per-task weights theta[k] [B, ...], x [B, n, C, H, W] -> logits [B, n, N], tasks folded into
    convolution groups. Batch statistics, or with `running` ({bn{i}.mean/var: [B, C]}): normalise with
    them (momentum None) or accumulate into them (momentum m: returns the updated statistics)."""
    tasks, n = x.shape[:2]
    h = x.transpose(0, 1).reshape(n, tasks * x.shape[2], *x.shape[3:])
    new = {} if running is not None and momentum is not None else None
    for i in range(cfg.model.stages):
        w = theta[f"conv{i}.weight"]
        h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), theta[f"conv{i}.bias"].reshape(-1), padding=1, groups=tasks)
        gamma, beta = theta[f"bn{i}.weight"].reshape(-1), theta[f"bn{i}.bias"].reshape(-1)
        if running is None:
            h = F.batch_norm(h, None, None, gamma, beta, training=True, eps=BN_EPS)
        elif new is None:  # evaluate with the statistics the support passes accumulated
            h = F.batch_norm(h, running[f"bn{i}.mean"].reshape(-1), running[f"bn{i}.var"].reshape(-1), gamma, beta,
                             training=False, eps=BN_EPS)
        else:
            mean, var = running[f"bn{i}.mean"].reshape(-1).clone(), running[f"bn{i}.var"].reshape(-1).clone()
            h = F.batch_norm(h, mean, var, gamma, beta, training=True, momentum=momentum, eps=BN_EPS)
            new[f"bn{i}.mean"], new[f"bn{i}.var"] = mean.view(tasks, -1), var.view(tasks, -1)
        h = activation(cfg.model.activation, h)
        h = F.max_pool2d(h, 2) if cfg.model.pooling == "max" else F.avg_pool2d(h, 2)
    feats = h.reshape(n, tasks, -1).transpose(0, 1)
    return linear(feats, theta["linear.weight"], theta["linear.bias"]), new


def fresh_running(cfg: Config, tasks: int, like: torch.Tensor) -> Tree:
    """Running statistics reset at the start of every episode: mean 0, variance 1."""
    zeros = torch.zeros(tasks, cfg.model.filters, dtype=like.dtype, device=like.device)
    return {k: zeros + (1.0 if k.endswith(".var") else 0.0)
            for i in range(cfg.model.stages) for k in (f"bn{i}.mean", f"bn{i}.var")}


# ---- the method -------------------------------------------------------------------------------------------
def unroll(cfg: Config, params: dict[str, Tree], xs: torch.Tensor, ys: torch.Tensor, steps: int, training: bool,
           constants: list | None = None, forward=learner_forward):
    """T meta-learner updates of every task's learner on its support set: (theta_T, running statistics or
    None, the (loss, gradient) constants fed in). `constants` replays recorded ones (the tests' surrogate);
    `forward` is the learner (the per-task oracle passes its unbatched one)."""
    opts, meta, c0 = cfg.method, params["meta"], params["net"]
    names = list(c0)
    tasks = xs.shape[0]
    theta = torch.cat([c0[k].reshape(1, -1).expand(tasks, -1) for k in names], 1)  # [B, P]
    sizes, shapes = [c0[k].numel() for k in names], [c0[k].shape for k in names]

    def tree(flat: torch.Tensor) -> Tree:
        return {k: part.view(tasks, *shape) for k, part, shape in zip(names, flat.split(sizes, 1), shapes)}

    h = c = torch.zeros(*theta.shape, opts.hidden, dtype=theta.dtype, device=theta.device)
    f_prev = i_prev = torch.zeros_like(theta)
    running = None if training else fresh_running(cfg, tasks, theta)
    recorded = []
    for t in range(steps):
        if constants is None:
            with torch.enable_grad():
                point = theta.detach().requires_grad_(True)
                out, new = forward(cfg, tree(point), xs, running, cfg.model.bn_momentum)
                losses = task_losses("classification", out, ys)
                grad = torch.autograd.grad(losses.sum(), point)[0]
            loss, running = losses.detach(), new if new is not None else running
            if opts.grad_div_batch:
                grad = grad / xs.shape[1]
            recorded.append((loss, grad))
        else:
            loss, grad = constants[t]
        x = torch.cat([preprocess(loss, opts.p)[:, None].expand(-1, theta.shape[1], -1), preprocess(grad, opts.p)], -1)
        h, c = lstm_step(meta, x, h, c)
        theta, f_prev, i_prev = cell_step(meta, h, theta, grad, f_prev, i_prev)
    return tree(theta), running, recorded


@METHODS.register("metalstm")
class MetaLSTM(Method):
    Options = MetaLSTMConfig
    backbones = ("conv4",)  # the published learner; written here because the meta-learner updates BN too
    takes_backbone = False

    @classmethod
    def check(cls, cfg: Config, backbone) -> None:
        super().check(cfg, backbone)
        if cfg.model.pooling == "stride" or cfg.model.bnwb or cfg.model.bnrs or cfg.outer.msl:
            raise ConfigError("method.name=metalstm: its learner has no strided variant, per-step batch norm or "
                              "multi-step loss (model.pooling=max or avg, model.bnwb/bnrs=false, outer.msl=false)")
        if cfg.data.train_ways not in (0, cfg.data.ways):
            raise ConfigError(f"data.train_ways={cfg.data.train_ways}: the learner's head has data.ways outputs")

    def activation_elements(self) -> int:
        return self.cfg.model.filters * self.input_shape[1] * self.input_shape[2]

    def init(self, generator, dtype, device):
        o = self.cfg.method
        theta = init_learner(self.cfg, self.input_shape, self.num_outputs, generator, dtype, device)
        u = lambda shape, lo, hi: (lo + (hi - lo) * torch.rand(shape, generator=generator, dtype=dtype)).to(device)  # noqa: E731
        meta = {"lstm.weight_ih": u((4 * o.hidden, 4), -0.01, 0.01), "lstm.weight_hh": u((4 * o.hidden, o.hidden), -0.01, 0.01),
                "lstm.bias_ih": u((4 * o.hidden,), -0.01, 0.01), "lstm.bias_hh": u((4 * o.hidden,), -0.01, 0.01),
                "cell.w_f": u((o.hidden + 2,), -0.01, 0.01), "cell.w_i": u((o.hidden + 2,), -0.01, 0.01),
                "cell.b_f": u((), 4.0, 5.0), "cell.b_i": u((), -5.0, -4.0)}
        return leaves({"net": theta, "meta": meta}), {}

    def meta_loss(self, params, state, episodes, epoch, shard: Shard = Shard()):
        theta, _, _ = unroll(self.cfg, params, episodes["xs"], episodes["ys"], self.cfg.inner.steps, training=True)
        out, _ = learner_forward(self.cfg, theta, episodes["xq"])
        losses = task_losses("classification", out, episodes["yq"])
        with torch.no_grad():
            metrics = {"loss": losses.mean(), "accuracy": task_accuracy(out, episodes["yq"]).mean()}
        return shard.combine(losses, self.cfg.outer.task_reduction), metrics, state

    def adapt(self, params, state, xs, ys):
        with torch.no_grad():
            theta, running, _ = unroll(self.cfg, params, xs, ys, self.cfg.inner.test_steps, training=False)
        return {**{f"theta.{k}": v for k, v in theta.items()}, **{f"running.{k}": v for k, v in running.items()}}

    def apply(self, params, state, fast, xq):
        theta = {k[len("theta."):]: v for k, v in fast.items() if k.startswith("theta.")}
        running = {k[len("running."):]: v for k, v in fast.items() if k.startswith("running.")}
        with torch.no_grad():
            return learner_forward(self.cfg, theta, xq, running)[0]

    def predict(self, params, state, episodes):
        out = self.apply(params, state, self.adapt(params, state, episodes["xs"], episodes["ys"]), episodes["xq"])
        return {"loss": task_losses("classification", out, episodes["yq"]), "output": out,
                "accuracy": task_accuracy(out, episodes["yq"])}


# ---- the per-task oracle ----------------------------------------------------------------------------------
def _forward_one(cfg: Config, theta: Tree, x: torch.Tensor, running: Tree | None = None,
                 momentum: float | None = None) -> tuple[torch.Tensor, Tree | None]:
    """learner_forward for one task (B = 1) with plain, unbatched convolutions and batch norm."""
    h, new = x[0], ({} if running is not None and momentum is not None else None)
    for i in range(cfg.model.stages):
        h = F.conv2d(h, theta[f"conv{i}.weight"][0], theta[f"conv{i}.bias"][0], padding=1)
        gamma, beta = theta[f"bn{i}.weight"][0], theta[f"bn{i}.bias"][0]
        if running is None:
            h = F.batch_norm(h, None, None, gamma, beta, training=True, eps=BN_EPS)
        else:
            mean, var = running[f"bn{i}.mean"][0].clone(), running[f"bn{i}.var"][0].clone()
            h = F.batch_norm(h, mean, var, gamma, beta, training=new is not None, momentum=momentum or 0.0, eps=BN_EPS)
            if new is not None:
                new[f"bn{i}.mean"], new[f"bn{i}.var"] = mean[None], var[None]
        h = activation(cfg.model.activation, h)
        h = F.max_pool2d(h, 2) if cfg.model.pooling == "max" else F.avg_pool2d(h, 2)
    return F.linear(h.flatten(1), theta["linear.weight"][0], theta["linear.bias"][0])[None], new


def meta_loss_loop(cfg: Config, params: dict[str, Tree], episodes: dict) -> torch.Tensor:
    """MetaLSTM.meta_loss's loss, one task after another (the oracle of the task-parallel path)."""
    losses = []
    for b in range(episodes["xs"].shape[0]):
        one = {k: v[b:b + 1] for k, v in episodes.items()}
        theta, _, _ = unroll(cfg, params, one["xs"], one["ys"], cfg.inner.steps, True, forward=_forward_one)
        losses.append(task_losses("classification", _forward_one(cfg, theta, one["xq"])[0], one["yq"]))
    return Shard().combine(torch.cat(losses), cfg.outer.task_reduction)


def predict_loop(cfg: Config, params: dict[str, Tree], episodes: dict) -> torch.Tensor:
    """MetaLSTM.predict's outputs, one task after another."""
    outs = []
    for b in range(episodes["xs"].shape[0]):
        one = {k: v[b:b + 1] for k, v in episodes.items()}
        with torch.no_grad():
            theta, running, _ = unroll(cfg, params, one["xs"], one["ys"], cfg.inner.test_steps, False,
                                       forward=_forward_one)
            outs.append(_forward_one(cfg, theta, one["xq"], running)[0])
    return torch.cat(outs)
