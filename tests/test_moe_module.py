"""CausalLMModule with mixture-of-experts layers, the multi-domain datamodule and the ExpertUtilizationMonitor."""

import math
import os

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from sklearn.metrics import normalized_mutual_info_score

from lightning_epfl.callbacks import ExpertUtilizationMonitor
from lightning_epfl.datamodules.multi_domain import MultiDomainTextDataModule
from lightning_epfl.functional.moe import byte_token_classes
from lightning_epfl.modules import CausalLMModule, MoEConfig
from lightning_epfl.modules.moe import MoEMLP, moe_layers

TINY = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def _dm(**kw):
    return MultiDomainTextDataModule(**{"domains": ["prose", "code"], "block_size": 32, "batch_size": 4,
                                        "max_chars": 20_000, **kw})  # fmt: skip


def _trainer(tmp_path, callbacks=(), **kw):
    args = {
        "max_epochs": 1,
        "limit_train_batches": 4,
        "limit_val_batches": 2,
        "num_sanity_val_steps": 0,
        "logger": CSVLogger(str(tmp_path)),
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
        "callbacks": list(callbacks),
        **kw,
    }
    return Trainer(**args)


def test_training_loss_is_lm_loss_plus_weighted_aux_terms():
    """loss - lm_loss = a_lb * mean_l LB_l + a_z * mean_l Z_l (fp64 routers, rtol 1e-6), LB by transformers / k."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    module = CausalLMModule(
        config={**TINY, "vocab_size": 256},
        moe=MoEConfig(num_experts=4, top_k=2, router_init_std=0.5),
        router_aux_loss_coef=0.05,
        router_z_loss_coef=0.01,
    )
    module.configure_model()
    module.model.double()
    logits = {}

    def keep_first_logits(layer, args, output):
        logits.setdefault(layer.layer_index, layer.last_aux.router_logits)

    for layer in moe_layers(module.model):
        layer.register_forward_hook(keep_first_logits)
    batch = {"input_ids": torch.randint(0, 256, (3, 20))}
    module.train()
    loss = module.training_step(batch, 0)
    assert all(layer.last_aux is None for layer in moe_layers(module.model))  # consumed, nothing kept
    with torch.no_grad():
        nll, count = module._loss_sum(batch)  # the module's LM loss (float32 cross-entropy), as in training_step
        lm = nll / count
        hf = module.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
    torch.testing.assert_close(lm.double(), hf.double(), atol=1e-5, rtol=0)
    lb = torch.stack([load_balancing_loss_func((h,), 4, 2) / 2 for h in logits.values()]).mean()
    z = torch.stack([(torch.logsumexp(h, -1) ** 2).mean() for h in logits.values()]).mean()
    assert len(logits) == 2 and lb > 1.0
    torch.testing.assert_close((loss - lm).detach(), 0.05 * lb + 0.01 * z, rtol=1e-6, atol=0)


def test_fit_logs_aux_domains_and_expert_utilization(tmp_path):
    """A run logs moe/{lb,z,dropped_frac} (lb > 0 at weight 0), val/ppl/<domain>, utilization keys, NMI equal to
    sklearn on the validation routing, and writes the load heatmap."""
    seed_everything(0)
    dm = _dm()
    model = CausalLMModule(
        config=TINY,
        moe=MoEConfig(num_experts=4, top_k=2, router="frozen", capacity_factor=1.0),
        router_aux_loss_coef=0.0,
        router_z_loss_coef=0.0,
    )
    monitor = ExpertUtilizationMonitor(log_every_n_steps=2, detail="detailed", dirpath=str(tmp_path / "plots"))
    trainer = _trainer(tmp_path, [monitor])
    trainer.fit(model, dm)
    m = trainer.callback_metrics
    assert m["moe/lb"] > 0 and m["moe/z"] > 0 and 0 <= m["moe/dropped_frac"] < 1
    assert torch.equal(m["train/loss"], m["train/lm_loss"])  # weights 0: the aux terms are logged, not added
    assert {"val/ppl/prose", "val/ppl/code"} <= set(m)
    assert min(m["val/ppl/prose"], m["val/ppl/code"]) <= m["val/ppl"] <= max(m["val/ppl/prose"], m["val/ppl/code"])
    assert monitor._last_logged_step == 4
    got = monitor.last_metrics
    for i in (0, 1):
        util = [got[f"moe/L{i}/util/e{j}"] for j in range(4)]
        assert got[f"moe/L{i}/util_min"] == min(util) and got[f"moe/L{i}/util_max"] == max(util)
        assert sum(util) == pytest.approx(4.0, abs=1e-5)
        assert got[f"moe/L{i}/dead"] == sum(u < 0.1 for u in util)
        assert 0 < got[f"moe/L{i}/entropy"] <= math.log(4) + 1e-6
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv")) as f:
        header = f.readline()
    assert "moe/L0/util_min" in header and "moe/L1/entropy" in header
    # reference: the same validation batches through the trained model, NMI of top-1 experts by sklearn
    model.eval()
    experts, domains, classes = {0: [], 1: []}, [], []
    loader = dm.val_dataloader()
    for _, batch in zip(range(2), loader):
        with torch.no_grad():
            model(batch["input_ids"])
        for i, layer in enumerate(moe_layers(model.model)):
            experts[i] += layer.last_aux.unit_indices[..., 0].reshape(-1).tolist()
        domains += batch["domain"][:, None].expand_as(batch["input_ids"]).reshape(-1).tolist()
        classes += byte_token_classes(batch["input_ids"]).reshape(-1).tolist()
    for i in (0, 1):
        nmi_d, nmi_c = m[f"moe/L{i}/nmi_domain"].item(), m[f"moe/L{i}/nmi_token_class"].item()
        assert nmi_d == pytest.approx(normalized_mutual_info_score(domains, experts[i]), abs=1e-6)
        assert nmi_c == pytest.approx(normalized_mutual_info_score(classes, experts[i]), abs=1e-6)
        assert 0 < nmi_c < 1
    assert [f for f in os.listdir(tmp_path / "plots") if f.startswith("expert_load_step")]
    assert len(monitor.history) == 1 and len(monitor.history[0]["load"]) == 2
    restored = ExpertUtilizationMonitor()
    restored.load_state_dict(monitor.state_dict())
    assert restored.history == monitor.history


def test_checkpoint_restores_resampled_routing_and_loads_weights_only(tmp_path):
    """A re-drawn router's eval routing and its draw stream survive a checkpoint; hparams hold plain data."""
    seed_everything(0)
    dm = _dm()
    model = CausalLMModule(config=TINY, moe=MoEConfig(num_experts=4, top_k=1, router="resampled", router_seed=5))
    trainer = _trainer(tmp_path, limit_val_batches=0, logger=False)
    trainer.fit(model, dm)
    ckpt = tmp_path / "moe.ckpt"
    trainer.save_checkpoint(ckpt)
    raw = torch.load(ckpt, weights_only=True)
    assert raw["hyper_parameters"]["moe"]["router"] == "resampled"
    loaded = CausalLMModule.load_from_checkpoint(ckpt)
    assert isinstance(loaded.moe, MoEConfig) and loaded.moe == model.moe
    x = torch.randint(0, 256, (2, 16))
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    a, b = moe_layers(model.model), moe_layers(loaded.model)
    assert all(torch.equal(p.last_aux.unit_indices, q.last_aux.unit_indices) for p, q in zip(a, b))
    model.train()
    loaded.train()
    model(x)
    loaded(x)
    assert all(torch.equal(p.router.weight, q.router.weight) for p, q in zip(a, b))  # same next draw


def test_label_routing_and_sequence_mean_warning():
    """routing='label' routes each sequence by its batch 'domain'; sequence 'mean' warns that it sees the future."""
    module = CausalLMModule(
        config={**TINY, "vocab_size": 256},
        moe=MoEConfig(num_experts=3, top_k=1, routing="label", label_to_expert=[2, 0]),
    )
    module.configure_model()
    batch = {"input_ids": torch.randint(0, 256, (4, 10)), "domain": torch.tensor([0, 1, 1, 0])}
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss)
    layer = moe_layers(module.model)[0]
    with torch.no_grad():
        module._loss_sum(batch)
    assert layer.last_aux.unit_indices[..., 0].tolist() == [[2] * 10, [0] * 10, [0] * 10, [2] * 10]
    mean = CausalLMModule(
        config={**TINY, "vocab_size": 256}, moe=MoEConfig(num_experts=2, routing="sequence", sequence_pooling="mean")
    )
    with pytest.warns(RuntimeWarning, match="future"):
        mean.configure_model()


def test_module_arguments_are_checked():
    """Negative coefficients, bad MoE dicts, save_pretrained of a MoE model and a dense model under the monitor."""
    with pytest.raises(MisconfigurationException, match="router_aux_loss_coef"):
        CausalLMModule(config=TINY, moe=MoEConfig(), router_aux_loss_coef=-0.1)
    with pytest.raises(MisconfigurationException, match="router_z_loss_coef"):
        CausalLMModule(config=TINY, router_z_loss_coef=-1)
    with pytest.raises(MisconfigurationException, match="top_k"):
        CausalLMModule(config=TINY, moe={"num_experts": 2, "top_k": 3})
    with pytest.raises(MisconfigurationException, match="unknown field"):
        CausalLMModule(config=TINY, moe={"experts": 2})
    module = CausalLMModule(config={**TINY, "vocab_size": 256}, moe={"num_experts": 2, "top_k": 1})
    module.configure_model()
    assert isinstance(module.model.model.layers[0].mlp, MoEMLP)
    with pytest.raises(RuntimeError, match="not a `transformers` architecture"):
        module.save_pretrained("/nonexistent/never-written")
    for bad, match in (
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
        ({"detail": "all"}, "detail"),
        ({"token_classes": "words"}, "token_classes"),
        ({"dead_threshold": -1}, "dead_threshold"),
        ({"max_logged_layers": 0}, "max_logged_layers"),
    ):
        with pytest.raises(MisconfigurationException, match=match):
            ExpertUtilizationMonitor(**bad)


def test_monitor_refuses_a_dense_model(tmp_path):
    """The monitor needs MoE layers: a dense model fails at fit start with a clear message."""
    trainer = _trainer(tmp_path, [ExpertUtilizationMonitor()], max_steps=1, logger=False)
    with pytest.raises(MisconfigurationException, match="no MoE layer"):
        trainer.fit(CausalLMModule(config=TINY), _dm())


def test_multi_domain_batches_are_balanced_and_resumable():
    """Every training batch holds batch_size / D blocks per domain; batches are a pure function of (seed, k)."""
    dm = _dm(batch_size=6, domains=["prose", "code", "prose"])
    dm.setup()
    assert dm.domain_names == ["prose", "code", "prose"]
    batch = dm.train_batch(3)
    assert batch["domain"].tolist() == [0, 0, 1, 1, 2, 2] and batch["input_ids"].shape == (6, 32)
    again = _dm(batch_size=6, domains=["prose", "code", "prose"])
    again.setup()
    assert torch.equal(again.train_batch(3)["input_ids"], batch["input_ids"])
    val = next(iter(dm.val_dataloader()))
    assert set(val) == {"input_ids", "domain"} and val["domain"].dtype == torch.long
    with pytest.raises(MisconfigurationException, match="multiple"):
        _dm(batch_size=5).setup()
    with pytest.raises(MisconfigurationException, match="val_fraction"):
        _dm(val_fraction=1.0)


def test_lightning_cli_parses_moe_block(tmp_path):
    """`moe: {num_experts: 4, top_k: 2, routing: token, router: frozen}` parses to a MoEConfig; bad values fail."""
    from lightning_epfl.cli import cli_main

    base = [
        "--model=lightning_epfl.modules.CausalLMModule",
        "--data=lightning_epfl.datamodules.multi_domain.MultiDomainTextDataModule",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli = cli_main(
        base
        + [
            "--model.init_args.moe={num_experts: 4, top_k: 2, routing: token, router: frozen}",
            "--model.init_args.router_aux_loss_coef=0.02",
            "--trainer.callbacks=lightning_epfl.callbacks.ExpertUtilizationMonitor",
            "--trainer.callbacks.init_args.log_every_n_steps=20",
        ],
        run=False,
    )
    assert cli.model.moe == MoEConfig(num_experts=4, top_k=2, routing="token", router="frozen")
    assert cli.model.router_aux_loss_coef == 0.02 and cli.model.hparams["moe"]["router"] == "frozen"
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, ExpertUtilizationMonitor)]
    assert monitor.log_every_n_steps == 20
    with pytest.raises(Exception, match="routing"):
        cli_main(base + ["--model.init_args.moe={routing: foo}"], run=False)


def _specialization_run(tmp_path, seed, **moe):
    """Byte-level Llama (d=32, 3 layers) on prose vs code, 200 steps; last layer's validation NMIs, mean domain ppl."""
    seed_everything(seed)
    dm = MultiDomainTextDataModule(domains=["prose", "code"], block_size=128, batch_size=16, max_chars=300_000, seed=0)
    config = {"hidden_size": 32, "intermediate_size": 86, "num_hidden_layers": 3, "num_attention_heads": 4}
    model = CausalLMModule(
        config=config,
        moe=MoEConfig(num_experts=4, **moe),
        optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3),
    )
    trainer = _trainer(
        tmp_path / f"{seed}-{'-'.join(map(str, moe.values()))}",
        [ExpertUtilizationMonitor(log_every_n_steps=50, plot=False)],
        max_epochs=-1,
        max_steps=200,
        limit_train_batches=None,
        limit_val_batches=8,
        val_check_interval=200,
        logger=False,
    )
    trainer.fit(model, dm)
    m = trainer.callback_metrics
    ppl = (m["val/ppl/prose"] + m["val/ppl/code"]) / 2
    return m["moe/L2/nmi_token_class"].item(), m["moe/L2/nmi_domain"].item(), ppl.item()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_specialization_flip_and_frozen_router_quality(tmp_path, seed):
    """Token routing specializes by byte class, sequence 'mean' routing by domain; frozen ppl within 0.5 of learned."""
    token_cls, token_dom, learned_ppl = _specialization_run(tmp_path, seed, top_k=2, routing="token")
    assert token_cls > token_dom
    seq_cls, seq_dom, _ = _specialization_run(tmp_path, seed, top_k=2, routing="sequence", sequence_pooling="mean")
    assert seq_dom > seq_cls
    _, _, frozen_ppl = _specialization_run(tmp_path, seed, top_k=2, routing="token", router="frozen")
    assert abs(frozen_ppl - learned_ppl) < 0.5


def test_moe_example_yaml_runs(tmp_path):
    """examples/moe_lm.yaml through the LightningCLI, shortened: the MoE model trains, logs its aux losses and the
    monitor's keys, and writes the heatmap into the run's folder."""
    from pathlib import Path

    from lightning_epfl.cli import cli_main

    example = Path(__file__).resolve().parents[1] / "examples" / "moe_lm.yaml"
    cli = cli_main([
        "fit", "--config", str(example), "--trainer.max_steps=4", "--trainer.val_check_interval=4",
        "--trainer.limit_val_batches=2", f"--trainer.default_root_dir={tmp_path}",
        "--data.init_args.domains=[prose, code]", "--data.init_args.batch_size=4",
        "--data.init_args.max_chars=20000", "--trainer.callbacks.init_args.log_every_n_steps=2",
    ])  # fmt: skip
    from lightning_epfl.modules.moe import MoEMLP

    assert cli.model.moe.router == "frozen"
    assert sum(isinstance(m, MoEMLP) for m in cli.model.model.modules()) == 3
    metrics = cli.trainer.callback_metrics
    assert float(metrics["moe/lb"]) > 0 and "val/ppl/prose" in metrics and "moe/L0/nmi_domain" in metrics
    assert any(f.startswith("expert_load_step") for f in os.listdir(cli.trainer.log_dir))


def test_monitor_keys_name_blocks_steps_align_and_hparams_hold_moe(tmp_path):
    """With MoE layers in blocks 1 and 2 of 3, the monitor's keys are moe/L1, moe/L2; its training rows share the
    step of train/loss; the validation load counts every top-k choice (sums to k per unit); hparams.yaml has moe."""
    import csv

    import yaml

    seed_everything(0)
    module = CausalLMModule(
        config={**TINY, "num_hidden_layers": 3}, moe=MoEConfig(num_experts=4, top_k=2, layers=[1, 2])
    )
    monitor = ExpertUtilizationMonitor(log_every_n_steps=2, plot=False)
    trainer = _trainer(tmp_path, [monitor], log_every_n_steps=1)
    trainer.fit(module, _dm())
    rows = list(csv.DictReader(open(os.path.join(trainer.log_dir, "metrics.csv"))))
    keys = set(rows[0])
    assert {"moe/L1/util_min", "moe/L2/util_min", "moe/L1/nmi_domain"} <= keys and "moe/L0/util_min" not in keys
    loss_steps = {r["step"] for r in rows if r["train/loss"]}
    util_steps = {r["step"] for r in rows if r["moe/L1/util_min"]}
    assert util_steps and util_steps <= loss_steps
    load = monitor.history[-1]["load"]
    assert all(abs(sum(layer) - 1.0) < 1e-6 for layer in load)
    assert all(max(layer) <= 0.5 + 1e-9 for layer in load)  # two distinct experts per unit: no share above 1/k
    hparams = yaml.safe_load(open(os.path.join(trainer.log_dir, "hparams.yaml")))
    assert hparams["moe"]["layers"] == [1, 2] and hparams["moe"]["top_k"] == 2
    with pytest.raises(ValueError, match="`sequence_pooling` applies to routing='sequence' only"):
        MoEConfig(routing="token", sequence_pooling="mean")
    with pytest.raises(ValueError, match="routing='label' has no router"):
        MoEConfig(routing="label", top_k=1, label_to_expert=[0], router="frozen")
