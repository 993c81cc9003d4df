r"""
Trust scores and trust-weighted LoRA mixing
===========================================

Pure functions (no Lightning) behind trust-weighted collaborative LoRA fine-tuning (Wagner, Fan, Jaggi,
"Personalized Collaborative Fine-Tuning for On-Device Large Language Models", arXiv:2404.09753; reference code
``epfml/personalized-collaborative-llms``, ``src/optim/strategies.py``).

``N`` clients each hold a LoRA adapter ``theta_i``. Every round a score matrix ``S`` (``[N, N]``, higher = more
trusted) is turned into a row-stochastic collaboration matrix

.. math::

    W_{i\cdot} = \mathrm{softmax}(S_{i\cdot} / \tau), \qquad \theta_i \leftarrow \sum_j W_{ij} \theta_j,

with all rows taken from one snapshot (a Jacobi update). The scores come from

* **weight similarity** (:func:`weight_similarity_scores`): mean cosine of the adapters' column vectors;
* **validation** (:func:`validation_scores`): ``S_ij = -exp(L_ij)``, minus the perplexity of model ``j`` on
  client ``i``'s validation data;
* **prediction** (:func:`sparsify_top_logits`, :func:`prediction_distances`, :func:`prediction_scores`):
  ``S = -c D_hat`` with ``D`` the L1 distance of top-``q``-sparsified logits on a public reference set.

Baselines: local ``W = I``, FedAvg ``W = 11^T / N`` and :func:`static_weights` (``W ∝ P P^T``).
:func:`trust_to_weights` adds the paper's variants (top-``k``, threshold) and a topology mask;
:func:`mix_lora` applies ``W`` to stacked LoRA tensors, optionally to updates or to the product ``BA``
(FlexLoRA-style, not in the paper), and :func:`lora_product_truncation_error` reports that mode's truncation error.

Conventions: stacked LoRA tensors are ``[N, *s]`` in peft layout (``lora_A.weight`` ``[r, in]``,
``lora_B.weight`` ``[out, r]``); the ``[N, N]`` score, distance and weight matrices are float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "lora_product_truncation_error",
    "mix_lora",
    "prediction_distances",
    "prediction_scores",
    "sparsify_top_logits",
    "static_weights",
    "trust_to_weights",
    "validation_scores",
    "weight_similarity_scores",
]

ValidationScore = Literal["neg_perplexity", "neg_loss"]
MixMode = Literal["factors", "product"]


# ---------------------------------------------------------------------------------------------------- helpers
def _square(x: Tensor, name: str) -> int:
    if not isinstance(x, Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim != 2 or x.shape[0] != x.shape[1] or x.shape[0] < 1:
        raise ValueError(f"`{name}` must be a non-empty square [N, N] matrix, got shape {tuple(x.shape)}.")
    return x.shape[0]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _float_at_least_32(x: Tensor) -> Tensor:
    if not x.is_floating_point():
        return x.to(torch.float32)
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ------------------------------------------------------------------------------------------------- scores
def weight_similarity_scores(tensors: Sequence[Tensor]) -> Tensor:
    r"""Weight-similarity trust scores (reference ``dynamic``): the mean column cosine of the clients' adapters.

    .. math::

        S_{ij} = \frac{1}{M} \sum_{t} \sum_{c} \cos\big(\theta^{t}_i[:, c], \theta^{t}_j[:, c]\big),

    where ``t`` runs over the tensors, ``c`` over the column vectors of each per-client tensor (vectors along its
    dim 0: a per-client ``[a, b]`` tensor has ``b`` columns of length ``a``; trailing dims beyond the second are
    flattened into columns, a 1-D per-client tensor is one column) and ``M`` is the total number of columns, so
    every column weighs the same (a count-weighted mean over tensors). The reference stores A as ``[in, r]`` and
    B as ``[r, out]`` and takes ``F.cosine_similarity(.., dim=1)`` (row vectors); on peft's transposed layout
    (``lora_A.weight`` ``[r, in]``, ``lora_B.weight`` ``[out, r]``) those rows are these columns.

    A zero column (for example B at its zero initialization) has cosine 0 with every column, itself included (as
    ``F.cosine_similarity``); otherwise the cosine is exact and scale-invariant (float64, no ``eps`` shrinkage).

    Args:
        tensors: Non-empty sequence of client-stacked tensors ``[N, a, *rest]`` (or ``[N, a]``), same ``N``; any
            device and floating dtype.

    Returns:
        ``[N, N]`` float64, symmetric, entries in ``[-1, 1]``.

    Raises:
        ValueError: If ``tensors`` is empty, a tensor has fewer than 2 dims or a different ``N``, or there is no
            column with at least one entry.
    """
    if isinstance(tensors, Tensor) or len(tensors) == 0:
        raise ValueError("`tensors` must be a non-empty sequence of [N, a, ...] tensors.")
    n = None
    total = None
    count = 0
    for k, t in enumerate(tensors):
        if not isinstance(t, Tensor) or t.ndim < 2:
            raise ValueError(f"`tensors[{k}]` must be a tensor [N, a, ...] with at least 2 dims.")
        if n is None:
            n = t.shape[0]
            if n < 1:
                raise ValueError(f"`tensors[{k}]` must hold at least one client, got shape {tuple(t.shape)}.")
        elif t.shape[0] != n:
            raise ValueError(f"`tensors[{k}]` has {t.shape[0]} clients, expected N = {n} (from `tensors[0]`).")
        if t.shape[1] == 0 or t[0].numel() == 0:
            continue
        cols = t.detach().to(torch.float64).reshape(n, t.shape[1], -1)  # [N, a, m]: m columns of length a
        norms = torch.linalg.vector_norm(cols, dim=1, keepdim=True)  # [N, 1, m]
        unit = torch.where(norms > 0, cols / norms.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
        flat = unit.reshape(n, -1)
        part = flat @ flat.T  # sum over this tensor's columns of the pairwise cosines
        total = part if total is None else total + part.to(total.device)
        count += cols.shape[2]
    if total is None or count == 0:
        raise ValueError("`tensors` must contain at least one non-empty column vector.")
    s = total / count
    return ((s + s.T) / 2).clamp(-1.0, 1.0)


def validation_scores(losses: Tensor, score: ValidationScore = "neg_perplexity") -> Tensor:
    r"""Validation trust scores (reference ``dynamic-ref``).

    ``losses[i, j]`` is the mean token loss of model ``j`` on client ``i``'s validation batches (the same batches
    for every ``j``). ``score="neg_perplexity"`` (the reference): :math:`S_{ij} = -\exp(L_{ij})`;
    ``"neg_loss"``: :math:`S_{ij} = -L_{ij}`. Computed in float64, so ``exp`` overflows only for losses above
    ~709 (an infinite loss gives a ``-inf`` score, i.e. weight 0 in :func:`trust_to_weights`).

    Args:
        losses: ``[N, N]`` mean token losses (nats).
        score: ``"neg_perplexity"`` (default) or ``"neg_loss"``.

    Returns:
        ``[N, N]`` float64.

    Raises:
        ValueError: If ``score`` is unknown, ``losses`` is not square or contains NaN.
    """
    if score not in ("neg_perplexity", "neg_loss"):
        raise ValueError(f"`score` must be 'neg_perplexity' or 'neg_loss', got {score!r}.")
    _square(losses, "losses")
    loss = losses.detach().to(torch.float64)
    if bool(torch.isnan(loss).any()):
        raise ValueError("`losses` must not contain NaN.")
    return -torch.exp(loss) if score == "neg_perplexity" else -loss


def sparsify_top_logits(logits: Tensor, q: int) -> tuple[Tensor, Tensor]:
    """The top-``q`` logits of every position (reference ``dynamic-token``, ``q = 100``).

    The selection runs in the input dtype (an exact, order-preserving conversion to float32 would pick the same
    entries) and the values are returned in float32 or higher (bf16/fp16 are upcast; fp64 stays), so that the
    distances of :func:`prediction_distances` are not accumulated in half precision. Values are sorted in
    descending order; ties are broken by ``torch.topk``. Exactly ``q`` entries are kept (the reference keeps every
    entry tied with the ``q``-th value).

    Args:
        logits: ``[..., V]`` logits (any leading dims, e.g. ``[P, V]`` or ``[batch, T, V]``).
        q: Number of entries kept per position, ``1 <= q <= V``.

    Returns:
        ``(values [..., q], indices [..., q])``: float32-or-higher values and int64 vocabulary indices.

    Raises:
        ValueError: If ``logits`` is 0-d or ``q`` is not an integer in ``[1, V]``.
    """
    if not isinstance(logits, Tensor) or logits.ndim < 1:
        raise ValueError("`logits` must be a tensor [..., V] with at least 1 dim.")
    v = logits.shape[-1]
    if not _is_int(q) or not 1 <= q <= v:
        raise ValueError(f"`q` must be an integer in [1, V = {v}], got {q!r}.")
    values, indices = torch.topk(logits.detach(), q, dim=-1)
    return _float_at_least_32(values), indices


def _sorted_support(values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Sort every (client, position) support by vocabulary index, float64 values; check for duplicates."""
    idx, order = torch.sort(indices, dim=-1)
    if idx.shape[-1] > 1 and bool((idx[..., 1:] == idx[..., :-1]).any()):
        raise ValueError("`indices` must be distinct within every (client, position).")
    return torch.gather(values.detach().to(torch.float64), -1, order), idx


def _matched(idx_a: Tensor, idx_b: Tensor) -> tuple[Tensor, Tensor]:
    """For sorted ``[P, q]`` supports: where each of ``idx_a`` occurs in ``idx_b`` (position, found mask)."""
    pos = torch.searchsorted(idx_b, idx_a).clamp_max(idx_b.shape[-1] - 1)
    return pos, torch.gather(idx_b, -1, pos) == idx_a


def _pair_distance(va: Tensor, ia: Tensor, vb: Tensor, ib: Tensor) -> Tensor:
    """``sum |Z_a - Z_b|`` of two sparse supports (sorted ``[P, q]``), without forming dense vectors.

    Over the union of supports: ``|v_a|`` on a-only entries, ``|v_b|`` on b-only entries and ``|v_a - v_b|`` on the
    intersection; every term is non-negative, so there is no cancellation.
    """
    pos_ab, in_b = _matched(ia, ib)
    _, in_a = _matched(ib, ia)
    a_only = torch.where(in_b, 0.0, va.abs()).sum()
    b_only = torch.where(in_a, 0.0, vb.abs()).sum()
    common = torch.where(in_b, (va - torch.gather(vb, -1, pos_ab)).abs(), 0.0).sum()
    return a_only + b_only + common


def prediction_distances(values: Tensor, indices: Tensor, rows: Sequence[int] | None = None) -> Tensor:
    r"""L1 distances of the clients' top-``q``-sparsified logits on a shared reference set.

    With :math:`\tilde Z_i` the dense ``[P, V]`` logits of client ``i`` keeping only its own top ``q`` per position
    (0 elsewhere),

    .. math::

        D_{ij} = \sum_{p} \sum_{v} |\tilde Z_i[p, v] - \tilde Z_j[p, v]|,

    computed on the union of the two supports without forming any dense ``[N, P, V]`` tensor (memory
    ``O(P q)`` per pair, ``O(N^2 P q \log q)`` time). The reference divides by the number of sequences, a constant
    that cancels in :func:`prediction_scores`; ``D`` is additive over positions, so reference batches can be
    accumulated by summing. Every pair ``{i, j}`` is computed by the same code path in a canonical order, so ``D``
    is exactly symmetric and rows computed separately (``rows``) are bit-identical to the full matrix's rows.
    Accumulated in float64.

    Args:
        values: ``[N, P, q]`` top-``q`` logits per client and position (from :func:`sparsify_top_logits`).
        indices: ``[N, P, q]`` their vocabulary indices, distinct within each (client, position).
        rows: Client indices whose rows to compute (default: all ``N``).

    Returns:
        ``[len(rows), N]`` (or ``[N, N]``) float64, non-negative, zero where ``j == i``.

    Raises:
        ValueError: If the shapes are not equal ``[N, P, q]``, ``indices`` is not an integer tensor or has a
            repeated index within a position, or ``rows`` holds an index outside ``[0, N)``.
    """
    if not isinstance(values, Tensor) or not isinstance(indices, Tensor) or values.ndim != 3:
        raise ValueError("`values` and `indices` must be tensors [N, P, q].")
    if indices.shape != values.shape:
        raise ValueError(
            f"`indices` must have the shape of `values` {tuple(values.shape)}, got {tuple(indices.shape)}."
        )
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(f"`indices` must be an integer tensor, got {indices.dtype}.")
    n = values.shape[0]
    if rows is None:
        row_list = list(range(n))
    else:
        row_list = [int(r) for r in rows]
        bad = [r for r in row_list if not 0 <= r < n]
        if bad:
            raise ValueError(f"`rows` must hold client indices in [0, {n}), got {bad}.")
    out = torch.zeros(len(row_list), n, dtype=torch.float64, device=values.device)
    if n == 0 or values.shape[1] == 0 or values.shape[2] == 0:
        return out
    vals, idx = _sorted_support(values, indices.to(torch.int64))
    cache: dict[tuple[int, int], Tensor] = {}
    for r, i in enumerate(row_list):
        for j in range(n):
            if i == j:
                continue
            a, b = min(i, j), max(i, j)
            if (a, b) not in cache:
                cache[(a, b)] = _pair_distance(vals[a], idx[a], vals[b], idx[b])
            out[r, j] = cache[(a, b)]
    return out


def prediction_scores(distances: Tensor, scale: float = 10.0) -> Tensor:
    r"""Prediction trust scores from :func:`prediction_distances`: :math:`S = -c \hat D`.

    :math:`\hat D_{ij} = D_{ij} / \sum_k D_{ik}` (each row L1-normalized, as the reference's
    ``F.normalize(p=1, dim=1)``); a row of zeros (every client predicts the same) stays zero, giving uniform
    weights. Off-diagonal entries of :math:`\hat D` are about ``1/(N-1)``, so the same ``c`` is softer for larger
    ``N``.

    Args:
        distances: ``[N, N]`` non-negative distances.
        scale: ``c >= 0`` (reference: 10).

    Returns:
        ``[N, N]`` float64, entries in ``[-c, 0]``.

    Raises:
        ValueError: If ``distances`` is not square, has negative or non-finite entries, or ``scale`` is negative
            or not finite.
    """
    _square(distances, "distances")
    if not (isinstance(scale, (int, float)) and scale >= 0 and scale != float("inf")):
        raise ValueError(f"`scale` must be a finite number >= 0, got {scale!r}.")
    d = distances.detach().to(torch.float64)
    if not bool(torch.isfinite(d).all()) or bool((d < 0).any()):
        raise ValueError("`distances` must be finite and non-negative.")
    norm = d.sum(dim=1, keepdim=True)
    d_hat = torch.where(norm > 0, d / norm.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return -float(scale) * d_hat


# -------------------------------------------------------------------------------------------------- weights
def trust_to_weights(
    scores: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    threshold: float | None = None,
    min_keep: int = 2,
    mask: Tensor | None = None,
) -> Tensor:
    r"""Row-stochastic collaboration matrix :math:`W_{i\cdot} = \mathrm{softmax}(S_{i\cdot} / \tau)` over kept entries.

    Entries are dropped (set to :math:`-\infty` before the softmax, so their weight is exactly 0) in this order:

    1. ``mask``: entries where ``mask`` is False (a topology); the diagonal is always allowed;
    2. ``top_k``: all but the ``k`` largest scores of each row (reference ``--k``);
    3. ``threshold``: entries with score ``< t``, except the ``min_keep`` largest of each row (reference: keep
       ``> t`` plus the 2 largest, with ``t`` = 0.5 weights, -30 validation, -50 prediction). The threshold
       applies to the raw scores, before the temperature.

    "Largest" is among the entries still kept; ties are broken in favour of the lower column index (a stable
    sort). ``top_k`` and ``min_keep`` above ``N`` keep every entry. A score of ``-inf`` is allowed and gets weight
    0. The reference uses ``-1e9`` instead of ``-inf``, which leaks weight into a row whose kept scores are all
    below ``-1e9``; here dropped entries are exactly 0.

    Args:
        scores: ``[N, N]`` trust scores ``S`` (row ``i``: how much client ``i`` trusts each ``j``).
        temperature: ``tau > 0`` (reference: 1).
        top_k: Keep the ``k >= 1`` largest per row; None keeps all.
        threshold: Keep scores ``>= threshold`` (plus ``min_keep``); None disables.
        min_keep: Entries always kept by the threshold rule, ``>= 1`` (reference: 2).
        mask: ``[N, N]`` bool, True where ``j`` may contribute to ``i``; None allows all.

    Returns:
        ``[N, N]`` float64, non-negative, every row summing to 1, dropped entries exactly 0.

    Raises:
        ValueError: If ``scores`` is not square or has NaN/``+inf`` entries, ``temperature`` is not a finite
            number ``> 0``, ``top_k < 1``, ``min_keep < 1``, ``threshold`` is NaN, ``mask`` is not a bool
            ``[N, N]`` tensor, or a row keeps no finite score.
    """
    n = _square(scores, "scores")
    s = scores.detach().to(torch.float64)
    if bool(torch.isnan(s).any()) or bool((s == float("inf")).any()):
        raise ValueError("`scores` must not contain NaN or +inf.")
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ValueError(f"`temperature` must be a finite number > 0, got {temperature!r}.")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"`top_k` must be None or an integer >= 1, got {top_k!r}.")
    if not _is_int(min_keep) or min_keep < 1:
        raise ValueError(f"`min_keep` must be an integer >= 1, got {min_keep!r}.")
    if threshold is not None and (not isinstance(threshold, (int, float)) or threshold != threshold):
        raise ValueError(f"`threshold` must be None or a number, got {threshold!r}.")
    keep = torch.ones(n, n, dtype=torch.bool, device=s.device)
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (n, n):
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"`mask` must be a bool tensor of shape ({n}, {n}), got {shape}.")
        keep = mask.to(s.device).clone()
        keep.fill_diagonal_(True)

    def largest(kept: Tensor, k: int) -> Tensor:
        """The ``k`` largest kept entries per row (stable: lower index first on ties)."""
        masked = torch.where(kept, s, float("-inf"))
        order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, : min(k, n)]
        return torch.zeros_like(kept).scatter_(1, order, True) & kept

    if top_k is not None:
        keep = largest(keep, top_k)
    if threshold is not None:
        keep = keep & ((s >= threshold) | largest(keep, min_keep))
    logits = torch.where(keep, s / float(temperature), float("-inf"))
    finite = torch.isfinite(logits).any(dim=1)
    if not bool(finite.all()):
        i = int(torch.nonzero(~finite)[0])
        raise ValueError(f"`scores` row {i} keeps no finite entry; cannot form a probability row.")
    return torch.softmax(logits, dim=1)


def static_weights(mixture: Tensor) -> Tensor:
    r"""Static (oracle) collaboration matrix :math:`W \propto P P^T`, rows normalized (baseline ``static``).

    ``P[i, c]`` is the share of category ``c`` in client ``i``'s data. Each row of ``P`` is first normalized to sum
    to 1 (a no-op for proportions; counts become proportions), then
    :math:`W_{ij} = \langle P_i, P_j \rangle / \sum_k \langle P_i, P_k \rangle`. A one-hot ``P`` gives uniform
    weights within each category group (the core's ``Oracle`` grouping). The reference ``main`` computes this
    matrix and discards it (a bug); its ``rebutal`` branch uses it.

    Args:
        mixture: ``[N, C]`` non-negative category mixture.

    Returns:
        ``[N, N]`` float64, symmetric support, rows summing to 1.

    Raises:
        ValueError: If ``mixture`` is not a non-empty 2-D tensor, has negative or non-finite entries, or a client has
            an all-zero row.
    """
    if not isinstance(mixture, Tensor) or mixture.ndim != 2 or mixture.shape[0] < 1 or mixture.shape[1] < 1:
        shape = tuple(mixture.shape) if isinstance(mixture, Tensor) else type(mixture).__name__
        raise ValueError(f"`mixture` must be a non-empty [N, C] tensor, got {shape}.")
    p = mixture.detach().to(torch.float64)
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
        raise ValueError("`mixture` must be finite and non-negative.")
    row = p.sum(dim=1, keepdim=True)
    if bool((row == 0).any()):
        i = int(torch.nonzero(row.flatten() == 0)[0])
        raise ValueError(f"`mixture` row {i} is all zero; every client needs a non-zero category mixture.")
    p = p / row
    g = p @ p.T
    return g / g.sum(dim=1, keepdim=True)


# --------------------------------------------------------------------------------------------------- mixing
def _check_stack(tensors: Sequence[Tensor], w: Tensor, anchors: Sequence[Tensor] | None) -> int:
    n = _square(w, "W")
    if isinstance(tensors, Tensor) or len(tensors) == 0:
        raise ValueError("`tensors` must be a non-empty sequence of [N, ...] tensors.")
    for k, t in enumerate(tensors):
        if not isinstance(t, Tensor) or t.ndim < 1 or t.shape[0] != n:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"`tensors[{k}]` must be a tensor [N = {n}, ...] (from `W`), got {shape}.")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("`W` must be finite.")
    if anchors is not None:
        if isinstance(anchors, Tensor) or len(anchors) != len(tensors):
            raise ValueError(f"`anchors` must be a sequence of {len(tensors)} tensors, one per `tensors` entry.")
        for k, (a, t) in enumerate(zip(anchors, tensors)):
            if not isinstance(a, Tensor) or a.shape != t.shape:
                shape = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
                raise ValueError(f"`anchors[{k}]` must have the shape of `tensors[{k}]` {tuple(t.shape)}, got {shape}.")
    return n


def _check_pairs(tensors: Sequence[Tensor], pairs: Sequence[tuple[int, int]] | None) -> list[tuple[int, int]]:
    if pairs is None or len(pairs) == 0:
        raise ValueError("`pairs` must list at least one (index_of_A, index_of_B) with mode='product'.")
    seen: set[int] = set()
    out = []
    for p in pairs:
        if len(p) != 2 or not all(_is_int(x) and 0 <= x < len(tensors) for x in p):
            raise ValueError(f"`pairs` entries must be (index_of_A, index_of_B) in [0, {len(tensors)}), got {p!r}.")
        ia, ib = p
        if ia == ib or ia in seen or ib in seen:
            raise ValueError(f"`pairs` must use every tensor index at most once, got {list(pairs)!r}.")
        seen.update(p)
        a, b = tensors[ia], tensors[ib]
        if a.ndim != 3 or b.ndim != 3 or a.shape[1] != b.shape[2] or a.shape[1] < 1:
            raise ValueError(
                f"`pairs` entry {p!r} must point to A [N, r, in] and B [N, out, r] with the same r >= 1 (peft "
                f"layout), got A {tuple(a.shape)} and B {tuple(b.shape)}."
            )
        out.append((ia, ib))
    return out


def _mix_factor(t: Tensor, w: Tensor, anchor: Tensor | None) -> Tensor:
    """``sum_j W_ij t_j`` (or ``anchor_i + sum_j W_ij (t_j - anchor_j)``) as a new tensor, in ``t``'s dtype."""
    dtype = t.dtype if t.is_floating_point() and t.element_size() >= 4 else torch.float32
    x = t.detach().to(dtype)
    wm = w.to(device=t.device, dtype=dtype)
    if anchor is None:
        out = torch.tensordot(wm, x, dims=1)
    else:
        base = anchor.detach().to(device=t.device, dtype=dtype)
        out = base + torch.tensordot(wm, x - base, dims=1)
    return out.to(t.dtype)


def _product_mix(
    a: Tensor, b: Tensor, w: Tensor, anchor_a: Tensor | None, anchor_b: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-r SVD of ``M_i = sum_j W_ij B_j A_j`` (+ anchor terms) for every client: ``(A_new, B_new, tail^2)``.

    ``M_i = B_cat diag(c_i (x) 1_r) A_cat`` with the clients' factors concatenated, so one QR of each concatenation
    reduces every client's SVD to that of a small ``[<= K, <= K]`` core (``K = N r``, or ``2 N r`` with anchors);
    the singular values are those of ``M_i`` and no ``[out, in]`` matrix is formed. float64 throughout.
    """
    n, r, _ = a.shape
    f64 = torch.float64
    dev = a.device
    coef = w.to(device=dev, dtype=f64)
    bs = [b.detach().to(f64)]
    as_ = [a.detach().to(f64)]
    if anchor_a is not None and anchor_b is not None:
        bs.append(anchor_b.detach().to(device=dev, dtype=f64))
        as_.append(anchor_a.detach().to(device=dev, dtype=f64))
        coef = torch.cat([coef, torch.eye(n, dtype=f64, device=dev) - coef], dim=1)  # anchor_i + sum W (P - anchor)
    b_cat = torch.cat([x.permute(1, 0, 2).reshape(x.shape[1], -1) for x in bs], dim=1)  # [out, K]
    a_cat = torch.cat([x.reshape(-1, x.shape[2]) for x in as_], dim=0)  # [K, in]
    q_b, r_b = torch.linalg.qr(b_cat)  # [out, kb], [kb, K]
    q_a, r_a = torch.linalg.qr(a_cat.T)  # [in, ka], [ka, K]
    d = coef.repeat_interleave(r, dim=1)  # [N, K]
    core = (r_b.unsqueeze(0) * d.unsqueeze(1)) @ r_a.T  # [N, kb, ka]
    u_c, s, vh_c = torch.linalg.svd(core, full_matrices=False)  # [N, kb, k], [N, k], [N, k, ka]
    k = s.shape[1]
    keep = min(r, k)
    u = q_b @ u_c[:, :, :keep]  # [N, out, keep]
    vh = vh_c[:, :keep, :] @ q_a.T  # [N, keep, in]
    s_r = s[:, :keep]
    # deterministic signs: the largest-magnitude entry of every left singular vector is positive
    pivot = torch.gather(u, 1, u.abs().argmax(dim=1, keepdim=True))  # [N, 1, keep]
    sign = torch.where(pivot < 0, -1.0, 1.0).to(f64)
    u = u * sign
    vh = vh * sign.transpose(1, 2)
    root = s_r.sqrt()
    b_new = torch.zeros(n, b.shape[1], r, dtype=f64, device=dev)
    a_new = torch.zeros(n, r, a.shape[2], dtype=f64, device=dev)
    b_new[:, :, :keep] = u * root.unsqueeze(1)
    a_new[:, :keep, :] = root.unsqueeze(2) * vh
    tail_sq = (s[:, keep:] ** 2).sum(dim=1)
    return a_new, b_new, tail_sq


def mix_lora(
    tensors: Sequence[Tensor],
    W: Tensor,
    mode: MixMode = "factors",
    anchors: Sequence[Tensor] | None = None,
    pairs: Sequence[tuple[int, int]] | None = None,
) -> list[Tensor]:
    r"""Trust-weighted mixing of client-stacked LoRA tensors, all rows from one snapshot (a Jacobi update).

    ``mode="factors"`` (the reference's ``lora_aggregation``): every tensor is mixed on its own,
    :math:`t_i \leftarrow \sum_j W_{ij} t_j` (``mix="parameters"``, which produced the published numbers); with
    ``anchors`` (the values right after the previous round, ``mix="updates"``, the paper text's reading)
    :math:`t_i \leftarrow \bar t_i + \sum_j W_{ij} (t_j - \bar t_j)`. For a row-stochastic ``W`` and anchors all
    equal to one tensor, both coincide. A and B are averaged separately, so
    :math:`\sum_j W_{ij} B_j A_j \ne (\sum_j W_{ij} B_j)(\sum_j W_{ij} A_j)` in general.

    ``mode="product"`` (FlexLoRA-style, not in the paper): for each ``(index_of_A, index_of_B)`` in ``pairs`` (peft
    layout, A ``[N, r, in]``, B ``[N, out, r]``) form :math:`M_i = \sum_j W_{ij} B_j A_j` (with anchors:
    :math:`\bar B_i \bar A_i + \sum_j W_{ij} (B_j A_j - \bar B_j \bar A_j)`), take its rank-``r`` truncated SVD
    :math:`U_r S_r V_r^T` (Eckart–Young: the best rank-``r`` approximation in Frobenius norm) and set
    :math:`B_i = U_r S_r^{1/2}`, :math:`A_i = S_r^{1/2} V_r^T`. Signs are fixed (the largest-magnitude entry of
    each column of :math:`U_r` is positive), so the factors depend only on :math:`M_i` when its top ``r``
    singular values are distinct. The SVD goes through a QR of the concatenated factors, never forming an
    ``[out, in]`` matrix; it runs in float64. Tensors in no pair are mixed as in ``"factors"``. The truncation
    error is given by :func:`lora_product_truncation_error` (a separate function, so that this one has a single
    return type; its cost is that of the small SVDs only).

    The inputs are never modified; the outputs are new tensors in each input's dtype and device (mixing runs in
    float32 or higher).

    Args:
        tensors: Client-stacked tensors ``tensors[k]`` ``[N, *s_k]``.
        W: ``[N, N]`` mixing matrix, normally row-stochastic (:func:`trust_to_weights`); ``W[i, j]`` is the weight
            of client ``j`` in client ``i``'s new value.
        mode: ``"factors"`` (default) or ``"product"``.
        anchors: Same shapes as ``tensors``: mix updates relative to them instead of parameters.
        pairs: ``(index_of_A, index_of_B)`` into ``tensors``, each index used once; required for ``"product"``
            (and only allowed there).

    Returns:
        New tensors, ``out[k]`` with the shape of ``tensors[k]``.

    Raises:
        ValueError: On an unknown ``mode``, ``W`` not square or not finite, a tensor whose first dim is not ``N``,
            ``anchors`` of another length or shape, ``pairs`` missing (``"product"``) or given (``"factors"``), or a
            pair that does not point to A ``[N, r, in]`` and B ``[N, out, r]`` with a common ``r``.
    """
    if mode not in ("factors", "product"):
        raise ValueError(f"`mode` must be 'factors' or 'product', got {mode!r}.")
    _check_stack(tensors, W, anchors)
    if mode == "factors" and pairs is not None:
        raise ValueError("`pairs` is only used with mode='product'.")
    w = W.detach()
    out: list[Tensor | None] = [None] * len(tensors)
    if mode == "product":
        for ia, ib in _check_pairs(tensors, pairs):
            a, b = tensors[ia], tensors[ib]
            anc_a = anchors[ia] if anchors is not None else None
            anc_b = anchors[ib] if anchors is not None else None
            a_new, b_new, _ = _product_mix(a, b, w, anc_a, anc_b)
            out[ia] = a_new.to(a.dtype)
            out[ib] = b_new.to(b.dtype)
    for k, t in enumerate(tensors):
        if out[k] is None:
            out[k] = _mix_factor(t, w, anchors[k] if anchors is not None else None)
    return out  # type: ignore[return-value]


def lora_product_truncation_error(
    tensors: Sequence[Tensor],
    W: Tensor,
    pairs: Sequence[tuple[int, int]],
    anchors: Sequence[Tensor] | None = None,
) -> Tensor:
    r"""Per-client Frobenius norm of what :func:`mix_lora` ``mode="product"`` discards.

    For each pair, :math:`\|M_i - B_i A_i\|_F = (\sum_{k > r} \sigma_k(M_i)^2)^{1/2}` (Eckart–Young), computed from
    the discarded singular values directly (no cancellation). Over several pairs (layers) the per-pair errors are
    combined as :math:`(\sum_{pairs} \mathrm{err}^2)^{1/2}`, the Frobenius norm of all discarded parts together.
    Same arguments and checks as :func:`mix_lora`; the computation is repeated (it is the cost of ``N`` SVDs of
    at most ``[N r, N r]`` cores per pair).

    Args:
        tensors: Client-stacked tensors, as in :func:`mix_lora`.
        W: ``[N, N]`` mixing matrix.
        pairs: ``(index_of_A, index_of_B)`` into ``tensors`` (peft layout).
        anchors: Optional anchors, as in :func:`mix_lora`.

    Returns:
        ``[N]`` float64, non-negative.

    Raises:
        ValueError: As :func:`mix_lora` with ``mode="product"``.
    """
    n = _check_stack(tensors, W, anchors)
    total = torch.zeros(n, dtype=torch.float64, device=tensors[0].device)
    for ia, ib in _check_pairs(tensors, pairs):
        anc_a = anchors[ia] if anchors is not None else None
        anc_b = anchors[ib] if anchors is not None else None
        _, _, tail_sq = _product_mix(tensors[ia], tensors[ib], W.detach(), anc_a, anc_b)
        total = total + tail_sq.to(total.device)
    return total.sqrt()
