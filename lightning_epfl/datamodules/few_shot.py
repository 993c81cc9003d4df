"""Few-shot task datamodules
==========================

Task distributions for meta-learning: every training batch is a :class:`TaskBatch` of ``T`` tasks with support and
query sets, generated from a seeded stream whose position (``state_dict``) survives checkpoints, so a resumed run
sees the same tasks as an uninterrupted one.

- :class:`SinusoidTasks`: few-shot sinusoid regression (Finn et al., 2017, arXiv:1703.03400, Sec. 5.1).
- :class:`LinearRegressionTasks`: a fixed family of linear-regression tasks with closed-form MAML/FO-MAML solutions
  (the synthetic setting of Chayti & Jaggi, arXiv:2409.03682, as reconstructed in the design notes).
- :class:`FewShotDigits`: ``N``-way ``K``-shot classification over scikit-learn's bundled digits, labels permuted per
  task.

Batches are produced whole by the dataset (``DataLoader(batch_size=None)``); task ``j`` of the stream is drawn with
``numpy.random.default_rng([seed, 0, j])``, so its content depends only on the seed and its position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_epfl.datamodules.streams import ResumableLoader, StreamPosition
from lightning_epfl.functional.meta import quadratic_fomaml_fixed_point, quadratic_maml_solution
from lightning_epfl.seeding import loader_generator, numpy_generator

__all__ = ["FewShotDigits", "FewShotTasksBase", "LinearRegressionTasks", "SinusoidTasks", "TaskBatch"]


@dataclass
class TaskBatch:
    """A batch of ``T`` few-shot tasks.

    Attributes:
        support_x: ``(T, S, ...)`` support inputs.
        support_y: ``(T, S, ...)`` support targets.
        query_x: ``(T, Q, ...)`` query inputs.
        query_y: ``(T, Q, ...)`` query targets.
        index: Position of the batch in the training stream (``-1`` for validation/monitoring batches).
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    index: int = -1

    @property
    def num_tasks(self) -> int:
        """``T``."""
        return int(self.support_x.shape[0])

    def to(self, device: torch.device | str) -> TaskBatch:
        """Move all tensors to ``device``."""
        return TaskBatch(
            self.support_x.to(device), self.support_y.to(device), self.query_x.to(device), self.query_y.to(device),
            self.index,
        )  # fmt: skip

    def slice(self, start: int, stop: int) -> TaskBatch:
        """Tasks ``start:stop``."""
        return TaskBatch(
            self.support_x[start:stop],
            self.support_y[start:stop],
            self.query_x[start:stop],
            self.query_y[start:stop],
            self.index,
        )


class _FixedBatches(Dataset):
    def __init__(self, batch: TaskBatch, batch_size: int) -> None:
        self.batch = batch
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(self.batch.num_tasks / self.batch_size)

    def __getitem__(self, i: int) -> TaskBatch:
        return self.batch.slice(i * self.batch_size, (i + 1) * self.batch_size)


class FewShotTasksBase(LightningDataModule):
    """Shared stream logic: subclasses implement :meth:`sample_tasks`.

    Args:
        tasks_per_batch: Tasks ``T`` per training batch (``>= 1``).
        batches_per_epoch: Training batches per epoch (``>= 1``); the stream itself is endless.
        val_tasks: Number of fixed validation tasks (``>= 1``).
        val_batch_size: Validation tasks per batch (``>= 1``).
        seed: Seed of the task stream, the validation tasks and the monitoring batch.

    Raises:
        ValueError: If a count is below 1.
    """

    def __init__(
        self, tasks_per_batch: int, batches_per_epoch: int, val_tasks: int, val_batch_size: int, seed: int
    ) -> None:
        super().__init__()
        for name, value in (
            ("tasks_per_batch", tasks_per_batch),
            ("batches_per_epoch", batches_per_epoch),
            ("val_tasks", val_tasks),
            ("val_batch_size", val_batch_size),
        ):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}.")
        self.tasks_per_batch = tasks_per_batch
        self.batches_per_epoch = batches_per_epoch
        self.val_tasks = val_tasks
        self.val_batch_size = val_batch_size
        self.seed = seed
        self._position = StreamPosition(0)
        self._val: TaskBatch | None = None

    def sample_tasks(self, num_tasks: int, rng: np.random.Generator, split: str) -> TaskBatch:
        """Draw ``num_tasks`` tasks from ``split`` (``"train"`` or ``"val"``) with ``rng``."""
        raise NotImplementedError

    def train_batch(self, index: int, rank: int = 0) -> TaskBatch:
        """The ``index``-th batch of the training stream of process ``rank`` (a pure function of the three).

        Under data parallelism every rank draws its own tasks (the meta-gradients are then averaged over ranks);
        rank 0's stream is the single-process stream.
        """
        key = [self.seed, 0, index] if rank == 0 else [self.seed, 0, index, rank]
        batch = self.sample_tasks(self.tasks_per_batch, numpy_generator(*key), "train")
        batch.index = index
        return batch

    def _rank(self) -> int:
        trainer = self.trainer
        return int(trainer.global_rank) if trainer is not None else 0

    def val_batch(self) -> TaskBatch:
        """All fixed validation tasks as one batch."""
        if self._val is None:
            self._val = self.sample_tasks(self.val_tasks, numpy_generator(self.seed, 1), "val")
        return self._val

    def monitor_batch(self, num_tasks: int) -> TaskBatch:
        """A fixed batch of ``num_tasks`` training-distribution tasks, for monitoring the exact meta-gradient."""
        return self.sample_tasks(num_tasks, numpy_generator(self.seed, 2), "train")

    @property
    def cursor(self) -> int:
        """Index of the next training batch of the stream."""
        return self._position.value

    @override
    def train_dataloader(self) -> DataLoader:
        rank = self._rank()
        return ResumableLoader(lambda k: self.train_batch(k, rank), self.batches_per_epoch, self._position, self.seed)

    @override
    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            _FixedBatches(self.val_batch(), self.val_batch_size), batch_size=None, generator=loader_generator(self.seed)
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "seed": self.seed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._position.value = int(state_dict["cursor"])


def _as_tensor(a: np.ndarray, dtype: torch.dtype) -> Tensor:
    return torch.as_tensor(a).to(dtype)


class SinusoidTasks(FewShotTasksBase):
    """Few-shot sinusoid regression ``y = A sin(x - phase)`` (arXiv:1703.03400, Sec. 5.1).

    Amplitude ``A ~ U[amplitude]``, phase ``~ U[phase]``, inputs ``x ~ U[x_range]``; inputs and targets have shape
    ``(T, n, 1)``. Validation: ``val_tasks`` fixed tasks with ``k_shot`` support and ``val_query_points`` query points.

    Args:
        k_shot: Support points per task (``>= 1``).
        q_queries: Query points per training task (``>= 1``).
        tasks_per_batch: Tasks per meta-batch.
        batches_per_epoch: Training batches per epoch.
        val_tasks: Validation tasks (default 500).
        val_query_points: Query points per validation task (default 100).
        val_batch_size: Validation tasks per batch.
        amplitude: ``(low, high)`` of the amplitude, ``0 < low <= high``.
        phase: ``(low, high)`` of the phase in radians.
        x_range: ``(low, high)`` of the inputs.
        seed: Stream seed.

    Raises:
        ValueError: If a count is below 1 or a range is empty.
    """

    def __init__(
        self,
        k_shot: int = 10,
        q_queries: int = 10,
        tasks_per_batch: int = 25,
        batches_per_epoch: int = 100,
        val_tasks: int = 500,
        val_query_points: int = 100,
        val_batch_size: int = 500,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        seed: int = 0,
    ) -> None:
        super().__init__(tasks_per_batch, batches_per_epoch, val_tasks, val_batch_size, seed)
        for name, value in (("k_shot", k_shot), ("q_queries", q_queries), ("val_query_points", val_query_points)):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}.")
        for name, (lo, hi) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not lo <= hi:
                raise ValueError(f"`{name}` must be a (low, high) pair with low <= high, got {(lo, hi)}.")
        self.save_hyperparameters()
        self.k_shot, self.q_queries, self.val_query_points = k_shot, q_queries, val_query_points
        self.amplitude, self.phase, self.x_range = tuple(amplitude), tuple(phase), tuple(x_range)

    @override
    def sample_tasks(self, num_tasks: int, rng: np.random.Generator, split: str) -> TaskBatch:
        q = self.val_query_points if split == "val" else self.q_queries
        amp = rng.uniform(*self.amplitude, size=(num_tasks, 1, 1))
        ph = rng.uniform(*self.phase, size=(num_tasks, 1, 1))
        x = rng.uniform(*self.x_range, size=(num_tasks, self.k_shot + q, 1))
        y = amp * np.sin(x - ph)
        x, y = _as_tensor(x, torch.float32), _as_tensor(y, torch.float32)
        k = self.k_shot
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])


class LinearRegressionTasks(FewShotTasksBase):
    """A fixed family of linear-regression tasks with a closed-form MAML solution.

    Task ``i`` has ``rows`` inputs ``a ~ N(0, s_i^2 I_dim)`` with ``s_i`` evenly spaced over ``curvature`` and targets
    ``y = a^T w_i`` with ``w_i ~ N(0, I)``; support and query are the same rows (``f^s = f^q``), shapes
    ``(T, rows, dim)`` and ``(T, rows, 1)``; every batch is the whole family (full-batch meta-training) and
    validation uses it too. With a bias-free linear model ``nn.Linear(dim, 1, bias=False)`` and ``loss="mse"``,
    ``f_i(x) = 1/2 (x - w_i)^T A_i (x - w_i)`` with ``A_i = (2 / rows) X_i^T X_i``, so
    :meth:`exact_maml_solution` and :meth:`fomaml_fixed_point` are exact (a non-quadratic loss such as log-cosh can be
    used through the functional API for stationarity studies).

    Args:
        dim: Input dimension ``d >= 1``.
        num_tasks: Number of tasks ``T >= 2``.
        rows: Rows per task (``>= 1``).
        curvature: ``(low, high)`` of the row scales ``s_i``, ``0 < low <= high``.
        dtype: ``"float32"`` or ``"float64"``.
        batches_per_epoch: Training batches (each the full family) per epoch.
        seed: Seed of the family.

    Raises:
        ValueError: For non-positive sizes, an empty or non-positive ``curvature`` range or an unknown ``dtype``.
    """

    def __init__(
        self,
        dim: int = 10,
        num_tasks: int = 20,
        rows: int = 40,
        curvature: tuple[float, float] = (0.3, 1.5),
        dtype: Literal["float32", "float64"] = "float32",
        batches_per_epoch: int = 100,
        seed: int = 0,
    ) -> None:
        if num_tasks < 2:
            raise ValueError(f"`num_tasks` must be >= 2, got {num_tasks}.")
        super().__init__(num_tasks, batches_per_epoch, num_tasks, num_tasks, seed)
        if dim < 1 or rows < 1:
            raise ValueError(f"`dim` and `rows` must be >= 1, got dim={dim}, rows={rows}.")
        if not 0 < curvature[0] <= curvature[1]:
            raise ValueError(f"`curvature` must be (low, high) with 0 < low <= high, got {tuple(curvature)}.")
        if dtype not in ("float32", "float64"):
            raise ValueError(f"`dtype` must be 'float32' or 'float64', got {dtype!r}.")
        self.save_hyperparameters()
        self.dim, self.num_tasks, self.rows = dim, num_tasks, rows
        self.curvature = tuple(curvature)
        self.dtype = getattr(torch, dtype)
        rng = numpy_generator(seed, 3)
        scales = np.linspace(*self.curvature, num_tasks)[:, None, None]
        x = rng.standard_normal((num_tasks, rows, dim)) * scales
        w = rng.standard_normal((num_tasks, dim))
        y = np.einsum("trd,td->tr", x, w)[..., None]
        self.inputs = torch.as_tensor(x, dtype=torch.float64)
        self.targets = torch.as_tensor(y, dtype=torch.float64)
        self.task_minimizers = torch.as_tensor(w, dtype=torch.float64)

    def hessians(self) -> Tensor:
        """``A_i = (2 / rows) X_i^T X_i`` of the mean squared error, ``(T, dim, dim)`` float64."""
        return 2.0 / self.rows * self.inputs.transpose(1, 2) @ self.inputs

    def exact_maml_solution(self, inner_lr: float, inner_steps: int = 1) -> Tensor:
        """Minimizer of the MAML objective for ``loss="mse"``, ``(dim,)`` float64."""
        return quadratic_maml_solution(self.hessians(), self.task_minimizers, inner_lr, inner_steps)

    def fomaml_fixed_point(self, inner_lr: float, inner_steps: int = 1) -> Tensor:
        """Fixed point of FO-MAML for ``loss="mse"``, ``(dim,)`` float64."""
        return quadratic_fomaml_fixed_point(self.hessians(), self.task_minimizers, inner_lr, inner_steps)

    def full_batch(self) -> TaskBatch:
        """Every task, support = query."""
        x, y = self.inputs.to(self.dtype), self.targets.to(self.dtype)
        return TaskBatch(x, y, x, y)

    @override
    def sample_tasks(self, num_tasks: int, rng: np.random.Generator, split: str) -> TaskBatch:
        return self.full_batch().slice(0, num_tasks)

    @override
    def train_batch(self, index: int, rank: int = 0) -> TaskBatch:
        batch = self.full_batch()
        batch.index = index
        return batch


class FewShotDigits(FewShotTasksBase):
    """``N``-way ``K``-shot classification over scikit-learn's 8x8 digits (1797 images, bundled, no download).

    Each task draws ``n_way`` classes in random order (so the labels ``0..n_way-1`` are permuted per task), then
    ``k_shot`` support and ``q_queries`` query images per class, without replacement. Inputs ``(T, n_way * k, 64)``
    in ``[0, 1]``, labels ``(T, n_way * k)`` int64.

    Args:
        n_way: Classes per task (``2..10``; ``2..5`` with ``split="classes"``).
        k_shot: Support images per class (``>= 1``).
        q_queries: Query images per class (``>= 1``).
        split: ``"samples"``: all ten classes, images split 60/40 (stratified, by ``seed``) between training and
            validation tasks; ``"classes"``: classes 0-4 for training tasks, 5-9 for validation tasks.
        tasks_per_batch, batches_per_epoch, val_tasks, val_batch_size, seed: See :class:`FewShotTasksBase`.

    Raises:
        ValueError: If ``n_way``, ``k_shot``, ``q_queries`` or ``split`` is invalid, or a class has too few images.
    """

    def __init__(
        self,
        n_way: int = 5,
        k_shot: int = 1,
        q_queries: int = 15,
        split: Literal["samples", "classes"] = "samples",
        tasks_per_batch: int = 16,
        batches_per_epoch: int = 100,
        val_tasks: int = 200,
        val_batch_size: int = 200,
        seed: int = 0,
    ) -> None:
        super().__init__(tasks_per_batch, batches_per_epoch, val_tasks, val_batch_size, seed)
        if split not in ("samples", "classes"):
            raise ValueError(f"`split` must be 'samples' or 'classes', got {split!r}.")
        max_way = 5 if split == "classes" else 10
        if not 2 <= n_way <= max_way:
            raise ValueError(f"`n_way` must be in [2, {max_way}] with split={split!r}, got {n_way}.")
        if k_shot < 1 or q_queries < 1:
            raise ValueError(f"`k_shot` and `q_queries` must be >= 1, got k_shot={k_shot}, q_queries={q_queries}.")
        self.save_hyperparameters()
        self.n_way, self.k_shot, self.q_queries, self.split = n_way, k_shot, q_queries, split
        from lightning_epfl.datamodules.digits import load_digits_arrays

        x, y = load_digits_arrays(scale=True)
        self._x = torch.from_numpy(x)
        rng = numpy_generator(seed, 4)
        pools: dict[str, dict[int, np.ndarray]] = {"train": {}, "val": {}}
        for c in range(10):
            idx = rng.permutation(np.flatnonzero(y == c))
            if split == "samples":
                cut = int(round(0.6 * len(idx)))
                pools["train"][c], pools["val"][c] = idx[:cut], idx[cut:]
            else:
                pools["train" if c < 5 else "val"][c] = idx
        need = k_shot + q_queries
        for name, pool in pools.items():
            small = {c: len(v) for c, v in pool.items() if len(v) < need}
            if small:
                raise ValueError(
                    f"`k_shot + q_queries` = {need} exceeds the {name} images of classes {small}; lower them."
                )
        self._pools = pools

    @override
    def sample_tasks(self, num_tasks: int, rng: np.random.Generator, split: str) -> TaskBatch:
        pool = self._pools[split]
        classes = np.array(sorted(pool))
        k, q, n = self.k_shot, self.q_queries, self.n_way
        sx, sy, qx, qy = [], [], [], []
        for _ in range(num_tasks):
            chosen = rng.choice(classes, size=n, replace=False)
            s_idx, q_idx = [], []
            for c in chosen:
                picked = rng.choice(pool[int(c)], size=k + q, replace=False)
                s_idx.append(picked[:k])
                q_idx.append(picked[k:])
            s_idx, q_idx = np.concatenate(s_idx), np.concatenate(q_idx)
            sx.append(self._x[s_idx])
            qx.append(self._x[q_idx])
            sy.append(torch.arange(n).repeat_interleave(k))
            qy.append(torch.arange(n).repeat_interleave(q))
        return TaskBatch(torch.stack(sx), torch.stack(sy), torch.stack(qx), torch.stack(qy))
