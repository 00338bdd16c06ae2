"""kernels.py: the hand-written double backwards of batch norm, convolution and max-pooling against
finite differences and torch's own, and train.precision=bf16."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from core_utils import F64, image_tasks, smooth, tiny_config
from mamlpp.config import ConfigError, validate
from mamlpp.kernels import batch_norm_train, conv2d, max_pool2d
from mamlpp.methods import flatten
from mamlpp.trainer import Trainer, require_bf16
from test_methods import METHOD_CASES, tiny_method_config

EPS = 1e-5


def randn(*shape, seed=0, scale=1.0):
    return (scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)).requires_grad_()


def ours(x, gamma, beta):
    return batch_norm_train(x, gamma, beta, EPS)[0]


def torchs(x, gamma, beta):
    return F.batch_norm(x, None, None, gamma, beta, training=True, eps=EPS)


@pytest.mark.parametrize("shape", [(3, 4, 5, 5), (6, 4)])
def test_first_and_second_derivatives_match_finite_differences(shape):
    x, gamma, beta = randn(*shape), randn(shape[1], seed=1), randn(shape[1], seed=2)
    assert torch.autograd.gradcheck(ours, (x, gamma, beta))
    assert torch.autograd.gradgradcheck(ours, (x, gamma, beta))


def second_order(bn, x, gamma, beta, r, weights):
    """Every gradient of a second-order use: the first backward with create_graph (its upstream
    gradient r requires grad too), then a loss on all three of its outputs."""
    gx, ggamma, gbeta = torch.autograd.grad((bn(x, gamma, beta) * r).sum(), [x, gamma, beta], create_graph=True)
    second = (gx * weights[0]).sum() + (ggamma * weights[1]).sum() + (gbeta * weights[2]).sum()
    return torch.autograd.grad(second, [x, gamma, r])


def test_double_backward_equals_torchs_on_a_conv4_shape():
    # Task-folded layout of Conv4's first layer: 10 images, 3 tasks x 8 channels, 14x14.
    shape = (10, 24, 14, 14)
    x, gamma, beta = randn(*shape, scale=3.0), randn(24, seed=1), randn(24, seed=2)
    r = randn(*shape, seed=3)
    weights = [randn(*shape, seed=4), randn(24, seed=5), randn(24, seed=6)]
    for a, b in zip(second_order(ours, x, gamma, beta, r, weights), second_order(torchs, x, gamma, beta, r, weights)):
        assert ((a - b).norm() / b.norm()).item() < 1e-12


def test_statistics_are_the_kernels_own():
    x = randn(10, 6, 4, 4, scale=2.0)
    _, mean, invstd = batch_norm_train(x, torch.ones(6, dtype=F64), torch.zeros(6, dtype=F64), EPS)
    assert not mean.requires_grad and not invstd.requires_grad
    torch.testing.assert_close(mean, x.detach().mean((0, 2, 3)))
    torch.testing.assert_close(invstd, (x.detach().var((0, 2, 3), unbiased=False) + EPS).rsqrt())


# ---- train.precision=bf16 -------------------------------------------------------------------------
class ConvDtypes(TorchDispatchMode):
    """Records the dtype of every convolution's input."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.seen.add(args[0].dtype)
        return func(*args, **(kwargs or {}))


def bf16_available() -> bool:
    try:
        require_bf16(torch.device("cpu"))
        return True
    except ConfigError:
        return False


def trainer(precision: str, **changes) -> Trainer:
    cfg = smooth(tiny_config(**{"train.dtype": "float32", "train.precision": precision, **changes}))
    cfg.outer.meta_batch = 2
    return Trainer(cfg, image_tasks(cfg), torch.device("cpu"))


@pytest.mark.skipif(not bf16_available(), reason="this CPU has no native bfloat16")
def test_bf16_runs_convolutions_in_bf16_and_keeps_float32_parameters():
    full, half = trainer("full"), trainer("bf16")
    batch = full.tasks.train_batch(0, 2)
    grads = {}
    for name, t in (("full", full), ("bf16", half)):
        with ConvDtypes() as mode:
            t.meta_step(batch, 0)
        grads[name] = torch.cat([p.grad.flatten() for p in flatten(t.params).values() if p.grad is not None])
        assert mode.seen == ({torch.float32} if name == "full" else {torch.bfloat16})
        assert all(p.dtype == torch.float32 for p in flatten(t.params).values())
        assert all(v.dtype == torch.float32 for v in t.state.values())
    # On a smooth network (no max-pool ties to flip) bf16 stays near the float32 meta-gradient; a
    # gradient path cut by the casts would not.
    rel = ((grads["bf16"] - grads["full"]).norm() / grads["full"].norm()).item()
    assert rel < 0.05, rel


def test_bf16_needs_float32_and_native_bf16(monkeypatch):
    cfg = tiny_config(**{"train.precision": "bf16", "train.dtype": "float64"})
    with pytest.raises(ConfigError, match="train.dtype=float64 must be float32"):
        validate(cfg)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="train.precision=bf16: this CPU has no native bfloat16"):
        require_bf16(torch.device("cpu"))
    with pytest.raises(ConfigError, match="no native bfloat16"):
        trainer("bf16")


def test_precision_is_part_of_what_a_run_computes():
    # bf16 changes the numbers: report and sweep must not treat runs that differ in it as repeats.
    from mamlpp.config import INCIDENTAL_KEYS
    assert "train.precision" not in INCIDENTAL_KEYS
    assert tiny_config().train.precision == "full"


# ---- convolution ----------------------------------------------------------------------------------
def conv_ours(x, w, b, stride=1, groups=2):
    return conv2d(x, w, b, stride, 1, groups)


def conv_torchs(x, w, b, stride=1, groups=2):
    return F.conv2d(x, w, b, stride=stride, padding=1, groups=groups)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_derivatives_match_finite_differences(stride):
    x, w, b = randn(2, 4, 5, 5), randn(6, 2, 3, 3, seed=1), randn(6, seed=2)
    assert torch.autograd.gradcheck(lambda *a: conv_ours(*a, stride=stride), (x, w, b))
    assert torch.autograd.gradgradcheck(lambda *a: conv_ours(*a, stride=stride), (x, w, b))


@pytest.mark.parametrize("with_input_grad", [True, False])
def test_conv_double_backward_equals_torchs(with_input_grad):
    # Task-folded: 3 tasks of 4 -> 5 channels, 7 images, 9x9; the data layer's input needs no gradient.
    x = randn(7, 12, 9, 9).requires_grad_(with_input_grad)
    w, b, r = randn(15, 4, 3, 3, seed=1), randn(15, seed=2), randn(7, 15, 9, 9, seed=3)
    results = []
    for conv in (conv_ours, conv_torchs):
        leaves = [x, w, b] if with_input_grad else [w, b]
        y = conv(x, w, b, groups=3)
        first = torch.autograd.grad((y * y * r).sum(), leaves, create_graph=True)
        second = sum((g * g).sum() for g in first)
        results.append(torch.autograd.grad(second, leaves + [r]))
    for a, b_ in zip(*results):
        assert ((a - b_).norm() / b_.norm()).item() < 1e-12


# ---- max-pooling ----------------------------------------------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool_double_backward_equals_torchs_in_either_layout(channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = randn(3, 4, 8, 8).detach().contiguous(memory_format=fmt).requires_grad_()
    r = randn(3, 4, 4, 4, seed=1).detach().contiguous(memory_format=fmt).requires_grad_()
    results = []
    for pool in (lambda t: max_pool2d(t, 2), lambda t: F.max_pool2d(t, 2, 2)):
        gx, = torch.autograd.grad((pool(x) ** 2 * r).sum(), [x], create_graph=True)
        second = (gx * randn(3, 4, 8, 8, seed=2)).sum()
        results.append(torch.autograd.grad(second, [x, r]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    gx, = torch.autograd.grad((max_pool2d(x, 2) * r).sum(), [x], create_graph=True)
    gr, = torch.autograd.grad((gx * x.detach()).sum(), [r])
    assert gr.is_contiguous(memory_format=fmt)
    assert torch.autograd.gradgradcheck(lambda t: max_pool2d(t, 2), (x,))


@pytest.mark.skipif(not bf16_available(), reason="this CPU has no native bfloat16")
def test_the_public_learner_honours_bf16():
    from mamlpp.api import Learner
    from core_utils import episodes as random_episodes
    cfg = tiny_config(**{"train.dtype": "float32", "train.precision": "bf16"})
    learner = Learner(cfg, (1, 12, 12), 3)
    eps = {k: v.float() if v.is_floating_point() else v for k, v in random_episodes(tasks=2).items()}
    with ConvDtypes() as mode:
        loss, _, _ = learner.meta_loss(eps)
        logits = learner.predict(learner.adapt(eps["xs"], eps["ys"]), eps["xq"])
    assert mode.seen == {torch.bfloat16}
    assert loss.dtype == torch.float32 and logits.shape == (2, 6, 3)


@pytest.mark.skipif(not bf16_available(), reason="this CPU has no native bfloat16")
@pytest.mark.parametrize("method, extra", METHOD_CASES)
def test_every_method_trains_and_evaluates_in_bf16(method, extra):
    # autocast meets each method's own arithmetic (distances, LSTM cells, memories): no dtype clash,
    # finite numbers, float32 parameters and state.
    from mamlpp.bench import SyntheticTasks
    cfg = tiny_method_config(method, extra + ["train.precision=bf16"], dtype="float32")
    t = Trainer(cfg, SyntheticTasks(cfg, torch.device("cpu"), torch.float32), torch.device("cpu"))
    metrics = t.meta_step(t.tasks.train_batch(0, 2), 0)
    assert torch.isfinite(metrics["meta_loss"])
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in flatten(t.params).values())
    assert all(v.dtype in (torch.float32, torch.int64) for v in t.state.values())
    result = t.evaluate("val", num_tasks=3)
    assert 0.0 <= result["accuracy"] <= 1.0
