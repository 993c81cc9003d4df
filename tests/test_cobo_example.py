"""examples/cobo_digits.yaml runs through the LightningCLI."""

from __future__ import annotations

from pathlib import Path

from lightning_epfl.cli import cli_main
from lightning_epfl.strategies import CoBo, CollaborativeStrategy

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cobo_digits.yaml"


def test_cobo_digits_yaml_fast_dev_run(tmp_path):
    """The CoBo digits example builds CoBo on 16 clients / 4 clusters and runs one step plus validation."""
    cli = cli_main(
        [
            "fit",
            "--config",
            str(EXAMPLE),
            "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.callbacks.init_args.save_dir={tmp_path / 'matrices'}",
        ]
    )
    strategy = cli.trainer.strategy
    assert isinstance(strategy, CollaborativeStrategy) and isinstance(strategy.algorithm, CoBo)
    assert strategy.n_clients == 16
    assert strategy.algorithm.rho == 0.3 and strategy.algorithm.pair_batch_size == -1
    assert strategy.stack.X.shape[0] == 16 and cli.datamodule.true_clusters.unique().numel() == 4
    metrics = cli.trainer.callback_metrics
    assert 0.0 <= float(metrics["val/acc"]) <= 1.0 and "collab/ari_spectral" in metrics
