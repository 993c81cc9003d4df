"""CoBo
========

Collaborative learning via bilevel optimization (Hashemi, He, Jaggi, NeurIPS 2024, arXiv:2409.05539), on the
collaborative core. Each step (Algorithm 1):

1. **W step** on the snapshot ``X^t``: every pair ``i < j`` is drawn with probability ``p_t``
   (:func:`~lightning_epfl.functional.cobo.pair_probability`); for a drawn pair, ``z = (x_i + x_j) / 2``,
   ``g_i = grad f_i(z; B_i')``, ``g_j = grad f_j(z; B_j')`` on extra batches from each client's *own* data, and
   ``w_ij = w_ji <- Proj(w_ij + gamma <g_i, g_j>)`` (box ``[0, 1]`` or row simplex).
2. **X step**: the user's optimizer takes the gradient step, then the consensus term is applied directly to the
   parameters on the snapshot (never entering momentum/Adam statistics):
   ``x_i <- x_i - eta_t rho sum_k w_ik (x_i^t - x_k^t)``.

CoBo exchanges raw parameters and midpoint gradients: it offers **no privacy** (see the Decor algorithm for DP), and a
client can inflate its inner products to attract weight (the box caps ``w`` at 1); ``cobo/inner_product_mean`` is
logged for auditing.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_epfl.functional.cobo import (
    cobo_w_update,
    consensus_step,
    pair_probability,
    sample_pairs,
    stability_product,
)
from lightning_epfl.seeding import derive_seed
from lightning_epfl.strategies.collaborative.algorithm import CollaborativeAlgorithm, StepContext


class CoBo(CollaborativeAlgorithm):
    """The CoBo update rule (arXiv:2409.05539, Algorithm 1): learned collaboration weights ``W`` and a consensus step.

    State (replicated on every process, checkpointed): ``W``. Pairs are drawn from a generator seeded by
    ``(seed, step)``, so the schedule needs no state and is identical in every process layout. Use it as
    ``CollaborativeStrategy(algorithm=CoBo(rho=0.3, gamma=0.1))``; compare with a baseline by swapping the algorithm
    (``Local()``, ``FedAvg()``, ``Ditto(lam=...)``, ``IFCA(n_clusters=...)``, ``Oracle()``).

    Args:
        rho: Consensus strength ``rho >= 0``.
        gamma: W step size ``gamma > 0`` (scale-dependent: 0.01 for ResNet-9/CIFAR, 0.1 for the digits MLP).
        domain: ``"box"`` (``w`` in ``[0, 1]``, symmetric) or ``"simplex"`` (rows on the simplex, the LLM variant).
        w_init: Initial off-diagonal weight (``None``: 1 for box, ``1/(n-1)`` for simplex).
        pair_sampling: ``"mixed"`` (``min(1, r/n)`` during warm-up, then also capped by ``c/sqrt(t+1)``),
            ``"constant"`` (``min(1, r/n)``) or ``"all"``.
        pair_rate: ``r > 0``.
        pair_warmup_steps: Warm-up length of the pair schedule (``>= 0``).
        pair_decay: ``c > 0``.
        pair_batch_size: Size of the extra pair batches; ``-1`` = the client's full local set; ``None`` = the
            datamodule's ``batch_size``.
        update_every: W-step period in steps (``>= 1``).
        start_step: First step with a W step (``>= 0``).
        consensus_step: ``"lr_scaled"`` (``eta_t rho``) or ``"fixed"`` (``rho``, the LLM variant).
        inner_product: ``"raw"`` (paper) or ``"cosine"`` (scale-free extension, not in the paper).
        allow_unstable: Allow ``eta rho lambda_max(L_W) > 2`` (see :meth:`check_stability`).

    Attributes:
        W: ``[n, n]`` float64 collaboration weights (``None`` before setup).
        last_pairs: ``[m, 2]`` int64 global client ids ``(i, j)``, ``i < j``, of the pairs the W step of the current
            optimizer step updated; ``None`` on a step without W step (``update_every``, ``start_step``).
        last_inner_products: ``[m]`` gradient inner products at the midpoints of ``last_pairs`` (the quantity the W
            step ascends; cosine when ``inner_product="cosine"``), computed in the parameters' dtype and stored as
            float64, for diagnostics; ``None`` with ``last_pairs``.

    Raises:
        MisconfigurationException: For any argument outside the ranges above (the message names it); in
            ``setup``, an unstable ``eta rho lambda_max(L_W) > 2`` unless ``allow_unstable``.
    """

    name = "cobo"

    def __init__(
        self,
        rho: float = 0.05,
        gamma: float = 0.01,
        domain: Literal["box", "simplex"] = "box",
        w_init: float | None = None,
        pair_sampling: Literal["mixed", "constant", "all"] = "mixed",
        pair_rate: float = 2.0,
        pair_warmup_steps: int = 800,
        pair_decay: float = 1.0,
        pair_batch_size: int | None = None,
        update_every: int = 1,
        start_step: int = 0,
        consensus_step: Literal["lr_scaled", "fixed"] = "lr_scaled",
        inner_product: Literal["raw", "cosine"] = "raw",
        allow_unstable: bool = False,
    ) -> None:
        checks = [
            (rho >= 0, f"`rho` must be >= 0, got {rho}."),
            (gamma > 0, f"`gamma` must be > 0, got {gamma}."),
            (domain in ("box", "simplex"), f"`domain` must be 'box' or 'simplex', got {domain!r}."),
            (
                w_init is None or (0 < w_init <= 1 if domain == "simplex" else 0 <= w_init <= 1),
                f"`w_init` must be in {'(0, 1]' if domain == 'simplex' else '[0, 1]'} with `domain={domain!r}`, "
                f"got {w_init}.",
            ),
            (
                pair_sampling in ("mixed", "constant", "all"),
                f"`pair_sampling` must be 'mixed', 'constant' or 'all', got {pair_sampling!r}.",
            ),
            (pair_rate > 0, f"`pair_rate` must be > 0, got {pair_rate}."),
            (pair_warmup_steps >= 0, f"`pair_warmup_steps` must be >= 0, got {pair_warmup_steps}."),
            (pair_decay > 0, f"`pair_decay` must be > 0, got {pair_decay}."),
            (
                pair_batch_size is None or pair_batch_size == -1 or pair_batch_size >= 1,
                f"`pair_batch_size` must be -1 (full local set), None or >= 1, got {pair_batch_size}.",
            ),
            (update_every >= 1, f"`update_every` must be >= 1, got {update_every}."),
            (start_step >= 0, f"`start_step` must be >= 0, got {start_step}."),
            (
                consensus_step in ("lr_scaled", "fixed"),
                f"`consensus_step` must be 'lr_scaled' or 'fixed', got {consensus_step!r}.",
            ),
            (inner_product in ("raw", "cosine"), f"`inner_product` must be 'raw' or 'cosine', got {inner_product!r}."),
        ]
        for ok, message in checks:
            if not ok:
                raise MisconfigurationException(f"CoBo: {message}")
        self.rho = rho
        self.gamma = gamma
        self.domain = domain
        self.w_init = w_init
        self.pair_sampling = pair_sampling
        self.pair_rate = pair_rate
        self.pair_warmup_steps = pair_warmup_steps
        self.pair_decay = pair_decay
        self.pair_batch_size = pair_batch_size
        self.update_every = update_every
        self.start_step = start_step
        self.consensus_step = consensus_step
        self.inner_product = inner_product
        self.allow_unstable = allow_unstable
        self.W: Tensor | None = None
        self._snapshot: Tensor | None = None
        self._metrics: dict[str, float] = {}
        self.last_pairs: Tensor | None = None
        self.last_inner_products: Tensor | None = None

    # ------------------------------------------------------------------------------------------------ helpers
    def initial_W(self, n: int) -> Tensor:
        """``W^0``: ``w_init (11^T - I)`` with ``w_init`` = 1 (box) or ``1/(n-1)`` (simplex) by default."""
        w0 = self.w_init if self.w_init is not None else (1.0 if self.domain == "box" else 1.0 / max(n - 1, 1))
        return w0 * (torch.ones(n, n, dtype=torch.float64) - torch.eye(n, dtype=torch.float64))

    def pair_probability(self, step: int, n_clients: int) -> float:
        """``p_t`` (override point for custom schedules)."""
        return pair_probability(
            step, n_clients, self.pair_sampling, self.pair_rate, self.pair_warmup_steps, self.pair_decay
        )

    def consensus_coefficient(self, lr: float) -> float:
        return lr * self.rho if self.consensus_step == "lr_scaled" else self.rho

    def check_stability(self, lr: float) -> float:
        """Warn if ``eta rho lambda_max(L_W) > 1``; raise if ``> 2`` unless ``allow_unstable``.

        The consensus step ``x <- x - eta rho L_W x`` is a gradient step on ``(1/2) x^T L_W x``; it contracts for
        ``eta rho lambda_max(L_W) < 2`` and is monotone (no oscillation) below 1.

        Raises:
            MisconfigurationException: If the product exceeds 2 and ``allow_unstable`` is False.
        """
        assert self.W is not None
        prod = stability_product(self.consensus_coefficient(lr), 1.0, self.W)
        if prod > 2 and not self.allow_unstable:
            raise MisconfigurationException(
                f"unstable consensus: eta*rho*lambda_max(L_W) = {prod:.3g} > 2 (rho={self.rho}, lr={lr}, "
                f"n={self.W.shape[0]}); lower `rho` or the learning rate, or set `allow_unstable=True`."
            )
        if prod > 1:
            rank_zero_warn(
                f"eta*rho*lambda_max(L_W) = {prod:.3g} > 1: the consensus step may oscillate (`rho`={self.rho}).",
                category=RuntimeWarning,
            )
        return prod

    def _pair_size(self, ctx: StepContext) -> int:
        if self.pair_batch_size is not None:
            return self.pair_batch_size
        size = getattr(ctx.datamodule, "batch_size", None)
        if not size:
            raise MisconfigurationException(
                "CoBo: `pair_batch_size` is None (the datamodule's batch size) but the datamodule has no "
                "`batch_size`; set `pair_batch_size` (-1 for each client's full local set)."
            )
        return int(size)

    # ------------------------------------------------------------------------------------------------ hooks
    def check_config(self, trainer: Any, pl_module: Any, datamodule: Any, n_clients: int, topology: Any) -> None:
        """Before the run: the stability of the consensus step at ``W^0`` and the module's learning rate (read from
        its optimizer factory on a throw-away parameter; skipped when that is not possible)."""
        factory = getattr(pl_module, "optimizer", None)
        if not callable(factory) or self.W is not None:
            return
        try:
            lr = float(factory([torch.nn.Parameter(torch.zeros(1))]).param_groups[0]["lr"])
        except Exception:  # noqa: BLE001 - a factory that needs the real parameters is checked in setup
            return
        self.W = self.initial_W(n_clients)
        try:
            if lr > 0:
                self.check_stability(lr)
        finally:
            self.W = None

    def setup(self, ctx: StepContext) -> None:
        if self.W is None:
            self.W = self.initial_W(ctx.n_clients).to(ctx.X.device)
        if ctx.lr > 0:
            self.check_stability(ctx.lr)

    def w_step(self, ctx: StepContext, snapshot: Tensor) -> None:
        """Sample pairs and update ``W`` from inner products of gradients at the pair midpoints (collective)."""
        n, dc = ctx.n_clients, ctx.d_comm
        p = self.pair_probability(ctx.step, n)
        pairs = sample_pairs(n, p, torch.Generator().manual_seed(derive_seed(ctx.seed, "cobo_pairs", ctx.step)))
        m = pairs.shape[0]
        self.last_pairs, self.last_inner_products = pairs.cpu(), torch.zeros(0, dtype=torch.float64)
        self._metrics.update({"cobo/pair_probability": p, "cobo/pairs_updated": float(m)})
        if m == 0:
            return
        local = set(ctx.local_ids)
        tasks = [(k, e, int(pairs[k, e])) for k in range(m) for e in (0, 1) if int(pairs[k, e]) in local]
        GG = torch.zeros(m, 2, dc, dtype=snapshot.dtype, device=snapshot.device)
        if tasks:
            ks, es, cs = (torch.tensor(col, device=snapshot.device) for col in zip(*tasks))
            rows = snapshot[cs].clone()  # personal (non-communicated) columns stay the evaluating client's own
            rows[:, :dc] = 0.5 * (snapshot[pairs[ks, 0].to(cs), :dc] + snapshot[pairs[ks, 1].to(cs), :dc])
            batch = ctx.extra_batches(cs.tolist(), self._pair_size(ctx), "cobo_pairs")
            G, _ = ctx.loss_and_grad(rows, batch)
            GG[ks, es] = G[:, :dc].to(GG.dtype)
        if ctx.comm.world_size > 1:
            GG = ctx.comm.all_reduce(GG)
        ip = (GG[:, 0] * GG[:, 1]).sum(-1)
        if self.inner_product == "cosine":
            ip = ip / (GG[:, 0].norm(dim=-1) * GG[:, 1].norm(dim=-1)).clamp_min(1e-12)
        self._metrics["cobo/inner_product_mean"] = float(ip.mean())
        self.last_pairs, self.last_inner_products = pairs.cpu(), ip.detach().double().cpu()
        self.W = cobo_w_update(self.W, pairs.to(self.W.device), ip.to(self.W), self.gamma, self.domain)

    def before_optimizer_step(self, ctx: StepContext) -> None:
        snapshot = ctx.comm.all_gather(ctx.X.detach().clone())
        self._snapshot = snapshot
        self._metrics = {}
        self.last_pairs = self.last_inner_products = None
        if ctx.step >= self.start_step and (ctx.step - self.start_step) % self.update_every == 0:
            self.w_step(ctx, snapshot)

    def after_optimizer_step(self, ctx: StepContext) -> None:
        if self._snapshot is None:
            return
        dc = ctx.d_comm
        Xc = ctx.X[:, :dc]
        coef = self.consensus_coefficient(ctx.lr)
        Xc.copy_(consensus_step(Xc, self._snapshot[:, :dc], self.W.to(Xc), list(ctx.local_ids), coef))
        self._snapshot = None
        off = ~torch.eye(self.W.shape[0], dtype=torch.bool, device=self.W.device)
        self._metrics["cobo/w_offdiag_mean"] = float(self.W[off].mean())

    def step_metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    def collaboration_matrix(self) -> Tensor | None:
        return None if self.W is None else self.W.detach().clone()

    def state_dict(self) -> dict[str, Any]:
        return {"W": None if self.W is None else self.W.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("W") is not None:
            device = self.W.device if self.W is not None else "cpu"
            self.W = state["W"].to(device=device, dtype=torch.float64)
