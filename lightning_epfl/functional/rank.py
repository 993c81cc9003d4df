"""Feature-rank metrics
=====================

Spectral summaries of a feature matrix ``H`` of shape ``(n_samples, n_features)`` (one row per probe sample), as
used to track representation collapse during grokking (Fan, Pascanu & Jaggi, *Deep Grokking*, arXiv:2405.19454):

* ``numerical_rank``: the paper's rank, ``torch.linalg.matrix_rank(torch.cov(H.T))``, i.e. the number of
  covariance eigenvalues ``λᵢ > rtol · λ₁`` with ``rtol = n_features · eps(compute_dtype)`` by default.
* ``effective_rank``: Roy & Vetterli (2007), ``exp(-Σ pᵢ log pᵢ)`` with ``pᵢ = σᵢ / Σⱼ σⱼ`` and ``σᵢ ∝ √λᵢ`` the
  singular values of the centred features (eigenvalues at or below the rank tolerance are zeroed first).
* ``stable_rank``: ``Σ λᵢ / λ₁ = ‖H_c‖_F² / ‖H_c‖₂²``.
* ``pca_rank``: smallest ``k`` with ``Σ_{i≤k} λᵢ ≥ q · Σ λᵢ`` (``q = variance``; arXiv:2305.16292).
* ``rankme``: Garrido et al., RankMe (arXiv:2210.02885, Eq. 1) on the *uncentred* ``H``:
  ``exp(-Σ pₖ log pₖ)``, ``pₖ = σₖ(H) / ‖σ(H)‖₁ + eps`` over ``min(n, d)`` singular values.
* ``dead_units``: number of columns with ``max_i Hᵢⱼ ≤ 0`` (ReLU units that never fire on the probe set when
  ``H`` is a pre-activation).

The compute dtype is part of the definition: the default tolerance scales with ``eps(compute_dtype)``, so the
float64 rank is (close to) the exact algebraic rank while the float32 one acts as a soft rank. Everything is
computed on the CPU. No Lightning import here.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

METRICS = ("numerical_rank", "effective_rank", "stable_rank", "pca_rank", "rankme", "dead_units")
_DTYPES = {"float64": torch.float64, "float32": torch.float32}
_CENTRED = ("numerical_rank", "effective_rank", "stable_rank", "pca_rank")


def _check_inputs(features: Tensor, compute_dtype: str) -> None:
    if not isinstance(features, Tensor):
        raise ValueError(f"`features` must be a torch.Tensor of shape (n_samples, n_features), got {type(features)}.")
    if features.ndim != 2 or features.shape[0] < 1 or features.shape[1] < 1:
        raise ValueError(
            f"`features` must have shape (n_samples, n_features) with both >= 1, got {tuple(features.shape)}."
        )
    if not (features.is_floating_point() or features.dtype in (torch.int32, torch.int64, torch.bool)):
        raise ValueError(f"`features` must be a real floating (or integer) tensor, got dtype {features.dtype}.")
    if compute_dtype not in _DTYPES:
        raise ValueError(f"`compute_dtype` must be one of {list(_DTYPES)}, got {compute_dtype!r}.")


def _spectrum(features: Tensor, compute_dtype: str = "float64") -> Tensor:
    """Descending eigenvalues ``λ`` of ``torch.cov(H.T)`` (``(d,)``) computed as ``svdvals`` on the CPU.

    These are exactly the values that ``torch.linalg.matrix_rank(torch.cov(H.T))`` thresholds. For ``n = 1`` the
    covariance is undefined and zeros are returned.
    """
    h = features.detach().to(device="cpu", dtype=_DTYPES[compute_dtype])
    if h.shape[0] < 2:
        return torch.zeros(h.shape[1], dtype=h.dtype)
    if not torch.isfinite(h).all():
        raise ValueError("`features` contains NaN or infinite values.")
    return torch.linalg.svdvals(torch.cov(h.T))


def _entropy_rank(weights: Tensor) -> float:
    """``exp(-Σ p log p)`` for ``p = weights / Σ weights`` (``0 log 0 = 0``); 0 when all weights are 0."""
    total = weights.sum()
    if total <= 0:
        return 0.0
    p = weights / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def spectral_metrics(
    features: Tensor,
    metrics: Iterable[str] = ("numerical_rank", "effective_rank"),
    *,
    rtol: float | None = None,
    center: bool = True,
    compute_dtype: str = "float64",
    variance: float = 0.99,
    eps: float = 1e-7,
) -> dict[str, float]:
    """Compute several rank metrics of one feature matrix from a single eigen-decomposition.

    Args:
        features: Features ``H`` of shape ``(n_samples, n_features)``, any device, real dtype.
        metrics: Names from ``numerical_rank``, ``effective_rank``, ``stable_rank``, ``pca_rank``, ``rankme``,
            ``dead_units``.
        rtol: Relative tolerance on the covariance eigenvalues (``torch.linalg.matrix_rank``'s ``rtol``): an
            eigenvalue counts if ``λᵢ > rtol · λ₁``. ``None`` → ``n_features · eps(compute_dtype)`` (the paper).
            A cut ``r`` on singular values of ``H_c`` corresponds to ``rtol = r²``.
        center: If ``False``, the second-moment matrix ``HᵀH / (n - 1)`` replaces the covariance (no mean removal).
        compute_dtype: ``"float64"`` (paper, default) or ``"float32"``; features are cast before any arithmetic.
        variance: Explained-variance fraction ``q ∈ (0, 1]`` for ``pca_rank`` (of the eigenvalues above the
            tolerance, so ``q = 1`` gives ``numerical_rank``).
        eps: Additive constant of RankMe's normalised singular values.

    Returns:
        ``{metric: value}`` as Python floats. Zero features give 0 for every metric; a single sample gives 0 for
        the centred metrics (covariance undefined).

    Raises:
        ValueError: If ``features`` is not 2-D with ``n, d >= 1``, is complex, contains NaN/inf, a metric name is
            unknown, ``compute_dtype`` is not ``"float64"``/``"float32"``, ``rtol < 0`` or ``variance ∉ (0, 1]``.
    """
    metrics = list(metrics)
    _check_inputs(features, compute_dtype)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"Unknown `metrics` {unknown}; allowed: {list(METRICS)}.")
    if rtol is not None and rtol < 0:
        raise ValueError(f"`rtol` must be >= 0 or None, got {rtol}.")
    if not 0.0 < variance <= 1.0:
        raise ValueError(f"`variance` must be in (0, 1], got {variance}.")
    dtype = _DTYPES[compute_dtype]
    out: dict[str, float] = {}
    if any(m in _CENTRED for m in metrics):
        if center:
            lam = _spectrum(features, compute_dtype)
        else:
            h = features.detach().to(device="cpu", dtype=dtype)
            n = h.shape[0]
            lam = torch.linalg.svdvals(h.T @ h / max(n - 1, 1)) if n > 1 else torch.zeros(h.shape[1], dtype=dtype)
        tol_rel = features.shape[1] * torch.finfo(dtype).eps if rtol is None else rtol
        lam_max = lam[0] if lam.numel() else lam.new_zeros(())
        kept = lam > tol_rel * lam_max
        total = lam.sum()
        for m in metrics:
            if m == "numerical_rank":
                out[m] = float(kept.sum())
            elif m == "effective_rank":
                out[m] = _entropy_rank(torch.where(kept, lam.clamp_min(0).sqrt(), lam.new_zeros(())))
            elif m == "stable_rank":
                out[m] = float(total / lam_max) if lam_max > 0 else 0.0
            elif m == "pca_rank":
                if total <= 0:
                    out[m] = 0.0
                else:
                    # over the kept eigenvalues, so that pca_rank <= numerical_rank and q = 1 gives the rank
                    cum = torch.cumsum(torch.where(kept, lam, lam.new_zeros(())), 0)
                    reached = cum >= variance * cum[-1] * (1 - 4 * torch.finfo(dtype).eps)
                    out[m] = float(int(torch.nonzero(reached)[0]) + 1)
    if "rankme" in metrics:
        h = features.detach().to(device="cpu", dtype=dtype)
        if not torch.isfinite(h).all():
            raise ValueError("`features` contains NaN or infinite values.")
        sigma = torch.linalg.svdvals(h)
        norm = sigma.sum()
        if norm <= 0:
            out["rankme"] = 0.0
        else:
            p = sigma / norm + eps
            out["rankme"] = float(torch.exp(-(p * p.log()).sum()))
    if "dead_units" in metrics:
        out["dead_units"] = float(dead_units(features))
    return {m: out[m] for m in metrics}


def numerical_rank(
    features: Tensor, rtol: float | None = None, *, center: bool = True, compute_dtype: str = "float64"
) -> int:
    """Paper's rank: ``matrix_rank(torch.cov(H.T))`` (arXiv:2405.19454, rank of the layer's representation).

    Args:
        features: ``(n_samples, n_features)``.
        rtol: Relative tolerance on covariance eigenvalues; ``None`` → ``n_features · eps(compute_dtype)``
            (``matrix_rank``'s default for the ``d × d`` covariance).
        center: Subtract the column means (covariance). ``False`` uses the uncentred second moment.
        compute_dtype: ``"float64"`` (default, paper) or ``"float32"`` (a softer rank: its tolerance is ~5·10⁸
            times larger).

    Returns:
        Integer in ``[0, min(n_samples - 1, n_features)]``; 0 for zero features or ``n_samples = 1``.

    Raises:
        ValueError: On bad shape/dtype, NaN/inf, negative ``rtol`` or unknown ``compute_dtype``.
    """
    return int(
        spectral_metrics(features, ["numerical_rank"], rtol=rtol, center=center, compute_dtype=compute_dtype)[
            "numerical_rank"
        ]
    )


def effective_rank(
    features: Tensor, rtol: float | None = None, *, center: bool = True, compute_dtype: str = "float64"
) -> float:
    """Effective rank ``exp(H(p))``, ``pᵢ = σᵢ / Σσⱼ`` over singular values of centred ``H`` (Roy & Vetterli 2007).

    Eigenvalues at or below the ``numerical_rank`` tolerance are zeroed. A spectrum of ``k`` equal singular values
    gives exactly ``k``.

    Args:
        features: ``(n_samples, n_features)``.
        rtol: As in :func:`numerical_rank`.
        center: As in :func:`numerical_rank`.
        compute_dtype: ``"float64"`` or ``"float32"``.

    Returns:
        A float in ``[0, min(n_samples - 1, n_features)]`` (≥ 1 unless the features are constant).

    Raises:
        ValueError: On bad shape/dtype, NaN/inf, negative ``rtol`` or unknown ``compute_dtype``.
    """
    return spectral_metrics(features, ["effective_rank"], rtol=rtol, center=center, compute_dtype=compute_dtype)[
        "effective_rank"
    ]


def stable_rank(features: Tensor, *, center: bool = True, compute_dtype: str = "float64") -> float:
    """Stable rank ``‖H_c‖_F² / ‖H_c‖₂² = Σλᵢ / λ₁`` of the centred features.

    Args:
        features: ``(n_samples, n_features)``.
        center: Subtract column means first.
        compute_dtype: ``"float64"`` or ``"float32"``.

    Returns:
        A float in ``[1, numerical rank]``, or 0 for constant features.

    Raises:
        ValueError: On bad shape/dtype, NaN/inf or unknown ``compute_dtype``.
    """
    return spectral_metrics(features, ["stable_rank"], center=center, compute_dtype=compute_dtype)["stable_rank"]


def pca_rank(features: Tensor, variance: float = 0.99, *, center: bool = True, compute_dtype: str = "float64") -> int:
    """Number of principal components explaining a fraction ``variance`` of the total (arXiv:2305.16292).

    Args:
        features: ``(n_samples, n_features)``.
        variance: Fraction ``q ∈ (0, 1]``; smallest ``k`` with ``Σ_{i≤k} λᵢ ≥ q Σ λᵢ``.
        center: Subtract column means first.
        compute_dtype: ``"float64"`` or ``"float32"``.

    Returns:
        Integer ``k``; 0 for constant features.

    Raises:
        ValueError: On bad shape/dtype, NaN/inf, ``variance ∉ (0, 1]`` or unknown ``compute_dtype``.
    """
    return int(
        spectral_metrics(features, ["pca_rank"], variance=variance, center=center, compute_dtype=compute_dtype)[
            "pca_rank"
        ]
    )


def rankme(features: Tensor, eps: float = 1e-7, *, compute_dtype: str = "float64") -> float:
    """RankMe (Garrido et al., arXiv:2210.02885, Eq. 1) on the uncentred features.

    ``exp(-Σₖ pₖ log pₖ)`` with ``pₖ = σₖ(H) / ‖σ(H)‖₁ + eps`` over the ``min(n, d)`` singular values of ``H``.

    Args:
        features: ``(n_samples, n_features)``.
        eps: Additive constant (paper: 1e-7).
        compute_dtype: ``"float64"`` or ``"float32"``.

    Returns:
        A float, about ``min(n, d)`` for a flat spectrum; 0 for zero features.

    Raises:
        ValueError: On bad shape/dtype, NaN/inf or unknown ``compute_dtype``.
    """
    return spectral_metrics(features, ["rankme"], eps=eps, compute_dtype=compute_dtype)["rankme"]


def dead_units(pre_activation: Tensor) -> int:
    """Number of units that are non-positive on every sample: ``#{j : maxᵢ Hᵢⱼ ≤ 0}``.

    For a ReLU network, applied to a Linear layer's output (pre-activation), this counts the units that never fire
    on the probe set; each such unit removes one dimension from the next layer's feature rank.

    Args:
        pre_activation: ``(n_samples, n_units)``.

    Returns:
        Integer in ``[0, n_units]``.

    Raises:
        ValueError: If ``pre_activation`` is not 2-D with ``n, d >= 1``.
    """
    _check_inputs(pre_activation, "float64")
    return int((pre_activation.detach().amax(dim=0) <= 0).sum())
