r"""Mixture-of-experts routing math
================================

Pure functions (no Lightning) for sparse mixture-of-experts layers ``y = Σ_{e ∈ I(x)} g_e(x) · E_e(x)`` as studied by
Fan, Messmer & Jaggi, *Towards an empirical understanding of MoE design choices* (arXiv:2402.13089):

* :func:`route_top_k`: softmax router probabilities, top-k expert indices and gate weights (Mixtral-style
  renormalization over the chosen experts for ``k >= 2``; the raw top probability for ``k = 1``);
* :func:`pool_router_logits`: sequence-level routing by pooling token logits over positions (``mean``,
  ``causal_mean``, ``prefix``), padding excluded;
* :func:`load_balancing_loss` (Switch Transformer, arXiv:2101.03961, Eq. 4-6) and :func:`router_z_loss`
  (ST-MoE, arXiv:2202.08906, Eq. 5), and both with the load and router entropy in one pass
  (:func:`router_statistics`);
* :func:`expert_load`: the fraction of assignments each expert receives;
* :func:`moe_dispatch`: run the experts on the rows routed to them (sorted by expert, one grouped computation, no
  loop over tokens) with an optional capacity, and combine the weighted outputs;
* :func:`normalized_mutual_information`: NMI between expert choice and a labelling, from a contingency table
  (arithmetic normalization, as ``sklearn.metrics.normalized_mutual_info_score``);
* :func:`byte_token_classes`: the 7 character classes of byte tokens used to measure syntactic specialization.

Shapes: ``U`` routing units (tokens, positions or sequences), ``E`` experts, ``k`` experts per unit, ``N`` rows of
hidden states of width ``d``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "BYTE_TOKEN_CLASSES",
    "POOLINGS",
    "byte_token_classes",
    "capacity_slots",
    "expert_load",
    "load_balancing_loss",
    "moe_dispatch",
    "normalized_mutual_information",
    "pool_router_logits",
    "route_top_k",
    "router_statistics",
    "router_z_loss",
]

POOLINGS = ("causal_mean", "mean", "prefix")
"""Poolings of :func:`pool_router_logits`."""

BYTE_TOKEN_CLASSES = ("lower", "upper", "digit", "space", "newline", "punctuation", "other")
"""Names of the classes :func:`byte_token_classes` returns, in id order."""


def _router_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64; every other dtype is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_logits(logits: Tensor, name: str = "logits", ndim: int = 2) -> None:
    if not isinstance(logits, Tensor) or logits.ndim != ndim or not logits.is_floating_point():
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"`{name}` must be a floating tensor with {ndim} dims, got {shape}.")


def _check_mask(mask: Tensor | None, shape: tuple[int, ...], name: str = "mask") -> Tensor | None:
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"`{name}` must have shape {tuple(shape)}, got {tuple(mask.shape)}.")
    return mask.bool()


def route_top_k(logits: Tensor, top_k: int, normalize: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    r"""Softmax router: probabilities, top-k gate weights and expert indices.

    ``p = softmax(h)`` over experts (float32, or float64 for float64 logits); ``I`` = the ``top_k`` largest
    probabilities (ties broken by ``torch.topk``, which is implementation-defined). Gate weights:

    * ``top_k >= 2`` and ``normalize``: ``g = p_I / Σ_I p`` (equal to a softmax over the chosen logits, as Mixtral);
    * ``top_k >= 2`` and not ``normalize``: ``g = p_I`` (Switch Transformer);
    * ``top_k == 1``: always ``g = p_top`` (renormalizing would give ``g ≡ 1`` and the router would receive no
      gradient from the main loss).

    Args:
        logits: Router logits ``h``, shape ``[U, E]``.
        top_k: Experts per unit, ``1 <= top_k <= E``.
        normalize: Renormalize the chosen probabilities to sum to 1 (``top_k >= 2`` only). Default ``True``.

    Returns:
        ``(probs [U, E], weights [U, k], indices [U, k])``; ``indices`` are int64, in decreasing probability.

    Raises:
        ValueError: If ``logits`` is not ``[U, E]`` floating, or ``top_k`` is not in ``1..E``.
    """
    _check_logits(logits)
    num_experts = logits.shape[-1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"`top_k` must be an integer in 1..num_experts={num_experts}, got {top_k!r}.")
    probs = torch.softmax(logits.to(_router_dtype(logits)), dim=-1)
    weights, indices = torch.topk(probs, top_k, dim=-1)
    if top_k > 1 and normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights, indices


def pool_router_logits(
    logits: Tensor,
    pooling: Literal["causal_mean", "mean", "prefix"],
    mask: Tensor | None = None,
    prefix_len: int | None = None,
) -> Tensor:
    r"""Pool token router logits over positions for sequence-level routing.

    For a linear router the mean of the token logits equals the logits of the mean hidden state. Padding (``mask``
    0) is excluded from every mean; a position with no valid token at or before it gets zero logits.

    * ``"mean"``: ``s_{b,t} = mean_{τ valid} h_{b,τ}`` for every ``t``: one decision per sequence. Position ``t`` sees
      the tokens after it, so in a causal language model this leaks the future.
    * ``"causal_mean"``: ``s_{b,t} = mean_{τ <= t, τ valid} h_{b,τ}``: a running mean, no look-ahead.
    * ``"prefix"``: positions ``t >= m - 1`` use ``s_{b, m-1}`` (the running mean of the first ``m = prefix_len``
      positions); earlier positions use the running mean. No look-ahead.

    Args:
        logits: Token logits ``h``, shape ``[B, T, E]``.
        pooling: ``"causal_mean"``, ``"mean"`` or ``"prefix"``.
        mask: Valid tokens, ``[B, T]`` (1/``True`` = token, 0 = padding); ``None``: all valid.
        prefix_len: ``m >= 1``, required for ``"prefix"``.

    Returns:
        Pooled logits ``[B, T, E]`` in the router dtype (float32, or float64 for float64 input).

    Raises:
        ValueError: For an unknown ``pooling``, a wrong shape, or a missing / non-positive ``prefix_len``.
    """
    _check_logits(logits, ndim=3)
    if pooling not in POOLINGS:
        raise ValueError(f"`pooling` must be one of {POOLINGS}, got {pooling!r}.")
    if pooling == "prefix" and (isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 1):
        raise ValueError(f"`prefix_len` must be an integer >= 1 for pooling='prefix', got {prefix_len!r}.")
    bsz, seq, _ = logits.shape
    m = _check_mask(mask, (bsz, seq))
    h = logits.to(_router_dtype(logits))
    weight = torch.ones(bsz, seq, 1, dtype=h.dtype, device=h.device) if m is None else m[..., None].to(h.dtype)
    h = h * weight
    if pooling == "mean":
        total = h.sum(dim=1, keepdim=True) / weight.sum(dim=1, keepdim=True).clamp_min(1)
        return total.expand(bsz, seq, h.shape[-1])
    running = h.cumsum(dim=1) / weight.cumsum(dim=1).clamp_min(1)
    if pooling == "prefix" and seq > prefix_len:
        anchor = running[:, prefix_len - 1 : prefix_len].expand(bsz, seq - prefix_len, h.shape[-1])
        running = torch.cat([running[:, :prefix_len], anchor], dim=1)
    return running


def _valid_count(mask: Tensor | None, units: int, like: Tensor) -> Tensor:
    if mask is None:
        return torch.tensor(float(units), dtype=like.dtype, device=like.device)
    return mask.sum().to(like.dtype)


def expert_load(indices: Tensor, num_experts: int, mask: Tensor | None = None) -> Tensor:
    r"""Fraction of assignments each expert receives: ``f_e = (1 / kU) Σ_{u,j} 1[I_{u,j} = e]`` over valid units.

    Args:
        indices: Expert indices ``[U, k]``.
        num_experts: ``E``.
        mask: Valid units ``[U]``; ``None``: all valid.

    Returns:
        ``[E]`` float32 fractions summing to 1 (all zeros when no unit is valid).

    Raises:
        ValueError: If ``indices`` is not ``[U, k]`` or holds values outside ``0..E-1``.
    """
    if indices.ndim != 2:
        raise ValueError(f"`indices` must have shape [U, k], got {tuple(indices.shape)}.")
    m = _check_mask(mask, (indices.shape[0],))
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_experts):
        raise ValueError(f"`indices` must lie in 0..{num_experts - 1}.")
    flat = indices.reshape(-1)
    w = None if m is None else m[:, None].expand_as(indices).reshape(-1).to(torch.float32)
    counts = torch.bincount(flat, weights=w, minlength=num_experts).to(torch.float32)
    return counts / counts.sum().clamp_min(1)


def load_balancing_loss(probs: Tensor, indices: Tensor, num_experts: int, mask: Tensor | None = None) -> Tensor:
    r"""Switch Transformer load-balancing loss ``L_lb = E · Σ_e f_e P_e`` (arXiv:2101.03961, Eq. 4-6, top-k form).

    ``f_e`` is :func:`expert_load` (the fraction of the ``kU`` assignments routed to ``e``, no gradient) and
    ``P_e = mean_u p_{u,e}`` (differentiable), both over valid units. ``L_lb = 1`` for a uniform router with balanced
    assignments and ``E`` when every unit goes to one expert with probability 1. ``transformers``'
    ``load_balancing_loss_func`` for one layer equals ``top_k`` times this value.

    Args:
        probs: Router probabilities ``[U, E]``.
        indices: Chosen experts ``[U, k]``.
        num_experts: ``E``.
        mask: Valid units ``[U]``; ``None``: all valid.

    Returns:
        A scalar (zero when no unit is valid).

    Raises:
        ValueError: On shape mismatches or indices outside ``0..E-1``.
    """
    _check_logits(probs, "probs")
    if probs.shape[-1] != num_experts or indices.shape[0] != probs.shape[0]:
        raise ValueError(
            f"`probs` [U, E={num_experts}] and `indices` [U, k] disagree: {tuple(probs.shape)}, {tuple(indices.shape)}."
        )
    m = _check_mask(mask, (probs.shape[0],))
    f = expert_load(indices, num_experts, m).to(probs.dtype)
    p = probs if m is None else probs * m[:, None].to(probs.dtype)
    mean_p = p.sum(dim=0) / _valid_count(m, probs.shape[0], probs).clamp_min(1)
    return num_experts * (f * mean_p).sum()


def router_z_loss(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""ST-MoE router z-loss ``L_z = mean_u (logsumexp_e h_{u,e})²`` over valid units (arXiv:2202.08906, Eq. 5).

    Args:
        logits: Router logits ``[U, E]`` (computed in float32, or float64 for float64 input).
        mask: Valid units ``[U]``; ``None``: all valid.

    Returns:
        A scalar (zero when no unit is valid).
    """
    _check_logits(logits)
    m = _check_mask(mask, (logits.shape[0],))
    z = torch.logsumexp(logits.to(_router_dtype(logits)), dim=-1) ** 2
    if m is not None:
        z = z * m.to(z.dtype)
    return z.sum() / _valid_count(m, logits.shape[0], z).clamp_min(1)


def router_statistics(
    probs: Tensor,
    indices: Tensor,
    num_experts: int,
    logits: Tensor | None = None,
    mask: Tensor | None = None,
) -> dict[str, Tensor]:
    r"""The auxiliary losses and routing statistics of one routing decision, in one pass.

    Over the valid units: ``lb`` = :func:`load_balancing_loss`, ``z`` = :func:`router_z_loss` (0 without
    ``logits``), ``load`` = :func:`expert_load`, ``mean_probs`` = ``P_e`` (mean router probability per expert) and
    ``entropy`` = the mean entropy (nats) of the units' router distributions, ``logsumexp(h) - Σ_e p_e h_e`` (from
    ``probs`` alone without logits). ``lb`` and ``z`` keep their gradients; the rest is detached.

    Args:
        probs: Router probabilities ``[U, E]``.
        indices: Chosen experts ``[U, k]`` (assumed in ``0..E-1``; not checked, unlike :func:`expert_load`).
        num_experts: ``E``.
        logits: Router logits ``[U, E]`` or ``None``.
        mask: Valid units ``[U]``; ``None``: all valid.

    Returns:
        ``{"lb", "z", "load", "mean_probs", "entropy"}``.
    """
    units, k = indices.shape
    if mask is None:
        count = torch.tensor(float(max(units, 1)), dtype=probs.dtype, device=probs.device)
        mean_p = probs.sum(dim=0) / count
        counts = torch.bincount(indices.reshape(-1), minlength=num_experts)
    else:
        w = mask.to(probs.dtype)
        count = w.sum().clamp_min(1)
        mean_p = (probs * w[:, None]).sum(dim=0) / count
        counts = torch.bincount(indices.reshape(-1), weights=w.repeat_interleave(k), minlength=num_experts)
    load = counts.to(torch.float32) / counts.sum().clamp_min(1)
    lb = num_experts * (load.to(probs.dtype) * mean_p).sum()

    def masked_mean(v: Tensor) -> Tensor:
        return (v if mask is None else v * mask.to(v.dtype)).sum() / count.to(v.dtype)

    with torch.no_grad():
        p = probs.detach()
        if logits is None:
            entropy = masked_mean(-(p * p.clamp_min(1e-30).log()).sum(-1))
    if logits is not None:
        h = logits.to(_router_dtype(logits))
        lse = torch.logsumexp(h, dim=-1)
        z = masked_mean(lse**2)
        with torch.no_grad():
            entropy = masked_mean(lse.detach() - (p.to(h.dtype) * h.detach()).sum(-1))
    else:
        z = probs.new_zeros(())
    return {"lb": lb, "z": z, "load": load, "mean_probs": mean_p.detach(), "entropy": entropy}


def moe_dispatch(
    x: Tensor,
    indices: Tensor,
    weights: Tensor,
    experts: Callable[[Tensor, list[int]], Tensor] | Sequence[Callable[[Tensor], Tensor]],
    capacity: int | None = None,
    *,
    mask: Tensor | None = None,
    num_experts: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Compute ``y_n = Σ_j g_{n,j} · E_{I_{n,j}}(x_n)`` with one grouped expert call (no loop over rows).

    The ``N · k`` assignments are sorted by expert (a stable sort of the choice-major list: all first choices in row
    order, then all second choices, ...), the routed rows are gathered into one ``[M, d]`` matrix whose expert
    ``e`` segment is contiguous, ``experts`` runs once on it, and the weighted outputs are summed back per row with
    ``index_add`` (deterministic on CPU; non-deterministic on GPU, so compare GPU runs with a tolerance).

    Capacity: expert ``e`` keeps at most ``capacity`` assignments, filled first choices in row order, then second
    choices, and so on; the overflow contributes 0 to its row (``kept`` is ``False``). ``None`` is dropless.

    Args:
        x: Rows ``[N, d]``.
        indices: Chosen experts ``[N, k]`` (int64).
        weights: Gate weights ``[N, k]``.
        experts: Either a grouped expert function ``f(rows [M, d], counts) -> [M, d_out]`` whose ``counts`` (a list
            of ``E`` ints) give the length of each expert's contiguous segment of ``rows``, in expert order, or a
            sequence of ``E`` callables ``[n_e, d] -> [n_e, d_out]`` (then called once per expert).
        capacity: Slots per expert (``>= 1``), or ``None`` (dropless, default).
        mask: Valid rows ``[N]``; masked rows are not dispatched (their output is 0, ``kept`` is ``False``) and take
            no capacity. ``None``: all valid.
        num_experts: ``E``; defaults to ``len(experts)`` or ``experts.num_experts``.

    Returns:
        ``(out [N, d_out], kept [N, k])``: the combined output (dtype of the expert output) and which assignments
        were computed.

    Raises:
        ValueError: On shape mismatches, a capacity below 1, or an unknown number of experts.
    """
    if x.ndim != 2:
        raise ValueError(f"`x` must have shape [N, d], got {tuple(x.shape)}.")
    if indices.ndim != 2 or indices.shape[0] != x.shape[0] or tuple(weights.shape) != tuple(indices.shape):
        raise ValueError(
            f"`indices` and `weights` must both have shape [N={x.shape[0]}, k], got {tuple(indices.shape)} and "
            f"{tuple(weights.shape)}."
        )
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
        raise ValueError(f"`capacity` must be None or an integer >= 1, got {capacity!r}.")
    per_expert = isinstance(experts, Sequence)
    if num_experts is None:
        num_experts = len(experts) if per_expert else getattr(experts, "num_experts", None)  # type: ignore[arg-type]
    if num_experts is None:
        raise ValueError("`num_experts` is needed when `experts` is a grouped function without `num_experts`.")
    n, k = indices.shape
    m = _check_mask(mask, (n,))
    device = x.device
    flat_e = indices.t().reshape(-1)  # choice-major: first choices of all rows, then second choices, ...
    position = None  # choice-major ids of the valid assignments (None: all of them)
    if m is not None:
        position = m.repeat(k).nonzero().squeeze(1)
        flat_e = flat_e[position]
    sorted_e, order = torch.sort(flat_e, stable=True)
    counts = torch.bincount(flat_e, minlength=num_experts)
    if capacity is not None:
        starts = counts.cumsum(0) - counts
        keep = (torch.arange(sorted_e.numel(), device=device) - starts[sorted_e]) < capacity
        order = order[keep]
        counts = counts.clamp_max(capacity)
    assignment = order if position is None else position[order]  # choice-major ids, grouped by expert
    rows = assignment % n
    y = _run_experts(x.index_select(0, rows), counts.tolist(), experts, per_expert)
    y = y * weights.t().reshape(-1).index_select(0, assignment)[:, None].to(y.dtype)
    out = torch.zeros(n, y.shape[-1], dtype=y.dtype, device=device).index_add(0, rows, y)
    if capacity is None and position is None:
        return out, torch.ones(n, k, dtype=torch.bool, device=device)
    kept_flat = torch.zeros(n * k, dtype=torch.bool, device=device)
    kept_flat[assignment] = True
    return out, kept_flat.view(k, n).t()


def _run_experts(rows: Tensor, counts: list[int], experts: Any, per_expert: bool) -> Tensor:
    if not per_expert:
        return experts(rows, counts)
    outs = [experts[e](chunk) for e, chunk in enumerate(rows.split(counts)) if counts[e] > 0]
    if not outs:  # nothing routed: infer the output width from an empty call of expert 0
        return experts[0](rows[:0])
    return torch.cat(outs)


def normalized_mutual_information(contingency: Tensor) -> Tensor:
    r"""Normalized mutual information between two labellings from their contingency table.

    ``NMI = I(A; B) / ((H(A) + H(B)) / 2)`` (arithmetic normalization), with natural logarithms, computed in float64.
    Rows and columns with zero counts are ignored. As ``sklearn.metrics.normalized_mutual_info_score``: 1 when both
    labellings have a single (identical) class, 0 when the mutual information is 0.

    Args:
        contingency: Counts ``[E, C]`` (expert × class), non-negative.

    Returns:
        A float64 scalar in ``[0, 1]``.

    Raises:
        ValueError: If the table is not 2-D or has negative entries.
    """
    if contingency.ndim != 2:
        raise ValueError(f"`contingency` must have shape [E, C], got {tuple(contingency.shape)}.")
    c = contingency.detach().to(torch.float64)
    if (c < 0).any():
        raise ValueError("`contingency` must hold non-negative counts.")
    c = c[c.sum(dim=1) > 0][:, c.sum(dim=0) > 0]
    if c.shape[0] <= 1 and c.shape[1] <= 1:
        return torch.tensor(1.0, dtype=torch.float64)
    total = c.sum()
    pij = c / total
    pi, pj = pij.sum(dim=1), pij.sum(dim=0)
    nz = pij > 0
    mi = (pij[nz] * (pij[nz].log() - (pi[:, None] * pj[None, :])[nz].log())).sum().clamp_min(0)
    if float(mi) <= 0:
        return torch.tensor(0.0, dtype=torch.float64)
    h_a = -(pi * pi.log()).sum()
    h_b = -(pj * pj.log()).sum()
    denom = torch.clamp((h_a + h_b) / 2, min=torch.finfo(torch.float64).eps)
    return (mi / denom).clamp(0, 1)


def byte_token_classes(ids: Tensor) -> Tensor:
    r"""Character class of each byte token (ids ``0..255``), for expert-specialization statistics.

    Classes (ids in the order of :data:`BYTE_TOKEN_CLASSES`): 0 ``lower`` (``a-z``), 1 ``upper`` (``A-Z``),
    2 ``digit`` (``0-9``), 3 ``space`` (space, tab), 4 ``newline`` (``\n``, ``\r``), 5 ``punctuation`` (ASCII
    ``string.punctuation``), 6 ``other`` (control bytes, non-ASCII bytes such as UTF-8 continuation bytes).

    Args:
        ids: Integer tensor of byte ids, any shape.

    Returns:
        int64 class ids of the same shape.

    Raises:
        ValueError: If an id is outside ``0..255``.
    """
    if ids.is_floating_point() or (ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > 255)):
        raise ValueError("`ids` must be integer byte ids in 0..255.")
    return _BYTE_CLASS_TABLE.to(ids.device)[ids.long()]


def _byte_class_table() -> Tensor:
    import string

    table = torch.full((256,), 6, dtype=torch.long)
    for chars, cls in (
        (string.ascii_lowercase, 0),
        (string.ascii_uppercase, 1),
        (string.digits, 2),
        (" \t", 3),
        ("\n\r", 4),
        (string.punctuation, 5),
    ):
        table[[ord(ch) for ch in chars]] = cls
    return table


_BYTE_CLASS_TABLE = _byte_class_table()


def capacity_slots(capacity_factor: float, top_k: int, units: int, num_experts: int) -> int:
    r"""Slots per expert ``C = ⌈cf · k · U / E⌉`` (at least 1).

    Raises:
        ValueError: If ``capacity_factor <= 0``.
    """
    if not capacity_factor > 0:
        raise ValueError(f"`capacity_factor` must be > 0, got {capacity_factor!r}.")
    return max(1, math.ceil(capacity_factor * top_k * units / num_experts - 1e-9))
