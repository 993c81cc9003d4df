"""Collaborative-learning metrics
================================

Pure functions (no Lightning) over stacked client parameters ``X`` ([n, d]) and collaboration matrices ``W``
([n, n]) used by the collaborative core's ``collab/*`` logging:

* :func:`consensus_distance` -- ``(1/n) sum_i ||x_i - xbar||^2`` (Koloskova et al. 2020, "A unified theory of
  decentralized SGD", the quantity bounded in their Lemma 8), optionally within given groups;
* cluster recovery from a learned ``W`` (CoBo, arXiv:2409.05539, section 5 / Fig. 2):
  :func:`w_within_between`, :func:`pair_accuracy`, :func:`cluster_assignments` (connected components of the
  thresholded graph, or spectral clustering), :func:`adjusted_rand_index` and the bundle :func:`recovery_metrics`;
* :func:`improved_fraction` -- the paper's "Imp. %": the fraction of clients that beat a reference run.

Connected components come from ``scipy.sparse.csgraph``; spectral clustering and the ARI from scikit-learn.
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "adjusted_rand_index",
    "cluster_assignments",
    "consensus_distance",
    "improved_fraction",
    "pair_accuracy",
    "recovery_metrics",
    "w_within_between",
]


def _check_matrix(W: Tensor, name: str = "W") -> Tensor:
    w = torch.as_tensor(W).detach().cpu().to(torch.float64)
    if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] < 1:
        raise ValueError(f"`{name}` must be a non-empty square [n, n] matrix, got shape {tuple(w.shape)}.")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"`{name}` must be finite.")
    return w


def _check_labels(labels: Tensor, n: int, name: str) -> Tensor:
    lab = torch.as_tensor(labels).detach().cpu().long().flatten()
    if lab.numel() != n:
        raise ValueError(f"`{name}` must have one entry per client ({n}), got {lab.numel()}.")
    return lab


def consensus_distance(X: Tensor, groups: Tensor | None = None) -> Tensor:
    """Mean squared distance of client parameters to their average.

    ``(1/n) sum_i ||x_i - xbar||^2``; with ``groups``, ``xbar`` is replaced by the mean of client ``i``'s group
    (the within-cluster consensus distance).

    Args:
        X: ``[n, d]`` stacked client parameters (any floating dtype; computed in that dtype).
        groups: Optional ``[n]`` integer group ids.

    Returns:
        0-d tensor.

    Raises:
        ValueError: If ``X`` is not 2-D or ``groups`` has the wrong length.
    """
    if X.ndim != 2:
        raise ValueError(f"`X` must be [n, d], got shape {tuple(X.shape)}.")
    if groups is None:
        return (X - X.mean(dim=0, keepdim=True)).pow(2).sum(dim=1).mean()
    g = _check_labels(groups, X.shape[0], "groups").to(X.device)
    _, inverse, counts = torch.unique(g, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), X.shape[1], dtype=X.dtype, device=X.device).index_add_(0, inverse, X)
    means = sums / counts.to(X.dtype)[:, None]
    return (X - means[inverse]).pow(2).sum(dim=1).mean()


def w_within_between(W: Tensor, clusters: Tensor) -> tuple[float, float]:
    """Mean off-diagonal collaboration weight within and between true clusters.

    Args:
        W: ``[n, n]`` collaboration matrix (the diagonal is ignored).
        clusters: ``[n]`` true cluster ids.

    Returns:
        ``(w_within, w_between)``; ``nan`` for an empty set of pairs (e.g. all clusters singletons).
    """
    w = _check_matrix(W)
    c = _check_labels(clusters, w.shape[0], "clusters")
    same = c[:, None] == c[None, :]
    off = ~torch.eye(w.shape[0], dtype=torch.bool)
    within, between = w[same & off], w[~same & off]
    return (
        float(within.mean()) if within.numel() else float("nan"),
        float(between.mean()) if between.numel() else float("nan"),
    )


def pair_accuracy(W: Tensor, clusters: Tensor, threshold: float = 0.5) -> float:
    """Fraction of client pairs ``i != j`` where ``(W_ij > threshold)`` equals "same true cluster".

    Args:
        W: ``[n, n]`` collaboration matrix.
        clusters: ``[n]`` true cluster ids.
        threshold: Edge threshold.

    Returns:
        Accuracy in ``[0, 1]`` (``1.0`` for ``n = 1``).
    """
    w = _check_matrix(W)
    c = _check_labels(clusters, w.shape[0], "clusters")
    n = w.shape[0]
    if n == 1:
        return 1.0
    off = ~torch.eye(n, dtype=torch.bool)
    agree = (w > threshold) == (c[:, None] == c[None, :])
    return float(agree[off].double().mean())


def _relabel_first_appearance(labels: np.ndarray) -> Tensor:
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    return torch.as_tensor(order[inverse], dtype=torch.long)


def cluster_assignments(
    W: Tensor,
    k: int | None = None,
    method: Literal["components", "spectral"] = "components",
    threshold: float = 0.5,
    seed: int = 0,
) -> Tensor:
    """Cluster clients from a collaboration matrix.

    * ``"components"``: connected components of the undirected graph ``{i ~ j : W_ij > threshold or
      W_ji > threshold}`` (``k`` is ignored);
    * ``"spectral"``: scikit-learn ``SpectralClustering(k, affinity="precomputed")`` on the symmetrised
      ``(W + W^T)/2`` clipped at 0 with the diagonal set to 1. ``k=None`` uses the number of connected components
      of the thresholded graph.

    Labels are renumbered ``0, 1, ...`` in order of first appearance (client 0 is in cluster 0).

    Args:
        W: ``[n, n]`` collaboration matrix.
        k: Number of clusters for ``"spectral"``.
        method: ``"components"`` or ``"spectral"``.
        threshold: Edge threshold for ``"components"`` (and for the default ``k``).
        seed: ``random_state`` of the spectral embedding's k-means.

    Returns:
        ``[n]`` int64 cluster ids.

    Raises:
        ValueError: If ``method`` is unknown or ``k`` is not in ``[1, n]``.
    """
    from scipy.sparse.csgraph import connected_components

    w = _check_matrix(W)
    n = w.shape[0]
    if method not in ("components", "spectral"):
        raise ValueError(f"`method` must be 'components' or 'spectral', got {method!r}.")
    graph = ((w > threshold) | (w > threshold).T).numpy()
    n_comp, comp = connected_components(graph, directed=False)
    if method == "components":
        return _relabel_first_appearance(comp)
    k = n_comp if k is None else k
    if not 1 <= k <= n:
        raise ValueError(f"`k` must be in [1, n={n}], got {k}.")
    if k == 1:
        return torch.zeros(n, dtype=torch.long)
    if k == n:
        return torch.arange(n)
    from sklearn.cluster import SpectralClustering

    affinity = ((w + w.T) / 2).clamp_min(0.0)
    affinity.fill_diagonal_(1.0)
    model = SpectralClustering(n_clusters=k, affinity="precomputed", random_state=seed, assign_labels="kmeans")
    with warnings.catch_warnings():  # block-diagonal W (perfectly separated clusters) is a disconnected graph
        warnings.filterwarnings("ignore", message="Graph is not fully connected", category=UserWarning)
        labels = model.fit_predict(affinity.numpy())
    return _relabel_first_appearance(labels)


def adjusted_rand_index(pred: Tensor, target: Tensor) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985) of two clusterings, via ``sklearn.metrics.adjusted_rand_score``.

    Args:
        pred: ``[n]`` predicted cluster ids.
        target: ``[n]`` true cluster ids.

    Returns:
        ARI in ``[-0.5, 1]``; ``1`` means identical partitions up to relabelling.
    """
    from sklearn.metrics import adjusted_rand_score

    t = torch.as_tensor(target).detach().cpu().long().flatten()
    p = _check_labels(pred, t.numel(), "pred")
    return float(adjusted_rand_score(t.numpy(), p.numpy()))


def recovery_metrics(W: Tensor, clusters: Tensor, threshold: float = 0.5, seed: int = 0) -> dict[str, float]:
    """All cluster-recovery numbers of a collaboration matrix against true clusters.

    Args:
        W: ``[n, n]`` collaboration matrix.
        clusters: ``[n]`` true cluster ids.
        threshold: Edge threshold for pair accuracy and components.
        seed: Seed of the spectral clustering.

    Returns:
        ``{"w_within", "w_between", "pair_accuracy", "ari_components", "ari_spectral"}`` (callers prefix them with
        ``collab/``). Spectral clustering uses the true number of clusters; a matrix with a constant off-diagonal has
        no clusters to find, and both ARIs are those of its components (one cluster, or one per client).
    """
    c = _check_labels(clusters, torch.as_tensor(W).shape[0], "clusters")
    within, between = w_within_between(W, c)
    k = int(torch.unique(c).numel())
    w = torch.as_tensor(W, dtype=torch.float64)
    off = w[~torch.eye(w.shape[0], dtype=torch.bool)]
    if off.numel() and float(off.max() - off.min()) <= 1e-12:  # no structure (FedAvg's all-ones, Local's identity)
        one = torch.zeros_like(c) if float(off[0]) > threshold else torch.arange(c.numel())
        ari = adjusted_rand_index(one, c)
        return {
            "w_within": within,
            "w_between": between,
            "pair_accuracy": pair_accuracy(W, c, threshold),
            "ari_components": ari,
            "ari_spectral": ari,
        }
    return {
        "w_within": within,
        "w_between": between,
        "pair_accuracy": pair_accuracy(W, c, threshold),
        "ari_components": adjusted_rand_index(cluster_assignments(W, method="components", threshold=threshold), c),
        "ari_spectral": adjusted_rand_index(cluster_assignments(W, k=k, method="spectral", seed=seed), c),
    }


def improved_fraction(acc: Tensor, reference_acc: Tensor, margin: float = 0.0) -> float:
    """Fraction of clients whose accuracy beats a reference run's (the CoBo paper's "Imp. %").

    Args:
        acc: ``[n]`` per-client accuracy of the method.
        reference_acc: ``[n]`` per-client accuracy of the reference (usually Local training).
        margin: Client ``i`` counts as improved when ``acc_i > reference_acc_i + margin``.

    Returns:
        A fraction in ``[0, 1]``.

    Raises:
        ValueError: If the shapes differ or are empty.
    """
    a = torch.as_tensor(acc).detach().cpu().double().flatten()
    r = torch.as_tensor(reference_acc).detach().cpu().double().flatten()
    if a.shape != r.shape or a.numel() == 0:
        raise ValueError(
            f"`acc` and `reference_acc` must be non-empty with the same shape, got {tuple(a.shape)} and "
            f"{tuple(r.shape)}."
        )
    return float((a > r + margin).double().mean())
