import pytest
import torch
from calibration_data import calibration, gen

from lightning_epfl.functional.quantize import (
    HessianAccumulator,
    gptq_quantize,
    inverse_hessian_cholesky,
    obs_sweep,
    quantize_asymmetric,
    quantize_symmetric,
    rtn_quantize,
    search_clip_ratio,
)

F64 = torch.float64


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.T @ x / x.shape[0]


# ----------------------------------------------------------------------------------------- independent reference


def _ref_params(x: torch.Tensor, bits: int, symmetric: bool, clip) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale [rows, 1] (and zero point) of the rows of x [rows, n], written independently of the module."""
    if symmetric:
        return clip * x.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1), None
    lo = clip * torch.clamp(x.amin(1, keepdim=True), max=0)
    hi = clip * torch.clamp(x.amax(1, keepdim=True), min=0)
    scale = (hi - lo) / (2**bits - 1)
    return scale, torch.round(-lo / scale)


def _ref_quant(col: torch.Tensor, params, bits: int) -> torch.Tensor:
    scale, zero = params
    scale = scale[:, 0]
    if zero is None:
        qmax = 2 ** (bits - 1) - 1
        return torch.clamp(torch.round(col / scale), -qmax - 1, qmax) * scale
    zero = zero[:, 0]
    return (torch.clamp(torch.round(col / scale) + zero, 0, 2**bits - 1) - zero) * scale


def _reference_gptq(w, h, *, bits, group_size=None, damp=0.01, clip_search=False, symmetric=True):
    """Plain OBS loop: no lazy batching, inverse Hessian computed directly and shrunk by Schur complements."""
    w = w.clone()
    n = w.shape[1]
    hinv = torch.linalg.inv(h + damp * h.diagonal().mean() * torch.eye(n, dtype=h.dtype))

    def params(x):
        clip = search_clip_ratio(x, bits, symmetric=symmetric) if clip_search else 1.0
        return _ref_params(x, bits, symmetric, clip)

    p = params(w) if group_size is None else None
    q = torch.zeros_like(w)
    for j in range(n):
        if group_size is not None and j % group_size == 0:
            p = params(w[:, j : j + group_size])
        q[:, j] = _ref_quant(w[:, j], p, bits)
        e = (w[:, j] - q[:, j]) / hinv[j, j]
        w[:, j + 1 :] -= e[:, None] * hinv[j, j + 1 :][None, :]
        hinv = hinv - hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]
    return q


def _output_error(x, w, w_hat) -> float:
    return float(torch.linalg.norm(x @ w.T - x @ w_hat.T))


# ----------------------------------------------------------------------------------------------- fake quantizers


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_representable_values_round_trip(bits):
    qmax = 2 ** (bits - 1) - 1
    s = 2.0**-3
    k = torch.arange(-qmax, qmax + 1, dtype=F64)
    rows = torch.stack([k[torch.randperm(k.numel(), generator=gen(r))] for r in range(3)])
    x = rows * s * torch.tensor([[1.0], [4.0], [0.5]], dtype=F64)  # per-row power-of-two scales, max included
    assert torch.equal(quantize_symmetric(x, bits), x)
    assert torch.equal(quantize_symmetric(x.T.contiguous(), bits, dim=0), x.T)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asymmetric_representable_values_round_trip(bits):
    maxq = 2**bits - 1
    s = 2.0**-4
    for zero in (0, 1, maxq // 2, maxq):
        k = torch.arange(0, maxq + 1, dtype=F64)
        x = ((k - zero) * s)[torch.randperm(k.numel(), generator=gen(zero))][None, :]
        assert torch.equal(quantize_asymmetric(x, bits), x)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [3, 4])
def test_error_at_most_half_step(symmetric, bits):
    x = torch.randn(8, 64, generator=gen(0), dtype=F64) * torch.linspace(0.1, 5, 8, dtype=F64)[:, None]
    if symmetric:
        scale = x.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
        y = quantize_symmetric(x, bits)
    else:
        scale = (x.amax(1, keepdim=True).clamp(min=0) - x.amin(1, keepdim=True).clamp(max=0)) / (2**bits - 1)
        y = quantize_asymmetric(x, bits)
    assert ((x - y).abs() <= scale / 2 * (1 + 1e-12)).all()
    assert ((x - y).abs() > 0).any()


def test_symmetric_clipping_saturates():
    bits, clip = 4, 0.5
    qmax = 2 ** (bits - 1) - 1
    x = torch.linspace(-10, 10, 201, dtype=F64)[None, :]
    y = quantize_symmetric(x, bits, clip_ratio=clip)
    s = clip * 10 / qmax
    torch.testing.assert_close(y.max(), torch.tensor(clip * 10, dtype=F64))
    big = x > clip * 10
    torch.testing.assert_close(y[big], torch.full_like(y[big], clip * 10))
    low = x < -(qmax + 1) * s
    torch.testing.assert_close(y[low], torch.full_like(y[low], -(qmax + 1) * s))
    inside = x.abs() <= clip * 10
    assert ((x - y)[inside].abs() <= s / 2 + 1e-12).all()


def test_asymmetric_clipping_saturates():
    bits, clip = 3, 0.6
    x = torch.linspace(-2, 6, 161, dtype=F64)[None, :]
    y = quantize_asymmetric(x, bits, clip_ratio=clip)
    lo, hi = clip * -2, clip * 6
    s = (hi - lo) / (2**bits - 1)
    assert torch.unique(y[x >= hi]).numel() == 1 and torch.unique(y[x <= lo]).numel() == 1
    assert abs(float(y.max()) - hi) <= s / 2 + 1e-12
    assert abs(float(y.min()) - lo) <= s / 2 + 1e-12


@pytest.mark.parametrize("fn", [quantize_symmetric, quantize_asymmetric])
def test_grouped_equals_loop_over_groups(fn):
    g = 6
    x = torch.randn(3, 24, generator=gen(1), dtype=F64)
    expected = torch.cat([fn(x[:, i : i + g], 3) for i in range(0, 24, g)], dim=1)
    assert torch.equal(fn(x, 3, group_size=g), expected)
    # along dim 0 of the transposed tensor
    assert torch.equal(fn(x.T.contiguous(), 3, dim=0, group_size=g), expected.T)
    # per-group clip ratios [rows, groups, 1]
    clip = torch.rand(3, 4, 1, generator=gen(2), dtype=F64) * 0.5 + 0.5
    expected = torch.cat([fn(x[:, i : i + g], 3, clip_ratio=clip[:, i // g]) for i in range(0, 24, g)], dim=1)
    assert torch.equal(fn(x, 3, group_size=g, clip_ratio=clip), expected)


def test_activation_per_token_shape_and_dtype():
    x = torch.randn(2, 5, 16, generator=gen(3))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for fn in (quantize_symmetric, quantize_asymmetric):
            y = fn(x.to(dtype), 4, group_size=8)
            assert y.dtype == dtype and y.shape == x.shape
    flat = quantize_symmetric(x.reshape(10, 16), 4)
    assert torch.equal(quantize_symmetric(x, 4).reshape(10, 16), flat)


@pytest.mark.parametrize("fn", [quantize_symmetric, quantize_asymmetric])
def test_zero_groups_stay_zero(fn):
    x = torch.randn(3, 8, generator=gen(4), dtype=F64)
    x[1] = 0
    x[2, :4] = 0
    y = fn(x, 4, group_size=4)
    assert torch.isfinite(y).all()
    assert (y[1] == 0).all() and (y[2, :4] == 0).all()
    assert (fn(torch.zeros(2, 5), 4) == 0).all()


def test_idempotence():
    x = torch.randn(6, 32, generator=gen(5), dtype=F64)
    y = quantize_symmetric(x, 4)
    torch.testing.assert_close(quantize_symmetric(y, 4), y, rtol=1e-14, atol=0)
    y = quantize_symmetric(x, 4, group_size=8)
    torch.testing.assert_close(quantize_symmetric(y, 4, group_size=8), y, rtol=1e-14, atol=0)
    ya = quantize_asymmetric(x, 4, clip_ratio=0.95)
    assert not torch.allclose(quantize_asymmetric(ya, 4, clip_ratio=0.95), ya)


# --------------------------------------------------------------------------------------------------- clip search


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 8])
def test_search_clip_ratio_matches_brute_force(symmetric, group_size):
    bits, grid, max_shrink, norm = 3, 20, 0.5, 2.4
    w = torch.randn(5, 16, generator=gen(6), dtype=F64)
    w[0, 3] = 8.0  # an outlier: clipping pays off
    fn = quantize_symmetric if symmetric else quantize_asymmetric
    got = search_clip_ratio(
        w, bits, group_size=group_size, grid=grid, max_shrink=max_shrink, norm=norm, symmetric=symmetric
    )
    g = group_size or 16
    expected = torch.empty(5, 16 // g, 1, dtype=F64)
    for r in range(5):
        for k in range(16 // g):
            seg = w[r : r + 1, k * g : (k + 1) * g]
            errs = [(seg - fn(seg, bits, clip_ratio=1 - i / grid)).abs().pow(norm).sum() for i in range(11)]
            expected[r, k, 0] = 1 - int(torch.stack(errs).argmin()) / grid
    assert got.shape == ((5, 1) if group_size is None else (5, 2, 1))
    assert torch.equal(got.reshape(expected.shape), expected)
    assert float(got.min()) < 1.0  # the search is not trivial


def test_rtn_uses_searched_clip():
    w = torch.randn(4, 32, generator=gen(7), dtype=F64)
    clip = search_clip_ratio(w, 4, group_size=8)
    assert torch.equal(rtn_quantize(w, 4, group_size=8), quantize_symmetric(w, 4, group_size=8, clip_ratio=clip))
    assert torch.equal(rtn_quantize(w, 4, clip_search=False, symmetric=False), quantize_asymmetric(w, 4))
    err_clip = (rtn_quantize(w, 3) - w).norm()
    assert err_clip <= (rtn_quantize(w, 3, clip_search=False) - w).norm()


# ---------------------------------------------------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 4])
@pytest.mark.parametrize("clip_search", [False, True])
def test_gptq_matches_unbatched_reference(symmetric, group_size, clip_search):
    x, _ = calibration(0, n=64, d_in=12)
    w = torch.randn(6, 12, generator=gen(8), dtype=F64)
    h = _hessian(x)
    kw = dict(bits=3, group_size=group_size, clip_search=clip_search, symmetric=symmetric)
    expected = _reference_gptq(w, h, **kw)
    for block_size in (1, 3, 5, 128):
        got = gptq_quantize(w, h, block_size=block_size, **kw)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(expected, rtn_quantize(w, 3, group_size=group_size, clip_search=False))


def test_gptq_act_order_matches_permuted_reference():
    x, w = calibration(1, n=64, d_in=12, d_out=5)
    h = _hessian(x)
    perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    expected = _reference_gptq(w[:, perm], h[perm][:, perm], bits=4)[:, torch.argsort(perm)]
    for block_size in (1, 4, 128):
        got = gptq_quantize(w, h, bits=4, act_order=True, block_size=block_size, clip_search=False)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("clip_search", [False, True])
def test_gptq_identity_hessian_equals_rtn(symmetric, group_size, clip_search):
    w = torch.randn(8, 32, generator=gen(9), dtype=F64)
    got = gptq_quantize(
        w, torch.eye(32, dtype=F64), bits=4, group_size=group_size, clip_search=clip_search, symmetric=symmetric
    )
    expected = rtn_quantize(w, 4, group_size=group_size, clip_search=clip_search, symmetric=symmetric)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_output_error_not_worse_than_rtn(bits, seed):
    x, w = calibration(seed)
    acc = HessianAccumulator()
    for chunk in x.split(100):
        acc.add(chunk)
    h = acc.hessian
    for group_size in (None, 8):
        rtn = rtn_quantize(w, bits, group_size=group_size)
        gptq = gptq_quantize(w, h, bits=bits, group_size=group_size)
        assert _output_error(x, w, gptq) <= _output_error(x, w, rtn)


@pytest.mark.parametrize("seed", [0, 1])
def test_gptq_act_order_valid_grid_and_better_than_rtn(seed):
    bits = 4
    x, w = calibration(seed)
    h = _hessian(x)
    got = gptq_quantize(w, h, bits=bits, act_order=True)
    clip = search_clip_ratio(w, bits)
    scale = clip * w.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
    codes = got / scale
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-9)
    assert codes.round().min() >= -(2 ** (bits - 1)) and codes.round().max() <= 2 ** (bits - 1) - 1
    assert _output_error(x, w, got) <= _output_error(x, w, rtn_quantize(w, bits))
    # act-order is usually better than the natural order on data with uneven feature scales
    assert got.dtype == w.dtype and got.shape == w.shape


def test_gptq_dead_inputs_and_float32():
    x, w = calibration(3, n=64, d_in=16, d_out=4)
    x[:, [2, 7]] = 0
    h = _hessian(x)
    got = gptq_quantize(w, h, bits=4, group_size=4)
    assert (got[:, [2, 7]] == 0).all() and torch.isfinite(got).all()
    got32 = gptq_quantize(w.float(), h.float(), bits=4, group_size=4)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), got, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------------- obs_sweep


def test_obs_sweep_generic_column_rule_and_group_hook():
    """A pruning-style rule (zero the smallest half of each column) matches the plain loop for any block size, and
    the group hook sees the exact current weights."""
    x, w = calibration(4, n=64, d_in=10, d_out=6)
    h = _hessian(x)
    upper = inverse_hessian_cholesky(h)

    def prune(col: torch.Tensor, j: int) -> torch.Tensor:
        keep = col.abs() >= col.abs().median()
        return col * keep

    hinv = torch.linalg.inv(h + 0.01 * h.diagonal().mean() * torch.eye(10, dtype=F64))
    ref, q, seen_ref = w.clone(), torch.zeros_like(w), {}
    for j in range(10):
        if j % 4 == 0:
            seen_ref[j] = ref[:, j : j + 4].clone()
        q[:, j] = prune(ref[:, j], j)
        e = (ref[:, j] - q[:, j]) / hinv[j, j]
        ref[:, j + 1 :] -= e[:, None] * hinv[j, j + 1 :][None, :]
        hinv = hinv - hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]

    for block_size in (1, 3, 128):
        seen: dict[int, torch.Tensor] = {}

        def record(current: torch.Tensor, j: int, seen: dict = seen) -> None:
            seen[j] = current

        got = obs_sweep(w, upper, prune, block_size=block_size, group_size=4, group_fn=record)
        torch.testing.assert_close(got, q, rtol=0, atol=1e-10)
        assert seen.keys() == seen_ref.keys()
        for j in seen:
            torch.testing.assert_close(seen[j], seen_ref[j], rtol=0, atol=1e-10)
    # identity rule: nothing changes
    torch.testing.assert_close(obs_sweep(w, upper, lambda c, j: c, block_size=3), w, rtol=0, atol=0)


def test_inverse_hessian_cholesky():
    x, _ = calibration(5, n=64, d_in=8)
    x[:, 3] = 0
    h = _hessian(x)
    upper = inverse_hessian_cholesky(h, damp=0.05)
    fixed = h.clone()
    fixed[3, 3] = 1
    fixed += 0.05 * fixed.diagonal().mean() * torch.eye(8, dtype=F64)
    assert upper.dtype == F64 and torch.equal(upper, upper.triu())
    torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(fixed))
    assert (upper[3, 4:] == 0).all() and (upper[:3, 3] == 0).all()


def test_hessian_accumulator():
    g = gen(10)
    batches = [torch.randn(2, 5, 6, generator=g), torch.randn(7, 6, generator=g), torch.randn(0, 6)]
    acc = HessianAccumulator()
    for b in batches:
        acc.add(b)
    x = torch.cat([b.reshape(-1, 6) for b in batches]).double()
    assert acc.count == 17
    assert acc.hessian.dtype == F64
    torch.testing.assert_close(acc.hessian, 2 * x.T @ x / 17)
    with pytest.raises(ValueError, match="in_features"):
        acc.add(torch.randn(3, 5))


# -------------------------------------------------------------------------------------------------------- errors


def test_bad_inputs():
    w = torch.randn(4, 12)
    for bits in (1, 17, 4.0, True):
        with pytest.raises(ValueError, match=r"`bits`.*\[2, 16\]"):
            quantize_symmetric(w, bits)
    with pytest.raises(ValueError, match=r"`bits`"):
        gptq_quantize(w, torch.eye(12), bits=1)
    with pytest.raises(ValueError, match=r"`group_size` \(5\).*dimension -1 \(12\)"):
        quantize_asymmetric(w, 4, group_size=5)
    with pytest.raises(ValueError, match=r"`group_size`.*dimension 0 \(4\)"):
        quantize_symmetric(w, 4, dim=0, group_size=3)
    with pytest.raises(ValueError, match=r"`group_size`"):
        gptq_quantize(w, torch.eye(12), bits=4, group_size=5)
    with pytest.raises(ValueError, match=r"`group_size`"):
        search_clip_ratio(w, 4, group_size=0)
    for clip in (0, 1.5, torch.tensor(0.0), torch.full((4, 1), 1.5)):
        with pytest.raises(ValueError, match=r"`clip_ratio`.*\(0, 1\]"):
            quantize_symmetric(w, 4, clip_ratio=clip)
    with pytest.raises(ValueError, match=r"`clip_ratio`.*broadcast"):
        quantize_symmetric(w, 4, clip_ratio=torch.ones(12, 1))
    with pytest.raises(ValueError, match="calibration set is empty"):
        _ = HessianAccumulator().hessian
    with pytest.raises(ValueError, match="calibration set is empty"):
        acc = HessianAccumulator(12)
        acc.add(torch.randn(0, 12))
        _ = acc.hessian
    with pytest.raises(ValueError, match=r"`hessian` must have shape \[in, in\] = \[12, 12\]"):
        gptq_quantize(w, torch.eye(4), bits=4)
    with pytest.raises(ValueError, match="not positive definite"):
        inverse_hessian_cholesky(-torch.eye(3))
    with pytest.raises(ValueError, match=r"`column_fn`"):
        obs_sweep(w, torch.eye(12), lambda c, j: c[:2])
