"""The public Python API: the runs of the `mamlpp` command, and the building blocks for a loop of your own.

    import mamlpp
    cfg = mamlpp.preset("omniglot-20w1s-mamlpp", **{"inner.steps": 3})
    summary = mamlpp.train(cfg, out="runs/x")    # progress, checkpoints, exact resume, the test protocol
    result = mamlpp.evaluate("runs/x")           # the typed test result (test.json)
    learner = mamlpp.load("runs/x")              # the best checkpoint, ready to adapt to new tasks
    fast = learner.adapt(xs, ys)                 # support images [B, N*K, C, H, W] and labels [B, N*K]
    logits = learner.predict(fast, xq)           # [B, n, N]

Episodes are dicts of tensors with a leading task axis B (mamlpp.tasks): xs [B, N*K, ...], ys [B, N*K]
(int64 labels 0..N-1), xq [B, n, ...], yq [B, n]; any data pipeline can feed them.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from .config import Config, ConfigError, apply_budget, apply_values
from .methods import Method, Params, build_method
from .presets import get_preset
from .rundir import RunDir, TestResult
from .tasks import TaskSource
from .trainer import mixed_precision, require_bf16
from .usermodule import ModuleBackbone

Episodes = dict[str, torch.Tensor]
Tree = dict[str, torch.Tensor]


def preset(name: str, **overrides: Any) -> Config:
    """A named preset ('mamlpp presets' lists them) with overrides {"section.key": value} (a bare key
    when one section has it), then train.budget scaling: the config `mamlpp train` would run. Values
    may be Python values or the strings the command line takes."""
    return apply_budget(apply_values(get_preset(name), overrides))


def train(cfg: Config, out: str | os.PathLike[str], *, resume: bool = False, data_dir: str | None = None,
          progress: bool = True, test: bool = True, backbone: ModuleBackbone | None = None) -> dict[str, Any]:
    """Meta-train cfg into the run folder `out` (or continue it with resume=True), validate and
    checkpoint every epoch, then run the test protocol unless test=False. Under torchrun every rank
    calls this and trains its share. backbone: your own module (model.arch becomes "module").
    Returns {"preset", "iterations", "seconds", "final": test result dict}."""
    from .data import build_tasks
    from .distributed import init_from_env
    from .experiment import train as run

    cfg = _with_backbone(cfg, backbone)
    dist, device = init_from_env(cfg.train.device)
    tasks = build_tasks(cfg, device, data_dir=data_dir)
    return run(cfg, tasks, out, device, progress=progress, resume=resume, run_test=test, dist=dist,
               backbone=backbone)


def evaluate(run_dir: str | os.PathLike[str], *, top_k: int | None = None, split: str = "test",
             data_dir: str | None = None, device: str | None = None,
             backbone: ModuleBackbone | None = None) -> TestResult:
    """The test protocol on a trained run (the top-k checkpoints' logits averaged on the fixed test
    tasks); writes RUN_DIR/test.json (test_top{k}.json for another k) and returns the result."""
    from .distributed import select_device
    from .evaluation import evaluate_run

    return evaluate_run(run_dir, device=select_device(device) if device else None, top_k=top_k,
                        data_dir=data_dir, split=split, backbone=backbone)


def task_source(cfg: Config, *, data_dir: str | None = None, device: str = "cpu") -> TaskSource:
    """The episodes cfg.data names: `.train_batch(iteration, B)` and `.eval_batch("val" | "test", first,
    count)` return dicts xs [B, N*K, ...], ys [B, N*K], xq, yq, deterministic per task index."""
    from .data import build_tasks

    tasks: TaskSource = build_tasks(cfg, torch.device(device), data_dir=data_dir)
    return tasks


def load(run_dir: str | os.PathLike[str], *, checkpoint: str = "best", device: str = "cpu",
         backbone: ModuleBackbone | None = None) -> "Learner":
    """A Learner with a run's parameters: its best validation checkpoint (checkpoint="best") or
    "latest", on `device`, ready for adapt/predict."""
    run = RunDir(run_dir)
    cfg = run.read_config()
    found = run.best_checkpoint() if checkpoint == "best" else (run.latest, "latest checkpoint")
    if checkpoint not in ("best", "latest") or found is None or not found[0].is_file():
        raise FileNotFoundError(f"{run}: no {checkpoint!r} checkpoint (expected 'best' or 'latest' in {run.checkpoints})")
    ckpt = run.load_checkpoint(found[0], device)
    if "tasks" not in ckpt:
        raise ConfigError(f"{found[0]} predates mamlpp.load (no task shapes in it): evaluate it with mamlpp.evaluate")
    t = ckpt["tasks"]
    learner = Learner(cfg, tuple(t["input_shape"]), int(t["num_outputs"]), kind=str(t["kind"]), device=device,
                      backbone=backbone)
    learner.load_params(ckpt["params"], ckpt["state"])
    return learner


class Learner:
    """A method with its explicit parameters and state, for your own loop.

    `parameters()` are what your optimiser updates; `meta_loss(episodes, epoch)` is the training loss
    of a batch of episodes (and keeps the new state); `adapt(xs, ys)` and `predict(fast, xq)` use it
    on new tasks. Tensors carry a leading task axis B: xs [B, N*K, *input_shape], ys [B, N*K] int64.
    """

    def __init__(self, cfg: Config, input_shape: tuple[int, ...], num_outputs: int, *,
                 kind: str = "classification", backbone: ModuleBackbone | None = None, device: str = "cpu",
                 seed: int | None = None) -> None:
        cfg = _with_backbone(cfg, backbone)
        self.cfg, self.device = cfg, torch.device(device)
        if cfg.train.precision == "bf16":
            require_bf16(self.device)
        self.method: Method = build_method(cfg, kind, tuple(input_shape), num_outputs, backbone)
        generator = torch.Generator().manual_seed(cfg.train.seed if seed is None else seed)
        self.params: Params
        self.state: Tree
        self.params, self.state = self.method.init(generator, getattr(torch, cfg.train.dtype), device)

    def parameters(self) -> list[torch.Tensor]:
        """The tensors the meta-optimiser trains (for torch.optim.Adam(learner.parameters(), ...))."""
        return self.method.trainable(self.params)

    def meta_loss(self, episodes: Episodes, epoch: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor], Tree]:
        """(loss to backpropagate, detached metrics, new state) of a batch of episodes; the learner keeps
        the new state (e.g. batch-norm running statistics). epoch drives MSL / DA."""
        with mixed_precision(self.cfg.train.precision, self.device):
            loss, metrics, self.state = self.method.meta_loss(self.params, self.state, episodes, epoch)
        return loss, metrics, self.state

    def adapt(self, xs: torch.Tensor, ys: torch.Tensor) -> Tree:
        """What each task keeps of its support set: MAML's fast weights after the evaluation steps, or a
        metric method's support embeddings."""
        with mixed_precision(self.cfg.train.precision, self.device):
            return self.method.adapt(self.params, self.state, xs, ys)

    def predict(self, fast: Tree, xq: torch.Tensor) -> torch.Tensor:
        """Logits [B, n, N] of queries xq [B, n, *input_shape] for the tasks `fast` came from."""
        with mixed_precision(self.cfg.train.precision, self.device):
            return self.method.apply(self.params, self.state, fast, xq)

    def load_params(self, params: dict[str, torch.Tensor], state: Tree) -> None:
        """Parameters as a checkpoint stores them ({"net.conv0.weight": tensor, ...}) and the state."""
        with torch.no_grad():
            for group, tree in self.params.items():
                for name, tensor in tree.items():
                    tensor.copy_(params[f"{group}.{name}"])
        self.state = {k: v.to(next(iter(self.params["net"].values())).device) for k, v in state.items()}


def _with_backbone(cfg: Config, backbone: ModuleBackbone | None) -> Config:
    """A ModuleBackbone makes the config say model.arch=module (so config.json tells what ran)."""
    if backbone is None:
        return cfg
    return apply_values(cfg, {"model.arch": "module"})
