"""Tests of d2lite.data on the real Fashion-MNIST (root from $D2LITE_DATA)."""

import math
import os
import shutil
import stat
import time
from pathlib import Path
from urllib.error import URLError

import matplotlib
import pytest
import torch
import torchvision
from torchvision import transforms

import d2lite.data as data
from d2lite.data import (
    LABELS,
    DataNotFoundError,
    TensorLoader,
    data_root,
    load_fashion_mnist,
    show_images,
    text_labels,
)

matplotlib.use("Agg")

ARCHIVES = [f"{split}-{kind}-ubyte.gz" for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]
REAL_RAW = data_root() / "FashionMNIST" / "raw"


def torchvision_test_set(transform=None):
    # _locate gives the directory torchvision can parse (the archives may have been extracted into a cache).
    return torchvision.datasets.FashionMNIST(str(data._locate(data_root())), train=False, transform=transform)


def epoch(loader):
    Xs, ys = zip(*loader)
    return torch.cat(Xs), torch.cat(ys)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, downloads impossible, and the per-user cache inside tmp_path/cache."""
    monkeypatch.setattr(data, "_online", lambda: False)
    monkeypatch.setattr(data, "download_url", lambda *a, **k: pytest.fail("download attempted"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_counts_shapes_dtypes_range():
    train_iter, test_iter = load_fashion_mnist(256)
    assert (train_iter.num_examples, test_iter.num_examples) == (60_000, 10_000)
    assert (len(train_iter), len(test_iter)) == (235, 40)
    sizes = []
    for X, y in test_iter:
        assert X.dtype == torch.float32 and y.dtype == torch.int64
        assert X.shape[1:] == (1, 28, 28) and y.shape == (len(X),)
        sizes.append(len(X))
    assert sizes == [256] * 39 + [10_000 - 39 * 256]  # last batch kept, smaller
    X, _ = epoch(train_iter)
    assert X.shape == (60_000, 1, 28, 28)
    assert X.min() == 0 and X.max() == 1


def test_label_balance():
    train_iter, test_iter = load_fashion_mnist(1000)
    assert epoch(train_iter)[1].bincount().tolist() == [6000] * 10
    assert epoch(test_iter)[1].bincount().tolist() == [1000] * 10


def test_test_order_matches_torchvision():
    ds = torchvision_test_set(transforms.ToTensor())
    _, test_iter = load_fashion_mnist(100)
    for _ in range(2):  # never shuffled, whatever the epoch
        X, y = epoch(test_iter)
        assert torch.equal(y, ds.targets)
    assert torch.equal(X[:20], torch.stack([ds[i][0] for i in range(20)]))


def test_decoded_once_per_process():
    a, _ = load_fashion_mnist(64)
    b, _ = load_fashion_mnist(128, seed=3)
    assert a.images.data_ptr() == b.images.data_ptr()


def test_shuffle_reproducible_and_reshuffled():
    first = lambda loader: next(iter(loader))[1]  # noqa: E731
    a, _ = load_fashion_mnist(500, seed=0)
    b, _ = load_fashion_mnist(500, seed=0)
    c, _ = load_fashion_mnist(500, seed=1)
    a0, a1, b0, b1, c0 = first(a), first(a), first(b), first(b), first(c)
    assert torch.equal(a0, b0) and torch.equal(a1, b1)
    assert not torch.equal(a0, a1)
    assert not torch.equal(a0, c0)
    assert a.epoch == 2


def test_epoch_is_permutation_with_pairs_kept():
    n = 1003
    images = (torch.arange(n) % 256).to(torch.uint8).reshape(n, 1, 1, 1)
    loader = TensorLoader(images, torch.arange(n), batch_size=10, shuffle=True, seed=5)
    it0, it1 = iter(loader), iter(loader)  # each iter() is a new epoch, even before consuming
    X0, y0 = epoch(it0)
    _, y1 = epoch(it1)
    assert torch.equal(y0.sort().values, torch.arange(n)) and not torch.equal(y0, torch.arange(n))
    assert not torch.equal(y0, y1)
    assert torch.equal((X0.flatten() * 255).round().long(), y0 % 256)


@pytest.mark.parametrize("size", [32, 20, (24, 40)])
def test_resize_matches_torchvision(size):
    # torchvision's Resize on PIL images goes through PIL's fixed-point bilinear filter; the uint8 tensor kernel
    # matches it exactly when upsampling and within one intensity level (1/255) when downsampling (antialias).
    ds = torchvision_test_set(transforms.Compose([transforms.Resize(size), transforms.ToTensor()]))
    _, test_iter = load_fashion_mnist(64, resize=size)
    X, _ = next(iter(test_iter))
    expected = torch.stack([ds[i][0] for i in range(64)])
    assert X.shape == expected.shape == (64, 1, *((size, size) if isinstance(size, int) else size))
    torch.testing.assert_close(X, expected, atol=1 / 255 + 1e-6, rtol=0)
    if size == 32:
        assert torch.equal(X, expected)


def test_resized_subset_is_the_subset_of_the_resized_set():
    """A subset is resized after it is drawn (only its images): the same images, to the bit."""
    from d2lite.data import _balanced_subset
    full, full_test = load_fashion_mnist(1000, resize=32, shuffle=False)
    part, part_test = load_fashion_mnist(1000, resize=32, subset=300, test_subset=200, shuffle=False)
    for whole, sub in ((full, part), (full_test, part_test)):
        idx = _balanced_subset(whole.labels, sub.num_examples, 0)  # seed 0 draws both subsets here
        assert torch.equal(sub.labels, whole.labels[idx])
        assert torch.equal(sub.images, whole.images[idx]) and sub.images.shape[2:] == (32, 32)


def test_normalize():
    _, plain = load_fashion_mnist(500)
    _, normed = load_fashion_mnist(500, normalize=(0.5, 0.5))
    X, Xn = next(iter(plain))[0], next(iter(normed))[0]
    torch.testing.assert_close(Xn, (X - 0.5) / 0.5)
    assert Xn.min() == -1 and Xn.max() == 1


def test_subset_balanced_and_seeded():
    a, ta = load_fashion_mnist(100, subset=1000, test_subset=250, seed=0)
    b, tb = load_fashion_mnist(100, subset=1000, test_subset=250, seed=1)
    a2, _ = load_fashion_mnist(100, subset=1000, seed=0)
    assert (a.num_examples, ta.num_examples, len(a), len(ta)) == (1000, 250, 10, 3)
    assert a.labels.bincount().tolist() == [100] * 10 and ta.labels.bincount().tolist() == [25] * 10
    assert torch.equal(a.images, a2.images)  # same seed, same subset
    assert not torch.equal(a.images, b.images)  # train subset follows the seed
    assert torch.equal(ta.images, tb.images)  # test subset does not
    assert epoch(a)[0].shape == (1000, 1, 28, 28)
    odd, _ = load_fashion_mnist(100, subset=1005)
    counts = odd.labels.bincount()
    assert counts.sum() == 1005 and counts.max() - counts.min() <= 1
    assert len(torch.unique(odd.images.flatten(1), dim=0)) == 1005  # distinct examples


@pytest.mark.parametrize("batch_size", [1000, 256, 7, 60_000, 100_000])
def test_len_is_number_of_batches(batch_size):
    train_iter, test_iter = load_fashion_mnist(batch_size, subset=None if batch_size != 7 else 100)
    for loader in (train_iter, test_iter):
        assert len(loader) == math.ceil(loader.num_examples / batch_size) == sum(1 for _ in loader)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(batch_size=0),
        dict(batch_size=-1),
        dict(batch_size=2.5),
        dict(batch_size=True),
        dict(subset=0),
        dict(subset=60_001),
        dict(test_subset=10_001),
        dict(resize=0),
        dict(resize=(32,)),
        dict(resize="32"),
        dict(normalize=(0.5, 0.0)),
        dict(normalize=0.5),
        dict(seed=-1),
    ],
)
def test_argument_errors(kwargs):
    with pytest.raises(ValueError):
        load_fashion_mnist(**({"batch_size": 32} | kwargs))


def test_text_labels():
    assert text_labels(torch.tensor([0, 9, 5])) == ["t-shirt", "ankle boot", "sandal"]
    assert text_labels(range(10)) == list(LABELS)
    assert LABELS[1:4] == ("trouser", "pullover", "dress") and LABELS[6:9] == ("shirt", "sneaker", "bag")
    for bad in ([10], [-1]):
        with pytest.raises(ValueError):
            text_labels(bad)


def test_show_images():
    import matplotlib.pyplot as plt

    _, test_iter = load_fashion_mnist(18)
    X, y = next(iter(test_iter))
    axes = show_images(X, 2, 9, titles=text_labels(y))
    assert len(axes) == 18 and axes[3].get_title() == text_labels(y[3:4])[0]
    assert axes[0].get_images()[0].get_array().shape == (28, 28)
    assert len(show_images(X[:1, 0], 1, 1)) == 1  # (N, H, W) input, 1x1 grid
    plt.close("all")


def test_data_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("D2LITE_DATA", str(tmp_path / "env"))
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data_root() == tmp_path / "env"
    monkeypatch.delenv("D2LITE_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_root() == tmp_path / "xdg" / "d2lite"


def check_message(err, directory):
    msg = str(err)
    assert all(name in msg for name in ARCHIVES) and str(directory) in msg and "D2LITE_DATA" in msg


def test_empty_root_fails_fast_and_clean(offline, tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    start = time.perf_counter()
    with pytest.raises(DataNotFoundError) as err:
        load_fashion_mnist(32, root=root)
    assert time.perf_counter() - start < 2
    assert isinstance(err.value, FileNotFoundError) and err.value.bad == ARCHIVES
    check_message(err.value, root / "FashionMNIST" / "raw")
    assert list(tmp_path.rglob("*")) == [root]


def test_failed_download_leaves_nothing(monkeypatch, tmp_path):
    # The "network" is up, but the download writes part of a file and then fails.
    def broken_download(url, directory, filename, md5):
        Path(directory, filename).write_bytes(b"partial")
        raise URLError("connection reset")

    monkeypatch.setattr(data, "download_url", broken_download)
    monkeypatch.setattr(data, "_online", lambda: True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(DataNotFoundError, match="connection reset") as err:
        load_fashion_mnist(32, root=tmp_path)
    check_message(err.value, tmp_path / "FashionMNIST" / "raw")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("present", [[], ARCHIVES[1:2]])
def test_download_fetches_only_missing_archives(monkeypatch, tmp_path, present):
    # Stand-in for the network: "downloads" copy the real archives.
    fetched = []

    def fake_download(url, directory, filename, md5):
        assert url.endswith(filename) and md5
        fetched.append(filename)
        shutil.copy(REAL_RAW / filename, Path(directory, filename))

    monkeypatch.setattr(data, "download_url", fake_download)
    monkeypatch.setattr(data, "_online", lambda: True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    for name in present:
        raw.mkdir(parents=True, exist_ok=True)
        shutil.copy(REAL_RAW / name, raw)
    _, test_iter = load_fashion_mnist(500, root=tmp_path / "root")
    assert fetched == [name for name in ARCHIVES if name not in present]
    assert test_iter.num_examples == 10_000
    extracted = [n.removesuffix(".gz") for n in ARCHIVES]
    assert sorted(p.name for p in raw.iterdir()) == sorted(ARCHIVES + extracted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


def test_real_network_check_is_fast():
    start = time.perf_counter()
    data._online()
    assert time.perf_counter() - start < 3


def test_corrupt_archive(offline, tmp_path):
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ARCHIVES[1:]:
        shutil.copy(REAL_RAW / name, raw / name)
    (raw / ARCHIVES[0]).write_bytes((REAL_RAW / ARCHIVES[0]).read_bytes()[:100_000])
    with pytest.raises(DataNotFoundError, match=ARCHIVES[0]) as err:
        load_fashion_mnist(32, root=tmp_path / "root")
    assert err.value.bad == [ARCHIVES[0]]
    check_message(err.value, raw)
    assert sorted(p.name for p in raw.iterdir()) == sorted(ARCHIVES)
    assert not (tmp_path / "cache").exists()


def test_read_only_root_extracts_into_cache(offline, tmp_path):
    root = tmp_path / "ro"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ARCHIVES:
        os.symlink(REAL_RAW / name, raw / name)
    read_only = stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
    for d in (raw, raw.parent, root):
        d.chmod(read_only)
    try:
        train_iter, test_iter = load_fashion_mnist(500, root=root)
        assert (train_iter.num_examples, test_iter.num_examples) == (60_000, 10_000)
        _, reference = load_fashion_mnist(500)
        assert torch.equal(test_iter.images, reference.images) and torch.equal(test_iter.labels, reference.labels)
        assert sorted(p.name for p in raw.iterdir()) == sorted(ARCHIVES)
        cached = tmp_path / "cache" / "d2lite" / "FashionMNIST" / "raw"
        assert sorted(p.name for p in cached.iterdir()) == sorted(n.removesuffix(".gz") for n in ARCHIVES)
    finally:
        for d in (root, raw.parent, raw):
            d.chmod(stat.S_IRWXU)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_device(device):
    train_iter, test_iter = load_fashion_mnist(256, device=device, normalize=(0.5, 0.5))
    for loader in (train_iter, test_iter):
        X, y = next(iter(loader))
        assert loader.images.device.type == X.device.type == y.device.type == device
