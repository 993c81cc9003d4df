import os

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_epfl.cli import cli_main
from lightning_epfl.modules import DeepMLPClassifier

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "grokking_digits.yaml")


@pytest.mark.parametrize("alpha", [1.0, 4.0])
def test_deep_mlp_every_parameter_is_alpha_times_default_init(alpha):
    """Each weight and bias equals alpha times nn.Linear's default init drawn from the same seed."""
    torch.manual_seed(3)
    model = DeepMLPClassifier(in_features=64, num_classes=10, depth=4, width=32, init_scale=alpha)
    torch.manual_seed(3)
    reference = [nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 10)]
    assert len(model.linears) == 4
    for lin, ref in zip(model.linears, reference):
        torch.testing.assert_close(lin.weight, alpha * ref.weight, rtol=0, atol=0)
        torch.testing.assert_close(lin.bias, alpha * ref.bias, rtol=0, atol=0)


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
def test_deep_mlp_forward_matches_manual_loop(activation):
    """forward() = Linear, activation, ..., Linear (no activation on the output); inputs are flattened."""
    torch.manual_seed(0)
    model = DeepMLPClassifier(depth=3, width=16, activation=activation, init_scale=2.0)
    x = torch.rand(5, 1, 8, 8)
    act = {"relu": torch.relu, "gelu": F.gelu, "tanh": torch.tanh}[activation]
    h = x.reshape(5, 64)
    h = model.linears[2](act(model.linears[1](act(model.linears[0](h)))))
    torch.testing.assert_close(model(x), h, rtol=0, atol=0)


def test_deep_mlp_losses_and_weight_norm():
    """MSE is the mean over batch x classes against one-hot targets; CE is softmax cross entropy; norm is global L2."""
    torch.manual_seed(0)
    logits, y = torch.randn(6, 10), torch.randint(0, 10, (6,))
    mse = DeepMLPClassifier(depth=2, loss="mse")
    onehot = torch.zeros(6, 10)
    onehot[torch.arange(6), y] = 1.0
    expected = sum(float((logits[i, c] - onehot[i, c]) ** 2) for i in range(6) for c in range(10)) / 60
    assert float(mse.loss_fn(logits, y)) == pytest.approx(expected, rel=1e-6)
    ce = DeepMLPClassifier(depth=2, loss="cross_entropy")
    expected_ce = float(-(logits.log_softmax(-1)[torch.arange(6), y]).mean())
    assert float(ce.loss_fn(logits, y)) == pytest.approx(expected_ce, rel=1e-6)
    norm = sum(float((p**2).sum()) for p in mse.parameters()) ** 0.5
    assert float(mse.weight_norm()) == pytest.approx(norm, rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"depth": 1}, "depth"),
        ({"width": 0}, "width"),
        ({"num_classes": 1}, "num_classes"),
        ({"activation": "sigmoid"}, r"activation.*\['gelu', 'relu', 'tanh'\]"),
        ({"loss": "hinge"}, r"loss.*\['mse', 'cross_entropy'\]"),
        ({"init_scale": 0.0}, "init_scale"),
    ],
)
def test_deep_mlp_bad_input(kwargs, match):
    """Bad arguments raise MisconfigurationException naming the argument and the allowed values."""
    with pytest.raises(MisconfigurationException, match=match):
        DeepMLPClassifier(**kwargs)


def test_deep_mlp_example_yaml_print_config_and_fast_dev_run(tmp_path, capsys):
    """examples/grokking_digits.yaml parses (print_config) and runs one fast_dev_run step with the monitor."""
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", EXAMPLE, "--print_config"])
    printed = capsys.readouterr().out
    assert "lightning_epfl.callbacks.FeatureRankMonitor" in printed and "init_scale: 4.0" in printed
    cli = cli_main(
        ["fit", "--config", EXAMPLE, "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}"]
    )
    assert cli.trainer.global_step == 1
    assert len(cli.model.linears) == 8 and cli.model.hparams.init_scale == 4.0
    assert len(cli.datamodule.train_dataset) == 200 and len(cli.datamodule.val_dataset) == 1597
    monitor = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "FeatureRankMonitor")
    assert [h["step"] for h in monitor.history] == [0, 1]
    assert set(monitor.history[0]["values"]) >= {
        "feature_rank/effective_rank/linears.6",
        "feature_rank/dead_units/linears.0",
    }
    assert "train/loss" in cli.trainer.callback_metrics


@pytest.mark.slow
def test_deep_mlp_grokking_on_digits(tmp_path):
    """Slow (~3-10 min): the example groks: train 100% early, val <= 0.5 at step 1000, >= 0.85 at 20k, rank falls."""
    cli = cli_main(
        [
            "fit",
            "--config",
            EXAMPLE,
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    import csv

    with open(os.path.join(cli.trainer.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    val = {int(r["step"]): float(r["val/acc"]) for r in rows if r.get("val/acc")}
    train = {int(r["step"]): float(r["train/acc"]) for r in rows if r.get("train/acc")}
    assert min(s for s, a in train.items() if a >= 0.995) <= 2000
    assert val[min(val, key=lambda s: abs(s - 1000))] <= 0.5
    assert val[max(val)] >= 0.85
    monitor = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "FeatureRankMonitor")
    steps, eff = monitor.series("effective_rank")["linears.6"]
    assert eff[-1] <= 0.4 * max(eff)
