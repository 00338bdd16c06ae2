"""MSL, DA and CA against the spec's tables and closed forms."""
import math

import pytest
import torch

from core_utils import cat, episodes, learner, meta_grad, tiny_config
from mamlpp.config import Config
from mamlpp.objective import meta_loss
from mamlpp.presets import get_preset
from mamlpp.schedules import cosine_lr, msl_weights, second_order_at, step_weights
from mamlpp.sinusoid import SinusoidTasks
from mamlpp.trainer import Trainer

# spec 3.2: (epoch, non-final, final) for S=5
MSL_TABLE = {
    10: [(0, 0.2, 0.2), (1, 0.18, 0.28), (5, 0.10, 0.60), (9, 0.02, 0.92)],
    15: [(0, 0.2, 0.2), (1, 0.1867, 0.2533), (5, 0.1333, 0.4667), (9, 0.08, 0.68), (14, 0.0133, 0.9467)],
}


@pytest.mark.parametrize("epochs", [10, 15])
def test_msl_weights_match_spec_table(epochs):
    for epoch, non_final, final in MSL_TABLE[epochs]:
        w = msl_weights(epoch, 5, epochs)
        assert w[:4] == pytest.approx([non_final] * 4, abs=5e-5)
        assert w[4] == pytest.approx(final, abs=5e-5)
        assert sum(w) == pytest.approx(1.0)


def test_msl_floor_and_switch_off():
    w = msl_weights(100, 5, 10, floor=0.03)
    assert w[:4] == pytest.approx([0.006] * 4) and w[4] == pytest.approx(1 - 4 * 0.006)
    cfg = get_preset("omniglot-20w1s-mamlpp")
    assert step_weights(cfg, 9, 5, training=True)[0] == pytest.approx(0.02)
    assert step_weights(cfg, 10, 5, training=True) == [0, 0, 0, 0, 1.0]  # E=10: off from epoch 10
    assert step_weights(cfg, 0, 5, training=False) == [0, 0, 0, 0, 1.0]  # never at evaluation
    assert step_weights(get_preset("omniglot-20w1s-maml"), 0, 5, training=True) == [0, 0, 0, 0, 1.0]


def test_da_switches_order_after_the_right_epoch():
    cfg = Config()
    cfg.inner.second_order, cfg.inner.da_epochs = True, 3
    assert [second_order_at(cfg, e) for e in range(6)] == [False] * 4 + [True] * 2
    cfg.inner.da_epochs = -1
    assert second_order_at(cfg, 0)
    cfg.inner.second_order = False
    assert not second_order_at(cfg, 50)


def test_da_drives_the_meta_gradient():
    """Up to epoch E_DA the meta-gradient is the first-order one, after it the second-order one."""
    base = tiny_config("omniglot-5w1s-mamlpp", **{"outer.msl": False})
    model, params, state = learner(base)
    eps = episodes()
    fo = tiny_config("omniglot-5w1s-mamlpp", **{"outer.msl": False, "inner.second_order": False})
    so = tiny_config("omniglot-5w1s-mamlpp", **{"outer.msl": False})
    da = tiny_config("omniglot-5w1s-mamlpp", **{"outer.msl": False, "inner.da_epochs": 2})
    for epoch, reference in ((2, fo), (3, so)):
        got = cat(meta_grad(meta_loss, model, params, state, eps, da, epoch)[1])
        want = cat(meta_grad(meta_loss, model, params, state, eps, reference, epoch)[1])
        assert torch.allclose(got, want, rtol=0, atol=1e-13)
    assert not torch.allclose(cat(meta_grad(meta_loss, model, params, state, eps, fo, 3)[1]),
                              cat(meta_grad(meta_loss, model, params, state, eps, so, 3)[1]), atol=1e-6)


def test_cosine_annealing_closed_form():
    cfg = get_preset("omniglot-20w1s-mamlpp")  # eta0 1e-3, eta_min 1e-5, 100 epochs
    expected = {0: 1e-3, 25: 8.55e-4, 50: 5.05e-4, 75: 1.55e-4, 99: 1.02e-5}
    for epoch, lr in expected.items():
        assert cosine_lr(cfg, epoch) == pytest.approx(lr, rel=5e-3)  # spec rounds to 3 digits
        closed = 1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * epoch / 100)) / 2
        assert cosine_lr(cfg, epoch) == pytest.approx(closed, rel=1e-12)
    assert cosine_lr(get_preset("omniglot-20w1s-maml"), 60) == 1e-3  # CA off
    assert cosine_lr(get_preset("mini-5w1s-mamlpp"), 60) == pytest.approx(1e-3)  # eta_min = eta0


def small_sinusoid(**outer):
    cfg = get_preset("sinusoid-maml")
    cfg.outer.meta_batch, cfg.model.hidden = 4, (8,)
    for k, v in outer.items():
        setattr(cfg.outer, k, v)
    return cfg, SinusoidTasks(cfg.data, 0, torch.device("cpu"), torch.float32)


def test_trainer_applies_ca_per_epoch():
    cfg, tasks = small_sinusoid(ca=True, eta_min=1e-5)
    trainer = Trainer(cfg, tasks, torch.device("cpu"))
    for epoch in (0, 7, 35, 69):
        trainer.meta_step(tasks.train_batch(epoch, 4), epoch)
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(cosine_lr(cfg, epoch))
    assert cosine_lr(cfg, 69) < cosine_lr(cfg, 0)


def test_gradient_clamp_touches_network_not_rates():
    cfg, tasks = small_sinusoid(grad_clamp=1e-4)
    cfg.inner.lr_mode = "lslr"
    trainer = Trainer(cfg, tasks, torch.device("cpu"))
    trainer.meta_step(tasks.train_batch(0, 4), 0)
    assert max(p.grad.abs().max().item() for p in trainer.params["net"].values()) <= 1e-4
    assert max(p.grad.abs().max().item() for p in trainer.params["lr"].values()) > 1e-4
