"""Command line: `mamlpp train | presets | config | ...`; `mamlpp COMMAND --help` for each."""
from __future__ import annotations

import argparse
import sys

from .config import Config, ConfigError, apply_overrides, valid_keys
from .presets import PRESETS, get_preset


def resolve_config(preset: str, overrides: list[str]) -> Config:
    return apply_overrides(get_preset(preset), overrides)


def cmd_presets(args) -> int:
    width = max(map(len, PRESETS))
    for name, preset in PRESETS.items():
        print(f"{name:<{width}}  {preset.description}")
    return 0


def cmd_config(args) -> int:
    print(resolve_config(args.preset, args.overrides).to_json())
    return 0


def cmd_train(args) -> int:
    from .tasks import build_tasks
    from .trainer import select_device, train

    cfg = resolve_config(args.preset, args.overrides)
    device = select_device(cfg.train.device)
    tasks = build_tasks(cfg, device, data_dir=args.data_dir)
    summary = train(cfg, tasks, args.out, device, progress=not args.no_progress)
    final = summary["final"]
    print(f"run: {args.out}  iterations: {summary['iterations']}  seconds: {summary['seconds']:.1f}")
    if "mse_after_adaptation" in final:
        print(f"held-out MSE over {final['num_tasks']} tasks: before adaptation {final['mse_before_adaptation']:.4f}, "
              f"after {final['adaptation_steps']} steps {final['mse_after_adaptation']:.4f} "
              f"(+/- {final['mse_after_adaptation_ci95']:.4f})")
    else:
        print(f"test accuracy over {final['num_tasks']} tasks: {100 * final['accuracy']:.2f}% "
              f"+/- {100 * final['accuracy_ci95']:.2f}% (95% CI)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mamlpp", description="Fast, faithful MAML and MAML++ for few-shot learning.",
        epilog="Overrides are KEY=VALUE with KEY as section.name (or a bare name when unique), e.g. "
               "inner.steps=3 outer.meta_batch=4 train.device=cpu. Valid keys: 'mamlpp config PRESET'.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list the named presets")
    p.set_defaults(func=cmd_presets)

    def with_preset(p):
        p.add_argument("preset", help="preset name ('mamlpp presets' lists them)")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")

    p = sub.add_parser("config", help="print the resolved config of a preset with overrides")
    with_preset(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("train", help="meta-train a preset; writes config.json, metrics.csv, summary.json")
    with_preset(p)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--data-dir", default=None, help="data root (default: $MAMLPP_DATA, then the user cache)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"mamlpp: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
