"""Routing math of the mixture-of-experts layers (lightning_epfl.functional.moe) and the RoutingNMI metric."""

import math

import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from lightning_epfl.functional.moe import (
    BYTE_TOKEN_CLASSES,
    byte_token_classes,
    capacity_slots,
    expert_load,
    load_balancing_loss,
    moe_dispatch,
    normalized_mutual_information,
    pool_router_logits,
    route_top_k,
    router_statistics,
    router_z_loss,
)
from lightning_epfl.metrics import RoutingNMI


def _untied_logits(u, e, dtype=torch.float32, seed=0):
    """Random logits whose entries are far apart (no top-k ties)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randperm(u * e, generator=g).reshape(u, e).to(dtype) / (u * e)) * 4 - 2


# ---------------------------------------------------------------------------------------------------- route_top_k
def test_route_top_k_weights_k1_raw_probability_and_k2_renormalized():
    """k=1 keeps g = p_top < 1; k>=2 renormalizes to sum 1 (a softmax over the chosen logits); Switch keeps p_I."""
    logits = _untied_logits(7, 4)
    p = torch.softmax(logits, -1)
    probs, w1, i1 = route_top_k(logits, 1)
    torch.testing.assert_close(probs, p)
    torch.testing.assert_close(w1[:, 0], p.max(-1).values)
    assert (w1 < 1).all() and torch.equal(i1[:, 0], p.argmax(-1))
    _, w2, i2 = route_top_k(logits, 2)
    torch.testing.assert_close(w2.sum(-1), torch.ones(7), atol=1e-6, rtol=0)
    torch.testing.assert_close(w2, torch.softmax(logits.gather(1, i2), -1))
    _, w2s, i2s = route_top_k(logits, 2, normalize=False)
    torch.testing.assert_close(w2s, p.gather(1, i2s))
    _, w1n, _ = route_top_k(logits, 1, normalize=True)
    torch.testing.assert_close(w1n, w1)  # k=1 is never renormalized


def test_route_top_k_dtypes_and_errors():
    """Half logits are routed in float32, double stays double; top_k outside 1..E raises."""
    probs, _, _ = route_top_k(_untied_logits(3, 4).half(), 2)
    assert probs.dtype == torch.float32
    probs, w, _ = route_top_k(_untied_logits(3, 4, torch.float64), 2)
    assert probs.dtype == torch.float64 and w.dtype == torch.float64
    with pytest.raises(ValueError, match="top_k"):
        route_top_k(_untied_logits(3, 4), 5)
    with pytest.raises(ValueError, match="top_k"):
        route_top_k(_untied_logits(3, 4), 0)
    with pytest.raises(ValueError, match=r"\[U, E\]|2 dims"):
        route_top_k(torch.zeros(2, 3, 4), 1)


# ---------------------------------------------------------------------------------------------------- pooling
def _pool_loop(h, pooling, mask=None, m=None):
    b, t, e = h.shape
    mask = torch.ones(b, t, dtype=torch.bool) if mask is None else mask.bool()
    out = torch.zeros_like(h)
    for i in range(b):
        for s in range(t):
            last = t - 1 if pooling == "mean" else (min(s, m - 1) if pooling == "prefix" else s)
            rows = [h[i, r] for r in range(last + 1) if mask[i, r]]
            out[i, s] = torch.stack(rows).mean(0) if rows else torch.zeros(e, dtype=h.dtype)
    return out


@pytest.mark.parametrize("pooling", ["mean", "causal_mean", "prefix"])
def test_pool_router_logits_matches_loop_with_left_padding(pooling):
    """Pooled logits equal a per-position loop (fp64, 1e-12), padding excluded."""
    h = torch.randn(3, 6, 4, dtype=torch.float64)
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    m = 3 if pooling == "prefix" else None
    for msk in (None, mask):
        got = pool_router_logits(h, pooling, msk, prefix_len=m)
        torch.testing.assert_close(got, _pool_loop(h, pooling, msk, m), atol=1e-12, rtol=0)


def test_pool_router_logits_errors():
    h = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="pooling"):
        pool_router_logits(h, "max")
    with pytest.raises(ValueError, match="prefix_len"):
        pool_router_logits(h, "prefix")
    with pytest.raises(ValueError, match="mask"):
        pool_router_logits(h, "mean", torch.ones(2, 4))


# ---------------------------------------------------------------------------------------------------- aux losses
def test_load_balancing_loss_closed_forms():
    """Uniform + round robin -> 1; one-hot collapse -> E; the worked top-1 example -> 2.6."""
    e, u = 4, 8
    uniform = torch.full((u, e), 1 / e)
    rr = torch.arange(u)[:, None] % e
    assert load_balancing_loss(uniform, rr, e).item() == pytest.approx(1.0, abs=1e-7)
    rr2 = torch.stack([torch.arange(u) % e, (torch.arange(u) + 1) % e], 1)
    assert load_balancing_loss(uniform, rr2, e).item() == pytest.approx(1.0, abs=1e-7)
    collapsed = torch.zeros(u, e)
    collapsed[:, 2] = 1
    assert load_balancing_loss(collapsed, torch.full((u, 1), 2), e).item() == pytest.approx(e, abs=1e-6)
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1]])
    assert load_balancing_loss(probs, torch.zeros(2, 1, dtype=torch.long), 4).item() == pytest.approx(2.6, abs=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
def test_load_balancing_loss_equals_transformers_over_k(top_k):
    """Equals transformers' load_balancing_loss_func / k (one layer), with and without an attention mask."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    e, b, t = 6, 3, 5
    logits = _untied_logits(b * t, e, seed=3)
    probs, _, idx = route_top_k(logits, top_k)
    ref = load_balancing_loss_func((logits,), e, top_k) / top_k
    torch.testing.assert_close(load_balancing_loss(probs, idx, e), ref, rtol=1e-5, atol=0)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, :2] = 0
    mask[2, 4:] = 0
    ref_m = load_balancing_loss_func((logits,), e, top_k, attention_mask=mask) / top_k
    torch.testing.assert_close(load_balancing_loss(probs, idx, e, mask.reshape(-1)), ref_m, rtol=1e-5, atol=0)


def test_aux_losses_ignore_masked_units():
    """Appending masked units changes neither loss nor the load."""
    logits = _untied_logits(5, 4)
    probs, _, idx = route_top_k(logits, 2)
    junk = torch.randn(3, 4) * 10
    jp, _, ji = route_top_k(junk, 2)
    mask = torch.tensor([1] * 5 + [0] * 3).bool()
    cat_p, cat_i, cat_l = torch.cat([probs, jp]), torch.cat([idx, ji]), torch.cat([logits, junk])
    torch.testing.assert_close(load_balancing_loss(cat_p, cat_i, 4, mask), load_balancing_loss(probs, idx, 4))
    torch.testing.assert_close(router_z_loss(cat_l, mask), router_z_loss(logits))
    torch.testing.assert_close(expert_load(cat_i, 4, mask), expert_load(idx, 4))


def test_router_z_loss_closed_form_and_load():
    """[[0, 0], [ln 3, 0]] -> ((ln 2)^2 + (ln 4)^2) / 2 = 1.2011325; loads are assignment fractions."""
    z = router_z_loss(torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]]))
    assert z.item() == pytest.approx(1.2011325, abs=1e-6)
    load = expert_load(torch.tensor([[0, 1], [0, 2], [0, 1]]), 4)
    torch.testing.assert_close(load, torch.tensor([3, 2, 1, 0]) / 6.0)
    with pytest.raises(ValueError, match="indices"):
        expert_load(torch.tensor([[4]]), 4)


def test_router_statistics_agree_with_the_separate_functions():
    """One-pass statistics equal load_balancing_loss, router_z_loss, expert_load and the entropy of softmax(h)."""
    logits = _untied_logits(10, 5, torch.float64, seed=4)
    probs, _, idx = route_top_k(logits, 2)
    for mask in (None, torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1, 1]).bool()):
        got = router_statistics(probs, idx, 5, logits, mask)
        torch.testing.assert_close(got["lb"], load_balancing_loss(probs, idx, 5, mask), rtol=1e-12, atol=0)
        torch.testing.assert_close(got["z"], router_z_loss(logits, mask), rtol=1e-12, atol=0)
        torch.testing.assert_close(got["load"], expert_load(idx, 5, mask))
        keep = torch.ones(10, dtype=torch.bool) if mask is None else mask
        entropy = -(probs * probs.log()).sum(-1)[keep].mean()
        torch.testing.assert_close(got["entropy"], entropy, rtol=1e-10, atol=0)
        torch.testing.assert_close(got["mean_probs"], probs[keep].mean(0))
        no_logits = router_statistics(probs, idx, 5, None, mask)
        assert no_logits["z"].item() == 0.0
        torch.testing.assert_close(no_logits["entropy"], entropy, rtol=1e-10, atol=0)


# ---------------------------------------------------------------------------------------------------- dispatch
def _experts(e, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(d, d, generator=g, dtype=dtype) for _ in range(e)]
    return [lambda x, w=w: torch.tanh(x @ w) for w in ws]


def test_moe_dispatch_equals_row_loop_and_grouped_callable():
    """Dropless dispatch equals sum_j g_j E_{I_j}(x_n) per row; a grouped callable gives the same."""
    n, d, e, k = 9, 5, 4, 2
    x = torch.randn(n, d, dtype=torch.float64)
    probs, w, idx = route_top_k(_untied_logits(n, e, torch.float64), k)
    experts = _experts(e, d, dtype=torch.float64)
    ref = torch.stack([sum(w[r, j] * experts[idx[r, j]](x[r : r + 1])[0] for j in range(k)) for r in range(n)])
    out, kept = moe_dispatch(x, idx, w, experts)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    assert kept.all()

    def grouped(rows, counts):
        return torch.cat([experts[i](chunk) for i, chunk in enumerate(rows.split(counts))])

    grouped.num_experts = e
    out2, _ = moe_dispatch(x, idx, w, grouped)
    torch.testing.assert_close(out2, ref, atol=1e-12, rtol=0)


def test_moe_dispatch_capacity_example_and_fill_order():
    """4 tokens all to expert 0, E=2, k=1, cf=1 -> C=2: tokens 0,1 kept, 2,3 zero rows (dropped fraction 0.5)."""
    x = torch.randn(4, 3)
    idx = torch.zeros(4, 1, dtype=torch.long)
    w = torch.full((4, 1), 0.5)
    experts = [lambda r: r * 2.0, lambda r: r * 3.0]
    cap = capacity_slots(1.0, 1, 4, 2)
    assert cap == 2
    out, kept = moe_dispatch(x, idx, w, experts, capacity=cap)
    assert kept[:, 0].tolist() == [True, True, False, False]
    assert 1 - kept.float().mean().item() == 0.5
    torch.testing.assert_close(out[:2], x[:2])
    assert torch.equal(out[2:], torch.zeros(2, 3))
    # k=2: all first choices (in position order) are placed before any second choice
    idx2 = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]])
    _, kept2 = moe_dispatch(x, idx2, torch.full((4, 2), 0.5), experts, capacity=2)
    assert kept2[:, 0].all() and not kept2[:, 1].any()
    _, kept3 = moe_dispatch(x, idx2, torch.full((4, 2), 0.5), experts, capacity=3)
    assert kept3[:, 0].all() and kept3[:, 1].tolist() == [True, False, True, False]  # the 3rd slot: earliest row


def test_moe_dispatch_mask_and_errors():
    """Masked rows are not computed (zero output, not kept) and take no capacity."""
    x = torch.randn(4, 3)
    idx = torch.zeros(4, 1, dtype=torch.long)
    w = torch.ones(4, 1)
    mask = torch.tensor([False, True, False, True])
    out, kept = moe_dispatch(x, idx, w, [lambda r: r + 1.0], capacity=2, mask=mask)
    assert kept[:, 0].tolist() == [False, True, False, True]
    torch.testing.assert_close(out[mask], x[mask] + 1)
    assert torch.equal(out[~mask], torch.zeros(2, 3))
    with pytest.raises(ValueError, match="capacity"):
        moe_dispatch(x, idx, w, [lambda r: r], capacity=0)
    with pytest.raises(ValueError, match="capacity_factor"):
        capacity_slots(0.0, 1, 4, 2)
    with pytest.raises(ValueError, match="shape"):
        moe_dispatch(x, idx[:3], w[:3], [lambda r: r])


# ---------------------------------------------------------------------------------------------------- NMI
def _labels_from_table(table):
    a, b = [], []
    for i, row in enumerate(table):
        for j, c in enumerate(row):
            a += [i] * c
            b += [j] * c
    return a, b


@pytest.mark.parametrize(
    "table",
    [
        [[8, 2], [1, 9]],
        [[5, 0, 0], [0, 3, 0], [0, 0, 7]],
        [[2, 4, 6], [1, 2, 3]],
        [[3, 1, 0, 2], [0, 0, 0, 0], [1, 5, 2, 0]],
    ],
)
def test_nmi_equals_sklearn(table):
    """Contingency NMI equals sklearn's normalized_mutual_info_score of the label vectors (1e-6)."""
    a, b = _labels_from_table(table)
    ours = normalized_mutual_information(torch.tensor(table)).item()
    assert ours == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-6)


def test_nmi_closed_forms_and_random_tables():
    """[[8,2],[1,9]] -> 0.398753, diagonal -> 1, product table -> 0; random tables match sklearn."""
    assert normalized_mutual_information(torch.tensor([[8, 2], [1, 9]])).item() == pytest.approx(0.398753, abs=1e-6)
    assert normalized_mutual_information(torch.diag(torch.tensor([3, 4, 5]))).item() == pytest.approx(1.0, abs=1e-12)
    outer = torch.outer(torch.tensor([1, 2, 3]), torch.tensor([2, 5]))
    assert normalized_mutual_information(outer).item() == pytest.approx(0.0, abs=1e-12)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        table = torch.randint(0, 6, (4, 7), generator=g)
        a, b = _labels_from_table(table.tolist())
        ref = normalized_mutual_info_score(a, b)
        assert normalized_mutual_information(table).item() == pytest.approx(ref, abs=1e-6)


def test_routing_nmi_metric_sums_states_like_processes():
    """RoutingNMI over two merged shards equals sklearn on all pairs; masks drop pairs; bad input raises."""
    g = torch.Generator().manual_seed(1)
    experts = torch.randint(0, 4, (2, 6, 10), generator=g)
    labels = (experts + torch.randint(0, 2, (2, 6, 10), generator=g)) % 3
    mask = torch.rand(2, 6, 10, generator=g) > 0.2
    m1, m2 = RoutingNMI(4, 3), RoutingNMI(4, 3)
    m1.update(experts[0], labels[0], mask[0])
    m2.update(experts[1], labels[1], mask[1])
    m1.merge_state(m2)
    ref = normalized_mutual_info_score(labels[mask].tolist(), experts[mask].tolist())
    assert m1.compute().item() == pytest.approx(ref, abs=1e-6)
    assert int(m1.contingency.sum()) == int(mask.sum())
    with pytest.raises(ValueError, match="labels"):
        m1.update(experts[0], labels[0] + 3)
    with pytest.raises(TypeError):
        m1.update(experts[0].float(), labels[0])


def test_byte_token_classes():
    """The 7 byte classes, in BYTE_TOKEN_CLASSES order."""
    text = "aZ5 \n!é\t"
    got = byte_token_classes(torch.tensor(list(text.encode())))
    names = [BYTE_TOKEN_CLASSES[i] for i in got.tolist()]
    assert names == ["lower", "upper", "digit", "space", "newline", "punctuation", "other", "other", "space"]
    with pytest.raises(ValueError, match="0..255"):
        byte_token_classes(torch.tensor([256]))
