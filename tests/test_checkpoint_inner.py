"""train.checkpoint_inner: the meta-backward recomputes the inner loop's activations instead of
keeping them. The meta-gradient, the metrics and the BNRS statistics must not change (float64)."""
import pytest
import torch

from core_utils import cat, episodes, learner, meta_grad, tiny_config
from mamlpp.config import ConfigError, apply_overrides
from mamlpp.objective import meta_loss
from mamlpp.presets import get_preset

SHAPES = {"conv4": (1, 12, 12), "resnet12": (3, 16, 16)}


def config(arch: str, second_order: bool, checkpoint: bool, **changes):
    """MAML++ (MSL, LSLR, BNWB, BNRS) with 2 inner steps on a tiny Conv4 or ResNet-12."""
    cfg = tiny_config(**{"inner.second_order": second_order, "train.checkpoint_inner": checkpoint,
                         "inner.steps": 2, **changes})
    if arch == "resnet12":
        cfg.model.arch, cfg.model.widths = "resnet12", (4, 6, 8, 8)
    return cfg


def run(arch, second_order, checkpoint, seed=None, **changes):
    cfg = config(arch, second_order, checkpoint, **changes)
    model, params, state = learner(cfg, shape=SHAPES[arch])
    eps = episodes(tasks=2, shape=SHAPES[arch])
    if seed is not None:
        torch.manual_seed(seed)
    loss, grads, new_state = meta_grad(meta_loss, model, params, state, eps, cfg, epoch=1)
    return loss, grads, new_state, state


@pytest.mark.parametrize("second_order", [True, False], ids=["second-order", "first-order"])
@pytest.mark.parametrize("arch", ["conv4", "resnet12"])
def test_checkpointing_gives_the_same_meta_gradient_and_statistics(arch, second_order):
    loss_a, grad_a, state_a, state = run(arch, second_order, checkpoint=False)
    loss_b, grad_b, state_b, _ = run(arch, second_order, checkpoint=True)
    assert torch.allclose(loss_a, loss_b, rtol=1e-12, atol=0)
    rel = (cat(grad_a) - cat(grad_b)).norm() / cat(grad_a).norm()
    assert rel < 1e-12, f"{arch}: checkpointed meta-gradient off by {rel:.2e}"
    # BNRS: the recomputation's statistics are discarded, so each pass is folded in exactly once.
    assert state_a.keys() == state_b.keys() and len(state_a) > 0
    for k in state_a:
        assert torch.equal(state_a[k], state_b[k]), k
        assert not torch.equal(state_a[k], state[k]), k


def test_recomputation_replays_the_same_dropblock_masks():
    """DropBlock draws from the global generator; the recomputed passes must draw the same masks
    (torch's checkpoint restores the generator's state), and the stream after the iteration is the same."""
    results = []
    for checkpoint in (False, True):
        loss, grads, new_state, _ = run("resnet12", True, checkpoint, seed=7, **{"model.dropblock": 0.3})
        results.append((loss, grads, new_state, torch.get_rng_state()))
    (la, ga, sa, ra), (lb, gb, sb, rb) = results
    assert torch.allclose(la, lb, rtol=1e-12, atol=0)
    assert (cat(ga) - cat(gb)).norm() / cat(ga).norm() < 1e-12
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and torch.equal(ra, rb)
    loss_other_seed = run("resnet12", True, False, seed=8, **{"model.dropblock": 0.3})[0]
    assert not torch.allclose(la, loss_other_seed)  # the masks matter: the check above has power


@pytest.mark.parametrize("arch", ["conv4", "resnet12"])
def test_checkpointing_keeps_far_fewer_tensors_for_the_meta_backward(arch):
    """Bytes the autograd graph saves during the meta-forward (a saved-tensor hook sees what
    checkpoint does not take over): second order keeps the support passes' double-backward graph
    and every query pass, checkpointed only the region inputs stay."""
    saved = {}
    for second_order in (True, False):
        for checkpoint in (False, True):
            cfg = config(arch, second_order, checkpoint)
            model, params, state = learner(cfg, shape=SHAPES[arch])
            eps = episodes(tasks=2, shape=SHAPES[arch])
            total = [0]

            def pack(t):
                total[0] += t.numel() * t.element_size()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                meta_loss(model, params, state, eps, cfg, 1, "classification")
            saved[second_order, checkpoint] = total[0]
    assert saved[True, True] * 10 < saved[True, False]
    # First order: only the query passes are checkpointed (the support graph is freed by the step itself).
    assert saved[False, True] * 1.5 < saved[False, False]


@pytest.mark.parametrize("chunk", [0, 1])
def test_a_trainer_step_is_the_same_with_checkpointing(chunk):
    """Through the trainer (Adam step, chunked meta-batch): the same parameters and BNRS state."""
    from mamlpp.methods import flatten
    from mamlpp.trainer import Trainer

    class Fixed:
        kind, input_shape, num_outputs = "classification", (3, 16, 16), 3
        batch = episodes(tasks=3, shape=(3, 16, 16))

    results = []
    for checkpoint in (False, True):
        cfg = config("resnet12", True, checkpoint, **{"train.chunk": chunk, "train.dtype": "float64",
                                                     "outer.meta_batch": 3})
        trainer = Trainer(cfg, Fixed(), torch.device("cpu"))
        trainer.meta_step(Fixed.batch, epoch=1)
        results.append((flatten(trainer.params), trainer.state))
    (pa, sa), (pb, sb) = results
    for k in pa:
        assert torch.allclose(pa[k], pb[k], rtol=1e-12, atol=1e-15), k
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_config_errors():
    with pytest.raises(ConfigError, match="train.checkpoint_inner=true is per inner step; method.name=protonet"):
        apply_overrides(get_preset("mini-5w1s-protonet"), ["train.checkpoint_inner=true"])
    with pytest.raises(ConfigError, match="train.checkpoint_inner=true checkpoints the task-parallel path"):
        apply_overrides(get_preset("mini-5w1s-mamlpp"), ["train.checkpoint_inner=true", "train.impl=loop"])
