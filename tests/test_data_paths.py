"""Where data and caches are looked for."""
from __future__ import annotations

from pathlib import Path

from mamlpp.data import resolve_cache_root, resolve_data_root


def test_data_root_order(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("MAMLPP_DATA", raising=False)
    assert resolve_data_root() == tmp_path / "home" / ".cache" / "mamlpp"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_root() == tmp_path / "xdg" / "mamlpp"
    monkeypatch.setenv("MAMLPP_DATA", "")  # empty counts as unset
    assert resolve_data_root() == tmp_path / "xdg" / "mamlpp"
    monkeypatch.setenv("MAMLPP_DATA", str(tmp_path / "env"))
    assert resolve_data_root() == tmp_path / "env"
    assert resolve_data_root(None, str(tmp_path / "cfg")) == tmp_path / "cfg"
    assert resolve_data_root(str(tmp_path / "arg"), str(tmp_path / "cfg")) == tmp_path / "arg"


def test_cache_root_order(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("MAMLPP_CACHE", " ")
    assert resolve_cache_root() == tmp_path / "xdg" / "mamlpp" / "cache"
    monkeypatch.setenv("MAMLPP_CACHE", str(tmp_path / "c"))
    assert resolve_cache_root() == tmp_path / "c"
    assert resolve_cache_root(tmp_path / "arg") == Path(tmp_path / "arg")
