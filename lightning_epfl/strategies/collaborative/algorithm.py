"""Collaborative algorithm interface
===================================

The plug-in point of the collaborative core (``collaborative_core.md`` §2.4, §2.6): an algorithm computes client
gradients, acts before and after the (user's) optimizer step, and exposes its collaboration matrix and the rows to
evaluate. It only talks through :class:`StepContext` and its :class:`~.communicator.Communicator`, so the same code
runs simulated in one process and over ``torch.distributed``.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_epfl.strategies.collaborative.communicator import Communicator
from lightning_epfl.strategies.collaborative.stack import ClientStack, StackSlot, stack_client_batches


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed derived deterministically from ``parts`` (identical on every process and run)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class StepContext:
    """What an algorithm sees at each step.

    Attributes:
        stack: The :class:`ClientStack` (``stack.X`` is ``[n_local, d]``, communicated columns first).
        comm: Communicator for client-level collectives.
        seed: Base seed of all algorithm randomness (derive streams with :meth:`generator`).
        datamodule: The trainer's datamodule (``extra_batch``, ``true_clusters``), or ``None``.
        step: Current optimizer step (``trainer.global_step`` before the update).
        lr: Learning rate of the current step (``optimizer.param_groups[0]["lr"]``).
        max_steps: The trainer's ``max_steps`` (``-1`` if unbounded).
        G: Flat gradient ``[n_local, d]`` assembled from ``.grad`` after backward (``None`` before).
        extra: Scratch space for algorithms (not checkpointed).
    """

    stack: ClientStack
    comm: Communicator
    seed: int = 0
    datamodule: Any = None
    step: int = 0
    lr: float = 0.0
    max_steps: int = -1
    G: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def X(self) -> Tensor:
        """This process's flat client parameters ``[n_local, d]`` (writes land in the stacked parameters)."""
        return self.stack.X

    @property
    def layout(self) -> list[StackSlot]:
        return self.stack.layout

    @property
    def d_comm(self) -> int:
        return self.stack.d_comm

    @property
    def local_ids(self) -> tuple[int, ...]:
        return self.comm.local_ids

    @property
    def n_clients(self) -> int:
        return self.comm.n_clients

    def loss_and_grad(self, rows: Tensor, batch: Any) -> tuple[Tensor, Tensor]:
        """Gradients ``[m, d]`` and losses ``[m]`` of ``client_loss`` at rows ``[m, d]`` on a stacked batch."""
        return self.stack.loss_and_grad(rows, batch)

    def write_grads(self, G: Tensor) -> None:
        """Replace the stacked parameters' gradients by ``G`` (``[n_local, d]``) before the optimizer step."""
        self.stack.write_grads(G)
        self.G = G

    def generator(self, client_id: int, stream: str) -> torch.Generator:
        """A CPU generator seeded by ``(seed, client_id, stream, step)``: identical in every process layout."""
        return torch.Generator().manual_seed(derive_seed(self.seed, client_id, stream, self.step))

    def extra_batches(self, client_ids: list[int], size: int, stream: str) -> Any:
        """Stack ``datamodule.extra_batch(i, size, stream)`` for ``client_ids`` (padded with a mask if needed).

        When ``extra_batch`` accepts a ``step`` keyword (``FederatedDataModule`` does), the current step is passed,
        which makes the draw a pure function of ``(client, stream, step)``: identical in every process layout and
        after a resume.

        Raises:
            ValueError: If the datamodule has no ``extra_batch`` method.
        """
        fn = getattr(self.datamodule, "extra_batch", None)
        if fn is None:
            raise ValueError("this algorithm needs a datamodule with `extra_batch(client_id, size, stream)`.")
        if "step" in inspect.signature(fn).parameters:
            batches = [fn(i, size, stream, step=self.step) for i in client_ids]
        else:
            batches = [fn(i, size, stream) for i in client_ids]
        device = self.X.device
        return tuple(t.to(device) for t in stack_client_batches(batches))


class CollaborativeAlgorithm:
    """Base class of collaborative update rules (Local behaviour by default).

    Subclasses override some of the hooks below. All state that must survive a restart goes through
    :meth:`state_dict`/:meth:`load_state_dict` and must be identical on every process (replicated), so that the
    checkpoint entry needs no collective.
    """

    #: Whether :meth:`evaluation_rows` differs from ``ctx.X`` (informational).
    name: str = "local"

    def setup(self, ctx: StepContext) -> None:
        """Called once, after stacking and optimizer setup."""

    def compute_gradients(self, ctx: StepContext, batch: Any) -> tuple[Tensor, Tensor]:
        """Return ``(G [n_local, d], losses [n_local])``; default: plain mean-loss gradients at ``ctx.X``."""
        return ctx.loss_and_grad(ctx.X, batch)

    def before_optimizer_step(self, ctx: StepContext) -> None:
        """Called after backward (``ctx.G`` set) and before the optimizer updates the parameters."""

    def after_optimizer_step(self, ctx: StepContext) -> None:
        """Called after the optimizer step, under ``torch.no_grad()`` (mixing, consensus, centre updates)."""

    def collaboration_matrix(self) -> Tensor | None:
        """The ``[n, n]`` collaboration matrix to log, or ``None``."""
        return None

    def evaluation_rows(self, ctx: StepContext) -> Tensor:
        """The flat parameters ``[n_local, d]`` to evaluate (personal models by default)."""
        return ctx.X

    def step_metrics(self) -> dict[str, float]:
        """Scalars to log after each step (component prefix, e.g. ``cobo/...``)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
