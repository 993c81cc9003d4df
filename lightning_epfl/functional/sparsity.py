r"""
Weight sparsity: magnitude / Wanda masks, SparseGPT, and sparse-then-quantize composition
========================================================================================

Pure PyTorch building blocks for the sparsity part of a sparse-then-quantize export, following Harma et al.,
"Effective Interplay between Sparsity and Quantization: From Theory to Practice" (arXiv:2405.20935).

Conventions
-----------
* **Layouts.** Weights are ``[out, in]`` (``torch.nn.Linear``); a layer computes ``y = x Wᵀ`` for row vectors
  ``x`` (``[..., in]``). Masks are boolean tensors of the weight's shape, ``True`` = keep.
* **Patterns.** *Unstructured*: keep the ``k = ⌊(1 - s)·c + 1/2⌋`` largest scores (``s`` the sparsity, ``c`` the
  number of entries per row for ``scope="row"`` or of the whole tensor for ``scope="tensor"``; round half up).
  *N:M*: keep exactly ``n`` of every ``m`` consecutive entries along the last (input) dimension.
* **Tie-breaking.** Stable: among equal scores the entry with the *lower index* (row-major flat index for
  ``scope="tensor"``, column index otherwise) is kept. Masks are therefore deterministic.
* **Scores.** Magnitude ``|W_ij|``; Wanda (Sun et al., arXiv:2306.11695) ``|W_ij|·‖X_{:,j}‖₂``; SparseGPT
  (Frantar & Alistarh, arXiv:2301.00774) the OBS saliency ``W_ij² / [H_F⁻¹]_jj = W_ij² / U_jj²`` with ``U`` the
  upper Cholesky factor of the dampened inverse Hessian (``H = 2XᵀX/N``) and ``F`` the not yet processed columns.
* **Sparse + quantize.** With a mask ``m`` and a fake quantizer ``Q``: ``SQ = m ⊙ Q(m ⊙ W)`` (prune, then quantize
  with scales re-derived on the pruned tensor), ``QS = m' ⊙ Q(W)`` (quantize, then prune with a mask ``m'``
  recomputed on ``|Q(W)|``). Harma et al. show SQ is the better order; :func:`orthogonality` reports whether the
  combined error exceeds the sum of the individual errors.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from lightning_epfl.functional.quantize import inverse_hessian_cholesky, obs_sweep

__all__ = [
    "input_norms",
    "magnitude_mask",
    "orthogonality",
    "sparse_quantize",
    "sparsegpt_prune",
    "wanda_scores",
]

PATTERNS = ("unstructured", "n:m")
SCOPES = ("tensor", "row")
ORDERS = ("SQ", "QS")


# ----------------------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------------------


def _check_float(x: Tensor, name: str, ndim: int | None = None) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x))}.")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"`{name}` must be {ndim}-D, got shape {list(x.shape)}.")


def _check_int(value: int, name: str, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < lo:
        raise ValueError(f"`{name}` must be an int >= {lo}, got {value!r}.")
    return int(value)


def _check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0 <= sparsity < 1:
        raise ValueError(f"`sparsity` must be a number in [0, 1), got {sparsity!r}.")
    return float(sparsity)


def _check_nm(n: int, m: int, in_features: int) -> tuple[int, int]:
    n = _check_int(n, "n")
    m = _check_int(m, "m")
    if n > m:
        raise ValueError(f"`n` must satisfy 1 <= n <= m, got n={n} > m={m}.")
    if in_features % m != 0:
        raise ValueError(f"`m` ({m}) must divide in_features (the last dimension, {in_features}).")
    return n, m


def _check_pattern(pattern: str) -> None:
    if pattern not in PATTERNS:
        raise ValueError(f"`pattern` must be one of {PATTERNS}, got {pattern!r}.")


def _keep_count(sparsity: float, count: int) -> int:
    """``⌊(1 - s)·count + 1/2⌋`` (round half up), with a tolerance against float artifacts."""
    return min(count, int(math.floor((1.0 - sparsity) * count + 0.5 + 1e-9)))


def _top_k_mask(scores: Tensor, k: int) -> Tensor:
    """Keeps the ``k`` largest entries of every slice along the last dim; ties keep the lower index."""
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k > 0:
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)
        mask.scatter_(-1, order[..., :k], True)
    return mask


# ----------------------------------------------------------------------------------------------------------------------
# masks and scores
# ----------------------------------------------------------------------------------------------------------------------


def magnitude_mask(
    w: Tensor,
    sparsity: float = 0.5,
    *,
    pattern: Literal["unstructured", "n:m"] = "n:m",
    n: int = 2,
    m: int = 4,
    scope: Literal["tensor", "row"] = "row",
    scores: Tensor | None = None,
) -> Tensor:
    r"""Boolean keep-mask from scores (default ``|w|``): unstructured top-k or N:M.

    * ``pattern="unstructured"``: keeps the ``k = ⌊(1 - s)·c + 1/2⌋`` highest scores of every row
      (``scope="row"``, ``c = in``) or of the whole tensor (``scope="tensor"``, ``c = w.numel()``).
    * ``pattern="n:m"``: keeps exactly the ``n`` highest scores of every group of ``m`` consecutive entries along the
      last dimension (``sparsity`` and ``scope`` are not used, but ``sparsity`` is still validated).

    Ties: among equal scores the lower (flat row-major for ``scope="tensor"``) index is kept.

    Args:
        w: Floating weight with ``ndim >= 1``, usually ``[out, in]``; for ``scope="row"`` every slice along the last
            dimension is a row.
        sparsity: Fraction ``s ∈ [0, 1)`` of entries to remove (unstructured). Default ``0.5``.
        pattern: ``"unstructured"`` or ``"n:m"``. Default ``"n:m"``.
        n: Entries kept per group (``1 <= n <= m``). Default ``2``.
        m: Group length; must divide ``w.shape[-1]``. Default ``4``.
        scope: ``"row"`` (default) or ``"tensor"``: where the unstructured top-k is taken.
        scores: Floating tensor of ``w``'s shape (higher = more important, no NaN). Default ``None`` (``|w|``).

    Returns:
        Bool tensor of ``w``'s shape, ``True`` = keep.

    Raises:
        ValueError: On a non-floating or 0-D ``w``; ``scores`` of a wrong shape or with NaN; ``sparsity`` outside
            ``[0, 1)``; unknown ``pattern`` / ``scope``; ``n < 1``, ``n > m`` or ``m`` not dividing ``w.shape[-1]``.
    """
    _check_float(w, "w")
    if w.ndim == 0:
        raise ValueError("`w` must have at least one dimension.")
    sparsity = _check_sparsity(sparsity)
    _check_pattern(pattern)
    if scope not in SCOPES:
        raise ValueError(f"`scope` must be one of {SCOPES}, got {scope!r}.")
    if scores is None:
        scores = w.detach().abs()
    else:
        _check_float(scores, "scores")
        if scores.shape != w.shape:
            raise ValueError(f"`scores` must have w's shape {list(w.shape)}, got {list(scores.shape)}.")
        if bool(torch.isnan(scores).any()):
            raise ValueError("`scores` contains NaN.")
        scores = scores.detach()
    if pattern == "n:m":
        n, m = _check_nm(n, m, w.shape[-1])
        grouped = scores.unflatten(-1, (w.shape[-1] // m, m))
        return _top_k_mask(grouped, n).reshape(w.shape)
    if scope == "row":
        return _top_k_mask(scores, _keep_count(sparsity, w.shape[-1]))
    flat = scores.reshape(-1)
    return _top_k_mask(flat, _keep_count(sparsity, flat.numel())).reshape(w.shape)


def input_norms(x: Tensor) -> Tensor:
    r"""Column norms ``‖X_{:,j}‖₂`` of calibration activations (all leading dimensions flattened into tokens).

    Args:
        x: Floating ``[..., in]`` activations (at least 1-D).

    Returns:
        ``[in]`` tensor, computed in float64 and returned in float64 for float64 ``x``, else float32.

    Raises:
        ValueError: On a non-floating or 0-D ``x``.
    """
    _check_float(x, "x")
    if x.ndim == 0:
        raise ValueError("`x` must have shape [..., in], got a 0-D tensor.")
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    tokens = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    return torch.linalg.vector_norm(tokens, dim=0).to(out_dtype)


def wanda_scores(w: Tensor, act_norm: Tensor) -> Tensor:
    r"""Wanda importance ``S_ij = |W_ij| · ‖X_{:,j}‖₂`` (Sun et al., arXiv:2306.11695).

    Args:
        w: Weight ``[out, in]``, floating.
        act_norm: ``[in]`` non-negative input-feature norms, e.g. :func:`input_norms` of the calibration inputs.

    Returns:
        ``[out, in]`` scores in the promoted dtype of ``w`` and ``act_norm``; pass them to :func:`magnitude_mask`
        as ``scores`` (Wanda uses ``scope="row"``).

    Raises:
        ValueError: If ``w`` is not 2-D floating, ``act_norm`` is not ``[in]`` floating or has negative entries.
    """
    _check_float(w, "w", ndim=2)
    _check_float(act_norm, "act_norm", ndim=1)
    if act_norm.shape[0] != w.shape[1]:
        raise ValueError(f"`act_norm` must have shape [in] = [{w.shape[1]}], got {list(act_norm.shape)}.")
    if bool((act_norm < 0).any()):
        raise ValueError("`act_norm` must be non-negative.")
    return w.detach().abs() * act_norm.detach().to(w.device).unsqueeze(0)


# ----------------------------------------------------------------------------------------------------------------------
# SparseGPT
# ----------------------------------------------------------------------------------------------------------------------


def sparsegpt_prune(
    w: Tensor,
    hessian: Tensor,
    *,
    sparsity: float = 0.5,
    pattern: Literal["unstructured", "n:m"] = "unstructured",
    n: int = 2,
    m: int = 4,
    block_size: int = 128,
    damp: float = 0.01,
    mask_block: int = 128,
    quantize_fn: Callable[[Tensor, int], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    r"""SparseGPT pruning (Frantar & Alistarh, arXiv:2301.00774) on top of :func:`obs_sweep`.

    Minimizes ``‖XWᵀ - XŴᵀ‖²`` column by column with the OBS update of the unpruned later columns. With ``U`` the
    upper Cholesky factor of ``(H + λ·mean(diag H)·I)⁻¹`` (:func:`inverse_hessian_cholesky`), the sweep calls

    * a *mask* rule at the first column ``j`` of every group (``m`` columns for ``"n:m"``, ``mask_block`` columns
      for ``"unstructured"``) on the current (error-updated) weights ``W_{:,G}`` of the group, from the saliency

      .. math::  σ_{ik} = W_{ik}^2 / U_{kk}^2 = W_{ik}^2 / [H_F^{-1}]_{kk}, \quad k ∈ G,

      keeping the ``n`` most salient of every ``m`` (``"n:m"``) or, per row, the ``⌊(1 - s)·|G| + 1/2⌋`` most
      salient entries of the group (``"unstructured"``; ties keep the lower column index, see
      :func:`magnitude_mask`);
    * a *column* rule ``q_j = mask_j ⊙ w_j`` (or ``mask_j ⊙ quantize_fn(w_j, j)`` for joint sparsify-then-quantize),
      followed by the OBS update ``w_k ← w_k - (w_j - q_j) U_{jk} / U_{jj}`` for ``k > j``.

    Dead inputs (``H_jj = 0``) have their weight columns set to 0 beforehand (they still count as kept or pruned
    as the mask rule decides, their value being 0). With ``H = c·I`` the update vanishes (``U`` is diagonal) and the
    result equals ``w ⊙ mask`` with the mask of :func:`magnitude_mask` applied per group (for ``"unstructured"``
    with ``mask_block >= in``: exactly ``magnitude_mask(w, sparsity, pattern="unstructured", scope="row")``).

    The per-row unstructured count is exact per group; over the full row it is exact when ``(1 - s)·mask_block``
    is an integer and ``mask_block`` divides ``in`` (e.g. 50% with an even block).

    Args:
        w: Weight ``[out, in]``, floating.
        hessian: ``[in, in]`` PSD matrix, e.g. ``2·XᵀX / N`` (:class:`~lightning_epfl.functional.quantize.
            HessianAccumulator`); any positive multiple gives the same result.
        sparsity: Fraction ``s ∈ [0, 1)`` pruned per row and group (``"unstructured"``; validated but unused for
            ``"n:m"``). Default ``0.5``.
        pattern: ``"unstructured"`` (default) or ``"n:m"``.
        n: Kept entries per group for ``"n:m"``. Default ``2``.
        m: Group length for ``"n:m"``; must divide ``in``. Default ``4``.
        block_size: Lazy-batch width of :func:`obs_sweep`. Default ``128``.
        damp: Relative dampening ``λ >= 0``. Default ``0.01``.
        mask_block: Columns per unstructured mask decision (SparseGPT's ``prunen``/blocksize), positive int; the
            last group may be shorter. Default ``128``.
        quantize_fn: Optional ``(w_j, j) -> q_j`` column quantizer (``[out] -> [out]``) applied to every column before
            masking, for joint S→Q; its output is what is kept. Default ``None`` (no quantization).

    Returns:
        ``(pruned_w, mask)``: the updated weight (``w``'s shape and dtype, exactly 0 where ``mask`` is ``False``)
        and the bool keep-mask ``[out, in]``.

    Raises:
        ValueError: On a non-2-D ``w``, a ``hessian`` that is not ``[in, in]`` or not positive definite after
            dampening, invalid ``sparsity`` / ``pattern`` / ``n`` / ``m`` / ``block_size`` / ``mask_block`` /
            ``damp``, or a ``quantize_fn`` output of the wrong shape.
    """
    _check_float(w, "w", ndim=2)
    rows, cols = w.shape
    sparsity = _check_sparsity(sparsity)
    _check_pattern(pattern)
    if pattern == "n:m":
        n, m = _check_nm(n, m, cols)
        group = m
    else:
        group = _check_int(mask_block, "mask_block")
    block_size = _check_int(block_size, "block_size")
    _check_float(hessian, "hessian", ndim=2)
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(
            f"`hessian` must have shape [in, in] = [{cols}, {cols}] matching `w` {list(w.shape)}, "
            f"got {list(hessian.shape)}."
        )

    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    weight = w.detach().to(dtype).clone()
    h = hessian.detach().to(device=weight.device, dtype=torch.float64)
    weight[:, h.diagonal() == 0] = 0
    upper = inverse_hessian_cholesky(h, damp)
    diag_sq = upper.diagonal().to(dtype) ** 2
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=weight.device)

    def group_fn(current: Tensor, j: int) -> None:
        width = current.shape[1]
        saliency = current**2 / diag_sq[j : j + width]
        if pattern == "n:m":
            mask[:, j : j + width] = magnitude_mask(current, pattern="n:m", n=n, m=m, scores=saliency)
        else:
            mask[:, j : j + width] = magnitude_mask(
                current, sparsity, pattern="unstructured", scope="row", scores=saliency
            )

    def column_fn(col: Tensor, j: int) -> Tensor:
        if quantize_fn is not None:
            q = quantize_fn(col, j)
            if not isinstance(q, Tensor) or tuple(q.shape) != (rows,):
                raise ValueError(f"`quantize_fn` must return a tensor of shape [{rows}], got {getattr(q, 'shape', q)}.")
            col = q.to(device=col.device, dtype=col.dtype)
        return torch.where(mask[:, j], col, torch.zeros_like(col))

    pruned = obs_sweep(weight, upper, column_fn, block_size=block_size, group_size=group, group_fn=group_fn)
    return pruned.to(w.dtype), mask


# ----------------------------------------------------------------------------------------------------------------------
# sparsity x quantization
# ----------------------------------------------------------------------------------------------------------------------


def sparse_quantize(
    w: Tensor,
    mask: Tensor,
    quantize_fn: Callable[[Tensor], Tensor],
    order: Literal["SQ", "QS"] = "SQ",
    *,
    mask_fn: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    r"""Composes pruning and fake quantization in either order (Harma et al., arXiv:2405.20935).

    .. math::

        \mathrm{SQ}(W) = m ⊙ Q(m ⊙ W), \qquad \mathrm{QS}(W) = m' ⊙ Q(W), \quad m' = \mathrm{mask\_fn}(Q(W))
        \text{ (or } m' = m \text{ if mask\_fn is None)}.

    In SQ the quantizer sees the pruned tensor, so its scales are re-derived after masking; the mask is re-applied
    afterwards so pruned entries stay exactly 0 whatever ``Q`` does with zeros (e.g. asymmetric grids). In QS the
    mask is recomputed from the quantized tensor by ``mask_fn`` (e.g. ``lambda q: magnitude_mask(q)`` for a 2:4
    rule on ``|Q(W)|``); without ``mask_fn`` the given ``mask`` is applied to ``Q(W)``.

    Args:
        w: Floating weight, e.g. ``[out, in]``.
        mask: Bool keep-mask of ``w``'s shape.
        quantize_fn: ``Q``: tensor -> fake-quantized tensor of the same shape, e.g.
            ``lambda t: quantize_symmetric(t, 4, group_size=32)``.
        order: ``"SQ"`` (default) or ``"QS"``.
        mask_fn: Mask rule ``Q(W) -> m'`` used by ``"QS"`` only. Default ``None``.

    Returns:
        Tensor of ``w``'s shape and dtype.

    Raises:
        ValueError: On a non-floating ``w``, a non-bool ``mask`` or one of the wrong shape, an unknown ``order``, or
            a ``quantize_fn`` / ``mask_fn`` output of the wrong shape.
    """
    _check_float(w, "w")
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != w.shape:
        raise ValueError(f"`mask` must be a bool tensor of w's shape {list(w.shape)}.")
    if order not in ORDERS:
        raise ValueError(f"`order` must be one of {ORDERS}, got {order!r}.")

    def quantize(t: Tensor) -> Tensor:
        q = quantize_fn(t)
        if not isinstance(q, Tensor) or q.shape != w.shape:
            raise ValueError(f"`quantize_fn` must return a tensor of shape {list(w.shape)}.")
        return q.to(w.dtype)

    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    if order == "SQ":
        return torch.where(mask, quantize(torch.where(mask, w, zero)), zero)
    q = quantize(w)
    keep = mask
    if mask_fn is not None:
        keep = mask_fn(q)
        if not isinstance(keep, Tensor) or keep.dtype != torch.bool or keep.shape != w.shape:
            raise ValueError(f"`mask_fn` must return a bool tensor of shape {list(w.shape)}.")
    return torch.where(keep, q, zero)


def orthogonality(eps_s: float, eps_q: float, eps_sq: float) -> dict:
    r"""Orthogonality report of Harma et al.: is the joint error at most the sum of the individual errors?

    .. math::

        \mathrm{bound} = ε_s + ε_q, \qquad \mathrm{excess} = ε_{sq} - \mathrm{bound}, \qquad
        \mathrm{orthogonal} = (\mathrm{excess} \le 0).

    Args:
        eps_s: Error of sparsity alone (any consistent metric, e.g. a perplexity increase or ``‖W - Ŵ‖``).
        eps_q: Error of quantization alone.
        eps_sq: Error of the composition.

    Returns:
        ``{"eps_s", "eps_q", "eps_sq", "bound", "excess": float, "orthogonal": bool}``.

    Raises:
        ValueError: If an input is not a finite real number.
    """
    values = {"eps_s": eps_s, "eps_q": eps_q, "eps_sq": eps_sq}
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"`{name}` must be a finite real number, got {v!r}.")
    bound = float(eps_s) + float(eps_q)
    excess = float(eps_sq) - bound
    return {
        "eps_s": float(eps_s),
        "eps_q": float(eps_q),
        "eps_sq": float(eps_sq),
        "bound": bound,
        "excess": excess,
        "orthogonal": excess <= 0,
    }
