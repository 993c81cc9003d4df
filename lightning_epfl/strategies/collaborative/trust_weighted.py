"""Trust-weighted aggregation of LoRA adapters
=============================================

Personalized collaborative fine-tuning (Wagner, Fan, Jaggi, "Personalized Collaborative Fine-Tuning for On-Device
Large Language Models", arXiv:2404.09753): every client trains its own LoRA adapter on a shared frozen base and,
every ``communicate_every`` steps after ``warmup_steps``, replaces it by a trust-weighted average of all clients'
adapters, ``theta_i <- sum_j W_ij theta_j``, with ``W = softmax_row(S / temperature)`` from trust scores ``S``
(:mod:`lightning_epfl.functional.trust`): weight similarity, prediction similarity on a public reference set, or
validation performance on the client's own data; plus the local, FedAvg and fixed-mixture (oracle) baselines.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.utils._pytree import tree_map

from lightning_epfl.functional.topology import Topology
from lightning_epfl.functional.trust import (
    mix_lora,
    prediction_distances,
    prediction_scores,
    sparsify_top_logits,
    static_weights,
    trust_to_weights,
    validation_scores,
    weight_similarity_scores,
)
from lightning_epfl.strategies.collaborative.algorithm import CollaborativeAlgorithm, StepContext

TrustScheme = Literal["local", "fedavg", "static", "weight_similarity", "validation", "prediction"]
_SCHEMES = ("local", "fedavg", "static", "weight_similarity", "validation", "prediction")


class TrustWeighted(CollaborativeAlgorithm):
    """Trust-weighted aggregation of the communicated tensors (LoRA adapters) every ``communicate_every`` steps.

    Rounds happen after the optimizer steps ``s = warmup_steps, warmup_steps + communicate_every, ...`` (``s``
    counted from 1; with ``warmup_steps=0`` at ``communicate_every, 2 communicate_every, ...``). At a round every
    client's adapter becomes ``sum_j W_ij theta_j``, all rows taken from one snapshot; the optimizer state is left as
    it is (as in the authors' code). Trust schemes (paper, Sec. 3):

    - ``"weight_similarity"``: ``S_ij`` the mean column cosine of the adapters;
    - ``"validation"``: client ``i`` evaluates every adapter on ``validation_batches`` of its own validation batches
      (``datamodule.validation_batches(i, n, round)``), ``S_ij = -exp(L_ij)`` (``validation_score``);
    - ``"prediction"``: every client's top-``prediction_top_logits`` logits on the public reference set
      (``datamodule.reference_batches(n)``), ``S = -prediction_scale * rownorm(L1 distances)``;
    - ``"local"`` (``W = I``), ``"fedavg"`` (``W = 1/n``), ``"static"`` (``W ∝ P Pᵀ`` from the client x domain
      mixture ``static_mixture``, default ``datamodule.client_mixture``: the oracle).

    Trust evaluations run in eval mode (LoRA dropout off), without gradient, vectorized over the adapters. With
    ``CollaborativeStrategy(topology=...)``, pairs that are not neighbours get weight 0.

    Logged at each round: ``trust/self_weight`` and ``trust/row_entropy`` (means over clients), ``trust/group_mass``
    (weight on same-domain clients, self included, with ``datamodule.true_clusters``), ``trust/peer_group_mass``
    (share of the weight on other clients that goes to same-domain ones), ``comm/bytes`` (cumulative
    bytes one client has sent: its adapter each round, plus its top logits for prediction trust). The last ``W``
    is the collaboration matrix (heatmaps through ``CollaborationMatrixLogger``).

    Args:
        trust: The trust scheme (default ``"prediction"``).
        warmup_steps: Local steps before the first round (``>= 0``; reference 100).
        communicate_every: Steps between rounds (``>= 1``; reference 25).
        temperature: Softmax temperature ``tau > 0`` of the trust-weighted schemes.
        prediction_scale: ``c > 0`` of prediction trust (reference 10; softer as ``n`` grows).
        prediction_top_logits: ``q >= 1`` logits kept per position.
        reference_batches: Reference batches per round (prediction trust, ``>= 1``).
        validation_batches: Own validation batches per round (validation trust, ``>= 1``; reference 12).
        validation_score: ``"neg_perplexity"`` (reference) or ``"neg_loss"``.
        top_k: Keep the ``k`` largest scores per row (``None``: all).
        threshold: Keep scores ``>= threshold`` plus the two largest (``None``: all).
        static_mixture: ``[n_clients][C]`` client x domain shares for ``trust="static"`` (default: the datamodule's
            ``client_mixture``).
        mix: ``"parameters"`` (reference code) or ``"updates"`` (``theta_i <- anchor_i + sum_j W_ij (theta_j -
            anchor_j)``, anchors the values after the previous round; the paper text's reading).
        lora_aggregation: ``"factors"`` (``A`` and ``B`` averaged separately, reference) or ``"product"`` (each
            client's ``sum_j W_ij B_j A_j`` truncated back to rank ``r`` by SVD; needs every ``lora_A`` tensor
            communicated with its ``lora_B``).

    Raises:
        MisconfigurationException: On an unknown ``trust``/``validation_score``/``mix``/``lora_aggregation`` or an
            out-of-range number (in ``__init__``); before the run, when the scheme's data is missing: no reference
            set for prediction trust, no ``validation_batches`` for validation trust, no mixture for ``static``,
            or a mixture of the wrong shape.
    """

    name = "trust_weighted"
    uses_topology = True

    def __init__(
        self,
        trust: TrustScheme = "prediction",
        warmup_steps: int = 100,
        communicate_every: int = 25,
        temperature: float = 1.0,
        prediction_scale: float = 10.0,
        prediction_top_logits: int = 100,
        reference_batches: int = 4,
        validation_batches: int = 12,
        validation_score: Literal["neg_perplexity", "neg_loss"] = "neg_perplexity",
        top_k: int | None = None,
        threshold: float | None = None,
        static_mixture: list[list[float]] | None = None,
        mix: Literal["parameters", "updates"] = "parameters",
        lora_aggregation: Literal["factors", "product"] = "factors",
    ) -> None:
        choices = {
            "trust": (trust, _SCHEMES),
            "validation_score": (validation_score, ("neg_perplexity", "neg_loss")),
            "mix": (mix, ("parameters", "updates")),
            "lora_aggregation": (lora_aggregation, ("factors", "product")),
        }
        for arg, (value, allowed) in choices.items():
            if value not in allowed:
                raise MisconfigurationException(f"`{arg}` must be one of {list(allowed)}, got {value!r}.")
        minimum = {
            "warmup_steps": (warmup_steps, 0),
            "communicate_every": (communicate_every, 1),
            "prediction_top_logits": (prediction_top_logits, 1),
            "reference_batches": (reference_batches, 1),
            "validation_batches": (validation_batches, 1),
        }
        for arg, (value, low) in minimum.items():
            if not _is_int(value) or value < low:
                raise MisconfigurationException(f"`{arg}` must be an integer >= {low}, got {value!r}.")
        for arg, value in (("temperature", temperature), ("prediction_scale", prediction_scale)):
            if not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise MisconfigurationException(f"`{arg}` must be a finite number > 0, got {value!r}.")
        if top_k is not None and (not _is_int(top_k) or top_k < 1):
            raise MisconfigurationException(f"`top_k` must be an integer >= 1 or None, got {top_k!r}.")
        if threshold is not None and (not isinstance(threshold, (int, float)) or not math.isfinite(threshold)):
            raise MisconfigurationException(f"`threshold` must be a finite number or None, got {threshold!r}.")
        self.trust = trust
        self.warmup_steps = int(warmup_steps)
        self.communicate_every = int(communicate_every)
        self.temperature = float(temperature)
        self.prediction_scale = float(prediction_scale)
        self.prediction_top_logits = int(prediction_top_logits)
        self.reference_batches = int(reference_batches)
        self.validation_batches = int(validation_batches)
        self.validation_score = validation_score
        self.top_k = top_k
        self.threshold = threshold
        self.static_mixture = static_mixture
        self.mix = mix
        self.lora_aggregation = lora_aggregation
        self.W: Tensor | None = None
        self.rounds = 0
        self.comm_bytes = 0
        self._anchors: Tensor | None = None
        self._clusters: Tensor | None = None
        self._static: Tensor | None = None
        self._mask: Tensor | None = None
        self._pairs: list[tuple[int, int]] = []
        self._metrics: dict[str, float] = {}
        self._n: int | None = None

    # ------------------------------------------------------------------ checks and setup
    def check_config(
        self, trainer: Any, pl_module: Any, datamodule: Any, n_clients: int, topology: Topology | None
    ) -> None:
        """Before the run: the data each scheme needs (reference set, validation batches, mixture)."""
        max_steps = getattr(trainer, "max_steps", -1) if trainer is not None else -1
        if self.trust != "local" and max_steps is not None and 0 < max_steps < max(self.warmup_steps, 1):
            rank_zero_warn(
                f"TrustWeighted: `warmup_steps`={self.warmup_steps} >= `max_steps`={max_steps}: no aggregation round "
                "will happen (every client trains alone).",
                category=UserWarning,
            )
        if self.trust == "prediction":
            fn = getattr(datamodule, "reference_batches", None)
            if fn is None:
                raise MisconfigurationException(
                    "trust='prediction' needs a public reference set: a datamodule with `reference_batches(n)` "
                    "(FederatedTextDataModule(domains=..., reference_fraction > 0))."
                )
            try:
                fn(self.reference_batches)  # raises if the set is missing or too small
            except MisconfigurationException as err:
                raise MisconfigurationException(f"trust='prediction': {err}") from err
            vocab = getattr(datamodule, "vocab_size", None)
            if vocab is not None and self.prediction_top_logits > vocab:
                raise MisconfigurationException(
                    f"`prediction_top_logits`={self.prediction_top_logits} exceeds the vocabulary size ({vocab})."
                )
        if self.trust == "validation" and getattr(datamodule, "validation_batches", None) is None:
            raise MisconfigurationException(
                "trust='validation' needs a datamodule with `validation_batches(client_id, n, round)` "
                "(FederatedTextDataModule)."
            )
        if self.trust == "static":
            self._static_matrix(datamodule, n_clients)

    def _static_matrix(self, datamodule: Any, n_clients: int) -> Tensor:
        mixture = self.static_mixture
        if mixture is None:
            if datamodule is not None and hasattr(datamodule, "setup"):
                datamodule.setup("fit")
            mixture = getattr(datamodule, "client_mixture", None)
        if mixture is None:
            raise MisconfigurationException(
                "trust='static' needs `static_mixture` (client x domain shares) or a datamodule with "
                "`client_mixture` (FederatedTextDataModule(domains=...))."
            )
        P = torch.as_tensor(mixture, dtype=torch.float64)
        if P.ndim != 2 or P.shape[0] != n_clients:
            raise MisconfigurationException(
                f"`static_mixture` must be [n_clients={n_clients}][C], got shape {list(P.shape)}."
            )
        try:
            return static_weights(P)
        except ValueError as err:
            raise MisconfigurationException(f"`static_mixture`: {err}") from err

    def setup(self, ctx: StepContext) -> None:
        n = self._n = ctx.n_clients
        clusters = getattr(ctx.datamodule, "true_clusters", None)
        self._clusters = None if clusters is None else torch.as_tensor(clusters, dtype=torch.long)
        if self.trust == "static":
            self._static = self._static_matrix(ctx.datamodule, n)
        if ctx.topology is not None:
            self._mask = ctx.topology.adjacency.bool() | torch.eye(n, dtype=torch.bool)
        comm = [s for s in ctx.layout if s.communicated]
        if self.lora_aggregation == "product":
            self._pairs = _lora_pairs([s.name for s in comm])
        if self.mix == "updates" and self._anchors is None:
            self._anchors = ctx.comm.all_gather(ctx.X[:, : ctx.d_comm].detach()).clone()

    # ------------------------------------------------------------------ schedule
    def is_round(self, step: int) -> bool:
        """Whether the optimizer step with 0-based index ``step`` ends with an aggregation round."""
        s = step + 1
        return s >= self.warmup_steps and (s - self.warmup_steps) % self.communicate_every == 0

    # ------------------------------------------------------------------ trust
    def _gathered(self, ctx: StepContext) -> Tensor:
        return ctx.comm.all_gather(ctx.X[:, : ctx.d_comm].detach())

    def _tensor_views(self, ctx: StepContext, X_all: Tensor) -> list[Tensor]:
        return [
            X_all[:, s.offset : s.offset + s.numel].reshape(X_all.shape[0], *s.shape)
            for s in ctx.layout
            if s.communicated
        ]

    def _validation_losses(self, ctx: StepContext, X_all: Tensor) -> Tensor:
        """``L[i, j]``: mean token loss of adapter ``j`` on client ``i``'s validation batches (rows of this
        process's clients, ``[n_local, n]``)."""
        n, d_comm = X_all.shape[0], ctx.d_comm
        rows = []
        for p, i in enumerate(ctx.local_ids):
            models = ctx.X[p].detach().expand(n, -1).clone()
            models[:, :d_comm] = X_all
            nll = torch.zeros(n, dtype=torch.float64, device=models.device)
            tokens = torch.zeros_like(nll)
            for batch in ctx.datamodule.validation_batches(i, self.validation_batches, self.rounds):
                m = ctx.stack.metrics(models, _replicate(batch, n, models.device))
                nll += m["nll_sum"].double()
                tokens += m["tokens"].double()
            rows.append(nll / tokens.clamp_min(1))
        return torch.stack(rows)

    def _prediction_distances(self, ctx: StepContext) -> tuple[Tensor, int]:
        """Rows ``[n_local, n]`` of the L1 distances between the clients' top-q reference logits, and the bytes
        one client sends for them."""
        q = self.prediction_top_logits
        D = None
        sent = 0
        for batch in ctx.datamodule.reference_batches(self.reference_batches):
            m = len(ctx.local_ids)
            values, indices = ctx.stack.call(
                "client_logits",
                ctx.X,
                _replicate(batch, m, ctx.X.device),
                transform=lambda z: sparsify_top_logits(z, q),
            )
            values = values.reshape(m, -1, q)
            indices = indices.reshape(m, -1, q)
            sent += (values[0].numel() * values.element_size()) + (indices[0].numel() * indices.element_size())
            values_all, indices_all = ctx.comm.all_gather(values), ctx.comm.all_gather(indices)
            part = prediction_distances(values_all, indices_all, rows=list(ctx.local_ids))
            D = part if D is None else D + part
        assert D is not None
        return D, sent

    def trust_weights(self, ctx: StepContext, X_all: Tensor) -> tuple[Tensor, int]:
        """The ``[n, n]`` float64 aggregation matrix of this round (replicated) and the extra bytes each client sent
        to compute it."""
        n = ctx.n_clients
        if self.trust == "local":
            return torch.eye(n, dtype=torch.float64), 0
        if self.trust == "fedavg":
            W = torch.full((n, n), 1.0 / n, dtype=torch.float64)
            return _masked_rows(W, self._mask), 0
        if self.trust == "static":
            assert self._static is not None
            return _masked_rows(self._static, self._mask), 0
        extra = 0
        if self.trust == "weight_similarity":
            S = weight_similarity_scores(self._tensor_views(ctx, X_all))
        elif self.trust == "validation":
            with _eval_mode(ctx.stack.module):
                L = ctx.comm.all_gather(self._validation_losses(ctx, X_all))
            S = validation_scores(L, self.validation_score)
            extra = n * 8
        else:
            with _eval_mode(ctx.stack.module):
                rows, extra = self._prediction_distances(ctx)
            S = prediction_scores(ctx.comm.all_gather(rows), self.prediction_scale)
        W = trust_to_weights(
            S.double().cpu(), self.temperature, top_k=self.top_k, threshold=self.threshold, mask=self._mask
        )
        return W, extra

    # ------------------------------------------------------------------ round
    def after_optimizer_step(self, ctx: StepContext) -> None:
        self._metrics = {}
        if not self.is_round(ctx.step):
            return
        Xc = ctx.X[:, : ctx.d_comm]
        simple = self.mix == "parameters" and self.lora_aggregation == "factors"
        needs_all = not simple or self.trust in ("weight_similarity", "validation")
        X_all = self._gathered(ctx) if needs_all else Xc
        W, extra = self.trust_weights(ctx, X_all)
        if self.trust != "local":
            if simple:
                Xc.copy_(ctx.comm.mix(Xc, W.to(Xc)))
            else:
                views = self._tensor_views(ctx, X_all)
                anchors = None
                if self.mix == "updates":
                    assert self._anchors is not None
                    anchors = self._tensor_views(ctx, self._anchors.to(Xc))
                mode = "product" if self.lora_aggregation == "product" else "factors"
                mixed = mix_lora(views, W.to(Xc), mode=mode, anchors=anchors, pairs=self._pairs or None)
                local = list(ctx.local_ids)  # every row is mixed (cheap), this process keeps its own
                Xc.copy_(torch.cat([t[local].reshape(len(local), -1) for t in mixed], dim=1))
            if self.mix == "updates":
                self._anchors = self._gathered(ctx).clone()
            self.comm_bytes += ctx.d_comm * Xc.element_size() + extra
        self.W = W
        self.rounds += 1
        self._metrics = self._round_metrics(W)

    def _round_metrics(self, W: Tensor) -> dict[str, float]:
        entropy = -(W * torch.log(W.clamp_min(1e-300))).sum(1)
        out = {
            "trust/self_weight": float(W.diagonal().mean()),
            "trust/row_entropy": float(entropy.mean()),
            "comm/bytes": float(self.comm_bytes),
        }
        if self._clusters is not None and len(self._clusters) == W.shape[0]:
            out["trust/group_mass"] = group_mass(W, self._clusters)
            peers = peer_group_mass(W, self._clusters)
            if not math.isnan(peers):
                out["trust/peer_group_mass"] = peers
        return out

    def step_metrics(self) -> dict[str, float]:
        return self._metrics

    def collaboration_matrix(self) -> Tensor | None:
        """The last round's ``W``; the identity before the first round (every client has trained alone)."""
        if self.W is None and self._n is not None:
            return torch.eye(self._n, dtype=torch.float64)
        return self.W

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"W": self.W, "rounds": self.rounds, "comm_bytes": self.comm_bytes, "anchors": self._anchors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.W = state.get("W")
        self.rounds = int(state.get("rounds", 0))
        self.comm_bytes = int(state.get("comm_bytes", 0))
        self._anchors = state.get("anchors")


def _replicate(batch: Any, m: int, device: torch.device) -> Any:
    """One client batch seen by ``m`` rows: tensors ``[B, ...]`` to ``[m, B, ...]`` (expanded views)."""
    return tree_map(lambda t: t.to(device).unsqueeze(0).expand(m, *t.shape), batch)


def group_mass(W: Tensor, clusters: Tensor) -> float:
    """Mean over rows of the weight on same-group columns (self included): ``mean_i sum_{j: c_j = c_i} W_ij``."""
    same = (clusters[:, None] == clusters[None, :]).to(W)
    return float((W * same).sum(1).mean())


def peer_group_mass(W: Tensor, clusters: Tensor) -> float:
    """Share of the weight on *other* clients that goes to same-group clients, averaged over the rows that give any
    weight to others (``nan`` if none does): 1 for the oracle, ``(g - 1) / (n - 1)`` for FedAvg with groups of
    ``g``, undefined for local training; unlike :func:`group_mass` it does not count the self-weight."""
    same = (clusters[:, None] == clusters[None, :]).to(W)
    off = 1.0 - torch.eye(W.shape[0], dtype=W.dtype)
    others = (W * off).sum(1)
    rows = others > 1e-12
    if not bool(rows.any()):
        return float("nan")
    return float(((W * same * off).sum(1)[rows] / others[rows]).mean())


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _masked_rows(W: Tensor, mask: Tensor | None) -> Tensor:
    """Zero the entries outside ``mask`` and renormalize the rows (fixed matrices on a topology)."""
    if mask is None:
        return W
    W = W * mask.to(W)
    return W / W.sum(1, keepdim=True)


def _lora_pairs(names: list[str]) -> list[tuple[int, int]]:
    """``(index of lora_A, index of lora_B)`` for every adapted layer among the communicated tensor names."""
    index = {name: k for k, name in enumerate(names)}
    pairs = []
    for name, k in index.items():
        if ".lora_A." in name:
            partner = name.replace(".lora_A.", ".lora_B.")
            if partner not in index:
                raise MisconfigurationException(
                    f"lora_aggregation='product' needs `{partner}` communicated with `{name}`."
                )
            pairs.append((k, index[partner]))
    if not pairs:
        raise MisconfigurationException("lora_aggregation='product' found no communicated LoRA (lora_A/lora_B) pair.")
    return pairs


@contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """The module in eval mode (dropout off) inside; its previous mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
