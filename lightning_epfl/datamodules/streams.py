"""Position-addressed training streams
====================================

The package's one resumable-sampling mechanism. A datamodule defines its ``k``-th training batch as a pure function
of ``(seed, k)`` (and of the clients or rank it serves); the loader yields batches ``k = p, p + 1, ...`` from a
:class:`StreamPosition` ``p`` and advances it. The position is the loader's ``state_dict`` (Lightning saves it in the
checkpoint and restores it on resume) and the datamodule's, so a run resumed at any step sees exactly the batches
the uninterrupted run would have seen, in any process layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset

from lightning_epfl.seeding import loader_generator

__all__ = ["PositionedBatches", "ResumableLoader", "StreamPosition"]


class StreamPosition:
    """The number of training batches served so far (the next batch's index ``k``)."""

    def __init__(self, value: int = 0) -> None:
        self.value = int(value)

    def __repr__(self) -> str:
        return f"StreamPosition({self.value})"


class PositionedBatches(IterableDataset):
    """One epoch of ``length`` batches ``batch_fn(k)``, ``k`` starting at the shared position, which advances.

    Lightning never wraps an ``IterableDataset`` in a ``DistributedSampler``; after a mid-epoch resume Lightning
    ends the epoch after the remaining batches, and the next epoch continues from the position.

    Args:
        batch_fn: ``k -> batch``; must be a pure function of ``k`` (and of fixed settings).
        length: Batches per epoch (the loader's ``len``).
        position: The shared :class:`StreamPosition`.
    """

    def __init__(self, batch_fn: Callable[[int], Any], length: int, position: StreamPosition) -> None:
        self.batch_fn = batch_fn
        self.length = int(length)
        self.position = position

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Any]:
        for _ in range(self.length):
            k = self.position.value
            batch = self.batch_fn(k)
            self.position.value = k + 1
            yield batch


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over :class:`PositionedBatches` whose ``state_dict`` is the stream position.

    Batches are produced whole by ``batch_fn`` (``batch_size=None``) in the main process (``num_workers=0``: the
    position is shared state). The loader has a private generator, so creating its iterator never draws from the
    global RNG.

    Args:
        batch_fn: ``k -> batch`` (pure).
        length: Batches per epoch.
        position: The shared :class:`StreamPosition`.
        seed: Seed of the loader's private generator.
    """

    def __init__(self, batch_fn: Callable[[int], Any], length: int, position: StreamPosition, seed: int = 0) -> None:
        super().__init__(
            PositionedBatches(batch_fn, length, position),
            batch_size=None,
            num_workers=0,
            generator=loader_generator(seed),
        )

    @property
    def position(self) -> StreamPosition:
        return self.dataset.position  # type: ignore[attr-defined]

    def state_dict(self) -> dict[str, int]:
        """``{"position": k}``: the next batch's index."""
        return {"position": self.position.value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue at the saved position (``{"epoch", "batches"}`` states of earlier versions are converted)."""
        if "position" not in state_dict and {"epoch", "batches"} <= set(state_dict):
            state_dict = {"position": int(state_dict["epoch"]) * len(self) + int(state_dict["batches"])}
        self.position.value = int(state_dict["position"])
