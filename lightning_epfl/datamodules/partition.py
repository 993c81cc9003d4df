"""Federated partitioners
========================

Pure functions that split a labelled data set over ``n_clients`` clients.
Every partitioner returns a :class:`Partition` and is deterministic given its ``generator`` (a
``torch.Generator`` or an integer seed; the integer form is what :class:`FederatedDataModule` passes).

* :func:`iid_partition` -- a uniform random split into near-equal disjoint shards.
* :func:`dirichlet_partition` -- per-class client proportions drawn from Dir(alpha) (Hsu et al. 2019,
  arXiv:1909.06335), retried until every client holds ``min_size`` items, at most ``max_retries`` times.
* :func:`label_skew_clusters` -- clusters own disjoint class subsets; the clients of a cluster split its data
  (CoBo's cross-device setup, arXiv:2409.05539 section 5, with ``relabel=True`` mapping classes to ``0..k-1``).
* :func:`label_permutation_clusters` -- a disjoint random split of all data; cluster ``k`` sees labels through a
  permutation ``pi_k`` with ``pi_0`` the identity (CoBo's cross-silo "label flip").
* :func:`group_mixture` -- client ``i`` draws its items from groups (categories, domains) in the proportions
  ``mixture[i]`` (trust-weighted LoRA's "specific" and "mixed" splits, arXiv:2404.09753).

Clients are assigned to clusters in contiguous, near-equal blocks: client ``i`` belongs to cluster
``cluster_of[i]``, non-decreasing in ``i``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Partition",
    "cluster_blocks",
    "dirichlet_partition",
    "group_mixture",
    "iid_partition",
    "label_permutation_clusters",
    "label_skew_clusters",
]


@dataclass
class Partition:
    """Result of a partitioner.

    Attributes:
        indices: One sorted int64 tensor of item indices per client (disjoint).
        cluster_of: ``[n_clients]`` int64 true cluster of each client, or ``None`` when the partition has no
            cluster structure.
        label_map: ``[n_clusters, n_classes]`` int64 map from original to training label per cluster
            (``-1``: the class is absent from that cluster), or ``None`` when labels are unchanged.
    """

    indices: list[Tensor]
    cluster_of: Tensor | None = None
    label_map: Tensor | None = None

    @property
    def n_clients(self) -> int:
        """Number of clients."""
        return len(self.indices)

    @property
    def sizes(self) -> list[int]:
        """Number of items per client."""
        return [int(i.numel()) for i in self.indices]


def _rng(generator: torch.Generator | int) -> np.random.Generator:
    """A numpy generator derived deterministically from a torch generator (advancing it) or an integer seed."""
    if isinstance(generator, torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    else:
        seed = int(generator)
    return np.random.default_rng(seed)


def _as_labels(labels: Tensor | np.ndarray | Sequence[int], name: str = "labels") -> np.ndarray:
    y = np.asarray(torch.as_tensor(labels).detach().cpu().long())
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"`{name}` must be a non-empty 1-D integer array, got shape {y.shape}.")
    if y.min() < 0:
        raise ValueError(f"`{name}` must be nonnegative class ids, got {int(y.min())}.")
    return y


def _check_clients(n_clients: int, n_items: int) -> None:
    if n_clients < 1:
        raise ValueError(f"`n_clients` must be >= 1, got {n_clients}.")
    if n_clients > n_items:
        raise ValueError(f"`n_clients`={n_clients} exceeds the {n_items} items to split.")


def _to_tensors(parts: Sequence[np.ndarray]) -> list[Tensor]:
    return [torch.as_tensor(np.sort(p), dtype=torch.long) for p in parts]


def cluster_blocks(n_clients: int, n_clusters: int, sizes: Sequence[int] | None = None) -> Tensor:
    """Assign clients to clusters in contiguous blocks: near-equal (sizes differ by at most one), or of the given
    ``sizes`` (e.g. the CoBo paper's cross-device 6, 6, 7, 7, 8, 8, 9, 9, 10, 10).

    Args:
        n_clients: Number of clients.
        n_clusters: Number of clusters, in ``[1, n_clients]``.
        sizes: Clients per cluster (``n_clusters`` positive integers summing to ``n_clients``); ``None``: near-equal.

    Returns:
        ``[n_clients]`` int64, non-decreasing.

    Raises:
        ValueError: If ``n_clusters`` is outside ``[1, n_clients]`` or ``sizes`` does not fit.
    """
    if not 1 <= n_clusters <= n_clients:
        raise ValueError(f"`n_clusters` must be in [1, n_clients={n_clients}], got {n_clusters}.")
    if sizes is None:
        counts = [len(b) for b in np.array_split(np.arange(n_clients), n_clusters)]
    else:
        integral = all(isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in sizes)
        counts = [int(c) for c in sizes] if integral else []
        if not integral or len(counts) != n_clusters or any(c < 1 for c in counts) or sum(counts) != n_clients:
            total = f" (sum {sum(counts)})" if integral else ""
            raise ValueError(
                f"`cluster_sizes` must be {n_clusters} positive integers summing to n_clients={n_clients}, "
                f"got {list(sizes)}{total}."
            )
    return torch.as_tensor(np.repeat(np.arange(n_clusters), counts))


def iid_partition(n_items: int, n_clients: int, generator: torch.Generator | int = 0) -> Partition:
    """Split ``range(n_items)`` uniformly at random into ``n_clients`` disjoint shards of near-equal size.

    Raises:
        ValueError: If ``n_clients`` is not in ``[1, n_items]``.
    """
    _check_clients(n_clients, n_items)
    perm = _rng(generator).permutation(n_items)
    return Partition(_to_tensors(np.array_split(perm, n_clients)))


def dirichlet_partition(
    labels: Tensor | np.ndarray,
    n_clients: int,
    alpha: float,
    min_size: int = 2,
    max_retries: int = 100,
    generator: torch.Generator | int = 0,
) -> Partition:
    """Label-skewed split: for every class ``c``, client proportions ``p_c ~ Dir(alpha * 1_n)``.

    Items of class ``c`` are shuffled and cut at ``floor(cumsum(p_c) * n_c)``. Small ``alpha`` concentrates each
    class on few clients; ``alpha -> inf`` approaches an IID split. The draw is repeated until every client holds
    at least ``min_size`` items.

    Args:
        labels: ``[N]`` class ids.
        n_clients: Number of clients.
        alpha: Dirichlet concentration, ``> 0``.
        min_size: Minimum items per client, ``>= 0``.
        max_retries: Maximum number of draws, ``>= 1``.
        generator: ``torch.Generator`` or integer seed.

    Raises:
        ValueError: If an argument is out of range, or no draw satisfied ``min_size`` in ``max_retries`` tries.
    """
    y = _as_labels(labels)
    _check_clients(n_clients, y.size)
    if not alpha > 0:
        raise ValueError(f"`alpha` must be > 0, got {alpha}.")
    if min_size < 0 or min_size * n_clients > y.size:
        raise ValueError(f"`min_size` must be in [0, N/n_clients = {y.size // n_clients}], got {min_size}.")
    if max_retries < 1:
        raise ValueError(f"`max_retries` must be >= 1, got {max_retries}.")
    rng = _rng(generator)
    classes = np.unique(y)
    smallest = 0
    for _ in range(max_retries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            p = rng.dirichlet(np.full(n_clients, float(alpha)))
            cuts = (np.cumsum(p)[:-1] * idx.size).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        merged = [np.concatenate(p) for p in parts]
        smallest = min(m.size for m in merged)
        if smallest >= min_size:
            return Partition(_to_tensors(merged))
    raise ValueError(
        f"dirichlet_partition: no draw gave every client `min_size`={min_size} items in `max_retries`={max_retries} "
        f"tries (last smallest client: {smallest}); increase `alpha` or lower `min_size`/`n_clients`."
    )


def label_skew_clusters(
    labels: Tensor | np.ndarray,
    n_clients: int,
    n_clusters: int,
    relabel: bool = True,
    generator: torch.Generator | int = 0,
    cluster_sizes: Sequence[int] | None = None,
) -> Partition:
    """Clusters own disjoint class subsets; each cluster's items are split disjointly over its clients.

    Classes are shuffled and dealt into ``n_clusters`` subsets of near-equal size. With ``relabel=True`` the
    classes of a cluster (in increasing order) become labels ``0..k-1``, as in CoBo's cross-device setup.

    Args:
        labels: ``[N]`` class ids.
        n_clients: Number of clients (``>= n_clusters``).
        n_clusters: Number of clusters (``<=`` number of classes).
        relabel: Map each cluster's classes to ``0..k-1``.
        generator: ``torch.Generator`` or integer seed.

        cluster_sizes: Clients per cluster (see :func:`cluster_blocks`); ``None``: near-equal blocks.

    Returns:
        A :class:`Partition` with ``cluster_of`` and ``label_map`` (``-1`` for classes a cluster does not own).

    Raises:
        ValueError: If ``n_clusters`` exceeds the number of classes or ``n_clients``, or a client would be empty.
    """
    y = _as_labels(labels)
    _check_clients(n_clients, y.size)
    classes = np.unique(y)
    if not 1 <= n_clusters <= classes.size:
        raise ValueError(
            f"`n_clusters` must be in [1, {classes.size}] (disjoint class subsets of {classes.size} classes), "
            f"got {n_clusters}; use label_permutation_clusters for more clusters."
        )
    cluster_of = cluster_blocks(n_clients, n_clusters, cluster_sizes)
    rng = _rng(generator)
    subsets = np.array_split(rng.permutation(classes), n_clusters)
    n_classes = int(y.max()) + 1
    label_map = torch.full((n_clusters, n_classes), -1, dtype=torch.long)
    indices: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * n_clients
    for k, subset in enumerate(subsets):
        subset = np.sort(subset)
        label_map[k, torch.as_tensor(subset)] = torch.arange(subset.size) if relabel else torch.as_tensor(subset)
        members = np.flatnonzero(cluster_of.numpy() == k)
        items = rng.permutation(np.flatnonzero(np.isin(y, subset)))
        if items.size < members.size:
            raise ValueError(
                f"cluster {k} has {items.size} items for {members.size} clients; lower `n_clients` or `n_clusters`."
            )
        for client, chunk in zip(members, np.array_split(items, members.size)):
            indices[client] = chunk
    return Partition(_to_tensors(indices), cluster_of=cluster_of, label_map=label_map)


def label_permutation_clusters(
    labels: Tensor | np.ndarray,
    n_clients: int,
    n_clusters: int,
    generator: torch.Generator | int = 0,
    cluster_sizes: Sequence[int] | None = None,
) -> Partition:
    """A disjoint random split of all items; cluster ``k`` relabels class ``c`` as ``pi_k(c)``.

    ``pi_0`` is the identity and all ``pi_k`` are distinct (rejection sampling). Clients of different clusters
    therefore face conflicting tasks on the same input distribution.

    Args:
        labels: ``[N]`` class ids.
        n_clients: Number of clients (``>= n_clusters``).
        n_clusters: Number of clusters.
        generator: ``torch.Generator`` or integer seed.

        cluster_sizes: Clients per cluster (see :func:`cluster_blocks`); ``None``: near-equal blocks.

    Returns:
        A :class:`Partition` with ``cluster_of`` and ``label_map[k] = pi_k`` (``[n_clusters, n_classes]``).

    Raises:
        ValueError: If ``n_clusters`` is outside ``[1, n_clients]`` or exceeds ``n_classes!``.
    """
    y = _as_labels(labels)
    _check_clients(n_clients, y.size)
    n_classes = int(y.max()) + 1
    cluster_of = cluster_blocks(n_clients, n_clusters, cluster_sizes)
    if n_classes < 13 and n_clusters > int(np.prod(np.arange(1, n_classes + 1))):
        raise ValueError(f"`n_clusters`={n_clusters} exceeds the {n_classes}! distinct label permutations.")
    rng = _rng(generator)
    perms = [tuple(range(n_classes))]
    while len(perms) < n_clusters:
        p = tuple(int(v) for v in rng.permutation(n_classes))
        if p not in perms:
            perms.append(p)
    indices = np.array_split(rng.permutation(y.size), n_clients)
    return Partition(_to_tensors(indices), cluster_of=cluster_of, label_map=torch.tensor(perms, dtype=torch.long))


def group_mixture(
    groups: Tensor | np.ndarray,
    mixture: Sequence[Sequence[float]],
    generator: torch.Generator | int = 0,
    client_size: int | None = None,
) -> Partition:
    """Client ``i`` draws ``client_size`` items from the groups in the proportions ``mixture[i]``, disjointly.

    Per-client counts are ``round(client_size * mixture[i][g])`` by largest remainders (so they sum to
    ``client_size`` and each is within 1 of the target). The default ``client_size`` is the largest that the
    smallest group can serve: ``min_g |G_g| / sum_i mixture[i][g]``, capped at ``N / n_clients``. Clients with
    identical mixture rows form a true cluster (``cluster_of``), numbered in order of first appearance.

    Args:
        groups: ``[N]`` group ids ``0..G-1`` (categories, domains; class labels when no groups exist).
        mixture: ``n_clients`` rows of ``G`` nonnegative proportions summing to 1.
        generator: ``torch.Generator`` or integer seed.
        client_size: Items per client, or ``None`` for the largest feasible size.

    Raises:
        ValueError: If a row has the wrong length, negative entries or does not sum to 1, or the groups cannot
            serve ``client_size`` items to every client.
    """
    g = _as_labels(groups, "groups")
    n_groups = int(g.max()) + 1
    mix = np.asarray(mixture, dtype=np.float64)
    if mix.ndim != 2 or mix.shape[1] != n_groups or mix.shape[0] < 1:
        raise ValueError(f"`mixture` must have shape [n_clients, {n_groups}] (one weight per group), got {mix.shape}.")
    if (mix < 0).any() or not np.allclose(mix.sum(1), 1.0, atol=1e-6):
        raise ValueError("every row of `mixture` must be nonnegative and sum to 1.")
    n_clients = mix.shape[0]
    members = [np.flatnonzero(g == k) for k in range(n_groups)]
    demand = mix.sum(0)
    if client_size is None:
        caps = [members[k].size / demand[k] for k in range(n_groups) if demand[k] > 0]
        client_size = int(min(min(caps), g.size // n_clients))
    if client_size < 1:
        raise ValueError(f"`client_size` must be >= 1, got {client_size} (groups too small for the mixture?).")
    counts = np.zeros((n_clients, n_groups), dtype=np.int64)
    for i in range(n_clients):
        target = client_size * mix[i]
        base = np.floor(target).astype(np.int64)
        rest = client_size - base.sum()
        order = np.argsort(-(target - base), kind="stable")
        base[order[:rest]] += 1
        counts[i] = base
    for k in range(n_groups):
        if counts[:, k].sum() > members[k].size:
            raise ValueError(
                f"group {k} has {members[k].size} items but the mixture asks for {counts[:, k].sum()}; "
                "lower `client_size`."
            )
    rng = _rng(generator)
    pools = [rng.permutation(m) for m in members]
    taken = [0] * n_groups
    indices = []
    for i in range(n_clients):
        chunks = []
        for k in range(n_groups):
            chunks.append(pools[k][taken[k] : taken[k] + counts[i, k]])
            taken[k] += counts[i, k]
        indices.append(np.concatenate(chunks))
    _, first, inverse = np.unique(mix, axis=0, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))
    cluster_of = torch.as_tensor(rank[inverse.reshape(-1)], dtype=torch.long)
    return Partition(_to_tensors(indices), cluster_of=cluster_of)
