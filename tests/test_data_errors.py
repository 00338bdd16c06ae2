"""Bad input ends in a DataError that names the file and the problem, before any training; a
cache is never half-written, and a failed preparation leaves the previous cache intact."""
from __future__ import annotations

import csv
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_omniglot, png_bytes, write_images
from mamlpp.config import Config, DataConfig
from mamlpp.data import DataError, build_image_tasks, load_image_set


def omniglot_cfg(**data) -> DataConfig:
    return DataConfig(dataset="omniglot", **data)


def test_small_omniglot_loads_from_archives_or_folders(tmp_path):
    root = make_omniglot(tmp_path / "d")
    data = load_image_set(omniglot_cfg(), root, cache_dir=tmp_path / "c", download=False)
    assert len(data.class_names) == 12 and data.images.shape == (48, 1, 28, 28)
    for name in ("images_background", "images_evaluation"):  # the extracted form of the same data
        with zipfile.ZipFile(root / "omniglot" / f"{name}.zip") as z:
            z.extractall(tmp_path / "x" / "omniglot")
    extracted = load_image_set(omniglot_cfg(), tmp_path / "x", cache_dir=tmp_path / "c", download=False)
    assert extracted.sources["images_background"].startswith("listing:")
    assert extracted.class_names == data.class_names and np.array_equal(extracted.images, data.images)


@pytest.mark.parametrize("member", ["images_background/../../evil.png", "/etc/evil.png",
                                    "images_background/A/../../x/1.png", "C:/evil.png"])
def test_archive_member_outside_the_folder(tmp_path, member):
    root = make_omniglot(tmp_path / "d", {"images_background": {member: png_bytes(0)}})
    with pytest.raises(DataError, match=r"images_background\.zip: member .* absolute path or a '\.\.' component"):
        load_image_set(omniglot_cfg(), root, cache_dir=tmp_path / "c", download=False)
    assert not list(tmp_path.glob("c/*/*"))  # nothing was cached


def test_corrupt_zip(tmp_path):
    root = make_omniglot(tmp_path / "d")
    path = root / "omniglot" / "images_evaluation.zip"
    path.write_bytes(b"PK\x03\x04 this is not really a zip archive" * 10)
    with pytest.raises(DataError, match=r"images_evaluation\.zip: not a valid zip archive"):
        load_image_set(omniglot_cfg(), root, cache_dir=tmp_path / "c", download=False)


def test_damaged_and_truncated_archive_members(tmp_path):
    truncated = png_bytes(1)[:40]
    root = make_omniglot(tmp_path / "d", {"images_evaluation": {"images_evaluation/Z/character01/bad.png": truncated}})
    with pytest.raises(DataError, match=r"images_evaluation\.zip: images_evaluation/Z/character01/bad\.png: cannot decode image"):
        load_image_set(omniglot_cfg(), root, cache_dir=tmp_path / "c", download=False)
    # flip bytes inside a stored member: the zip's CRC check catches it
    root2 = make_omniglot(tmp_path / "d2")
    path = root2 / "omniglot" / "images_background.zip"
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.infolist()[5]
    start = info.header_offset + 30 + len(info.filename.encode()) + 10
    raw[start:start + 8] = b"\xff" * 8
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"images_background\.zip: {info.filename}: (damaged archive member|cannot decode)"):
        load_image_set(omniglot_cfg(), root2, cache_dir=tmp_path / "c", download=False)


def test_empty_character_folder_in_archive(tmp_path):
    root = make_omniglot(tmp_path / "d", {"images_background": {"images_background/Script0A/character09/": b""}})
    with pytest.raises(DataError, match=r"character folder images_background/Script0A/character09 is empty"):
        load_image_set(omniglot_cfg(), root, cache_dir=tmp_path / "c", download=False)


def test_missing_archives_without_download(tmp_path):
    with pytest.raises(DataError, match=r"put images_background\.zip, images_evaluation\.zip in .*omniglot"):
        load_image_set(omniglot_cfg(), tmp_path / "nothing", cache_dir=tmp_path / "c", download=False)


def test_vinyals_lists_missing_or_wrong(tmp_path):
    root = make_omniglot(tmp_path / "d")
    with pytest.raises(DataError, match=r"split=vinyals needs the split lists"):
        load_image_set(omniglot_cfg(split="vinyals"), root, cache_dir=tmp_path / "c", download=False)
    lists = root / "omniglot" / "splits" / "vinyals"
    lists.mkdir(parents=True)
    for s in ("train", "val", "test"):
        (lists / f"{s}.txt").write_text("Script0A/character01/rot000\n")
    (lists / "val.txt").write_text("Script0A/character01/rot000\nNoSuchScript/character01/rot090\n")
    with pytest.raises(DataError, match=r"val\.txt:2: 'NoSuchScript/character01/rot090'"):
        load_image_set(omniglot_cfg(split="vinyals"), root, cache_dir=tmp_path / "c", download=False)


def folder_cfg(**data) -> Config:
    cfg = Config()
    cfg.data.dataset = "folder"
    cfg.data.image_size = 16
    cfg.data.ways, cfg.data.shots, cfg.data.queries = 2, 1, 1
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def test_truncated_jpeg(tmp_path, make_class_folders):
    root = make_class_folders(tmp_path / "mine", {f"c{i}": 4 for i in range(6)})
    bad = root / "c3" / "001.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DataError, match=rf"{bad}: cannot decode image"):
        load_image_set(folder_cfg().data, root, cache_dir=tmp_path / "c")


def test_not_an_image(tmp_path, make_class_folders):
    root = make_class_folders(tmp_path / "mine", {f"c{i}": 4 for i in range(6)})
    (root / "c2" / "notes.png").write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.png: cannot decode image"):
        load_image_set(folder_cfg().data, root, cache_dir=tmp_path / "c")


def test_empty_class_folder(tmp_path, make_class_folders):
    root = make_class_folders(tmp_path / "mine", {f"c{i}": 4 for i in range(6)})
    (root / "empty").mkdir()
    (root / "empty" / "README.txt").write_text("no images here")
    with pytest.raises(DataError, match=rf"{root / 'empty'}: empty class folder"):
        load_image_set(folder_cfg().data, root, cache_dir=tmp_path / "c")


def test_partly_presplit_folder(tmp_path, make_class_folders):
    make_class_folders(tmp_path / "mine" / "train", {"a": 3})
    make_class_folders(tmp_path / "mine" / "test", {"b": 3})
    with pytest.raises(DataError, match=r"has train/, test/ but not val/"):
        load_image_set(folder_cfg().data, tmp_path / "mine", cache_dir=tmp_path / "c")


def test_too_few_classes_or_images(tmp_path, make_class_folders):
    root = make_class_folders(tmp_path / "mine", {f"c{i}": 4 for i in range(9)})  # 5/2/2 classes
    cfg = folder_cfg(ways=3)
    with pytest.raises(DataError, match=r"split 'val' has 2 classes, fewer than data.ways=3"):
        build_image_tasks(cfg, torch.device("cpu"), torch.float32, str(root), cache_dir=tmp_path / "c")
    cfg = folder_cfg(shots=2, queries=3)
    with pytest.raises(DataError, match=r"split 'train', class c\d has 4 images, fewer than data.shots \+ data.queries = 2\+3"):
        build_image_tasks(cfg, torch.device("cpu"), torch.float32, str(root), cache_dir=tmp_path / "c")


def test_csv_naming_missing_files(tmp_path):
    base = tmp_path / "mini_imagenet"
    write_images(base / "images", 4)
    for s in ("train", "val", "test"):
        with open(base / f"{s}.csv", "w", newline="") as f:
            csv.writer(f).writerows([["filename", "label"], ["000.jpg", "n1"], ["001.jpg", "n1"],
                                     ["gone.jpg", "n2"], ["002.jpg", "n2"]])
    cfg = DataConfig(dataset="mini_imagenet")
    with pytest.raises(DataError, match=r"train\.csv: 1 of the 4 files it names are missing from .*images \(e\.g\. gone\.jpg\)"):
        load_image_set(cfg, tmp_path, cache_dir=tmp_path / "c")
    (base / "val.csv").write_text("file,class\n000.jpg,n1\n")
    (base / "images" / "gone.jpg").write_bytes((base / "images" / "000.jpg").read_bytes())
    with pytest.raises(DataError, match=r"val\.csv: expected the header 'filename,label'"):
        load_image_set(cfg, tmp_path, cache_dir=tmp_path / "c")


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "nested"])
def test_csv_names_outside_images_are_refused(tmp_path, monkeypatch, kind):
    """A CSV name must be a bare file name in images/: an absolute name or '../x.jpg' would read a
    real image outside it (or crash the cache key); refused before any image is opened."""
    base = tmp_path / "mini_imagenet"
    write_images(base / "images", 4)
    (base / "images" / "sub").mkdir()
    outside = {"absolute": tmp_path / "outside.jpg", "dotdot": base / "x.jpg", "nested": base / "images" / "sub" / "y.jpg"}
    for p in outside.values():
        p.write_bytes((base / "images" / "000.jpg").read_bytes())  # real, decodable images
    name = {"absolute": str(outside["absolute"]), "dotdot": "../x.jpg", "nested": "sub/y.jpg"}[kind]
    for s in ("train", "val", "test"):
        with open(base / f"{s}.csv", "w", newline="") as f:
            csv.writer(f).writerows([["filename", "label"], ["000.jpg", "n1"], ["001.jpg", "n1"],
                                     [name, "n2"], ["002.jpg", "n2"]])
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k))
    with pytest.raises(DataError) as err:
        load_image_set(DataConfig(dataset="mini_imagenet"), tmp_path, cache_dir=tmp_path / "c")
    assert str(err.value) == (f"{base / 'train.csv'}:4: file name {name!r} is not a plain file name inside "
                              f"{base / 'images'}; expected a bare name such as n0153282900000005.jpg "
                              "(no folders, '..' or leading '/')")
    assert opened == [] and not (tmp_path / "c").exists()  # nothing decoded, no cache written


def test_ravi_csvs_without_the_images(tmp_path, ravi_split_dir):
    """The real split files against an images/ folder that lacks nearly all of them."""
    base = tmp_path / "mini_imagenet"
    write_images(base / "images", 2)
    with pytest.raises(DataError, match=r"train\.csv: 38400 of the 38400 files it names are missing"):
        load_image_set(DataConfig(dataset="mini_imagenet"), tmp_path, cache_dir=tmp_path / "c",
                       csv_dir=ravi_split_dir)


def test_mini_imagenet_not_found(tmp_path, monkeypatch):
    monkeypatch.delenv("MAMLPP_DATA", raising=False)  # its splits/ravi CSVs would be found otherwise
    with pytest.raises(DataError, match=r"Mini-ImageNet not found in .*expected one of"):
        load_image_set(DataConfig(dataset="mini_imagenet"), tmp_path, cache_dir=tmp_path / "c")
    (tmp_path / "mini_imagenet" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match=r"images needs the split files train\.csv, val\.csv and test\.csv"):
        load_image_set(DataConfig(dataset="mini_imagenet"), tmp_path, cache_dir=tmp_path / "c")


class Evil:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pickle_with_code_is_refused(tmp_path):
    for s in ("train", "val", "test"):
        with open(tmp_path / f"mini-imagenet-cache-{s}.pkl", "wb") as f:
            pickle.dump({"image_data": Evil(), "class_dict": {}}, f)
    with pytest.raises(DataError, match=r"mini-imagenet-cache-train\.pkl: not a Mini-ImageNet pickle .*refusing to load builtins\.print"):
        load_image_set(DataConfig(dataset="mini_imagenet"), tmp_path, cache_dir=tmp_path / "c")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_failed_prepare_keeps_the_previous_cache(tmp_path, make_class_folders, monkeypatch):
    import mamlpp.data.folder as folder_mod

    root = make_class_folders(tmp_path / "mine", {f"c{i}": 4 for i in range(6)})
    cfg = folder_cfg().data
    cache = tmp_path / "c"
    first = load_image_set(cfg, root, cache_dir=cache)
    before = _snapshot(first.cache_path)
    assert sorted(before) == sorted(["manifest.json", next(n for n in before if n.startswith("images-"))])

    # 1. A forced rebuild of the same cache that dies half-way through decoding.
    real = folder_mod.decode_files
    calls = []

    def failing(payload):
        calls.append(1)
        if len(calls) == 3:
            raise DataError("simulated failure in the middle of decoding")
        return real(payload)

    monkeypatch.setattr(folder_mod, "decode_files", failing)
    with pytest.raises(DataError, match="simulated failure"):
        load_image_set(cfg, root, cache_dir=cache, force=True)
    monkeypatch.setattr(folder_mod, "decode_files", real)
    assert _snapshot(first.cache_path) == before  # nothing changed, no temporary files left
    again = load_image_set(cfg, root, cache_dir=cache)
    assert again.cache_path == first.cache_path and np.array_equal(again.images, first.images)

    # 2. A forced rebuild that succeeds replaces the images file and removes the old one.
    rebuilt = load_image_set(cfg, root, cache_dir=cache, force=True)
    after = _snapshot(first.cache_path)
    assert rebuilt.cache_path == first.cache_path and np.array_equal(rebuilt.images, first.images)
    assert len(after) == 2 and not set(after) & (set(before) - {"manifest.json"})
    before = after

    # 3. The source changes and its new preparation fails: old cache intact, no half-made one.
    bad = root / "c1" / "002.jpg"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(DataError, match="cannot decode image"):
        load_image_set(cfg, root, cache_dir=cache)
    assert _snapshot(first.cache_path) == before
    assert [p for p in cache.iterdir()] == [first.cache_path]
