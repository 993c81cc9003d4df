"""Tiny synthetic federated data for the collaborative-core tests (helpers, not tests)."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset


class _Stream(IterableDataset):
    def __init__(self, dm: ToyFederatedData, ids: tuple[int, ...]) -> None:
        self.dm, self.ids = dm, ids

    def __iter__(self):
        k = self.dm.start
        while True:
            yield self.dm.train_batch(self.ids, k)
            k += 1


class ToyFederatedData(LightningDataModule):
    """``n_clients`` clients in ``n_clusters`` label-permutation clusters of a random linear teacher."""

    def __init__(
        self,
        n_clients: int = 4,
        n_clusters: int = 2,
        n_per_client: int = 12,
        dim: int = 5,
        num_classes: int = 3,
        batch_size: int | None = None,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.n_clients, self.batch_size, self.seed, self.dtype = n_clients, batch_size, seed, dtype
        g = torch.Generator().manual_seed(seed)
        teacher = torch.randn(dim, num_classes, generator=g)
        self.true_clusters = torch.arange(n_clients) % n_clusters
        perms = [torch.arange(num_classes)] + [torch.randperm(num_classes, generator=g) for _ in range(n_clusters - 1)]
        self.x, self.y = [], []
        for i in range(n_clients):
            x = torch.randn(n_per_client + i % 2, dim, generator=g)  # unequal sizes exercise padding
            self.x.append(x.to(dtype))
            self.y.append(perms[int(self.true_clusters[i])][(x @ teacher).argmax(1)])
        self.client_sizes = [len(x) for x in self.x]
        self._extra: dict[int, tuple[int, int]] = {}
        self.start = 0

    def _ids(self) -> tuple[int, ...]:
        strategy = getattr(self.trainer, "strategy", None) if self.trainer is not None else None
        return tuple(getattr(strategy, "local_client_ids", range(self.n_clients)))

    def train_batch(self, ids: tuple[int, ...], k: int):
        from lightning_epfl.strategies.collaborative import stack_client_batches

        batches = []
        for i in ids:
            if self.batch_size is None:
                batches.append((self.x[i], self.y[i]))
            else:
                g = torch.Generator().manual_seed(1000 * self.seed + 97 * i + k)
                idx = torch.randint(len(self.x[i]), (self.batch_size,), generator=g)
                batches.append((self.x[i][idx], self.y[i][idx]))
        return stack_client_batches(batches)

    def extra_batch(self, client_id: int, size: int, stream: str):
        if size == -1:
            return self.x[client_id], self.y[client_id]
        # keyed by (client, step, call within the step): identical in every process layout and after a resume
        step = self.trainer.global_step if self.trainer is not None else 0
        last_step, calls = self._extra.get(client_id, (-1, 0))
        calls = calls + 1 if last_step == step else 0
        self._extra[client_id] = (step, calls)
        g = torch.Generator().manual_seed(7919 * client_id + 104729 * step + 31 * calls + self.seed)
        idx = torch.randint(len(self.x[client_id]), (size,), generator=g)
        return self.x[client_id][idx], self.y[client_id][idx]

    def state_dict(self):
        return {"start": self.trainer.global_step if self.trainer is not None else 0}

    def load_state_dict(self, state):
        self.start = state["start"]

    def train_dataloader(self):
        return DataLoader(_Stream(self, self._ids()), batch_size=None)

    def val_dataloader(self):
        from lightning_epfl.strategies.collaborative import stack_client_batches

        ids = self._ids()
        return DataLoader([stack_client_batches([(self.x[i], self.y[i]) for i in ids])], batch_size=None)

    test_dataloader = val_dataloader
