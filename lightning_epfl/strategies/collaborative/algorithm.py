"""Collaborative algorithm interface
===================================

The plug-in point of the collaborative core: an algorithm computes client gradients, acts before and after the
(user's) optimizer step, and exposes its collaboration matrix and the rows to evaluate. It only talks through
:class:`StepContext` (parameters, gradients, topology, communicator, seeded generators) and its
:class:`~.communicator.Communicator`, so the same code runs simulated in one process and over ``torch.distributed``.
Each algorithm is a class with its own typed, validated arguments, passed to
``CollaborativeStrategy(algorithm=...)`` (YAML: ``algorithm: {class_path: ..., init_args: {...}}``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from lightning_epfl.functional.topology import Topology
from lightning_epfl.seeding import seeded_generator
from lightning_epfl.strategies.collaborative.communicator import Communicator
from lightning_epfl.strategies.collaborative.stack import ClientStack, StackSlot, stack_client_batches


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
        topology: The communication graph (``None`` without one); restored from checkpoints.
        mixing_W: Its ``[n, n]`` float64 mixing matrix (``None`` without a topology).
        stop_requested: Set by an algorithm to end training after the current step (e.g. a spent privacy budget).
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
    topology: Topology | None = None
    mixing_W: Tensor | None = None
    stop_requested: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def neighbours(self) -> list[tuple[int, ...]]:
        """Neighbour lists of this process's clients (``local_ids`` order); raises without a topology."""
        topo = self._require_topology()
        return [topo.neighbours(i) for i in self.local_ids]

    @property
    def edges(self) -> list[tuple[int, int]]:
        """All edges ``(i, j)``, ``i < j``, of the topology; raises without a topology."""
        return self._require_topology().edges

    def _require_topology(self) -> Topology:
        if self.topology is None:
            raise ValueError("this algorithm needs a communication graph: set `CollaborativeStrategy(topology=...)`.")
        return self.topology

    def exchange_with_neighbours(self, x: Tensor) -> list[dict[int, Tensor]]:
        """Rows of ``x`` (``[n_local, ...]``) from each local client's neighbours only (point-to-point messages
        between processes; indexing when all clients are simulated in one process)."""
        return self.comm.exchange(x, self.neighbours)

    def pairwise_keys(self, context: bytes) -> dict[tuple[int, int], Any]:
        """Fresh X25519/HKDF keys for every edge touching this process (collective; in memory only)."""
        return self.comm.agree_pairwise_keys(self.edges, context)

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
        return seeded_generator(self.seed, client_id, stream, self.step)

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
        return tree_map(lambda t: t.to(device), stack_client_batches(batches))


class CollaborativeAlgorithm:
    """Base class of collaborative update rules (no communication by default).

    Subclasses override some of the hooks below. All state that must survive a restart goes through
    :meth:`state_dict`/:meth:`load_state_dict` and must be identical on every process (replicated), so that the
    checkpoint entry needs no collective.
    """

    name: str = "local"
    """Short name of the algorithm (logs and messages)."""
    uses_topology: bool = False
    """Whether the algorithm communicates along ``CollaborativeStrategy(topology=...)`` (the strategy warns when a
    topology is given to an algorithm that ignores it)."""

    def setup(self, ctx: StepContext) -> None:
        """Called once, after stacking and optimizer setup."""

    def check_config(
        self, trainer: Any, pl_module: Any, datamodule: Any, n_clients: int, topology: Topology | None
    ) -> None:
        """Checks that need the trainer, module, data or graph, run before anything starts (the CLI) and in the
        strategy's ``setup``; raise ``MisconfigurationException`` naming the setting."""

    def check_trainer(self, trainer: Any, optimizers: list[Any]) -> None:
        """Refuse trainer settings or optimizers the algorithm cannot work with (called in the strategy's ``setup``,
        before :meth:`setup`); raise ``MisconfigurationException`` naming the setting."""

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
