"""Meta-gradients against central finite differences in float64, with batch norm in the network.

The network is the smooth variant (tanh, average pooling): finite differences across ReLU and
max-pool kinks are unreliable (engineering notes). Directional derivatives along random directions
cover every meta-parameter at once; conv biases in front of BN have a true gradient of zero, which
a directional test handles without a per-tensor relative error.
"""
import torch

from core_utils import F64, cat, episodes, learner, meta_grad, smooth, tiny_config
from mamlpp.inner import step_rate, task_batched
from mamlpp.objective import meta_loss, task_losses
from mamlpp.schedules import step_weights
from mamlpp.methods import flatten

EPOCH = 1  # MSL active, weights not uniform


def setup(second_order=True):
    cfg = smooth(tiny_config("omniglot-5w1s-mamlpp", **{"inner.second_order": second_order}))
    cfg.model.stages, cfg.inner.steps = 2, 2
    model, params, state = learner(cfg, shape=(1, 8, 8))
    return cfg, model, params, state, episodes(tasks=2, shape=(1, 8, 8))


def loss_at(cfg, model, params, state, eps, direction, h):
    """Meta-loss with every meta-parameter moved by h * direction (no graph needed)."""
    moved = {g: {k: (v.detach() + h * direction[f"{g}.{k}"]).requires_grad_(True) for k, v in tree.items()}
             for g, tree in params.items()}
    return meta_loss(model, moved, state, eps, cfg, EPOCH, "classification")[0].item()


def directions(params, count, seed=0):
    g = torch.Generator().manual_seed(seed)
    flat = flatten(params)
    return [{k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in flat.items()} for _ in range(count)]


def directional_fd(cfg, model, params, state, eps, d, h=1e-5):
    return (loss_at(cfg, model, params, state, eps, d, h) - loss_at(cfg, model, params, state, eps, d, -h)) / (2 * h)


def dot(grad, d):
    return sum((grad[k] * d[k]).sum() for k in grad).item()


def test_second_order_meta_gradient_matches_finite_differences():
    cfg, model, params, state, eps = setup(second_order=True)
    _, grad, _ = meta_grad(meta_loss, model, params, state, eps, cfg, EPOCH)
    for d in directions(params, 6):
        fd = directional_fd(cfg, model, params, state, eps, d)
        analytic = dot(grad, d)
        rel = abs(analytic - fd) / abs(fd)
        assert rel < 1e-6, f"second-order gradient off finite differences by {rel:.2e}"
        # The tolerance has power: a gradient 0.1% off fails it.
        assert abs(1.001 * analytic - fd) / abs(fd) > 1e-6


def test_first_order_differs_and_matches_its_definition():
    cfg, model, params, state, eps = setup(second_order=False)
    _, fo_grad, _ = meta_grad(meta_loss, model, params, state, eps, cfg, EPOCH)
    cfg2, *_ = setup(second_order=True)
    _, so_grad, _ = meta_grad(meta_loss, model, params, state, eps, cfg2, EPOCH)
    diff = (cat(fo_grad) - cat(so_grad)).norm() / cat(so_grad).norm()
    assert diff > 1e-3, "first-order gradient should differ from the true (second-order) one"

    # Definition: the inner gradients g_i are constants taken at the current point. The surrogate
    #   F(phi) = sum_i w_i L_query(theta_{i+1}(phi)),  theta_{i+1} = theta_i - alpha_i(phi) g_i
    # is a function of the meta-parameters phi whose exact gradient is the first-order meta-gradient.
    tasks, steps = eps["xs"].shape[0], cfg.inner.steps
    weights = step_weights(cfg, EPOCH, steps, training=True)
    consts, fast = [], task_batched(params["net"], tasks, detach=True)
    for i in range(steps):
        out, _ = model.forward(fast, params["bn"], state, eps["xs"], i)
        g = torch.autograd.grad(task_losses("classification", out, eps["ys"]).sum(), list(fast.values()))
        consts.append(dict(zip(fast, g)))
        fast = {k: (v - step_rate(params["lr"], cfg.inner, k, i) * consts[i][k]).detach().requires_grad_(True)
                for k, v in fast.items()}

    def surrogate(p):
        theta, total = task_batched(p["net"], tasks), 0.0
        for i in range(steps):
            theta = {k: v - step_rate(p["lr"], cfg.inner, k, i) * consts[i][k] for k, v in theta.items()}
            out, _ = model.forward(theta, p["bn"], state, eps["xq"], i)
            total = total + weights[i] * task_losses("classification", out, eps["yq"])
        return total.sum() if cfg.outer.task_reduction == "sum" else total.mean()

    flat = flatten(params)
    exact = dict(zip(flat, torch.autograd.grad(surrogate(params), list(flat.values()))))
    rel = (cat(exact) - cat(fo_grad)).norm() / cat(exact).norm()
    assert rel < 1e-12, f"first-order gradient differs from its definition by {rel:.2e}"
    for d in directions(params, 3, seed=1):
        h = 1e-5
        moved = lambda s: {g: {k: v.detach() + s * h * d[f"{g}.{k}"] for k, v in t.items()} for g, t in params.items()}
        fd = (surrogate(moved(1)).item() - surrogate(moved(-1)).item()) / (2 * h)
        assert abs(dot(fo_grad, d) - fd) / abs(fd) < 1e-6
