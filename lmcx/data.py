"""Datasets as uint8 tensors held on the device, batched and augmented there (airbench style).

One registry (`DATASETS`) maps a name to a loader returning uint8 arrays. Each dataset is decoded
once and cached on disk under `cache_dir()/datasets`, keyed by its source. A deterministic held-out
split of the training set (the same for every training seed) is reserved for temperature calibration.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from . import progress
from .config import DataConfig, SyntheticConfig, cache_dir, data_root
from .errors import LmcxError
from .io import atomic_path, shorten

CALIBRATION_SPLIT_SEED = 20240204  # fixed: every model of an experiment shares one calibration split
CALIB_SIZE_CAP = 5000  # default calibration split: this many images, at most a third of the training set

# data.normalization: standard. Per-channel mean and std of the training pixels in [0, 1], as published
# with the datasets (the values torchvision's examples and most LMC code use); validation.py names them.
STANDARD_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def default_calib_size(n_train: int) -> int:
    """`data.calib_size: null`: 5000 held-out images (MNIST, CIFAR: enough for a stable one-parameter
    fit), but at most a third of a small training set (digits: 479 of 1437)."""
    return min(CALIB_SIZE_CAP, n_train // 3)


@dataclass
class Arrays:
    """Raw decoded dataset: images uint8 [N, C, H, W], labels int64 [N]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


@dataclass
class Dataset:
    """Splits as uint8 image tensors and int64 labels, all on one device, plus normalisation stats."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_calib: torch.Tensor
    y_calib: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: torch.Tensor  # per channel, in [0, 1] pixel units: the training split's, or published (normalization)
    std: torch.Tensor

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in ("train", "calib", "test"):
            raise ValueError(f"unknown split {name!r}")
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")

    def to(self, device: torch.device | str) -> "Dataset":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return Dataset(**moved)

    def preprocessing(self, normalization: str) -> dict:
        """What a checkpoint records of how its inputs were made: the normalisation setting, the
        constants it gave, and the calibration split's size."""
        return {"normalization": normalization, "mean": [round(float(v), 6) for v in self.mean],
                "std": [round(float(v), 6) for v in self.std], "calib_size": len(self.y_calib)}

    def normalize(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float32, standardised per channel."""
        x = x_uint8.float().div_(255)
        return x.sub_(self.mean.view(1, -1, 1, 1)).div_(self.std.view(1, -1, 1, 1))


# ---------------------------------------------------------------------------------------------
# Loaders: each returns Arrays from a data root (never downloads unless cfg.download)


def _load_digits(cfg: DataConfig, root: Path) -> Arrays:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: the offline default

    digits = load_digits()
    x = np.clip(digits.images * 16, 0, 255).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))  # fixed 80/20 train/test split
    cut = int(0.8 * len(y))
    return Arrays(x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]], 10)


SYNTHETIC_MAX_VALUES = 10 ** 8  # pixels of all images (and prototypes): 0.8 GB of float64 while sampling


def check_synthetic_size(s: SyntheticConfig, source: str) -> None:
    """Refuse a synthetic dataset too large to generate (from a config or a checkpoint header), before any
    allocation, naming the setting."""
    if not (len(s.shape) == 3 and all(isinstance(d, int) and 0 < d <= 4096 for d in s.shape)):
        raise LmcxError(f"{source}.shape: must be [channels, height, width], each in [1, 4096], got "
                        f"{shorten(s.shape)}")
    pixels = math.prod(s.shape)
    for key, images in (("train_size + test_size", s.train_size + s.test_size), ("num_classes", s.num_classes)):
        if images * pixels > SYNTHETIC_MAX_VALUES:
            raise LmcxError(f"{source}.{key}: {images} images of shape {s.shape} are more than the "
                            f"{SYNTHETIC_MAX_VALUES:.0e} pixels a synthetic dataset may have; lower it")


def _load_synthetic(cfg: DataConfig, root: Path) -> Arrays:
    """Class-conditional Gaussian blobs around random prototype images: learnable, tiny, seeded."""
    s = cfg.synthetic
    check_synthetic_size(s, "data.synthetic")
    rng = np.random.default_rng(s.seed)
    prototypes = rng.uniform(40, 215, size=(s.num_classes, *s.shape))

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, s.num_classes, size=n)
        x = prototypes[y] + rng.normal(0, 40, size=(n, *s.shape))
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    x_train, y_train = sample(s.train_size)
    x_test, y_test = sample(s.test_size)
    return Arrays(x_train, y_train, x_test, y_test, s.num_classes)


def _torchvision_loader(cls_name: str, num_classes: int) -> Callable[[DataConfig, Path], Arrays]:
    def load(cfg: DataConfig, root: Path) -> Arrays:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        splits = []
        for train in (True, False):
            try:
                ds = cls(str(root), train=train, download=cfg.download)
            except RuntimeError as e:  # torchvision: "Dataset not found. You can use download=True ..."
                raise LmcxError(
                    f"{cfg.name} not found under {root} ({str(e).splitlines()[0]}); pass --data-root to "
                    f"where it is, or set data.download=true"
                ) from None
            except OSError as e:
                raise LmcxError(f"cannot read or download {cfg.name} under {root}: {e}") from None
            x = np.asarray(ds.data)
            x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # -> N, C, H, W
            splits += [np.ascontiguousarray(x, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64)]
        return Arrays(*splits, num_classes)

    return load


def _load_imagefolder(cfg: DataConfig, root: Path) -> Arrays:
    """Any `train/<class>/*` and `test/<class>/*` tree; class folders sorted by name give the labels."""
    from PIL import Image

    base = Path(cfg.path).expanduser() if cfg.path else root
    base = base if base.is_absolute() else root / base
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    classes: list[str] | None = None
    for split in ("train", "test"):
        folder = base / split
        if not folder.is_dir():
            raise LmcxError(f"imagefolder: {folder} is not a directory; data.path must point at a folder "
                            "holding train/<class>/ and test/<class>/")
        names = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if classes is None:
            classes = names
        elif names != classes:
            raise LmcxError(f"imagefolder: class folders of {folder} differ from those of train/")
        images, labels = [], []
        for label, cls in enumerate(names):
            for file in sorted((folder / cls).iterdir()):
                try:
                    with Image.open(file) as im:
                        images.append(np.asarray(im.convert("RGB")))
                except OSError:
                    raise LmcxError(f"imagefolder: {file} is not a readable image; remove it") from None
                labels.append(label)
        if not images:
            raise LmcxError(f"imagefolder: no images under {folder}")
        if len({im.shape for im in images}) != 1:
            raise LmcxError(f"imagefolder: images under {folder} differ in size; resize them to one size first")
        # Files are read class by class; a fixed shuffle makes every "first N images" subset (train_size,
        # evaluation subsets, activation-matching samples) hold all classes, as in MNIST's original order.
        order = np.random.default_rng(0).permutation(len(labels))
        splits[split] = (np.stack(images).transpose(0, 3, 1, 2)[order].copy(),
                         np.asarray(labels, dtype=np.int64)[order])
    return Arrays(*splits["train"], *splits["test"], len(classes or []))


DATASETS: dict[str, Callable[[DataConfig, Path], Arrays]] = {
    "digits": _load_digits,
    "synthetic": _load_synthetic,
    "mnist": _torchvision_loader("MNIST", 10),
    "fashion-mnist": _torchvision_loader("FashionMNIST", 10),
    "cifar10": _torchvision_loader("CIFAR10", 10),
    "cifar100": _torchvision_loader("CIFAR100", 100),
    "imagefolder": _load_imagefolder,
}
# (input shape, classes) of each dataset that has one: a checkpoint header claiming another does not fit.
SHAPES = {"digits": ((1, 8, 8), 10), "mnist": ((1, 28, 28), 10), "fashion-mnist": ((1, 28, 28), 10),
          "cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100)}
GENERATED = ("digits", "synthetic")  # cheap to make: not cached on disk
CACHE_FORMAT = 2  # bump when a loader's output changes, so stale caches are not reused (2: shuffled imagefolder)


def _cache_file(cfg: DataConfig, root: Path) -> Path:
    source = cfg.name
    if cfg.name == "imagefolder":
        base = Path(cfg.path).expanduser() if cfg.path else root
        source += ":" + str((base if base.is_absolute() else root / base).resolve())
    else:
        source += ":" + str(root.resolve())
    key = hashlib.sha1(f"{source}:v{CACHE_FORMAT}".encode()).hexdigest()[:16]
    return cache_dir() / "datasets" / f"{cfg.name}-{key}.npz"


def dataset_shape(cfg: DataConfig) -> tuple[tuple[int, ...], int] | None:
    """(input shape, classes) of the dataset `cfg` names, known without loading it (None for imagefolder)."""
    if cfg.name == "synthetic":
        return tuple(cfg.synthetic.shape), cfg.synthetic.num_classes
    return SHAPES.get(cfg.name)


def load_arrays(cfg: DataConfig) -> Arrays:
    """Decode a dataset once; later calls read the uint8 cache."""
    if cfg.name not in DATASETS:
        raise LmcxError(f"unknown dataset {cfg.name!r}; choose one of {', '.join(DATASETS)}")
    root = data_root(cfg.root)
    if cfg.name in GENERATED:
        return DATASETS[cfg.name](cfg, root)
    cache = _cache_file(cfg, root)
    if cache.exists():
        try:
            with np.load(cache) as f:
                return Arrays(f["x_train"], f["y_train"], f["x_test"], f["y_test"], int(f["num_classes"]))
        except (OSError, ValueError, KeyError):
            cache.unlink(missing_ok=True)  # a corrupt cache is rebuilt from the source
    arrays = DATASETS[cfg.name](cfg, root)
    try:
        with atomic_path(cache) as tmp, open(tmp, "wb") as f:
            np.savez(f, x_train=arrays.x_train, y_train=arrays.y_train, x_test=arrays.x_test,
                     y_test=arrays.y_test, num_classes=arrays.num_classes)
    except LmcxError:
        pass  # caching is an optimisation: an unwritable cache directory must not stop the run
    return arrays


def load_dataset(cfg: DataConfig, device: torch.device | str = "cpu") -> Dataset:
    """Arrays -> train / calibration / test tensors on `device`, standardised per `cfg.normalization`."""
    a = load_arrays(cfg)
    n = len(a.y_train)
    calib_size = default_calib_size(n) if cfg.calib_size is None else cfg.calib_size
    if calib_size >= n:
        raise LmcxError(f"data.calib_size={calib_size} leaves no training images ({n} in {cfg.name}); "
                        "lower it")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(CALIBRATION_SPLIT_SEED))
    calib_idx, train_idx = order[:calib_size], order[calib_size:]
    if cfg.train_size is not None:  # a random subset: datasets stored class by class stay balanced
        train_idx = train_idx[: cfg.train_size]
    train_idx = train_idx.sort().values
    x = torch.from_numpy(a.x_train)
    y = torch.from_numpy(a.y_train)
    x_train = x[train_idx]
    if cfg.normalization == "standard":
        if cfg.name not in STANDARD_STATS:
            raise LmcxError(f"data.normalization: no published mean/std for {cfg.name!r}; use train")
        mean, std = (torch.tensor(v) for v in STANDARD_STATS[cfg.name])
    else:
        pixels = x_train.float().div(255)
        mean = pixels.mean(dim=(0, 2, 3))
        std = pixels.std(dim=(0, 2, 3)).clamp_min(1e-3)
    ds = Dataset(cfg.name, x_train, y[train_idx], x[calib_idx], y[calib_idx],
                 torch.from_numpy(a.x_test), torch.from_numpy(a.y_test), a.num_classes, mean, std)
    return ds.to(device)


# ---------------------------------------------------------------------------------------------
# Batching and augmentation on the device


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without a host-device synchronisation: a plain `.to(cuda)` of pageable
    memory waits for the stream to drain; a pinned, non-blocking copy does not."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def augment(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding plus horizontal flip, for a whole uint8 batch at once.

    One `gather` of the padded images along their flattened pixels, the same index for every channel
    (7x faster on CPU than four-tensor advanced indexing, same result)."""
    n, c, h, w = x.shape
    dy = _to_device(torch.randint(0, 2 * padding + 1, (n,), generator=generator), x.device)
    dx = _to_device(torch.randint(0, 2 * padding + 1, (n,), generator=generator), x.device)
    flip = _to_device(torch.rand(n, generator=generator) < 0.5, x.device)
    padded = F.pad(x, (padding, padding, padding, padding))
    width = w + 2 * padding
    rows = dy[:, None] + torch.arange(h, device=x.device)  # [n, h] rows of the padded image
    cols = dx[:, None] + torch.arange(w, device=x.device)  # [n, w]
    cols = torch.where(flip[:, None], cols.flip(-1), cols)
    pixels = (rows[:, :, None] * width + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return padded.reshape(n, c, (h + 2 * padding) * width).gather(2, pixels).view(n, c, h, w)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Data order and augmentation of an epoch depend only on (seed, epoch): resuming needs no RNG state."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def train_batches(
    ds: Dataset, batch_size: int, generator: torch.Generator, augment_cfg: DataConfig | None = None,
    rank: int = 0, world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled training batches (normalised float inputs, labels). Under DDP each rank takes its
    slice of every global batch, so the global batch is the same as in a single process."""
    n = len(ds.y_train)
    order = _to_device(torch.randperm(n, generator=generator), ds.x_train.device)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size][rank::world_size]
        x = ds.x_train[idx]
        if augment_cfg is not None and augment_cfg.augment:
            x = augment(x, augment_cfg.crop_padding, generator)
        yield ds.normalize(x), ds.y_train[idx]


def eval_batches(ds: Dataset, x: torch.Tensor, y: torch.Tensor, batch_size: int
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(y), batch_size):
        progress.tick()  # evaluation owns no progress task: let the caller's show that it is alive
        yield ds.normalize(x[start:start + batch_size]), y[start:start + batch_size]
