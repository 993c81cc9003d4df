"""Hadamard matrices and the fast Walsh–Hadamard transform
========================================================

Building blocks for QuaRot-style rotations (Ashkboos et al., *QuaRot: Outlier-Free 4-Bit Inference in Rotated
LLMs*, arXiv:2404.00456): multiplying activations / weights by an orthonormal Hadamard matrix spreads a single large
outlier evenly over all coordinates, and the product ``x · H`` costs only ``O(n log n)`` when ``H`` has a
Sylvester factor.

A Hadamard matrix of order ``n`` is an ``n × n`` matrix with entries ``±1`` and ``H Hᵀ = n I``. One can only exist
for ``n = 1``, ``n = 2`` or ``n ≡ 0 (mod 4)``. This module builds them from three classical constructions:

* **Sylvester** (order ``2^k``): ``H₁ = [1]``, ``H_{2p} = [[H_p, H_p], [H_p, -H_p]]``, i.e.
  ``H[i, j] = (-1)^popcount(i & j)``. It is symmetric, so ``H² = 2^k I``.
* **Paley I** (order ``q + 1`` for a prime power ``q ≡ 3 (mod 4)``): with the quadratic character ``χ`` of the
  finite field ``GF(q)`` and the Jacobsthal matrix ``Q[a, b] = χ(a - b)`` (antisymmetric because ``χ(-1) = -1``),
  ``H = I + [[0, 1ᵀ], [-1, Q]]`` (a skew Hadamard matrix).
* **Paley II** (order ``2(q + 1)`` for a prime power ``q ≡ 1 (mod 4)``): ``Q`` is now symmetric, the conference
  matrix is ``C = [[0, 1ᵀ], [1, Q]]`` (``C Cᵀ = q I``) and ``H = C ⊗ [[1, -1], [-1, -1]] + I ⊗ [[1, 1], [1, -1]]``.

Prime fields are plain integers modulo ``p``; for ``q = p^k`` with ``k > 1`` the field is ``GF(p)[t] / f(t)`` with
``f`` the lexicographically first monic irreducible polynomial of degree ``k`` (found by trial division), and
elements are encoded as the integers whose base-``p`` digits are the polynomial coefficients.

**Kronecker layout.** Every order is written as ``n = 2^k · m`` with the *largest* ``k`` for which a "core" matrix
``H_m`` exists, where the core is Paley I, Paley II (preferred in that order) or the Kronecker product
``H_a ⊗ H_b`` of two Paley matrices (smallest ``a`` first), and ``m = 1`` means pure Sylvester. Then

    ``hadamard_matrix(n) = kron(H_{2^k}, H_m)``,

i.e. index ``i = b · m + a`` with ``b`` the Sylvester index and ``a`` the core index. ``hadamard_transform`` uses
the same layout: it reshapes the last dimension to ``[2^k, m]``, multiplies by the dense ``H_m`` on the right and
runs the ``k``-stage butterfly over the ``2^k`` axis, so ``hadamard_transform(x, normalize=False)`` equals
``x @ hadamard_matrix(n)`` up to float rounding (exactly for integer-valued inputs of moderate size).

Orders that none of these reach (e.g. 92, 116, 156, 172, 184, 188, … — Williamson-type or other constructions
would be needed) raise ``ValueError``. Everything is deterministic: the same ``n`` always gives the same matrix.
No Lightning import here.
"""

from __future__ import annotations

import math
import operator
from functools import cache, lru_cache

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "hadamard_factorization",
    "hadamard_matrix",
    "hadamard_transform",
    "has_hadamard",
    "random_hadamard",
    "random_orthogonal",
]

_SUPPORTED = (
    "1, 2 or a multiple of 4 of the form 2^k·m with H_m from Paley I (m = q+1, q ≡ 3 mod 4 a prime power), "
    "Paley II (m = 2(q+1), q ≡ 1 mod 4 a prime power) or a Kronecker product of two of those"
)


# --------------------------------------------------------------------------------------------------------------------
# Number theory and finite fields
# --------------------------------------------------------------------------------------------------------------------


def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, k)`` with ``q = p^k`` and ``p`` prime, or ``None`` (trial division)."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _poly_mod_is_zero(f: list[int], g: list[int], p: int) -> bool:
    """Whether the monic polynomial ``g`` divides ``f`` over ``GF(p)`` (coefficient lists, lowest degree first)."""
    r = list(f)
    dg = len(g) - 1
    for top in range(len(r) - 1, dg - 1, -1):
        c = r[top] % p
        if c:
            for i in range(dg + 1):
                r[top - dg + i] = (r[top - dg + i] - c * g[i]) % p
    return not any(v % p for v in r[:dg])


def _monic_polys(p: int, degree: int):
    """All monic polynomials of ``degree`` over ``GF(p)`` in lexicographic order of their low coefficients."""
    for code in range(p**degree):
        yield [(code // p**i) % p for i in range(degree)] + [1]


@cache
def _irreducible(p: int, k: int) -> tuple[int, ...]:
    """First monic irreducible polynomial of degree ``k`` over ``GF(p)`` (coefficients, lowest degree first)."""
    for f in _monic_polys(p, k):
        if f[0] == 0:
            continue
        if not any(_poly_mod_is_zero(f, g, p) for d in range(1, k // 2 + 1) for g in _monic_polys(p, d)):
            return tuple(f)
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # pragma: no cover


def _field_digits(p: int, k: int) -> np.ndarray:
    """``[p^k, k]`` base-``p`` digits of the element codes ``0 … p^k - 1`` (polynomial coefficients)."""
    codes = np.arange(p**k, dtype=np.int64)
    return np.stack([(codes // p**i) % p for i in range(k)], axis=1)


def _quadratic_character(q: int) -> np.ndarray:
    """``χ`` of ``GF(q)`` as an int8 vector indexed by element code: 0 at 0, +1 on squares, -1 elsewhere."""
    p, k = _prime_power(q)  # type: ignore[misc]
    if k == 1:
        squares = (np.arange(q, dtype=np.int64) ** 2) % q
    else:
        f = _irreducible(p, k)
        d = _field_digits(p, k)
        coef = np.zeros((q, 2 * k - 1), dtype=np.int64)
        for i in range(k):
            for j in range(k):
                coef[:, i + j] += d[:, i] * d[:, j]
        coef %= p
        for top in range(2 * k - 2, k - 1, -1):  # reduce with t^k = -(f_0 + … + f_{k-1} t^{k-1})
            c = coef[:, top].copy()
            coef[:, top] = 0
            for i in range(k):
                coef[:, top - k + i] = (coef[:, top - k + i] - c * f[i]) % p
        squares = coef[:, :k] @ (p ** np.arange(k, dtype=np.int64))
    chi = -np.ones(q, dtype=np.int8)
    chi[squares] = 1
    chi[0] = 0
    return chi


def _jacobsthal(q: int) -> np.ndarray:
    """``[q, q]`` int8 Jacobsthal matrix ``Q[a, b] = χ(a - b)`` over ``GF(q)``."""
    p, k = _prime_power(q)  # type: ignore[misc]
    chi = _quadratic_character(q)
    if k == 1:
        a = np.arange(q, dtype=np.int64)
        return chi[(a[:, None] - a[None, :]) % q]
    d = _field_digits(p, k)
    diff = np.zeros((q, q), dtype=np.int64)
    for i in range(k):  # subtraction is digit-wise modulo p
        diff += ((d[:, None, i] - d[None, :, i]) % p) * p**i
    return chi[diff]


# --------------------------------------------------------------------------------------------------------------------
# Constructions
# --------------------------------------------------------------------------------------------------------------------


def _sylvester(p: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int8)
    while h.shape[0] < p:
        h = np.block([[h, h], [h, -h]])
    return h


def _paley1(q: int) -> np.ndarray:
    s = np.zeros((q + 1, q + 1), dtype=np.int8)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + np.eye(q + 1, dtype=np.int8)


def _paley2(q: int) -> np.ndarray:
    c = np.zeros((q + 1, q + 1), dtype=np.int8)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    off = np.array([[1, -1], [-1, -1]], dtype=np.int8)
    diag = np.array([[1, 1], [1, -1]], dtype=np.int8)
    return np.kron(c, off) + np.kron(np.eye(q + 1, dtype=np.int8), diag)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _paley_name(m: int) -> str | None:
    """Name of a direct Paley construction of order ``m`` (Paley I preferred), or ``None``."""
    if m < 4 or m % 4 or _is_power_of_two(m):
        return None
    pp = _prime_power(m - 1)
    if pp is not None and (m - 1) % 4 == 3:
        return f"paley1({m - 1})"
    q = m // 2 - 1
    pp = _prime_power(q)
    if pp is not None and q % 4 == 1:
        return f"paley2({q})"
    return None


@cache
def _core_name(m: int) -> str | None:
    """Construction of the core order ``m`` (Paley I, Paley II, or a Kronecker product of two), or ``None``."""
    name = _paley_name(m)
    if name is not None:
        return name
    for a in range(12, math.isqrt(m) + 1, 4):
        if m % a == 0 and (m // a) % 4 == 0:
            na, nb = _paley_name(a), _paley_name(m // a)
            if na is not None and nb is not None:
                return f"kron({na},{nb})"
    return None


def _build_core(name: str) -> np.ndarray:
    if name.startswith("kron("):
        left, right = name[5:-1].split(",")
        return np.kron(_build_core(left), _build_core(right))
    q = int(name[name.index("(") + 1 : -1])
    return _paley1(q) if name.startswith("paley1") else _paley2(q)


@lru_cache(maxsize=4096)
def _factorize(n: int) -> tuple[int, int, str] | None:
    if n < 1 or (n > 2 and n % 4):
        return None
    k = (n & -n).bit_length() - 1
    for j in range(k, -1, -1):
        m = n >> j
        if m == 1:
            return n, 1, "sylvester"
        if m % 4 == 0:
            name = _core_name(m)
            if name is not None:
                return 1 << j, m, name
    return None


def _as_int(n: object, arg: str) -> int:
    if isinstance(n, bool):
        raise TypeError(f"`{arg}` must be an int, got a bool ({n!r}).")
    try:
        return operator.index(n)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"`{arg}` must be an int, got {type(n).__name__} ({n!r}).") from None


def _nearest_supported(n: int) -> str:
    below = next((c for c in range(min(n - 1, 2**62), 0, -1) if _factorize(c) is not None), None) if n > 1 else None
    above = next(c for c in range(max(n + 1, 1), 2 * max(n, 1) + 2) if _factorize(c) is not None)
    return f"nearest supported orders: {below} and {above}" if below else f"nearest supported order: {above}"


def _factorize_or_raise(n: int, arg: str) -> tuple[int, int, str]:
    fact = _factorize(n)
    if fact is None:
        raise ValueError(f"`{arg}` must be {_SUPPORTED}; {arg}={n} is not ({_nearest_supported(n)}).")
    return fact


@lru_cache(maxsize=16)
def _hadamard_int8(n: int) -> Tensor:
    p, m, name = _factorize_or_raise(n, "n")
    h = _sylvester(p) if m == 1 else np.kron(_sylvester(p), _build_core(name))
    return torch.from_numpy(np.ascontiguousarray(h, dtype=np.int8))


@lru_cache(maxsize=64)
def _core_tensor(m: int, name: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.from_numpy(_build_core(name)).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------


def hadamard_factorization(n: int) -> tuple[int, int, str]:
    """Sylvester × core split ``n = 2^k · m`` used by :func:`hadamard_matrix` and :func:`hadamard_transform`.

    ``k`` is the largest power of two for which the remaining order ``m`` has a core construction, so ``m`` is the
    smallest constructible core. ``hadamard_matrix(n) == kron(hadamard_matrix(2^k), H_m)`` where ``H_m`` is the core
    named by ``construction`` (and ``H_m = hadamard_matrix(m)`` because ``m`` has no further power-of-two split).

    Args:
        n: Matrix order (a Python or NumPy integer).

    Returns:
        ``(2^k, m, construction)`` with ``construction`` one of ``"sylvester"`` (``m = 1``), ``"paley1(q)"``
        (``m = q + 1``), ``"paley2(q)"`` (``m = 2(q + 1)``) or ``"kron(paleyX(q1),paleyY(q2))"``, e.g.
        ``hadamard_factorization(576) == (16, 36, "paley2(17)")`` and ``hadamard_factorization(4096) ==
        (4096, 1, "sylvester")``.

    Raises:
        TypeError: If ``n`` is not an integer.
        ValueError: If ``n < 1``, ``n`` is not 1, 2 or a multiple of 4, or no construction reaches ``n``.
    """
    return _factorize_or_raise(_as_int(n, "n"), "n")


def has_hadamard(n: int) -> bool:
    """Whether :func:`hadamard_matrix` can build order ``n`` (``False`` for ``n < 1`` and unsupported orders).

    Args:
        n: Matrix order (a Python or NumPy integer).

    Returns:
        ``True`` iff ``n`` is 1, 2, or a multiple of 4 reachable as ``2^k · m`` with a Paley I / Paley II core or a
        Kronecker product of two Paley cores.

    Raises:
        TypeError: If ``n`` is not an integer.
    """
    return _factorize(_as_int(n, "n")) is not None


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Unnormalised ``±1`` Hadamard matrix ``H`` of order ``n`` with ``H Hᵀ = n I``.

    With ``(2^k, m, construction) = hadamard_factorization(n)`` the result is ``kron(H_{2^k}, H_m)``: the Sylvester
    matrix of order ``2^k`` (outer factor) times the Paley / Kronecker-of-Paley core (inner factor), the same layout
    :func:`hadamard_transform` uses, so ``hadamard_transform(x, normalize=False) == x @ hadamard_matrix(n)``. The
    construction is deterministic; the int8 matrix is cached per ``n`` and every call returns a fresh tensor.
    Only the Sylvester case (``m = 1``) is symmetric in general.

    Args:
        n: Matrix order.
        dtype: Output dtype (default ``torch.float64``); any signed dtype (floating, complex or signed integer).

    Returns:
        CPU tensor of shape ``[n, n]`` and dtype ``dtype`` with entries ``±1``.

    Raises:
        TypeError: If ``n`` is not an integer or ``dtype`` cannot represent ``-1``.
        ValueError: If ``n < 1``, ``n`` is not 1, 2 or a multiple of 4, or no construction reaches ``n``.
    """
    n = _as_int(n, "n")
    if not isinstance(dtype, torch.dtype) or not dtype.is_signed:
        raise TypeError(f"`dtype` must be a signed torch dtype that can hold -1, got {dtype!r}.")
    return _hadamard_int8(n).to(dtype=dtype, copy=True)


def _random_signs(n: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64) * 2 - 1


def random_hadamard(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    """Randomised orthonormal Hadamard rotation ``Q = diag(s) · H_n / sqrt(n)`` (QuaRot's random Hadamard).

    ``s ∈ {±1}^n`` is drawn as ``torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)) * 2 - 1``
    and ``H_n = hadamard_matrix(n)``, so ``x @ Q == hadamard_transform(x * s)`` and ``Q Qᵀ = I``. Deterministic per
    ``seed``; computed in float64 and then cast.

    Args:
        n: Matrix order (see :func:`hadamard_matrix` for the supported orders).
        seed: Seed of the CPU generator that draws the signs (default 0).
        dtype: Floating output dtype (default ``torch.float64``).

    Returns:
        CPU tensor of shape ``[n, n]`` and dtype ``dtype``.

    Raises:
        TypeError: If ``n`` or ``seed`` is not an integer, or ``dtype`` is not floating point.
        ValueError: If ``n`` has no Hadamard construction (see :func:`hadamard_matrix`).
    """
    n, seed = _as_int(n, "n"), _as_int(seed, "seed")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"`dtype` must be a floating torch dtype, got {dtype!r}.")
    h = hadamard_matrix(n, dtype=torch.float64)
    q = _random_signs(n, seed).to(torch.float64)[:, None] * h / math.sqrt(n)
    return q.to(dtype)


def random_orthogonal(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    """Haar-distributed random orthogonal matrix (any order ``n ≥ 1``).

    Draws a float64 standard Gaussian ``G`` (``[n, n]``) from ``torch.Generator().manual_seed(seed)``, takes
    ``G = Q R`` and returns ``Q · diag(sign(diag(R)))`` (the sign fix makes the distribution exactly Haar, Mezzadri
    2007), cast to ``dtype``.

    Args:
        n: Matrix order, ``n ≥ 1``.
        seed: Seed of the CPU generator (default 0).
        dtype: Floating output dtype (default ``torch.float64``).

    Returns:
        CPU tensor of shape ``[n, n]`` with ``Q Qᵀ = I``.

    Raises:
        TypeError: If ``n`` or ``seed`` is not an integer, or ``dtype`` is not floating point.
        ValueError: If ``n < 1``.
    """
    n, seed = _as_int(n, "n"), _as_int(seed, "seed")
    if n < 1:
        raise ValueError(f"`n` must be a positive integer; n={n} is not.")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"`dtype` must be a floating torch dtype, got {dtype!r}.")
    generator = torch.Generator().manual_seed(seed)
    g = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(torch.float64)
    return (q * signs).to(dtype)


def _butterfly(y: Tensor, owned: bool) -> Tensor:
    """``y @ H_p`` along dim 1 of a contiguous ``[B, p, m]`` tensor (Sylvester ``H_p``, ``p = 2^k ≥ 2``).

    Stage ``h`` (``h = 1, 2, …, p/2``) maps the pair ``(u, v) = (y[i], y[i + h])`` to ``(u + v, u - v)``. Without
    autograd the stages ping-pong between two buffers with ``out=``; ``y`` itself is reused as a buffer only when
    ``owned``. With autograd each stage allocates via ``torch.stack``.
    """
    batch, p, m = y.shape
    if torch.is_grad_enabled() and y.requires_grad:
        h = 1
        while h < p:
            v = y.reshape(batch, p // (2 * h), 2, h * m)
            u, w = v[:, :, 0], v[:, :, 1]
            y = torch.stack((u + w, u - w), dim=2)
            h *= 2
        return y.reshape(batch, p, m)
    src, dst = y, torch.empty_like(y)
    h = 1
    while h < p:
        shape = (batch, p // (2 * h), 2, h * m)
        v, out = src.view(shape), dst.view(shape)
        torch.add(v[:, :, 0], v[:, :, 1], out=out[:, :, 0])
        torch.sub(v[:, :, 0], v[:, :, 1], out=out[:, :, 1])
        if not owned:  # never write into the caller's tensor
            src, owned = torch.empty_like(y), True
        src, dst = dst, src
        h *= 2
    return src


def hadamard_transform(x: Tensor, normalize: bool = True) -> Tensor:
    """Fast Walsh–Hadamard transform ``x · H_n`` along the last dimension (``n = x.shape[-1]``).

    With ``(2^k, m, _) = hadamard_factorization(n)`` and ``H_n = kron(H_{2^k}, H_m) = hadamard_matrix(n)``, the last
    dimension is viewed as ``[2^k, m]``; it is multiplied on the right by the dense core ``H_m`` (one GEMM, skipped
    when ``m = 1``) and then by the Sylvester factor with a ``k``-stage butterfly, ``O(n (log₂ n + m))`` work per
    row. The result equals ``x @ hadamard_matrix(n)`` (divided by ``sqrt(n)`` when ``normalize``) up to float
    rounding. The normalised transform is orthogonal; for pure Sylvester orders it is also symmetric, hence its own
    inverse. Differentiable (the autograd path allocates one tensor per stage); the input is never modified.

    Args:
        x: Real or complex floating tensor of shape ``[..., n]`` on any device (float32 / float64 recommended; half
            precisions work but accumulate rounding over the ``log₂ n`` stages).
        normalize: Multiply by ``1 / sqrt(n)`` so the transform is orthonormal (default ``True``).

    Returns:
        Tensor with the shape, dtype and device of ``x``.

    Raises:
        TypeError: If ``x`` is not a floating / complex tensor.
        ValueError: If ``x`` is 0-dimensional or ``x.shape[-1]`` has no construction (the message lists what is
            supported and the nearest supported orders).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"`x` must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim == 0:
        raise ValueError("`x` must have at least one dimension; the transform acts on x.shape[-1].")
    if not (x.is_floating_point() or x.is_complex()):
        raise TypeError(f"`x` must be a floating or complex tensor, got dtype {x.dtype}.")
    n = x.shape[-1]
    p, m, name = _factorize_or_raise(n, "x.shape[-1]")
    y = x.reshape(x.numel() // n, p, m)
    owned = False
    if m > 1:
        y, owned = y @ _core_tensor(m, name, x.dtype, x.device), True
    if p > 1:
        y, owned = _butterfly(y.contiguous(), owned), True
    if normalize and n > 1:
        y = y * (1.0 / math.sqrt(n)) if y.requires_grad else y.mul_(1.0 / math.sqrt(n))
    elif not owned:
        y = y.clone()
    return y.reshape(x.shape)
