import math

import pytest
import torch

from lightning_epfl.functional.topology import (
    Topology,
    check_mixing_matrix,
    mixing_contraction,
    mixing_matrix,
    spectral_gap,
)


def _all_topologies():
    return [
        Topology.ring(3),
        Topology.ring(8),
        Topology.torus(16),
        Topology.torus(3, 5),
        Topology.complete(1),
        Topology.complete(6),
        Topology.erdos_renyi(20, 0.3, seed=0),
        Topology.erdos_renyi(12, 0.4, seed=5),
    ]


@pytest.mark.parametrize("rule", ["uniform", "metropolis_hastings"])
@pytest.mark.parametrize("topo", _all_topologies(), ids=lambda t: f"{t.name}{t.n}")
def test_mixing_matrix_doubly_stochastic(topo, rule):
    """Both rules give symmetric, nonnegative, doubly-stochastic W supported on the graph (1e-12)."""
    W = mixing_matrix(topo, rule)
    assert W.dtype == torch.float64
    assert torch.allclose(W, W.T, atol=0, rtol=0)
    assert (W >= 0).all()
    assert torch.allclose(W.sum(0), torch.ones(topo.n, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.allclose(W.sum(1), torch.ones(topo.n, dtype=torch.float64), atol=1e-12, rtol=0)
    off_graph = ~(topo.adjacency | torch.eye(topo.n, dtype=torch.bool))
    assert (W[off_graph] == 0).all()
    report = check_mixing_matrix(W, topo, atol=1e-12)
    if topo.n > 1:
        assert report.spectral_gap > 0
        assert report.algebraic_connectivity > 0


def test_mixing_matrix_uniform_reference_weights():
    """Uniform weights are 1/3 on a ring, 1/5 on a torus and 1/n on the complete graph."""
    ring = mixing_matrix(Topology.ring(7))
    assert ring[0, 1].item() == pytest.approx(1 / 3, abs=1e-15)
    assert ring[0, 6].item() == pytest.approx(1 / 3, abs=1e-15)
    assert ring[0, 0].item() == pytest.approx(1 / 3, abs=1e-15)
    torus = mixing_matrix(Topology.torus(4, 4))
    assert torch.allclose(torus[torus > 0], torch.full((16 * 5,), 0.2, dtype=torch.float64), atol=1e-15)
    n = 9
    assert torch.allclose(mixing_matrix(Topology.complete(n)), torch.full((n, n), 1 / n, dtype=torch.float64))


def test_mixing_matrix_metropolis_hastings_hand_computed():
    """MH weights equal a hand computation on the graph 0-1, 1-2, 1-3, 2-3 (degrees 1, 3, 2, 2)."""
    a = torch.zeros(4, 4, dtype=torch.bool)
    for i, j in [(0, 1), (1, 2), (1, 3), (2, 3)]:
        a[i, j] = a[j, i] = True
    W = mixing_matrix(Topology.from_adjacency(a), "metropolis_hastings")
    expected = torch.tensor(
        [
            [3 / 4, 1 / 4, 0, 0],
            [1 / 4, 1 / 4, 1 / 4, 1 / 4],
            [0, 1 / 4, 5 / 12, 1 / 3],
            [0, 1 / 4, 1 / 3, 5 / 12],
        ],
        dtype=torch.float64,
    )
    assert torch.allclose(W, expected, atol=1e-15, rtol=0)


def test_mixing_matrix_unknown_rule():
    """An unknown rule names the argument and the allowed values."""
    with pytest.raises(ValueError, match="`rule` must be 'uniform' or 'metropolis_hastings'"):
        mixing_matrix(Topology.ring(4), "max_degree")


def test_topology_ring_algebraic_connectivity_closed_form():
    """lambda_2(L) of a ring equals 2 - 2 cos(2 pi / n) (1e-12)."""
    for n in (3, 5, 10, 33):
        assert Topology.ring(n).algebraic_connectivity() == pytest.approx(2 - 2 * math.cos(2 * math.pi / n), abs=1e-12)


def test_topology_structure_properties():
    """Degrees, edges, neighbours, Laplacian and subgraph of small graphs are what the definitions give."""
    ring = Topology.ring(5)
    assert ring.degrees.tolist() == [2] * 5
    assert ring.edges == [(0, 1), (0, 4), (1, 2), (2, 3), (3, 4)]
    assert ring.neighbours(0) == (1, 4)
    L = ring.laplacian()
    assert torch.allclose(L.sum(1), torch.zeros(5, dtype=torch.float64))
    assert Topology.torus(3, 4).degrees.tolist() == [4] * 12
    assert len(Topology.complete(6).edges) == 15
    sub = ring.subgraph([0, 1, 2])
    assert sub.edges == [(0, 1), (1, 2)]
    assert sub.is_connected()
    assert not ring.subgraph([0, 2]).is_connected()
    assert ring == Topology.ring(5) and hash(ring) == hash(Topology.ring(5))
    assert ring != Topology.ring(6)


def test_topology_erdos_renyi_seeded_and_connected():
    """ER graphs are deterministic by seed, connected, and differ across seeds."""
    a = Topology.erdos_renyi(20, 0.3, seed=1)
    b = Topology.erdos_renyi(20, 0.3, seed=1)
    c = Topology.erdos_renyi(20, 0.3, seed=2)
    assert torch.equal(a.adjacency, b.adjacency)
    assert not torch.equal(a.adjacency, c.adjacency)
    assert a.is_connected()
    W = mixing_matrix(a, "metropolis_hastings")
    assert torch.allclose(W.sum(0), torch.ones(20, dtype=torch.float64), atol=1e-12, rtol=0)


def test_topology_erdos_renyi_too_sparse_raises():
    """ER at p = 0.01 cannot be connected and raises after max_tries with a hint on p."""
    with pytest.raises(ValueError, match=r"`max_tries`=5.*ln\(n\)/n"):
        Topology.erdos_renyi(30, 0.01, seed=0, max_tries=5)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Topology.ring(2), "`n` must be >= 3"),
        (lambda: Topology.torus(12), "`rows`=12 must be a perfect square"),
        (lambda: Topology.torus(2, 5), "`rows` >= 3 and `cols` >= 3"),
        (lambda: Topology.erdos_renyi(5, 0.0), r"`p` must be in \(0, 1\]"),
        (lambda: Topology.from_adjacency(torch.eye(3)), "no self-loops"),
        (lambda: Topology.from_adjacency(torch.tensor([[0, 1], [0, 0]])), "must be symmetric"),
    ],
)
def test_topology_bad_input(build, match):
    """Invalid builder arguments raise ValueError naming the argument."""
    with pytest.raises(ValueError, match=match):
        build()


def test_check_mixing_matrix_disconnected_custom_raises():
    """A doubly-stochastic but block-diagonal custom W (two components) raises, naming the argument."""
    W = torch.block_diag(torch.full((2, 2), 0.5, dtype=torch.float64), torch.full((3, 3), 1 / 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="`W` must describe a connected graph; its support has 2 components"):
        check_mixing_matrix(W)
    with pytest.raises(ValueError, match="`mixing_matrix` must describe a connected graph"):
        check_mixing_matrix(W, name="mixing_matrix")
    report = check_mixing_matrix(W, connected=False)
    assert report.algebraic_connectivity == pytest.approx(0.0, abs=1e-12)
    assert report.spectral_gap == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    ("W", "kwargs", "match"),
    [
        ([[0.5, 0.6], [0.6, 0.4]], {}, r"rows of `W` must sum to 1; row 0"),
        ([[1.5, -0.5], [-0.5, 1.5]], {}, r"nonnegative; worst entry W\[0, 1\]"),
        ([[0.5, 0.5], [0.3, 0.7]], {}, r"must be symmetric"),
        (
            [[0.5, 0.5], [0.2, 0.8]],
            {"symmetric": False},
            r"doubly stochastic.*column",
        ),
        (torch.full((4, 4), 0.25), {"topology": Topology.ring(4)}, r"outside the topology's edges: W\[0, 2\]"),
        (torch.ones(2, 3), {}, "square"),
    ],
)
def test_check_mixing_matrix_bad_input(W, kwargs, match):
    """Each violated property raises ValueError naming the property and the worst entry."""
    with pytest.raises(ValueError, match=match):
        check_mixing_matrix(torch.as_tensor(W, dtype=torch.float64), **kwargs)


def test_check_mixing_matrix_row_stochastic_allowed():
    """With symmetric=False and doubly_stochastic=False a learned row-stochastic matrix passes."""
    W = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.5, 0.3], [0.0, 0.9, 0.1]], dtype=torch.float64)
    report = check_mixing_matrix(W, symmetric=False, doubly_stochastic=False)
    assert not report.symmetric
    assert report.max_col_error == pytest.approx(0.9, abs=1e-12)
    assert report.spectral_gap == pytest.approx(1 - sorted(torch.linalg.eigvals(W).abs().tolist())[-2], abs=1e-12)


def test_mixing_complete_graph_gives_exact_mean():
    """One step with the complete-graph uniform W replaces every row by the exact mean."""
    X = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mixed = mixing_matrix(Topology.complete(7)) @ X
    assert torch.allclose(mixed, X.mean(0, keepdim=True).expand_as(X), atol=1e-14, rtol=0)


@pytest.mark.parametrize("topo", [Topology.ring(9), Topology.torus(3, 3), Topology.erdos_renyi(15, 0.3, seed=3)])
def test_mixing_preserves_mean_and_contracts(topo):
    """Gossip preserves the mean and ||X_t - Xbar|| <= lambda^t ||X_0 - Xbar|| + 1e-12 with lambda = 1 - gap."""
    W = mixing_matrix(topo, "metropolis_hastings")
    lam = mixing_contraction(W)
    assert lam == pytest.approx(1 - spectral_gap(W), abs=1e-12)
    assert lam < 1
    X = torch.randn(topo.n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mean = X.mean(0, keepdim=True)
    dev0 = torch.linalg.norm(X - mean)
    Xt = X.clone()
    for t in range(1, 31):
        Xt = W @ Xt
        assert torch.allclose(Xt.mean(0, keepdim=True), mean, atol=1e-12, rtol=0)
        assert torch.linalg.norm(Xt - mean) <= lam**t * dev0 + 1e-12


def test_spectral_gap_closed_form_ring():
    """Uniform ring W = (I + A)/3 has eigenvalues (1 + 2cos(2 pi k / n))/3, giving the closed-form gap."""
    n = 8
    eig = [(1 + 2 * math.cos(2 * math.pi * k / n)) / 3 for k in range(n)]
    expected = 1 - sorted((abs(e) for e in eig), reverse=True)[1]
    assert spectral_gap(mixing_matrix(Topology.ring(n))) == pytest.approx(expected, abs=1e-12)
