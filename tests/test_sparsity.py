import pytest
import torch
from calibration_data import calibration, gen

from lightning_epfl.functional.quantize import HessianAccumulator, quantize_symmetric
from lightning_epfl.functional.sparsity import (
    input_norms,
    magnitude_mask,
    orthogonality,
    sparse_quantize,
    sparsegpt_prune,
    wanda_scores,
)

F64 = torch.float64


def _hessian(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator()
    acc.add(x)
    return acc.hessian


# ----------------------------------------------------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 3)])
def test_nm_exact_counts(n, m):
    w = torch.randn(7, 24, generator=gen(0))
    mask = magnitude_mask(w, pattern="n:m", n=n, m=m)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert torch.all(mask.reshape(7, 24 // m, m).sum(-1) == n)
    # the kept ones are the n largest of every group
    g = w.abs().reshape(7, -1, m)
    kept_min = torch.where(mask.reshape(7, -1, m), g, torch.inf).amin(-1)
    pruned_max = torch.where(mask.reshape(7, -1, m), -torch.inf, g).amax(-1)
    assert bool((kept_min >= pruned_max).all())


@pytest.mark.parametrize("sparsity,expect", [(0.5, 10), (0.25, 15), (0.0, 20), (0.7, 6), (0.975, 1), (0.99, 0)])
def test_unstructured_exact_counts_row_and_tensor(sparsity, expect):
    w = torch.randn(6, 20, generator=gen(1))
    row = magnitude_mask(w, sparsity, pattern="unstructured", scope="row")
    assert torch.all(row.sum(1) == expect)
    tensor = magnitude_mask(w, sparsity, pattern="unstructured", scope="tensor")
    assert int(tensor.sum()) == int((1 - sparsity) * 120 + 0.5 + 1e-9)
    if 0 < tensor.sum() < 120:
        assert w.abs()[tensor].min() >= w.abs()[~tensor].max()


def test_stable_tie_breaking_keeps_lower_indices():
    w = torch.ones(3, 8)
    nm = magnitude_mask(w, pattern="n:m", n=2, m=4)
    assert nm[0].tolist() == [True, True, False, False] * 2
    row = magnitude_mask(w, 0.75, pattern="unstructured", scope="row")
    assert row.tolist() == [[True, True, False, False, False, False, False, False]] * 3
    tensor = magnitude_mask(w, 0.5, pattern="unstructured", scope="tensor")
    assert tensor.reshape(-1).tolist() == [True] * 12 + [False] * 12
    # deterministic across calls, and with negative equal magnitudes
    w2 = torch.tensor([[-1.0, 1.0, -1.0, 1.0, 0.5, -2.0, 2.0, 2.0]])
    assert magnitude_mask(w2, pattern="n:m").tolist() == [[True, True, False, False, False, True, True, False]]
    for _ in range(3):
        assert torch.equal(magnitude_mask(w, pattern="n:m"), nm)


def test_custom_scores_and_nd():
    w = torch.randn(4, 8, generator=gen(2))
    scores = torch.arange(32.0).reshape(4, 8)
    mask = magnitude_mask(w, pattern="n:m", scores=scores)
    assert mask[0].tolist() == [False, False, True, True] * 2
    w3 = torch.randn(2, 3, 8, generator=gen(3))
    assert torch.all(magnitude_mask(w3, 0.5, pattern="unstructured").sum(-1) == 4)


def test_wanda_uniform_norms_equals_magnitude():
    w = torch.randn(8, 16, generator=gen(4), dtype=F64)
    s = wanda_scores(w, torch.full((16,), 3.7, dtype=F64))
    for kw in [{"pattern": "n:m"}, {"pattern": "unstructured", "scope": "row"}]:
        assert torch.equal(magnitude_mask(w, 0.5, scores=s, **kw), magnitude_mask(w, 0.5, **kw))


def test_wanda_scores_and_input_norms():
    x = torch.randn(3, 5, 4, generator=gen(5), dtype=F64)
    norms = input_norms(x)
    assert torch.allclose(norms, x.reshape(-1, 4).norm(dim=0))
    w = torch.randn(2, 4, generator=gen(6), dtype=F64)
    assert torch.allclose(wanda_scores(w, norms), w.abs() * norms)
    # a feature with huge activations protects its weights
    big = torch.tensor([1.0, 1.0, 100.0, 1.0], dtype=F64)
    w = torch.tensor([[1.0, 2.0, 0.1, 3.0]], dtype=F64)
    assert magnitude_mask(w, scores=wanda_scores(w, big)).tolist() == [[False, False, True, True]]
    assert input_norms(torch.randn(4, 3)).dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------------------
# SparseGPT
# ----------------------------------------------------------------------------------------------------------------------


def _out_err(x, w, w_hat):
    return torch.linalg.norm(x @ w.T - x @ w_hat.T).item()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("pattern", ["unstructured", "n:m"])
def test_sparsegpt_beats_magnitude(seed, pattern):
    x, w = calibration(seed)
    pruned, mask = sparsegpt_prune(w, _hessian(x), sparsity=0.5, pattern=pattern, mask_block=8, block_size=8)
    mag = w * magnitude_mask(w, 0.5, pattern=pattern, scope="row")
    assert bool((pruned[~mask] == 0).all())
    if pattern == "n:m":
        assert torch.all(mask.reshape(16, -1, 4).sum(-1) == 2)
    else:
        assert torch.all(mask.sum(1) == 16)
    assert _out_err(x, w, pruned) <= _out_err(x, w, mag)


def test_sparsegpt_block_size_invariant():
    x, w = calibration(7)
    h = _hessian(x)
    a, ma = sparsegpt_prune(w, h, pattern="n:m", block_size=4)
    b, mb = sparsegpt_prune(w, h, pattern="n:m", block_size=32)
    assert torch.equal(ma, mb) and torch.allclose(a, b, atol=1e-10)


def test_sparsegpt_identity_hessian_equals_magnitude():
    # H = I: U is diagonal, so no OBS update and the saliency is w^2 times a constant -> the magnitude mask.
    w = torch.randn(8, 32, generator=gen(8), dtype=F64)
    eye = torch.eye(32, dtype=F64)
    pruned, mask = sparsegpt_prune(w, eye, sparsity=0.5, pattern="unstructured", mask_block=32)
    expect = magnitude_mask(w, 0.5, pattern="unstructured", scope="row")
    assert torch.equal(mask, expect) and torch.equal(pruned, w * expect)
    pruned, mask = sparsegpt_prune(w, eye, pattern="n:m")
    expect = magnitude_mask(w, pattern="n:m")
    assert torch.equal(mask, expect) and torch.equal(pruned, w * expect)
    # with mask_block < in the choice is per block of columns: magnitude within each block, not over the row
    pruned, mask = sparsegpt_prune(w, eye, sparsity=0.5, pattern="unstructured", mask_block=8)
    per_block = magnitude_mask(w.reshape(8, 4, 8), 0.5, pattern="unstructured").reshape(8, 32)
    assert torch.equal(mask, per_block) and torch.equal(pruned, w * per_block)


def test_sparsegpt_joint_quantization():
    x, w = calibration(9)
    scale = w.abs().amax(1) / 7  # fixed per-row INT4 grid

    def qfn(col, j):
        return torch.clamp(torch.round(col / scale), -8, 7) * scale

    pruned, mask = sparsegpt_prune(w, _hessian(x), pattern="n:m", quantize_fn=qfn)
    assert bool((pruned[~mask] == 0).all())
    codes = pruned / scale.unsqueeze(1)
    assert torch.allclose(codes, torch.round(codes), atol=1e-9)
    with pytest.raises(ValueError, match="quantize_fn"):
        sparsegpt_prune(w, _hessian(x), quantize_fn=lambda c, j: c[:3])


def test_sparsegpt_dead_inputs_and_float32():
    x, w = calibration(10)
    x[:, 3] = 0
    pruned, mask = sparsegpt_prune(w.float(), _hessian(x), pattern="n:m")
    assert pruned.dtype == torch.float32 and bool((pruned[:, 3] == 0).all())
    assert torch.isfinite(pruned).all()


# ----------------------------------------------------------------------------------------------------------------------
# sparse x quantize
# ----------------------------------------------------------------------------------------------------------------------


def _int4_g32(t):
    return quantize_symmetric(t, 4, group_size=32)


def test_sq_beats_qs_nested_student_t():
    dist = torch.distributions.StudentT(torch.tensor(3.0, dtype=F64))
    torch.manual_seed(0)
    for _ in range(100):
        w = dist.sample((16, 64))
        mask = magnitude_mask(w, pattern="n:m", n=2, m=4)
        sq = sparse_quantize(w, mask, _int4_g32, "SQ")
        qs = sparse_quantize(w, mask, _int4_g32, "QS", mask_fn=lambda q: magnitude_mask(q, pattern="n:m"))
        assert torch.linalg.norm(w - sq) <= torch.linalg.norm(w - qs) + 1e-12
        # nested groups: every 32-block's absmax survives 2:4 pruning -> same scales -> SQ = m * Q(W)
        assert torch.equal(sq, mask * _int4_g32(w))


def test_sparse_quantize_orders_and_mask_reapplied():
    w = torch.randn(4, 32, generator=gen(11), dtype=F64)
    mask = magnitude_mask(w, 0.5, pattern="unstructured")
    # SQ re-derives scales after masking: equal to quantizing the masked tensor
    sq = sparse_quantize(w, mask, _int4_g32)
    assert torch.equal(sq, _int4_g32(w * mask) * mask)
    # QS without mask_fn applies the given mask to Q(W)
    assert torch.equal(sparse_quantize(w, mask, _int4_g32, "QS"), _int4_g32(w) * mask)

    # a quantizer that maps zeros to non-zeros: the mask is re-applied
    def shift(t):
        return t + 1.0

    assert bool((sparse_quantize(w, mask, shift)[~mask] == 0).all())


def test_orthogonality_report():
    r = orthogonality(0.25, 0.5, 1.0)
    assert r == {"eps_s": 0.25, "eps_q": 0.5, "eps_sq": 1.0, "bound": 0.75, "excess": 0.25, "orthogonal": False}
    r = orthogonality(1, 2, 3)
    assert r["bound"] == 3.0 and r["excess"] == 0.0 and r["orthogonal"] is True
    assert orthogonality(0.5, 0.5, 0.75)["excess"] == -0.25
    with pytest.raises(ValueError, match="eps_sq"):
        orthogonality(0.1, 0.2, float("nan"))


# ----------------------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------------------


def test_errors():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"`n`.*n <= m"):
        magnitude_mask(w, n=5, m=4)
    with pytest.raises(ValueError, match="`n`"):
        magnitude_mask(w, n=0, m=4)
    with pytest.raises(ValueError, match=r"`m` \(3\) must divide in_features.*8"):
        magnitude_mask(w, n=2, m=3)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"sparsity.*\[0, 1\)"):
            magnitude_mask(w, bad, pattern="unstructured")
    with pytest.raises(ValueError, match="pattern.*unstructured.*n:m"):
        magnitude_mask(w, pattern="block")
    with pytest.raises(ValueError, match="scope.*tensor.*row"):
        magnitude_mask(w, pattern="unstructured", scope="column")
    with pytest.raises(ValueError, match="scores"):
        magnitude_mask(w, scores=torch.ones(4, 4))
    with pytest.raises(ValueError, match="order.*SQ.*QS"):
        sparse_quantize(w, w > 0, _int4_g32, "SS")
    with pytest.raises(ValueError, match="mask"):
        sparse_quantize(w, (w > 0).float(), _int4_g32)
    with pytest.raises(ValueError, match="act_norm"):
        wanda_scores(w, torch.ones(5))
    with pytest.raises(ValueError, match="hessian"):
        sparsegpt_prune(w, torch.eye(4))
    with pytest.raises(ValueError, match="pattern"):
        sparsegpt_prune(w, torch.eye(8), pattern="2:4")
    with pytest.raises(ValueError, match="mask_block"):
        sparsegpt_prune(w, torch.eye(8), mask_block=0)
    with pytest.raises(ValueError, match="`m`"):
        sparsegpt_prune(w, torch.eye(8), pattern="n:m", m=3)
