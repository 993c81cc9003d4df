"""Hadamard matrices (Sylvester / Paley I / Paley II / Kronecker), fast Walsh–Hadamard transform, random rotations."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_epfl.functional.hadamard import (
    hadamard_factorization,
    hadamard_matrix,
    hadamard_transform,
    has_hadamard,
    random_hadamard,
    random_orthogonal,
)

POWERS_OF_TWO = [2**k for k in range(13)]
LISTED = [12, 20, 28, 36, 44, 60, 76, 108, 140, 148, 192, 576, 768, 896, 1536, 1904, 3584, 4864]
SMALL_SUPPORTED = [n for n in range(4, 1025, 4) if has_hadamard(n)]
UNSUPPORTED = [92, 116, 156, 172, 668]


def _assert_hadamard(h: torch.Tensor) -> None:
    n = h.shape[0]
    assert h.shape == (n, n)
    assert torch.equal(h.abs(), torch.ones_like(h))
    # Entries are ±1 and every partial sum is an integer of magnitude <= n < 2**24, so float32 is exact too.
    prod_dtype = torch.float64 if n <= 1024 else torch.float32
    g = h.to(prod_dtype)
    assert torch.equal(g @ g.T, n * torch.eye(n, dtype=prod_dtype))


@pytest.mark.parametrize("n", POWERS_OF_TWO)
def test_sylvester_orders_are_hadamard(n):
    h = hadamard_matrix(n)
    assert h.dtype == torch.float64
    _assert_hadamard(h)
    assert torch.equal(h, h.T)
    assert hadamard_factorization(n) == (n, 1, "sylvester")
    if n <= 1024:  # closed form H[i, j] = (-1)^popcount(i & j)
        i = torch.arange(n)
        parity = torch.zeros(n, n, dtype=torch.int64)
        for bit in range(max(n.bit_length() - 1, 0)):
            parity ^= ((i[:, None] >> bit) & (i[None, :] >> bit)) & 1
        assert torch.equal(h, (1 - 2 * parity).to(torch.float64))
    else:  # Sylvester doubling H_n = [[H, H], [H, -H]]
        half = hadamard_matrix(n // 2)
        assert torch.equal(h, torch.cat([torch.cat([half, half], 1), torch.cat([half, -half], 1)], 0))


@pytest.mark.parametrize("n", LISTED)
def test_listed_orders_are_hadamard(n):
    _assert_hadamard(hadamard_matrix(n))


@pytest.mark.parametrize("n", SMALL_SUPPORTED)
def test_every_supported_multiple_of_four_up_to_1024(n):
    _assert_hadamard(hadamard_matrix(n))


def test_supported_set():
    assert all(has_hadamard(n) for n in [1, 2, *POWERS_OF_TWO, *LISTED])
    assert not any(has_hadamard(n) for n in [-4, 0, 3, 6, 9, 14, *UNSUPPORTED])
    missing = [n for n in range(4, 4097, 4) if not has_hadamard(n)]
    assert missing[:8] == [92, 116, 156, 172, 184, 188, 232, 236]
    assert len(missing) == 332


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, (1, 1, "sylvester")),
        (2, (2, 1, "sylvester")),
        (4096, (4096, 1, "sylvester")),
        (12, (1, 12, "paley1(11)")),
        (28, (1, 28, "paley1(27)")),  # GF(3^3)
        (52, (1, 52, "paley2(25)")),  # GF(5^2)
        (244, (1, 244, "paley1(243)")),  # GF(3^5)
        (576, (16, 36, "paley2(17)")),
        (768, (64, 12, "paley1(11)")),
        (896, (32, 28, "paley1(27)")),
        (4864, (64, 76, "paley2(37)")),
        (1904, (1, 1904, "kron(paley1(27),paley1(67))")),
        (3808, (2, 1904, "kron(paley1(27),paley1(67))")),
    ],
)
def test_factorization_values(n, expected):
    assert hadamard_factorization(n) == expected


@pytest.mark.parametrize("n", [12, 24, 76, 192, 576, 896, 1904, 3808])
def test_matrix_is_kron_of_factors(n):
    p, m, name = hadamard_factorization(n)
    assert p * m == n and p & (p - 1) == 0
    assert hadamard_factorization(m) == (1, m, name)
    h = hadamard_matrix(n)
    assert torch.equal(h, torch.kron(hadamard_matrix(p), hadamard_matrix(m)))
    if name.startswith("kron("):  # e.g. kron(paley1(27),paley1(67)): H_1904 = H_28 ⊗ H_68
        orders = []
        for part in name[5:-1].split(","):
            q = int(part[part.index("(") + 1 : -1])
            orders.append(q + 1 if part.startswith("paley1") else 2 * (q + 1))
        a, b = orders
        assert a * b == m
        assert torch.equal(hadamard_matrix(m), torch.kron(hadamard_matrix(a), hadamard_matrix(b)))


def test_matrix_dtype_determinism_and_copy():
    a = hadamard_matrix(20)
    a[0, 0] = 7.0
    b = hadamard_matrix(20)
    assert b[0, 0] == 1.0 and torch.equal(b, hadamard_matrix(20))
    for dtype in (torch.float32, torch.int8, torch.int64, torch.bfloat16):
        h = hadamard_matrix(20, dtype=dtype)
        assert h.dtype == dtype and torch.equal(h.to(torch.float64), b)
    with pytest.raises(TypeError, match="dtype"):
        hadamard_matrix(8, dtype=torch.uint8)
    with pytest.raises(TypeError, match="n"):
        hadamard_matrix(8.0)


@pytest.mark.parametrize("n", [9, 14, 0, -4, 6, *UNSUPPORTED])
def test_invalid_orders_raise(n):
    for fn in (hadamard_matrix, hadamard_factorization, lambda k: random_hadamard(k, seed=1)):
        with pytest.raises(ValueError, match=rf"`n` must be 1, 2 or a multiple of 4 .*n={n} is not"):
            fn(n)
    with pytest.raises(ValueError, match=rf"x\.shape\[-1\]={max(n, 0)} is not"):
        hadamard_transform(torch.zeros(3, max(n, 0), dtype=torch.float64))


def test_unsupported_order_message_lists_neighbours():
    with pytest.raises(ValueError, match=r"nearest supported orders: 88 and 96"):
        hadamard_matrix(92)
    with pytest.raises(ValueError, match=r"Paley I .*Paley II"):
        hadamard_transform(torch.zeros(172))


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 28, 36, 52, 76, 192, 576, 1536, 4096])
def test_transform_matches_matmul_float64(n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(3, 5, n, generator=gen, dtype=torch.float64)
    h = hadamard_matrix(n)
    ref = x @ h
    out = hadamard_transform(x, normalize=False)
    assert out.shape == x.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hadamard_transform(x), ref / math.sqrt(n), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [12, 64, 576, 1536, 4096])
def test_transform_float32(n):
    gen = torch.Generator().manual_seed(1000 + n)
    x = torch.randn(4, n, generator=gen)
    ref = (x.double() @ hadamard_matrix(n)) / math.sqrt(n)
    out = hadamard_transform(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_transform_integer_input_is_exact_and_input_untouched():
    n = 1536
    x = torch.randint(-3, 4, (2, n), generator=torch.Generator().manual_seed(0)).to(torch.float64)
    x_copy = x.clone()
    assert torch.equal(hadamard_transform(x, normalize=False), x @ hadamard_matrix(n))
    assert torch.equal(x, x_copy)
    y = torch.randn(8, 1)
    out = hadamard_transform(y)
    assert torch.equal(out, y) and out.data_ptr() != y.data_ptr()


def test_transform_shapes_and_layouts():
    n = 48
    x = torch.randn(n, 6, dtype=torch.float64).T  # non-contiguous [6, n]
    h = hadamard_matrix(n)
    torch.testing.assert_close(hadamard_transform(x, normalize=False), x @ h, rtol=1e-12, atol=1e-12)
    v = torch.randn(n, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(v, normalize=False), v @ h, rtol=1e-12, atol=1e-12)
    empty = torch.zeros(0, 7, n)
    assert hadamard_transform(empty).shape == (0, 7, n)
    with pytest.raises(TypeError, match="floating"):
        hadamard_transform(torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least one dimension"):
        hadamard_transform(torch.tensor(1.0))


@pytest.mark.parametrize("n", [16, 96])
def test_transform_autograd_matches_matmul(n):
    x = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, n, dtype=torch.float64)
    (hadamard_transform(x) * w).sum().backward()
    torch.testing.assert_close(x.grad, w @ hadamard_matrix(n).T / math.sqrt(n), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 64, 1024, 4096])
def test_normalized_sylvester_transform_is_an_involution(n):
    x = torch.randn(2, 3, n, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(hadamard_transform(x)), x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 12, 64, 576])
def test_random_hadamard(n):
    q = random_hadamard(n, seed=3)
    assert q.shape == (n, n) and q.dtype == torch.float64
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(q, random_hadamard(n, seed=3))
    if n > 1:
        assert not torch.equal(q, random_hadamard(n, seed=4))
    h = hadamard_matrix(n)
    signs = torch.diagonal(q @ h.T) / math.sqrt(n)  # Q Hᵀ = sqrt(n) diag(s)
    torch.testing.assert_close(signs.abs(), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(5, n, dtype=torch.float64)
    torch.testing.assert_close(x @ q, hadamard_transform(x * signs.round()), rtol=1e-12, atol=1e-12)
    assert random_hadamard(n, seed=3, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("n", [1, 7, 64, 100])
def test_random_orthogonal(n):
    q = random_orthogonal(n, seed=5)
    assert q.shape == (n, n) and q.dtype == torch.float64
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(q, random_orthogonal(n, seed=5))
    if n > 1:  # for n = 1 the only outputs are [[1]] and [[-1]]
        assert not torch.equal(q, random_orthogonal(n, seed=6))
    assert random_orthogonal(n, dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="n=0"):
        random_orthogonal(0)


def test_random_orthogonal_is_haar_on_average():
    # E[Q] = 0 for Haar measure; without the sign fix QR's diagonal would be biased positive.
    diag = torch.stack([torch.diagonal(random_orthogonal(4, seed=s)) for s in range(400)])
    assert diag.mean().abs() < 0.1


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_rotation_removes_outlier(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, generator=gen, dtype=torch.float64)
    x[17] = 100.0

    def max_over_rms(v):
        return (v.abs().max() / v.pow(2).mean().sqrt()).item()

    assert max_over_rms(x) == pytest.approx(8.0, abs=0.15)
    y = x @ random_hadamard(64, seed=seed)
    torch.testing.assert_close(y.norm(), x.norm(), rtol=1e-12, atol=0)
    assert max_over_rms(y) <= 1.5
