"""SecLDP accounting (functional and the accountant): reference rows, closed forms, conversions against Opacus,
calibration never above target, dense-inverse property test, honest subgraphs."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_epfl.functional.privacy import (
    cdp_sigma,
    gdp_epsilon,
    inverse_cov_diag,
    laplacian,
    ldp_sigma,
    rdp_epsilon,
    rho_budget,
    rho_step,
    sensitivity,
    zcdp_epsilon,
)
from lightning_epfl.functional.topology import Topology
from lightning_epfl.strategies import SecLDPAccountant

GRAPHS = {"ring": Topology.ring(16), "torus": Topology.torus(16), "complete": Topology.complete(16)}


@pytest.mark.parametrize(
    ("graph", "sigma", "sigma_cor", "rho_ref"),
    [
        ("ring", 22.96953176771683, 94, 4.787249e-4),
        ("torus", 22.96953176771683, 47, 4.612681e-4),
        ("complete", 17.827099282407094, 32, 5.055857e-4),
    ],
)
def test_reference_rows(graph, sigma, sigma_cor, rho_ref):
    """n=16, C=1, T=3500: rho_step of the authors' reference CSV (given to 7 digits) and the ring's epsilon."""
    rho = rho_step(GRAPHS[graph].adjacency, sigma, sigma_cor, sensitivity(1.0))
    assert rho == pytest.approx(rho_ref, rel=2e-7)
    if graph == "ring":
        assert zcdp_epsilon(3500 * rho, 1e-5) == pytest.approx(10.45969, rel=1e-6)


def _closed_form(eigs: torch.Tensor, sigma: float, sigma_cor: float) -> float:
    return float((1.0 / (sigma**2 + sigma_cor**2 * eigs)).mean())


def test_vertex_transitive_closed_forms_and_limits():
    """[Sigma^-1]_ii = mean_k 1/(s^2 + s_cor^2 lambda_k) on ring, torus, complete (1e-12); below the lambda_2 bound;
    LDP and CDP limits; rho_step non-increasing in sigma_cor."""
    n, s, sc = 16, 3.0, 7.0
    k = torch.arange(n, dtype=torch.float64)
    ring = 2 - 2 * torch.cos(2 * math.pi * k / n)
    a, b = torch.meshgrid(torch.arange(4.0, dtype=torch.float64), torch.arange(4.0, dtype=torch.float64), indexing="ij")
    torus = (4 - 2 * torch.cos(2 * math.pi * a / 4) - 2 * torch.cos(2 * math.pi * b / 4)).flatten()
    complete = 1 / (n * s**2) + (1 - 1 / n) / (s**2 + n * sc**2)
    for name, expected in (("ring", _closed_form(ring, s, sc)), ("torus", _closed_form(torus, s, sc))):
        diag = inverse_cov_diag(GRAPHS[name].adjacency, s, sc)  # rounded up by exactly (1 + 1e-9)
        torch.testing.assert_close(
            diag, torch.full((n,), expected * (1 + 1e-9), dtype=torch.float64), rtol=1e-12, atol=0
        )
    got = float(inverse_cov_diag(GRAPHS["complete"].adjacency, s, sc)[0])
    assert got == pytest.approx(complete * (1 + 1e-9), rel=1e-12)
    for topo in GRAPHS.values():
        acc = SecLDPAccountant(topo.adjacency, 1.0)
        assert float(acc.inverse_cov_diag(s, sc).max()) <= acc.bound(s, sc) * (1 + 1e-9)
        assert acc.rho_step(s, 0.0) == pytest.approx(2 / s**2, rel=1e-8)  # LDP: 2C^2/sigma^2
        cdp = 2 / (n * s**2)  # CDP limit: 2C^2/(n sigma^2), approached from above, never crossed (exact spectrum)
        assert cdp <= acc.rho_step(s, 1e7) <= cdp * (1 + 1e-8)
        rhos = [acc.rho_step(s, x) for x in (0.0, 1.0, 5.0, 50.0)]
        assert all(r1 >= r2 for r1, r2 in zip(rhos, rhos[1:]))
    with pytest.raises(ValueError, match="`sigma` must be > 0"):
        inverse_cov_diag(GRAPHS["ring"].adjacency, 0.0, 1.0)


def test_conversions_at_the_epsilon_10_budget_match_opacus():
    """At rho = rho_budget(10): zcdp 10, rdp = Opacus get_privacy_spent(compute_rdp(q=1)), gdp exact, ordered."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    rho = rho_budget(10.0, 1e-5, 1)
    assert rho == pytest.approx(1.5503552, rel=1e-7)
    assert zcdp_epsilon(rho, 1e-5) == pytest.approx(10.0, rel=1e-12)
    assert rdp_epsilon(rho, 1e-5) == pytest.approx(9.1912378, rel=1e-7)
    # a Gaussian mechanism with noise multiplier z composed T times is T/(2 z^2)-zCDP
    T = 100
    z = math.sqrt(T / (2 * rho))
    alphas = RDPAccountant.DEFAULT_ALPHAS
    ref, _ = get_privacy_spent(
        orders=alphas, rdp=compute_rdp(q=1.0, noise_multiplier=z, steps=T, orders=alphas), delta=1e-5
    )
    assert rdp_epsilon(rho, 1e-5) == pytest.approx(ref, rel=1e-9)
    assert gdp_epsilon(rho, 1e-5) == pytest.approx(8.5552009, rel=1e-7)
    for r in (0.01, 0.3, 1.0, 5.0, 20.0):
        assert gdp_epsilon(r, 1e-5) <= rdp_epsilon(r, 1e-5) <= zcdp_epsilon(r, 1e-5)


def test_example_level_ldp_equals_opacus_dp_sgd():
    """Example level, Poisson rate q < 1, add/remove, no pairwise noise: epsilon = Opacus DP-SGD at z = b sigma/C."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    acc = SecLDPAccountant(GRAPHS["ring"].adjacency, 1.0, level="example", neighbouring="add_remove")
    b, sigma, q, T = 16, 0.08, 0.05, 300
    z = b * sigma / 1.0
    alphas = RDPAccountant.DEFAULT_ALPHAS
    ref, _ = get_privacy_spent(
        orders=alphas, rdp=compute_rdp(q=q, noise_multiplier=z, steps=T, orders=alphas), delta=1e-5
    )
    assert acc.epsilon(sigma, 0.0, T, 1e-5, sample_rate=q, batch_size=b) == pytest.approx(ref, rel=1e-6)


def test_calibration_matches_reference_and_never_exceeds_target():
    """Breast-cancer settings (n=16, T=1000, eps=10): sigma_cor 28.4 / 60.8 / 134.3; epsilon <= target always."""
    expected = {"complete": 28.4, "torus": 60.8, "ring": 134.3}
    for name, topo in GRAPHS.items():
        acc = SecLDPAccountant(topo.adjacency, 1.0)
        sigma, sigma_cor = acc.calibrate(10.0, 1e-5, 1000)
        assert sigma == pytest.approx(1.05 * 8.97923623083455, rel=1e-9)
        assert sigma_cor == pytest.approx(expected[name], abs=0.05)
        eps = acc.epsilon(sigma, sigma_cor, 1000, 1e-5)
        assert 10.0 * (1 - 1e-6) <= eps <= 10.0
    assert cdp_sigma(10.0, 1e-5, 1000, 1.0, 16) == pytest.approx(8.979, rel=1e-3)
    assert ldp_sigma(10.0, 1e-5, 1000, 1.0) == pytest.approx(35.92, rel=1e-3)
    with pytest.raises(ValueError, match="out of reach"):
        SecLDPAccountant(GRAPHS["ring"].adjacency, 1.0).calibrate(10.0, 1e-5, 1000, sigma=1.0)


def _random_connected(n: int, p: float, g: torch.Generator) -> torch.Tensor:
    while True:
        upper = (torch.rand(n, n, generator=g) < p).triu(1)
        a = (upper | upper.T).to(torch.int64)
        if Topology(a).is_connected():
            return a


def test_property_calibration_and_dense_inverse_on_random_graphs():
    """Random connected graphs and targets: calibrated epsilon <= target; the reported diagonal >= a dense inverse's."""
    g = torch.Generator().manual_seed(0)
    for trial in range(12):
        n = int(torch.randint(3, 12, (1,), generator=g))
        a = _random_connected(n, 0.4, g)
        target = float(torch.empty(1).uniform_(1.0, 30.0, generator=g))
        conversion = ("zcdp", "rdp", "gdp")[trial % 3]
        acc = SecLDPAccountant(a, 1.0, conversion=conversion)
        sigma, sigma_cor = acc.calibrate(target, 1e-5, 200)
        assert acc.epsilon(sigma, sigma_cor, 200, 1e-5) <= target
        cov = sigma**2 * torch.eye(n, dtype=torch.float64) + sigma_cor**2 * laplacian(a)
        dense = torch.linalg.inv(cov).diagonal()
        assert bool((acc.inverse_cov_diag(sigma, sigma_cor) >= dense).all())


def test_honest_subgraph_and_disconnected_limit():
    """Curious clients cut the honest graph: at large sigma_cor rho_step -> 2C^2/(m_min sigma^2), m_min = smallest
    honest component."""
    ring = GRAPHS["ring"].adjacency
    honest = [0, 1, 2, 5, 6, 7, 8, 9]  # the ring minus 3, 4 and 10..15: components {0,1,2} and {5,...,9}
    acc = SecLDPAccountant(ring, 1.0, honest=honest)
    sigma = 2.0
    assert acc.rho_step(sigma, 1e6) == pytest.approx(2 / (3 * sigma**2), rel=1e-6)
    assert acc.rho_step(sigma, 5.0) > SecLDPAccountant(ring, 1.0).rho_step(sigma, 5.0)


def test_running_account_state_and_would_exceed():
    """step/get_epsilon equal epsilon(); the state round-trips; would_exceed flags the step past the target."""
    acc = SecLDPAccountant(GRAPHS["ring"].adjacency, 1.0)
    sigma, sigma_cor = acc.calibrate(5.0, 1e-5, 50)
    for _ in range(50):
        assert not acc.would_exceed(5.0, 1e-5, sigma=sigma, sigma_cor=sigma_cor)
        acc.step(sigma=sigma, sigma_cor=sigma_cor)
    assert acc.get_epsilon(1e-5) == pytest.approx(acc.epsilon(sigma, sigma_cor, 50, 1e-5), rel=1e-12)
    assert acc.would_exceed(5.0, 1e-5, sigma=sigma, sigma_cor=sigma_cor)
    again = SecLDPAccountant(GRAPHS["ring"].adjacency, 1.0)
    again.load_state_dict(acc.state_dict())
    assert again.steps == 50 and again.get_epsilon(1e-5) == acc.get_epsilon(1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip_norm": 0.0}, "`clip_norm` must be > 0"),
        ({"conversion": "moments"}, "`conversion`"),
        ({"level": "example", "conversion": "gdp"}, "gdp"),
        ({"level": "batch"}, "`level`"),
        ({"clip_norm": float("inf")}, "`clip_norm` must be finite"),
        ({"honest": [0, 99]}, "`honest` must be a non-empty subset"),
        ({"orders": [0.5, 2.0]}, "`orders` must be RDP orders > 1"),
        ({"weights": 5.0}, "0/1 matrix"),
    ],
)
def test_accountant_bad_input(kwargs, match):
    """Bad accountant arguments raise naming the argument."""
    args = {"clip_norm": 1.0, **kwargs}
    scale = args.pop("weights", 1.0)
    with pytest.raises(ValueError, match=match):
        SecLDPAccountant(GRAPHS["ring"].adjacency.double() * scale, **args)
    with pytest.raises(ValueError, match="`delta` must be in"):
        zcdp_epsilon(1.0, 1.5)


def test_accountant_step_and_target_checks_and_disconnected_message():
    """Bad step counts and targets are named; an unreachable target on a disconnected graph says so; the RDP
    conversion never reports a negative epsilon."""
    acc = SecLDPAccountant(GRAPHS["ring"].adjacency, 1.0)
    with pytest.raises(ValueError, match="`steps` must be an integer >= 0"):
        acc.epsilon(1.0, 1.0, -3, 1e-5)
    with pytest.raises(ValueError, match="`steps` must be an integer >= 1"):
        acc.calibrate(3.0, 1e-5, 10.5)
    with pytest.raises(ValueError, match="`target_epsilon` must be finite"):
        acc.calibrate(math.inf, 1e-5, 10)
    two = torch.zeros(4, 4)
    two[0, 1] = two[1, 0] = two[2, 3] = two[3, 2] = 1
    with pytest.raises(ValueError, match=r"disconnected: components \[\[0, 1\], \[2, 3\]\]"):
        SecLDPAccountant(two, 1.0).calibrate(1.0, 1e-5, 1000, sigma=1.0)
    assert rdp_epsilon(1e-4, 0.1) == 0.0


@pytest.mark.parametrize(("conversion", "level", "q", "b"), [("rdp", "user", 1.0, 1), ("gdp", "user", 1.0, 1),
                                                              ("zcdp", "example", 0.1, 4)])  # fmt: skip
def test_sigma_factor_is_relative_to_the_central_noise_of_the_same_accounting(conversion, level, q, b):
    """sigma = 1.05 sigma_CDP where sigma_CDP is the central noise of the *same* accounting (conversion,
    subsampling amplification): Decor then needs pairwise noise and less private noise than local DP."""
    adjacency = GRAPHS["ring"].adjacency
    acc = SecLDPAccountant(adjacency, 1.0, level=level, conversion=conversion)
    central = SecLDPAccountant(adjacency, 1.0, level=level, conversion=conversion, central=True)
    sigma_cdp = central.calibrate_sigma(8.0, 1e-5, 500, sample_rate=q, batch_size=b)
    assert central.epsilon(sigma_cdp, 0.0, 500, 1e-5, q, b) <= 8.0
    sigma, sigma_cor = acc.calibrate(8.0, 1e-5, 500, sample_rate=q, batch_size=b)
    assert sigma == pytest.approx(1.05 * sigma_cdp, rel=1e-12) and sigma_cor > 0
    assert acc.epsilon(sigma, sigma_cor, 500, 1e-5, q, b) <= 8.0
    assert sigma < acc.calibrate_sigma(8.0, 1e-5, 500, sample_rate=q, batch_size=b)  # below the LDP noise
