"""N-way K-shot episodes drawn from uint8 images held on the training device.

Every task is a pure function of (split key, task index): its own torch.Generator, seeded from a
hash of both, draws (in this order) a permutation of the split's classes (the first N are the
task's classes, their order is the label order), a rotation code per class (drawn even when
unused, so augmentation on/off does not change which images a task gets), and one uniform number
per image slot of each class, whose argsort picks K+T distinct images. The gather itself is one
tensor index on the device, plus one gather for rotations; no per-image Python work.

Where the images live: a set up to `device_copy_limit()` bytes (4 GiB; every set but tieredImageNet)
is copied to the training device once. A larger one stays in host memory as the cache's memory map
(the OS pages it in; nothing is copied whole), each batch's images are gathered there, and only
those travel, through pinned memory with an asynchronous copy on CUDA. Pinning the whole set
instead would lock its full size (16 GB for tieredImageNet) in RAM. Both paths give the same episodes.

Seeds: the training stream depends on train.seed; validation and test task sets do not (they are
the same fixed tasks for every run, like the reference's fixed val seed), and each split has its
own key, so no two splits share task seeds (unlike the reference, spec 10 #14).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..tasks import task_seed
from .common import NORM_STATS, DataError, ImageSet, _env

Episodes = dict[str, torch.Tensor]


@dataclass
class _SplitTable:
    classes: torch.Tensor  # int64 [n] global class ids
    start: torch.Tensor  # int64 [n] first image of each class
    count: torch.Tensor  # int64 [n] images per class
    rotation: torch.Tensor  # int64 [n] fixed rotation code per class (Vinyals), else 0
    width: int  # max(count)


DEVICE_COPY_MAX_BYTES = 4 << 30  # larger image sets stay in host memory (see the module docstring)


def device_copy_limit() -> int:
    """The largest image set (bytes) copied whole to an accelerator: $MAMLPP_DEVICE_IMAGES_GB, else 4 GiB."""
    env = _env("MAMLPP_DEVICE_IMAGES_GB")
    if env is None:
        return DEVICE_COPY_MAX_BYTES
    try:
        gb = float(env)
    except ValueError:
        gb = -1.0
    if not gb >= 0 or gb == float("inf"):
        raise DataError(f"MAMLPP_DEVICE_IMAGES_GB={env!r}: expected a size in GB >= 0 (0: never copy the set whole)")
    return int(gb * (1 << 30))


def host_images(images: np.ndarray) -> torch.Tensor:
    """uint8 images as a CPU tensor: the cache's memory map as it is (no copy)."""
    return torch.from_numpy(images if images.flags.writeable else np.array(images))


def images_to_device(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 images as a tensor on `device`. On the CPU the cache's memory map is used as it is
    (no copy); for an accelerator it is copied over in chunks, never as a whole host copy."""
    if device.type == "cpu":
        return host_images(images)
    out = torch.empty(images.shape, dtype=torch.uint8, device=device)
    step = max(1, (256 << 20) // max(1, int(np.prod(images.shape[1:]))))
    for i in range(0, len(images), step):
        out[i:i + step].copy_(torch.from_numpy(np.ascontiguousarray(images[i:i + step])))
    return out


class ImageTasks:
    """A TaskSource (see mamlpp.tasks) of N-way K-shot T-query image classification episodes."""

    kind = "classification"

    def __init__(self, data: ImageSet, ways: int, shots: int, queries: int, seed: int, augment: bool,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 train_ways: int = 0, train_queries: int = 0, device_max_bytes: int | None = None):
        self.data = data
        self.ways, self.shots, self.queries = ways, shots, queries
        # Training tasks may have more classes or queries than evaluation tasks (0: the same).
        self.train_ways, self.train_queries = train_ways or ways, train_queries or queries
        self.input_shape = tuple(int(d) for d in data.images.shape[1:])
        self.num_outputs = ways
        self.device, self.dtype = torch.device(device), dtype
        self.augment = augment  # random k*90 degree rotation per class, training tasks only
        self._check_sizes()
        counts = torch.as_tensor(data.counts, dtype=torch.int64)
        offsets = torch.as_tensor(data.offsets, dtype=torch.int64)
        self._tables = {}
        for name, split in data.splits.items():
            cls = torch.as_tensor(split.classes, dtype=torch.int64)
            self._tables[name] = _SplitTable(cls, offsets[cls], counts[cls],
                                             torch.as_tensor(split.rotations, dtype=torch.int64),
                                             int(counts[cls].max()))
        self.seed = seed  # drives the training stream only; validation and test tasks are fixed
        # Small sets live on the device; larger ones (device_max_bytes, default device_copy_limit())
        # stay in host memory and each batch's gathered images are copied over (self.streamed).
        limit = device_copy_limit() if device_max_bytes is None else device_max_bytes
        self.streamed = int(data.images.nbytes) > limit
        self.images = host_images(data.images) if self.streamed else images_to_device(data.images, self.device)
        c, h, w = self.input_shape
        self._perms = None
        if augment or any(s.rotations.any() for s in data.splits.values()):
            if h != w:
                raise DataError(f"{data.dataset}: rotation needs square images, these are {h}x{w}")
            # rot90 as a pixel permutation: rotated.flat = image.flat[perm[k]], same direction as np.rot90.
            grid = torch.arange(h * w).view(h, w)
            self._perms = torch.stack([torch.rot90(grid, k).reshape(-1) for k in range(4)]).to(self.device)
        self._scale = self._shift = None
        if data.norm != "none":
            mean, std = NORM_STATS.get(data.norm, ((0.0,) * c, (1.0,) * c))
            mean, std = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
            # (x/255 - mean)/std as x*scale + shift, applied in place
            self._scale = (1.0 / (255.0 * std)).to(dtype).view(c, 1, 1).to(self.device)
            self._shift = (-mean / std).to(dtype).view(c, 1, 1).to(self.device)

    def _shape(self, split: str) -> tuple[int, int]:
        """(ways, queries) of a split's tasks."""
        return (self.train_ways, self.train_queries) if split == "train" else (self.ways, self.queries)

    def _check_sizes(self) -> None:
        counts = self.data.counts
        for name, split in self.data.splits.items():
            n_way, queries = self._shape(name)
            prefix = "data.train_" if name == "train" and (n_way, queries) != (self.ways, self.queries) else "data."
            if len(split.classes) < n_way:
                raise DataError(f"{self.data.dataset}: split '{name}' has {len(split.classes)} classes, "
                                f"fewer than {prefix}ways={n_way}")
            small = np.flatnonzero(counts[split.classes] < self.shots + queries)
            if len(small):
                i = small[0]
                raise DataError(f"{self.data.dataset}: split '{name}', class {split.names[i]} has "
                                f"{counts[split.classes[i]]} images, fewer than data.shots + {prefix}queries = "
                                f"{self.shots}+{queries}" + (f" ({len(small)} such classes)" if len(small) > 1 else ""))

    def split_sizes(self) -> dict[str, dict[str, int]]:
        return self.data.split_sizes()

    def plan(self, split: str, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """What tasks `indices` of `split` contain (CPU tensors): global class ids [B, N] in label
        order, rotation codes [B, N] (k of np.rot90), image indices [B, N, K+T] (support first)."""
        if split not in self._tables:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(self._tables)}")
        (n, queries), t = self._shape(split), self._tables[split]
        m = self.shots + queries
        g = torch.Generator()
        cls, rot, u = [], [], []
        for i in indices:
            g.manual_seed(task_seed(self.seed, split, int(i)))
            cls.append(torch.randperm(len(t.classes), generator=g)[:n])
            rot.append(torch.randint(0, 4, (n,), generator=g))
            u.append(torch.rand(n, t.width, generator=g))
        cls, rot, u = torch.stack(cls), torch.stack(rot), torch.stack(u)
        # Slots past a class's image count sort last, so the first K+T positions are distinct images.
        u.masked_fill_(torch.arange(t.width) >= t.count[cls].unsqueeze(-1), 2.0)
        images = t.start[cls].unsqueeze(-1) + u.argsort(dim=-1)[..., :m]
        rotation = t.rotation[cls] + (rot if split == "train" and self.augment else 0)
        return {"classes": t.classes[cls], "rotations": rotation % 4, "images": images}

    def episodes(self, split: str, indices: Sequence[int]) -> Episodes:
        p = self.plan(split, indices)
        (n, queries), k = self._shape(split), self.shots
        rotations = p["rotations"] if self._perms is not None and bool(p["rotations"].any()) else None
        labels = torch.arange(n, device=self.device)
        return {
            "xs": self._gather(p["images"][..., :k], rotations),
            "ys": labels.repeat_interleave(k).repeat(len(indices), 1),
            "xq": self._gather(p["images"][..., k:], rotations),
            "yq": labels.repeat_interleave(queries).repeat(len(indices), 1),
        }

    def _gather(self, index: torch.Tensor, rotations: torch.Tensor | None) -> torch.Tensor:
        """Images index [B, N, M] (class-major) -> float [B, N*M, C, H, W], rotated and normalised.
        Support and query are gathered separately, and normalised in place, so a large evaluation
        chunk never holds more than its output plus the uint8 gather."""
        b, n, m = index.shape
        c, h, w = self.input_shape
        if self.streamed:  # gather in host memory, then copy only this batch to the device
            x = self.images.index_select(0, index.reshape(-1).cpu())  # uint8 [B*N*M, C, H, W]
            if self.device.type == "cuda":
                x = x.pin_memory().to(self.device, non_blocking=True)
            else:
                x = x.to(self.device)
        else:
            x = self.images.index_select(0, index.reshape(-1).to(self.device))  # uint8 [B*N*M, C, H, W]
        if rotations is not None:
            x = x.view(b * n, m, c, h * w)
            perm = self._perms[rotations.view(-1).to(self.device)]  # [B*N, H*W]
            x = x.gather(3, perm[:, None, None, :].expand(-1, m, c, -1))
        x = x.view(b, n * m, c, h, w).to(self.dtype)
        if self._scale is not None:
            x.mul_(self._scale).add_(self._shift)
        return x

    def train_batch(self, iteration: int, batch_size: int) -> Episodes:
        """Tasks iteration*batch_size .. (iteration+1)*batch_size-1 of the training stream."""
        start = iteration * batch_size
        return self.episodes("train", range(start, start + batch_size))

    def eval_batch(self, split: str, first: int, count: int) -> Episodes:
        """Tasks first .. first+count-1 of the fixed validation or test set."""
        if split not in ("val", "test"):
            raise ValueError(f"eval_batch: split must be 'val' or 'test', not {split!r}")
        return self.episodes(split, range(first, first + count))

    def to_uint8(self, x: torch.Tensor) -> np.ndarray:
        """Undo the normalisation: float [..., C, H, W] -> the cached uint8 values."""
        x = x.detach().to("cpu", torch.float64)
        if self._scale is not None:
            x = (x - self._shift.cpu().double()) / self._scale.cpu().double()
        return x.round().clamp(0, 255).to(torch.uint8).numpy()
