"""Batch norm: per-task statistics, BNWB slots, BNRS state and the running-statistics evaluation."""
import torch

from core_utils import F64, episodes, learner, meta_grad, tiny_config
from mamlpp.distributed import Shard
from mamlpp.inner import task_batched
from mamlpp.network import update_running_stats
from mamlpp.objective import evaluate, meta_loss


def randn(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_tasks_never_share_statistics():
    cfg = tiny_config()
    model, params, state = learner(cfg)
    eps = episodes(tasks=3)
    changed = {k: v.clone() for k, v in eps.items()}
    changed["xs"][1] = 5 * randn(changed["xs"][1].shape, seed=1)
    changed["xq"][1] = 5 * randn(changed["xq"][1].shape, seed=2)
    fast = task_batched(params["net"], 3)
    out_a, _ = model.forward(fast, params["bn"], state, eps["xq"], 0)
    out_b, _ = model.forward(fast, params["bn"], state, changed["xq"], 0)
    ev_a = evaluate(model, params, state, eps, cfg, "classification")["output"]
    ev_b = evaluate(model, params, state, changed, cfg, "classification")["output"]
    for a, b in ((out_a, out_b), (ev_a, ev_b)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
        assert not torch.allclose(a[1], b[1])


def bn_grad_slots(cfg, epoch=0):
    model, params, state = learner(cfg)
    grads = meta_grad(meta_loss, model, params, state, episodes(), cfg, epoch)[1]
    gamma = torch.stack([grads[f"bn.bn{i}.weight"] for i in range(cfg.model.stages)])  # [L, S, C]
    return gamma.abs().sum((0, 2))  # per slot


def test_per_step_bn_weights_get_gradient_only_where_used():
    # First order, no MSL: support passes feed only constant gradients, so only the slot of the
    # final query pass (S-1) is used by the meta-loss.
    fo = tiny_config(**{"inner.second_order": False, "outer.msl": False})
    per_slot = bn_grad_slots(fo)
    assert torch.all(per_slot[:-1] == 0) and per_slot[-1] > 0
    # Second order: every support pass shapes the adapted weights, so every slot is used.
    assert torch.all(bn_grad_slots(tiny_config(**{"outer.msl": False})) > 0)
    # First order with MSL: a query pass after every step uses every slot.
    assert torch.all(bn_grad_slots(tiny_config(**{"inner.second_order": False})) > 0)


def test_shared_bn_without_bnwb():
    cfg = tiny_config("omniglot-5w1s-maml")
    model, params, state = learner(cfg)
    assert params["bn"]["bn0.weight"].shape == (cfg.model.filters,) and state == {}


def test_bnrs_running_evaluation_uses_step_stats_and_changes_nothing():
    cfg = tiny_config(**{"model.bn_eval": "running"})
    model, params, state = learner(cfg)
    eps = episodes(tasks=3)
    before = {k: v.clone() for k, v in state.items()}
    out = evaluate(model, params, state, eps, cfg, "classification")["output"]
    assert all(torch.equal(state[k], before[k]) for k in state)  # evaluation leaves the state alone
    # The running statistics are what normalises: other statistics give other outputs, and only
    # the slots the evaluation steps reach matter (eval_steps=1 reads slot 0 alone).
    other = {k: v * 1.5 + 0.1 for k, v in state.items()}
    assert not torch.allclose(out, evaluate(model, params, other, eps, cfg, "classification")["output"])
    slot0_only = {k: torch.cat([v[:1], 2 * v[1:]]) for k, v in state.items()}
    one = evaluate(model, params, state, eps, cfg, "classification", steps=1)["output"]
    assert torch.equal(one, evaluate(model, params, slot0_only, eps, cfg, "classification", steps=1)["output"])
    # Nothing leaks between tasks or between query images: each task alone gives the same
    # outputs, and replacing one query image leaves the other query images' outputs unchanged.
    alone = evaluate(model, params, state, {k: v[1:2] for k, v in eps.items()}, cfg, "classification")["output"]
    assert torch.allclose(alone[0], out[1], rtol=1e-12, atol=1e-13)
    swapped = dict(eps, xq=eps["xq"].clone())
    swapped["xq"][0, 0] = randn(swapped["xq"][0, 0].shape, seed=3)
    out2 = evaluate(model, params, state, swapped, cfg, "classification")["output"]
    assert torch.allclose(out2[0, 1:], out[0, 1:], rtol=1e-12, atol=1e-13)
    # With the reference's batch statistics the queries are transductive: the same swap moves the others.
    batch_cfg = tiny_config()
    b1 = evaluate(model, params, state, eps, batch_cfg, "classification")["output"]
    b2 = evaluate(model, params, state, swapped, batch_cfg, "classification")["output"]
    assert not torch.allclose(b1[0, 1:], b2[0, 1:])
    assert torch.equal(b1[1:], b2[1:])


def test_bnrs_state_is_returned_not_mutated():
    cfg = tiny_config()
    model, params, state = learner(cfg)
    before = {k: v.clone() for k, v in state.items()}
    _, _, new_state = meta_loss(model, params, state, episodes(), cfg, 0, "classification")
    assert all(torch.equal(state[k], before[k]) for k in state)
    assert all(not torch.equal(new_state[k], state[k]) for k in state)


def test_running_stats_of_parts_sum_to_one_call():
    """BNRS over a meta-batch split into parts (chunks, processes' shares): each part folds its own
    tasks' batch statistics in at their global positions, only the first carries the old state, and
    the parts' states summed (as the trainer and the all-reduce do) are the running statistics of
    one call. Slot 2 has no pass: it keeps its state."""
    tasks, channels, momentum = 5, 3, 0.3
    state = {f"bn{i}.{s}": randn((3, channels), seed=10 + i).abs() + (s == "var")
             for i in (0, 1) for s in ("mean", "var")}

    def stats(seed):  # {layer: (mean [B, C], var [B, C])} of one pass
        return {f"bn{i}": (randn((tasks, channels), seed + i), randn((tasks, channels), seed + 5 + i).abs())
                for i in (0, 1)}

    # per task: support then query pass of slot 0, then of slot 1 (the order adapt_and_score lists them)
    passes = [(slot, stats(20 + 10 * p)) for p, slot in enumerate((0, 0, 1, 1))]
    whole = update_running_stats(state, passes, momentum)

    def local(lo, hi):
        return [(slot, {k: (m[lo:hi], v[lo:hi]) for k, (m, v) in st.items()}) for slot, st in passes]

    parts = [update_running_stats(state, local(lo, hi), momentum, Shard(lo, tasks, carry=lo == 0))
             for lo, hi in [(0, 2), (2, 3), (3, 5)]]
    assert all(parts[0].keys() == p.keys() == whole.keys() for p in parts)
    for k in whole:
        summed = parts[0][k] + parts[1][k] + parts[2][k]
        assert torch.allclose(summed, whole[k], rtol=1e-14, atol=1e-15), k
        assert not torch.equal(whole[k][:2], state[k][:2]), k
        assert torch.equal(whole[k][2], state[k][2]) and not parts[1][k][2].any(), k
