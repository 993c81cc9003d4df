import glob
import os

import pytest
import torch
import yaml

from lightning_epfl.cli import EPFLCLI, cli_main

EXAMPLES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "examples", "*.yaml")))


def _print_config(args, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(args)
    assert exc.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_cli_example_print_config_round_trips(path, tmp_path, capsys):
    """Every example YAML parses, and the printed config parses again to the same config."""
    first = _print_config(["fit", "--config", path, "--print_config"], capsys)
    dumped = tmp_path / "config.yaml"
    dumped.write_text(first)
    second = _print_config(["fit", "--config", str(dumped), "--print_config"], capsys)
    assert yaml.safe_load(first) == yaml.safe_load(second)
    assert yaml.safe_load(first)["model"]["class_path"].startswith(("lightning_epfl.", "lightning."))


def test_cli_examples_exist():
    """The main job's example is present (the README quickstart runs it)."""
    assert any(p.endswith("lm_wsd_swa.yaml") for p in EXAMPLES)


def test_cli_top_level_scheduler_steps_per_optimizer_step():
    """The CLI's automatic configure_optimizers returns the scheduler with interval='step'."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    out = EPFLCLI.configure_optimizers(None, opt, sched)
    assert out["lr_scheduler"]["interval"] == "step" and out["lr_scheduler"]["scheduler"] is sched
    assert EPFLCLI.configure_optimizers(None, opt, None) is opt


def test_cli_python_dash_m_entry_point(capsys):
    """`python -m lightning_epfl` and the console script share one entry point, which offers the subcommands."""
    import runpy

    with pytest.raises(SystemExit) as exc:
        import sys

        argv, sys.argv = sys.argv, ["lightning-epfl", "--help"]
        try:
            runpy.run_module("lightning_epfl", run_name="__main__")
        finally:
            sys.argv = argv
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("fit", "validate", "test", "predict"))


def _tiny_main_job(tmp_path, max_steps):
    """The main example YAML, shrunk to seconds (same components, tiny model and windows)."""
    cfg = yaml.safe_load(open(next(p for p in EXAMPLES if p.endswith("lm_wsd_swa.yaml"))))
    tr = cfg["trainer"]
    tr.update(
        max_steps=max_steps,
        val_check_interval=4,
        limit_val_batches=2,
        log_every_n_steps=1,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    assert "logger" not in tr  # outputs follow default_root_dir
    for cb in tr["callbacks"]:
        args = cb.get("init_args", {})
        assert "save_dir" not in args and "dirpath" not in args
        if cb["class_path"].endswith("WindowedSWA"):
            args.update(window_steps=4, every_n_steps=2)
        if cb["class_path"].endswith("ModelCheckpoint"):
            args.update(every_n_train_steps=4)
    cfg["model"]["init_args"]["config"] = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    cfg["model"]["init_args"]["lr_scheduler"]["init_args"]["warmup_steps"] = 2
    cfg["data"]["init_args"].update(block_size=32, batch_size=4)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_cli_main_job_logs_swa_and_branches_cooldown(tmp_path):
    """The main job trains, logs val/loss and val/loss_swa, and a branch from a stable checkpoint follows the new
    schedule (LR = peak before the new cooldown start, WSD closed form after)."""
    import csv

    from lightning_epfl.functional.schedules import wsd_lr_factor

    job = _tiny_main_job(tmp_path, 12)
    cli = cli_main(["fit", "--config", job])
    metrics = cli.trainer.callback_metrics
    assert {"val/loss", "val/ppl", "val/loss_swa"} <= set(metrics)
    assert cli.model.model.config.vocab_size == 256
    ckpt_dir = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    assert sorted(os.listdir(ckpt_dir)) == ["step=12.ckpt", "step=4.ckpt", "step=8.ckpt"]
    branch = cli_main(
        ["fit", "--config", job, "--trainer.max_steps", "20", "--ckpt_path", str(ckpt_dir / "step=8.ckpt")]
    )
    assert branch.trainer.global_step == 20
    rows = list(csv.DictReader(open(os.path.join(branch.trainer.logger.log_dir, "metrics.csv"))))
    lrs = {int(r["step"]): float(r["lr-AdamW"]) for r in rows if r.get("lr-AdamW")}
    peak = 2e-3
    for step, lr in lrs.items():  # new run: N = 20, cooldown 20% -> S = 16, L = 4
        expected = peak * wsd_lr_factor(step, warmup_steps=2, cooldown_start=16, cooldown_steps=4)
        assert abs(lr - expected) < 1e-9, (step, lr, expected)
    assert min(lrs) == 8 and max(lrs) >= 18
