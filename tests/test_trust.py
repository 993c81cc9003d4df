"""Trust-weighted collaborative LoRA math (arXiv:2404.09753): hand-computed cases (weight similarity,
validation, prediction, static, masks, top-k), dense/loop references for every score and mixing mode, rows computed
separately, Jacobi mixing, updates vs parameters, the product mode's Eckart-Young tail, permutation equivariance and
argument validation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lightning_epfl.functional.trust import (
    lora_product_truncation_error,
    mix_lora,
    prediction_distances,
    prediction_scores,
    sparsify_top_logits,
    static_weights,
    trust_to_weights,
    validation_scores,
    weight_similarity_scores,
)

ATOL = 1e-6
F64 = torch.float64


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


# ---------------------------------------------------------------------------------------------- weight similarity
def test_weight_similarity_acceptance():
    """Hand-computed case: A1, A2 give S = I; an identical B = [[1, 1], [0, 0]] makes S_12 = 0.5 (columns pooled)."""
    a = torch.stack([_t([[1, 0], [0, 1]]), _t([[1, 0], [0, -1]])])
    s = weight_similarity_scores([a])
    torch.testing.assert_close(s, torch.eye(2, dtype=F64), atol=ATOL, rtol=0)
    torch.testing.assert_close(trust_to_weights(s)[0], _t([0.731059, 0.268941]), atol=ATOL, rtol=0)
    b = _t([[1, 1], [0, 0]]).expand(2, 2, 2).clone()
    s = weight_similarity_scores([a, b])
    assert s[0, 1].item() == pytest.approx(0.5, abs=ATOL)
    torch.testing.assert_close(trust_to_weights(s)[0], _t([0.622459, 0.377541]), atol=ATOL, rtol=0)
    # a row convention would give (1 - 1 + 1 + 0) / 4 = 0.25 here: the layout matters
    s_rows = weight_similarity_scores([a.transpose(1, 2), b.transpose(1, 2)])
    assert s_rows[0, 1].item() == pytest.approx(0.25, abs=ATOL)


def _cos_reference(x: torch.Tensor, y: torch.Tensor) -> float:
    nx, ny = math.sqrt(sum(v * v for v in x.tolist())), math.sqrt(sum(v * v for v in y.tolist()))
    if nx == 0 or ny == 0:
        return 0.0
    return sum(u * v for u, v in zip(x.tolist(), y.tolist())) / (nx * ny)


def test_weight_similarity_matches_loop_reference():
    """Random 2-D and 3-D tensors with zero columns and different scales: a scalar loop over every column."""
    g = torch.Generator().manual_seed(0)
    n = 4
    tensors = [
        torch.randn(n, 3, 5, generator=g),
        torch.randn(n, 6, 2, generator=g),
        torch.randn(n, 2, 2, 3, generator=g),
    ]
    tensors[1][1, :, 0] = 0.0  # a zero column: cosine 0 with everything, itself included
    tensors[0][2] *= 1e-9  # scale invariance (no eps shrinkage)
    expected = torch.zeros(n, n, dtype=F64)
    count = 0
    for t in tensors:
        cols = t.double().reshape(n, t.shape[1], -1)
        count += cols.shape[2]
        for i, j in itertools.product(range(n), range(n)):
            expected[i, j] += sum(_cos_reference(cols[i, :, c], cols[j, :, c]) for c in range(cols.shape[2]))
    expected /= count
    s = weight_similarity_scores(tensors)
    torch.testing.assert_close(s, expected, atol=1e-12, rtol=0)
    assert torch.equal(s, s.T)
    assert s[1, 1].item() == pytest.approx((count - 1) / count, abs=1e-12)  # the zero column counts 0 on the diagonal


@pytest.mark.parametrize(
    ("tensors", "match"),
    [([], "tensors"), ([torch.zeros(3)], r"tensors\[0\]"), ([torch.ones(2, 3), torch.ones(3, 3)], r"tensors\[1\]")],
)
def test_weight_similarity_errors(tensors, match):
    with pytest.raises(ValueError, match=match):
        weight_similarity_scores(tensors)


# ----------------------------------------------------------------------------------------------------- validation
def test_validation_acceptance_and_variants():
    """Hand-computed case: losses ln[[10, 12], [20, 15]] give the published W; neg_loss is -L."""
    losses = torch.log(torch.tensor([[10.0, 12.0], [20.0, 15.0]]))
    w = trust_to_weights(validation_scores(losses))
    torch.testing.assert_close(w, _t([[0.880797, 0.119203], [0.006693, 0.993307]]), atol=ATOL, rtol=0)
    torch.testing.assert_close(validation_scores(losses, "neg_loss"), -losses.double())
    torch.testing.assert_close(validation_scores(losses), -_t([[10, 12], [20, 15]]))
    # float64: a large loss neither overflows nor NaNs; an infinite loss is weight 0
    s = validation_scores(_t([[1.0, 200.0], [math.inf, 2.0]]))
    assert torch.isfinite(s[0]).all() and s[1, 0] == -math.inf
    assert trust_to_weights(s)[1, 0].item() == 0.0


def test_validation_errors():
    with pytest.raises(ValueError, match="`score`"):
        validation_scores(torch.zeros(2, 2), score="perplexity")
    with pytest.raises(ValueError, match="`losses`"):
        validation_scores(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="`losses`"):
        validation_scores(_t([[0.0, math.nan], [0.0, 0.0]]))


# ----------------------------------------------------------------------------------------------------- prediction
def test_prediction_acceptance():
    """Hand-computed case: one position, V=4, q=2 gives D = [[0,1,15],[1,0,14],[15,14,0]] and the c=10 rows."""
    z = torch.tensor([[4.0, 3, 0, -1], [4, 2, 1, 0], [0, 1, 5, 3]]).unsqueeze(1)  # [N=3, P=1, V=4]
    values, indices = sparsify_top_logits(z, 2)
    d = prediction_distances(values, indices)
    torch.testing.assert_close(d, _t([[0, 1, 15], [1, 0, 14], [15, 14, 0]]), atol=ATOL, rtol=0)
    w = trust_to_weights(prediction_scores(d, scale=10.0))
    torch.testing.assert_close(w[0], _t([0.651319, 0.348626, 0.000055]), atol=ATOL, rtol=0)
    torch.testing.assert_close(w[2], _t([0.005594, 0.007898, 0.986508]), atol=ATOL, rtol=0)
    for i in range(3):
        assert torch.equal(prediction_distances(values, indices, rows=[i]), d[i : i + 1])


def _dense_distances(values: torch.Tensor, indices: torch.Tensor, vocab: int) -> torch.Tensor:
    """Slow reference: build every dense Z~_i [P, V] and sum |Z~_i - Z~_j|."""
    n, p, _ = values.shape
    dense = torch.zeros(n, p, vocab, dtype=F64)
    for i, pos in itertools.product(range(n), range(p)):
        for v, k in zip(values[i, pos].tolist(), indices[i, pos].tolist()):
            dense[i, pos, k] = v
    return torch.tensor([[float((dense[i] - dense[j]).abs().sum()) for j in range(n)] for i in range(n)], dtype=F64)


@pytest.mark.parametrize(("vocab", "q"), [(6, 3), (10, 4), (200, 3)])
def test_prediction_distances_match_dense_reference(vocab, q):
    """Heavy overlap (V=6, q=3), partial overlap and mostly disjoint supports (V=200); rows equal the full matrix."""
    g = torch.Generator().manual_seed(vocab)
    n, p = 5, 7
    logits = torch.randn(n, p, vocab, generator=g)
    logits[3] = logits[1]  # identical clients: distance exactly 0
    values, indices = sparsify_top_logits(logits, q)
    perm = torch.argsort(torch.rand(n, p, q, generator=g), dim=-1)  # unsorted supports must not matter
    values, indices = values.gather(-1, perm), indices.gather(-1, perm)
    d = prediction_distances(values, indices)
    torch.testing.assert_close(d, _dense_distances(values, indices, vocab), atol=1e-9, rtol=1e-12)
    assert torch.equal(d, d.T) and d[1, 3] == 0 and torch.all(d.diagonal() == 0)
    for rows in ([0], [4, 2], [3, 3, 1]):
        assert torch.equal(prediction_distances(values, indices, rows=rows), d[rows])


def test_prediction_distances_disjoint_supports():
    """No common index: D is the sum of both L1 norms."""
    values = _t([[[1.0, -2.0]], [[3.0, 0.5]]])
    indices = torch.tensor([[[0, 1]], [[2, 3]]])
    assert prediction_distances(values, indices)[0, 1].item() == pytest.approx(6.5, abs=1e-12)


def test_sparsify_top_logits():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 11, generator=g)
    values, indices = sparsify_top_logits(logits, 4)
    ref = torch.sort(logits, dim=-1, descending=True)
    torch.testing.assert_close(values, ref.values[..., :4])
    torch.testing.assert_close(torch.gather(logits, -1, indices), values)
    v16, i16 = sparsify_top_logits(logits.to(torch.bfloat16), 4)
    assert v16.dtype == torch.float32 and i16.dtype == torch.int64
    torch.testing.assert_close(v16, torch.gather(logits.to(torch.bfloat16).float(), -1, i16))
    assert sparsify_top_logits(logits.double(), 4)[0].dtype == F64
    for q in (0, 12, 2.0):
        with pytest.raises(ValueError, match="`q`"):
            sparsify_top_logits(logits, q)


def test_prediction_distances_errors():
    values, indices = torch.zeros(2, 1, 2), torch.tensor([[[0, 1]], [[1, 2]]])
    with pytest.raises(ValueError, match="`indices`"):
        prediction_distances(values, indices[:, :, :1])
    with pytest.raises(ValueError, match="`indices`"):
        prediction_distances(values, indices.float())
    with pytest.raises(ValueError, match="`indices`"):
        prediction_distances(values, torch.tensor([[[0, 0]], [[1, 2]]]))
    with pytest.raises(ValueError, match="`rows`"):
        prediction_distances(values, indices, rows=[2])
    with pytest.raises(ValueError, match="`values`"):
        prediction_distances(torch.zeros(2, 2), indices)


def test_prediction_scores_normalization():
    d = _t([[0, 1, 3], [0, 0, 0], [2, 2, 0]])
    s = prediction_scores(d, scale=4.0)
    torch.testing.assert_close(s, -4.0 * _t([[0, 0.25, 0.75], [0, 0, 0], [0.5, 0.5, 0]]))
    torch.testing.assert_close(trust_to_weights(s)[1], torch.full((3,), 1 / 3, dtype=F64))  # zero row: uniform
    with pytest.raises(ValueError, match="`scale`"):
        prediction_scores(d, scale=-1.0)
    with pytest.raises(ValueError, match="`distances`"):
        prediction_scores(-d)
    with pytest.raises(ValueError, match="`distances`"):
        prediction_scores(torch.zeros(2, 3))


# ------------------------------------------------------------------------------------------------- trust_to_weights
def test_top_k_acceptance_and_mask_zeros():
    """Hand-computed case: top_k=2 on [0, -1, -3, -2]; masked entries exactly 0, the diagonal always allowed."""
    s = _t([[0, -1, -3, -2]] * 4)
    w = trust_to_weights(s, top_k=2)
    torch.testing.assert_close(w[0], _t([0.731059, 0.268941, 0, 0]), atol=ATOL, rtol=0)
    assert w[0, 2].item() == 0.0 and w[0, 3].item() == 0.0
    mask = torch.zeros(4, 4, dtype=torch.bool)  # nothing allowed: only self remains
    torch.testing.assert_close(trust_to_weights(s, mask=mask), torch.eye(4, dtype=F64))


def _weights_reference(scores, temperature, top_k, threshold, min_keep, mask) -> torch.Tensor:
    """Independent per-row reference: Python lists, sorted by (score desc, index asc)."""
    n = scores.shape[0]
    out = torch.zeros(n, n, dtype=F64)
    for i in range(n):
        allowed = [j for j in range(n) if mask is None or bool(mask[i, j]) or j == i]
        ranked = sorted(allowed, key=lambda j: (-float(scores[i, j]), j))
        kept = ranked[:top_k] if top_k is not None else ranked
        if threshold is not None:
            kept = [j for j in kept if float(scores[i, j]) >= threshold or j in kept[:min_keep]]
        z = [math.exp(float(scores[i, j]) / temperature) for j in kept]
        for j, e in zip(kept, z):
            out[i, j] = e / sum(z)
    return out


def test_trust_to_weights_property():
    """Random scores x masks x top_k x threshold x temperature: rows sum to 1, dropped entries are exactly 0, and
    every entry matches the reference."""
    g = torch.Generator().manual_seed(2)
    n = 6
    for trial in range(40):
        scores = torch.randn(n, n, generator=g, dtype=F64) * 3
        scores[0, 1] = scores[0, 2]  # a tie
        mask = torch.rand(n, n, generator=g) < 0.6 if trial % 2 else None
        top_k = [None, 1, 3, 10][trial % 4]
        threshold = [None, 0.0, -1.0][trial % 3]
        temperature = [1.0, 0.5, 3.0][trial % 3]
        min_keep = 1 + trial % 3
        kw = dict(temperature=temperature, top_k=top_k, threshold=threshold, min_keep=min_keep, mask=mask)
        w = trust_to_weights(scores, **kw)
        ref = _weights_reference(scores, temperature, top_k, threshold, min_keep, mask)
        torch.testing.assert_close(w, ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(w.sum(1), torch.ones(n, dtype=F64), atol=1e-12, rtol=0)
        assert torch.equal(w == 0, ref == 0)
        if mask is not None:
            off = ~mask & ~torch.eye(n, dtype=torch.bool)
            assert torch.all(w[off] == 0)
        if top_k is not None:
            assert torch.all((w > 0).sum(1) <= top_k)


def test_threshold_keeps_min_keep():
    s = _t([[-100, -200, -300, -10]])
    s = s.expand(4, 4)
    w = trust_to_weights(s, threshold=-50)  # only -10 passes; the 2 largest (-10, -100) are kept
    assert torch.equal(w[0] > 0, torch.tensor([True, False, False, True]))
    w = trust_to_weights(s, threshold=-50, min_keep=1)
    torch.testing.assert_close(w[0], _t([0, 0, 0, 1]))
    w = trust_to_weights(s, threshold=-100, min_keep=1)  # >= t keeps the boundary entry
    assert w[0, 0].item() > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0.0}, "`temperature`"),
        ({"temperature": -1.0}, "`temperature`"),
        ({"top_k": 0}, "`top_k`"),
        ({"min_keep": 0}, "`min_keep`"),
        ({"mask": torch.ones(3, 3, dtype=torch.bool)}, "`mask`"),
        ({"mask": torch.ones(2, 2)}, "`mask`"),
        ({"scores": torch.zeros(2, 3)}, "`scores`"),
        ({"scores": _t([[0, math.nan], [0, 0]])}, "`scores`"),
        ({"scores": _t([[-math.inf, 0], [0, 0]]), "mask": torch.zeros(2, 2, dtype=torch.bool)}, "`scores`"),
    ],
)
def test_trust_to_weights_errors(kwargs, match):
    scores = kwargs.pop("scores", torch.zeros(2, 2))
    with pytest.raises(ValueError, match=match):
        trust_to_weights(scores, **kwargs)


# ------------------------------------------------------------------------------------------------------- static
def test_static_weights():
    """Hand-computed case: one-hot P gives the oracle grouping; a general P matches P P^T after row normalization."""
    w = static_weights(_t([[1, 0], [1, 0], [0, 1]]))
    torch.testing.assert_close(w, _t([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1]]), atol=ATOL, rtol=0)
    p = _t([[0.75, 0.25, 0], [0, 0.75, 0.25], [0.25, 0, 0.75], [0.75, 0.25, 0]])
    g = [[sum(a * b for a, b in zip(p[i].tolist(), p[j].tolist())) for j in range(4)] for i in range(4)]
    ref = _t([[x / sum(row) for x in row] for row in g])
    torch.testing.assert_close(static_weights(p), ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(static_weights(p * _t([[4], [1], [2], [8]])), ref, atol=1e-12, rtol=0)  # counts
    for bad in (_t([[1, 0], [0, 0]]), _t([[1, -0.5], [0, 1]]), torch.zeros(3)):
        with pytest.raises(ValueError, match="`mixture`"):
            static_weights(bad)


# -------------------------------------------------------------------------------------------------------- mixing
def _random_w(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.softmax(torch.randn(n, n, generator=g, dtype=F64) * 2, dim=1)


def _lora(n: int, r: int, d_in: int, d_out: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, r, d_in, generator=g, dtype=F64), torch.randn(n, d_out, r, generator=g, dtype=F64)


def test_mix_factors_matches_loop_and_is_jacobi():
    g = torch.Generator().manual_seed(3)
    n = 4
    w = _random_w(n, g)
    tensors = [torch.randn(n, 3, 5, generator=g), torch.randn(n, 7, generator=g, dtype=F64)]
    before = [t.clone() for t in tensors]
    out = mix_lora(tensors, w)
    for t, o in zip(tensors, out):
        ref = torch.stack([sum(float(w[i, j]) * t[j].double() for j in range(n)) for i in range(n)])
        torch.testing.assert_close(o.double(), ref, atol=1e-6, rtol=1e-6)
        assert o.dtype == t.dtype and o.shape == t.shape and o.data_ptr() != t.data_ptr()
    for t, b in zip(tensors, before):
        assert torch.equal(t, b)  # inputs untouched (every row read from the same snapshot)
    ident = mix_lora(tensors, torch.eye(n, dtype=F64))
    assert all(torch.equal(o, t) and o.data_ptr() != t.data_ptr() for o, t in zip(ident, tensors))


def test_mix_updates():
    """Anchors: t_i <- a_i + sum_j W_ij (t_j - a_j); with one shared anchor it equals parameter mixing."""
    g = torch.Generator().manual_seed(4)
    n = 5
    w = _random_w(n, g)
    t = torch.randn(n, 3, 4, generator=g, dtype=F64)
    anchors = torch.randn(n, 3, 4, generator=g, dtype=F64)
    out = mix_lora([t], w, anchors=[anchors])[0]
    ref = torch.stack([anchors[i] + sum(w[i, j] * (t[j] - anchors[j]) for j in range(n)) for i in range(n)])
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    shared = anchors[:1].expand(n, 3, 4).clone()
    torch.testing.assert_close(mix_lora([t], w, anchors=[shared])[0], mix_lora([t], w)[0], atol=1e-12, rtol=0)
    assert torch.equal(mix_lora([t], w, anchors=[t])[0], t)  # nothing moved since the anchor: no change


def _dense_product(a, b, w, anchor_a=None, anchor_b=None) -> torch.Tensor:
    """M_i = sum_j W_ij B_j A_j (+ anchor terms), formed densely [N, out, in]."""
    n = a.shape[0]
    prods = torch.stack([b[j] @ a[j] for j in range(n)])
    m = torch.stack([sum(w[i, j] * prods[j] for j in range(n)) for i in range(n)])
    if anchor_a is not None:
        pa = torch.stack([anchor_b[j] @ anchor_a[j] for j in range(n)])
        m = m + torch.stack([pa[i] - sum(w[i, j] * pa[j] for j in range(n)) for i in range(n)])
    return m


def test_mix_product_identical_adapters_reproduce_ba():
    g = torch.Generator().manual_seed(5)
    n, r = 4, 3
    a, b = _lora(1, r, 9, 7, g)
    a, b = a.float().expand(n, -1, -1).clone(), b.float().expand(n, -1, -1).clone()
    w = _random_w(n, g)
    a_new, b_new = mix_lora([a, b], w, mode="product", pairs=[(0, 1)])
    assert a_new.shape == a.shape and b_new.shape == b.shape and a_new.dtype == torch.float32
    for i in range(n):
        torch.testing.assert_close(b_new[i] @ a_new[i], b[0] @ a[0], atol=1e-5, rtol=0)
        assert torch.linalg.matrix_rank(b_new[i].double() @ a_new[i].double()) <= r
    err = lora_product_truncation_error([a, b], w, [(0, 1)])
    assert err.shape == (n,) and torch.all(err < 1e-5)


@pytest.mark.parametrize("with_anchors", [False, True])
def test_mix_product_is_eckart_young(with_anchors):
    """Distinct adapters: B_i A_i is the dense rank-r SVD truncation of M_i, the reported error is its tail, and the
    factors are balanced (B^T B = A A^T = S_r)."""
    g = torch.Generator().manual_seed(6)
    n, r, d_in, d_out = 4, 2, 8, 6
    a, b = _lora(n, r, d_in, d_out, g)
    extra = torch.randn(n, 5, generator=g, dtype=F64)  # not in a pair: mixed as factors
    w = _random_w(n, g)
    anchors = None
    m = _dense_product(a, b, w)
    if with_anchors:
        anc_a, anc_b = _lora(n, r, d_in, d_out, g)
        anchors = [anc_a, torch.zeros_like(extra), anc_b]
        m = _dense_product(a, b, w, anc_a, anc_b)
    tensors = [a, extra, b]
    a_new, extra_new, b_new = mix_lora(tensors, w, mode="product", anchors=anchors, pairs=[(0, 2)])
    err = lora_product_truncation_error(tensors, w, [(0, 2)], anchors=anchors)
    u, s, vh = torch.linalg.svd(m)
    best = u[:, :, :r] @ torch.diag_embed(s[:, :r]) @ vh[:, :r, :]
    torch.testing.assert_close(b_new @ a_new, best, atol=1e-10, rtol=0)
    tail = (s[:, r:] ** 2).sum(1).sqrt()
    torch.testing.assert_close(err, tail, atol=1e-10, rtol=0)
    torch.testing.assert_close(err, torch.linalg.matrix_norm(m - b_new @ a_new), atol=1e-10, rtol=0)
    assert torch.all(tail > 1e-3)  # the test is not vacuous
    torch.testing.assert_close(b_new.transpose(1, 2) @ b_new, a_new @ a_new.transpose(1, 2), atol=1e-10, rtol=0)
    torch.testing.assert_close(extra_new, mix_lora([extra], w, anchors=anchors[1:2] if anchors else None)[0])


def test_product_error_combines_pairs():
    g = torch.Generator().manual_seed(7)
    n = 3
    w = _random_w(n, g)
    a1, b1 = _lora(n, 2, 5, 4, g)
    a2, b2 = _lora(n, 1, 3, 6, g)
    e1 = lora_product_truncation_error([a1, b1], w, [(0, 1)])
    e2 = lora_product_truncation_error([b2, a2], w, [(1, 0)])
    both = lora_product_truncation_error([a1, b1, b2, a2], w, [(0, 1), (3, 2)])
    torch.testing.assert_close(both, (e1**2 + e2**2).sqrt(), atol=1e-12, rtol=0)


def test_product_shared_anchor_equals_parameters():
    g = torch.Generator().manual_seed(8)
    n, r = 4, 2
    a, b = _lora(n, r, 6, 5, g)
    anc_a, anc_b = _lora(1, r, 6, 5, g)
    anchors = [anc_a.expand(n, -1, -1), anc_b.expand(n, -1, -1)]
    w = _random_w(n, g)
    p = mix_lora([a, b], w, mode="product", pairs=[(0, 1)])
    u = mix_lora([a, b], w, mode="product", pairs=[(0, 1)], anchors=anchors)
    torch.testing.assert_close(u[1] @ u[0], p[1] @ p[0], atol=1e-10, rtol=0)


@pytest.mark.parametrize("mode", ["factors", "product"])
def test_permuting_clients_permutes_output(mode):
    g = torch.Generator().manual_seed(9)
    n, r = 5, 2
    a, b = _lora(n, r, 7, 6, g)
    w = _random_w(n, g)
    perm = torch.randperm(n, generator=g)
    pairs = [(0, 1)] if mode == "product" else None
    out = mix_lora([a, b], w, mode=mode, pairs=pairs)
    out_p = mix_lora([a[perm], b[perm]], w[perm][:, perm], mode=mode, pairs=pairs)
    for o, op in zip(out, out_p):
        torch.testing.assert_close(op, o[perm], atol=1e-10, rtol=0)
    if mode == "product":
        err = lora_product_truncation_error([a, b], w, pairs)
        err_p = lora_product_truncation_error([a[perm], b[perm]], w[perm][:, perm], pairs)
        torch.testing.assert_close(err_p, err[perm], atol=1e-10, rtol=0)


def test_mix_lora_errors():
    a, b = torch.zeros(2, 2, 3), torch.zeros(2, 4, 2)
    w = torch.eye(2)
    cases = [
        (dict(tensors=[a, b], W=w, mode="sum"), "`mode`"),
        (dict(tensors=[a, b], W=torch.eye(3)), r"`tensors\[0\]`"),
        (dict(tensors=[a, b], W=torch.ones(2, 3)), "`W`"),
        (dict(tensors=[a, b], W=w * math.nan), "`W`"),
        (dict(tensors=[], W=w), "`tensors`"),
        (dict(tensors=[a, b], W=w, anchors=[a]), "`anchors`"),
        (dict(tensors=[a, b], W=w, anchors=[a, a]), r"`anchors\[1\]`"),
        (dict(tensors=[a, b], W=w, mode="product"), "`pairs`"),
        (dict(tensors=[a, b], W=w, pairs=[(0, 1)]), "`pairs`"),
        (dict(tensors=[a, b], W=w, mode="product", pairs=[(1, 0)]), "`pairs`"),  # swapped: B is not [N, r, in]
        (dict(tensors=[a, b], W=w, mode="product", pairs=[(0, 2)]), "`pairs`"),
        (dict(tensors=[a, b, a, b], W=w, mode="product", pairs=[(0, 1), (2, 1)]), "`pairs`"),
        (dict(tensors=[a, torch.zeros(2, 4, 3)], W=w, mode="product", pairs=[(0, 1)]), "`pairs`"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            mix_lora(**kwargs)
    with pytest.raises(ValueError, match="`pairs`"):
        lora_product_truncation_error([a, b], w, [])
