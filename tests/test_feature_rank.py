import os

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_epfl.callbacks import FeatureRankMonitor
from lightning_epfl.datamodules import load_digits_arrays
from lightning_epfl.functional.rank import spectral_metrics
from lightning_epfl.modules import DeepMLPClassifier


class _ListLogger(Logger):
    """In-memory logger recording every ``log_metrics`` call."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "list"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, dict(metrics)))


class _RecordingMLP(DeepMLPClassifier):
    """DeepMLP with dropout and BatchNorm (to expose RNG/buffer side effects); counts live hooks in eval forwards."""

    def __init__(self, dropout: float = 0.3, **kwargs):
        super().__init__(**kwargs)
        self.norm = nn.BatchNorm1d(self.hparams.width)
        self.drop = nn.Dropout(dropout)
        self.live_hooks: list[int] = []

    def forward(self, x):
        if not self.training:
            self.live_hooks.append(sum(len(m._forward_hooks) for m in self.modules()))
        h = x.flatten(1)
        for i, linear in enumerate(self.linears):
            h = linear(h)
            if i == 0:
                h = self.drop(torch.relu(self.norm(h)))
            elif i < len(self.linears) - 1:
                h = torch.relu(h)
        return h


def _loaders(n_train: int = 100, batch_size: int = 25):
    x, y = load_digits_arrays()
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    train = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=batch_size, shuffle=False)
    val = DataLoader(TensorDataset(x[1000:1300], y[1000:1300]), batch_size=300)
    return train, val


def _trainer(tmp_path, **kwargs):
    defaults = dict(
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        max_epochs=-1,
    )
    return Trainer(**{**defaults, **kwargs})


@pytest.mark.parametrize("accumulate", [1, 3])
def test_feature_rank_logs_expected_keys_at_expected_steps(tmp_path, accumulate):
    """Every 30 steps (log_every_n_steps=50) over 100 steps: logged at 0, 30, 60, 90, 100 once each, all keys."""
    seed_everything(0)
    logger = _ListLogger()
    monitor = FeatureRankMonitor(num_samples=200, every_n_steps=30, plot=False)
    model = DeepMLPClassifier(depth=3, width=16)
    train, val = _loaders()
    trainer = _trainer(
        tmp_path,
        max_steps=100,
        log_every_n_steps=50,
        accumulate_grad_batches=accumulate,
        logger=logger,
        callbacks=[monitor],
    )
    trainer.fit(model, train, val)
    rank_calls = [(s, m) for s, m in logger.calls if any(k.startswith("feature_rank/") for k in m)]
    assert [s for s, _ in rank_calls] == [0, 30, 60, 90, 100]
    assert [h["step"] for h in monitor.history] == [0, 30, 60, 90, 100]
    expected = {f"feature_rank/{m}/linears.{i}" for m in ("numerical_rank", "effective_rank") for i in range(3)}
    for _, metrics in rank_calls:
        assert set(metrics) == expected
    assert rank_calls[-1][1]["feature_rank/numerical_rank/linears.2"] <= 10  # output layer: at most 10 classes


def test_feature_rank_values_match_functional_on_layer_outputs(tmp_path):
    """The step-0 values equal spectral_metrics of the Linear outputs computed by hand on the first val samples."""
    seed_everything(0)
    model = DeepMLPClassifier(depth=3, width=16, init_scale=2.0)
    train, val = _loaders()
    x_probe = val.dataset.tensors[0][:150]
    with torch.no_grad():
        h, outs = x_probe, []
        for i, linear in enumerate(model.linears):
            h = linear(h)
            outs.append(h.clone())
            h = torch.relu(h) if i < 2 else h
    metrics = ["numerical_rank", "effective_rank", "stable_rank", "dead_units"]
    monitor = FeatureRankMonitor(num_samples=150, every_n_steps=1000, metrics=metrics, plot=False)
    trainer = _trainer(tmp_path, max_steps=1, logger=False, callbacks=[monitor])
    trainer.fit(model, train, val)
    first = monitor.history[0]
    assert first["step"] == 0
    for i, out in enumerate(outs):
        ref = spectral_metrics(out, metrics)
        for m in metrics:
            assert first["values"][f"feature_rank/{m}/linears.{i}"] == pytest.approx(ref[m], rel=1e-12, abs=0)


def test_feature_rank_does_not_change_training(tmp_path):
    """Same seed with and without the monitor (dropout + BatchNorm model) gives bitwise identical weights."""
    train, val = _loaders()
    weights = []
    for use_monitor in (False, True):
        seed_everything(0)
        model = _RecordingMLP(depth=3, width=16)
        callbacks = [FeatureRankMonitor(num_samples=100, every_n_steps=7, plot=False)] if use_monitor else []
        trainer = _trainer(tmp_path, max_steps=50, logger=False, callbacks=callbacks)
        trainer.fit(model, train, val)
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
        if use_monitor:
            assert len(model.live_hooks) == len(callbacks[0].history) == 9  # steps 0, 7, ..., 49 and 50
            assert all(n == 3 for n in model.live_hooks)  # one hook per selected Linear during the probe
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


@pytest.mark.parametrize("training", [True, False])
def test_feature_rank_restores_mode_and_removes_hooks(training):
    """compute() restores train/eval mode and leaves no hooks, also when the probe forward raises."""
    model = _RecordingMLP(depth=3, width=8)
    model.train(training)
    monitor = FeatureRankMonitor(num_samples=2, plot=False)
    out = monitor.compute(model, torch.rand(40, 64))
    assert set(out) == {"linears.0", "linears.1", "linears.2"}
    assert model.training is training and model.drop.training is training
    with pytest.raises(RuntimeError):
        monitor.compute(model, torch.rand(40, 7))  # wrong input width
    assert model.training is training
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_feature_rank_resume_reproduces_uninterrupted_run(tmp_path):
    """Stop at 40, resume to 100: history equals the uninterrupted run, no duplicate step, hooks not doubled."""
    train, val = _loaders(n_train=100, batch_size=25)  # 4 steps per epoch: step 40 is an epoch boundary

    def run(max_steps, ckpt_path=None, callbacks=()):
        seed_everything(0)
        model = _RecordingMLP(depth=3, width=16, dropout=0.0)  # checkpoints do not hold the global RNG state
        monitor = FeatureRankMonitor(num_samples=120, every_n_steps=30, plot=False)
        trainer = _trainer(
            tmp_path, max_steps=max_steps, logger=False, callbacks=[monitor, *callbacks], enable_checkpointing=True
        )
        trainer.fit(model, train, val, ckpt_path=ckpt_path)
        return monitor, model

    full, _ = run(100)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=40, save_top_k=-1)
    run(40, callbacks=[ckpt])
    path = os.path.join(tmp_path, "ckpt", os.listdir(tmp_path / "ckpt")[0])
    resumed, model = run(100, ckpt_path=path)
    assert [h["step"] for h in resumed.history] == [0, 30, 60, 90, 100]
    assert resumed.history == full.history
    assert all(n == 3 for n in model.live_hooks) and len(model.live_hooks) == 3  # probes at 60, 90, 100 only


def test_feature_rank_layer_selection_and_reduction():
    """Names, patterns and types select layers; conv outputs are flattened or spatially averaged; columns capped."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 20), nn.ReLU())
    x = torch.rand(30, 1, 8, 8)
    assert FeatureRankMonitor(layer_types=["Conv2d", "Linear"]).select_layers(model) == ["0", "3"]
    assert FeatureRankMonitor(layers=["3", "0"]).select_layers(model) == ["3", "0"]
    assert FeatureRankMonitor(layers=["[03]"]).select_layers(model) == ["0", "3"]
    flat = FeatureRankMonitor(layers=["0"]).collect_features(model, x)
    mean = FeatureRankMonitor(layers=["0"], reduction="mean").collect_features(model, x)
    assert flat["0"].shape == (30, 144) and mean["0"].shape == (30, 4)
    torch.testing.assert_close(mean["0"], model[0](x).mean(dim=(2, 3)), rtol=0, atol=0)
    capped = FeatureRankMonitor(layers=["3"], max_features=5, seed=3)
    a, b = capped.collect_features(model, x)["3"], capped.collect_features(model, x)["3"]
    assert a.shape == (30, 5) and torch.equal(a, b)
    full = model[3](model[2](model[1](model[0](x))))
    assert any(torch.equal(a[:, 0], full[:, j]) for j in range(20))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"num_samples": 1}, "num_samples"),
        ({"metrics": ["numerical_rank", "bogus"]}, "metrics"),
        ({"compute_dtype": "float16"}, "compute_dtype"),
        ({"probe": "test"}, "probe"),
        ({"reduction": "max"}, "reduction"),
        ({"rtol": -1.0}, "rtol"),
        ({"batch_size": 0}, "batch_size"),
        ({"log_via": "print"}, "log_via"),
    ],
)
def test_feature_rank_bad_arguments(kwargs, match):
    """Bad constructor arguments raise MisconfigurationException naming the argument."""
    with pytest.raises(MisconfigurationException, match=match):
        FeatureRankMonitor(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "trainer_kwargs", "match"),
    [
        ({"layers": ["linears.7"]}, {}, r"valid names: \['linears', 'linears.0', 'linears.1', 'linears.2'\]"),
        ({"layer_types": ["Conv2d"]}, {}, "layer_types"),
        ({"num_samples": 301}, {}, "num_samples.*301.*300"),
        ({"every_n_steps": 30, "log_via": "self.log"}, {"log_every_n_steps": 50}, "log_every_n_steps"),
    ],
)
def test_feature_rank_bad_setup(tmp_path, kwargs, trainer_kwargs, match):
    """Unknown layer (valid names listed), probe larger than the dataset, unaligned self.log fail before training."""
    train, val = _loaders()
    model = DeepMLPClassifier(depth=3, width=8)
    before = [p.clone() for p in model.parameters()]
    trainer = _trainer(tmp_path, max_steps=5, logger=False, callbacks=[FeatureRankMonitor(**kwargs)], **trainer_kwargs)
    with pytest.raises(MisconfigurationException, match=match):
        trainer.fit(model, train, val)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no step was taken


def test_feature_rank_plot_and_state_key(tmp_path):
    """A PNG is written via temp file + rename into log_dir; state_key includes log_prefix; set_probe is used."""
    seed_everything(0)
    train, val = _loaders()
    monitor = FeatureRankMonitor(every_n_steps=5, log_prefix="fr_a", overlay_metrics=["train/acc"])
    monitor.set_probe(torch.rand(50, 64))
    from lightning.pytorch.loggers import CSVLogger

    trainer = _trainer(tmp_path, max_steps=10, log_every_n_steps=1, logger=CSVLogger(tmp_path), callbacks=[monitor])
    trainer.fit(DeepMLPClassifier(depth=3, width=8), train, val)
    png = os.path.join(trainer.log_dir, "feature_rank.png")
    assert os.path.getsize(png) > 1000 and not os.path.exists(png + ".tmp.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "fr_a" in monitor.state_key and monitor.state_key != FeatureRankMonitor().state_key
    assert [h["step"] for h in monitor.history] == [0, 5, 10]
    assert "train/acc" in monitor.history[-1]["overlay"]
    assert monitor._probe_indices is None  # user probe, not dataset indices


class _DDPCheckMonitor(FeatureRankMonitor):
    """Asserts, inside each DDP worker, that only global rank 0 measured and that no hook is left behind."""

    def teardown(self, trainer, pl_module, stage):
        super().teardown(trainer, pl_module, stage)
        assert self.last_step == 10
        if trainer.global_rank == 0:
            assert [h["step"] for h in self.history] == [0, 5, 10]
        else:
            assert self.history == []
        assert sum(len(m._forward_hooks) for m in pl_module.modules()) == 0


@pytest.mark.slow
def test_feature_rank_ddp_two_processes(tmp_path):
    """Slow: 2-process CPU DDP (gloo, spawn): rank 0 probes the bare module and logs; rank 1 only tracks the step."""
    train, val = _loaders()
    monitor = _DDPCheckMonitor(num_samples=100, every_n_steps=5, plot=False)
    trainer = _trainer(
        tmp_path, max_steps=10, logger=False, callbacks=[monitor], accelerator="cpu", devices=2, strategy="ddp_spawn"
    )
    trainer.fit(DeepMLPClassifier(depth=3, width=8), train, val)


def test_feature_rank_self_log_mode_reaches_logger_and_callback_metrics(tmp_path):
    """log_via='self.log' with aligned intervals: every in-loop probe reaches the logger and callback_metrics."""
    seed_everything(0)
    logger = _ListLogger()
    monitor = FeatureRankMonitor(num_samples=100, every_n_steps=10, log_via="self.log", plot=False)
    trainer = _trainer(tmp_path, max_steps=30, log_every_n_steps=10, logger=logger, callbacks=[monitor])
    trainer.fit(DeepMLPClassifier(depth=3, width=8), *_loaders())
    key = "feature_rank/effective_rank/linears.0"
    logged = [(s, m[key]) for s, m in logger.calls if key in m]
    # step 0 goes to the loggers directly (self.log is not allowed in on_train_start); Lightning stamps the
    # in-loop values with its own step counter (global_step - 1)
    assert [s for s, _ in logged] == [0, 9, 19, 29]
    assert [v for _, v in logged] == pytest.approx([h["values"][key] for h in monitor.history], rel=1e-6)
    assert float(trainer.callback_metrics[key]) == pytest.approx(monitor.history[-1]["values"][key], rel=1e-6)
