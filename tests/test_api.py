"""The public Python API and your own backbone: preset/train/evaluate/load, the Learner, ModuleBackbone."""
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

import mamlpp
from core_utils import F64, cat, episodes, learner, meta_grad, tiny_config
from mamlpp.config import ConfigError
from mamlpp.network import update_running_stats
from mamlpp.objective import meta_loss

REPO = Path(__file__).resolve().parents[1]


def conv4_module(cfg, ways=3, in_channels=1, size=12) -> nn.Module:
    """The built-in Conv4 written as a plain nn.Module whose parameter names match the tree's."""
    layers, c = OrderedDict(), in_channels
    for i in range(cfg.model.stages):
        layers[f"conv{i}"] = nn.Conv2d(c, cfg.model.filters, 3, padding=1)
        layers[f"bn{i}"] = nn.BatchNorm2d(cfg.model.filters)
        layers[f"act{i}"] = nn.LeakyReLU(0.01)
        layers[f"pool{i}"] = nn.MaxPool2d(2)
        c, size = cfg.model.filters, size // 2
    layers["flatten"] = nn.Flatten()
    layers["linear"] = nn.Linear(c * size * size, ways)
    return nn.Sequential(layers)


def bound(cfg, module, **kw):
    return mamlpp.ModuleBackbone(module, **kw)(cfg.model, (1, 12, 12), 3, cfg.inner.steps)


def same_values(tree, reference):
    """A copy of `tree` holding reference's values (the same keys: names match by construction)."""
    return {g: {k: reference[g][k].detach().clone().requires_grad_(True) for k in tree[g]} for g in tree}


@pytest.mark.parametrize("second_order", [True, False])
def test_a_user_module_reproduces_conv4s_meta_gradient(second_order):
    """MAML++ (BNWB, BNRS, LSLR, MSL) through functional_call equals the task-folded Conv4, float64."""
    cfg = tiny_config("omniglot-5w1s-mamlpp", **{"inner.second_order": second_order})
    model, params, state = learner(cfg)  # Conv4 with perturbed BN weights, rates and running statistics
    mine = bound(cfg, conv4_module(cfg).double())
    assert mine.batching == "loop"  # batch norm: one task after another (vmap's second order is not exact)
    p2, s2 = mine.init(torch.Generator(), F64)
    assert {g: set(t) for g, t in p2.items()} == {g: set(t) for g, t in params.items() if g != "lr"}
    p2 = same_values({**p2, "lr": params["lr"]}, params)
    s2 = {k: state[k].clone() for k in s2}
    eps = episodes(tasks=3)
    loss_a, grads_a, state_a = meta_grad(meta_loss, model, params, state, eps, cfg)
    loss_b, grads_b, state_b = meta_grad(meta_loss, mine, p2, s2, eps, cfg)
    assert torch.allclose(loss_a, loss_b, rtol=1e-12)
    a, b = cat(grads_a), cat({k: grads_b[k] for k in grads_a})
    assert (a - b).norm() / a.norm() < 1e-9
    for k in state_a:
        assert torch.allclose(state_a[k], state_b[k], rtol=1e-12, atol=1e-14), k


def test_vmap_without_batch_norm_equals_the_task_loop():
    cfg = tiny_config("omniglot-5w1s-maml", **{"model.bnwb": False, "model.bnrs": False})
    net = nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 4, 3, padding=1), act=nn.Tanh(), pool=nn.AvgPool2d(4),
                                    flatten=nn.Flatten(), head=nn.Linear(36, 3))).double()
    fast, slow = bound(cfg, net), bound(cfg, net, batching="loop")
    assert fast.batching == "vmap" and slow.batching == "loop"
    params, state = fast.init(torch.Generator(), F64)
    params = same_values({**params, "lr": {}}, {**params, "lr": {}})
    eps = episodes(tasks=3)
    _, ga, _ = meta_grad(meta_loss, fast, params, state, eps, cfg)
    _, gb, _ = meta_grad(meta_loss, slow, same_values(params, params), state, eps, cfg)
    assert (cat(ga) - cat(gb)).norm() / cat(ga).norm() < 1e-12
    with pytest.raises(ConfigError, match="batch norm, whose second-order gradients under vmap"):
        bound(cfg, conv4_module(cfg), batching="vmap")


def test_anil_adapts_only_the_head_and_the_body_still_learns():
    cfg = tiny_config("omniglot-5w1s-maml", **{"model.bnwb": False, "model.bnrs": False, "train.dtype": "float64"})
    backbone = mamlpp.ModuleBackbone(conv4_module(cfg).double(), adapt=lambda name: name.startswith("linear"))
    learner_ = mamlpp.Learner(cfg, (1, 12, 12), 3, backbone=backbone)
    assert set(learner_.params["net"]) == {"linear.weight", "linear.bias"}
    assert learner_.cfg.model.arch == "module"
    eps = episodes(tasks=2)
    loss, metrics, _ = learner_.meta_loss(eps)
    loss.backward()
    assert learner_.params["bn"]["conv0.weight"].grad.abs().sum() > 0  # meta-learned through the head's steps
    fast = learner_.adapt(eps["xs"], eps["ys"])
    assert set(fast) == {"linear.weight", "linear.bias"} and fast["linear.weight"].shape[0] == 2
    assert not torch.equal(fast["linear.weight"][0], learner_.params["net"]["linear.weight"])


@pytest.mark.parametrize("preset", ["omniglot-5w1s-mamlpp", "omniglot-5w1s-protonet"])
def test_learner_adapt_and_predict_equal_the_methods_evaluation(preset):
    cfg = tiny_config(preset, **{"train.dtype": "float64"})
    cfg.data.shots = 2  # core_utils.episodes: 2 shots
    one = mamlpp.Learner(cfg, (1, 12, 12), 3, seed=3)
    eps = episodes(tasks=2)
    logits = one.predict(one.adapt(eps["xs"], eps["ys"]), eps["xq"])
    assert torch.allclose(logits, one.method.predict(one.params, one.state, eps)["output"], rtol=1e-12, atol=1e-12)
    optimiser = torch.optim.Adam(one.parameters(), lr=1e-3)  # one's own loop
    loss, metrics, state = one.meta_loss(eps)
    loss.backward()
    optimiser.step()
    assert set(metrics) >= {"loss", "accuracy"} and one.state is state


def test_preset_train_evaluate_load_round_trip(tmp_path):
    cfg = mamlpp.preset("sinusoid-maml", **{"train.epochs": 2, "train.iters_per_epoch": 5, "train.eval_tasks": 10,
                                            "model.hidden": (8, 8), "train.tensorboard": "false"})
    assert cfg.model.hidden == (8, 8) and cfg.train.tensorboard is False
    with pytest.raises(ConfigError, match="unknown config key"):
        mamlpp.preset("sinusoid-maml", **{"inner.stepz": 3})
    summary = mamlpp.train(cfg, tmp_path / "r", progress=False)
    result = mamlpp.evaluate(tmp_path / "r")
    assert isinstance(result, mamlpp.TestResult) and result.to_dict() == summary["final"]
    loaded = mamlpp.load(tmp_path / "r")
    tasks = mamlpp.task_source(loaded.cfg)
    eps = tasks.eval_batch("test", 0, 10)
    predictions = loaded.predict(loaded.adapt(eps["xs"], eps["ys"]), eps["xq"])
    mse = (predictions - eps["yq"]).pow(2).flatten(1).mean(1).mean().item()
    assert mse == pytest.approx(result.single_model, rel=1e-5)  # the best checkpoint is what load returns


def test_the_example_trains_a_user_module_on_omniglot(tmp_path, shared_data_root, data_cache_dir, omniglot_set):
    env = dict(os.environ, MAMLPP_DATA=str(shared_data_root), MAMLPP_CACHE=str(data_cache_dir))
    done = subprocess.run([sys.executable, str(REPO / "examples" / "own_backbone.py"), "--out", str(tmp_path / "r"),
                           "--iters", "3"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test accuracy over 100 tasks" in done.stdout and "adapted by hand on 8 test tasks" in done.stdout
    assert mamlpp.TestResult.from_dict(__import__("json").loads((tmp_path / "r" / "test.json").read_text())).num_tasks == 100


def test_public_names_have_docstrings():
    for name in mamlpp.__all__:
        obj = getattr(mamlpp, name)
        if callable(obj) and name != "__version__":
            assert obj.__doc__ and obj.__doc__.strip(), name


def test_running_stats_fold_of_a_user_module_is_the_sequential_one():
    """BNRS through a ModuleBackbone: the batch statistics it reports fold exactly like Conv4's."""
    cfg = tiny_config("omniglot-5w1s-mamlpp")
    mine = bound(cfg, conv4_module(cfg).double())
    params, state = mine.init(torch.Generator(), F64)
    x = episodes(tasks=2)["xs"]
    net = {k: v.expand(2, *v.shape) for k, v in params["net"].items()}
    _, stats = mine.forward(net, params["bn"], state, x, 1, False, True)
    assert set(stats) == {f"bn{i}" for i in range(cfg.model.stages)} and stats["bn0"][0].shape == (2, 4)
    new = update_running_stats(state, [(1, stats)], 0.1)
    assert torch.equal(new["bn0.mean"][0], state["bn0.mean"][0]) and not torch.equal(new["bn0.mean"][1],
                                                                                    state["bn0.mean"][1])


@pytest.mark.parametrize("method", ["siamese", "memory", "metanet", "statistician", "metalstm"])
def test_every_method_adapts_and_predicts_as_it_evaluates(method):
    """Methods without fast weights of their own keep the support set: adapt + predict is predict."""
    cfg = tiny_config(f"omniglot-5w1s-{method}" if method != "metanet" else "omniglot-5w1s-metanet",
                      **{"train.dtype": "float64"})
    cfg.data.shots, cfg.model.stages = 2, 2
    one = mamlpp.Learner(cfg, (1, 12, 12), 3, seed=1)
    eps = episodes(tasks=2)
    torch.manual_seed(0)
    expected = one.method.predict(one.params, one.state, eps)["output"]
    torch.manual_seed(0)
    logits = one.predict(one.adapt(eps["xs"], eps["ys"]), eps["xq"])
    assert logits.shape == expected.shape and torch.allclose(logits, expected, rtol=1e-10, atol=1e-12)
