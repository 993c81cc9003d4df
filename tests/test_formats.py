import pytest
import torch

from lightning_epfl.functional.formats import ELEMENT_FORMATS, block_quantize
from lightning_epfl.functional.quantize import quantize_symmetric

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fp_values(ebits: int, mbits: int, max_normal: float) -> torch.Tensor:
    """All non-negative values of a minifloat (subnormals included) up to ``max_normal``, built by enumeration."""
    bias = 2 ** (ebits - 1) - 1
    vals = set()
    for e_field in range(2**ebits):
        for mant in range(2**mbits):
            if e_field == 0:
                v = (mant / 2**mbits) * 2.0 ** (1 - bias)
            else:
                v = (1 + mant / 2**mbits) * 2.0 ** (e_field - bias)
            if v <= max_normal:
                vals.add(v)
    return torch.tensor(sorted(vals), dtype=F64)


# ----------------------------------------------------------------------------------------------------------------------
# MXFP
# ----------------------------------------------------------------------------------------------------------------------


def test_e2m1_value_set_matches_spec():
    assert _fp_values(2, 1, 6.0).tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert _fp_values(4, 3, 448.0).max().item() == 448.0 and len(_fp_values(4, 3, 448.0)) == 127
    assert _fp_values(2, 3, 7.5).max().item() == 7.5
    assert _fp_values(3, 2, 28.0).max().item() == 28.0
    assert _fp_values(5, 2, 57344.0).max().item() == 57344.0


@pytest.mark.parametrize("name", list(ELEMENT_FORMATS))
@pytest.mark.parametrize("scale_exp", [-3, 0, 5])
def test_mxfp_representable_values_round_trip(name, scale_exp):
    ebits, mbits, emax, max_normal = ELEMENT_FORMATS[name]
    vals = _fp_values(ebits, mbits, max_normal)
    # one block per value: [max_normal, v] so the shared scale is 2^(floor(log2 max_normal) - emax) = 1 (times 2^k)
    assert int(torch.floor(torch.log2(torch.tensor(max_normal)))) == emax
    signed = torch.cat([vals, -vals])
    x = torch.stack([torch.full_like(signed, max_normal), signed], dim=1) * 2.0**scale_exp
    out = block_quantize(x, "mxfp", element_format=name, block_size=2)
    assert torch.equal(out, x)


def test_mxfp_e2m1_shared_scale_amax5():
    # floor(log2 5) = 2, emax(e2m1) = 2 -> X = 1: elements are the e2m1 values themselves
    x = torch.tensor([[5.0, 0.7, -1.3, 2.4, 0.2, 3.6, -0.25, 1.75]], dtype=F64)
    out = block_quantize(x, "mxfp", element_format="e2m1", block_size=8)
    # 5 -> tie between 4 and 6 -> even mantissa (4); 0.7 -> 0.5; -1.3 -> -1.5; 2.4 -> 2; 0.2 -> 0;
    # 3.6 -> 4; -0.25 -> tie 0 / 0.5 -> 0 (even); 1.75 -> tie 1.5 / 2 -> 2 (even mantissa)
    assert out.tolist() == [[4.0, 0.5, -1.5, 2.0, 0.0, 4.0, -0.0, 2.0]]
    # scaled by 2^-4 the same block gets X = 2^-4 and the same elements
    assert torch.equal(block_quantize(x / 16, "mxfp", element_format="e2m1", block_size=8), out / 16)


def test_mxfp_shared_scale_is_ocp_power_of_two():
    # e4m3 (emax 8): amax 100 -> floor(log2 100) = 6 -> X = 2^-2; a value 0.1 in that block is an element 0.4,
    # rounded on the e4m3 grid (exponent -2 -> spacing 2^-5) to 13/32 -> 13/32 * 2^-2
    x = torch.tensor([100.0, 0.1], dtype=F64)
    out = block_quantize(x, "mxfp", element_format="e4m3", block_size=2)
    assert out[1].item() == 13 / 32 / 4
    # 100 -> element 400 = 1.5625 * 2^8, a tie between 1.5 * 2^8 and 1.625 * 2^8 -> even mantissa -> 384 -> 96
    assert out[0].item() == 96.0


@pytest.mark.parametrize("name", list(ELEMENT_FORMATS))
def test_mxfp_saturates_at_max_normal(name):
    _, _, emax, max_normal = ELEMENT_FORMATS[name]
    # amax just below 2^(emax+1): X = 1, element above max normal -> saturates to +-max normal
    big = 2.0 ** (emax + 1) * 0.999
    x = torch.tensor([big, -big, 1.0, 0.0], dtype=F64)
    out = block_quantize(x, "mxfp", element_format=name, block_size=4)
    assert out[0].item() == max_normal and out[1].item() == -max_normal
    assert out[2].item() == 1.0 and out[3].item() == 0.0


@pytest.mark.parametrize("name", list(ELEMENT_FORMATS))
def test_mxfp_nearest_error_at_most_half_spacing(name):
    ebits, mbits, _, max_normal = ELEMENT_FORMATS[name]
    vals = _fp_values(ebits, mbits, max_normal)
    _, _, emax, _ = ELEMENT_FORMATS[name]
    bound = 2.0 ** (emax + 1) * 0.99
    x = (torch.randn(64, 32, generator=_gen(0), dtype=F64) * 3).clamp(-bound, bound)
    # force X = 1 in every block: an element with floor(log2) = emax and no |x| >= 2^(emax + 1)
    x[:, 0] = max_normal
    out = block_quantize(x, "mxfp", element_format=name, block_size=32)
    a = x.abs().clamp(max=max_normal).reshape(-1, 1)
    idx = torch.searchsorted(vals, a.squeeze(1), right=True).clamp(1, len(vals) - 1)
    lo, hi = vals[idx - 1], vals[idx]
    half = ((hi - lo) / 2).unsqueeze(1)
    err = (out.reshape(-1, 1).abs() - a).abs()
    assert bool((err <= half + 1e-12).all())
    # every output is representable
    assert bool(torch.isin(out.abs().reshape(-1), vals).all())


@pytest.mark.parametrize(
    "fmt,kw", [("int", {}), ("hbfp", {}), ("mxint", {"bits": 8}), ("mxfp", {"element_format": "e4m3"})]
)
def test_zero_blocks_stay_zero(fmt, kw):
    x = torch.zeros(3, 8)
    x[1] = torch.arange(8.0) - 3
    out = block_quantize(x, fmt, block_size=4, **kw)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros(8)) and torch.equal(out[2], torch.zeros(8))
    out_s = block_quantize(x, fmt, block_size=4, rounding="stochastic", generator=_gen(1), **kw)
    assert torch.isfinite(out_s).all() and torch.equal(out_s[0], torch.zeros(8))


# ----------------------------------------------------------------------------------------------------------------------
# INT / HBFP / MXINT
# ----------------------------------------------------------------------------------------------------------------------


def test_int_matches_grouped_symmetric_and_round_trips():
    x = torch.randn(4, 64, generator=_gen(2), dtype=F64)
    out = block_quantize(x, "int", bits=4, block_size=16)
    assert torch.equal(out, quantize_symmetric(x, 4, group_size=16))
    assert torch.equal(block_quantize(out, "int", bits=4, block_size=16), out)  # idempotent: grid values round-trip
    # per block at most 2^bits distinct values
    for blk in out.reshape(-1, 16):
        assert blk.unique().numel() <= 16


def test_int_along_other_dim():
    x = torch.randn(8, 3, generator=_gen(3), dtype=F64)
    out = block_quantize(x, "int", bits=3, block_size=4, dim=0)
    assert torch.equal(out, quantize_symmetric(x.T, 3, group_size=4).T)


def test_hbfp_hand_example():
    # m = 3: amax 5 -> e = ceil(log2 5) = 3, step 2^(3-3) = 1, clamp to +-(8 - 1) = 7
    x = torch.tensor([5.0, -2.4, 0.5, 1.5], dtype=F64)
    assert block_quantize(x, "hbfp", bits=3, block_size=4).tolist() == [5.0, -2.0, 0.0, 2.0]
    # amax an exact power of two: 8 -> e = 3, max representable 2^3 - 1 = 7 (saturates)
    y = torch.tensor([8.0, 0.3, -8.0, 3.0], dtype=F64)
    assert block_quantize(y, "hbfp", bits=3, block_size=4).tolist() == [7.0, 0.0, -7.0, 3.0]
    # HBFP8 (m = 7): amax 0.75 -> e = 0, step 2^-7
    z = torch.tensor([0.75, 0.01], dtype=F64)
    assert block_quantize(z, "hbfp", bits=7, block_size=2).tolist() == [0.75, 1 / 128]


def test_hbfp_round_trip_and_half_step_error():
    m = 5
    x = torch.randn(16, 32, generator=_gen(4), dtype=F64)
    out = block_quantize(x, "hbfp", bits=m, block_size=8)
    amax = x.reshape(16, 4, 8).abs().amax(-1, keepdim=True)
    step = 2.0 ** (torch.ceil(torch.log2(amax)) - m)
    err = (out - x).reshape(16, 4, 8).abs()
    limit = 2.0 ** torch.ceil(torch.log2(amax)) - step
    inside = x.reshape(16, 4, 8).abs() <= limit
    assert bool((err[inside] <= step.expand_as(err)[inside] / 2 + 1e-15).all())
    # outputs are multiples of the step, within +-(2^e - step)
    q = out.reshape(16, 4, 8) / step
    assert torch.equal(q, torch.round(q)) and bool((out.reshape(16, 4, 8).abs() <= limit).all())
    # not idempotent in general: an amax rounded up to a power of two 2^e gets exponent e (not e + 1) next time,
    # so only blocks whose quantized amax is not a power of two are guaranteed to round-trip
    again = block_quantize(out, "hbfp", bits=m, block_size=8).reshape(16, 4, 8)
    qmax = out.reshape(16, 4, 8).abs().amax(-1)
    stable = torch.log2(qmax) != torch.round(torch.log2(qmax))
    assert torch.equal(again[stable], out.reshape(16, 4, 8)[stable])


def test_mxint8_scale_and_elements():
    # amax 5 -> X = 2^floor(log2 5) = 4; elements k / 64 with k in [-127, 127]; 5/4*64 = 80
    x = torch.tensor([5.0, 0.1, -7.9, 2.6], dtype=F64)
    out = block_quantize(x, "mxint", bits=8, block_size=4)
    # block amax 7.9 -> X = 4; 7.9 / 4 * 64 = 126.4 -> 126; 0.1/4*64 = 1.6 -> 2; 2.6*16 = 41.6 -> 42
    assert out.tolist() == [80 / 16, 2 / 16, -126 / 16, 42 / 16]
    # saturation at 127: amax 7.99 -> 127.84 -> 128 -> clamped to 127
    y = torch.tensor([7.99, -7.99], dtype=F64)
    assert block_quantize(y, "mxint", bits=8, block_size=2).tolist() == [127 / 16, -127 / 16]
    # representable values round-trip: all k/64 * X with the block max fixing X = 1
    k = torch.arange(-127, 128, dtype=F64)
    z = torch.stack([torch.full_like(k, 1.0), k / 64], dim=1)
    assert torch.equal(block_quantize(z, "mxint", bits=8, block_size=2), z)


# ----------------------------------------------------------------------------------------------------------------------
# block sizes, stochastic rounding, dtypes, errors
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt,kw", [("int", {}), ("hbfp", {}), ("mxint", {"bits": 8}), ("mxfp", {"element_format": "e2m1"})]
)
def test_block_size_edge_cases(fmt, kw):
    x = torch.randn(5, 12, generator=_gen(5))
    whole = block_quantize(x, fmt, block_size=12, **kw)
    assert whole.shape == x.shape and whole.dtype == x.dtype
    # whole-dim block equals quantizing each row independently
    for r in range(5):
        assert torch.equal(whole[r], block_quantize(x[r : r + 1], fmt, block_size=12, **kw)[0])
    one = block_quantize(x, fmt, block_size=1, **kw)
    assert one.shape == x.shape and torch.isfinite(one).all()
    with pytest.raises(ValueError, match=r"block_size.*\(5\).*\(12\)"):
        block_quantize(x, fmt, block_size=5, **kw)


def test_block_size_one_values():
    x = torch.tensor([3.0, -0.3, 0.0, 100.0], dtype=F64)
    # int: each element is its own absmax -> exact
    assert torch.equal(block_quantize(x, "int", bits=4, block_size=1), x)
    # mxfp e2m1 with one-element blocks: element in [4, 8) -> 3 -> 2^1 * 1.5 -> value 3 exactly
    out = block_quantize(x, "mxfp", element_format="e2m1", block_size=1)
    assert out.tolist() == [3.0, -0.25, 0.0, 96.0]  # 0.3 -> 4.8 -> 4 * 2^-4 ; 100 -> 6.25 -> 6 * 16


@pytest.mark.parametrize("fmt,kw", [("int", {"bits": 3}), ("hbfp", {"bits": 2}), ("mxfp", {"element_format": "e2m1"})])
def test_stochastic_rounding_unbiased_and_reproducible(fmt, kw):
    x = torch.tensor([[0.7, 0.37, -0.61, 0.13]], dtype=F64)  # amax 0.7: representable (no saturation)
    draws = 4000
    xs = x.expand(draws, 4).contiguous()
    out = block_quantize(xs, fmt, block_size=4, rounding="stochastic", generator=_gen(7), **kw)
    assert torch.allclose(out.mean(0), x[0], atol=0.03)
    nearest = block_quantize(x, fmt, block_size=4, **kw)
    assert not torch.allclose(nearest[0], x[0], atol=0.03)  # nearest is biased for these values
    again = block_quantize(xs, fmt, block_size=4, rounding="stochastic", generator=_gen(7), **kw)
    assert torch.equal(out, again)
    other = block_quantize(xs, fmt, block_size=4, rounding="stochastic", generator=_gen(8), **kw)
    assert not torch.equal(out, other)
    # stochastic outputs only take the two neighbouring grid values
    for c in range(4):
        assert out[:, c].unique().numel() <= 2


def test_dtype_and_shape_preserved():
    x = torch.randn(2, 3, 8, generator=_gen(9)).to(torch.bfloat16)
    for fmt, kw in [("int", {}), ("hbfp", {"bits": 7}), ("mxint", {"bits": 8}), ("mxfp", {"element_format": "e4m3"})]:
        out = block_quantize(x, fmt, block_size=8, **kw)
        assert out.dtype == torch.bfloat16 and out.shape == x.shape


def test_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="fmt.*int.*hbfp.*mxint.*mxfp"):
        block_quantize(x, "fp8")
    with pytest.raises(ValueError, match="element_format.*e4m3"):
        block_quantize(x, "mxfp", block_size=8)
    with pytest.raises(ValueError, match="element_format.*e2m1"):
        block_quantize(x, "mxfp", element_format="e9m9", block_size=8)
    with pytest.raises(ValueError, match="bits"):
        block_quantize(x, "int", bits=1, block_size=8)
    with pytest.raises(ValueError, match="bits"):
        block_quantize(x, "hbfp", bits=0, block_size=8)
    with pytest.raises(ValueError, match="bits"):
        block_quantize(x, "mxint", bits=17, block_size=8)
    with pytest.raises(ValueError, match="rounding"):
        block_quantize(x, "int", block_size=8, rounding="up")
    with pytest.raises(ValueError, match="block_size"):
        block_quantize(x, "int", block_size=0)
    with pytest.raises(ValueError, match="dim"):
        block_quantize(x, "int", block_size=4, dim=2)
    with pytest.raises(ValueError, match="floating"):
        block_quantize(torch.ones(4, 8, dtype=torch.int32), "int", block_size=8)
    # bits is ignored for mxfp
    assert block_quantize(x, "mxfp", bits=99, element_format="e2m1", block_size=8).shape == x.shape
