"""ResNet-12 (resnet.py) on the task-parallel path: the real configuration's shapes and parameter
count, the per-task loop oracle in float64, finite differences on the smooth variant, DropBlock and
the config errors. Small widths (4, 6, 8, 8) and 16x16 images keep it fast."""
import pytest
import torch
import torch.nn.functional as F

from core_utils import F64, cat, episodes, learner, meta_grad, smooth, tiny_config
from mamlpp.config import BACKBONES, ConfigError, ModelConfig, apply_overrides
from mamlpp.loop import evaluate_loop, meta_loss_loop
from mamlpp.methods import build_method, flatten
from mamlpp.objective import evaluate, meta_loss
from mamlpp.presets import PRESETS, get_preset
from mamlpp.resnet import ResNet12, drop_block

SHAPE = (3, 16, 16)
WIDTHS = (4, 6, 8, 8)


def resnet_config(preset="omniglot-5w1s-mamlpp", **changes):
    """MAML++ (MSL, LSLR, BNWB, BNRS, CA) on a tiny ResNet-12, 2 inner steps."""
    cfg = tiny_config(preset, **{"model.arch": "resnet12", "model.widths": WIDTHS, "inner.steps": 2, **changes})
    return cfg


def test_real_configuration_shapes_and_parameter_count():
    """ResNet-12 of MetaOptNet on Mini-ImageNet (3x84x84, widths 64-160-320-640), a 5-way head.

    Convolutions (no biases), per block with c input and o output channels: 9oc + 9oo + 9oo + oc
      block 0 (3 -> 64):     1,728 +    36,864 +    36,864 +    192 =    75,648
      block 1 (64 -> 160):  92,160 +   230,400 +   230,400 + 10,240 =   563,200
      block 2 (160 -> 320): 460,800 +  921,600 +   921,600 + 51,200 = 2,355,200
      block 3 (320 -> 640): 1,843,200 + 3,686,400 + 3,686,400 + 204,800 = 9,420,800
      total 12,414,848; head 640 * 5 + 5 = 3,205; params["net"] = 12,418,053.
    Batch norm: four per block (three convolutions and the shortcut), gamma and beta each:
      2 * 4 * (64 + 160 + 320 + 640) = 9,472 per BNWB slot, so (S=5) 47,360 with model.bnwb.
    The shapes run on torch's meta device: no arithmetic.
    """
    cfg = ModelConfig(arch="resnet12", bnwb=True, bnrs=True)
    model = ResNet12(cfg, (3, 84, 84), 5, bn_slots=5)
    params, state = model.init(torch.Generator().manual_seed(0), torch.float32, "meta")
    net, bn = params["net"], params["bn"]
    assert sum(t.numel() for t in net.values()) == 12_418_053
    assert sum(t.numel() for t in bn.values()) == 47_360 and all(t.shape[0] == 5 for t in bn.values())
    assert len(net) == 4 * 4 + 2 and len(bn) == 2 * 16 and len(state) == 2 * 16
    assert net["block0.conv0.weight"].shape == (64, 3, 3, 3) and net["block3.shortcut.weight"].shape == (640, 320, 1, 1)
    assert net["linear.weight"].shape == (5, 640) and model.features == 640
    assert model.activation_elements == 64 * 84 * 84  # block 0 before its pool, one image
    tasks, n = 2, 80  # 5-way 1-shot with 15 queries: 5 + 75 images
    x = torch.empty(tasks, n, 3, 84, 84, device="meta")
    batched = {k: v.expand(tasks, *v.shape) for k, v in net.items()}
    out, stats = model.forward(batched, bn, state, x, slot=4, want_stats=True, training=True)
    assert out.shape == (tasks, n, 5)
    assert set(stats) == {k.rsplit(".", 1)[0] for k in state} and stats["block3.bn2"][0].shape == (tasks, 640)
    feats, _ = ResNet12(cfg, (3, 84, 84), 0, bn_slots=5).forward(
        {k: v for k, v in batched.items() if not k.startswith("linear")}, bn, state, x, slot=0)
    assert feats.shape == (tasks, n, 640)  # no head: global-average-pooled embeddings for metric methods


def test_initialisation_is_metaoptnets_kaiming_normal():
    model = ResNet12(ModelConfig(arch="resnet12", widths=(32, 48)), (3, 16, 16), 5, bn_slots=1)
    params, _ = model.init(torch.Generator().manual_seed(0), F64)
    w = params["net"]["block1.conv1.weight"]  # fan_out = 48 * 3 * 3
    assert abs(w.std().item() / (2 / (48 * 9)) ** 0.5 - 1) < 0.02 and abs(w.mean().item()) < 0.003
    again, _ = model.init(torch.Generator().manual_seed(0), F64)
    assert all(torch.equal(params["net"][k], again["net"][k]) for k in params["net"])


VARIANTS = {
    "mamlpp": {},  # MSL, LSLR, BNWB, BNRS
    "mamlpp-first-order": {"inner.second_order": False},
    "maml-sum": {"outer.task_reduction": "sum"},
    "mamlpp-avg-pool-relu": {"model.pooling": "avg", "model.activation": "relu"},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_meta_gradient_matches_the_per_task_loop(variant):
    preset = "omniglot-5w1s-maml" if variant.startswith("maml-") else "omniglot-5w1s-mamlpp"
    cfg = resnet_config(preset, **VARIANTS[variant])
    model, params, state = learner(cfg, shape=SHAPE)
    eps = episodes(tasks=2, shape=SHAPE)
    loss_p, grad_p, state_p = meta_grad(meta_loss, model, params, state, eps, cfg, epoch=1)
    loss_l, grad_l, state_l = meta_grad(meta_loss_loop, model, params, state, eps, cfg, epoch=1)
    assert torch.allclose(loss_p, loss_l, rtol=1e-12, atol=0)
    rel = (cat(grad_p) - cat(grad_l)).norm() / cat(grad_l).norm()
    assert rel < 1e-9, f"{variant}: relative error {rel:.2e}"
    assert all(g.norm() > 0 for k, g in grad_l.items() if k.startswith("net.")), "every tensor is trained"
    assert state_p.keys() == state_l.keys() and (len(state_l) == 32) == cfg.model.bnrs
    for k in state_l:  # BNRS: closed-form fold vs the loop's in-place sequential updates
        assert torch.allclose(state_p[k], state_l[k], rtol=1e-12, atol=1e-14), k


@pytest.mark.parametrize("bn_eval", ["batch", "running"])
def test_evaluation_matches_the_per_task_loop(bn_eval):
    cfg = resnet_config(**{"model.bn_eval": bn_eval, "inner.eval_steps": 3})  # one step past training's 2
    model, params, state = learner(cfg, shape=SHAPE)
    eps = episodes(tasks=3, shape=SHAPE)
    par = evaluate(model, params, state, eps, cfg, "classification")
    ref = evaluate_loop(model, params, state, eps, cfg, "classification")
    assert torch.allclose(par["output"], ref["output"], rtol=1e-10, atol=1e-12)
    assert torch.allclose(par["loss"], ref["loss"], rtol=1e-10)


def test_second_order_meta_gradient_matches_finite_differences():
    """The smooth variant (tanh, average pooling) of core_utils.smooth, along random directions."""
    cfg = smooth(resnet_config())
    model, params, state = learner(cfg, shape=SHAPE)
    eps = episodes(tasks=2, shape=SHAPE)
    _, grad, _ = meta_grad(meta_loss, model, params, state, eps, cfg, epoch=1)
    flat = flatten(params)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        d = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in flat.items()}

        def loss_at(h):
            moved = {grp: {k: (v.detach() + h * d[f"{grp}.{k}"]).requires_grad_(True) for k, v in tree.items()}
                     for grp, tree in params.items()}
            return meta_loss(model, moved, state, eps, cfg, 1, "classification")[0].item()

        # Five-point stencil: along these directions the three-point quotient's h^2 error is up to
        # 3e-5 at h=1e-5 (it falls as h^2: truncation, not a wrong gradient); this one's is 2e-10 here.
        h = 3e-6
        fd = (8 * (loss_at(h) - loss_at(-h)) - (loss_at(2 * h) - loss_at(-2 * h))) / (12 * h)
        analytic = sum((grad[k] * d[k]).sum() for k in grad).item()
        assert abs(analytic - fd) / abs(fd) < 1e-8
        assert abs(1.001 * analytic - fd) / abs(fd) > 1e-8  # the tolerance separates a 0.1% error


def test_dropblock_is_off_by_default_and_acts_only_in_training():
    assert ModelConfig().dropblock == 0.0
    cfg = resnet_config()
    model, params, state = learner(cfg, shape=(3, 32, 32))  # 32 pixels: blocks 2 and 3 see 4x4 and 2x2 maps
    eps = episodes(tasks=2, shape=(3, 32, 32))
    fast = {k: v.expand(2, *v.shape) for k, v in params["net"].items()}
    off_eval = model.forward(fast, params["bn"], state, eps["xq"], 0)[0]
    assert torch.equal(off_eval, model.forward(fast, params["bn"], state, eps["xq"], 0, training=True)[0])

    cfg.model.dropblock = 0.3
    torch.manual_seed(0)
    on = [model.forward(fast, params["bn"], state, eps["xq"], 0, training=True)[0] for _ in range(2)]
    assert not torch.allclose(on[0], off_eval) and not torch.allclose(on[0], on[1])  # a new mask per pass
    assert torch.equal(model.forward(fast, params["bn"], state, eps["xq"], 0)[0], off_eval)  # evaluation: off
    ev_on = evaluate(model, params, state, eps, cfg, "classification")["output"]
    cfg.model.dropblock = 0.0
    assert torch.equal(ev_on, evaluate(model, params, state, eps, cfg, "classification")["output"])
    # Meta-training passes drop; the draws come from torch's global generator, so a seed repeats them.
    cfg.model.dropblock = 0.3
    losses = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        losses.append(meta_loss(model, params, state, eps, cfg, 1, "classification")[0])
    assert losses[0] == losses[1] != losses[2]
    cfg.model.dropblock = 0.0
    assert meta_loss(model, params, state, eps, cfg, 1, "classification")[0] not in losses


def test_dropblock_drops_whole_blocks_and_keeps_each_tasks_scale():
    torch.manual_seed(0)
    h = torch.ones(10, 2 * 16, 9, 9, dtype=F64)  # 2 tasks x 16 channels, 9x9 maps: 5x5 blocks
    out = drop_block(h, 0.2, tasks=2)
    dropped = (out == 0).view(10, 2, 16, 9, 9)
    assert 0.1 < dropped.double().mean() < 0.3
    for t in range(2):  # each task's activations keep their mean: the scale is per task
        assert torch.allclose(out.view(10, 2, -1)[:, t].mean(), torch.tensor(1.0, dtype=F64))
    # Every dropped pixel lies in a 5x5 square of dropped pixels (a block), all of it inside the map.
    # (A morphological opening: the 5x5 squares inside the map that are all dropped, dilated back.)
    d = dropped.reshape(-1, 1, 9, 9).double()
    full = -F.max_pool2d(-d, 5, stride=1)  # [.., 5, 5]: 1 where a whole block below-right is dropped
    covered = F.max_pool2d(F.pad(full, [4] * 4), 5, stride=1)  # back to 9x9: pixels inside such a block
    assert d.sum() > 0 and torch.equal(covered[d.bool()], torch.ones(int(d.sum()), dtype=F64))
    # Maps smaller than the block drop smaller blocks (here 1x1 maps: whole channels).
    small = drop_block(torch.ones(50, 8, 1, 1, dtype=F64), 0.3, tasks=1)
    assert 0.1 < (small == 0).double().mean() < 0.5


def test_metric_methods_embed_with_resnet12():
    cfg = apply_overrides(get_preset("mini-5w1s-protonet"), ["model.arch=resnet12", "model.widths=4,6,8,8",
                                                             "model.dropblock=0.1", "data.train_ways=5"])
    method = build_method(cfg, "classification", SHAPE, 5)
    params, state = method.init(torch.Generator().manual_seed(0), F64, "cpu")
    assert method.backbone.features == 8 and "linear.weight" not in params["net"]
    eps = episodes(tasks=2, ways=5, shots=1, queries=2, shape=SHAPE)
    loss, _, new_state = method.meta_loss(params, state, eps, epoch=0)
    loss.backward()
    assert all(t.grad is not None for t in params["net"].values())
    assert any(not torch.equal(new_state[k], state[k]) for k in state)  # BNRS, one slot
    assert method.predict(params, new_state, eps)["output"].shape == (2, 10, 5)


@pytest.mark.parametrize("overrides, message", [
    (["model.dropblock=0.1"], "model.dropblock=0.1: DropBlock is part of model.arch=resnet12, not model.arch=conv4"),
    (["model.arch=resnet12", "model.dropblock=1"], "model.dropblock=1.0: must be in"),
    (["model.arch=resnet12", "model.pooling=stride"], "model.pooling=stride is Conv4's strided network"),
    (["model.arch=resnet12", "model.widths=64,0"], "model.widths=.64, 0.: expected one positive channel count"),
    (["model.arch=resnet12", "data.image_size=8"], "the 4 pooling stages of model.arch=resnet12 need images of at least 16"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(get_preset("mini-5w1s-mamlpp"), overrides)


def test_presets_and_registration():
    assert "resnet12" in BACKBONES
    for shots in (1, 5):
        pp = get_preset(f"mini-5w{shots}s-mamlpp-resnet12")
        base = get_preset(f"mini-5w{shots}s-mamlpp")
        assert pp.model.arch == "resnet12" and pp.model.widths == (64, 160, 320, 640) and pp.train.checkpoint_inner
        assert (pp.inner, pp.outer, pp.data) == (base.inner, base.outer, base.data)  # the paper-era MAML++ half
        proto = get_preset(f"mini-5w{shots}s-protonet-resnet12")
        assert proto.method.name == "protonet" and proto.model.arch == "resnet12" and proto.model.dropblock == 0.1
        assert pp.model.dropblock == 0.0 and not proto.train.checkpoint_inner
        for name in (f"mini-5w{shots}s-mamlpp-resnet12", f"mini-5w{shots}s-protonet-resnet12"):
            preset = PRESETS[name]  # outside the paper's Conv4 tables, and no published Conv4 number beside it
            assert preset.flavour == "resnet12" and preset.paper is None and preset.replication is None
    assert PRESETS["mini-5w1s-mamlpp-resnet12"].approach == "MAML++"
    from mamlpp.report import _table_presets

    assert not any(name.endswith("-resnet12") for name in _table_presets("mini_imagenet"))
    assert PRESETS["mini-5w1s-mamlpp"].paper.mean == 52.15
