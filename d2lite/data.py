"""Fashion-MNIST as in-memory tensors: find, verify and extract the archives, then cut (shuffled) mini-batches."""

from __future__ import annotations

import gzip
import math
import numbers
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.parse import urlparse

import numpy as np
import torch
from torch import Tensor
from torchvision.datasets import FashionMNIST
from torchvision.datasets.utils import check_integrity, download_url
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "LABELS",
    "DataNotFoundError",
    "TensorLoader",
    "data_root",
    "load_fashion_mnist",
    "show_images",
    "text_labels",
]

LABELS = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")

_ARCHIVES: dict[str, str] = dict(FashionMNIST.resources)  # "train-images-idx3-ubyte.gz" -> md5
_COUNTS = {"train": 60_000, "t10k": 10_000}
# Sizes of the extracted IDX files (16-byte image header + 28*28 pixels each, 8-byte label header + 1 byte each).
_EXTRACTED_SIZES = {f"{s}-images-idx3-ubyte": 16 + n * 784 for s, n in _COUNTS.items()} | {
    f"{s}-labels-idx1-ubyte": 8 + n for s, n in _COUNTS.items()
}


class DataNotFoundError(FileNotFoundError):
    """The Fashion-MNIST archives are missing or corrupt and could not be downloaded."""

    def __init__(self, directory: Path, bad: Sequence[str], reason: str) -> None:
        self.directory, self.bad = directory, list(bad)
        super().__init__(
            f"Fashion-MNIST is not usable in {directory}: missing or corrupt (md5 mismatch): "
            f"{', '.join(bad)} ({reason}).\n"
            f"That directory must hold the four official archives {', '.join(_ARCHIVES)}. "
            "To use an offline copy, set the environment variable D2LITE_DATA (or pass root=...) "
            "to the directory that contains FashionMNIST/raw/ with those files."
        )


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "d2lite").expanduser().resolve()


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Directory expected to contain FashionMNIST/raw/: `root`, else $D2LITE_DATA, else the per-user
    cache dir ($XDG_CACHE_HOME/d2lite or ~/.cache/d2lite). Returned absolute."""
    return Path(root or os.environ.get("D2LITE_DATA") or _cache_dir()).expanduser().resolve()


def _writable(path: Path) -> bool:
    """Whether files can be created in `path` (or in its nearest existing ancestor, which would hold it).

    Mode bits are checked as well, so a directory marked read-only is left alone even when running as root."""
    while not path.exists():
        path = path.parent
    return os.access(path, os.W_OK) and bool(path.stat().st_mode & 0o222)


def _online(timeout: float = 2.0) -> bool:
    """Whether the mirror accepts a connection within `timeout` seconds, DNS lookup included (hence the
    thread: getaddrinfo has no timeout), so that offline machines fail fast instead of hanging in urllib."""
    reachable: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((urlparse(FashionMNIST.mirrors[0]).hostname, 80), timeout=timeout).close()
            reachable.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(reachable)


def _extracted(raw: Path) -> bool:
    return all((raw / f).is_file() and (raw / f).stat().st_size == size for f, size in _EXTRACTED_SIZES.items())


def _download(raw: Path, names: list[str]) -> None:
    """Download `names` (md5-checked by torchvision) into `raw` through a temp dir, so failures leave nothing."""
    parent = raw
    while not parent.exists():
        parent = parent.parent
    with tempfile.TemporaryDirectory(dir=parent, prefix=".d2lite-download-") as tmp:
        for name in names:
            download_url(FashionMNIST.mirrors[0] + name, tmp, name, _ARCHIVES[name])
        raw.mkdir(parents=True, exist_ok=True)
        for name in names:
            os.replace(Path(tmp, name), raw / name)


def _extract(src: Path, dst: Path) -> None:
    """Decompress the (verified) archives in `src` into `dst`, each via a temp file and os.replace."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in _ARCHIVES:
        fd, tmp = tempfile.mkstemp(dir=dst, prefix=".d2lite-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out, gzip.open(src / name) as archive:
                shutil.copyfileobj(archive, out, 1 << 20)
            os.chmod(tmp, 0o644)  # mkstemp creates 0o600; the data is public
            os.replace(tmp, dst / name.removesuffix(".gz"))
        except BaseException:
            os.unlink(tmp)
            raise


def _locate(root: Path) -> Path:
    """Return a torchvision root whose FashionMNIST/raw/ holds the four extracted files, fetching/extracting
    them from the archives in `root` (into `root` if writable, else into the per-user cache)."""
    raw = root / "FashionMNIST" / "raw"
    if _extracted(raw):
        return root
    bad = [name for name, md5 in _ARCHIVES.items() if not check_integrity(str(raw / name), md5)]
    if bad:
        if not _writable(raw):
            raise DataNotFoundError(raw, bad, "directory is read-only, cannot download")
        if not _online():
            raise DataNotFoundError(raw, bad, "no network connection to download them")
        try:
            _download(raw, bad)
        except (URLError, OSError, RuntimeError) as e:
            raise DataNotFoundError(raw, bad, f"download failed: {e}") from e
    target = root if _writable(raw) else _cache_dir()
    if not _extracted(target / "FashionMNIST" / "raw"):
        _extract(raw, target / "FashionMNIST" / "raw")
    return target


@lru_cache(maxsize=4)
def _load_split(root: Path, train: bool, size: tuple[int, int] | None) -> tuple[Tensor, Tensor]:
    """Decoded split, shared between loaders (never modify in place): uint8 (N, 1, H, W), int64 (N,)."""
    if size is not None:
        images, labels = _load_split(root, train, None)
        return _resize(images, size), labels
    ds = FashionMNIST(str(_locate(root)), train=train)
    return ds.data.unsqueeze(1), ds.targets


def _resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 (N, 1, H, W) images resized one by one (bilinear, antialiased), in chunks of 8192 to
    bound the kernel's temporary memory."""
    return torch.cat([TF.resize(c, list(size), antialias=True) for c in images.split(8192)])


def _balanced_subset(labels: Tensor, n: int, seed: int) -> Tensor:
    """Sorted indices of a random (seeded) subset of n examples whose class counts differ by at most one."""
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    onehot = torch.nn.functional.one_hot(labels[perm], len(LABELS))
    rank = (onehot.cumsum(0) * onehot).sum(1)  # 1-based position of each example within its class, in perm order
    # Ordering by (rank, class) deals the classes round-robin, so any prefix is balanced.
    return perm[(rank * len(LABELS) + labels[perm]).argsort()[:n]].sort().values


class TensorLoader:
    """Iterator over mini-batches of an in-memory uint8 image tensor.

    Each `iter()` starts a new epoch. With shuffle=True the epoch's order is a permutation drawn from a
    torch.Generator seeded with (seed, epoch): loaders built with the same seed yield the same sequence of
    epochs, while different seeds and consecutive epochs differ. Without shuffling, the order is the stored one.

    Batches: X float32 of shape (B, 1, H, W) in [0, 1] (or normalized as (X - mean) / std), y int64 of shape (B,),
    both on the device of `images`; the last batch may be smaller.

    Attributes:
        images: uint8 (N, 1, H, W); labels: int64 (N,); num_examples: N;
        epoch: number of epochs started so far (the next `iter()` uses this value).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        normalize: tuple[float, float] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.images, self.labels = images.to(device), labels.to(device)
        self.batch_size, self.shuffle, self.seed, self.normalize = batch_size, shuffle, seed, normalize
        self.num_examples = len(labels)
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(self.num_examples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = None
        if self.shuffle:
            # torch's CPU generator keeps only 32 bits of a seed, so (seed, epoch) is hashed into 32 bits.
            epoch_seed = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]
            gen = torch.Generator().manual_seed(int(epoch_seed))
            order = torch.randperm(self.num_examples, generator=gen).to(self.images.device)
        self.epoch += 1
        return self._batches(order)

    def _batches(self, order: Tensor | None) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, self.num_examples, self.batch_size):
            stop = start + self.batch_size
            idx = slice(start, stop) if order is None else order[start:stop]
            X = self.images[idx].float().div_(255)
            if self.normalize is not None:
                X.sub_(self.normalize[0]).div_(self.normalize[1])
            yield X, self.labels[idx]


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo or (hi and value > hi):
        raise ValueError(f"{name} must be an int in [{lo}, {hi or 'inf'}], got {value!r}")


def _check_args(
    batch_size: int, resize: Any, normalize: Any, subset: Any, test_subset: Any, seed: Any
) -> tuple[tuple[int, int] | None, tuple[float, float] | None]:
    """Validate load_fashion_mnist's arguments; return resize as (h, w) and normalize as floats."""
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, 0, 2**32 - 1)
    if subset is not None:
        _check_int("subset", subset, 1, _COUNTS["train"])
    if test_subset is not None:
        _check_int("test_subset", test_subset, 1, _COUNTS["t10k"])
    size = (resize, resize) if isinstance(resize, numbers.Integral) else resize
    if size is not None:
        if not (isinstance(size, Sequence) and len(size) == 2):
            raise ValueError(f"resize must be an int or a pair (h, w), got {resize!r}")
        for s in size:
            _check_int("resize", s, 1)
        size = None if tuple(size) == (28, 28) else (int(size[0]), int(size[1]))
    if normalize is not None:
        if not (isinstance(normalize, Sequence) and len(normalize) == 2 and float(normalize[1]) > 0):
            raise ValueError(f"normalize must be a pair (mean, std) with std > 0, got {normalize!r}")
        normalize = (float(normalize[0]), float(normalize[1]))
    return size, normalize


def load_fashion_mnist(
    batch_size: int,
    resize: int | tuple[int, int] | None = None,
    root: str | os.PathLike[str] | None = None,
    *,
    normalize: tuple[float, float] | None = None,
    subset: int | None = None,
    test_subset: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    shuffle: bool = True,
) -> tuple[TensorLoader, TensorLoader]:
    """Fashion-MNIST as (train_iter, test_iter), drop-in for d2l's load_data_fashion_mnist.

    Inputs:
    - batch_size: examples per batch (the last batch of an epoch may be smaller).
    - resize: int or (h, w); resizes the whole dataset once (bilinear, antialiased, on uint8, like
      torchvision's Resize on PIL images), e.g. 32 for LeNet-5.
    - root: directory holding FashionMNIST/raw/ (see data_root). It may be read-only and hold only the four
      .gz archives: they are md5-checked and extracted into it if writable, else into the per-user cache.
      Missing archives are downloaded into a writable root when the network is reachable.
    - normalize: (mean, std) applied to every batch after scaling to [0, 1], e.g. (0.5, 0.5).
    - subset: use n training examples: a random subset drawn with `seed`, class-balanced (class counts
      differ by at most one), kept in dataset order.
    - test_subset: the same for the test set, but always drawn with seed 0, so that evaluations on it are
      comparable across training seeds.
    - seed: seeds the per-epoch shuffling (and `subset`).
    - device: where the whole uint8 dataset is kept and batches are produced.
    - shuffle: reshuffle the training set every epoch (the test set is never shuffled).

    Returns TensorLoaders yielding X: images of shape (B, 1, H, W), float32, and y: labels of shape (B,), int64.
    Raises DataNotFoundError if the data is missing/corrupt and cannot be downloaded, ValueError on bad arguments.
    """
    size, normalize = _check_args(batch_size, resize, normalize, subset, test_subset, seed)
    root_path = data_root(root)
    loaders = []
    for train, n, subset_seed in ((True, subset, seed), (False, test_subset, 0)):
        if n is None:
            images, labels = _load_split(root_path, train, size)
        else:  # subset first: resizing only the examples kept
            images, labels = _load_split(root_path, train, None)
            idx = _balanced_subset(labels, n, subset_seed)
            images, labels = images[idx], labels[idx]
            if size is not None:
                images = _resize(images, size)
        loaders.append(
            TensorLoader(
                images, labels, batch_size, shuffle=shuffle and train, seed=seed, normalize=normalize, device=device
            )
        )
    return loaders[0], loaders[1]


def text_labels(labels: Tensor | Iterable[int]) -> list[str]:
    """Fashion-MNIST class names for labels: int64 tensor of any shape (flattened) or an iterable of ints."""
    ids = [int(i) for i in (labels.reshape(-1).tolist() if torch.is_tensor(labels) else labels)]
    if any(not 0 <= i < len(LABELS) for i in ids):
        raise ValueError(f"labels must be in [0, {len(LABELS) - 1}], got {ids}")
    return [LABELS[i] for i in ids]


def show_images(
    imgs: Tensor | Sequence[Any],
    num_rows: int,
    num_cols: int,
    titles: Sequence[str] | None = None,
    scale: float = 1.5,
) -> Any:
    """Plot images in a num_rows x num_cols grid, as d2l.show_images.

    imgs: tensor of shape (N, H, W) or (N, 1, H, W) (any device), or a sequence of arrays accepted by imshow.
    Returns the flat numpy array of matplotlib Axes (num_rows * num_cols,).
    """
    import matplotlib.pyplot as plt

    _, axes = plt.subplots(num_rows, num_cols, figsize=(num_cols * scale, num_rows * scale), squeeze=False)
    axes = axes.flatten()
    for i, (ax, img) in enumerate(zip(axes, imgs)):
        ax.imshow(img.detach().cpu().squeeze(0).numpy() if torch.is_tensor(img) else img)
        ax.axes.get_xaxis().set_visible(False)
        ax.axes.get_yaxis().set_visible(False)
        if titles:
            ax.set_title(titles[i])
    return axes
