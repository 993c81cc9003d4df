import itertools
from math import comb

import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from lightning_epfl.functional.collab_metrics import (
    adjusted_rand_index,
    cluster_assignments,
    consensus_distance,
    improved_fraction,
    pair_accuracy,
    recovery_metrics,
    w_within_between,
)


def _block_w(clusters, within=0.9, between=0.05, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.as_tensor(clusters)
    same = (c[:, None] == c[None, :]).double()
    w = same * within + (1 - same) * between + noise * torch.rand(len(c), len(c), generator=g, dtype=torch.float64)
    return (w + w.T) / 2


def _ari_pair_counting(a, b):
    """Hubert-Arabie ARI from the contingency table, written out with plain loops."""
    n = len(a)
    table = {}
    for x, y in zip(a, b):
        table[(x, y)] = table.get((x, y), 0) + 1
    rows, cols = {}, {}
    for (x, y), v in table.items():
        rows[x] = rows.get(x, 0) + v
        cols[y] = cols.get(y, 0) + v
    index = sum(comb(v, 2) for v in table.values())
    sr, sc = sum(comb(v, 2) for v in rows.values()), sum(comb(v, 2) for v in cols.values())
    expected = sr * sc / comb(n, 2)
    return (index - expected) / ((sr + sc) / 2 - expected)


def _components_union_find(W, threshold):
    n = W.shape[0]
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in itertools.combinations(range(n), 2):
        if W[i, j] > threshold or W[j, i] > threshold:
            parent[find(i)] = find(j)
    roots = [find(i) for i in range(n)]
    first = {}
    return [first.setdefault(r, len(first)) for r in roots]


def test_consensus_distance_matches_loop():
    """Consensus distance equals (1/n) sum_i ||x_i - mean||^2, globally and within groups (1e-12)."""
    X = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mean = X.mean(0)
    ref = sum(float(((X[i] - mean) ** 2).sum()) for i in range(6)) / 6
    assert consensus_distance(X).item() == pytest.approx(ref, abs=1e-12)
    groups = torch.tensor([0, 1, 0, 2, 1, 0])
    ref_g = 0.0
    for i in range(6):
        m = X[groups == groups[i]].mean(0)
        ref_g += float(((X[i] - m) ** 2).sum()) / 6
    assert consensus_distance(X, groups).item() == pytest.approx(ref_g, abs=1e-12)
    assert consensus_distance(X.new_ones(4, 3)).item() == 0.0


def test_w_within_between_and_pair_accuracy_hand_computed():
    """Within/between means and pair accuracy match a hand computation on a 4-client matrix."""
    W = torch.tensor(
        [[9.0, 0.8, 0.6, 0.1], [0.8, 9.0, 0.2, 0.3], [0.6, 0.2, 9.0, 0.7], [0.1, 0.3, 0.7, 9.0]], dtype=torch.float64
    )
    clusters = torch.tensor([0, 0, 1, 1])
    within, between = w_within_between(W, clusters)
    assert within == pytest.approx((0.8 + 0.7) / 2, abs=1e-12)
    assert between == pytest.approx((0.6 + 0.1 + 0.2 + 0.3) / 4, abs=1e-12)
    # pairs (0,1) ok, (2,3) ok, (0,2) wrong (0.6 > 0.5 across clusters), others ok -> 5/6
    assert pair_accuracy(W, clusters) == pytest.approx(5 / 6, abs=1e-12)
    assert pair_accuracy(W, clusters, threshold=0.65) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cluster_assignments_components_match_union_find(seed):
    """Components of the thresholded W equal a union-find loop, and ARI equals sklearn's on those labels."""
    g = torch.Generator().manual_seed(seed)
    W = torch.rand(12, 12, generator=g, dtype=torch.float64) ** 3
    labels = cluster_assignments(W, method="components", threshold=0.5)
    assert labels.tolist() == _components_union_find(W, 0.5)
    truth = torch.randint(0, 3, (12,), generator=g)
    assert adjusted_rand_index(labels, truth) == pytest.approx(adjusted_rand_score(truth, labels), abs=1e-12)


def test_adjusted_rand_index_matches_pair_counting_formula():
    """ARI equals the Hubert-Arabie formula on random labelings and is 1 under relabelling (1e-12)."""
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        a = torch.randint(0, 4, (20,), generator=g)
        b = torch.randint(0, 3, (20,), generator=g)
        assert adjusted_rand_index(a, b) == pytest.approx(_ari_pair_counting(a.tolist(), b.tolist()), abs=1e-12)
    truth = torch.tensor([0, 0, 1, 1, 2, 2])
    assert adjusted_rand_index(torch.tensor([5, 5, 3, 3, 9, 9]), truth) == pytest.approx(1.0, abs=1e-15)


def test_cluster_assignments_recover_block_structure():
    """A noisy 3-block W is recovered exactly by components and spectral clustering (ARI 1, labels in first order)."""
    truth = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    W = _block_w(truth)
    comps = cluster_assignments(W)
    assert comps.tolist() == truth.tolist()
    spec = cluster_assignments(W, k=3, method="spectral")
    assert adjusted_rand_index(spec, truth) == pytest.approx(1.0, abs=1e-12)
    assert cluster_assignments(W, method="spectral").tolist() == truth.tolist()  # k defaults to #components


def test_cluster_assignments_spectral_survives_a_bridge():
    """One strong cross-cluster weight glues components but spectral clustering with k=2 still recovers truth."""
    truth = torch.tensor([0] * 5 + [1] * 5)
    W = _block_w(truth)
    W[0, 7] = W[7, 0] = 0.9
    assert adjusted_rand_index(cluster_assignments(W), truth) == pytest.approx(0.0, abs=1e-12)
    assert adjusted_rand_index(cluster_assignments(W, k=2, method="spectral"), truth) == pytest.approx(1.0, abs=1e-12)


def test_recovery_metrics_bundle():
    """The bundle reports the same numbers as the individual functions."""
    truth = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    W = _block_w(truth, seed=4)
    m = recovery_metrics(W, truth)
    within, between = w_within_between(W, truth)
    assert m["w_within"] == within and m["w_between"] == between
    assert m["pair_accuracy"] == pytest.approx(1.0)
    assert m["ari_components"] == pytest.approx(1.0)
    assert m["ari_spectral"] == pytest.approx(1.0)


def test_improved_fraction_counts_strict_improvements():
    """Imp.% counts clients strictly above the reference (plus margin)."""
    acc = torch.tensor([0.9, 0.8, 0.7, 0.6])
    ref = torch.tensor([0.85, 0.8, 0.75, 0.5])
    assert improved_fraction(acc, ref) == pytest.approx(0.5)
    assert improved_fraction(acc, ref, margin=0.07) == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: cluster_assignments(torch.eye(3), method="kmeans"), "`method` must be 'components' or 'spectral'"),
        (lambda: cluster_assignments(torch.eye(3), k=4, method="spectral"), r"`k` must be in \[1, n=3\]"),
        (lambda: pair_accuracy(torch.eye(3), torch.tensor([0, 1])), "`clusters` must have one entry per client"),
        (lambda: consensus_distance(torch.ones(3)), r"`X` must be \[n, d\]"),
        (lambda: w_within_between(torch.ones(2, 3), torch.tensor([0, 1])), "`W` must be a non-empty square"),
        (lambda: improved_fraction(torch.ones(3), torch.ones(2)), "same shape"),
    ],
)
def test_collab_metrics_bad_input(call, match):
    """Bad shapes or options raise ValueError naming the argument."""
    with pytest.raises(ValueError, match=match):
        call()
