"""The task-parallel path (grouped-conv fold) against the plain per-task loop, in float64."""
import pytest
import torch

from core_utils import cat, episodes, learner, meta_grad, tiny_config
from mamlpp.loop import evaluate_loop, meta_loss_loop
from mamlpp.objective import evaluate, meta_loss

VARIANTS = {
    "maml": dict(),
    "mamlpp-all-fixes": dict(),  # MSL, LSLR, BNWB, BNRS, CA (DA checked separately below)
    "mamlpp-first-order": {"inner.second_order": False},
    "mamlpp-msl-off-phase": {},  # epoch past msl_epochs: final-step loss only
    "metasgd": dict(),
    "strided-relu-sum": {"model.pooling": "stride", "model.activation": "relu", "outer.task_reduction": "sum"},
    "mamlpp-running-bn": {"model.bn_eval": "running"},  # evaluation normalises with the BNRS statistics
}


def make(variant):
    preset = {"maml": "omniglot-5w1s-maml", "metasgd": "omniglot-5w1s-maml"}.get(variant, "omniglot-5w1s-mamlpp")
    cfg = tiny_config(preset, **VARIANTS[variant])
    if variant == "metasgd":
        cfg.inner.lr_mode = "metasgd"
    cfg.inner.eval_steps = 5  # evaluation takes more steps than training (3)
    epoch = cfg.outer.msl_epochs + 1 if variant == "mamlpp-msl-off-phase" else 2
    return cfg, epoch


@pytest.mark.parametrize("tasks", [1, 3])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_meta_gradient_matches_loop(variant, tasks):
    cfg, epoch = make(variant)
    model, params, state = learner(cfg)
    eps = episodes(tasks=tasks)
    loss_p, grad_p, state_p = meta_grad(meta_loss, model, params, state, eps, cfg, epoch)
    loss_l, grad_l, state_l = meta_grad(meta_loss_loop, model, params, state, eps, cfg, epoch)
    assert torch.allclose(loss_p, loss_l, rtol=1e-12, atol=0)
    rel = (cat(grad_p) - cat(grad_l)).norm() / cat(grad_l).norm()
    assert rel < 1e-9, f"{variant} B={tasks}: relative error {rel:.2e}"
    assert cat(grad_l).norm() > 0
    assert state_p.keys() == state_l.keys()
    for k in state_l:  # BNRS running statistics: closed-form fold vs in-place sequential updates
        assert torch.allclose(state_p[k], state_l[k], rtol=1e-12, atol=1e-14), k
    if cfg.model.bnrs:
        assert any(not torch.equal(state_p[k], state[k]) for k in state)


@pytest.mark.parametrize("eval_steps", [1, 2, 5])
@pytest.mark.parametrize("variant", ["maml", "mamlpp-all-fixes", "metasgd", "mamlpp-running-bn"])
def test_evaluation_matches_loop_with_other_step_counts(variant, eval_steps):
    cfg, _ = make(variant)
    cfg.inner.eval_steps = eval_steps  # training uses 3 steps and 3 BN/LSLR slots
    model, params, state = learner(cfg)
    eps = episodes(tasks=4)
    par = evaluate(model, params, state, eps, cfg, "classification")
    ref = evaluate_loop(model, params, state, eps, cfg, "classification")
    assert torch.allclose(par["output"], ref["output"], rtol=1e-10, atol=1e-12)
    assert torch.allclose(par["loss"], ref["loss"], rtol=1e-10)
    assert torch.equal(par["accuracy"], ref["accuracy"])


def test_more_eval_steps_than_training_keeps_adapting():
    """Steps past the trained count reuse the last slot; the support loss keeps falling."""
    cfg, _ = make("mamlpp-all-fixes")
    model, params, state = learner(cfg)
    eps = episodes(tasks=2)
    eps_support = dict(eps, xq=eps["xs"], yq=eps["ys"])  # score on the support set itself
    losses = [evaluate(model, params, state, eps_support, cfg, "classification", steps=s)["loss"].mean()
              for s in (0, 3, 8)]
    assert losses[0] > losses[1] > losses[2]


@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_meta_batch_gives_the_same_update(chunk, reduction):
    """train.chunk trades memory for speed: gradients, metrics and BNRS state are unchanged."""
    from mamlpp.methods import flatten
    from mamlpp.trainer import Trainer

    class Fixed:  # a task source serving one fixed batch of 5 tasks
        kind, input_shape, num_outputs = "classification", (1, 12, 12), 3
        batch = episodes(tasks=5)

    results = []
    for c in (5, chunk):  # 5 = the whole meta-batch in one pass
        cfg = tiny_config(**{"train.chunk": c, "train.dtype": "float64", "outer.task_reduction": reduction,
                             "outer.meta_batch": 5})
        trainer = Trainer(cfg, Fixed(), torch.device("cpu"))
        metrics = trainer.meta_step(Fixed.batch, epoch=1)
        grads = torch.cat([p.grad.flatten() for p in flatten(trainer.params).values() if p.grad is not None])
        results.append((grads, metrics, trainer.state))
    (g0, m0, s0), (g1, m1, s1) = results
    assert (g0 - g1).norm() / g0.norm() < 1e-12
    for k in m0:
        assert torch.allclose(m0[k], m1[k], rtol=1e-12), k
    for k in s0:
        assert torch.allclose(s0[k], s1[k], rtol=1e-12, atol=1e-15), k
