"""Image data for few-shot learning: Omniglot, Mini-ImageNet, CIFAR-FS, FC100, tieredImageNet, CUB-200-2011
and plain image folders.

Every data set is decoded once into a uint8 cache (see cache.py) and served as N-way K-shot
episodes by `ImageTasks` (see sampler.py). Entry point: `build_image_tasks`.

Where things live:
  data root:  --data-dir, then data.data_dir, then $MAMLPP_DATA, then $XDG_CACHE_HOME/mamlpp
              (~/.cache/mamlpp). Omniglot: ROOT/omniglot/images_{background,evaluation}.zip;
              Mini-ImageNet: ROOT/mini_imagenet/; CIFAR-FS and FC100: ROOT/cifar100/cifar-100-python.tar.gz;
              tieredImageNet: ROOT/tiered_imagenet/; CUB: ROOT/cub/CUB_200_2011/images/. For
              data.dataset=folder the directory given by --data-dir / data.data_dir is the image folder itself.
  caches:     $MAMLPP_CACHE, else $XDG_CACHE_HOME/mamlpp/cache; never inside the data root,
              which may be read-only.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .common import DataError, ImageSet, Split, resolve_cache_root, resolve_data_root
from .sampler import ImageTasks

__all__ = ["DataError", "ImageSet", "ImageTasks", "Split", "build_image_tasks", "build_tasks", "load_image_set",
           "resolve_cache_root", "resolve_data_root"]


def load_image_set(data_cfg, data_dir: str | os.PathLike | None = None, *, cache_dir=None, force: bool = False,
                   download: bool = True, csv_dir: str | os.PathLike | None = None) -> ImageSet:
    """The decoded data set that `data_cfg` (a mamlpp.config.DataConfig) names, building its cache
    when missing (force=True: rebuild it). download=False: never fetch a missing archive
    (Omniglot, CIFAR-100), fail instead. csv_dir: an extra place to look for Mini-ImageNet's
    train/val/test.csv."""
    cache_root = resolve_cache_root(cache_dir)
    dataset = data_cfg.dataset
    if dataset == "folder":
        folder = data_dir or data_cfg.data_dir
        if not folder:
            raise DataError("data.dataset=folder needs the image folder: pass --data-dir ROOT or data.data_dir=ROOT")
        from .folder import load_folder

        return load_folder(data_cfg, Path(folder).expanduser(), cache_root, force)
    root = resolve_data_root(data_dir, data_cfg.data_dir)
    if dataset == "omniglot":
        from .download import download_omniglot
        from .omniglot import load_omniglot

        return load_omniglot(data_cfg, root, cache_root, force, fetch=download_omniglot if download else None)
    if dataset == "mini_imagenet":
        from .common import _env
        from .mini_imagenet import load_mini_imagenet

        # The split CSVs may sit in the shared data root even when the images are elsewhere.
        csv_dirs = [Path(d) for d in (csv_dir,) if d]
        if _env("MAMLPP_DATA"):
            csv_dirs.append(Path(_env("MAMLPP_DATA")) / "mini_imagenet" / "splits" / "ravi")
        return load_mini_imagenet(data_cfg, root, cache_root, force, csv_dirs)
    if dataset in ("cifar_fs", "fc100"):
        from .download import download_cifar100

        fetch = download_cifar100 if download else None
        if dataset == "cifar_fs":
            from .cifar_fs import load_cifar_fs

            return load_cifar_fs(data_cfg, root, cache_root, force, fetch)
        from .fc100 import load_fc100

        return load_fc100(data_cfg, root, cache_root, force, fetch)
    if dataset == "tiered_imagenet":
        from .tiered_imagenet import load_tiered_imagenet

        return load_tiered_imagenet(data_cfg, root, cache_root, force)
    if dataset == "cub":
        from .cub import load_cub

        return load_cub(data_cfg, root, cache_root, force)
    raise DataError(f"data.dataset={dataset} is not an image data set")


def build_tasks(cfg, device: torch.device, data_dir: str | None = None):
    """The task source (mamlpp.tasks.TaskSource) that cfg.data names, with tensors on `device`."""
    dtype = getattr(torch, cfg.train.dtype)
    if cfg.data.dataset == "sinusoid":
        from ..sinusoid import SinusoidTasks

        return SinusoidTasks(cfg.data, seed=cfg.train.seed, device=device, dtype=dtype)
    return build_image_tasks(cfg, device=device, dtype=dtype, data_dir=data_dir)


def build_image_tasks(cfg, device: torch.device, dtype: torch.dtype, data_dir: str | None = None, *,
                      cache_dir=None, csv_dir=None) -> ImageTasks:
    """The TaskSource for an image data set (cfg: mamlpp.config.Config). Checks N, K and T against
    every split before returning. Training tasks are rotated by random multiples of 90 degrees per
    class iff data.augment and the data set is Omniglot with the reference split (the Vinyals
    split already has rotated characters as classes of their own)."""
    data = load_image_set(cfg.data, data_dir, cache_dir=cache_dir, csv_dir=csv_dir)
    augment = bool(cfg.data.augment and data.dataset == "omniglot" and cfg.data.split == "reference")
    return ImageTasks(data, cfg.data.ways, cfg.data.shots, cfg.data.queries, seed=cfg.train.seed,
                      augment=augment, device=device, dtype=dtype,
                      train_ways=cfg.data.train_ways, train_queries=cfg.data.train_queries)
