"""The Trainer on a synthetic image source: resuming MAML++ (BNRS, BNWB, LSLR, augmentation) from a
state_dict continues bit for bit, and train.impl=loop trains through the per-task loop."""
import io

import torch

import mamlpp.methods.maml as maml_module
from core_utils import image_tasks, tiny_config
from mamlpp.trainer import Trainer

CPU = torch.device("cpu")


def steps(trainer, tasks, iterations, per_epoch):
    for it in iterations:
        trainer.meta_step(tasks.train_batch(it, trainer.cfg.outer.meta_batch), epoch=it // per_epoch)


def assert_identical(a, b, where="state_dict"):
    """Nested dicts/lists of tensors and numbers, equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_resume_from_state_dict_continues_bit_for_bit():
    """3 meta-updates, a state_dict saved and loaded (weights_only) into a fresh Trainer on a fresh
    task source, 3 more in the next epoch: parameters (LSLR rates and BNWB per-step weights
    included), BNRS running statistics and Adam's moments equal 6 uninterrupted updates exactly."""
    cfg = tiny_config("omniglot-5w1s-mamlpp", **{"inner.steps": 2, "outer.meta_batch": 3, "train.epochs": 2,
                                                 "train.eval_tasks": 4})
    assert cfg.model.bnrs and cfg.model.bnwb and cfg.inner.lr_mode == "lslr" and cfg.outer.msl and cfg.outer.ca
    tasks = image_tasks(cfg)
    assert tasks.augment
    full = Trainer(cfg, tasks, CPU)
    initial = full.state_dict()
    steps(full, tasks, range(6), per_epoch=3)

    first = Trainer(cfg, image_tasks(cfg), CPU)
    steps(first, first.tasks, range(3), per_epoch=3)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    resumed = Trainer(cfg, image_tasks(cfg), CPU)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    steps(resumed, resumed.tasks, range(3, 6), per_epoch=3)

    after = full.state_dict()
    assert_identical(after, resumed.state_dict())
    for group in ("params", "state"):  # every kind of state moved, so none is compared at its initial value
        for k, v in after[group].items():
            if not k.startswith(("net.conv", "lr.conv")) or not k.endswith(".bias"):  # conv biases before BN: ~0
                assert not torch.equal(v, initial[group][k]), k
    assert torch.equal(resumed.evaluate_tasks("val")["output"], full.evaluate_tasks("val")["output"])


def test_loop_implementation_trains_through_the_per_task_loop(monkeypatch):
    """train.impl=loop: the Trainer's meta-updates and evaluation go through loop.py, and give the
    task-parallel path's gradients, metrics, BNRS statistics and outputs (float64)."""
    calls = []

    def spy(name):
        real = getattr(maml_module, name)

        def counted(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(maml_module, name, counted)

    spy("meta_loss_loop")
    spy("evaluate_loop")
    results = {}
    for impl in ("parallel", "loop"):
        cfg = tiny_config("omniglot-5w1s-mamlpp", **{"train.impl": impl, "train.dtype": "float64",
                                                     "outer.meta_batch": 3, "train.eval_tasks": 4})
        tasks = image_tasks(cfg)
        trainer = Trainer(cfg, tasks, CPU)
        metrics = trainer.meta_step(tasks.train_batch(0, 3), epoch=0)
        grads = torch.cat([p.grad.flatten() for p in trainer.optimizer.param_groups[0]["params"]])
        results[impl] = grads, metrics, trainer.state, trainer.evaluate_tasks("val")
    assert calls == ["meta_loss_loop", "evaluate_loop"]  # one meta-batch, one evaluation chunk of 4 tasks
    (g0, m0, s0, e0), (g1, m1, s1, e1) = results["parallel"], results["loop"]
    assert (g0 - g1).norm() / g0.norm() < 1e-10
    for k in m0:
        assert torch.allclose(m0[k], m1[k], rtol=1e-12), k
    for k in s0:
        assert torch.allclose(s0[k], s1[k], rtol=1e-12, atol=1e-14), k
    assert torch.allclose(e0["output"], e1["output"], rtol=1e-10, atol=1e-12)
    assert torch.equal(e0["accuracy"], e1["accuracy"])


def test_threads_are_chosen_per_workload_and_restored(capsys, tmp_path):
    """One intra-op thread for a small network (the sinusoid MLP), train.threads to override, torch's
    default for the conv network; the process's setting comes back after the run, and the run says."""
    from mamlpp.cli import main
    from mamlpp.presets import get_preset
    from mamlpp.sinusoid import SinusoidTasks

    before = torch.get_num_threads()
    cfg = get_preset("sinusoid-maml")
    trainer = Trainer(cfg, SinusoidTasks(cfg.data, 0, CPU, torch.float32), CPU)
    with trainer.threads() as chosen:
        assert torch.get_num_threads() == 1 and chosen == "1 (auto: a small network)"
    assert torch.get_num_threads() == before
    cfg.train.threads = 3
    with Trainer(cfg, SinusoidTasks(cfg.data, 0, CPU, torch.float32), CPU).threads() as chosen:
        assert torch.get_num_threads() == 3 and chosen == "3 (train.threads)"
    conv = tiny_config("omniglot-5w1s-mamlpp")
    with Trainer(conv, image_tasks(conv), CPU).threads() as chosen:  # 4 filters x 12 x 12 is small too
        assert chosen.startswith("1 (auto")
    conv.model.filters, conv.model.stages = 64, 4
    conv.data.image_size = 28
    with Trainer(conv, image_tasks(conv, size=28), CPU).threads() as chosen:
        assert chosen == f"{before} (auto: torch's default)" and torch.get_num_threads() == before
    assert main(["train", "sinusoid-maml", "train.epochs=1", "train.iters_per_epoch=2", "train.eval_tasks=4",
                 "train.tensorboard=false", "--out", str(tmp_path / "r"), "--no-progress", "--no-test"]) == 0
    assert ("sinusoid-maml (maml) on cpu, processes 1 (auto: a small network), intra-op threads 1 (auto: a small "
            "network)") in capsys.readouterr().err
    assert torch.get_num_threads() == before


def test_processes_are_chosen_per_workload(monkeypatch):
    """Auto takes one process per core when several tasks fit in a pass, one process for a small
    network, a task that fills a pass, one core, a meta-batch of one task or train.threads set."""
    from mamlpp.presets import get_preset
    from mamlpp.sinusoid import SinusoidTasks

    monkeypatch.setattr("mamlpp.trainer.available_cores", lambda: 3)
    monkeypatch.setattr("sys.platform", "linux")
    cfg = get_preset("sinusoid-maml")
    assert Trainer(cfg, SinusoidTasks(cfg.data, 0, CPU, torch.float32), CPU).processes() == (1, "auto: a small network")

    def chosen(size=28, **overrides):
        conv = tiny_config("omniglot-5w1s-mamlpp", **{"model.filters": 64, "model.stages": 4,
                                                      "data.image_size": size, "outer.meta_batch": 4, **overrides})
        return Trainer(conv, image_tasks(conv, size=size), CPU).processes()

    # 10 images of 64 x 28 x 28 activations: 8 tasks fit in a pass of 4M
    assert chosen() == (3, "auto: 8 tasks fit in a pass, one process per core")
    assert chosen(**{"outer.meta_batch": 2}) == (2, "auto: 8 tasks fit in a pass, one process per core")
    assert chosen(**{"outer.meta_batch": 1}) == (1, "auto: one task per meta-batch")
    assert chosen(size=84) == (1, "auto: one task per pass, intra-op threads share it")  # 10 x 64 x 84 x 84
    assert chosen(**{"train.threads": 2}) == (1, "auto: train.threads is set")
    assert chosen(**{"train.processes": 2, "outer.meta_batch": 2}) == (2, "train.processes")
    assert chosen(**{"train.chunk": 1}) == (1, "auto: one task per pass, intra-op threads share it")
    assert chosen(**{"train.impl": "loop"}) == (1, "auto: the per-task loop runs in one process")
    monkeypatch.setattr("mamlpp.trainer.available_cores", lambda: 1)
    assert chosen() == (1, "auto: one core")
    monkeypatch.setattr("sys.platform", "darwin")  # no PR_SET_PDEATHSIG to take the other ranks along
    assert chosen() == (1, "auto: processes are chosen on Linux only")


def test_available_cores_honour_a_container_quota(monkeypatch, tmp_path):
    from mamlpp import trainer

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    limit = tmp_path / "cpu.max"
    monkeypatch.setattr(trainer, "CGROUP_CPU_MAX", str(limit))
    assert trainer.available_cores() == 8  # no cgroup file
    limit.write_text("max 100000\n")
    assert trainer.available_cores() == 8
    limit.write_text("250000 100000\n")  # docker --cpus=2.5
    assert trainer.available_cores() == 2
    limit.write_text("50000 100000\n")
    assert trainer.available_cores() == 1


class FixedTasks:
    """A task source serving one fixed batch of `tasks` identical 3-way 2-shot tasks."""
    kind, num_outputs = "classification", 3

    def __init__(self, tasks, shape):
        from core_utils import episodes

        self.input_shape = shape
        one = episodes(tasks=1, ways=3, shots=2, queries=2, shape=shape)
        self.batch = {k: v.expand(tasks, *v.shape[1:]).clone() for k, v in one.items()}


def test_passes_of_a_meta_batch_draw_alike_for_it_and_apart_for_themselves(monkeypatch):
    """Numbers drawn for the whole meta-batch (Siamese pairs and distortions) are a task's own in
    any pass: chunks of one task give the one-pass update. What a pass draws for its tasks alone
    (ResNet-12's DropBlock masks) never repeats another pass's draws, even for identical tasks."""
    from core_utils import set_keys
    from mamlpp.methods import flatten
    from mamlpp.presets import get_preset

    def siamese_grads(chunk):
        cfg = set_keys(get_preset("omniglot-5w1s-siamese"), {
            "model.filters": 4, "model.stages": 2, "data.shots": 2, "method.pairs": 8, "method.distort": True,
            "outer.meta_batch": 4, "train.chunk": chunk, "train.dtype": "float64"})
        tasks = FixedTasks(4, (1, 12, 12))
        torch.manual_seed(0)
        trainer = Trainer(cfg, tasks, CPU)
        trainer.meta_step(tasks.batch, 0)
        after = torch.get_rng_state()
        return torch.cat([p.grad.flatten() for p in flatten(trainer.params).values() if p.grad is not None]), after

    (whole, rng_whole), (chunked, rng_chunked) = siamese_grads(4), siamese_grads(1)
    assert (whole - chunked).norm() / whole.norm() < 1e-12
    assert torch.equal(rng_whole, rng_chunked)  # the global generator leaves the step as one pass leaves it

    draws = []
    bernoulli = torch.bernoulli
    monkeypatch.setattr(torch, "bernoulli", lambda *a, **k: draws.append(bernoulli(*a, **k)) or draws[-1])
    cfg = tiny_config("omniglot-5w1s-mamlpp", **{"model.arch": "resnet12", "model.widths": (4, 4, 4, 4),
                                                "model.dropblock": 0.3, "outer.meta_batch": 3, "train.chunk": 1,
                                                "inner.steps": 1})
    tasks = FixedTasks(3, (1, 16, 16))
    Trainer(cfg, tasks, CPU).meta_step({k: v.float() if v.is_floating_point() else v for k, v in tasks.batch.items()}, 0)
    per_pass = len(draws) // 3
    assert per_pass and len(draws) == 3 * per_pass
    passes = [torch.cat([d.flatten() for d in draws[i * per_pass:(i + 1) * per_pass]]) for i in range(3)]
    assert not torch.equal(passes[0], passes[1]) and not torch.equal(passes[1], passes[2])


def test_one_process_paths_refuse_splits_and_gpus_take_no_processes(monkeypatch):
    """The per-task loop runs whole meta-batches in one process; on a GPU `mamlpp train` starts no
    processes of its own (train.processes=1 is fine there, more is torchrun's job)."""
    import pytest

    from mamlpp import launch
    from mamlpp.config import ConfigError, apply_overrides
    from mamlpp.presets import get_preset

    cfg = tiny_config("omniglot-5w1s-mamlpp", **{"train.impl": "loop", "train.chunk": 2, "outer.meta_batch": 4})
    with pytest.raises(ConfigError, match="train.impl=loop is the one-process oracle over whole meta-batches"):
        Trainer(cfg, image_tasks(cfg), CPU)
    with pytest.raises(ConfigError, match="train.processes=2: train.impl=loop is the one-process oracle"):
        apply_overrides(get_preset("omniglot-5w1s-mamlpp"), ["train.impl=loop", "train.processes=2"])
    monkeypatch.setattr(launch, "select_device", lambda name: torch.device("cuda"))
    assert launch.plan(tiny_config("omniglot-5w1s-mamlpp", **{"train.processes": 1}), None) == (1, "")
    assert launch.plan(tiny_config("omniglot-5w1s-mamlpp"), None) == (1, "")
    with pytest.raises(ConfigError, match="train.processes=2 splits tasks over CPU processes; on cuda use torchrun"):
        launch.plan(tiny_config("omniglot-5w1s-mamlpp", **{"train.processes": 2}), None)
