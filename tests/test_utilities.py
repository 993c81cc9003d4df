import os

import pytest
import torch

from lightning_epfl.utilities import atomic_torch_save, atomic_write, atomic_write_bytes, step_scheduler_config


def test_atomic_write_failure_keeps_old_file(tmp_path):
    """A write that fails leaves the previous file intact and no temporary file behind."""
    path = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(path, b"old")

    def broken(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old"
    assert os.listdir(path.parent) == ["f.bin"]
    atomic_torch_save({"x": torch.arange(3)}, path)
    assert torch.equal(torch.load(path)["x"], torch.arange(3))


def test_step_scheduler_config_intervals():
    """Schedulers step per optimizer step; no scheduler returns the optimizer alone."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert step_scheduler_config(opt, None) is opt
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    assert step_scheduler_config(opt, sched)["lr_scheduler"] == {"scheduler": sched, "interval": "step"}
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    assert "interval" not in step_scheduler_config(opt, plateau)["lr_scheduler"]
