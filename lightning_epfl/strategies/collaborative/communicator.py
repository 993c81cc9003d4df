"""Communicators
===============

The small interface through which collaborative algorithms talk (``collaborative_core.md`` §3), so the same algorithm
code runs with all clients simulated in one process (:class:`LocalCommunicator`) or with blocks of clients in several
processes over ``torch.distributed`` (:class:`TorchDistributedCommunicator`, gloo on CPU, NCCL on CUDA).

Tensors passed to client-level collectives have a leading dimension ``n_local`` (this process's clients, in client
order); rank ``r`` holds clients ``[r * n_local, (r + 1) * n_local)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

_Op = Literal["sum", "mean", "max", "min"]


class Communicator(ABC):
    """Client-level collectives.

    Attributes:
        n_clients: Total number of clients ``n``.
        local_ids: This process's client ids (contiguous, ascending).
        rank: Process rank.
        world_size: Number of processes ``P`` (divides ``n``).
    """

    n_clients: int
    local_ids: tuple[int, ...]
    rank: int
    world_size: int

    @abstractmethod
    def all_gather(self, x: Tensor) -> Tensor:
        """``[n_local, *s]`` on every process to ``[n, *s]`` in client order."""

    @abstractmethod
    def all_reduce(self, x: Tensor, op: _Op = "sum") -> Tensor:
        """Reduce a tensor of equal shape across *processes* (not clients); returns a new tensor."""

    def mix(self, x: Tensor, weights: Tensor) -> Tensor:
        """Return ``weights[local_ids] @ X_all`` for ``x`` of shape ``[n_local, d]`` and ``weights`` ``[n, n]``."""
        rows = weights[list(self.local_ids)].to(x.dtype)
        return rows @ self.all_gather(x)

    def exchange(self, x: Tensor, peers: Sequence[Sequence[int]]) -> list[dict[int, Tensor]]:
        """For each local client ``k``, return ``{j: x_j for j in peers[k]}`` (rows of other clients)."""
        everyone = self.all_gather(x)
        return [{j: everyone[j] for j in p} for p in peers]

    def broadcast(self, x: Tensor, src_client: int) -> Tensor:
        """Return client ``src_client``'s row of ``x`` (``[n_local, *s]``) on every process."""
        return self.all_gather(x)[src_client]

    def agree_pairwise_keys(self, edges: Sequence[tuple[int, int]], context: bytes) -> dict[tuple[int, int], Any]:
        """Pairwise key agreement (needed by Decor); not part of this issue's core."""
        raise NotImplementedError("pairwise key agreement arrives with the Decor strategy (strategies/secrets.py).")


class LocalCommunicator(Communicator):
    """All ``n`` clients in one process: ``all_gather`` is the identity and ``mix`` a dense ``W @ X``.

    Args:
        n_clients: Number of clients (all local). Must be positive.

    Raises:
        ValueError: If ``n_clients < 1``.
    """

    def __init__(self, n_clients: int) -> None:
        if n_clients < 1:
            raise ValueError(f"`n_clients` must be >= 1, got {n_clients}.")
        self.n_clients = n_clients
        self.local_ids = tuple(range(n_clients))
        self.rank = 0
        self.world_size = 1

    def all_gather(self, x: Tensor) -> Tensor:
        if x.shape[0] != self.n_clients:
            raise ValueError(f"expected a leading dimension of {self.n_clients} clients, got shape {tuple(x.shape)}.")
        return x

    def all_reduce(self, x: Tensor, op: _Op = "sum") -> Tensor:
        if op not in ("sum", "mean", "max", "min"):
            raise ValueError(f"`op` must be one of sum/mean/max/min, got {op!r}.")
        return x.clone()

    def mix(self, x: Tensor, weights: Tensor) -> Tensor:
        return weights.to(x.dtype) @ x


class TorchDistributedCommunicator(Communicator):
    """Blocks of clients per process over ``torch.distributed``.

    ``all_gather`` uses the list form (supported by gloo and NCCL; block sizes are equal so no padding is needed).
    ``mix`` all-gathers and multiplies the local rows: O(n d) per process. Neighbour-only point-to-point mixing
    (``p2p``) is not implemented yet; the dense path is exact for any ``W``.

    Args:
        n_clients: Total number of clients; must be divisible by the world size.
        group: Process group (``None``: the default group, which must be initialized).

    Raises:
        ValueError: If the world size does not divide ``n_clients``.
        RuntimeError: If ``torch.distributed`` is not initialized.
    """

    def __init__(self, n_clients: int, group: Any = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchDistributedCommunicator needs an initialized torch.distributed process group.")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if n_clients % self.world_size:
            raise ValueError(
                f"`n_clients`={n_clients} must be divisible by the number of processes (world size {self.world_size})."
            )
        self.n_clients = n_clients
        n_local = n_clients // self.world_size
        self.local_ids = tuple(range(self.rank * n_local, (self.rank + 1) * n_local))
        self._device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None

    def _to_backend(self, x: Tensor) -> tuple[Tensor, torch.device]:
        device = x.device
        if self._device is not None and device != self._device:
            x = x.to(self._device)
        return x.contiguous(), device

    def all_gather(self, x: Tensor) -> Tensor:
        if x.shape[0] != len(self.local_ids):
            raise ValueError(f"expected a leading dimension of {len(self.local_ids)} clients, got {tuple(x.shape)}.")
        xb, device = self._to_backend(x)
        parts = [torch.empty_like(xb) for _ in range(self.world_size)]
        dist.all_gather(parts, xb, group=self.group)
        return torch.cat(parts).to(device)

    def all_reduce(self, x: Tensor, op: _Op = "sum") -> Tensor:
        ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        if op not in ops:
            raise ValueError(f"`op` must be one of sum/mean/max/min, got {op!r}.")
        xb, device = self._to_backend(x.clone())
        dist.all_reduce(xb, op=ops[op], group=self.group)
        if op == "mean":
            xb = xb / self.world_size
        return xb.to(device)
