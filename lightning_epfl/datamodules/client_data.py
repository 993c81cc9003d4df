"""Serving clients' batches
=========================

What the client-partitioned datamodules (:class:`~.federated.FederatedDataModule`,
:class:`~.federated_text.FederatedTextDataModule`) share: which clients this process serves, and the stacked
evaluation stream over the clients' held-out sets. Stacking goes through the collaborative core's one padder,
:func:`~lightning_epfl.strategies.collaborative.stack.stack_client_batches`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils._pytree import tree_map
from torch.utils.data import IterableDataset

from lightning_epfl.strategies.collaborative.stack import stack_client_batches

__all__ = ["ClientEvalStream", "served_client_ids"]


def served_client_ids(datamodule: Any, n_clients: int) -> list[int]:
    """Clients served to this process: ``trainer.strategy.local_client_ids`` under a collaborative strategy, else all.

    Raises:
        MisconfigurationException: If the strategy's clients do not fit ``n_clients``.
    """
    trainer = getattr(datamodule, "trainer", None)
    ids = getattr(getattr(trainer, "strategy", None), "local_client_ids", None)
    if ids is None:
        return list(range(n_clients))
    ids = [int(i) for i in ids]
    if any(not 0 <= i < n_clients for i in ids):
        raise MisconfigurationException(
            f"strategy.local_client_ids {ids} do not fit the datamodule's `n_clients`={n_clients}."
        )
    return ids


class ClientEvalStream(IterableDataset):
    """Stacked evaluation batches: batch ``b`` stacks every client's ``b``-th held-out batch.

    A client whose held-out set has fewer batches contributes a one-example filler with mask 0, so the stacked
    shapes stay equal across clients (``vmap`` needs that) and the filler counts nowhere.

    Args:
        batch_fn: ``(client_id, b) -> batch`` or ``None`` once the client's held-out set is exhausted.
        client_ids: The clients, in row order.
        length: Number of stacked batches (the longest client's).
        masked: Always add the mask (clients' held-out sets differ in size).
    """

    def __init__(
        self, batch_fn: Callable[[int, int], Any | None], client_ids: Sequence[int], length: int, masked: bool
    ) -> None:
        self.batch_fn = batch_fn
        self.client_ids = [int(i) for i in client_ids]
        self.length = int(length)
        self.masked = masked

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Any]:
        for b in range(self.length):
            parts, empty = [], []
            for i in self.client_ids:
                batch = self.batch_fn(i, b)
                empty.append(batch is None)
                if batch is None:  # one filler example of the client's first batch, masked out below
                    batch = tree_map(lambda t: t[:1], self.batch_fn(i, 0))
                parts.append(batch)
            out = stack_client_batches(parts, force_mask=self.masked or any(empty))
            if any(empty):
                mask = out["mask"] if isinstance(out, dict) else out[2]
                for r, is_empty in enumerate(empty):
                    if is_empty:
                        mask[r] = 0.0
            yield out
