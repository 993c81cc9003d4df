import numpy as np
import pytest
import torch

from lightning_epfl.datamodules.partition import (
    cluster_blocks,
    dirichlet_partition,
    group_mixture,
    iid_partition,
    label_permutation_clusters,
    label_skew_clusters,
)

LABELS = torch.as_tensor(np.random.default_rng(0).integers(0, 10, size=1000))


def _assert_disjoint(indices, n_items, complete=True):
    allidx = torch.cat(indices)
    assert allidx.unique().numel() == allidx.numel(), "client shards overlap"
    assert int(allidx.min()) >= 0 and int(allidx.max()) < n_items
    if complete:
        assert allidx.numel() == n_items


def _tv_to_global(indices, labels, n_classes=10):
    glob = torch.bincount(labels, minlength=n_classes).double()
    glob /= glob.sum()
    tvs = []
    for idx in indices:
        h = torch.bincount(labels[idx], minlength=n_classes).double()
        tvs.append(0.5 * (h / h.sum() - glob).abs().sum().item())
    return np.array(tvs)


@pytest.mark.parametrize(
    "make",
    [
        lambda g: iid_partition(1000, 7, g),
        lambda g: dirichlet_partition(LABELS, 7, 0.5, 2, 100, g),
        lambda g: label_skew_clusters(LABELS, 7, 3, True, g),
        lambda g: label_permutation_clusters(LABELS, 7, 3, g),
    ],
    ids=["iid", "dirichlet", "label_skew", "permutation"],
)
def test_partition_disjoint_complete_and_deterministic(make):
    """Shards are disjoint, cover all items, and depend only on the seed (torch.Generator or int)."""
    a = make(0)
    _assert_disjoint(a.indices, 1000)
    b = make(torch.Generator().manual_seed(5))
    c = make(torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(b.indices, c.indices))
    assert any(not torch.equal(x, y) for x, y in zip(a.indices, b.indices))
    assert a.n_clients == 7 and sum(a.sizes) == 1000


def test_partition_iid_sizes_near_equal():
    """IID shards differ in size by at most one and are near the global label distribution."""
    part = iid_partition(1000, 7, 0)
    assert max(part.sizes) - min(part.sizes) <= 1
    assert part.cluster_of is None and part.label_map is None


def test_partition_dirichlet_alpha_controls_skew():
    """Dir(1e3) is near-uniform (max TV < 0.1) while Dir(0.1) is strongly skewed (mean TV > 0.4)."""
    uniform = _tv_to_global(dirichlet_partition(LABELS, 5, 1e3, 2, 100, 0).indices, LABELS)
    skewed = _tv_to_global(dirichlet_partition(LABELS, 5, 0.1, 2, 100, 0).indices, LABELS)
    assert uniform.max() < 0.1
    assert skewed.mean() > 0.4


def test_partition_dirichlet_min_size_holds_or_raises():
    """Every client gets min_size items, or the call raises after max_retries naming the arguments."""
    part = dirichlet_partition(LABELS, 10, 0.3, min_size=20, max_retries=200, generator=1)
    assert min(part.sizes) >= 20
    with pytest.raises(ValueError, match="`min_size`=90 items in `max_retries`=3 tries"):
        dirichlet_partition(LABELS, 10, 0.05, min_size=90, max_retries=3, generator=0)


def test_partition_label_skew_disjoint_classes_and_relabel():
    """Clusters own disjoint class sets covering all classes; labels map to 0..k-1 with relabel=True."""
    part = label_skew_clusters(LABELS, 8, 3, relabel=True, generator=2)
    assert part.cluster_of.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    owned = [set(torch.nonzero(part.label_map[k] >= 0).flatten().tolist()) for k in range(3)]
    assert sorted(len(o) for o in owned) == [3, 3, 4]
    assert set().union(*owned) == set(range(10))
    assert sum(len(o) for o in owned) == 10
    for k in range(3):
        assert sorted(part.label_map[k][part.label_map[k] >= 0].tolist()) == list(range(len(owned[k])))
    for i, idx in enumerate(part.indices):
        assert set(LABELS[idx].tolist()) <= owned[int(part.cluster_of[i])]
    # clients of one cluster split all of its data
    for k in range(3):
        members = torch.nonzero(part.cluster_of == k).flatten().tolist()
        got = torch.cat([part.indices[i] for i in members]).sort().values
        expected = torch.nonzero(torch.isin(LABELS, torch.tensor(sorted(owned[k])))).flatten()
        assert torch.equal(got, expected)
    keep = label_skew_clusters(LABELS, 8, 3, relabel=False, generator=2).label_map
    assert all(torch.equal(keep[k][keep[k] >= 0], torch.tensor(sorted(owned[k]))) for k in range(3))


def test_partition_label_permutations_identity_first_and_distinct():
    """pi_0 is the identity; all pi_k are distinct permutations; clusters are contiguous near-equal blocks."""
    part = label_permutation_clusters(LABELS, 80, 10, generator=0)
    assert torch.equal(part.label_map[0], torch.arange(10))
    assert len({tuple(p.tolist()) for p in part.label_map}) == 10
    for p in part.label_map:
        assert sorted(p.tolist()) == list(range(10))
    assert torch.bincount(part.cluster_of).tolist() == [8] * 10
    assert (part.cluster_of[1:] >= part.cluster_of[:-1]).all()


def test_partition_group_mixture_proportions():
    """Each client's group proportions are within 1/size of the target, shards disjoint; equal rows = one cluster."""
    groups = torch.as_tensor(np.repeat(np.arange(4), [300, 250, 250, 200]))
    mixture = [[0.75, 0.25, 0, 0], [0.75, 0.25, 0, 0], [0, 0, 0.75, 0.25], [0.25, 0.25, 0.25, 0.25]]
    part = group_mixture(groups, mixture, generator=3)
    _assert_disjoint(part.indices, 1000, complete=False)
    for i, idx in enumerate(part.indices):
        size = idx.numel()
        frac = torch.bincount(groups[idx], minlength=4).double() / size
        assert (frac - torch.tensor(mixture[i], dtype=torch.float64)).abs().max() <= 1 / size + 1e-12
    assert part.cluster_of.tolist() == [0, 0, 1, 2]
    assert len(set(part.sizes)) == 1
    small = group_mixture(groups, mixture, generator=3, client_size=10)
    assert small.sizes == [10, 10, 10, 10]


def test_cluster_blocks_near_equal():
    """Cluster sizes differ by at most one and ids are non-decreasing."""
    c = cluster_blocks(10, 4)
    assert c.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: iid_partition(5, 6, 0), "`n_clients`=6 exceeds the 5 items"),
        (lambda: iid_partition(5, 0, 0), "`n_clients` must be >= 1"),
        (lambda: dirichlet_partition(LABELS, 4, 0.0), "`alpha` must be > 0"),
        (lambda: label_skew_clusters(LABELS, 20, 11), r"`n_clusters` must be in \[1, 10\]"),
        (lambda: label_permutation_clusters(LABELS, 4, 5), r"`n_clusters` must be in \[1, n_clients=4\]"),
        (lambda: label_permutation_clusters(torch.tensor([0, 1, 0, 1]), 4, 3), "exceeds the 2! distinct"),
        (lambda: group_mixture(LABELS % 2, [[0.5, 0.6]]), "sum to 1"),
        (lambda: group_mixture(LABELS % 2, [[1.0]]), r"`mixture` must have shape \[n_clients, 2\]"),
        (lambda: group_mixture(LABELS % 2, [[1.0, 0.0]], client_size=2000), "group 0 has"),
        (lambda: iid_partition(5, 2, 0) and dirichlet_partition(torch.tensor([[1]]), 1, 1.0), "1-D"),
    ],
)
def test_partition_bad_input(call, match):
    """Invalid arguments raise ValueError naming the argument."""
    with pytest.raises(ValueError, match=match):
        call()
