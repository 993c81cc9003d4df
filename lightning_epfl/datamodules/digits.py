"""Digits datamodule
====================

scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, pixel values 0..16), split
deterministically and stratified into train/val/test. Nothing is downloaded.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset


def load_digits_arrays(scale: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Return the scikit-learn digits as ``(x, y)`` arrays.

    Args:
        scale: Divide pixels by 16 so that they lie in ``[0, 1]``.

    Returns:
        ``x`` of shape ``(1797, 64)`` (float32) and ``y`` of shape ``(1797,)`` (int64).
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = data.data.astype(np.float32)
    if scale:
        x = x / 16.0
    return x, data.target.astype(np.int64)


class DigitsDataModule(LightningDataModule):
    """scikit-learn digits, stratified deterministic split.

    The test split (``test_fraction`` of the 1797 images) is taken first. When ``train_size`` is given, the training
    set is a stratified subset of that many images and *all* remaining non-test images form the validation set
    (the grokking protocol: a small training set, a large held-out set); otherwise ``val_fraction`` of the whole
    set is used for validation and the rest for training.

    Args:
        batch_size: Training batch size; ``None`` or a value ``>= len(train)`` gives full-batch training.
        train_size: Number of training images, or ``None`` for everything that is not val/test.
        val_fraction: Fraction of all images used for validation when ``train_size`` is ``None``. In ``(0, 1)``.
        test_fraction: Fraction of all images held out for testing. In ``[0, 1)``.
        flatten: Return inputs of shape ``(64,)``; else images of shape ``(1, 8, 8)``.
        scale: Divide pixels by 16 (inputs in ``[0, 1]``).
        eval_batch_size: Batch size for val/test/predict loaders (default: everything in one batch).
        num_workers: DataLoader workers.
        seed: Seed of the split and of the training-set shuffle.

    Attributes:
        num_features: 64.
        num_classes: 10.

    Raises:
        MisconfigurationException: If a fraction is outside its range, ``train_size`` is not positive or exceeds
            the images available for training, or ``batch_size`` is not positive.
    """

    num_features = 64
    num_classes = 10

    def __init__(
        self,
        batch_size: int | None = 64,
        train_size: int | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        flatten: bool = True,
        scale: bool = True,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= test_fraction < 1.0:
            raise MisconfigurationException(f"`test_fraction` must be in [0, 1), got {test_fraction}.")
        if not 0.0 < val_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
            raise MisconfigurationException(
                f"`val_fraction` must be in (0, 1) with `val_fraction + test_fraction < 1`, got {val_fraction}."
            )
        n_pool = 1797 - math.ceil(test_fraction * 1797)
        if train_size is not None and not 0 < train_size < n_pool:
            raise MisconfigurationException(
                f"`train_size` must be in [1, {n_pool - 1}] (images left after the test split), got {train_size}."
            )
        if batch_size is not None and batch_size < 1:
            raise MisconfigurationException(f"`batch_size` must be >= 1 or None, got {batch_size}.")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.train_size = train_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.flatten = flatten
        self.scale = scale
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None
        self.test_dataset: TensorDataset | None = None

    def split_indices(self) -> dict[str, np.ndarray]:
        """Return the sorted image indices of the ``train``, ``val`` and ``test`` splits (deterministic by seed)."""
        from sklearn.model_selection import train_test_split

        _, y = load_digits_arrays(scale=False)
        idx = np.arange(len(y))
        if self.test_fraction > 0:
            pool, test = train_test_split(idx, test_size=self.test_fraction, stratify=y, random_state=self.seed)
        else:
            pool, test = idx, idx[:0]
        if self.train_size is not None:
            train, val = train_test_split(pool, train_size=self.train_size, stratify=y[pool], random_state=self.seed)
        else:
            n_val = int(round(self.val_fraction * len(y)))
            train, val = train_test_split(pool, test_size=n_val, stratify=y[pool], random_state=self.seed)
        return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}

    def _dataset(self, x: np.ndarray, y: np.ndarray, indices: np.ndarray) -> TensorDataset:
        inputs = torch.from_numpy(x[indices])
        if not self.flatten:
            inputs = inputs.reshape(-1, 1, 8, 8)
        return TensorDataset(inputs, torch.from_numpy(y[indices]))

    def setup(self, stage: str | None = None) -> None:
        x, y = load_digits_arrays(scale=self.scale)
        splits = self.split_indices()
        self.train_dataset = self._dataset(x, y, splits["train"])
        self.val_dataset = self._dataset(x, y, splits["val"])
        self.test_dataset = self._dataset(x, y, splits["test"])

    def _loader(self, dataset: TensorDataset, batch_size: int | None, shuffle: bool) -> DataLoader:
        size = len(dataset) if batch_size is None else min(batch_size, max(len(dataset), 1))
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=size, shuffle=shuffle, generator=generator, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        assert self.train_dataset is not None, "call setup() first"
        return self._loader(self.train_dataset, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        assert self.val_dataset is not None, "call setup() first"
        return self._loader(self.val_dataset, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        assert self.test_dataset is not None, "call setup() first"
        return self._loader(self.test_dataset, self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
