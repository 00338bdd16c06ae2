"""Parameter counts (spec 1.3) and the learned inner rates (LSLR, Meta-SGD)."""
import pytest
import torch

from core_utils import F64, episodes, learner, meta_grad, tiny_config
from mamlpp.objective import evaluate, meta_loss
from mamlpp.presets import get_preset
from core_utils import init_learner


def counts(preset, shape, ways):
    cfg = get_preset(preset)
    _, params, state = init_learner(cfg, shape, ways, "cpu", torch.float32, 0)
    n = lambda tree, prefix: sum(v.numel() for k, v in tree.items() if k.startswith(prefix))
    return {"conv": n(params["net"], "conv"), "linear": n(params["net"], "linear"), "bn": n(params["bn"], "bn"),
            "lr": n(params["lr"], ""), "state": n(state, "bn")}


def test_parameter_counts_omniglot_20_way():
    c = counts("omniglot-20w1s-mamlpp", (1, 28, 28), 20)
    # LSLR: 10 tensors x S=5 steps; the reference allocates a dead 6th entry (60), we do not.
    assert c == {"conv": 111_424, "linear": 1_300, "bn": 2_560, "lr": 50, "state": 2_560}
    assert counts("omniglot-5w1s-mamlpp", (1, 28, 28), 5)["linear"] == 325


def test_parameter_counts_mini_imagenet_5_way():
    c = counts("mini-5w1s-mamlpp", (3, 84, 84), 5)
    assert c == {"conv": 63_696, "linear": 6_005, "bn": 1_920, "lr": 50, "state": 1_920}


def test_maml_baseline_has_no_learned_rates_or_running_stats():
    c = counts("omniglot-20w1s-maml", (1, 28, 28), 20)
    assert c["lr"] == 0 and c["state"] == 0 and c["bn"] == 4 * 2 * 64


@pytest.mark.parametrize("mode", ["lslr", "metasgd"])
@pytest.mark.parametrize("second_order", [True, False])
def test_learned_rates_receive_meta_gradient(mode, second_order):
    cfg = tiny_config(**{"inner.lr_mode": mode, "inner.second_order": second_order})
    model, params, state = learner(cfg)
    grads = meta_grad(meta_loss, model, params, state, episodes(), cfg, 0)[1]
    rate_grads = {k: g for k, g in grads.items() if k.startswith("lr.")}
    assert len(rate_grads) == 2 * cfg.model.stages + 2
    for name, g in rate_grads.items():
        if ".bias" in name and name.startswith("lr.conv"):
            continue  # conv biases before BN have zero true gradient, so their rates do too
        assert g.abs().sum() > 0, name
        if mode == "lslr":
            assert g.shape == (cfg.inner.steps,) and torch.all(g != 0), name


def test_negative_lslr_rates_step_as_computed_by_hand():
    """LSLR rates are unclamped: a negative rate steps up the support loss, theta - alpha * grad as it
    stands. The step is done by hand for a small MLP (a plain forward, autograd for the support
    gradient) and compared with the library's adapted predictions and training meta-loss."""
    cfg = get_preset("sinusoid-maml")
    cfg.inner.lr_mode, cfg.model.hidden = "lslr", (8, 8)
    model, params, state = init_learner(cfg, (1,), 1, "cpu", F64, seed=0)
    with torch.no_grad():  # a different negative rate per tensor
        for i, rate in enumerate(params["lr"].values()):
            rate.fill_(-0.02 * (i + 1))
    g = torch.Generator().manual_seed(0)
    eps = {k: torch.randn(3, 5, 1, generator=g, dtype=F64) for k in ("xs", "ys", "xq", "yq")}

    def mlp(w, x):
        for i in range(3):
            x = x @ w[f"fc{i}.weight"].T + w[f"fc{i}.bias"]
            x = x.relu() if i < 2 else x
        return x

    expected = []
    for b in range(3):
        w = {k: v.detach().clone().requires_grad_(True) for k, v in params["net"].items()}
        grads = torch.autograd.grad((mlp(w, eps["xs"][b]) - eps["ys"][b]).pow(2).mean(), list(w.values()))
        fast = {k: w[k] - params["lr"][k][0].item() * grad for k, grad in zip(w, grads)}
        expected.append(mlp(fast, eps["xq"][b]).detach())
    expected = torch.stack(expected)
    out = evaluate(model, params, state, eps, cfg, "regression", steps=1)["output"]
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-14)
    loss = meta_loss(model, params, state, eps, cfg, 0, "regression")[0]  # one step, mean over tasks
    assert loss.item() == pytest.approx((expected - eps["yq"]).pow(2).mean().item(), rel=1e-12)
    assert params["lr"]["fc0.weight"][0].item() == -0.02  # the rate itself is left as it is
