import math

import pytest
import torch

from lightning_epfl.functional.rank import (
    dead_units,
    effective_rank,
    numerical_rank,
    pca_rank,
    rankme,
    spectral_metrics,
    stable_rank,
)


def _relu_mlp_features(n: int, d: int, seed: int) -> torch.Tensor:
    """Pre-activation features of the second Linear of a small ReLU MLP with some dead units (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 16, generator=g, dtype=torch.float64)
    w1 = torch.randn(16, d, generator=g, dtype=torch.float64)
    b1 = torch.randn(d, generator=g, dtype=torch.float64)
    b1[: d // 8] = -100.0  # dead units
    w2 = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.relu(x @ w1 + b1) @ w2


def _synthetic(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """H = U diag(s) V^T + 1 m^T with mean-zero orthonormal U (n=1000, d=200) and offset 5."""
    g = torch.Generator().manual_seed(0)
    n, d = 1000, 200
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    a = a - a.mean(0)
    u, _ = torch.linalg.qr(a)
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    s = torch.tensor([1.0] * 5 + [1e-3] * 5 + [1e-5] * 5 + [1e-9] * 185, dtype=torch.float64)
    h = u @ torch.diag(s) @ v.T + 5.0
    return h.to(dtype), s


@pytest.mark.parametrize("n", [50, 500])
@pytest.mark.parametrize("d", [16, 128])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_numerical_rank_equals_paper_matrix_rank(n, d, dtype):
    """numerical_rank equals matrix_rank(torch.cov(H.T)) exactly (paper's definition) in both dtypes."""
    h = _relu_mlp_features(n, d, seed=n + d).to(getattr(torch, dtype))
    expected = int(torch.linalg.matrix_rank(torch.cov(h.T)))
    assert numerical_rank(h, compute_dtype=dtype) == expected
    assert expected < min(n - 1, d) or n - 1 < d  # the case is not trivially full rank


def test_rank_synthetic_spectrum_float64_and_float32():
    """Known spectrum: rank 15 in float64, 5 in float32; effective, stable, PCA and RankMe match closed forms."""
    h, s = _synthetic()
    assert numerical_rank(h) == 15
    assert numerical_rank(h, compute_dtype="float32") == 5
    assert numerical_rank(h.float(), compute_dtype="float32") == 5
    kept = s[:15]
    p = kept / kept.sum()
    expected_eff = math.exp(-float((p * p.log()).sum()))
    assert expected_eff == pytest.approx(5.0403, rel=1e-4)
    assert effective_rank(h) == pytest.approx(expected_eff, rel=1e-5)
    assert stable_rank(h) == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-6)
    assert pca_rank(h, variance=0.99) == 5
    assert pca_rank(h, variance=1.0) == 15
    sigma = torch.linalg.svdvals(h)
    q = sigma / sigma.sum() + 1e-7
    assert rankme(h) == pytest.approx(math.exp(-float((q * q.log()).sum())), rel=1e-10)
    assert rankme(h) < 1.5  # uncentred: the offset dominates


def test_rank_tolerance_behaviour():
    """rtol is a cut on covariance eigenvalues: rtol = r**2 cuts singular values at r (default n_features*eps)."""
    h, _ = _synthetic()
    assert numerical_rank(h, rtol=(1e-2) ** 2) == 5
    assert numerical_rank(h, rtol=(1e-4) ** 2) == 10
    assert numerical_rank(h, rtol=(1e-7) ** 2) == 15
    assert numerical_rank(h, rtol=0.0) == 200 - 1 or numerical_rank(h, rtol=0.0) >= 190  # round-off counts
    # A looser tolerance also drops eigenvalues from the entropy.
    assert effective_rank(h, rtol=1e-4) == pytest.approx(5.0, rel=1e-12)
    assert torch.finfo(torch.float64).eps * 200 == pytest.approx(4.44e-14, rel=1e-2)


@pytest.mark.parametrize("r", [1, 3, 7])
def test_rank_low_rank_product_and_scale_invariance(r):
    """H = A B with A (n x r), B (r x d) has rank r (centred, n > r + 1); all metrics invariant under H -> cH."""
    g = torch.Generator().manual_seed(r)
    h = torch.randn(60, r, generator=g, dtype=torch.float64) @ torch.randn(r, 20, generator=g, dtype=torch.float64)
    assert numerical_rank(h) == r
    names = ["numerical_rank", "effective_rank", "stable_rank", "pca_rank", "rankme"]
    base = spectral_metrics(h, names)
    for c in (1e-3, 7.0, 1e4):
        scaled = spectral_metrics(c * h, names)
        for k in names:
            assert scaled[k] == pytest.approx(base[k], rel=1e-9), k
    assert 1.0 <= base["stable_rank"] <= base["effective_rank"] + 1e-9 or r == 1
    assert base["effective_rank"] <= r + 1e-9


def test_rank_zero_matrix_and_single_sample():
    """Zero features give 0 for every metric; a single sample gives 0 for the centred metrics."""
    names = ["numerical_rank", "effective_rank", "stable_rank", "pca_rank", "rankme", "dead_units"]
    out = spectral_metrics(torch.zeros(10, 4), names)
    assert out == {**dict.fromkeys(names, 0.0), "dead_units": 4.0}
    one = spectral_metrics(torch.tensor([[1.0, -2.0, 3.0]]), names)
    assert one["numerical_rank"] == one["effective_rank"] == one["stable_rank"] == one["pca_rank"] == 0.0
    assert one["rankme"] == pytest.approx(1.0, abs=1e-5)
    assert one["dead_units"] == 1.0


@pytest.mark.parametrize("k", [1, 4, 32])
def test_effective_rank_identity_like_spectrum(k):
    """k equal singular values (orthogonal centred columns) give effective rank k, stable rank k, numerical rank k."""
    g = torch.Generator().manual_seed(k)
    a = torch.randn(200, k, generator=g, dtype=torch.float64)
    u, _ = torch.linalg.qr(a - a.mean(0))
    h = torch.cat([3.0 * u, torch.zeros(200, 5, dtype=torch.float64)], dim=1) + 1.0
    assert effective_rank(h) == pytest.approx(float(k), rel=1e-9)
    assert stable_rank(h) == pytest.approx(float(k), rel=1e-9)
    assert numerical_rank(h) == k


def test_dead_units_reduce_next_layer_rank():
    """9 dead ReLU units before a square Linear(64, 64) leave float64 rank 55 (= 64 - 9)."""
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(32, 64).double(), torch.nn.Linear(64, 64).double()
    with torch.no_grad():
        lin1.bias.zero_()  # zero-mean inputs: every other unit fires on about half of the samples
        lin1.bias[:9] = -100.0
    x = 2 * torch.rand(500, 32, dtype=torch.float64) - 1
    pre1 = lin1(x)
    pre2 = lin2(torch.relu(pre1))
    assert dead_units(pre1) == 9
    assert numerical_rank(pre2) == 55


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: numerical_rank(torch.zeros(5)), "shape"),
        (lambda: numerical_rank(torch.zeros(0, 3)), "shape"),
        (lambda: numerical_rank(torch.zeros(4, 3, dtype=torch.complex64)), "dtype"),
        (lambda: numerical_rank(torch.zeros(4, 3), compute_dtype="float16"), "compute_dtype"),
        (lambda: numerical_rank(torch.tensor([[1.0, float("nan")], [0.0, 1.0]])), "NaN"),
        (lambda: spectral_metrics(torch.zeros(4, 3), ["bogus"]), "metrics"),
        (lambda: numerical_rank(torch.zeros(4, 3), rtol=-1.0), "rtol"),
        (lambda: pca_rank(torch.zeros(4, 3), variance=1.5), "variance"),
        (lambda: dead_units(torch.zeros(2, 2, 2)), "shape"),
    ],
)
def test_rank_bad_input(call, match):
    """Bad shapes, dtypes, metric names and tolerances raise ValueError naming the problem."""
    with pytest.raises(ValueError, match=match):
        call()
