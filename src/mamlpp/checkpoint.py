"""Checkpoints: written atomically after every epoch, the latest plus the top-k by validation score.

RUN_DIR/checkpoints/latest.pt        everything needed to resume exactly
RUN_DIR/checkpoints/epoch_NNN.pt     the top-k epochs by validation score (for the test ensemble)
RUN_DIR/checkpoints/index.json       [{"epoch", "score", "file"}], best first

Only tensors, numbers, strings and lists/dicts of them are stored, so every file loads with
torch.load(..., weights_only=True).
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch

from .files import atomic_write_bytes, atomic_write_json

LATEST = "latest.pt"
INDEX = "index.json"


def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def save(path: Path, payload: dict) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load(path: Path, device="cpu") -> dict:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a foreign or damaged file: say which
        raise RuntimeError(f"checkpoint {path} cannot be loaded: {e}") from e


def read_index(run_dir) -> list[dict]:
    path = checkpoint_dir(run_dir) / INDEX
    return json.loads(path.read_text()) if path.exists() else []


def update_top_k(run_dir, payload: dict, epoch: int, score: float, k: int) -> list[dict]:
    """Keep this epoch if it ranks in the top k by score (higher is better); drop the displaced one.

    Order of writes keeps the directory consistent after a kill at any point: the new file first,
    then the index, and only then the deletion of files the index no longer names.
    """
    folder = checkpoint_dir(run_dir)
    index = [e for e in read_index(run_dir) if e["epoch"] != epoch]
    candidate = {"epoch": epoch, "score": score, "file": f"epoch_{epoch:03d}.pt"}
    ranked = sorted(index + [candidate], key=lambda e: (-e["score"], e["epoch"]))[:k]
    if candidate in ranked:
        save(folder / candidate["file"], payload)
    atomic_write_json(folder / INDEX, ranked)
    keep = {e["file"] for e in ranked} | {LATEST}
    for f in folder.glob("epoch_*.pt"):
        if f.name not in keep:
            os.unlink(f)
    return ranked
