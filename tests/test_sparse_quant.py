import json
import math
import os
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


# ---------------------------------------------------------------------------------------------- export callback
def _export_run(tmp_path, callback, max_steps=2, extra=()):
    from lightning.pytorch.loggers import CSVLogger

    from lightning_epfl.datamodules import TextDataModule
    from lightning_epfl.modules import CausalLMModule

    seed_everything(0)
    module = CausalLMModule(config={k: v for k, v in TINY.items() if k != "vocab_size"})
    trainer = Trainer(
        max_steps=max_steps,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        limit_test_batches=1,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=[*extra, callback],
    )
    return module, TextDataModule(block_size=32, batch_size=4), trainer


def test_export_callback_equals_the_functional_transform(tmp_path):
    """At test start the callback applies exactly sparse_quantize_ (same weights, same report), logs the report and
    the logit change, and writes an export that from_pretrained loads to the same logits."""
    import copy

    from transformers import AutoModelForCausalLM

    from lightning_epfl.export import SparseQuantExport
    from lightning_epfl.export.calibration import input_ids_of

    config = SparseQuantConfig(pattern="unstructured", sparsity=0.5, scorer="wanda", calib_samples=4, calib_seq_len=32)
    cb = SparseQuantExport(config, when="test_start", calib_from="val", eval_batches=2, export_dir=str(tmp_path / "sq"))
    module, dm, trainer = _export_run(tmp_path, cb)
    trainer.fit(module, dm)
    assert not cb.done
    dense = copy.deepcopy(module.model).eval()
    calib = list(dm.val_dataloader())
    expected = sparse_quantize_(dense, config, calib)
    check = input_ids_of(next(iter(dm.val_dataloader())))
    with torch.no_grad():
        before = module.model.eval()(input_ids=check).logits
    trainer.test(module, dm, verbose=False)
    assert cb.done and cb.saved_to == str((tmp_path / "sq").resolve())
    for name, param in dense.named_parameters():
        torch.testing.assert_close(module.model.get_parameter(name), param, atol=0, rtol=0)
    for key in ("eps_s", "eps_q", "eps_sq", "excess"):
        assert cb.metrics[f"sparse_quant/{key}"] == pytest.approx(getattr(expected, key), rel=1e-12), key
        assert cb.metrics[f"sparse_quant/{key}"] != 0, key
    assert cb.metrics["sparse_quant/sparsity"] == pytest.approx(expected.sparsity_achieved)
    with torch.no_grad():
        after = module.model(input_ids=check).logits
    assert cb.metrics["sparse_quant/max_abs_dlogit"] == pytest.approx(float((after - before).abs().max()), rel=1e-5)
    assert cb.metrics["quant/ppl_q"] > 1 and cb.metrics["quant/ppl_fp"] > 1
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "sparse_quant/eps_sq" in logged and "quant/ppl_q" in logged
    loaded = AutoModelForCausalLM.from_pretrained(cb.saved_to, local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=check).logits, after, atol=1e-5, rtol=1e-5)
    assert json.loads((tmp_path / "sq" / "sparse_quant_config.json").read_text())["sparse_quant"]["scorer"] == "wanda"


def test_sparse_finetune_then_export_keeps_the_finetuned_mask(tmp_path):
    """SparseFinetune (2:4) during fit, then SparseQuantExport (2:4 magnitude, INT4) at fit end: the mask the export
    derives from the fine-tuned weights is the fine-tune's mask, so sparsity alone adds no error."""
    from lightning_epfl.export import SparseQuantExport

    finetune = SparseFinetune()
    cb = SparseQuantExport({"bits": 4}, when="fit_end", eval_batches=1, export_dir=str(tmp_path / "sq"))
    module, dm, trainer = _export_run(tmp_path, cb, max_steps=3, extra=[finetune])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, dm)
    assert cb.done and cb.metrics["sparse_quant/eps_s"] == 0.0
    assert cb.metrics["sparse_quant/eps_sq"] == pytest.approx(cb.metrics["sparse_quant/eps_q"], rel=0.5)
    for name, mask in finetune.masks.items():
        w = module.model.get_submodule(name).weight
        assert bool((w[~mask.to(w.device)] == 0).all()), name  # pruned stays pruned
        assert _nm_ok(w)


def test_export_callback_checks_before_training(tmp_path):
    from lightning_epfl.export import QuaRotConfig, SparseQuantExport

    module, dm, trainer = _export_run(tmp_path, SparseQuantExport({"pattern": "n:m", "n": 2, "m": 3}))
    with pytest.raises(MisconfigurationException, match=r"SparseQuantExport: .*`m` \(3\) must divide"):
        trainer.fit(module, dm)
    assert trainer.global_step == 0
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    module, dm, trainer = _export_run(tmp_path, SparseQuantExport(export_dir=str(busy)))
    with pytest.raises(MisconfigurationException, match="SparseQuantExport"):
        trainer.fit(module, dm)
    assert trainer.global_step == 0 and (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(MisconfigurationException, match="`config` must be a SparseQuantConfig"):
        SparseQuantExport(QuaRotConfig())
    with pytest.raises(MisconfigurationException, match=r"unknown field\(s\) \['w_bits'\]"):
        SparseQuantExport({"w_bits": 4})
    with pytest.raises(MisconfigurationException, match="`sparsity` must be a number in"):
        SparseQuantExport({"sparsity": 1.5})
    with pytest.raises(MisconfigurationException, match="`when` must be"):
        SparseQuantExport(when="later")
    with pytest.raises(MisconfigurationException, match="`eval_batches`"):
        SparseQuantExport(eval_batches=0)


def test_export_callback_state_skips_a_done_export_with_the_same_config():
    from lightning_epfl.export import SparseQuantExport

    cb = SparseQuantExport({"bits": 8})
    cb.done, cb.metrics = True, {"quant/ppl_q": 3.0}
    same, other = SparseQuantExport(SparseQuantConfig(bits=8)), SparseQuantExport({"bits": 4})
    same.load_state_dict(cb.state_dict())
    other.load_state_dict(cb.state_dict())
    assert same.done and same.metrics == {"quant/ppl_q": 3.0} and not other.done
    assert same.state_key != other.state_key


def test_cli_export_sparse_quant(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lightning_epfl.cli import main
    from lightning_epfl.datamodules.text import ByteTokenizer

    folder = tmp_path / "tiny"
    _llama().save_pretrained(folder)
    ByteTokenizer().save_pretrained(str(folder))
    out = tmp_path / "out"
    main(["export", "sparse-quant", "--model", str(folder), "--output", str(out), "--config.pattern", "unstructured",
          "--config.bits", "3", "--data.block_size", "32", "--eval_batches", "2"])  # fmt: skip
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{") :])
    assert summary["method"] == "sparse-quant" and summary["ppl_q"] > 1 and summary["max_abs_dlogit"] > 0
    assert summary["eps_sq"] > summary["eps_q"] > 0 and summary["sparsity"] == pytest.approx(0.5, abs=0.01)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    w = model.model.layers[0].mlp.up_proj.weight
    assert int((w == 0).sum(1).min()) >= w.shape[1] // 2  # every row half pruned
    assert load_sparse_quantized(out) is not None
    with pytest.raises(SystemExit):
        main(["export", "sparse-quant", "--model", str(folder), "--output", str(tmp_path / "o2"), "--config.n", "5"])
    assert "`n` must satisfy 1 <= n <= m" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "o2").exists()


def test_sparse_quant_example_yaml_runs_on_a_tiny_model(tmp_path):
    """examples/sparse_quant_smollm2.yaml through the LightningCLI, with the pretrained model swapped for a tiny
    one."""
    import os
    from pathlib import Path

    from lightning_epfl.cli import cli_main

    example = Path(__file__).resolve().parents[1] / "examples" / "sparse_quant_smollm2.yaml"
    cli = cli_main([
        "test", "--config", str(example), "--model.init_args.pretrained_path=null",
        "--model.init_args.config={hidden_size: 64, intermediate_size: 128, num_hidden_layers: 1, "
        "num_attention_heads: 4, num_key_value_heads: 2}",
        "--data.init_args.tokenizer_path=null", "--data.init_args.block_size=32", "--trainer.limit_test_batches=1",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks.init_args.eval_batches=1",
    ])  # fmt: skip
    (cb,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "SparseQuantExport"]
    assert isinstance(cb.config, SparseQuantConfig) and cb.config.scorer == "wanda" and cb.config.calib_samples == 16
    assert cb.done and cb.saved_to.startswith(str(tmp_path))
    assert os.path.isfile(os.path.join(cb.saved_to, "model.safetensors"))


def test_stochastic_rounding_is_seeded_per_layer():
    """Same seed: the same export; another seed: another one; every weight lands on one of the two grid points
    around it (block INT4 with the nearest-rounding scale), and the first layer equals block_quantize with a
    generator seeded ``seed + 0``."""
    config = SparseQuantConfig(fmt="int", bits=4, rounding="stochastic", seed=3)
    models = [_llama(), _llama(), _llama()]
    original = _llama().model.layers[0].self_attn.q_proj.weight.detach().clone()
    sparse_quantize_(models[0], config)
    sparse_quantize_(models[1], config)
    sparse_quantize_(models[2], SparseQuantConfig(fmt="int", bits=4, rounding="stochastic", seed=4))
    a, b, c = (m.model.layers[0].self_attn.q_proj.weight for m in models)
    assert torch.equal(a, b) and not torch.equal(a, c)
    mask = magnitude_mask(original, pattern="n:m", n=2, m=4)
    g = torch.Generator().manual_seed(3)
    expected = torch.where(mask, block_quantize(torch.where(mask, original, 0.0), "int", bits=4, block_size=32,
                                                rounding="stochastic", generator=g), 0.0)  # fmt: skip
    torch.testing.assert_close(a, expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="`seed` must be an integer >= 0"):
        SparseQuantConfig(seed=-1)


def test_cli_config_file_and_no_silent_replacement(tmp_path, capsys):
    from lightning_epfl.cli import main
    from lightning_epfl.datamodules.text import ByteTokenizer

    folder = tmp_path / "tiny"
    _llama().save_pretrained(folder)
    ByteTokenizer().save_pretrained(str(folder))
    (tmp_path / "sq.yaml").write_text("pattern: unstructured\nfmt: mxfp\nelement_format: e2m1\n")
    out = tmp_path / "out"
    common = ["--data.block_size", "32", "--eval_batches", "1"]
    main(["export", "sparse-quant", "--model", str(folder), "--output", str(out), "--config", str(tmp_path / "sq.yaml"),
          *common])  # fmt: skip
    saved = json.loads((out / "sparse_quant_config.json").read_text())["sparse_quant"]
    assert saved["pattern"] == "unstructured" and saved["element_format"] == "e2m1"
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["export", "sparse-quant", "--model", str(folder), "--output", str(out), *common])
    assert "already holds an earlier export" in capsys.readouterr().err.strip().splitlines()[-1]
    assert (out / "model.safetensors").read_bytes() == before
    main(["export", "sparse-quant", "--model", str(folder), "--output", str(out), "--overwrite", "true", *common])
    assert json.loads((out / "sparse_quant_config.json").read_text())["sparse_quant"]["pattern"] == "n:m"


def test_resume_after_the_export_exports_again_only_if_trained_further(tmp_path):
    from lightning_epfl.export import SparseQuantExport

    cb = SparseQuantExport({"bits": 4}, when="fit_end", eval_batches=1)
    module, dm, trainer = _export_run(tmp_path, cb, max_steps=2)
    trainer.fit(module, dm)
    first = cb.saved_to
    ckpt = str(tmp_path / "after.ckpt")
    trainer.save_checkpoint(ckpt)
    assert cb.export_step == 2

    same = SparseQuantExport({"bits": 4}, when="test_start", eval_batches=1)
    module2, dm2, trainer2 = _export_run(tmp_path, same)
    trainer2.test(module2, dm2, ckpt_path=ckpt, verbose=False)
    assert same.done and same.export_step == 2 and same.saved_to == first  # skipped: the checkpoint is the export
    assert not os.path.exists(os.path.join(trainer2.log_dir, "sparse_quant"))
    other = SparseQuantExport({"bits": 8}, when="test_start", eval_batches=1)
    module4, dm4, trainer4 = _export_run(tmp_path, other)
    with pytest.raises(MisconfigurationException, match="already sparse-quantized with another config"):
        trainer4.test(module4, dm4, ckpt_path=ckpt, verbose=False)

    further = SparseQuantExport({"bits": 4}, when="fit_end", eval_batches=1)
    module3, dm3, trainer3 = _export_run(tmp_path, further, max_steps=4)
    trainer3.fit(module3, dm3, ckpt_path=ckpt)
    assert further.export_step == 4 and further.saved_to != first and os.path.isdir(first)
    assert further.metrics["sparse_quant/eps_s"] > 0  # training moved the pruned weights: pruned again at step 4
    assert all(_nm_ok(layer.weight) for layer in target_linears(module3.model, further.config).values())


def test_export_dir_holding_an_earlier_export_is_refused(tmp_path):
    from lightning_epfl.export import SparseQuantExport

    target = str(tmp_path / "sq")
    module, dm, trainer = _export_run(tmp_path, SparseQuantExport(export_dir=target, eval_batches=1), max_steps=1)
    trainer.fit(module, dm)
    before = (tmp_path / "sq" / "model.safetensors").read_bytes()
    module, dm, trainer = _export_run(tmp_path, SparseQuantExport(export_dir=target, eval_batches=1), max_steps=1)
    with pytest.raises(MisconfigurationException, match="already holds an earlier export"):
        trainer.fit(module, dm)
    assert trainer.global_step == 0 and (tmp_path / "sq" / "model.safetensors").read_bytes() == before


def test_inconsistent_settings_are_refused_or_warned(tmp_path):
    from lightning_epfl.export import SparseQuantExport

    with pytest.raises(ValueError, match="`element_format` applies to fmt='mxfp' only"):
        SparseQuantConfig(fmt="int", element_format="e2m1")
    with pytest.raises(ValueError, match="scope='tensor' applies to scorer='magnitude' only"):
        SparseQuantConfig(pattern="unstructured", scope="tensor", scorer="wanda")
    with pytest.warns(UserWarning, match=r"skip_modules \['lm-head'\] match no nn.Linear"):
        sparse_quantize_(_llama(), SparseQuantConfig(skip_modules=["lm-head"]))
    from transformers import LlamaConfig, LlamaForCausalLM

    tied = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=True))
    with pytest.warns(UserWarning, match="'lm_head' shares its weight with the input embedding"):
        sparse_quantize_(tied, SparseQuantConfig(skip_modules=[]))
    with pytest.raises(MisconfigurationException, match="takes the mask fields one by one"):
        SparseFinetune(SparseQuantConfig())
    module, dm, trainer = _export_run(
        tmp_path, SparseQuantExport({"pattern": "n:m"}, eval_batches=1), max_steps=1,
        extra=[SparseFinetune(pattern="unstructured")],
    )  # fmt: skip
    with pytest.warns(UserWarning, match="differ from SparseFinetune's"):
        trainer.fit(module, dm)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sparse_quantized(tmp_path / "nowhere")


def test_cli_refuses_a_busy_export_dir_before_the_log_folder(tmp_path, capsys):
    from pathlib import Path

    from lightning_epfl.cli import main

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    example = Path(__file__).resolve().parents[1] / "examples" / "sparse_quant_smollm2.yaml"
    with pytest.raises(SystemExit):
        main(["test", "--config", str(example), "--model.init_args.pretrained_path=null",
              "--data.init_args.tokenizer_path=null", f"--trainer.default_root_dir={tmp_path / 'run'}",
              f"--trainer.callbacks.init_args.export_dir={busy}"])  # fmt: skip
    assert "SparseQuantExport" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("scorer", ["wanda", "sparsegpt"])
def test_padding_is_left_out_of_the_calibration_statistics(scorer):
    """A right-padded batch (mask 0 on the padding) gives the statistics of its unpadded sequences: same result as
    calibrating on each sequence alone."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, 256, (1, 32), generator=g), torch.randint(0, 256, (1, 20), generator=g)
    padded = torch.cat([a, torch.cat([b, torch.zeros(1, 12, dtype=torch.long)], 1)])
    mask = torch.cat([torch.ones(1, 32), torch.cat([torch.ones(1, 20), torch.zeros(1, 12)], 1)]).long()
    config = SparseQuantConfig(pattern="unstructured", scorer=scorer, fmt="none")
    together, alone = _llama(), _llama()
    sparse_quantize_(together, config, [{"input_ids": padded, "attention_mask": mask}])
    sparse_quantize_(alone, config, [{"input_ids": a}, {"input_ids": b}])
    for (name, p), q in zip(together.named_parameters(), alone.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)
    unmasked = _llama()
    sparse_quantize_(unmasked, config, [{"input_ids": padded}])
    assert any(not torch.equal(p, q) for p, q in zip(unmasked.parameters(), alone.parameters()))  # padding would count
