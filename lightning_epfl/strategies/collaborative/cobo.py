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

CoBo exchanges raw parameters and midpoint gradients: it offers **no privacy** (see the Decor strategy for DP), and a
client can inflate its inner products to attract weight (the box caps ``w`` at 1); ``cobo/inner_product_mean`` is
logged for auditing.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_epfl.functional.cobo import (
    cobo_w_update,
    consensus_step,
    pair_probability,
    sample_pairs,
    stability_product,
)
from lightning_epfl.functional.collab_metrics import cluster_assignments
from lightning_epfl.strategies.collaborative.algorithm import CollaborativeAlgorithm, StepContext, derive_seed
from lightning_epfl.strategies.collaborative.baselines import IFCA, Ditto, FedAvg, FedAvgFineTune, Local, Oracle
from lightning_epfl.strategies.collaborative.strategy import CollaborativeStrategy

BASELINES = ("none", "local", "fedavg", "fedavg_ft", "ditto", "ifca", "oracle")


def _check_cobo_args(
    rho: float,
    gamma: float,
    domain: str,
    w_init: float | None,
    pair_sampling: str,
    pair_rate: float,
    pair_decay: float,
    pair_batch_size: int | None,
    update_every: int,
    start_step: int,
    consensus_step: str,
    inner_product: str,
) -> None:
    if rho < 0:
        raise ValueError(f"`rho` must be >= 0, got {rho}.")
    if gamma <= 0:
        raise ValueError(f"`gamma` must be > 0, got {gamma}.")
    if domain not in ("box", "simplex"):
        raise ValueError(f"`domain` must be 'box' or 'simplex', got {domain!r}.")
    if w_init is not None and domain == "simplex" and not 0 < w_init <= 1:
        raise ValueError(f"`w_init` must be in (0, 1] with `domain='simplex'`, got {w_init}.")
    if w_init is not None and domain == "box" and not 0 <= w_init <= 1:
        raise ValueError(f"`w_init` must be in [0, 1] with `domain='box'`, got {w_init}.")
    if pair_sampling not in ("mixed", "constant", "all"):
        raise ValueError(f"`pair_sampling` must be 'mixed', 'constant' or 'all', got {pair_sampling!r}.")
    if pair_rate <= 0:
        raise ValueError(f"`pair_rate` must be > 0, got {pair_rate}.")
    if pair_decay <= 0:
        raise ValueError(f"`pair_decay` must be > 0, got {pair_decay}.")
    if pair_batch_size is not None and (pair_batch_size == 0 or pair_batch_size < -1):
        raise ValueError(f"`pair_batch_size` must be -1 (full local set), None or >= 1, got {pair_batch_size}.")
    if update_every < 1:
        raise ValueError(f"`update_every` must be >= 1, got {update_every}.")
    if start_step < 0:
        raise ValueError(f"`start_step` must be >= 0, got {start_step}.")
    if consensus_step not in ("lr_scaled", "fixed"):
        raise ValueError(f"`consensus_step` must be 'lr_scaled' or 'fixed', got {consensus_step!r}.")
    if inner_product not in ("raw", "cosine"):
        raise ValueError(f"`inner_product` must be 'raw' or 'cosine', got {inner_product!r}.")


class CoBo(CollaborativeAlgorithm):
    """The CoBo update rule (see the module docstring; arguments as in :class:`CoBoStrategy`).

    State (replicated on every process, checkpointed): ``W``. Pairs are drawn from a generator seeded by
    ``(seed, step)``, so the schedule needs no state and is identical in every process layout.
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
        _check_cobo_args(
            rho, gamma, domain, w_init, pair_sampling, pair_rate, pair_decay, pair_batch_size, update_every,
            start_step, consensus_step, inner_product,
        )  # fmt: skip
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
        """Warn if ``eta rho lambda_max(L_W) > 1``; raise if ``> 2`` unless ``allow_unstable`` (cobo.md §1).

        Raises:
            ValueError: If the product exceeds 2 and ``allow_unstable`` is False.
        """
        assert self.W is not None
        prod = stability_product(self.consensus_coefficient(lr), 1.0, self.W)
        if prod > 2 and not self.allow_unstable:
            raise ValueError(
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
        return int(getattr(ctx.datamodule, "batch_size", None) or 16)

    # ------------------------------------------------------------------------------------------------ hooks
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
        self.W = cobo_w_update(self.W, pairs.to(self.W.device), ip.to(self.W), self.gamma, self.domain)

    def before_optimizer_step(self, ctx: StepContext) -> None:
        snapshot = ctx.comm.all_gather(ctx.X.detach().clone())
        self._snapshot = snapshot
        self._metrics = {}
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


class CoBoStrategy(CollaborativeStrategy):
    """CoBo on the collaborative core, with the core's baselines one argument away (``baseline=``).

    Args:
        n_clients: Number of clients (``None``: ``datamodule.n_clients``).
        rho: Consensus strength ``rho >= 0``.
        gamma: W step size ``gamma > 0`` (scale-dependent: 0.01 for ResNet-9/CIFAR, 0.1 for the digits MLP).
        domain: ``"box"`` (``w`` in ``[0, 1]``, symmetric) or ``"simplex"`` (rows on the simplex, the LLM variant).
        w_init: Initial off-diagonal weight (``None``: 1 for box, ``1/(n-1)`` for simplex).
        pair_sampling: ``"mixed"`` (``min(1, r/n)`` during warm-up, then also capped by ``c/sqrt(t+1)``),
            ``"constant"`` (``min(1, r/n)``) or ``"all"``.
        pair_rate: ``r > 0``. pair_warmup_steps: warm-up length. pair_decay: ``c > 0``.
        pair_batch_size: Size of the extra pair batches; ``-1`` = the client's full local set; ``None`` = the
            datamodule's ``batch_size``.
        update_every: W-step period in steps. start_step: first step with a W step.
        consensus_step: ``"lr_scaled"`` (``eta_t rho``) or ``"fixed"`` (``rho``, the LLM variant).
        inner_product: ``"raw"`` (paper) or ``"cosine"`` (scale-free extension, not in the paper).
        communicate: Communicated parameters (see :class:`CollaborativeStrategy`).
        baseline: ``"none"`` (CoBo) or one of the core's baselines with the same data, evaluation and logging.
        ditto_lambda: Ditto's ``lambda``. ifca_clusters: IFCA's ``K`` (required for IFCA).
        finetune_steps: Local steps at the end of FedAvg + fine-tuning.
        allow_unstable: Allow ``eta rho lambda_max(L_W) > 2``.
        seed, execution, client_chunk_size, log_per_client, process_group_backend, start_method: See
            :class:`CollaborativeStrategy`.

    Raises:
        ValueError: ``rho < 0``, ``gamma <= 0``, ``pair_rate <= 0``, ``pair_batch_size`` 0 or below -1, an unknown
            ``baseline``/``domain``/schedule, ``ifca_clusters`` missing for IFCA, ``w_init`` outside its domain; in
            ``setup``: an unstable ``eta rho lambda_max`` (see :meth:`CoBo.check_stability`), Oracle without
            ``datamodule.true_clusters``, and the core's checks.
    """

    strategy_name = "cobo"

    def __init__(
        self,
        n_clients: int | None = None,
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
        communicate: Literal["trainable", "all"] | list[str] = "trainable",
        baseline: Literal["none", "local", "fedavg", "fedavg_ft", "ditto", "ifca", "oracle"] = "none",
        ditto_lambda: float = 1.0,
        ifca_clusters: int | None = None,
        finetune_steps: int = 150,
        allow_unstable: bool = False,
        seed: int = 0,
        execution: Literal["vmap", "loop"] = "vmap",
        client_chunk_size: int | None = None,
        log_per_client: bool = False,
        process_group_backend: str | None = None,
        start_method: Literal["popen", "spawn", "fork"] = "popen",
    ) -> None:
        if baseline not in BASELINES:
            raise ValueError(f"`baseline` must be one of {BASELINES}, got {baseline!r}.")
        if baseline == "ifca" and ifca_clusters is None:
            raise ValueError("`ifca_clusters` must be set when `baseline='ifca'`.")
        algorithm: CollaborativeAlgorithm
        if baseline == "none":
            algorithm = CoBo(
                rho, gamma, domain, w_init, pair_sampling, pair_rate, pair_warmup_steps, pair_decay, pair_batch_size,
                update_every, start_step, consensus_step, inner_product, allow_unstable,
            )  # fmt: skip
        else:
            _check_cobo_args(
                rho, gamma, domain, w_init, pair_sampling, pair_rate, pair_decay, pair_batch_size, update_every,
                start_step, consensus_step, inner_product,
            )  # fmt: skip
            algorithm = {
                "local": lambda: Local(),
                "fedavg": lambda: FedAvg(),
                "fedavg_ft": lambda: FedAvgFineTune(finetune_steps),
                "ditto": lambda: Ditto(ditto_lambda),
                "ifca": lambda: IFCA(int(ifca_clusters)),
                "oracle": lambda: Oracle(),
            }[baseline]()
        super().__init__(
            algorithm=algorithm,
            n_clients=n_clients,
            communicate=communicate,
            execution=execution,
            client_chunk_size=client_chunk_size,
            log_per_client=log_per_client,
            seed=seed,
            process_group_backend=process_group_backend,
            start_method=start_method,
        )
        self.baseline = baseline

    @property
    def W(self) -> Tensor | None:
        """The collaboration matrix ``[n, n]`` (CoBo's learned ``W``; a baseline's matrix otherwise)."""
        return self.algorithm.collaboration_matrix()

    def collaboration_matrix(self) -> Tensor | None:
        """Alias of :attr:`W` (the box-mode diagonal is meaningless)."""
        return self.W

    def cluster_assignments(
        self, k: int | None = None, method: Literal["components", "spectral"] = "components", threshold: float = 0.5
    ) -> Tensor:
        """Cluster labels ``[n]`` read from ``W``: components of ``W > threshold``, or spectral clustering into ``k``.

        Delegates to :func:`lightning_epfl.functional.collab_metrics.cluster_assignments` (``k=None`` with
        ``"spectral"`` uses the number of components).

        Raises:
            ValueError: If no matrix exists yet or ``method`` is unknown.
        """
        W = self.W
        if W is None:
            raise ValueError("no collaboration matrix yet (call after setup).")
        return cluster_assignments(W.cpu(), k=k, method=method, threshold=threshold, seed=self.seed)

    def pair_probability(self, step: int) -> float:
        """``p_t`` of the CoBo schedule at ``step``."""
        if not isinstance(self.algorithm, CoBo):
            raise ValueError("`pair_probability` is defined for `baseline='none'` (CoBo) only.")
        return self.algorithm.pair_probability(step, int(self.n_clients or 0))

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register("cobo", cls, description="CoBo: bilevel collaboration weights (arXiv:2409.05539)")
