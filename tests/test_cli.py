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


def test_cli_python_dash_m_entry_point():
    """`python -m lightning_epfl --help` works (the console script's twin)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "lightning_epfl", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "fit" in out.stdout
