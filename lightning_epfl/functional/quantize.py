r"""
Fake quantization, RTN and GPTQ weight quantization (QuaRot-style W4A4 export)
=============================================================================

Pure PyTorch (no Lightning) building blocks for the weight/activation quantization of QuaRot (Ashkboos et al.,
arXiv:2404.00456) and the GPTQ weight quantizer (Frantar, Ashkboos, Hoefler & Alistarh, arXiv:2210.17323).

Conventions
-----------
* **Fake quantization.** Every quantizer returns ``dequantize(quantize(x))``: a float tensor of the input's shape and
  dtype whose entries lie on the integer grid times the scale. No integer codes are returned. Rounding is
  ``torch.round`` (round half to even). The functions are not meant to be differentiated (no straight-through
  estimator); inputs must be finite.
* **Layouts.** Weights are ``[out, in]`` (``torch.nn.Linear``); *per-channel* means one scale per output row
  (reduction over ``dim=-1``). Activations are ``[..., d]``; *per-token* means one scale per token (again
  ``dim=-1``). ``dim`` names the *reduction* axis of the scale.
* **Groups.** With ``group_size = g`` the axis ``dim`` (size ``n``, ``g`` must divide ``n``) is split into
  ``n / g`` contiguous groups, each with its own scale. The scale then has ``x``'s shape with the axis ``dim``
  replaced by ``(n / g, 1)``, e.g. ``[out, n / g, 1]`` for a weight with ``dim=-1``.
* **Symmetric** (``b`` bits): ``qmax = 2^(b-1) - 1``,

  .. math::

      s = \frac{c \cdot \max|x|}{q_{max}}, \qquad q = \mathrm{clamp}(\mathrm{round}(x / s), -q_{max} - 1, q_{max}),
      \qquad \hat x = q s,

  with the clip ratio ``c ∈ (0, 1]``. The grid is two's complement, so positive values saturate at ``c·max|x|``
  and negative ones at ``-(q_max + 1) s``.
* **Asymmetric** (``b`` bits): ``x_min = c·min(min x, 0)``, ``x_max = c·max(max x, 0)``,

  .. math::

      s = \frac{x_{max} - x_{min}}{2^b - 1}, \quad z = \mathrm{round}(-x_{min} / s), \quad
      q = \mathrm{clamp}(\mathrm{round}(x / s) + z, 0, 2^b - 1), \quad \hat x = (q - z) s.

* **Zero groups.** A group whose scale is 0 (all zeros, or a scale that underflows) dequantizes to exactly 0
  (the division uses a scale of 1 there), never NaN.
* **Compute dtype.** float64 inputs are processed in float64, everything else (float32, float16, bfloat16) in
  float32; results are cast back to the input dtype. Hessians and their inverse Cholesky factors are always float64.
* **GPTQ.** With ``H = 2 XᵀX / N`` (``X`` the ``[N, in]`` calibration inputs of the layer), dampened
  ``H_λ = H + λ·mean(diag H)·I`` and the *upper* Cholesky factor ``U`` of its inverse (``H_λ⁻¹ = UᵀU``), columns
  are quantized left to right; for column ``j``

  .. math::

      q_j = Q(w_j), \qquad e_j = \frac{w_j - q_j}{U_{jj}}, \qquad w_k \leftarrow w_k - e_j U_{jk} \quad (k > j),

  which is the optimal-brain-surgeon update for removing column ``j`` (``U_{jk} / U_{jj} = [H_λ^{(j)}]^{-1}_{jk}
  / [H_λ^{(j)}]^{-1}_{jj}`` with the inverse restricted to the not yet processed columns). Updates are applied
  lazily in blocks of ``block_size`` columns (Frantar et al., Alg. 1); the result does not depend on the block size
  (up to float rounding). :func:`obs_sweep` is this sweep with a pluggable per-column rule, reusable for pruning
  (SparseGPT).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "HessianAccumulator",
    "gptq_quantize",
    "inverse_hessian_cholesky",
    "obs_sweep",
    "quantize_asymmetric",
    "quantize_symmetric",
    "rtn_quantize",
    "search_clip_ratio",
]

MIN_BITS = 2
MAX_BITS = 16

_Params = tuple[Tensor, Tensor | None]


# ----------------------------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------------------------


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(f"`bits` must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}.")
    return int(bits)


def _check_float_tensor(x: Tensor, name: str, ndim: int | None = None) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor, got dtype {x.dtype}.")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"`{name}` must be {ndim}-D, got shape {list(x.shape)}.")


def _check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    return int(value)


def _normalize_dim(dim: int, ndim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or not -ndim <= int(dim) < ndim:
        raise ValueError(f"`dim` must be an int in [{-ndim}, {ndim - 1}] for a {ndim}-D input, got {dim!r}.")
    return int(dim) % ndim


def _check_group_size(group_size: int | None, size: int, dim: int) -> int | None:
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or int(group_size) < 1:
        raise ValueError(f"`group_size` must be a positive int or None, got {group_size!r}.")
    if size % int(group_size) != 0:
        raise ValueError(f"`group_size` ({group_size}) must divide the size of dimension {dim} ({size}).")
    return int(group_size)


def _check_clip(clip_ratio: float | Tensor, scale_shape: torch.Size, like: Tensor) -> float | Tensor:
    """Validates ``clip_ratio ∈ (0, 1]`` and returns it as a float or a tensor on ``like``'s device/dtype."""
    if isinstance(clip_ratio, Tensor):
        clip = clip_ratio.detach().to(device=like.device, dtype=like.dtype)
        if clip.numel() == 0 or not bool(((clip > 0) & (clip <= 1)).all()):
            raise ValueError("`clip_ratio` values must lie in (0, 1].")
        try:
            shape = torch.broadcast_shapes(clip.shape, scale_shape)
        except RuntimeError:
            shape = None
        if shape != scale_shape:
            raise ValueError(
                f"`clip_ratio` of shape {list(clip.shape)} must broadcast to the scale shape {list(scale_shape)}."
            )
        return clip
    if isinstance(clip_ratio, bool) or not isinstance(clip_ratio, numbers.Real) or not 0 < clip_ratio <= 1:
        raise ValueError(f"`clip_ratio` must lie in (0, 1], got {clip_ratio!r}.")
    return float(clip_ratio)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------------------
# core math (no validation)
# ----------------------------------------------------------------------------------------------------------------------


def _stats(x: Tensor, dim: int, symmetric: bool) -> tuple[Tensor, ...]:
    """Range statistics over ``dim`` (kept): ``(max|x|,)`` or ``(min(min x, 0), max(max x, 0))``."""
    if symmetric:
        return (x.abs().amax(dim, keepdim=True),)
    return x.amin(dim, keepdim=True).clamp(max=0), x.amax(dim, keepdim=True).clamp(min=0)


def _safe(scale: Tensor) -> Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _params(stats: tuple[Tensor, ...], bits: int, symmetric: bool, clip: float | Tensor) -> _Params:
    """Scale (and zero point for the asymmetric grid) from :func:`_stats` and a clip ratio."""
    if symmetric:
        (amax,) = stats
        return clip * amax / (2 ** (bits - 1) - 1), None
    lo, hi = clip * stats[0], clip * stats[1]
    scale = (hi - lo) / (2**bits - 1)
    return scale, torch.round(-lo / _safe(scale))


def _fake(x: Tensor, scale: Tensor, zero: Tensor | None, bits: int) -> Tensor:
    """Quantize-dequantize ``x`` with a broadcastable ``scale`` (and ``zero``; ``None`` = symmetric grid)."""
    safe = _safe(scale)
    if zero is None:
        qmax = 2 ** (bits - 1) - 1
        return torch.clamp(torch.round(x / safe), -qmax - 1, qmax) * scale
    q = torch.clamp(torch.round(x / safe) + zero, 0, 2**bits - 1)
    return (q - zero) * scale


def _quantize(
    x: Tensor, bits: int, dim: int, group_size: int | None, clip_ratio: float | Tensor, symmetric: bool
) -> Tensor:
    _check_float_tensor(x, "x")
    bits = _check_bits(bits)
    if x.ndim == 0:
        raise ValueError("`x` must have at least one dimension.")
    d = _normalize_dim(dim, x.ndim)
    group = _check_group_size(group_size, x.shape[d], dim)
    if x.numel() == 0:
        return x.clone()
    xc = x.to(_compute_dtype(x.dtype))
    if group is not None:
        xc, d = xc.unflatten(d, (xc.shape[d] // group, group)), d + 1
    stats = _stats(xc, d, symmetric)
    clip = _check_clip(clip_ratio, stats[0].shape, xc)
    scale, zero = _params(stats, bits, symmetric, clip)
    return _fake(xc, scale, zero, bits).reshape(x.shape).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# fake quantizers
# ----------------------------------------------------------------------------------------------------------------------


def quantize_symmetric(
    x: Tensor, bits: int, *, dim: int = -1, group_size: int | None = None, clip_ratio: float | Tensor = 1.0
) -> Tensor:
    r"""Symmetric fake quantization (quantize, then dequantize).

    .. math::

        q_{max} = 2^{b-1} - 1, \quad s = \frac{c \cdot \max|x|}{q_{max}}, \quad
        \hat x = \mathrm{clamp}(\mathrm{round}(x / s), -q_{max} - 1, q_{max}) \cdot s,

    with the maximum over the reduction axis ``dim`` (or over each group of ``group_size`` contiguous entries of it).

    Args:
        x: Floating tensor of any shape with at least one dimension, e.g. a weight ``[out, in]`` (``dim=-1``:
            per-output-channel scales) or activations ``[..., d]`` (``dim=-1``: per-token scales).
        bits: Bit width ``b``, an int in ``[2, 16]``.
        dim: Reduction axis of the scale. Default ``-1``.
        group_size: If given, one scale per contiguous group of ``group_size`` entries along ``dim``; must divide
            ``x.shape[dim]``. Default ``None`` (one scale per slice along ``dim``).
        clip_ratio: ``c ∈ (0, 1]``, a float or a tensor broadcastable to the scale shape (``x.shape`` with
            ``dim`` of size 1, or with ``dim`` replaced by ``(n_groups, 1)`` when grouped; e.g. the ``[out, 1]`` /
            ``[out, n_groups, 1]`` output of :func:`search_clip_ratio`). Default ``1.0`` (no clipping).

    Returns:
        Tensor of ``x``'s shape and dtype (computed in float64 for float64 inputs, else float32). All-zero groups
        stay zero.

    Raises:
        ValueError: If ``x`` is not a floating tensor with ``ndim >= 1``, ``bits`` is not an int in ``[2, 16]``,
            ``dim`` is out of range, ``group_size`` is not a positive int dividing ``x.shape[dim]``, or
            ``clip_ratio`` is outside ``(0, 1]`` or does not broadcast to the scale shape.
    """
    return _quantize(x, bits, dim, group_size, clip_ratio, symmetric=True)


def quantize_asymmetric(
    x: Tensor, bits: int, *, dim: int = -1, group_size: int | None = None, clip_ratio: float | Tensor = 1.0
) -> Tensor:
    r"""Asymmetric (zero-point) fake quantization.

    .. math::

        x_{min} = c \cdot \min(\min x, 0), \quad x_{max} = c \cdot \max(\max x, 0), \quad
        s = \frac{x_{max} - x_{min}}{2^b - 1}, \quad z = \mathrm{round}(-x_{min} / s),

        \hat x = (\mathrm{clamp}(\mathrm{round}(x / s) + z, 0, 2^b - 1) - z) \cdot s,

    with the extrema over the reduction axis ``dim`` (or over each group of ``group_size`` entries of it). The range
    always contains 0, which is therefore represented exactly.

    Args:
        x: Floating tensor of any shape with at least one dimension (see :func:`quantize_symmetric`).
        bits: Bit width ``b``, an int in ``[2, 16]``.
        dim: Reduction axis of the scale. Default ``-1``.
        group_size: Contiguous group length along ``dim`` (must divide ``x.shape[dim]``). Default ``None``.
        clip_ratio: ``c ∈ (0, 1]``, float or tensor broadcastable to the scale shape (as in
            :func:`quantize_symmetric`). Default ``1.0``.

    Returns:
        Tensor of ``x``'s shape and dtype. All-zero groups stay zero.

    Raises:
        ValueError: Same conditions as :func:`quantize_symmetric`.
    """
    return _quantize(x, bits, dim, group_size, clip_ratio, symmetric=False)


# ----------------------------------------------------------------------------------------------------------------------
# weight quantization: clip search and RTN
# ----------------------------------------------------------------------------------------------------------------------


def search_clip_ratio(
    w: Tensor,
    bits: int,
    *,
    group_size: int | None = None,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
    symmetric: bool = True,
) -> Tensor:
    r"""Per-row (or per-group) clip ratio minimizing the ``L^p`` quantization error (GPTQ's ``mse`` search).

    For every row (group) the candidates ``p_i = 1 - i / grid``, ``i = 0, …, ⌊max_shrink · grid⌋``, are tried and

    .. math::

        c = \arg\min_{p_i} \sum_k |w_k - Q_{p_i}(w)_k|^{norm}

    is kept, ``Q_p`` being :func:`quantize_symmetric` (or :func:`quantize_asymmetric`) with ``clip_ratio=p`` over
    the row (group). Ties keep the largest ratio (all-zero rows get 1). Vectorized over rows; loops over the grid.

    Args:
        w: Weight ``[rows, cols]`` (``[out, in]``), floating.
        bits: Bit width, an int in ``[2, 16]``.
        group_size: If given, one ratio per contiguous group of ``group_size`` columns (must divide ``cols``).
            Default ``None``.
        grid: Number of grid steps between ratio 1 and 0. Default ``100``.
        max_shrink: Largest shrinkage ``1 - p`` tried, in ``[0, 1)``. Default ``0.8``. The index bound
            ``⌊max_shrink · grid⌋`` is taken with a ``1e-9`` tolerance against float artifacts.
        norm: Exponent of the error, ``> 0``. Default ``2.4``.
        symmetric: Search for the symmetric (``True``, default) or asymmetric grid.

    Returns:
        Ratios in ``(0, 1]`` of shape ``[rows, 1]`` (``[rows, cols / group_size, 1]`` when grouped), on ``w``'s
        device, float64 for float64 ``w`` else float32; directly usable as ``clip_ratio`` with ``dim=-1``.

    Raises:
        ValueError: On a non-2-D or non-floating ``w``, invalid ``bits`` / ``group_size`` / ``grid`` /
            ``max_shrink`` / ``norm``.
    """
    _check_float_tensor(w, "w", ndim=2)
    bits = _check_bits(bits)
    group = _check_group_size(group_size, w.shape[1], -1)
    grid = _check_positive_int(grid, "grid")
    if isinstance(max_shrink, bool) or not isinstance(max_shrink, numbers.Real) or not 0 <= max_shrink < 1:
        raise ValueError(f"`max_shrink` must lie in [0, 1), got {max_shrink!r}.")
    if isinstance(norm, bool) or not isinstance(norm, numbers.Real) or not 0 < norm < float("inf"):
        raise ValueError(f"`norm` must be a positive finite number, got {norm!r}.")
    return _search_clip(w.to(_compute_dtype(w.dtype)), bits, group, grid, float(max_shrink), float(norm), symmetric)


def _search_clip(
    w: Tensor, bits: int, group: int | None, grid: int, max_shrink: float, norm: float, symmetric: bool
) -> Tensor:
    rows, cols = w.shape
    wg = w.unflatten(1, (cols // group, group)) if group is not None else w.unsqueeze(1)  # [rows, G, g]
    stats = _stats(wg, -1, symmetric)
    best = torch.full(stats[0].shape, float("inf"), dtype=w.dtype, device=w.device)
    ratio = torch.ones_like(best)
    for i in range(int(max_shrink * grid + 1e-9) + 1):
        p = 1 - i / grid
        scale, zero = _params(stats, bits, symmetric, p)
        err = (_fake(wg, scale, zero, bits) - wg).abs().pow(norm).sum(-1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        ratio = ratio.masked_fill(better, p)
    return ratio if group is not None else ratio.squeeze(1)


def rtn_quantize(
    w: Tensor, bits: int, *, group_size: int | None = None, clip_search: bool = True, symmetric: bool = True
) -> Tensor:
    """Round-to-nearest weight quantization with per-output-channel (or per-group) scales.

    ``Q(w)`` with :func:`quantize_symmetric` / :func:`quantize_asymmetric` over ``dim=-1`` and, when
    ``clip_search``, the clip ratios of :func:`search_clip_ratio` (default grid ``100``, ``max_shrink=0.8``,
    ``norm=2.4``).

    Args:
        w: Weight ``[out, in]``, floating.
        bits: Bit width, an int in ``[2, 16]``.
        group_size: Contiguous group length along ``in`` (must divide it). Default ``None`` (per output row).
        clip_search: Search a clip ratio per row (group). Default ``True``.
        symmetric: Symmetric (default) or asymmetric grid.

    Returns:
        Dequantized weight of ``w``'s shape and dtype.

    Raises:
        ValueError: On a non-2-D or non-floating ``w`` or invalid ``bits`` / ``group_size``.
    """
    _check_float_tensor(w, "w", ndim=2)
    bits = _check_bits(bits)
    clip: float | Tensor = 1.0
    if clip_search:
        clip = search_clip_ratio(w, bits, group_size=group_size, symmetric=symmetric)
    return _quantize(w, bits, -1, group_size, clip, symmetric)


# ----------------------------------------------------------------------------------------------------------------------
# GPTQ machinery
# ----------------------------------------------------------------------------------------------------------------------


def inverse_hessian_cholesky(hessian: Tensor, damp: float = 0.01) -> Tensor:
    r"""Upper Cholesky factor ``U`` of the dampened inverse Hessian, ``(H + λ·mean(diag H)·I)^{-1} = UᵀU``.

    Dead inputs (``H_ii = 0``: the input feature was always 0 on the calibration set) get ``H_ii = 1`` first, as in
    GPTQ; the dampening ``λ·mean(diag H)`` is computed after that fix. Those inputs are decoupled from the others
    (``U`` has zero off-diagonal entries in their rows/columns for a PSD ``H``); the caller should zero the matching
    weight columns (:func:`gptq_quantize` does). ``H`` is symmetrized as ``(H + Hᵀ) / 2``.

    Args:
        hessian: Symmetric PSD ``[n, n]`` matrix, e.g. ``2·XᵀX / N`` from :class:`HessianAccumulator`.
        damp: Relative dampening ``λ >= 0``. Default ``0.01``.

    Returns:
        Upper-triangular ``[n, n]`` float64 tensor on ``hessian``'s device.

    Raises:
        ValueError: If ``hessian`` is not a finite square 2-D floating tensor, ``damp`` is negative or not finite,
            or the dampened matrix is not positive definite (numerically).
    """
    _check_float_tensor(hessian, "hessian", ndim=2)
    if hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"`hessian` must be square [n, n], got shape {list(hessian.shape)}.")
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real) or not 0 <= damp < float("inf"):
        raise ValueError(f"`damp` must be a finite number >= 0, got {damp!r}.")
    h = hessian.detach().to(torch.float64)
    if not bool(torch.isfinite(h).all()):
        raise ValueError("`hessian` contains NaN or infinite values.")
    h = 0.5 * (h + h.T)
    diag = h.diagonal()
    diag.masked_fill_(diag == 0, 1.0)
    diag.add_(float(damp) * diag.mean())
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise ValueError(
            f"`hessian` is not positive definite after dampening (damp={damp}; leading minor of order {int(info)} "
            "fails); increase `damp` or use more calibration data."
        )
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
    if int(info) != 0:
        raise ValueError(
            f"the inverse of the dampened `hessian` is numerically not positive definite (damp={damp}); "
            "increase `damp`."
        )
    return upper


def obs_sweep(
    w: Tensor,
    hinv_chol: Tensor,
    column_fn: Callable[[Tensor, int], Tensor],
    *,
    block_size: int = 128,
    group_size: int | None = None,
    group_fn: Callable[[Tensor, int], None] | None = None,
) -> Tensor:
    r"""Column-by-column optimal-brain-surgeon sweep with lazy batched updates (GPTQ, Frantar et al. Alg. 1).

    For ``j = 0, …, cols - 1`` (``U = hinv_chol``)

    .. math::

        q_j = \mathrm{column\_fn}(w_j, j), \qquad e_j = (w_j - q_j) / U_{jj}, \qquad
        w_k \leftarrow w_k - e_j U_{jk} \quad (k > j),

    where ``w_j`` is the *current* column (all updates from columns ``< j`` applied). Updates are applied
    immediately inside a block of ``block_size`` columns; the block's errors ``E`` are applied to the later columns
    at block end as ``W[:, i2:] -= E U[i1:i2, i2:]``. The result equals the unbatched sweep for every block size
    (up to float rounding).

    Args:
        w: Weight ``[rows, cols]``, floating; not modified.
        hinv_chol: Upper Cholesky factor ``[cols, cols]`` of the (dampened) inverse Hessian, e.g. from
            :func:`inverse_hessian_cholesky`; columns are processed in its order (permute both beforehand for
            act-order).
        column_fn: ``(w_j, j) -> q_j`` with the current column ``w_j`` (``[rows]``, a copy) and its index; returns
            the replacement column ``[rows]`` (quantized, pruned, …). May use state set by ``group_fn``.
        block_size: Lazy-batch width, a positive int. Default ``128``.
        group_size: Period of ``group_fn`` calls; required with ``group_fn``. Default ``None``.
        group_fn: ``(w_group, j) -> None`` called at every ``j`` with ``j % group_size == 0``, *before*
            ``column_fn(…, j)``, with a copy of the exact current values of columns ``j : j + group_size``
            (``[rows, ≤ group_size]``; errors of columns ``< j`` fully applied, also across block boundaries).
            Use it to compute group scales (GPTQ) or masks (SparseGPT). Default ``None``.

    Returns:
        ``[rows, cols]`` tensor of the ``column_fn`` outputs, in ``w``'s dtype; computed in float64 if ``w`` is
        float64, else float32.

    Raises:
        ValueError: On mismatched shapes, a non-positive ``block_size`` / ``group_size``, ``group_fn`` without
            ``group_size``, or a ``column_fn`` output of the wrong shape.
    """
    _check_float_tensor(w, "w", ndim=2)
    _check_float_tensor(hinv_chol, "hinv_chol", ndim=2)
    rows, cols = w.shape
    if tuple(hinv_chol.shape) != (cols, cols):
        raise ValueError(
            f"`hinv_chol` must have shape [in, in] = [{cols}, {cols}] matching `w` {list(w.shape)}, "
            f"got {list(hinv_chol.shape)}."
        )
    block_size = _check_positive_int(block_size, "block_size")
    if group_fn is not None:
        if group_size is None:
            raise ValueError("`group_size` is required when `group_fn` is given.")
        group_size = _check_positive_int(group_size, "group_size")

    dtype = _compute_dtype(w.dtype)
    weight = w.detach().to(dtype).clone()
    upper = hinv_chol.detach().to(device=weight.device, dtype=dtype)
    out = torch.empty_like(weight)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = weight[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if group_fn is not None and j % group_size == 0:
                end = min(j + group_size, cols)
                current = w1[:, i : min(end, i2) - i1]
                if end > i2:  # the group reaches past the block: apply this block's pending errors
                    tail = weight[:, i2:end] - err1[:, :i] @ upper[i1:j, i2:end]
                    current = torch.cat([current, tail], dim=1)
                group_fn(current.clone(), j)
            col = w1[:, i]
            q = column_fn(col.clone(), j)
            if not isinstance(q, Tensor) or tuple(q.shape) != (rows,):
                raise ValueError(f"`column_fn` must return a tensor of shape [{rows}], got {getattr(q, 'shape', q)}.")
            q = q.to(device=weight.device, dtype=dtype)
            out[:, j] = q
            e = (col - q) / u1[i, i]
            w1[:, i + 1 :].addr_(e, u1[i, i + 1 :], alpha=-1)
            err1[:, i] = e
        if i2 < cols:
            weight[:, i2:].sub_(err1 @ upper[i1:i2, i2:])
    return out.to(w.dtype)


def gptq_quantize(
    w: Tensor,
    hessian: Tensor,
    *,
    bits: int,
    group_size: int | None = None,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    clip_search: bool = True,
    symmetric: bool = True,
) -> Tensor:
    r"""GPTQ weight quantization (Frantar et al., arXiv:2210.17323) on top of :func:`obs_sweep`.

    Minimizes ``‖XWᵀ - XŴᵀ‖²`` column by column (see the module docstring for the update). Scales:

    * without ``group_size``: one per output row, from the full rows up front (after zeroing dead columns), with
      the :func:`search_clip_ratio` clip ratio when ``clip_search``;
    * with ``group_size``: one per row and group, computed when the sweep reaches the group's first column from the
      *current* (error-updated) weights of the group (with clip search on that group when ``clip_search``).
      The reference implementation reads block-start values for groups that start inside a block; here the exact
      current values are used, so the result does not depend on ``block_size`` (identical to the reference when
      ``group_size`` is a multiple of ``block_size``).

    Dead inputs (``H_ii = 0``) have their weight columns set to 0. With ``act_order`` the columns are processed in
    the order ``perm = argsort(diag H, descending, stable)`` and un-permuted at the end; groups are then contiguous
    in the *permuted* order (columns ``perm[k·g : (k+1)·g]`` share a scale), as in GPTQ without static groups.

    Args:
        w: Weight ``[out, in]``, floating.
        hessian: ``[in, in]`` PSD matrix, e.g. ``2·XᵀX / N`` of the layer inputs (:class:`HessianAccumulator`); any
            positive multiple gives the same result.
        bits: Bit width, an int in ``[2, 16]``.
        group_size: Group length along ``in`` (must divide it). Default ``None`` (per output row).
        damp: Relative dampening ``λ`` (:func:`inverse_hessian_cholesky`). Default ``0.01``.
        act_order: Process columns by descending ``diag H``. Default ``False``.
        block_size: Lazy-batch width of :func:`obs_sweep`. Default ``128``.
        clip_search: Clip-ratio search for every scale. Default ``True``.
        symmetric: Symmetric (default) or asymmetric grid.

    Returns:
        Dequantized weight of ``w``'s shape and dtype; computed in float64 when ``w`` is float64, else in float32
        (the inverse Hessian factor in float64).

    Raises:
        ValueError: On invalid ``bits`` / ``group_size`` / ``block_size`` / ``damp``, a non-2-D ``w``, a
            ``hessian`` whose shape is not ``[in, in]``, or a Hessian that is not positive definite after
            dampening.
    """
    _check_float_tensor(w, "w", ndim=2)
    bits = _check_bits(bits)
    rows, cols = w.shape
    group = _check_group_size(group_size, cols, -1)
    _check_float_tensor(hessian, "hessian")
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(
            f"`hessian` must have shape [in, in] = [{cols}, {cols}] matching `w` {list(w.shape)}, "
            f"got {list(hessian.shape)}."
        )
    block_size = _check_positive_int(block_size, "block_size")

    dtype = _compute_dtype(w.dtype)
    weight = w.detach().to(dtype).clone()
    h = hessian.detach().to(device=weight.device, dtype=torch.float64)
    weight[:, h.diagonal() == 0] = 0
    perm = None
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        weight, h = weight[:, perm], h[perm][:, perm]
    upper = inverse_hessian_cholesky(h, damp)

    def params_of(x: Tensor) -> _Params:
        clip: float | Tensor = 1.0
        if clip_search:
            clip = _search_clip(x, bits, None, 100, 0.8, 2.4, symmetric)
        return _params(_stats(x, 1, symmetric), bits, symmetric, clip)

    state: dict[str, _Params] = {}
    if group is None:
        state["params"] = params_of(weight)

    def group_fn(current: Tensor, j: int) -> None:
        state["params"] = params_of(current)

    def column_fn(col: Tensor, j: int) -> Tensor:
        scale, zero = state["params"]
        return _fake(col.unsqueeze(1), scale, zero, bits).squeeze(1)

    q = obs_sweep(
        weight,
        upper,
        column_fn,
        block_size=block_size,
        group_size=group,
        group_fn=group_fn if group is not None else None,
    )
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q.to(w.dtype)


class HessianAccumulator:
    """Running GPTQ Hessian ``H = 2·XᵀX / N`` of a layer's inputs, accumulated in float64.

    Stores ``S = Σ xᵀx`` over all tokens and their count ``N``; :attr:`hessian` returns ``2·S / N`` (the same value
    as GPTQ's running average, without its re-scaling error).

    Args:
        in_features: Expected input width; inferred from the first :meth:`add` when ``None`` (default).

    Example:
        >>> acc = HessianAccumulator()
        >>> acc.add(torch.randn(2, 5, 8))  # [batch, seq, in] -> 10 tokens
        >>> acc.hessian.shape, acc.count
        (torch.Size([8, 8]), 10)
    """

    def __init__(self, in_features: int | None = None) -> None:
        self.in_features = None if in_features is None else _check_positive_int(in_features, "in_features")
        self._sum: Tensor | None = None
        self._count = 0

    def add(self, x: Tensor) -> None:
        """Adds a batch of inputs.

        Args:
            x: ``[..., in]`` floating tensor; all leading dimensions are flattened into tokens.

        Raises:
            ValueError: If ``x`` is not a floating tensor with ``ndim >= 1``, its last dimension differs from
                ``in_features``, or it contains NaN/inf.
        """
        _check_float_tensor(x, "x")
        if x.ndim == 0:
            raise ValueError("`x` must have shape [..., in], got a 0-D tensor.")
        if self.in_features is None:
            self.in_features = int(x.shape[-1])
        if x.shape[-1] != self.in_features:
            raise ValueError(f"`x` must have last dimension in_features={self.in_features}, got {list(x.shape)}.")
        tokens = x.detach().reshape(-1, self.in_features).to(torch.float64)
        if self._sum is None:
            self._sum = torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=x.device)
        tokens = tokens.to(self._sum.device)
        if not bool(torch.isfinite(tokens).all()):
            raise ValueError("`x` contains NaN or infinite values.")
        self._sum.addmm_(tokens.T, tokens)
        self._count += tokens.shape[0]

    @property
    def count(self) -> int:
        """Number of tokens ``N`` added so far."""
        return self._count

    @property
    def hessian(self) -> Tensor:
        """``2·XᵀX / N`` as a new ``[in, in]`` float64 tensor.

        Raises:
            ValueError: If no token was added ("calibration set is empty").
        """
        if self._count == 0 or self._sum is None:
            raise ValueError("calibration set is empty: call `add` with at least one token before reading `hessian`.")
        return 2.0 * self._sum / self._count
