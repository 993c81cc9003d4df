import math
import warnings

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_epfl.callbacks.sparse_finetune import SparseFinetune
from lightning_epfl.export.sparse_quant import (
    SparseQuantConfig,
    load_sparse_quantized,
    save_sparse_quantized,
    sparse_quantize_,
    target_linears,
)
from lightning_epfl.functional.formats import block_quantize
from lightning_epfl.functional.sparsity import magnitude_mask, orthogonality

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _llama(seed=0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY)).to(dtype).eval()


def _calib(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 256, (2, 32), generator=g)} for _ in range(n)]


def _nm_ok(w, n=2, m=4):
    return bool(((w.reshape(w.shape[0], -1, m) != 0).sum(-1) <= n).all())


def test_report_matches_hand_computed_errors():
    model = _llama(dtype=torch.float64)
    name = "model.layers.0.mlp.down_proj"
    w = model.get_submodule(name).weight.detach().clone()
    config = SparseQuantConfig(fmt="int", bits=4, block_size=32)
    report = sparse_quantize_(model, config)

    mask = magnitude_mask(w, pattern="n:m", n=2, m=4)
    q = block_quantize(w, "int", bits=4, block_size=32)
    sq = mask * block_quantize(mask * w, "int", bits=4, block_size=32)
    q_mask = magnitude_mask(q, pattern="n:m", n=2, m=4)
    qs = q_mask * q
    norm = w.norm()
    eps = {
        "eps_s": float((w - mask * w).norm() / norm),
        "eps_q": float((w - q).norm() / norm),
        "eps_sq": float((w - sq).norm() / norm),
        "eps_qs": float((w - qs).norm() / norm),
    }
    layer = report.layers[name]
    for key, value in eps.items():
        assert abs(layer[key] - value) < 1e-12, key
    ref = orthogonality(eps["eps_s"], eps["eps_q"], eps["eps_sq"])
    assert abs(layer["bound"] - ref["bound"]) < 1e-12 and abs(layer["excess"] - ref["excess"]) < 1e-12
    assert torch.equal(model.get_submodule(name).weight, sq)
    # whole-model aggregate: all target weights concatenated
    assert 0 < report.eps_s < 1 and report.bound == pytest.approx(report.eps_s + report.eps_q, abs=1e-15)


def test_exact_2_4_counts_and_lm_head_untouched():
    model = _llama()
    head = model.lm_head.weight.detach().clone()
    report = sparse_quantize_(model, SparseQuantConfig())
    layers = target_linears(model, SparseQuantConfig())
    assert "lm_head" not in layers and len(layers) == 14
    for name, layer in layers.items():
        groups = (layer.weight.reshape(layer.weight.shape[0], -1, 4) != 0).sum(-1)
        assert int(groups.max()) <= 2, name
        assert report.layers[name]["sparsity"] >= 0.5
    assert torch.equal(model.lm_head.weight, head)
    assert report.sparsity_achieved >= 0.5 and set(report.timings) == {"sparsify_quantize"}


@pytest.mark.parametrize("bits", [3, 4])
def test_sq_beats_qs_on_model_weights(bits):
    report = sparse_quantize_(_llama(), SparseQuantConfig(fmt="int", bits=bits, block_size=32))
    assert report.eps_sq <= report.eps_qs
    assert report.eps_sq >= report.eps_s  # quantization adds error on top of pruning


def test_qs_order_warns_and_writes_qs():
    model = _llama()
    with pytest.warns(UserWarning, match="ablation"):
        report = sparse_quantize_(model, SparseQuantConfig(order="QS"))
    for name, layer in target_linears(model, SparseQuantConfig()).items():
        assert _nm_ok(layer.weight), name
        assert report.layers[name]["eps_qs"] > 0


@torch.no_grad()
def _layer_output_error(dense, pruned, name, calib):
    captured = []
    handle = dense.get_submodule(name).register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    for batch in calib:
        dense(input_ids=batch["input_ids"])
    handle.remove()
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured])
    ref = dense.get_submodule(name)(x)
    return float((pruned.get_submodule(name)(x) - ref).norm() / ref.norm())


@pytest.mark.parametrize("scorer", ["wanda", "sparsegpt"])
def test_calibrated_scorers_beat_magnitude_on_calibration_data(scorer):
    calib = _calib()
    dense = _llama()
    # make input features unequal so that calibration-aware scores matter
    with torch.no_grad():
        for layer in dense.model.layers:
            layer.input_layernorm.weight.copy_(torch.linspace(0.1, 3.0, 64))
    mag, cal = _llama(), _llama()
    mag.load_state_dict(dense.state_dict())
    cal.load_state_dict(dense.state_dict())
    config = dict(fmt="none")
    sparse_quantize_(mag, SparseQuantConfig(**config))
    report = sparse_quantize_(cal, SparseQuantConfig(scorer=scorer, **config), calib_batches=calib)
    assert "calibrate" in report.timings
    names = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    errors = [(_layer_output_error(dense, cal, n, calib), _layer_output_error(dense, mag, n, calib)) for n in names]
    assert all(c <= m for c, m in errors), errors
    for layer in target_linears(cal, SparseQuantConfig()).values():
        assert _nm_ok(layer.weight)


def test_sparsegpt_with_quantization_runs():
    model = _llama()
    report = sparse_quantize_(model, SparseQuantConfig(scorer="sparsegpt", bits=4), calib_batches=_calib(2))
    assert all(math.isfinite(v["eps_sq"]) for v in report.layers.values())
    assert report.sparsity_achieved >= 0.5


def test_save_load_identical_logits(tmp_path):
    model = _llama()
    config = SparseQuantConfig(bits=4)
    report = sparse_quantize_(model, config)
    path = save_sparse_quantized(model, tmp_path / "out", config, report)
    loaded = load_sparse_quantized(path)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert (tmp_path / "out" / "sparse_quant_config.json").is_file()
    with pytest.raises(FileNotFoundError):
        load_sparse_quantized(tmp_path)


def test_bert_encoder(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    ).eval()
    config = SparseQuantConfig(skip_modules=[], scorer="wanda")
    report = sparse_quantize_(bert, config, calib_batches=[torch.randint(0, 128, (2, 16))])
    layers = target_linears(bert, config)
    assert "pooler.dense" in layers and set(report.layers) == set(layers)
    assert all(_nm_ok(layer.weight) for layer in layers.values())
    save_sparse_quantized(bert, tmp_path / "bert", config, report)
    loaded = load_sparse_quantized(tmp_path / "bert", model_class=BertModel)
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.equal(bert(input_ids=ids).last_hidden_state, loaded(input_ids=ids).last_hidden_state)


def test_config_roundtrip_and_errors():
    config = SparseQuantConfig(pattern="unstructured", sparsity=0.3, fmt="mxfp", element_format="e2m1")
    assert SparseQuantConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown field"):
        SparseQuantConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="`n`"):
        SparseQuantConfig(n=5, m=4)
    with pytest.raises(ValueError, match="`sparsity`"):
        SparseQuantConfig(sparsity=1.0)
    with pytest.raises(ValueError, match="`fmt`"):
        SparseQuantConfig(fmt="fp8")
    with pytest.raises(ValueError, match="element_format"):
        SparseQuantConfig(fmt="mxfp")
    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="block_size"):
        sparse_quantize_(model, SparseQuantConfig(block_size=48))
    with pytest.raises(ValueError, match="`m`"):
        sparse_quantize_(model, SparseQuantConfig(m=48, n=2, fmt="none"))
    with pytest.raises(ValueError, match="calibration"):
        sparse_quantize_(model, SparseQuantConfig(scorer="wanda"), calib_batches=[])
    with pytest.raises(ValueError, match="calibration"):
        sparse_quantize_(model, SparseQuantConfig(scorer="sparsegpt"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------- callback
def _fit(tmp_path, callback, max_steps=3, ckpt_path=None):
    from lightning_epfl.datamodules import TextDataModule
    from lightning_epfl.modules import CausalLMModule

    seed_everything(0)
    module = CausalLMModule(
        config={k: v for k, v in TINY.items() if k != "vocab_size"},
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
    )
    trainer = Trainer(
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    trainer.fit(module, TextDataModule(block_size=32, batch_size=4), ckpt_path=ckpt_path)
    return trainer, module


def test_sparse_finetune_keeps_masks(tmp_path):
    callback = SparseFinetune()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer, module = _fit(tmp_path, callback)
    assert trainer.global_step == 3
    layers = target_linears(module.model, SparseQuantConfig())
    assert set(callback.masks) == set(layers) and "lm_head" not in callback.masks
    for name, layer in layers.items():
        w = layer.weight.detach()
        assert torch.equal(w != 0, callback.masks[name].to(w.device)), name  # exactly the kept weights are nonzero
        assert int((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max()) <= 2
    assert float(trainer.callback_metrics["sparsity/achieved"]) == pytest.approx(0.5)

    state = callback.state_dict()
    fresh = SparseFinetune()
    fresh.load_state_dict(state)
    assert set(fresh.masks) == set(state["masks"])
    assert all(torch.equal(fresh.masks[k], state["masks"][k]) for k in state["masks"])
    assert all(m.dtype == torch.bool for m in state["masks"].values())


def test_sparse_finetune_resume_reuses_masks(tmp_path):
    callback = SparseFinetune()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer, _ = _fit(tmp_path, callback, max_steps=2)
        ckpt = str(tmp_path / "a.ckpt")
        trainer.save_checkpoint(ckpt)
        resumed = SparseFinetune()
        _, module = _fit(tmp_path, resumed, max_steps=3, ckpt_path=ckpt)
    for name, mask in callback.masks.items():
        assert torch.equal(resumed.masks[name].cpu(), mask.cpu()), name
        w = module.model.get_submodule(name).weight
        assert torch.equal(w != 0, mask.to(w.device))


def test_sparse_finetune_bad_arguments():
    with pytest.raises(MisconfigurationException, match="`n`"):
        SparseFinetune(n=5, m=4)
    with pytest.raises(MisconfigurationException, match="`sparsity`"):
        SparseFinetune(sparsity=1.0)
    with pytest.raises(MisconfigurationException, match="`pattern`"):
        SparseFinetune(pattern="2:4")
    with pytest.raises(MisconfigurationException, match="`scope`"):
        SparseFinetune(scope="column")
