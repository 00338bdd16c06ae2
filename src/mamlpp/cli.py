"""Command line: `mamlpp train | eval | presets | config | ...`; `mamlpp COMMAND --help` for each."""
from __future__ import annotations

import argparse
import os
import sys

from .config import Config, ConfigError, apply_overrides
from .presets import PRESETS, resolve


def resolve_data_config(preset: str | None, dataset: str | None, overrides: list[str]) -> Config:
    """`mamlpp data ...` takes a preset, or just --dataset NAME, plus overrides."""
    if preset:
        return resolve(preset, overrides)
    if not dataset:
        raise ConfigError("give a PRESET or --dataset NAME (omniglot, mini_imagenet, cifar_fs, fc100, "
                          "tiered_imagenet, cub, folder)")
    return apply_overrides(Config(name=dataset), [f"data.dataset={dataset}", *overrides])


def cmd_presets(args) -> int:
    width = max(map(len, PRESETS))
    for name, preset in PRESETS.items():
        print(f"{name:<{width}}  {preset.description}")
    return 0


def cmd_config(args) -> int:
    print(resolve(args.preset, args.overrides).to_json())
    return 0


def cmd_train(args) -> int:
    from . import launch
    from .distributed import dist_from_env, shutdown
    from .rundir import RunDir

    launch.follow_parent()

    if args.resume:
        if args.preset or args.overrides:
            raise ConfigError("--resume RUN_DIR takes its config from RUN_DIR/config.json; drop PRESET and overrides")
        if args.out:
            raise ConfigError("--resume RUN_DIR continues the run in RUN_DIR; drop --out (a run cannot move)")
        run_dir, cfg = args.resume, RunDir(args.resume).read_config()
    else:
        if not args.preset or not args.out:
            raise ConfigError("train needs PRESET and --out RUN_DIR (or --resume RUN_DIR)")
        run_dir, cfg = args.out, resolve(args.preset, args.overrides)
    code = 1
    try:
        world, why = launch.plan(cfg, args.data_dir) if args.argv is not None else (1, "")
        peers = launch.Peers(world, why, args.argv)
        try:
            code = _train(args, cfg, run_dir)
        finally:
            try:
                shutdown(clean=code == 0)
            finally:
                failed = peers.wait(ok=code == 0)
        if failed and code == 0:
            print(f"mamlpp: a training process exited with status {failed}", file=sys.stderr)
            code = 1
    except KeyboardInterrupt:  # Ctrl-C reaches every rank: one line from rank 0, no tracebacks
        if dist_from_env().main:
            hint = f"; continue with: mamlpp train --resume {run_dir}" if RunDir(run_dir).is_run() else ""
            print(f"mamlpp: interrupted{hint}", file=sys.stderr)
        code = 130
    if dist_from_env().active:  # torch 2.13's gloo can abort in interpreter teardown (1 run in ~15 on 2 CPU
        sys.stdout.flush()  # ranks), after the process group is gone and every file is written: skip it
        sys.stderr.flush()
        os._exit(code)
    return code


def _train(args, cfg: Config, run_dir: str) -> int:
    """One rank's run (every rank under torchrun or train.processes); rank 0 prints the result."""
    from . import api
    from .distributed import dist_from_env
    from .experiment import NonFiniteLossError
    from .rundir import TestResult

    try:
        summary = api.train(cfg, run_dir, resume=bool(args.resume), data_dir=args.data_dir,
                            progress=not args.no_progress, test=not args.no_test)
    except NonFiniteLossError as e:
        print(f"mamlpp: {e}", file=sys.stderr)
        return 1
    if dist_from_env().main:
        print(f"run: {run_dir}  iterations: {summary['iterations']}  seconds: {summary['seconds']:.1f}")
        if summary["final"]:
            print(TestResult.from_dict(summary["final"]).describe())
    return 0


def cmd_eval(args) -> int:
    from . import api
    from .rundir import RunDir

    result = api.evaluate(args.run_dir, top_k=args.top_k, split=args.split, data_dir=args.data_dir, device=args.device)
    print(result.describe())
    top_k = None if args.top_k in (None, RunDir(args.run_dir).read_config().train.top_k) else args.top_k
    print(f"wrote {RunDir(args.run_dir).test_path(args.split, top_k)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mamlpp", description="Fast, faithful MAML and MAML++ for few-shot learning.",
        epilog="Overrides are KEY=VALUE with KEY as section.name (or a bare name when unique), e.g. "
               "inner.steps=3 outer.meta_batch=4 train.device=cpu train.budget=0.1. "
               "'mamlpp config PRESET' prints every key. Errors in the input print one line; --debug (anywhere "
               "on the line) or MAMLPP_DEBUG=1 shows their traceback.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list the named presets (every method, data set and setting)")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("config", help="print the resolved config of a preset with overrides")
    p.add_argument("preset", help="preset name ('mamlpp presets' lists them)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("train", help="meta-train a preset, validate every epoch, checkpoint, then test",
                       description="Meta-train PRESET into --out RUN_DIR (config.json, metrics.csv, checkpoints/, "
                                   "tensorboard/, test.json, summary.json), or continue a killed run with --resume. "
                                   "On a CPU it splits every meta-batch's tasks over processes of its own where that is "
                                   "faster (train.processes; the first line says what it chose); under torchrun, "
                                   "one rank per process.")
    p.add_argument("preset", nargs="?", help="preset name ('mamlpp presets' lists them)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--out", help="run directory for a new run")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    p.add_argument("--data-dir", default=None, help="data root (default: $MAMLPP_DATA, then the user cache)")
    p.add_argument("--no-test", action="store_true", help="skip the test protocol at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="the paper's test protocol on a trained run; writes RUN_DIR/test.json")
    p.add_argument("run_dir")
    p.add_argument("--top-k", type=int, default=None, help="checkpoints to ensemble (default: the run's train.top_k)")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=cmd_eval)

    from . import bench, report, sample, sweep
    from .data import cli as data_cli

    bench.register(sub)
    report.register(sub)
    sample.register(sub)
    sweep.register(sub)
    data_cli.register(sub, resolve_data_config)
    return parser


def one_line(e: BaseException) -> str:
    """An expected error as the line a user reads: what went wrong and which file."""
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.strerror} ({e.filename})"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    program = argv is None  # `mamlpp ...` itself, not a call from Python (whose process is not ours to split)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MAMLPP_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    # Overrides may follow options (`train P --out R inner.steps=3`): argparse leaves them unknown.
    args, unknown = parser.parse_known_args(argv)
    # what train's own processes run (launch.py), --debug included
    args.argv = list(sys.argv[1:]) if program else None
    if unknown:
        if not hasattr(args, "overrides") or any(u.startswith("-") or "=" not in u for u in unknown):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = list(args.overrides or []) + unknown
    from .data import DataError

    try:
        return args.func(args)
    except (ConfigError, DataError, OSError) as e:  # expected: bad input, a file, the disk
        if debug:
            raise
        print(f"mamlpp: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
