"""Communicators
===============

The small interface through which collaborative algorithms talk, so the same algorithm code runs with all clients
simulated in one process (:class:`LocalCommunicator`) or with blocks of clients in several processes over
``torch.distributed`` (:class:`TorchDistributedCommunicator`, gloo on CPU, NCCL on CUDA): gathers and reductions,
dense mixing, neighbour-only exchange, and pairwise key agreement (:mod:`.secrets`).

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

from lightning_epfl.strategies.collaborative.secrets import (
    PairwiseSecret,
    derive_pair_key,
    generate_key_pairs,
    normalize_edges,
)

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
        """For each local client ``k``, return ``{j: x_j for j in peers[k]}``: the rows of its neighbours only.

        ``peers`` (one list per local client, in ``local_ids`` order) must describe an undirected graph: ``j`` is a
        peer of ``i`` exactly when ``i`` is a peer of ``j`` (each process only knows its own clients' lists).
        """
        everyone = self.all_gather(x)
        return [{int(j): everyone[int(j)] for j in p} for p in peers]

    def broadcast(self, x: Tensor, src_client: int) -> Tensor:
        """Return client ``src_client``'s row of ``x`` (``[n_local, *s]``) on every process."""
        return self.all_gather(x)[src_client]

    def agree_pairwise_keys(
        self, edges: Sequence[tuple[int, int]], context: bytes = b"lightning-epfl"
    ) -> dict[tuple[int, int], PairwiseSecret]:
        """X25519 + HKDF-SHA256 key agreement on every edge that has an end on this process (collective).

        Every local client draws a fresh key pair; the public keys are all-gathered (``uint8 [n, 32]``); each edge's
        key is derived by its local end(s) (:func:`.secrets.derive_pair_key`) and the private keys are dropped.
        Fresh keys on every call. In one process both ends are local, so this is testable but gives no secrecy
        between the simulated clients.

        Args:
            edges: Undirected edges ``(i, j)`` (any order, duplicates ignored).
            context: Domain-separation bytes, equal on every process.

        Returns:
            ``{(i, j): PairwiseSecret}`` with ``i < j`` for the edges that touch this process's clients.

        Raises:
            ValueError: On a self-loop or a client id out of range.
        """
        pairs = normalize_edges(edges, self.n_clients)
        private, public = generate_key_pairs(len(self.local_ids))
        table = self.all_gather(public).cpu()
        mine = {cid: key for cid, key in zip(self.local_ids, private)}
        out: dict[tuple[int, int], PairwiseSecret] = {}
        for i, j in pairs:
            ends = [e for e in (i, j) if e in mine]
            if not ends:
                continue
            keys = [derive_pair_key(mine[e], bytes(table[j if e == i else i].tolist()), (i, j), context) for e in ends]
            if len(keys) == 2 and keys[0] != keys[1]:  # both ends simulated here: they must agree
                raise RuntimeError(f"key agreement failed on edge {(i, j)}.")
            out[(i, j)] = keys[0]
        del private, mine
        return out


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
    ``mix`` all-gathers and multiplies the local rows: O(n d) per process, exact for any ``W``; ``exchange`` sends
    only the rows that neighbours on other processes need (point-to-point).

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

    def exchange(self, x: Tensor, peers: Sequence[Sequence[int]]) -> list[dict[int, Tensor]]:
        """Neighbour-only exchange with point-to-point messages (``batch_isend_irecv``; every request is waited on).

        Each process sends to process ``q`` the rows of its clients that have a neighbour on ``q``, and receives the
        rows of ``q``'s clients that its clients need, so traffic is proportional to the edges that cross processes,
        not to ``n``. ``peers`` must describe an undirected graph (see :meth:`Communicator.exchange`).
        """
        n_local = len(self.local_ids)
        if x.shape[0] != n_local or len(peers) != n_local:
            raise ValueError(f"expected {n_local} local rows and peer lists, got {tuple(x.shape)} and {len(peers)}.")
        first = self.local_ids[0]
        need: dict[int, set[int]] = {}
        send: dict[int, set[int]] = {}
        for k, plist in enumerate(peers):
            for j in plist:
                q = int(j) // n_local
                if q != self.rank:
                    need.setdefault(q, set()).add(int(j))
                    send.setdefault(q, set()).add(first + k)
        xb, device = self._to_backend(x)
        ops, received = [], {}
        for q in sorted(set(need) | set(send)):
            if q in send:
                rows = torch.tensor(sorted(send[q]), device=xb.device) - first
                ops.append(dist.P2POp(dist.isend, xb.index_select(0, rows).contiguous(), q, group=self.group))
            if q in need:
                buf = torch.empty(len(need[q]), *xb.shape[1:], dtype=xb.dtype, device=xb.device)
                received[q] = buf
                ops.append(dist.P2POp(dist.irecv, buf, q, group=self.group))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        remote = {j: received[q][r].to(device) for q, ids in need.items() for r, j in enumerate(sorted(ids))}
        out = []
        for plist in peers:
            out.append(
                {int(j): (x[int(j) - first] if int(j) // n_local == self.rank else remote[int(j)]) for j in plist}
            )
        return out

    def all_reduce(self, x: Tensor, op: _Op = "sum") -> Tensor:
        ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        if op not in ops:
            raise ValueError(f"`op` must be one of sum/mean/max/min, got {op!r}.")
        xb, device = self._to_backend(x.clone())
        dist.all_reduce(xb, op=ops[op], group=self.group)
        if op == "mean":
            xb = xb / self.world_size
        return xb.to(device)
