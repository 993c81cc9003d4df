"""CoBo math
===========

Pure-tensor pieces of CoBo, collaborative learning via bilevel optimization (Hashemi, He, Jaggi, NeurIPS 2024,
arXiv:2409.05539, Algorithm 1): the pair-sampling schedule, the projected-gradient update of the collaboration
weights ``W``, the consensus (X) step, the stability check of the consensus map, the Euclidean projection onto the
simplex. Cluster read-out and recovery metrics live in :mod:`lightning_epfl.functional.collab_metrics`.
No Lightning import.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of ``v`` onto the probability simplex (sort-and-threshold, arXiv:1309.1541).

    Args:
        v: Tensor ``[..., k]``.

    Returns:
        ``argmin_{w >= 0, sum w = 1} ||w - v||`` row-wise, same shape as ``v``.
    """
    if v.shape[-1] == 0:
        return v.clone()
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    k = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    cond = (u - css / k) > 0
    rho = cond.to(torch.int64).cumsum(-1).argmax(-1, keepdim=True)  # last index where cond holds
    theta = css.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp_min(0)


def pair_probability(
    step: int,
    n_clients: int,
    schedule: Literal["mixed", "constant", "all"] = "mixed",
    rate: float = 2.0,
    warmup_steps: int = 800,
    decay: float = 1.0,
) -> float:
    """Probability ``p_t`` that a pair ``i < j`` is drawn at step ``t`` (arXiv:2409.05539, Sec. 4).

    The schedule follows the authors' code.

    ``"all"``: 1. ``"constant"``: ``min(1, r/n)``. ``"mixed"``: ``min(1, r/n)`` for ``t < warmup_steps``, then
    ``min(1, r/n, c/sqrt(t+1))``.

    Raises:
        ValueError: If ``schedule`` is unknown, ``rate <= 0`` or ``decay <= 0``.
    """
    if rate <= 0:
        raise ValueError(f"`pair_rate` must be > 0, got {rate}.")
    if decay <= 0:
        raise ValueError(f"`pair_decay` must be > 0, got {decay}.")
    if schedule == "all":
        return 1.0
    base = min(1.0, rate / n_clients)
    if schedule == "constant":
        return base
    if schedule == "mixed":
        return base if step < warmup_steps else min(base, decay / math.sqrt(step + 1))
    raise ValueError(f"`pair_sampling` must be 'mixed', 'constant' or 'all', got {schedule!r}.")


def sample_pairs(n_clients: int, p: float, generator: torch.Generator) -> Tensor:
    """Draw each pair ``i < j`` independently with probability ``p``; ``[m, 2]`` int64, lexicographic order."""
    iu = torch.triu_indices(n_clients, n_clients, offset=1)
    keep = torch.rand(iu.shape[1], generator=generator) < p
    return iu[:, keep].T.contiguous()


def cobo_w_update(
    W: Tensor,
    pairs: Tensor,
    inner_products: Tensor,
    gamma: float,
    domain: Literal["box", "simplex"] = "box",
) -> Tensor:
    """One projected-gradient ascent step on the collaboration weights (CoBo's inner problem, Alg. 1 line 5).

    Box: ``w_ij = w_ji <- clip(w_ij + gamma * <g_i, g_j>, 0, 1)`` for each drawn pair. Simplex (the LLM variant):
    ``W += gamma * IP`` (symmetric increments on drawn pairs, zero on the diagonal), then each row's off-diagonal
    entries are projected onto the simplex (the diagonal stays 0).

    Args:
        W: ``[n, n]`` current weights.
        pairs: ``[m, 2]`` drawn pairs ``(i, j)``, ``i != j``.
        inner_products: ``[m]`` values ``<grad f_i(z_ij), grad f_j(z_ij)>``.
        gamma: Step size ``gamma > 0``.
        domain: ``"box"`` or ``"simplex"``.

    Returns:
        The updated ``[n, n]`` matrix (a new tensor).

    Raises:
        ValueError: If ``domain`` is unknown or ``gamma <= 0``.
    """
    if gamma <= 0:
        raise ValueError(f"`gamma` must be > 0, got {gamma}.")
    W = W.clone()
    if pairs.numel() == 0:
        return W
    i, j = pairs[:, 0], pairs[:, 1]
    ip = inner_products.to(W.dtype)
    if domain == "box":
        new = (W[i, j] + gamma * ip).clamp(0.0, 1.0)
        W[i, j] = new
        W[j, i] = new
        return W
    if domain == "simplex":
        n = W.shape[0]
        W[i, j] += gamma * ip
        W[j, i] += gamma * ip
        off = ~torch.eye(n, dtype=torch.bool, device=W.device)
        rows = W[off].reshape(n, n - 1)
        W = torch.zeros_like(W)
        W[off] = project_simplex(rows).reshape(-1)
        return W
    raise ValueError(f"`domain` must be 'box' or 'simplex', got {domain!r}.")


def consensus_laplacian(W: Tensor) -> Tensor:
    """``L_W = diag(W~ 1) - W~`` with ``W~`` = ``W`` with a zero diagonal (``[n, n]``)."""
    Wt = W - torch.diag_embed(torch.diagonal(W))
    return torch.diag_embed(Wt.sum(1)) - Wt


def consensus_step(X_local: Tensor, X_snapshot: Tensor, W: Tensor, local_ids: list[int], coef: float) -> Tensor:
    """CoBo's X-step consensus part on the snapshot (Jacobi): ``x_i -= coef * sum_{k != i} w_ik (x_i^t - x_k^t)``.

    Args:
        X_local: ``[n_local, d]`` rows to update (after the optimizer's gradient step).
        X_snapshot: ``[n, d]`` all clients' parameters ``X^t`` before the step.
        W: ``[n, n]`` collaboration weights (diagonal ignored).
        local_ids: The clients of ``X_local`` (rows of ``W``).
        coef: ``eta_t * rho`` (lr-scaled) or ``rho`` (fixed).

    Returns:
        ``X_local - coef * (L_W X^t)[local_ids]``.
    """
    L = consensus_laplacian(W)[local_ids].to(X_snapshot.dtype)
    return X_local - coef * (L @ X_snapshot)


def stability_product(lr: float, rho: float, W: Tensor) -> float:
    """``eta * rho * lambda_max(L_W)`` (eigvalsh for n <= 512, else the bound 2 * max row sum of ``W~``)."""
    L = consensus_laplacian(W.to(torch.float64))
    if L.shape[0] <= 512:
        lam = float(torch.linalg.eigvalsh(L).max())
    else:
        lam = float(2 * torch.diagonal(L).max())
    return lr * rho * lam
