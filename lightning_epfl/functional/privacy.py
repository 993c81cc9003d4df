r"""
Privacy accounting for correlated-noise decentralized SGD (SecLDP)
=================================================================

Pure functions (float64, no Lightning) behind the Decor accountant (Allouah, Koloskova, El Firdoussi, Jaggi,
Guerraoui, "The Privacy Power of Correlated Noise in Decentralized Learning", ICML 2024, arXiv:2405.01031).

Each client ``i`` adds ``z_i = sigma xi_i + sigma_cor sum_{j ~ i} s_ij zeta_ij`` to its update, with private
``xi_i ~ N(0, I)`` and pairwise ``zeta_ij = zeta_ji ~ N(0, I)`` entering with opposite signs, so the noise of the
``n`` clients has covariance ``Sigma = sigma^2 I + sigma_cor^2 L`` (``L`` the graph Laplacian) and cancels in the
average. Against an eavesdropper who sees every message (and curious clients outside the honest set ``H``), one
step is ``rho``-zCDP with (paper, Theorem 1)

.. math::

    \rho_{step} = \frac{\Delta^2}{2} \max_{i \in H} [\Sigma_H^{-1}]_{ii}, \qquad
    \Sigma_H = \sigma^2 I + \sigma_{cor}^2 L_H,

where ``Delta`` is the sensitivity of one client's clipped update (``2C`` at user level, the whole local data set
replaced; ``2C/b`` or ``C/b`` at example level for replace-one / add-remove). ``T`` steps compose to ``T rho_step``
and convert to ``(epsilon, delta)`` by zCDP (Bun & Steinke, arXiv:1605.02065, Prop. 1.3), RDP (Balle et al.,
arXiv:1905.09982, Thm. 21, through Opacus) or Gaussian DP (Dong, Roth & Su, arXiv:1905.02383, Cor. 2.13; exact for
a Gaussian mechanism). Every quantity is rounded *up*: reported epsilons are never below the true ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "cdp_sigma",
    "epsilon_from_rho",
    "gdp_epsilon",
    "inverse_cov_diag",
    "laplacian",
    "laplacian_spectrum",
    "ldp_sigma",
    "rdp_epsilon",
    "rho_budget",
    "rho_step",
    "sensitivity",
    "zcdp_epsilon",
]

Conversion = Literal["zcdp", "rdp", "gdp"]
_ROUND_UP = 1.0 + 1e-9


def laplacian(adjacency: Tensor) -> Tensor:
    """Graph Laplacian ``L = D - A`` (float64) of a symmetric 0/1 adjacency ``[n, n]``."""
    a = torch.as_tensor(adjacency).to(torch.float64)
    return torch.diag(a.sum(1)) - a


def laplacian_spectrum(adjacency: Tensor, honest: Sequence[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The honest subgraph's Laplacian ``L_H`` split for :func:`inverse_cov_diag`, reusable across noise levels.

    Returns:
        ``(component_sizes [m], eigvals [m - c], sq_vecs [m, m - c])``: for every honest client the size of its
        connected component (the null space of ``L_H`` is spanned by the ``c`` component indicators, handled
        exactly), and the nonzero eigenvalues with the squared entries of their eigenvectors (float64).

    Raises:
        ValueError: If ``honest`` is empty or out of range.
        RuntimeError: If the decomposition fails its reconstruction check.
    """
    from lightning_epfl.functional.topology import Topology

    a = torch.as_tensor(adjacency).to(torch.float64)
    n = a.shape[0]
    idx = list(range(n)) if honest is None else sorted({int(i) for i in honest})
    if not idx or idx[0] < 0 or idx[-1] >= n:
        raise ValueError(f"`honest` must be a non-empty subset of [0, {n}), got {honest}.")
    sub = a[idx][:, idx]
    components = Topology(sub != 0).components()
    sizes = torch.empty(len(idx), dtype=torch.float64)
    for comp in components:
        sizes[comp] = float(len(comp))
    lap = laplacian(sub)
    eigvals, eigvecs = torch.linalg.eigh(lap)
    error = torch.linalg.matrix_norm(eigvecs @ torch.diag(eigvals) @ eigvecs.T - lap)
    if error > 1e-10 * max(1.0, float(torch.linalg.matrix_norm(lap))):
        raise RuntimeError(f"Laplacian eigendecomposition failed its reconstruction check ({float(error):.3g}).")
    c = len(components)  # eigh sorts ascending: the first c eigenvalues are the (numerically tiny) zeros
    return sizes, eigvals[c:].clamp_min(0.0), eigvecs[:, c:] ** 2


def inverse_cov_diag(
    adjacency: Tensor,
    sigma: float,
    sigma_cor: float,
    honest: Sequence[int] | None = None,
    spectrum: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    r"""Exact diagonal of :math:`\Sigma_H^{-1}`, :math:`\Sigma_H = \sigma^2 I + \sigma_{cor}^2 L_H` (float64).

    Computed from the eigendecomposition :math:`L_H = V \Lambda V^T`:
    :math:`[\Sigma_H^{-1}]_{ii} = 1/(m_i\sigma^2) + \sum_{\lambda_k > 0} V_{ik}^2 / (\sigma^2 + \sigma_{cor}^2
    \lambda_k)` with ``m_i`` the size of client ``i``'s component (the null space, taken exactly): a sum of positive
    terms that stays accurate however large ``sigma_cor`` is (inverting ``Sigma`` directly, or a numerically nonzero
    zero eigenvalue times ``sigma_cor^2``, loses the ``1/(m sigma^2)`` term). The result is rounded up by
    ``1 + 1e-9`` so that round-off never lowers the accounted privacy loss.

    Args:
        adjacency: ``[n, n]`` symmetric 0/1 adjacency of the communication graph.
        sigma: Standard deviation of the private noise, ``> 0``.
        sigma_cor: Standard deviation of the pairwise noise, ``>= 0`` (0: local DP).
        honest: Honest clients ``H`` (default: all); the subgraph ``L_H`` keeps only edges inside ``H``.
        spectrum: :func:`laplacian_spectrum` of the same graph and ``honest`` set, to skip the decomposition.

    Returns:
        ``[|H|]`` float64.

    Raises:
        ValueError: If ``sigma <= 0`` (``Sigma`` is singular), ``sigma_cor < 0``, ``honest`` is empty or out of range.
    """
    if not sigma > 0:
        raise ValueError(f"`sigma` must be > 0 (with sigma = 0 the covariance is singular), got {sigma}.")
    if sigma_cor < 0:
        raise ValueError(f"`sigma_cor` must be >= 0, got {sigma_cor}.")
    sizes, eigvals, sq_vecs = spectrum if spectrum is not None else laplacian_spectrum(adjacency, honest)
    null = 1.0 / (sizes * sigma**2)
    return (null + (sq_vecs / (sigma**2 + sigma_cor**2 * eigvals)).sum(1)) * _ROUND_UP


def sensitivity(
    clip_norm: float,
    level: Literal["user", "example"] = "user",
    neighbouring: Literal["replace", "add_remove"] = "replace",
    batch_size: int = 1,
) -> float:
    """L2 sensitivity ``Delta`` of one client's clipped update.

    User level: ``2C`` (replace: the whole local data set changes), ``C`` (add/remove). Example level: ``2C/b``
    (replace-one) or ``C/b`` (add/remove) with ``b`` the (expected) batch size.

    Raises:
        ValueError: On ``clip_norm <= 0``, ``batch_size < 1`` or an unknown ``level``/``neighbouring``.
    """
    if not clip_norm > 0:
        raise ValueError(f"`clip_norm` must be > 0, got {clip_norm}.")
    if level not in ("user", "example"):
        raise ValueError(f"`level` must be 'user' or 'example', got {level!r}.")
    if neighbouring not in ("replace", "add_remove"):
        raise ValueError(f"`neighbouring` must be 'replace' or 'add_remove', got {neighbouring!r}.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    factor = 2.0 if neighbouring == "replace" else 1.0
    return factor * clip_norm / (batch_size if level == "example" else 1)


def rho_step(
    adjacency: Tensor, sigma: float, sigma_cor: float, delta_sensitivity: float, honest: Sequence[int] | None = None
) -> float:
    r"""zCDP cost of one step, :math:`\frac{\Delta^2}{2} \max_{i\in H} [\Sigma_H^{-1}]_{ii}`.

    The eavesdropper bound of arXiv:2405.01031 (Thm. 1).
    """
    return 0.5 * delta_sensitivity**2 * float(inverse_cov_diag(adjacency, sigma, sigma_cor, honest).max())


def zcdp_epsilon(rho: float, delta: float) -> float:
    r""":math:`\varepsilon = \rho + 2\sqrt{\rho \ln(1/\delta)}` (Bun & Steinke, arXiv:1605.02065, Prop. 1.3)."""
    _check_delta(delta)
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def rdp_epsilon(rho: float, delta: float, orders: Sequence[float] | None = None) -> float:
    r"""Epsilon from the RDP curve :math:`\alpha \mapsto \alpha\rho` (a ``rho``-zCDP mechanism), by Opacus's
    ``get_privacy_spent`` (Balle et al., arXiv:1905.09982, Thm. 21) over ``orders`` (default: Opacus's
    ``RDPAccountant.DEFAULT_ALPHAS``), floored at 0."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    _check_delta(delta)
    alphas = list(orders) if orders is not None else list(RDPAccountant.DEFAULT_ALPHAS)
    eps, _ = get_privacy_spent(orders=alphas, rdp=[a * rho for a in alphas], delta=delta)
    return max(0.0, float(eps))  # the conversion goes negative for tiny rho; epsilon = 0 is the true floor


def gdp_epsilon(rho: float, delta: float, tol: float = 1e-12) -> float:
    r"""Exact epsilon of a Gaussian mechanism with :math:`\mu = \sqrt{2\rho}` (Dong et al., arXiv:1905.02383):
    the root of :math:`\delta = \Phi(-\varepsilon/\mu + \mu/2) - e^{\varepsilon}\Phi(-\varepsilon/\mu - \mu/2)`,
    found by bisection; the upper end of the final bracket is returned (never below the root)."""
    from scipy.special import log_ndtr

    _check_delta(delta)
    if rho <= 0:
        return 0.0
    mu = math.sqrt(2.0 * rho)

    def delta_of(eps: float) -> float:
        return math.exp(log_ndtr(-eps / mu + mu / 2)) - math.exp(eps + log_ndtr(-eps / mu - mu / 2))

    if delta_of(0.0) <= delta:
        return 0.0
    lo, hi = 0.0, max(1.0, mu * mu)
    while delta_of(hi) > delta:
        lo, hi = hi, 2.0 * hi
    while hi - lo > tol * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        if delta_of(mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def epsilon_from_rho(
    rho: float, delta: float, conversion: Conversion = "zcdp", orders: Sequence[float] | None = None
) -> float:
    """``(epsilon, delta)`` of a ``rho``-zCDP Gaussian composition by the chosen conversion.

    Raises:
        ValueError: If ``conversion`` is unknown or ``delta`` is not in ``(0, 1)``.
    """
    if conversion == "zcdp":
        return zcdp_epsilon(rho, delta)
    if conversion == "rdp":
        return rdp_epsilon(rho, delta, orders)
    if conversion == "gdp":
        return gdp_epsilon(rho, delta)
    raise ValueError(f"`conversion` must be 'zcdp', 'rdp' or 'gdp', got {conversion!r}.")


def rho_budget(epsilon: float, delta: float, steps: int) -> float:
    r"""Per-step zCDP budget :math:`(\sqrt{\ln(1/\delta)+\varepsilon} - \sqrt{\ln(1/\delta)})^2 / T`: the
    largest ``rho_step`` whose ``T``-fold zCDP composition converts to at most ``epsilon``."""
    _check_delta(delta)
    if not epsilon > 0:
        raise ValueError(f"`epsilon` must be > 0, got {epsilon}.")
    if steps < 1:
        raise ValueError(f"`steps` must be >= 1, got {steps}.")
    log_inv = math.log(1.0 / delta)
    return (math.sqrt(log_inv + epsilon) - math.sqrt(log_inv)) ** 2 / steps


def ldp_sigma(epsilon: float, delta: float, steps: int, clip_norm: float) -> float:
    """Private noise of local DP (no pairwise noise) at ``(epsilon, delta)`` after ``steps``: ``C sqrt(2 / rho)``."""
    return clip_norm * math.sqrt(2.0 / rho_budget(epsilon, delta, steps))


def cdp_sigma(epsilon: float, delta: float, steps: int, clip_norm: float, n_clients: int) -> float:
    """Per-client noise of central DP (a trusted average) at the same budget: ``ldp_sigma / sqrt(n)``."""
    return ldp_sigma(epsilon, delta, steps, clip_norm) / math.sqrt(n_clients)


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"`delta` must be in (0, 1), got {delta}.")
