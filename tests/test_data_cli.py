"""`mamlpp data prepare|check|show` as functions, and their argparse wiring."""
from __future__ import annotations

import argparse

import pytest
from PIL import Image

from mamlpp.config import Config, apply_overrides
from mamlpp.data import DataError
from mamlpp.data.cli import cmd_check, cmd_prepare, cmd_show, register


@pytest.fixture
def folder(tmp_path, make_class_folders, monkeypatch):
    monkeypatch.setenv("MAMLPP_CACHE", str(tmp_path / "cache"))
    return make_class_folders(tmp_path / "mine", {f"c{i}": 5 for i in range(9)})


def folder_cfg(*overrides: str) -> Config:
    base = ["data.dataset=folder", "data.image_size=20", "data.ways=2", "data.shots=2", "data.queries=1"]
    return apply_overrides(Config(), base + list(overrides))


def test_prepare_check_show_on_a_folder(folder, tmp_path, capsys):
    cfg = folder_cfg()
    assert cmd_prepare(cfg, str(folder)) == 0
    assert "45 images of 9 classes" in capsys.readouterr().out
    assert cmd_check(cfg, str(folder)) == 0
    out = capsys.readouterr().out
    assert "listing:" in out and "ok: 2-way 2-shot 1-query" in out
    assert "train         5       25" in out and "val           2       10" in out
    png = cmd_show(cfg, str(folder), str(tmp_path / "out" / "episode.png"), split="val")
    img = Image.open(png)
    assert img.size[0] > 2 * 20 and img.size[1] > 4 * 20  # 2 support + 2 query rows of 20px images
    with pytest.raises(DataError, match="fewer than data.ways=3"):
        cmd_check(folder_cfg("data.ways=3"), str(folder))


def test_check_and_show_omniglot(shared_data_root, data_cache_dir, omniglot_set, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MAMLPP_CACHE", str(data_cache_dir))
    cfg = apply_overrides(Config(), ["data.ways=20"])
    assert cmd_check(cfg, str(shared_data_root)) == 0
    out = capsys.readouterr().out
    assert "train      1150    23000" in out and "test        423     8460" in out and "sha256:7c59c4a4" in out
    png = cmd_show(cfg, str(shared_data_root), str(tmp_path / "omniglot.png"))
    assert Image.open(png).size[1] > 40 * 28


def test_register_dispatches(folder, tmp_path, capsys):
    seen = []

    def resolve(preset, dataset, overrides):
        seen.append((preset, dataset, overrides))
        return folder_cfg(*overrides)

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"), resolve)
    args = parser.parse_args(["data", "show", "--dataset", "folder", "data.ways=3", "--data-dir", str(folder),
                              "--out", str(tmp_path / "e.png"), "--split", "test"])
    assert args.func(args) == 2  # 9 classes split 5/2/2: val cannot hold 3-way tasks
    assert "error: " in capsys.readouterr().err and seen[-1] == (None, "folder", ["data.ways=3"])
    args = parser.parse_args(["data", "prepare", "some-preset", "data.shots=1", "--data-dir", str(folder)])
    assert args.func(args) == 0 and seen[-1] == ("some-preset", None, ["data.shots=1"])
