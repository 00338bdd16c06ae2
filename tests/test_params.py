"""Parameter counts (spec 1.3) and the learned inner rates (LSLR, Meta-SGD)."""
import pytest
import torch

from core_utils import episodes, learner, meta_grad, tiny_config
from mamlpp.objective import meta_loss
from mamlpp.presets import get_preset
from core_utils import init_learner


def counts(preset, shape, ways):
    cfg = get_preset(preset)
    _, params, state = init_learner(cfg, shape, ways, torch.float32, 0)
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


def test_lslr_rates_are_unclamped_and_may_go_negative():
    cfg = tiny_config(**{"inner.lr_mode": "lslr"})
    model, params, state = learner(cfg)
    with torch.no_grad():
        params["lr"]["linear.weight"].fill_(-0.05)
    loss, _, _ = meta_loss(model, params, state, episodes(), cfg, 0, "classification")
    assert torch.isfinite(loss)
    assert params["lr"]["linear.weight"][0].item() == -0.05
