import copy
import functools
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

from lightning_epfl.cli import cli_main
from lightning_epfl.datamodules.few_shot import LinearRegressionTasks, SinusoidTasks
from lightning_epfl.functional.meta import batched_task_grad, maml_task_grad, tree_norm
from lightning_epfl.modules.meta_learning import MLP, MetaLearningModule
from lightning_epfl.modules.meta_optim import MetaOptimizer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _data(**kwargs) -> SinusoidTasks:
    args = {"tasks_per_batch": 4, "batches_per_epoch": 50, "val_tasks": 16, "val_query_points": 20}
    args.update(val_batch_size=16, **kwargs)
    return SinusoidTasks(**args)


def _trainer(tmp_path, **kwargs) -> Trainer:
    args = {
        "default_root_dir": tmp_path,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    args.update(kwargs)
    return Trainer(**args)


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile", "fo_b_maml"])
def test_meta_module_training_improves_validation(tmp_path, algorithm):
    """50 meta-steps lower the post-adaptation validation loss for every algorithm; validation gives the same
    numbers with and without inference_mode (adaptation uses torch.func.grad)."""
    torch.manual_seed(0)
    module = MetaLearningModule(
        MLP(4, [8], 1), algorithm=algorithm, inner_lr=0.05, monitor_every_n_steps=None,
        optimizer=functools.partial(torch.optim.Adam, lr=2e-2),
    )  # fmt: skip
    dm = LinearRegressionTasks(dim=4, num_tasks=8, rows=10, batches_per_epoch=25)
    trainer = _trainer(tmp_path, max_steps=50, inference_mode=True)
    before = trainer.validate(module, dm, verbose=False)[0]["val/query_loss_post"]
    trainer.fit(module, dm)
    after = trainer.callback_metrics["val/query_loss_post"].item()
    assert after < 0.7 * before
    assert trainer.global_step == 50
    assert {"train/query_loss_post", "train/meta_grad_norm", "val/query_loss_pre"} <= set(trainer.callback_metrics)
    no_inference = _trainer(tmp_path, inference_mode=False).validate(module, dm, verbose=False)[0]
    assert no_inference["val/query_loss_post"] == pytest.approx(after, rel=1e-6)


def _resume_module(seed: int) -> MetaLearningModule:
    torch.manual_seed(seed)
    return MetaLearningModule(
        MLP(1, [8], 1), algorithm="fo_b_maml", inner_lr=0.1, inner_steps=2, monitor_every_n_steps=4, monitor_tasks=4,
        optimizer=functools.partial(MetaOptimizer, lr=0.05, mode="normalized", momentum=0.9),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.LinearLR, start_factor=1.0, end_factor=0.1,
                                       total_iters=20),
    )  # fmt: skip


def test_meta_module_resume_is_bit_identical(tmp_path):
    """Stopping at step 10 (mid-epoch) and resuming to step 20 equals the uninterrupted 20-step run bit for bit."""
    dm_args = {"batches_per_epoch": 7}
    full = _resume_module(0)
    _trainer(tmp_path / "a", max_steps=20, limit_val_batches=0).fit(full, _data(**dm_args))

    part = _resume_module(0)
    trainer = _trainer(tmp_path / "b", max_steps=10, limit_val_batches=0)
    trainer.fit(part, _data(**dm_args))
    ckpt = tmp_path / "step10.ckpt"
    trainer.save_checkpoint(ckpt)

    resumed = _resume_module(1)  # different init: everything must come from the checkpoint
    dm = _data(**dm_args)
    trainer = _trainer(tmp_path / "c", max_steps=20, limit_val_batches=0)
    trainer.fit(resumed, dm, ckpt_path=ckpt)
    assert dm.cursor == 20
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n
    opt_a, opt_b = full.optimizers().optimizer, resumed.optimizers().optimizer
    for p, q in zip(opt_a.param_groups[0]["params"], opt_b.param_groups[0]["params"]):
        assert torch.equal(opt_a.state[p]["momentum_buffer"], opt_b.state[q]["momentum_buffer"])
    assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"] < 0.05
    loaded = MetaLearningModule.load_from_checkpoint(ckpt, net=MLP(1, [8], 1))
    assert loaded.hparams.inner_steps == 2 and loaded.hparams.algorithm == "fo_b_maml"
    for (n, a), (_, b) in zip(part.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n


def test_meta_module_monitor_and_step_norm(tmp_path):
    """monitor/maml_grad_norm equals the exact meta-gradient norm at the initial parameters; the estimator's
    relative error is tiny for fo_b_maml and large for FO-MAML; normalized steps have length lr."""
    results = {}
    for algorithm in ("fo_b_maml", "fomaml"):
        torch.manual_seed(0)
        module = MetaLearningModule(
            MLP(1, [16], 1), algorithm=algorithm, inner_lr=0.1, monitor_every_n_steps=1, monitor_tasks=8,
            optimizer=functools.partial(MetaOptimizer, lr=0.01, mode="normalized", momentum=0.0),
        )  # fmt: skip
        init = copy.deepcopy(module.net)
        dm = _data()
        trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
        trainer.fit(module, dm)
        results[algorithm] = {k: v.item() for k, v in trainer.callback_metrics.items()}
    batch = dm.monitor_batch(8)
    params = {n: p.detach() for n, p in init.named_parameters()}
    exact, stats = batched_task_grad(
        maml_task_grad, init, params, {}, batch.support_x, batch.support_y, batch.query_x, batch.query_y,
        loss="mse", inner_lr=0.1, inner_steps=1,
    )  # fmt: skip
    for metrics in results.values():
        assert metrics["monitor/maml_grad_norm"] == pytest.approx(tree_norm(exact).item(), rel=1e-5)
        assert metrics["monitor/maml_objective"] == pytest.approx(stats["query_loss_post"].item(), rel=1e-5)
        assert metrics["train/outer_step_norm"] == pytest.approx(0.01, rel=1e-3)
    assert results["fo_b_maml"]["monitor/estimator_rel_err"] < 1e-3
    assert results["fomaml"]["monitor/estimator_rel_err"] > 0.05


def test_meta_module_frozen_parameters_and_anil(tmp_path):
    """Frozen parameters stay put and ANIL (adapt_params) trains; the head alone is adapted in the inner loop."""
    torch.manual_seed(0)
    net = MLP(1, [8], 1)
    net[0].bias.requires_grad_(False)
    frozen = net[0].bias.detach().clone()
    module = MetaLearningModule(net, algorithm="fo_b_maml", inner_lr=0.1, adapt_params=["2.weight", "2.bias"],
                                monitor_every_n_steps=1, monitor_tasks=2)  # fmt: skip
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=1)
    trainer.fit(module, _data())
    assert torch.equal(net[0].bias, frozen)
    assert trainer.callback_metrics["monitor/estimator_rel_err"].item() < 1e-3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"inner_steps": 0}, "inner_steps"),
        ({"inner_lr": 0.0}, "inner_lr"),
        ({"inner_lr": -0.1}, "inner_lr"),
        ({"fd_delta": 0.0}, "fd_delta"),
        ({"reptile_steps": 1}, "reptile_steps"),
        ({"algorithm": "imaml"}, "algorithm"),
        ({"loss": "hinge"}, "loss"),
        ({"fd_scheme": "central"}, "fd_scheme"),
        ({"adapt_params": ["head.weight"]}, "adapt_params"),
        ({"eval_inner_steps": 0}, "eval_inner_steps"),
        ({"monitor_tasks": 0}, "monitor_tasks"),
    ],
)
def test_meta_module_bad_input(kwargs, match):
    """Bad arguments raise ValueError in __init__ naming the argument."""
    with pytest.raises(ValueError, match=match):
        MetaLearningModule(MLP(1, [4], 1), **kwargs)


def test_meta_module_rejects_batchnorm():
    """BatchNorm with running statistics is rejected (it cannot be updated under vmap)."""
    with pytest.raises(ValueError, match="BatchNorm"):
        MetaLearningModule(nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)))


@pytest.mark.parametrize(
    ("net", "algorithm", "match"),
    [
        (MLP(2, [4], 1), "fo_b_maml", "do not match the model"),  # input width
        (MLP(1, [4], 2), "fo_b_maml", "do not match the model"),  # output vs target shape under MSE
        (nn.Sequential(nn.Linear(1, 4), nn.Dropout(0.5), nn.Linear(4, 1)), "fo_b_maml", "Dropout"),
    ],
)
def test_meta_module_setup_rejects_mismatched_tasks(tmp_path, net, algorithm, match):
    """setup test-runs one task and raises a named error when the net does not fit the datamodule's tasks."""
    module = MetaLearningModule(net, algorithm=algorithm)
    with pytest.raises(ValueError, match=match):
        _trainer(tmp_path, max_steps=1).fit(module, _data())


def test_meta_module_fo_b_maml_precision_and_relu_checks(tmp_path):
    """fo_b_maml rejects half precision and warns about ReLU kinks at small fd_delta."""
    module = MetaLearningModule(MLP(1, [4], 1), algorithm="fo_b_maml")
    with pytest.raises(ValueError, match="precision"):
        _trainer(tmp_path, max_steps=1, precision="bf16-mixed").fit(module, _data())
    module = MetaLearningModule(MLP(1, [4], 1, activation="relu"), algorithm="fo_b_maml", monitor_every_n_steps=None)
    with pytest.warns(RuntimeWarning, match="kinks"):
        _trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, _data())


@pytest.mark.parametrize("name", ["maml_sinusoid.yaml", "maml_digits.yaml"])
def test_meta_module_example_yaml_runs(tmp_path, name):
    """The example YAML runs one fast_dev_run step through the CLI and logs the meta-learning metrics."""
    cli = cli_main(
        [
            "fit", "--config", str(EXAMPLES / name), "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
            "--data.init_args.val_tasks=4", "--data.init_args.val_batch_size=4",
        ]
    )  # fmt: skip
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 1
    assert {"train/query_loss_post", "monitor/maml_grad_norm", "val/query_loss_post"} <= set(metrics)
    assert metrics["monitor/estimator_rel_err"].item() < 1e-3
    assert isinstance(cli.model, MetaLearningModule) and cli.model.hparams.algorithm == "fo_b_maml"
