"""TrustWeighted on the collaborative core: schedule, agreement with the baselines, LoRA-only updates, adapter
files, batched vs looped clients, resume, the text domains, and bad input."""

from __future__ import annotations

import json
import math
import os
from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_epfl.datamodules import FederatedTextDataModule
from lightning_epfl.datamodules.domains import domain_documents
from lightning_epfl.modules import CausalLMModule
from lightning_epfl.strategies import (
    CollaborativeStrategy,
    FedAvg,
    Local,
    Oracle,
    TrustWeighted,
    export_client_adapter,
    load_client_adapters,
)
from lightning_epfl.strategies.collaborative.trust_weighted import group_mass, peer_group_mass

TINY = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2}


def _data(n_clients: int = 4, **kw) -> FederatedTextDataModule:
    args = dict(
        n_clients=n_clients, domains=["prose", "code"], block_size=16, batch_size=2, domain_chars=6000,
        steps_per_epoch=4, seed=0,
    )  # fmt: skip
    return FederatedTextDataModule(**{**args, **kw})


def _module(r: int = 2, dropout: float = 0.0) -> CausalLMModule:
    torch.manual_seed(0)
    return CausalLMModule(
        config=TINY, lora={"r": r, "lora_alpha": 4, "lora_dropout": dropout}, optimizer=partial(torch.optim.SGD, lr=0.5)
    )


def _fit(root, algorithm, steps: int = 4, ckpt_path=None, dm=None, devices: int = 1, **strategy_kw) -> L.Trainer:
    strategy = CollaborativeStrategy(algorithm=algorithm, seed=1, client_init="independent", **strategy_kw)
    trainer = L.Trainer(
        default_root_dir=root, max_steps=steps, strategy=strategy, accelerator="cpu", devices=devices,
        precision="64-true", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(_module(), dm if dm is not None else _data(), ckpt_path=ckpt_path)
    return trainer


def _fast(trust: str, **kw) -> TrustWeighted:
    args = dict(trust=trust, warmup_steps=2, communicate_every=1, reference_batches=1, validation_batches=1,
                prediction_top_logits=8)  # fmt: skip
    return TrustWeighted(**{**args, **kw})


# ----------------------------------------------------------------------------------------------------- schedule
def test_rounds_happen_after_warmup_every_k_steps():
    """warmup 4, every 2, 10 steps: rounds after steps {4, 6, 8, 10} (1-based); warmup 0: k, 2k, ..."""
    algo = TrustWeighted(trust="fedavg", warmup_steps=4, communicate_every=2)
    assert [s + 1 for s in range(10) if algo.is_round(s)] == [4, 6, 8, 10]
    algo = TrustWeighted(trust="fedavg", warmup_steps=0, communicate_every=3)
    assert [s + 1 for s in range(10) if algo.is_round(s)] == [3, 6, 9]


def test_group_mass_hand_computed():
    W = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]], dtype=torch.float64)
    clusters = torch.tensor([0, 0, 1])
    # self included: rows 0.8, 0.7, 0.5; others only: 0.3/0.5, 0.1/0.4, 0/0.5
    assert group_mass(W, clusters) == pytest.approx((0.8 + 0.7 + 0.5) / 3, abs=1e-12)
    assert peer_group_mass(W, clusters) == pytest.approx((0.6 + 0.25 + 0.0) / 3, abs=1e-12)
    assert math.isnan(peer_group_mass(torch.eye(3, dtype=torch.float64), clusters))  # local: undefined


# ----------------------------------------------------------------------------------------------------- baselines
def test_fedavg_local_and_static_equal_the_core_baselines(tmp_path):
    """trust='fedavg' (warmup 0, every k) == FedAvg(local_steps=k); 'local' == Local(); 'static' with the one-hot
    domain mixture == Oracle (FedAvg inside the true domains)."""
    X = {}
    for name, algo in {
        "fedavg": TrustWeighted(trust="fedavg", warmup_steps=0, communicate_every=2),
        "FedAvg": FedAvg(local_steps=2),
        "local": TrustWeighted(trust="local", warmup_steps=0, communicate_every=1),
        "Local": Local(),
        "static": TrustWeighted(trust="static", warmup_steps=0, communicate_every=1),
        "Oracle": Oracle(),
    }.items():
        X[name] = _fit(tmp_path / name, algo, steps=4).strategy.stack.X.detach().clone()
    torch.testing.assert_close(X["fedavg"], X["FedAvg"], atol=1e-12, rtol=0)
    torch.testing.assert_close(X["local"], X["Local"], atol=0, rtol=0)
    torch.testing.assert_close(X["static"], X["Oracle"], atol=1e-12, rtol=0)
    assert not torch.allclose(X["fedavg"], X["local"])  # averaging changed something
    torch.testing.assert_close(X["fedavg"][0], X["fedavg"][3], atol=1e-12, rtol=0)  # step 4 ends with a round
    torch.testing.assert_close(X["static"][0], X["static"][2], atol=1e-12, rtol=0)  # clients 0, 2: prose
    assert not torch.allclose(X["static"][0], X["static"][1])


# ----------------------------------------------------------------------------------------------------- LoRA only
def test_only_lora_tensors_change_and_adapters_export_and_reload(tmp_path):
    """Base bit-identical; communicated size = sum r (in + out) over the adapted linears; client i's exported
    adapter (peft format) reloads on a fresh base with logits identical to the strategy's client i; and
    `load_client_adapters` puts exported files back into the rows."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    module = _module()
    dm = _data()

    base = {}

    class Snapshot(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            base.update({n: p.detach().clone() for n, p in pl_module.named_parameters() if not p.requires_grad})

    strategy = CollaborativeStrategy(algorithm=_fast("prediction"), seed=1, client_init="independent")
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=4, strategy=strategy, accelerator="cpu",
                        precision="64-true", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[Snapshot()])  # fmt: skip
    trainer.fit(module, dm)
    assert len(base) > 5
    for n, p in module.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base[n]), n
    r = 2
    linears = [m for n, m in module.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    expected = sum(r * (m.base_layer.in_features + m.base_layer.out_features) for m in linears)
    assert strategy.stack.d_comm == strategy.stack.d == expected and len(linears) == 7
    assert float(trainer.callback_metrics["comm/bytes"]) > 2 * expected * 8  # two rounds of adapters + top logits

    out = export_client_adapter(strategy, 2, tmp_path / "client2")
    assert sorted(os.listdir(out)) == [".lightning-epfl-export", "adapter_config.json", "adapter_model.safetensors"]
    assert json.load(open(os.path.join(out, "adapter_config.json")))["r"] == r
    cfg = dict(module._hf_config)
    fresh = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).double()
    frozen = {k: v for k, v in module.model.state_dict().items() if "lora_" not in k}
    fresh.load_state_dict({k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in frozen.items()})
    reloaded = PeftModel.from_pretrained(fresh, out).double().eval()
    ids = dm.train_batch(0)["input_ids"][0]
    with torch.no_grad():
        want = strategy.stack.call("client_logits", strategy.stack.X, {"input_ids": ids.expand(4, *ids.shape)})[2]
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)

    # round trip into the rows: export every client, scramble the rows, load them back
    before = strategy.stack.X.detach().clone()
    paths = [export_client_adapter(strategy, i, tmp_path / f"c{i}") for i in range(4)]
    with torch.no_grad():
        strategy.stack.X.zero_()
    load_client_adapters(strategy, paths)
    torch.testing.assert_close(strategy.stack.X, before, atol=0, rtol=0)
    # an adapter of another rank is refused with the rank named
    cfg_path = os.path.join(paths[1], "adapter_config.json")
    config = json.load(open(cfg_path))
    config["r"] = 4
    json.dump(config, open(cfg_path, "w"))
    with pytest.raises(MisconfigurationException, match="client 1's adapter .* rank 4.*rank 2"):
        load_client_adapters(strategy, paths)
    with pytest.raises(MisconfigurationException, match="one adapter folder per client"):
        load_client_adapters(strategy, paths[:2])


# ----------------------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("trust", ["weight_similarity", "validation", "prediction"])
def test_batched_clients_equal_looped_clients(tmp_path, trust):
    """execution='vmap' (all clients through the frozen base in one call) == 'loop': same W and adapters."""
    runs = {}
    for execution in ("vmap", "loop"):
        tr = _fit(tmp_path / execution, _fast(trust), steps=4, execution=execution)
        runs[execution] = (tr.strategy.stack.X.detach().clone(), tr.strategy.algorithm.W.clone())
    torch.testing.assert_close(runs["vmap"][1], runs["loop"][1], atol=1e-10, rtol=0)
    torch.testing.assert_close(runs["vmap"][0], runs["loop"][0], atol=1e-10, rtol=0)
    W = runs["vmap"][1]
    assert torch.allclose(W.sum(1), torch.ones(4, dtype=W.dtype)) and W.min() >= 0
    assert not torch.allclose(W, torch.full_like(W, 0.25))  # trust is not uniform


@pytest.mark.parametrize(("trust", "extra"), [("prediction", {}), ("validation", {"mix": "updates"}),
                                              ("weight_similarity", {"lora_aggregation": "product"})])  # fmt: skip
def test_resume_mid_run_equals_straight_run(tmp_path, trust, extra):
    """A checkpoint after step 3 resumed to step 6 equals a straight run (W, rounds, anchors, adapters)."""
    first = _fit(tmp_path / "a", _fast(trust, **extra), steps=3)
    path = tmp_path / "mid.ckpt"
    first.save_checkpoint(path)
    resumed = _fit(tmp_path / "b", _fast(trust, **extra), steps=6, ckpt_path=str(path))
    straight = _fit(tmp_path / "c", _fast(trust, **extra), steps=6)
    torch.testing.assert_close(resumed.strategy.stack.X, straight.strategy.stack.X, atol=1e-12, rtol=0)
    torch.testing.assert_close(resumed.strategy.algorithm.W, straight.strategy.algorithm.W, atol=1e-12, rtol=0)
    assert resumed.strategy.algorithm.rounds == straight.strategy.algorithm.rounds == 5


def test_updates_mode_with_a_shared_anchor_equals_parameters_mode(tmp_path):
    """mix='updates' from a common start (client_init='same': every anchor the same point) equals 'parameters' at
    the first round."""
    X = {}
    for mix in ("parameters", "updates"):
        algo = TrustWeighted(trust="fedavg", warmup_steps=2, communicate_every=5, mix=mix)
        strategy = CollaborativeStrategy(algorithm=algo, seed=1, client_init="same")
        trainer = L.Trainer(default_root_dir=tmp_path / mix, max_steps=2, strategy=strategy, accelerator="cpu",
                            precision="64-true", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0)  # fmt: skip
        trainer.fit(_module(), _data())
        X[mix] = strategy.stack.X.detach().clone()
    torch.testing.assert_close(X["updates"], X["parameters"], atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------------- data
def test_domains_split_mixture_reference_and_validation_batches():
    """Clients get their domain's text (mixed: 75/25 of characters), true clusters and mixture follow; the reference
    set is held out of every client; trust validation batches are fixed within a round and differ across rounds."""
    dm = FederatedTextDataModule(n_clients=4, domains=["prose", "code"], domain_split="mixed", block_size=16,
                                 batch_size=2, domain_chars=20000)  # fmt: skip
    docs = dm.client_documents()
    assert dm.true_clusters == [0, 1, 0, 1]
    want = [[0.75, 0.25], [0.25, 0.75], [0.75, 0.25], [0.25, 0.75]]
    assert all(a == pytest.approx(b, abs=0.06) for a, b in zip(dm.client_mixture, want))  # pieces of ~600 chars
    reference = set(dm._reference_docs)
    assert reference and not any(d in reference for client in docs for d in client)
    code = set(domain_documents("code", 20000, seed=1, piece_chars=625))  # domain 1, pieces of 20000 / (8 x 4)
    share = [sum(len(d) for d in c if d in code) / sum(len(d) for d in c) for c in docs]
    assert share == pytest.approx([0.25, 0.75, 0.25, 0.75], abs=0.1)
    dm.setup()
    a, b = dm.validation_batches(1, 2, round=3), dm.validation_batches(1, 2, round=3)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    c = dm.validation_batches(1, 2, round=4)
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))
    ref = dm.reference_batches(2)
    assert len(ref) == 2 and ref[0]["input_ids"].shape == (2, 16)
    assert torch.equal(ref[1]["input_ids"], dm.reference_batches(2)[1]["input_ids"])


def test_missing_german_catalogs_skip_the_domain_with_a_warning(monkeypatch, tmp_path):
    import lightning_epfl.datamodules.domains as domains

    monkeypatch.setattr(domains, "GERMAN_CATALOGS", str(tmp_path / "none"))
    dm = FederatedTextDataModule(n_clients=2, domains=["prose", "german"], block_size=16, batch_size=2,
                                 domain_chars=5000)  # fmt: skip
    with pytest.warns(UserWarning, match="domain 'german' is not available"):
        dm.setup()
    assert dm.domain_names == ["prose"] and dm.true_clusters == [0, 0]


# ----------------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_named(tmp_path):
    with pytest.raises(MisconfigurationException, match="`trust` must be one of"):
        TrustWeighted(trust="oracle")
    with pytest.raises(MisconfigurationException, match="`communicate_every` must be an integer >= 1"):
        TrustWeighted(communicate_every=0)
    for kwargs, match in [
        ({"temperature": 0.0}, "`temperature` must be a finite number > 0"),
        ({"temperature": math.inf}, "`temperature` must be a finite number > 0"),
        ({"prediction_scale": math.inf}, "`prediction_scale` must be a finite number > 0"),
        ({"top_k": 2.5}, "`top_k` must be an integer"),
        ({"top_k": True}, "`top_k` must be an integer"),
        ({"threshold": math.nan}, "`threshold` must be a finite number"),
        ({"communicate_every": None}, "`communicate_every` must be an integer >= 1"),
    ]:
        with pytest.raises(MisconfigurationException, match=match):
            TrustWeighted(**kwargs)
    with pytest.raises(MisconfigurationException, match="`prediction_top_logits`=100000 exceeds the vocabulary"):
        _fit(tmp_path / "q", _fast("prediction", prediction_top_logits=100000))
    with pytest.warns(UserWarning, match="no aggregation round will happen"):
        _fit(tmp_path / "w", _fast("fedavg", warmup_steps=50), steps=2)
    with pytest.raises(MisconfigurationException, match="must not repeat a domain"):
        FederatedTextDataModule(n_clients=2, domains=["prose", "prose"])
    # prediction trust without a reference set: refused before training
    no_ref = FederatedTextDataModule(n_clients=4, block_size=16, batch_size=2, steps_per_epoch=2)
    with pytest.raises(MisconfigurationException, match="trust='prediction': this datamodule has no public reference"):
        _fit(tmp_path / "p", _fast("prediction"), dm=no_ref)
    with pytest.raises(MisconfigurationException, match="`static_mixture` must be \\[n_clients=4\\]"):
        _fit(tmp_path / "s", _fast("static", static_mixture=[[1.0, 0.0]]))
    # LoRA target modules that the model does not have: the available ones are listed
    bad = CausalLMModule(config=TINY, lora={"r": 2, "target_modules": ["c_attn"]})
    with pytest.raises(MisconfigurationException, match="c_attn.*linear layers are \\['down_proj'"):
        L.Trainer(
            max_steps=1,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            strategy=CollaborativeStrategy(algorithm=_fast("fedavg")),
            default_root_dir=tmp_path,
        ).fit(bad, _data())
    # a client folder with no text
    empty = tmp_path / "empty"
    empty.mkdir()
    text = tmp_path / "some.txt"
    text.write_text("hello world\n" * 200)
    with pytest.raises(MisconfigurationException, match="client 1's `client_paths` .*empty.* hold no text files"):
        FederatedTextDataModule(n_clients=2, client_paths=[[str(text)], [str(empty)]], block_size=16).setup()
    with pytest.raises(MisconfigurationException, match="`domains` entry 'klingon'"):
        FederatedTextDataModule(n_clients=2, domains=["prose", "klingon"])
    with pytest.raises(MisconfigurationException, match="either `client_paths` or `domains`"):
        FederatedTextDataModule(n_clients=2, domains=["prose"], client_paths=[[str(text)], [str(text)]])


# ----------------------------------------------------------------------------------------------------- example
def test_collab_lora_example_on_a_tiny_gguf(tmp_path, monkeypatch):
    """examples/collab_lora.yaml through the CLI with a tiny GGUF Llama in place of SmolLM2: trust metrics, per-client
    perplexities, trust heatmaps and every client's adapter in peft format under the run's log folder."""
    from pathlib import Path

    import yaml
    from gguf_fixture import write_tiny_gguf

    from lightning_epfl.cli import cli_main

    monkeypatch.setenv("LIGHTNING_EPFL_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny-llama.gguf"
    write_tiny_gguf(gguf)
    cfg = yaml.safe_load(open(Path(__file__).parent.parent / "examples" / "collab_lora.yaml"))
    assert cfg["model"]["init_args"]["pretrained_path"] == cfg["data"]["init_args"]["tokenizer_path"]
    cfg["model"]["init_args"]["pretrained_path"] = cfg["data"]["init_args"]["tokenizer_path"] = str(gguf)
    cfg["trainer"].update(max_steps=4, val_check_interval=4, limit_val_batches=1, default_root_dir=str(tmp_path),
                          enable_progress_bar=False)  # fmt: skip
    cfg["trainer"]["strategy"]["init_args"]["algorithm"]["init_args"].update(warmup_steps=2, communicate_every=1)
    cfg["trainer"]["callbacks"][0]["init_args"]["every_n_steps"] = 2
    cfg["data"]["init_args"].update(block_size=16, domain_chars=6000)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(cfg))
    cli = cli_main(["fit", "--config", str(job)])
    metrics = cli.trainer.callback_metrics
    assert {"val/ppl", "val/ppl_client_5", "trust/group_mass", "trust/row_entropy", "comm/bytes"} <= set(metrics)
    assert cli.trainer.strategy.algorithm.rounds == 3
    log_dir = Path(cli.trainer.log_dir)
    for i in range(6):
        assert (log_dir / "pretrained" / f"client_{i}" / "adapter_model.safetensors").is_file()
    assert list((log_dir / "collaboration_matrix").glob("*.png"))


def test_save_pretrained_under_the_strategy_needs_lora(tmp_path):
    """SavePretrained exports per-client adapters under CollaborativeStrategy, so a module without LoRA is refused
    before training."""
    from lightning_epfl.callbacks import SavePretrained

    torch.manual_seed(0)
    plain = CausalLMModule(config=TINY, optimizer=partial(torch.optim.SGD, lr=0.1))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path, callbacks=[SavePretrained()],
                        strategy=CollaborativeStrategy(algorithm=_fast("fedavg")))  # fmt: skip
    with pytest.raises(MisconfigurationException, match="no `lora` settings"):
        trainer.fit(plain, _data())
    assert plain.model is None or all(p.grad is None for p in plain.parameters())


def test_resume_with_lora_dropout_is_exact(tmp_path):
    """Dropout masks are a function of (seed, step): a run resumed mid-way with lora_dropout > 0 equals a straight
    run bit for bit."""

    def fit(root, steps, ckpt=None):
        strategy = CollaborativeStrategy(algorithm=_fast("fedavg"), seed=1, client_init="independent")
        trainer = L.Trainer(default_root_dir=root, max_steps=steps, strategy=strategy, accelerator="cpu",
                            precision="64-true", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0)  # fmt: skip
        trainer.fit(_module(dropout=0.3), _data(), ckpt_path=ckpt)
        return trainer

    first = fit(tmp_path / "a", 3)
    first.save_checkpoint(tmp_path / "mid.ckpt")
    torch.manual_seed(123)  # a different global RNG state at resume must not matter
    resumed = fit(tmp_path / "b", 6, str(tmp_path / "mid.ckpt"))
    straight = fit(tmp_path / "c", 6)
    torch.testing.assert_close(resumed.strategy.stack.X, straight.strategy.stack.X, atol=0, rtol=0)
    undropped = CollaborativeStrategy(algorithm=_fast("fedavg"), seed=1, client_init="independent")
    tr = L.Trainer(default_root_dir=tmp_path / "d", max_steps=6, strategy=undropped, accelerator="cpu",
                   precision="64-true", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    tr.fit(_module(dropout=0.0), _data())
    assert not torch.allclose(undropped.stack.X, straight.strategy.stack.X)  # dropout was active


def test_export_never_replaces_a_foreign_folder_and_adapter_settings_are_checked(tmp_path):
    """An export refuses a folder it did not write (and a file); loading checks lora_alpha and writes no row unless
    every folder is valid; the export loads with AutoPeftModelForCausalLM."""
    tr = _fit(tmp_path / "run", _fast("fedavg"), steps=3)
    strategy = tr.strategy
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="no export wrote"):
        export_client_adapter(strategy, 0, project)
    assert (project / "notes.txt").read_text() == "mine"
    with pytest.raises(FileExistsError, match="is a file"):
        export_client_adapter(strategy, 0, project / "notes.txt")
    paths = [export_client_adapter(strategy, i, tmp_path / f"c{i}") for i in range(4)]
    export_client_adapter(strategy, 0, paths[0])  # an earlier export is replaced
    config = json.load(open(os.path.join(paths[3], "adapter_config.json")))
    assert config["task_type"] == "CAUSAL_LM"
    config["lora_alpha"] = 64
    json.dump(config, open(os.path.join(paths[3], "adapter_config.json"), "w"))
    before = strategy.stack.X.detach().clone()
    with torch.no_grad():
        strategy.stack.X.add_(1.0)
    changed = strategy.stack.X.detach().clone()
    with pytest.raises(MisconfigurationException, match="client 3's adapter .* `lora_alpha`=64"):
        load_client_adapters(strategy, paths)
    torch.testing.assert_close(strategy.stack.X, changed, atol=0, rtol=0)  # nothing written
    assert not torch.equal(before, changed)
