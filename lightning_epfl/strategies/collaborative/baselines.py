"""Baselines on the collaborative core
=====================================

Local, FedAvg (FedSGD with ``local_steps=1``), FedAvg + fine-tuning, Ditto (arXiv:2012.04221), IFCA
(arXiv:2006.04088) and the Oracle (FedAvg inside the true clusters), written once against
:class:`~.algorithm.StepContext` and the communicator, so they run simulated and multi-process alike; each is an
``algorithm`` of :class:`~.strategy.CollaborativeStrategy`. They follow the papers rather than ``epfml/CoBo``'s
variants (whose Ditto samples two clients per step and moves the global model by the personal gradients, and whose
FedAvg averages the momentum).
All algorithm state is replicated across processes.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils._pytree import tree_map

from lightning_epfl.functional.topology import Topology
from lightning_epfl.seeding import derive_seed
from lightning_epfl.strategies.collaborative.algorithm import CollaborativeAlgorithm, StepContext


def _true_clusters(ctx: StepContext, who: str) -> Tensor:
    clusters = getattr(ctx.datamodule, "true_clusters", None)
    if clusters is None:
        raise MisconfigurationException(f"{who} needs `datamodule.true_clusters` (a partition with known clusters).")
    clusters = torch.as_tensor(clusters, dtype=torch.long).cpu()
    if clusters.numel() != ctx.n_clients:
        raise MisconfigurationException(f"`true_clusters` has {clusters.numel()} entries for {ctx.n_clients} clients.")
    return clusters


class Local(CollaborativeAlgorithm):
    """No communication: every client trains alone."""

    name = "local"


class FedAvg(CollaborativeAlgorithm):
    """Federated averaging: every ``local_steps`` steps the communicated parameters become the (weighted) mean.

    With ``local_steps=1`` and plain SGD this is FedSGD (SGD on the mean client gradient), the CoBo paper's FedAvg.

    Args:
        local_steps: Steps between averaging rounds (``>= 1``).
        weighting: ``"uniform"`` or ``"num_samples"`` (weights from ``datamodule.client_sizes``).

    Raises:
        MisconfigurationException: If ``local_steps < 1`` or ``weighting`` is unknown.
    """

    name = "fedavg"

    def __init__(self, local_steps: int = 1, weighting: Literal["uniform", "num_samples"] = "uniform") -> None:
        if local_steps < 1:
            raise MisconfigurationException(f"`local_steps` must be >= 1, got {local_steps}.")
        if weighting not in ("uniform", "num_samples"):
            raise MisconfigurationException(f"`weighting` must be 'uniform' or 'num_samples', got {weighting!r}.")
        self.local_steps = local_steps
        self.weighting = weighting
        self._weights: Tensor | None = None

    def setup(self, ctx: StepContext) -> None:
        if self.weighting == "num_samples":
            sizes = getattr(ctx.datamodule, "client_sizes", None)
            if sizes is None:
                raise MisconfigurationException("`weighting='num_samples'` needs `datamodule.client_sizes`.")
            w = torch.as_tensor(sizes, dtype=torch.float64)
        else:
            w = torch.ones(ctx.n_clients, dtype=torch.float64)
        self._weights = w / w.sum()

    def averaging_active(self, ctx: StepContext) -> bool:
        """Whether this step ends with an averaging round (override point)."""
        return (ctx.step + 1) % self.local_steps == 0

    def after_optimizer_step(self, ctx: StepContext) -> None:
        if not self.averaging_active(ctx):
            return
        Xc = ctx.X[:, : ctx.d_comm]
        w = self._weights[list(ctx.local_ids)].to(Xc)
        mean = ctx.comm.all_reduce((w[:, None] * Xc).sum(0))
        Xc.copy_(mean.expand_as(Xc))

    def collaboration_matrix(self) -> Tensor | None:
        return (
            None if self._weights is None else torch.ones(len(self._weights), len(self._weights), dtype=torch.float64)
        )


class FedAvgFineTune(FedAvg):
    """FedAvg until ``max_steps - finetune_steps``, then local fine-tuning.

    Args:
        finetune_steps: Number of final local steps (``>= 0``); needs ``Trainer(max_steps=...)``.
        local_steps: As :class:`FedAvg`.
        weighting: As :class:`FedAvg`.

    Raises:
        MisconfigurationException: If ``finetune_steps < 0``, or (before the run) ``max_steps`` is not set or not
            larger than ``finetune_steps``.
    """

    name = "fedavg_ft"

    def __init__(
        self, finetune_steps: int = 150, local_steps: int = 1, weighting: Literal["uniform", "num_samples"] = "uniform"
    ) -> None:
        super().__init__(local_steps=local_steps, weighting=weighting)
        if finetune_steps < 0:
            raise MisconfigurationException(f"`finetune_steps` must be >= 0, got {finetune_steps}.")
        self.finetune_steps = finetune_steps

    def check_config(
        self, trainer: Any, pl_module: Any, datamodule: Any, n_clients: int, topology: Topology | None
    ) -> None:
        total = getattr(trainer, "max_steps", -1)
        if total is None or total < 0:
            raise MisconfigurationException("FedAvgFineTune needs `trainer.max_steps` to know when fine-tuning starts.")
        if self.finetune_steps >= total:
            raise MisconfigurationException(
                f"FedAvgFineTune: `finetune_steps`={self.finetune_steps} >= `trainer.max_steps`={total}: no averaging "
                f"step would remain (that is Local); use `finetune_steps` < {total}."
            )

    def setup(self, ctx: StepContext) -> None:
        super().setup(ctx)
        if ctx.max_steps is None or ctx.max_steps < 0:
            raise MisconfigurationException("FedAvgFineTune needs `trainer.max_steps` to know when fine-tuning starts.")

    def averaging_active(self, ctx: StepContext) -> bool:
        self._fine_tuning = ctx.step >= ctx.max_steps - self.finetune_steps
        return not self._fine_tuning and super().averaging_active(ctx)

    def collaboration_matrix(self) -> Tensor | None:
        """All ones while averaging; the identity once the clients fine-tune alone."""
        W = super().collaboration_matrix()
        if W is not None and getattr(self, "_fine_tuning", False):
            return torch.eye(W.shape[0], dtype=torch.float64)
        return W


class Ditto(CollaborativeAlgorithm):
    """Ditto (Li et al., ICML 2021, arXiv:2012.04221), one local step per round.

    The global model ``w`` moves by FedSGD on ``grad f_i(w)`` (plain SGD at the optimizer's lr); each personal model
    takes the user's optimizer step on ``grad f_i(v_i) + lam * (v_i - w)``. Evaluates the personal ``v_i``. Two
    gradient evaluations per client and step, on the same batch.

    Args:
        lam: Proximal weight ``lambda >= 0`` (0: ``v`` is Local and ``w`` is FedAvg).

    Raises:
        MisconfigurationException: If ``lam < 0``.
    """

    name = "ditto"

    def __init__(self, lam: float = 1.0) -> None:
        if lam < 0:
            raise MisconfigurationException(f"`lam` must be >= 0, got {lam}.")
        self.lam = lam
        self.w: Tensor | None = None
        self._gw: Tensor | None = None

    def setup(self, ctx: StepContext) -> None:
        if self.w is None:
            self.w = ctx.comm.broadcast(ctx.X[:, : ctx.d_comm].detach(), 0).clone()

    def compute_gradients(self, ctx: StepContext, batch: Any) -> tuple[Tensor, Tensor]:
        G, losses = ctx.loss_and_grad(ctx.X, batch)
        dc = ctx.d_comm
        rows_w = ctx.X.detach().clone()
        rows_w[:, :dc] = self.w.to(rows_w)
        Gw, _ = ctx.loss_and_grad(rows_w, batch)
        self._gw = ctx.comm.all_reduce(Gw[:, :dc].sum(0)) / ctx.n_clients
        G = G.clone()
        G[:, :dc] += self.lam * (ctx.X[:, :dc].detach() - self.w.to(G))
        return G, losses

    def after_optimizer_step(self, ctx: StepContext) -> None:
        if self._gw is not None:
            self.w = self.w - ctx.lr * self._gw.to(self.w)
            self._gw = None

    def state_dict(self) -> dict[str, Any]:
        return {"w": None if self.w is None else self.w.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("w") is not None:
            device = self.w.device if self.w is not None else "cpu"
            self.w = state["w"].to(device)


class IFCA(CollaborativeAlgorithm):
    """Iterative Federated Clustering (Ghosh et al., NeurIPS 2020, arXiv:2006.04088), gradient-averaging variant.

    ``K`` centres are replicated on every process. Each step, every client evaluates its batch loss at all centres,
    picks the lowest (ties: lowest index), takes the optimizer step from that centre, and each centre becomes the mean
    of its clients' updated rows (all-reduced sums and counts; a centre without clients stays). With plain SGD this is
    exactly "each centre moves by the mean gradient of its clients". Centres are initialised independently, per
    tensor, uniformly in ``[-a, a]`` with ``a`` the largest magnitude of that tensor in the shared ``x0`` (the scale
    of PyTorch's default ``Linear`` init), from a generator seeded by ``(seed, k)``. Matrix: co-assignment.

    Args:
        n_clusters: Number of centres ``K >= 1``.

    Raises:
        MisconfigurationException: If ``n_clusters < 1``.
    """

    name = "ifca"

    def __init__(self, n_clusters: int = 4) -> None:
        if n_clusters < 1:
            raise MisconfigurationException(f"`n_clusters` must be >= 1, got {n_clusters}.")
        self.n_clusters = n_clusters
        self.centres: Tensor | None = None
        self.assignment: Tensor | None = None
        self._local_assign: Tensor | None = None

    def setup(self, ctx: StepContext) -> None:
        if self.centres is not None:
            return
        x0 = ctx.comm.broadcast(ctx.X[:, : ctx.d_comm].detach(), 0)
        centres = []
        for k in range(self.n_clusters):
            g = torch.Generator().manual_seed(derive_seed(ctx.seed, "ifca", k))
            c = torch.empty_like(x0, device="cpu")
            for s in ctx.layout:
                if not s.communicated:
                    continue
                a = float(x0[s.offset : s.offset + s.numel].abs().max())
                c[s.offset : s.offset + s.numel] = (torch.rand(s.numel, generator=g, dtype=c.dtype) * 2 - 1) * a
            centres.append(c)
        self.centres = torch.stack(centres).to(x0)
        with torch.no_grad():
            ctx.X[:, : ctx.d_comm].copy_(self.centres[0].expand(ctx.X.shape[0], -1))

    def compute_gradients(self, ctx: StepContext, batch: Any) -> tuple[Tensor, Tensor]:
        K, n_local, dc = self.n_clusters, ctx.X.shape[0], ctx.d_comm
        rows = ctx.X.detach().repeat_interleave(K, 0)
        rows[:, :dc] = self.centres.to(rows).repeat(n_local, 1)
        reps = tree_map(lambda t: t.repeat_interleave(K, 0), batch)
        losses = ctx.stack.losses(rows, reps).reshape(n_local, K)
        assign = losses.argmin(1)
        with torch.no_grad():
            ctx.X[:, :dc].copy_(self.centres.to(ctx.X)[assign])
        self._local_assign = assign
        return ctx.loss_and_grad(ctx.X, batch)

    def after_optimizer_step(self, ctx: StepContext) -> None:
        if self._local_assign is None:
            return
        dc, K = ctx.d_comm, self.n_clusters
        Xc = ctx.X[:, :dc]
        sums = torch.zeros(K, dc, dtype=Xc.dtype, device=Xc.device).index_add_(0, self._local_assign, Xc)
        counts = torch.zeros(K, dtype=Xc.dtype, device=Xc.device).index_add_(
            0, self._local_assign, torch.ones_like(self._local_assign, dtype=Xc.dtype)
        )
        sums, counts = ctx.comm.all_reduce(sums), ctx.comm.all_reduce(counts)
        has = counts > 0
        centres = self.centres.to(Xc).clone()
        centres[has] = sums[has] / counts[has, None]
        self.centres = centres
        Xc.copy_(centres[self._local_assign])
        self.assignment = ctx.comm.all_gather(self._local_assign).cpu()
        self._local_assign = None

    def collaboration_matrix(self) -> Tensor | None:
        if self.assignment is None:
            return None
        return (self.assignment[:, None] == self.assignment[None, :]).to(torch.float64)

    def cluster_assignments(self) -> Tensor | None:
        """The last step's client-to-centre assignment ``[n]``."""
        return self.assignment

    def state_dict(self) -> dict[str, Any]:
        return {
            "centres": None if self.centres is None else self.centres.detach().cpu().clone(),
            "assignment": self.assignment,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("centres") is not None:
            device = self.centres.device if self.centres is not None else "cpu"
            self.centres = state["centres"].to(device)
        self.assignment = state.get("assignment")


class Oracle(CollaborativeAlgorithm):
    """FedAvg inside the true clusters (block-diagonal averaging matrix); needs ``datamodule.true_clusters``."""

    name = "oracle"

    def __init__(self) -> None:
        self.B: Tensor | None = None

    def check_config(
        self, trainer: Any, pl_module: Any, datamodule: Any, n_clients: int, topology: Topology | None
    ) -> None:
        if datamodule is not None and getattr(datamodule, "true_clusters", None) is None:
            raise MisconfigurationException(
                f"Oracle needs `datamodule.true_clusters` (a partition with known clusters); "
                f"{type(datamodule).__name__} has none."
            )

    def setup(self, ctx: StepContext) -> None:
        c = _true_clusters(ctx, "Oracle")
        same = (c[:, None] == c[None, :]).to(torch.float64)
        self.B = same / same.sum(1, keepdim=True)

    def after_optimizer_step(self, ctx: StepContext) -> None:
        Xc = ctx.X[:, : ctx.d_comm]
        Xc.copy_(ctx.comm.mix(Xc, self.B.to(Xc.device)))

    def collaboration_matrix(self) -> Tensor | None:
        return None if self.B is None else (self.B > 0).to(torch.float64)
