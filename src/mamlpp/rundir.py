"""A run folder: its layout, and the one place that writes and reads its files.

RUN_DIR/config.json            the resolved config (Config.to_dict)
RUN_DIR/metrics.csv            one row per logged step: iteration, epoch, phase (train/val), loss, accuracy,
                               lr, seconds; flushed per row so a killed run keeps its history
RUN_DIR/tensorboard/           the same metrics as TensorBoard events
RUN_DIR/checkpoints/latest.pt  everything needed to resume exactly (written after every epoch)
RUN_DIR/checkpoints/epoch_NNN.pt  the top-k epochs by validation score (for the test ensemble)
RUN_DIR/checkpoints/index.json [{"epoch", "score", "file"}], best first
RUN_DIR/test.json              the test protocol's result (TestResult; val.json for --split val)
RUN_DIR/summary.json           at the end: {"preset", "iterations", "seconds", "final": test result}

Every file is written atomically (files.py), so a kill or a full disk never leaves a half-written
one. Checkpoints hold only tensors, numbers, strings and lists/dicts of them, so they load with
torch.load(..., weights_only=True). Train, eval, report, sweep and bench go through `RunDir`.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from .config import Config, ConfigError
from .files import atomic_write_bytes, atomic_write_json, remove_temporaries

METRIC_FIELDS = ["iteration", "epoch", "phase", "loss", "accuracy", "lr", "seconds"]
LATEST = "latest.pt"
LOCK = ".lock"
_HELD: dict[Path, list] = {}  # run folders this process has locked: [file, depth] (the lock nests)


class RunDirError(ConfigError):
    """A run folder, or one of its files, that cannot be used; the message names the file."""


class DamagedCheckpointError(RunDirError):
    """A checkpoint file that exists but cannot be loaded (truncated, foreign, corrupt)."""


@dataclass(frozen=True)
class TestResult:
    """The test protocol's result for one run (test.json). `metric` is the ensemble's mean accuracy
    (classification) or MSE after adaptation (regression) over the tasks, with its 95% CI."""

    preset: str
    split: str
    kind: str  # "classification" or "regression"
    num_tasks: int
    ensemble_size: int
    checkpoint_epochs: list[int]
    metric: float
    ci95: float
    single_model: float  # the best validation checkpoint alone
    single_model_ci95: float
    per_model: list[float] = field(default_factory=list)  # each checkpoint alone, best first
    method: str = "maml"
    inner_steps: int | None = None
    mse_before_adaptation: float | None = None  # regression: the meta-initialisation without adaptation

    _CLASSIFICATION = {"metric": "accuracy", "single_model": "single_model_accuracy",
                       "per_model": "per_model_accuracy"}
    _REGRESSION = {"metric": "mse_after_adaptation", "single_model": "single_model_mse_after_adaptation",
                   "per_model": "per_model_mse_after_adaptation"}

    def to_dict(self) -> dict:
        """test.json's keys: accuracy/single_model_accuracy/... or mse_after_adaptation/..."""
        names = self._CLASSIFICATION if self.kind == "classification" else self._REGRESSION
        return {names.get(k, k): v for k, v in asdict(self).items() if k != "kind" and v is not None}

    @classmethod
    def from_dict(cls, d: dict, source: str = "test.json") -> "TestResult":
        if not isinstance(d, dict):
            raise RunDirError(f"{source}: expected a JSON object, not {type(d).__name__}")
        kind = "classification" if "accuracy" in d else "regression"
        names = cls._CLASSIFICATION if kind == "classification" else cls._REGRESSION
        values = {"kind": kind}
        for f in fields(cls):
            key = names.get(f.name, f.name)
            if key in d and f.name != "kind":
                values[f.name] = _typed(d[key], f.type, f"{source}: {key}")
            elif f.default is MISSING and f.default_factory is MISSING and f.name != "kind":
                raise RunDirError(f"{source}: missing key {key!r}")
        return cls(**values)

    def describe(self) -> str:
        """One line for the terminal."""
        n = self.num_tasks
        if self.kind == "regression":
            before = f"before adaptation {self.mse_before_adaptation:.4f}, " if self.mse_before_adaptation is not None else ""
            return (f"held-out MSE over {n} tasks: {before}after {self.inner_steps} steps {self.metric:.4f} "
                    f"(+/- {self.ci95:.4f})")
        return (f"{self.split} accuracy over {n} tasks: {100 * self.metric:.2f}% +/- {100 * self.ci95:.2f}% "
                f"(95% CI, ensemble of {self.ensemble_size}); single best model {100 * self.single_model:.2f}% "
                f"+/- {100 * self.single_model_ci95:.2f}%")


def _typed(value, annotation: str, where: str):
    """A test.json value checked against its field's annotation (a string under postponed annotations)."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if annotation.startswith("list"):
        ok = isinstance(value, list) and all(map(number, value))
        expected = "a list of numbers"
    elif annotation.startswith(("float", "int")):
        ok = number(value) and (annotation.startswith("float") or float(value).is_integer())
        expected = "a number" if annotation.startswith("float") else "an integer"
    else:
        ok, expected = isinstance(value, str), "a string"
    if not ok:
        raise RunDirError(f"{where} = {value!r}: expected {expected}")
    return value


class RunDir:
    """Paths of one run folder and typed reads and atomic writes of its files."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config_path = self.path / "config.json"
        self.metrics_path = self.path / "metrics.csv"
        self.summary_path = self.path / "summary.json"
        self.tensorboard = self.path / "tensorboard"
        self.checkpoints = self.path / "checkpoints"
        self.latest = self.checkpoints / LATEST
        self.index_path = self.checkpoints / "index.json"

    def __str__(self) -> str:
        return str(self.path)

    def test_path(self, split: str = "test", top_k: int | None = None) -> Path:
        """test.json, or test_top{k}.json for an ensemble size other than the run's own."""
        return self.path / (f"{split}.json" if top_k is None else f"{split}_top{top_k}.json")

    def is_run(self) -> bool:
        return self.config_path.is_file()

    # ---- one writer at a time ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self):
        """Hold an exclusive lock on the folder (RUN_DIR/.lock) for a block; a second process is refused
        with the holder's PID. An OS lock (flock): the kernel drops it when its process dies, so a
        killed run never leaves a stale lock. Nests within one process (train runs the test inside)."""
        import fcntl

        key = self.path.resolve()
        if key in _HELD:
            _HELD[key][1] += 1
        else:
            f = open(self.path / LOCK, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                f.close()
                raise RunDirError(f"{self.path} is in use by another mamlpp process (PID {holder}); wait for it "
                                  "to finish or use another folder") from None
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            _HELD[key] = [f, 1]
        try:
            yield self
        finally:
            _HELD[key][1] -= 1
            if not _HELD[key][1]:
                f = _HELD.pop(key)[0]
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()

    def prepare_new(self) -> None:
        """Create the folder for a new run: refuse a file in the way and a folder that holds anything
        but a run (top-k pruning and metrics appends would destroy or mix a user's files)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise RunDirError(f"--out {self.path}: a file is in the way (the run folder or a folder above it "
                              "is a file)") from None
        foreign = [p.name for p in self.path.iterdir() if p.name != LOCK and not p.name.endswith(".tmp")]
        if foreign and not self.is_run():
            raise RunDirError(f"--out {self.path}: the folder holds files but no mamlpp run (no config.json: "
                              f"{', '.join(sorted(foreign)[:3])}{', ...' if len(foreign) > 3 else ''}); use a new or "
                              "empty folder")

    def remove_temporaries(self) -> list[Path]:
        """Temporary files of interrupted atomic writes (only while holding the lock)."""
        return remove_temporaries(self.path) + (remove_temporaries(self.checkpoints) if self.checkpoints.is_dir() else [])

    # ---- config, summary, test result ----------------------------------------------------------------
    def _read_json(self, path: Path):
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise RunDirError(f"{path}: not UTF-8 text ({e.reason})") from None
        except json.JSONDecodeError as e:
            raise RunDirError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None

    def read_config_dict(self) -> dict:
        if not self.config_path.is_file():
            what = "does not exist" if not self.path.exists() else "has no config.json"
            raise FileNotFoundError(f"{self.path} is not a run directory: it {what} (expected the --out folder "
                                    "of 'mamlpp train')")
        d = self._read_json(self.config_path)
        if not isinstance(d, dict):
            raise RunDirError(f"{self.config_path}: expected a JSON object of config sections, not {type(d).__name__}")
        return d

    def read_config(self) -> Config:
        try:
            return Config.from_dict(self.read_config_dict())
        except RunDirError:
            raise
        except ConfigError as e:
            raise RunDirError(f"{self.config_path}: {e}") from None

    def write_config(self, cfg: Config) -> None:
        atomic_write_json(self.config_path, cfg.to_dict())

    def read_test(self, split: str = "test") -> TestResult | None:
        path = self.test_path(split)
        return TestResult.from_dict(self._read_json(path), str(path)) if path.is_file() else None

    def write_test(self, result: TestResult, path: Path | None = None) -> None:
        atomic_write_json(path or self.test_path(result.split), result.to_dict())

    def read_summary(self) -> dict | None:
        return self._read_json(self.summary_path) if self.summary_path.is_file() else None

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.summary_path, summary)

    # ---- metrics ----------------------------------------------------------------------------------------
    def read_metrics(self) -> list[dict]:
        """Typed rows of metrics.csv ([] when there is none); a torn last line of a killed run is skipped."""
        if not self.metrics_path.is_file():
            return []
        rows = []
        try:
            with open(self.metrics_path, newline="", encoding="utf-8") as f:
                for r in csv.DictReader(f):
                    try:
                        rows.append({"iteration": int(r["iteration"]), "epoch": int(r["epoch"]), "phase": r["phase"],
                                     "loss": float(r["loss"]) if r.get("loss") not in ("", None) else math.nan,
                                     "accuracy": float(r["accuracy"]) if r.get("accuracy") not in ("", None) else None})
                    except (KeyError, TypeError, ValueError):
                        continue
        except UnicodeDecodeError as e:
            raise RunDirError(f"{self.metrics_path}: not UTF-8 text ({e.reason})") from None
        return rows

    # ---- checkpoints ------------------------------------------------------------------------------------
    def save_checkpoint(self, path: Path, payload: dict) -> None:
        import torch

        buffer = io.BytesIO()
        torch.save(payload, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    def load_checkpoint(self, path: Path, device="cpu") -> dict:
        import torch

        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        try:
            return torch.load(path, map_location=device, weights_only=True)
        except Exception as e:  # a truncated, foreign or damaged file: say which
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DamagedCheckpointError(f"checkpoint {path} cannot be loaded ({first})") from None

    def load_resume_point(self, device="cpu") -> tuple[dict, str | None]:
        """(checkpoint to resume from, warning or None): latest.pt, or, when it is damaged, the newest
        epoch checkpoint that loads (its later epochs are trained again)."""
        try:
            return self.load_checkpoint(self.latest, device), None
        except DamagedCheckpointError as damaged:
            for path in sorted(self.checkpoints.glob("epoch_*.pt"), reverse=True):
                try:
                    ckpt = self.load_checkpoint(path, device)
                except DamagedCheckpointError:
                    continue
                return ckpt, (f"{damaged}; resuming from the newest intact epoch checkpoint, {path.name} (epoch "
                              f"{ckpt['epoch']}): the epochs after it are trained again")
            raise RunDirError(f"{damaged}, and no epoch checkpoint in {self.checkpoints} loads either: the run "
                              "cannot be resumed; start it again in a new folder") from None

    def read_index(self) -> list[dict]:
        """The top-k checkpoints, best first: [{"epoch", "score", "file"}]."""
        if not self.index_path.is_file():
            return []
        index = self._read_json(self.index_path)
        if not isinstance(index, list) or not all(isinstance(e, dict) and {"epoch", "score", "file"} <= set(e)
                                                  for e in index):
            raise RunDirError(f"{self.index_path}: expected a list of {{epoch, score, file}} entries")
        return index

    def update_top_k(self, payload: dict, epoch: int, score: float, k: int) -> list[dict]:
        """Keep this epoch if it ranks in the top k by score (higher is better); drop the displaced one.

        Order of writes keeps the folder consistent after a kill at any point: the new file first,
        then the index, and only then the deletion of files the index no longer names.
        """
        index = [e for e in self.read_index() if e["epoch"] != epoch]
        candidate = {"epoch": epoch, "score": score, "file": f"epoch_{epoch:03d}.pt"}
        ranked = sorted(index + [candidate], key=lambda e: (-e["score"], e["epoch"]))[:k]
        if candidate in ranked:
            self.save_checkpoint(self.checkpoints / candidate["file"], payload)
        atomic_write_json(self.index_path, ranked)
        keep = {e["file"] for e in ranked} | {LATEST}
        for f in self.checkpoints.glob("epoch_*.pt"):
            if f.name not in keep:
                os.unlink(f)
        return ranked

    def best_checkpoint(self) -> tuple[Path, str] | None:
        """(path, description) of the best validation checkpoint, else latest.pt, else None."""
        index = self.read_index()
        if index and (self.checkpoints / index[0]["file"]).is_file():
            return self.checkpoints / index[0]["file"], f"best validation checkpoint, epoch {index[0]['epoch']}"
        if self.latest.is_file():
            return self.latest, "latest checkpoint"
        return None


class MetricsLog:
    """RUN_DIR/metrics.csv, flushed per row so a killed run keeps its history, plus TensorBoard."""

    def __init__(self, run: RunDir, resume_iteration: int | None, tensorboard: bool):
        path = run.metrics_path
        if resume_iteration is not None and path.exists():  # drop rows the resumed run will redo
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= resume_iteration]
            self._rewrite(path, rows)
        new = not path.exists()
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=METRIC_FIELDS)
        if new:
            self.writer.writeheader()
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run.tensorboard), purge_step=resume_iteration or None)

    @staticmethod
    def _rewrite(path: Path, rows: list[dict]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(path, buffer.getvalue().encode())

    def write(self, **row) -> None:
        self.writer.writerow({k: row.get(k, "") for k in METRIC_FIELDS})
        self.file.flush()
        if self.tb is not None:
            for key in ("loss", "accuracy", "lr"):
                if row.get(key, "") != "":
                    self.tb.add_scalar(f"{row['phase']}/{key}", row[key], row["iteration"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
