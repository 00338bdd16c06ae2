"""MAML++ on Omniglot with a network of your own: any torch.nn.Module, adapted by name.

    python examples/own_backbone.py --out runs/own --iters 100

Trains a few meta-iterations of Omniglot 5-way 1-shot MAML++ (LSLR, MSL, per-step batch norm) on a
small residual network defined here, evaluates it with the paper's test protocol, then loads the
best checkpoint and adapts it to a few test tasks by hand. The data root is $MAMLPP_DATA (or
--data-dir); Omniglot is downloaded there when missing.
"""
import argparse

import torch
from torch import nn

import mamlpp


class SmallResNet(nn.Module):
    """Three conv-BN-ReLU stages with a residual connection each, global pooling, a linear head."""

    def __init__(self, ways: int, width: int = 32):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.stages = nn.ModuleList(nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1))
                                    for _ in range(3))
        self.norm = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for stage in self.stages:
            h = nn.functional.max_pool2d(h + stage(h), 2)
        return self.head(torch.relu(self.norm(h)).mean((2, 3)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--iters", type=int, default=100, help="meta-iterations")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    cfg = mamlpp.preset("omniglot-5w1s-mamlpp", **{
        "train.epochs": 1, "train.iters_per_epoch": args.iters, "train.eval_tasks": 100, "outer.meta_batch": 4,
        "inner.steps": 2, "train.device": "cpu", "train.tensorboard": False})
    torch.manual_seed(0)
    backbone = mamlpp.ModuleBackbone(SmallResNet(ways=5))  # every parameter adapted; try adapt=lambda n: n.startswith("head")
    summary = mamlpp.train(cfg, args.out, data_dir=args.data_dir, progress=False, backbone=backbone)
    print(f"trained {summary['iterations']} iterations in {summary['seconds']:.1f} s")

    result = mamlpp.evaluate(args.out, data_dir=args.data_dir, backbone=backbone)
    print(result.describe())

    # The best checkpoint as a learner: adapt to the support set of new tasks, predict their queries.
    learner = mamlpp.load(args.out, backbone=backbone)
    episodes = mamlpp.task_source(learner.cfg, data_dir=args.data_dir).eval_batch("test", 0, 8)
    fast = learner.adapt(episodes["xs"], episodes["ys"])
    logits = learner.predict(fast, episodes["xq"])
    accuracy = (logits.argmax(-1) == episodes["yq"]).float().mean().item()
    print(f"adapted by hand on 8 test tasks: {100 * accuracy:.1f}% of their queries right")


if __name__ == "__main__":
    main()
