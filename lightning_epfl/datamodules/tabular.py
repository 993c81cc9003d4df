"""Bundled tabular data
=====================

scikit-learn's bundled data sets as arrays (no download).
"""

from __future__ import annotations

import numpy as np

__all__ = ["TABULAR_DATASETS", "load_sklearn_arrays"]

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
