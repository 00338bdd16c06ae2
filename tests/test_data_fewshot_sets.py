"""CIFAR-FS, FC100, tieredImageNet and CUB-200-2011 on generated miniatures of each real layout: loading
with the published class splits, the cache's content, deterministic episodes, `mamlpp data check|show`,
every bad input (corrupt archive, bad PNG bytes, missing split file, class with too few images,
checksum mismatch on download) a DataError before anything is cached, and each preset training."""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_images
from mamlpp.cli import main
from mamlpp.config import Config, DataConfig
from mamlpp.data import DataError, build_image_tasks, load_image_set
from mamlpp.data import cifar100 as cifar_mod
from mamlpp.data.cifar_fs import SPLIT as CIFAR_FS_SPLIT
from mamlpp.data.common import CIFAR100_MEAN, CIFAR100_STD
from mamlpp.data.cub import SPLIT as CUB_SPLIT
from mamlpp.data.fc100 import SUPERCLASSES as FC100_SUPERCLASSES
from mamlpp.data.safepickle import stream_list
from test_data_download import serve  # noqa: F401  (the local HTTP server fixture)

# CIFAR-100's class hierarchy (superclass -> its five classes); meta lists both sorted by name.
CIFAR_HIERARCHY = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
FINE = sorted(c for cs in CIFAR_HIERARCHY.values() for c in cs)
COARSE = sorted(CIFAR_HIERARCHY)
SUPER_OF = {c: s for s, cs in CIFAR_HIERARCHY.items() for c in cs}
PER_CLASS = 6  # 4 in the train pickle, 2 in the test pickle: enough for 5-shot 1-query tasks


def cifar_cfg(dataset: str, ways=5, shots=1, queries=1, **data) -> Config:
    cfg = Config()
    cfg.data.dataset, cfg.data.ways, cfg.data.shots, cfg.data.queries = dataset, ways, shots, queries
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


# ---- CIFAR-100 miniature -------------------------------------------------------------------------------
def cifar_pickles(counts: dict[str, int] | None = None) -> dict[str, bytes]:
    """The three pickles of the python archive, each image tagged: pixel (0, 0) of the red plane is the
    class index, pixel (0, 1) the image's index within its class. `counts` overrides images per class."""
    rng = np.random.default_rng(0)
    rows = {"train": [], "test": []}
    for k, name in enumerate(FINE):
        n = (counts or {}).get(name, PER_CLASS)
        for i in range(n):
            img = rng.integers(0, 256, 3072, dtype=np.uint8)
            img[0], img[1] = k, i
            rows["train" if i < n - 2 or n <= 2 and i == 0 else "test"].append((k, img))
    out = {}
    for member, items in rows.items():
        order = rng.permutation(len(items))  # the real pickles are not sorted by class
        data = np.stack([items[j][1] for j in order]) if items else np.zeros((0, 3072), np.uint8)
        fine = [items[j][0] for j in order]
        coarse = [COARSE.index(SUPER_OF[FINE[k]]) for k in fine]
        out[member] = pickle.dumps({"filenames": [f"img{j}.png" for j in order], "batch_label": f"{member} batch",
                                    "fine_labels": fine, "coarse_labels": coarse, "data": data}, protocol=2)
    out["meta"] = pickle.dumps({"fine_label_names": FINE, "coarse_label_names": COARSE}, protocol=2)
    return out


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def make_cifar(root: Path, counts=None, drop=(), extra=None) -> Path:
    """ROOT/cifar100/cifar-100-python.tar.gz with members cifar-100-python/{train,test,meta}."""
    members = {f"cifar-100-python/{m}": b for m, b in cifar_pickles(counts).items() if m not in drop}
    write_tar(Path(root) / "cifar100" / "cifar-100-python.tar.gz", {**members, **(extra or {})})
    return Path(root)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    return make_cifar(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fewshot-cache")


def test_cifar_fs_and_fc100_have_the_published_splits(cifar_root, cache):
    fs = load_image_set(DataConfig(dataset="cifar_fs"), cifar_root, cache_dir=cache, download=False)
    fc = load_image_set(DataConfig(dataset="fc100"), cifar_root, cache_dir=cache, download=False)
    assert fs.cache_path == fc.cache_path  # one CIFAR-100 cache, two splits
    assert fs.images.shape == (100 * PER_CLASS, 3, 32, 32) and fs.norm == fc.norm == "cifar100"
    assert fs.class_names == FINE
    assert {s: v["classes"] for s, v in fs.split_sizes().items()} == {"train": 64, "val": 16, "test": 20}
    assert {s: v["classes"] for s, v in fc.split_sizes().items()} == {"train": 60, "val": 20, "test": 20}
    for s in ("train", "val", "test"):
        assert sorted(fs.splits[s].names) == sorted(CIFAR_FS_SPLIT[s])
        assert {SUPER_OF[c] for c in fc.splits[s].names} == set(FC100_SUPERCLASSES[s])
    assert fs.split_source.startswith("Bertinetto") and fc.split_source.startswith("Oreshkin")
    # class-major, every image of its class, its train-pickle images (tags 0..3) before its test-pickle ones
    for k in range(100):
        block = fs.images[fs.offsets[k]:fs.offsets[k + 1]]
        assert (block[:, 0, 0, 0] == k).all()
        assert sorted(block[:4, 0, 0, 1].tolist()) == [0, 1, 2, 3] and sorted(block[4:, 0, 0, 1].tolist()) == [4, 5]
    assert fs.sources[str(cifar_root / "cifar100" / "cifar-100-python.tar.gz")].startswith("sha256:")


def test_split_lists_are_the_published_partitions():
    for lists, sizes in ((CIFAR_FS_SPLIT, (64, 16, 20)),):
        assert tuple(len(lists[s]) for s in ("train", "val", "test")) == sizes
        assert sorted(c for s in lists.values() for c in s) == FINE
    assert tuple(len(FC100_SUPERCLASSES[s]) for s in ("train", "val", "test")) == (12, 4, 4)
    assert sorted(c for s in FC100_SUPERCLASSES.values() for c in s) == COARSE
    # TADAM's superclass indices over CIFAR-100's coarse labels
    assert {s: sorted(COARSE.index(c) for c in v) for s, v in FC100_SUPERCLASSES.items()} == {
        "train": [1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19], "val": [8, 11, 13, 16], "test": [0, 7, 12, 14]}
    # CUB: Chen et al.'s rule over the sorted folders, i % 2 == 0 train, i % 4 == 1 val, i % 4 == 3 test
    names = sorted(c for s in CUB_SPLIT.values() for c in s)
    assert len(names) == 200 and [int(n[:3]) for n in names] == list(range(1, 201))
    for i, n in enumerate(names):
        assert n in CUB_SPLIT["train" if i % 2 == 0 else "val" if i % 4 == 1 else "test"]


def test_cifar_extracted_folder_gives_the_same_images(cifar_root, cache, tmp_path):
    with tarfile.open(cifar_root / "cifar100" / "cifar-100-python.tar.gz") as tar:
        tar.extractall(tmp_path / "x" / "cifar100", filter="data")
    folder = load_image_set(DataConfig(dataset="cifar_fs"), tmp_path / "x", cache_dir=cache, download=False)
    archive = load_image_set(DataConfig(dataset="cifar_fs"), cifar_root, cache_dir=cache, download=False)
    assert next(iter(folder.sources.values())).startswith("listing:")
    assert folder.cache_path != archive.cache_path and np.array_equal(folder.images, archive.images)


def test_cifar_episodes_are_deterministic_and_labelled_by_content(cifar_root, cache):
    cfg = cifar_cfg("fc100", shots=2, queries=3)
    a = build_image_tasks(cfg, torch.device("cpu"), torch.float64, str(cifar_root), cache_dir=cache)
    b = build_image_tasks(cfg, torch.device("cpu"), torch.float64, str(cifar_root), cache_dir=cache)
    for ea, eb in ((a.train_batch(3, 4), b.train_batch(3, 4)), (a.eval_batch("test", 5, 6), b.eval_batch("test", 5, 6))):
        assert all(torch.equal(ea[k], eb[k]) for k in ea)
    ep, plan = a.eval_batch("val", 0, 4), a.plan("val", range(4))
    xs = a.to_uint8(ep["xs"]).reshape(4, 5, 2, 3, 32, 32)
    for t in range(4):
        for j in range(5):
            assert (xs[t, j, :, 0, 0, 0] == plan["classes"][t, j].item()).all()  # the tag is the class index
            assert FINE[plan["classes"][t, j]] in a.data.splits["val"].names
    # normalised with CIFAR-100's statistics: (x / 255 - mean) / std per channel
    raw = torch.from_numpy(a.data.images[plan["images"][:, :, :2].reshape(-1).numpy()]).double().view(4, 10, 3, 32, 32)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(3, 1, 1) for v in (CIFAR100_MEAN, CIFAR100_STD))
    torch.testing.assert_close(ep["xs"], (raw / 255 - mean) / std, rtol=0, atol=1e-12)


def test_cifar_check_and_show(cifar_root, cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MAMLPP_CACHE", str(cache))
    assert main(["data", "check", "cifarfs-5w1s-mamlpp", "data.queries=5", "--data-dir", str(cifar_root)]) == 0
    out = capsys.readouterr().out
    assert "cifar_fs (split: Bertinetto et al. 2019" in out and "sha256:" in out
    assert "train        64      384" in out and "test         20      120" in out
    assert "ok: 5-way 1-shot 5-query tasks fit every split" in out
    assert main(["data", "check", "--dataset", "fc100", "--data-dir", str(cifar_root)]) == 0
    assert "train        60      360" in capsys.readouterr().out
    png = tmp_path / "e.png"
    assert main(["data", "show", "fc100-5w5s-protonet", "data.queries=1", "data.train_queries=1", "--split", "test",
                 "--out", str(png), "--data-dir", str(cifar_root)]) == 0
    assert Image.open(png).size[1] > 10 * 32


def test_cifar_corrupt_archive_is_refused_and_nothing_cached(tmp_path):
    root = make_cifar(tmp_path / "d")
    path = root / "cifar100" / "cifar-100-python.tar.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated download
    with pytest.raises(DataError, match=r"cifar-100-python\.tar\.gz: not a readable tar\.gz archive .*fetch it again"):
        load_image_set(DataConfig(dataset="cifar_fs"), root, cache_dir=tmp_path / "c", download=False)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").rglob("*"))
    (path).write_bytes(b"not a tar archive at all" * 100)
    with pytest.raises(DataError, match=r"not a readable tar\.gz archive"):
        load_image_set(DataConfig(dataset="fc100"), root, cache_dir=tmp_path / "c", download=False)


def test_cifar_bad_pickles_are_refused(tmp_path):
    members = cifar_pickles()
    members["train"] = members["train"][:300]  # a truncated member pickle
    write_tar(tmp_path / "d" / "cifar100" / "cifar-100-python.tar.gz", {f"cifar-100-python/{m}": b for m, b in members.items()})
    with pytest.raises(DataError, match=r"cifar-100-python\.tar\.gz: train: not a CIFAR-100 pickle with data, "
                                        r"fine_labels, coarse_labels"):
        load_image_set(DataConfig(dataset="cifar_fs"), tmp_path / "d", cache_dir=tmp_path / "c", download=False)
    evil = {**cifar_pickles(), "meta": b"cos\nsystem\n(S'echo pickle code ran'\ntR."}
    write_tar(tmp_path / "e" / "cifar100" / "cifar-100-python.tar.gz", {f"cifar-100-python/{m}": b for m, b in evil.items()})
    with pytest.raises(DataError, match=r"meta: not a CIFAR-100 pickle .*refusing to load os\.system"):
        load_image_set(DataConfig(dataset="cifar_fs"), tmp_path / "e", cache_dir=tmp_path / "c", download=False)
    assert not (tmp_path / "c").exists()


def test_cifar_missing_member_or_escaping_member(tmp_path):
    root = make_cifar(tmp_path / "d", drop=("meta",))
    with pytest.raises(DataError, match=r"cifar-100-python\.tar\.gz: has no cifar-100-python/meta; the CIFAR-100 "
                                        r"python archive holds cifar-100-python/train, cifar-100-python/test, "
                                        r"cifar-100-python/meta"):
        load_image_set(DataConfig(dataset="cifar_fs"), root, cache_dir=tmp_path / "c", download=False)
    root = make_cifar(tmp_path / "e", extra={"cifar-100-python/../../evil": b"x"})
    with pytest.raises(DataError, match=r"member 'cifar-100-python/\.\./\.\./evil' has an absolute path or a '\.\.' component"):
        load_image_set(DataConfig(dataset="cifar_fs"), root, cache_dir=tmp_path / "c", download=False)
    (tmp_path / "f" / "cifar100" / "cifar-100-python").mkdir(parents=True)  # an extracted folder lacking its files
    with pytest.raises(DataError, match=r"cifar-100-python: cannot read train .*holds train, test, meta"):
        load_image_set(DataConfig(dataset="cifar_fs"), tmp_path / "f", cache_dir=tmp_path / "c", download=False)
    with pytest.raises(DataError, match=r"CIFAR-100 not found: put cifar-100-python\.tar\.gz .* in .*cifar100"):
        load_image_set(DataConfig(dataset="fc100"), tmp_path / "none", cache_dir=tmp_path / "c", download=False)


def test_cifar_class_with_too_few_or_no_images(tmp_path):
    root = make_cifar(tmp_path / "d", counts={"whale": 3})
    with pytest.raises(DataError, match=r"cifar_fs: split 'test', class whale has 3 images, fewer than "
                                        r"data\.shots \+ data\.queries = 1\+5"):
        build_image_tasks(cifar_cfg("cifar_fs", queries=5), torch.device("cpu"), torch.float32, str(root),
                          cache_dir=tmp_path / "c")
    root = make_cifar(tmp_path / "e", counts={"rocket": 0})
    with pytest.raises(DataError, match=r"cifar-100-python\.tar\.gz: class 'rocket' has no images"):
        load_image_set(DataConfig(dataset="fc100"), root, cache_dir=tmp_path / "c2", download=False)


def test_cifar_download_checked_against_the_md5(tmp_path, serve, monkeypatch):  # noqa: F811
    served = make_cifar(tmp_path / "served") / "cifar100"
    url = serve(served) + "/cifar-100-python.tar.gz"
    monkeypatch.setenv("MAMLPP_CIFAR100_URL", url)
    root, cache = tmp_path / "data", tmp_path / "cache"
    md5 = hashlib.md5((served / "cifar-100-python.tar.gz").read_bytes()).hexdigest()
    with pytest.raises(DataError, match=rf"cifar-100-python\.tar\.gz: MD5 {md5} differs from the published "
                                        rf"{cifar_mod.MD5}; the download is damaged"):
        load_image_set(DataConfig(dataset="cifar_fs"), root, cache_dir=cache)
    assert list((root / "cifar100").iterdir()) == [] and not cache.exists()  # no archive, no partial file, no cache
    monkeypatch.setattr(cifar_mod, "MD5", md5)  # the miniature stands in for the published archive
    data = load_image_set(DataConfig(dataset="cifar_fs"), root, cache_dir=cache)
    assert (root / "cifar100" / "cifar-100-python.tar.gz").read_bytes() == (served / "cifar-100-python.tar.gz").read_bytes()
    assert data.split_sizes()["train"]["classes"] == 64
    with pytest.raises(DataError, match=r"(?s)could not download .*HTTP Error 404.*put it at"):
        from mamlpp.data.download import download_cifar100

        download_cifar100(tmp_path / "other", url=serve(served) + "/missing.tar.gz")


# ---- tieredImageNet miniature ----------------------------------------------------------------------------
TIERED = {"train": 6, "val": 5, "test": 5}  # classes per split
TIERED_PER_CLASS = 7


def png(seed: int, size=84) -> np.ndarray:
    """A PNG-encoded image as cv2.imencode returns it: uint8 [n, 1]."""
    a = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8).reshape(-1, 1).copy()


def make_tiered(root: Path, *, as_bytes=False, protocol=2, bad=None, drop=(), per_class=None) -> Path:
    """ROOT/tiered_imagenet/{split}_images_png.pkl + {split}_labels.pkl, images in shuffled class order.
    bad: (split, position) whose PNG bytes are cut short; per_class: {(split, class index): count}."""
    base = Path(root) / "tiered_imagenet"
    base.mkdir(parents=True, exist_ok=True)
    for si, (split, n_classes) in enumerate(TIERED.items()):
        labels = np.concatenate([np.full((per_class or {}).get((split, c), TIERED_PER_CLASS), c)
                                 for c in range(n_classes)])
        labels = labels[np.random.default_rng(si).permutation(len(labels))]
        images = [png(1000 * si + i) for i in range(len(labels))]
        if bad and bad[0] == split:
            images[bad[1]] = images[bad[1]][:60]
        items = [im.tobytes() for im in images] if as_bytes else images
        names = [f"n{si}{c:07d}" for c in range(n_classes)]
        if f"{split}_images_png.pkl" not in drop:
            (base / f"{split}_images_png.pkl").write_bytes(pickle.dumps(items, protocol=protocol))
        if f"{split}_labels.pkl" not in drop:
            (base / f"{split}_labels.pkl").write_bytes(pickle.dumps(
                {"label_specific": labels, "label_general": labels // 3, "label_specific_str": names,
                 "label_general_str": [f"cat{k}" for k in range(n_classes // 3 + 1)]}, protocol=protocol))
    return Path(root)


def decode(a: np.ndarray) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(a.tobytes())).convert("RGB")).transpose(2, 0, 1)


@pytest.fixture(scope="module")
def tiered_root(tmp_path_factory) -> Path:
    return make_tiered(tmp_path_factory.mktemp("tiered"))


def test_tiered_pickles_load_class_major(tiered_root, cache):
    data = load_image_set(DataConfig(dataset="tiered_imagenet"), tiered_root, cache_dir=cache)
    assert data.images.shape == (16 * TIERED_PER_CLASS, 3, 84, 84) and data.norm == "imagenet"
    assert {s: v["classes"] for s, v in data.split_sizes().items()} == TIERED
    base = tiered_root / "tiered_imagenet"
    for si, split in enumerate(TIERED):
        labels = pickle.loads((base / f"{split}_labels.pkl").read_bytes())
        images = pickle.loads((base / f"{split}_images_png.pkl").read_bytes())
        for c, wnid in enumerate(labels["label_specific_str"]):
            k = data.class_names.index(f"{split}/{wnid}")
            expected = [decode(images[i]) for i in np.flatnonzero(labels["label_specific"] == c)]
            assert np.array_equal(data.images[data.offsets[k]:data.offsets[k + 1]], np.stack(expected))


@pytest.mark.parametrize("as_bytes,protocol", [(True, 2), (False, 0), (False, 5)])
def test_tiered_pickle_variants_decode_the_same(tiered_root, cache, tmp_path, as_bytes, protocol):
    """Items as uint8 arrays (cv2.imencode) or bytes, pickles of protocol 0 (Python 2's default) to 5."""
    ref = load_image_set(DataConfig(dataset="tiered_imagenet"), tiered_root, cache_dir=cache)
    other = make_tiered(tmp_path / "d", as_bytes=as_bytes, protocol=protocol)
    data = load_image_set(DataConfig(dataset="tiered_imagenet"), other, cache_dir=tmp_path / "c")
    assert data.class_names == ref.class_names and np.array_equal(data.images, ref.images)


def test_stream_list_hands_over_batches_not_the_list():
    items = [np.arange(i % 7, dtype=np.uint8) for i in range(2500)] + [[1, [2]], b"x"]
    for protocol in range(6):
        batches = []
        with io.BytesIO(pickle.dumps(items, protocol=protocol)) as f:
            assert stream_list(f, batches.append) == len(items)
        got = [x for b in batches for x in b]
        assert len(got) == len(items) and got[-2] == [1, [2]] and got[-1] == b"x"
        assert all(np.array_equal(a, b) for a, b in zip(got[:2500], items[:2500]))
        assert max(map(len, batches)) <= 1000  # pickle's APPENDS batches (protocol 0: one item each)
    with pytest.raises(pickle.UnpicklingError, match="expected a list at the top level, found dict"):
        stream_list(io.BytesIO(pickle.dumps({"a": [1]})), lambda items: None)


@pytest.mark.parametrize("protocol", [2, 4])
def test_stream_list_holds_one_batch_not_the_list(protocol):
    """The unpickler's memo would keep every item; after each batch what items cannot share is dropped,
    so the peak is about one batch of 1,000 items. A pickle that refers back to a dropped item fails."""
    import tracemalloc

    items = [np.full((4000, 1), i % 256, dtype=np.uint8) for i in range(6000)]  # 24 MB of payload
    blob = pickle.dumps(items, protocol=protocol)
    seen = []
    tracemalloc.start()
    try:
        stream_list(io.BytesIO(blob), lambda batch: seen.extend(int(a[0, 0]) for a in batch))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == [i % 256 for i in range(6000)]
    assert peak < 12e6, peak  # one batch is 4 MB; protocol 2 holds it twice (latin1 str, then bytes)
    x = np.arange(5)
    with pytest.raises(pickle.UnpicklingError, match="Memo value not found"):
        stream_list(io.BytesIO(pickle.dumps([x] + [np.zeros(1)] * 999 + [x], protocol=protocol)), lambda batch: None)


def test_tiered_folders_layout(tmp_path, cache):
    for si, (split, n) in enumerate(TIERED.items()):
        for c in range(n):
            write_images(tmp_path / "tiered_imagenet" / split / f"n{si}{c:07d}", 5, size=(84, 84), seed=10 * si + c,
                         ext=".png")
    data = load_image_set(DataConfig(dataset="tiered_imagenet"), tmp_path, cache_dir=cache)
    assert {s: v["images"] for s, v in data.split_sizes().items()} == {s: 5 * n for s, n in TIERED.items()}


def test_tiered_bad_png_bytes_refused_and_nothing_cached(tmp_path):
    root = make_tiered(tmp_path / "d", bad=("val", 3))
    with pytest.raises(DataError, match=r"val_images_png\.pkl: image 3: cannot decode image"):
        load_image_set(DataConfig(dataset="tiered_imagenet"), root, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").rglob("*"))


def test_tiered_truncated_or_mismatched_pickles(tmp_path):
    root = make_tiered(tmp_path / "d")
    path = root / "tiered_imagenet" / "test_images_png.pkl"
    full = path.read_bytes()
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match=r"test_images_png\.pkl: not a tieredImageNet image pickle, a list of PNG-encoded images"):
        load_image_set(DataConfig(dataset="tiered_imagenet"), root, cache_dir=tmp_path / "c")
    path.write_bytes(pickle.dumps(pickle.loads(full)[:-2], protocol=2))
    with pytest.raises(DataError, match=rf"test_images_png\.pkl: holds {5 * TIERED_PER_CLASS - 2} images, but its "
                                        rf"label file lists {5 * TIERED_PER_CLASS}"):
        load_image_set(DataConfig(dataset="tiered_imagenet"), root, cache_dir=tmp_path / "c")
    (root / "tiered_imagenet" / "val_labels.pkl").write_bytes(pickle.dumps({"labels": [0, 1]}))
    with pytest.raises(DataError, match=r"val_labels\.pkl: not a tieredImageNet label file, a dict with label_specific"):
        load_image_set(DataConfig(dataset="tiered_imagenet"), root, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").rglob("*.npy"))


def test_tiered_missing_split_file(tmp_path):
    root = make_tiered(tmp_path / "d", drop=("val_labels.pkl",))
    with pytest.raises(DataError, match=r"tiered_imagenet: has train_images_png\.pkl, .* but not val_labels\.pkl"):
        load_image_set(DataConfig(dataset="tiered_imagenet"), root, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=r"tieredImageNet not found in .*expected one of"):
        load_image_set(DataConfig(dataset="tiered_imagenet"), tmp_path / "none", cache_dir=tmp_path / "c")


def test_tiered_class_with_too_few_images(tmp_path):
    root = make_tiered(tmp_path / "d", per_class={("test", 2): 2})
    with pytest.raises(DataError, match=r"tiered_imagenet: split 'test', class test/n20000002 has 2 images, fewer "
                                        r"than data\.shots \+ data\.queries = 1\+2"):
        build_image_tasks(cifar_cfg("tiered_imagenet", queries=2), torch.device("cpu"), torch.float32, str(root),
                          cache_dir=tmp_path / "c")


def test_tiered_check_show_and_streamed_episodes(tiered_root, cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MAMLPP_CACHE", str(cache))
    assert main(["data", "check", "tiered-5w1s-protonet", "data.queries=2", "--data-dir", str(tiered_root)]) == 0
    out = capsys.readouterr().out
    assert "tiered_imagenet (split: Ren et al. 2018" in out and "stat:" in out and "val           5       35" in out
    assert main(["data", "show", "tiered-5w5s-mamlpp", "data.queries=2", "--out", str(tmp_path / "t.png"),
                 "--data-dir", str(tiered_root)]) == 0
    cfg = cifar_cfg("tiered_imagenet", shots=2, queries=2)
    resident = build_image_tasks(cfg, torch.device("cpu"), torch.float32, str(tiered_root), cache_dir=cache)
    monkeypatch.setenv("MAMLPP_DEVICE_IMAGES_GB", "0")  # as the full set would: above the limit, streamed
    streamed = build_image_tasks(cfg, torch.device("cpu"), torch.float32, str(tiered_root), cache_dir=cache)
    assert streamed.streamed and not resident.streamed
    for a, b in ((resident.train_batch(1, 3), streamed.train_batch(1, 3)),
                 (resident.eval_batch("test", 0, 4), streamed.eval_batch("test", 0, 4))):
        assert all(torch.equal(a[k], b[k]) for k in a)


# ---- CUB-200-2011 miniature --------------------------------------------------------------------------------
CUB_PER_CLASS = 6


def make_cub(root: Path, counts: dict[str, int] | None = None, skip=(), extra=()) -> Path:
    """ROOT/cub/CUB_200_2011/images/<NNN.Name>/*.jpg for the 200 classes (small JPEGs)."""
    images = Path(root) / "cub" / "CUB_200_2011" / "images"
    for k, name in enumerate(sorted(c for s in CUB_SPLIT.values() for c in s) + list(extra)):
        if name not in skip:
            write_images(images / name, (counts or {}).get(name, CUB_PER_CLASS), size=(10, 8), seed=k)
    return Path(root)


@pytest.fixture(scope="module")
def cub_root(tmp_path_factory) -> Path:
    return make_cub(tmp_path_factory.mktemp("cub"))


def test_cub_folders_with_the_100_50_50_split(cub_root, cache):
    data = load_image_set(DataConfig(dataset="cub"), cub_root, cache_dir=cache)
    assert data.images.shape == (200 * CUB_PER_CLASS, 3, 84, 84) and data.norm == "imagenet"
    assert {s: v["classes"] for s, v in data.split_sizes().items()} == {"train": 100, "val": 50, "test": 50}
    for s in ("train", "val", "test"):
        assert data.splits[s].names == CUB_SPLIT[s]
    name = CUB_SPLIT["val"][3]
    k = data.class_names.index(name)
    first = cub_root / "cub" / "CUB_200_2011" / "images" / name / "000.jpg"
    expected = np.asarray(Image.open(first).convert("RGB").resize((84, 84), Image.BICUBIC)).transpose(2, 0, 1)
    assert np.array_equal(data.images[data.offsets[k]], expected)


def test_cub_missing_or_extra_class_folder(tmp_path):
    root = make_cub(tmp_path / "d", skip=("104.American_Pipit",))
    with pytest.raises(DataError, match=r"images: has no folder 104\.American_Pipit \(a class of the CUB test split\)"):
        load_image_set(DataConfig(dataset="cub"), root, cache_dir=tmp_path / "c")
    (root / "cub" / "CUB_200_2011" / "images" / "201.Dodo").mkdir()
    write_images(root / "cub" / "CUB_200_2011" / "images" / "201.Dodo", 2)
    with pytest.raises(DataError, match=r"images: folder 201\.Dodo is not one of the 200 CUB-200-2011 classes"):
        load_image_set(DataConfig(dataset="cub"), root, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=r"CUB-200-2011 not found: expected its images/ folder .* at .*cub/CUB_200_2011/images"):
        load_image_set(DataConfig(dataset="cub"), tmp_path / "none", cache_dir=tmp_path / "c")


def test_cub_truncated_jpeg_and_too_few_images(tmp_path):
    root = make_cub(tmp_path / "d", counts={"050.Eared_Grebe": 2})
    with pytest.raises(DataError, match=r"cub: split 'val', class 050\.Eared_Grebe has 2 images, fewer than "
                                        r"data\.shots \+ data\.queries = 1\+3"):
        build_image_tasks(cifar_cfg("cub", queries=3), torch.device("cpu"), torch.float32, str(root),
                          cache_dir=tmp_path / "c")
    bad = root / "cub" / "CUB_200_2011" / "images" / "017.Cardinal" / "002.jpg"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(DataError, match=rf"{bad}: cannot decode image"):
        load_image_set(DataConfig(dataset="cub"), root, cache_dir=tmp_path / "c2")
    assert not (tmp_path / "c2").exists() or not any((tmp_path / "c2").rglob("*"))


def test_cub_check_and_show(cub_root, cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MAMLPP_CACHE", str(cache))
    assert main(["data", "check", "cub-5w5s-mamlpp", "data.queries=1", "--data-dir", str(cub_root)]) == 0
    out = capsys.readouterr().out
    assert "cub (split: Chen et al. 2019" in out and "train       100      600" in out and "listing:" in out
    assert main(["data", "show", "cub-5w1s-protonet", "data.queries=2", "data.train_queries=2",
                 "--out", str(tmp_path / "c.png"), "--data-dir", str(cub_root)]) == 0
    assert Image.open(tmp_path / "c.png").size[0] > 2 * 84


# ---- presets ---------------------------------------------------------------------------------------------
FEWSHOT_PRESETS = [f"{d}-5w{k}s-{m}" for d in ("cifarfs", "fc100", "tiered", "cub") for k in (1, 5)
                   for m in ("mamlpp", "protonet")]


@pytest.mark.parametrize("preset", FEWSHOT_PRESETS)
def test_fewshot_presets_train(preset, cifar_root, tiered_root, cub_root, cache, tmp_path, monkeypatch):
    monkeypatch.setenv("MAMLPP_CACHE", str(cache))
    root = {"cifarfs": cifar_root, "fc100": cifar_root, "tiered": tiered_root, "cub": cub_root}[preset.split("-")[0]]
    extra = ["data.train_ways=5"] if preset.startswith("tiered") and preset.endswith("protonet") else []  # 6 classes
    out = tmp_path / "run"
    assert main(["train", preset, "model.filters=4", "train.epochs=1", "train.iters_per_epoch=2", "train.eval_tasks=4",
                 "inner.steps=1", "outer.meta_batch=2", "data.queries=1", "data.train_queries=1", "train.device=cpu",
                 *extra, "--data-dir", str(root), "--out", str(out), "--no-progress"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    result = json.loads((out / "test.json").read_text())
    assert cfg["data"]["dataset"] == {"cifarfs": "cifar_fs", "fc100": "fc100", "tiered": "tiered_imagenet",
                                      "cub": "cub"}[preset.split("-")[0]]
    assert result["num_tasks"] == 4 and 0 <= result["accuracy"] <= 1
    assert json.loads((out / "summary.json").read_text())["iterations"] == 2


def test_bench_shapes_follow_the_data_set():
    from mamlpp.bench import SyntheticTasks
    from mamlpp.presets import get_preset

    for preset, shape in (("cifarfs-5w1s-mamlpp", (3, 32, 32)), ("fc100-5w5s-protonet", (3, 32, 32)),
                          ("tiered-5w1s-mamlpp", (3, 84, 84)), ("cub-5w5s-protonet", (3, 84, 84))):
        assert SyntheticTasks(get_preset(preset), torch.device("cpu"), torch.float32).input_shape == shape
