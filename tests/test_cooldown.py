"""Tests of the ``Cooldown`` callback: branching a cooldown from a trunk equals a planned WSD run (spec §5, check 6)."""

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from lightning_epfl.callbacks import Cooldown
from lightning_epfl.functional.schedules import WSDScheduler, wsd_lr_factor

PEAK = 0.05


class _Model(BoringModel):
    """BoringModel on fixed data (10 identical batches of 4) with AdamW and an optional WSDScheduler.

    The batches are identical because Lightning 2.6 resumes an epoch-end checkpoint by fetching one more batch
    from a fresh (non-stateful) iterator; with identical batches the data order cannot differ between a resumed
    and an uninterrupted run, so the test isolates the LR, optimizer-state and weight handling.
    """

    def __init__(self, sched: dict | None = None, kind: str = "wsd", interval: str = "step"):
        super().__init__()
        self.sched, self.kind, self.interval = sched, kind, interval
        self.data = torch.randn(4, 32, generator=torch.Generator().manual_seed(1)).repeat(10, 1)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=4, shuffle=False)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=PEAK)
        if self.sched is None:
            return opt
        if self.kind == "wsd":
            sched = WSDScheduler(opt, **self.sched)
        else:
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.interval}}


class _LRRecorder(Callback):
    """Record the LR each optimizer step uses."""

    def __init__(self):
        self.lrs = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def _trainer(tmp_path, max_steps, callbacks=(), **kw):
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    return Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        limit_train_batches=10,
        limit_val_batches=0,
        callbacks=list(callbacks),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=checkpointing,
        **kw,
    )


def _epoch_ckpt(tmp_path):
    """Checkpoint at every epoch end (10 steps), named ``step=<n>.ckpt``: resuming starts a fresh epoch."""
    return ModelCheckpoint(dirpath=tmp_path, filename="{step}", save_top_k=-1, every_n_epochs=1)


def _weights(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


@pytest.mark.parametrize("warmup", [None, 5])
def test_cooldown_branch_equals_planned_run(tmp_path, warmup):
    """A 40-step trunk resumed with Cooldown(0.2) to 50 steps equals WSDScheduler(total_steps=50, cooldown_steps=10)."""
    trunk_sched = None if warmup is None else {"warmup_steps": warmup}
    w = warmup or 0
    seed_everything(0)
    planned_rec = _LRRecorder()
    planned = _Model({"warmup_steps": w, "total_steps": 50, "cooldown_steps": 10})
    _trainer(tmp_path / "planned", 50, [planned_rec]).fit(planned)

    seed_everything(0)
    trunk_rec = _LRRecorder()
    trunk = _Model(trunk_sched)
    _trainer(tmp_path / "trunk", 40, [trunk_rec, _epoch_ckpt(tmp_path / "ckpt")]).fit(trunk)
    ckpt = str(tmp_path / "ckpt" / "step=40.ckpt")

    branch_rec = _LRRecorder()
    cooldown = Cooldown(cooldown_fraction=0.2)
    branch = _Model(trunk_sched)
    branch_trainer = _trainer(tmp_path / "branch", 50, [branch_rec, cooldown])
    branch_trainer.fit(branch, ckpt_path=ckpt)

    assert branch_trainer.global_step == 50
    assert (cooldown.start, cooldown.length) == (40, 10)
    expected = [PEAK * wsd_lr_factor(n, warmup_steps=w, cooldown_start=40, cooldown_steps=10) for n in range(50)]
    assert planned_rec.lrs == pytest.approx(expected, abs=1e-12, rel=0)
    assert trunk_rec.lrs + branch_rec.lrs == pytest.approx(planned_rec.lrs, abs=1e-12, rel=0)
    torch.testing.assert_close(_weights(branch), _weights(planned), atol=1e-7, rtol=0)
    assert not torch.equal(_weights(branch), _weights(trunk))  # the cooldown steps did move the weights


def test_cooldown_resume_inside_same_cooldown(tmp_path):
    """A branch checkpointed mid-cooldown resumes into the same cooldown instead of raising."""
    seed_everything(0)
    full_rec = _LRRecorder()
    callbacks = [full_rec, Cooldown(cooldown_steps=20), _epoch_ckpt(tmp_path / "ckpt")]
    _trainer(tmp_path / "full", 50, callbacks).fit(_Model())
    resumed_rec = _LRRecorder()
    resumed = _trainer(tmp_path / "b", 50, [resumed_rec, Cooldown(cooldown_steps=20)])
    resumed.fit(_Model(), ckpt_path=str(tmp_path / "ckpt" / "step=40.ckpt"))
    assert resumed.global_step == 50
    assert full_rec.lrs[:40] + resumed_rec.lrs == pytest.approx(full_rec.lrs, abs=1e-12, rel=0)
    assert full_rec.lrs[40] < PEAK


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cooldown_fraction": 0.0}, "cooldown_fraction"),
        ({"cooldown_fraction": 1.2}, "cooldown_fraction"),
        ({"shape": "exp"}, "shape"),
        ({"final_lr_ratio": 2.0}, "final_lr_ratio"),
        ({"cooldown_steps": -1}, "cooldown_steps"),
    ],
)
def test_cooldown_bad_arguments(kwargs, match):
    """Bad constructor arguments raise MisconfigurationException naming the argument."""
    with pytest.raises(MisconfigurationException, match=match):
        Cooldown(**kwargs)


@pytest.mark.parametrize(
    ("model_kwargs", "max_steps", "match"),
    [
        ({}, -1, "max_steps"),
        ({"sched": {}, "kind": "steplr"}, 20, "StepLR"),
        ({"sched": {}, "interval": "epoch"}, 20, "interval"),
        ({"sched": {"warmup_steps": 10}}, 20, "warmup_steps"),
        ({}, 20, "must end by"),
    ],
)
def test_cooldown_bad_setup(tmp_path, model_kwargs, max_steps, match):
    """max_steps=-1, a non-WSD scheduler, an epoch interval, a cooldown inside warmup or too long raise early."""
    cooldown = Cooldown(cooldown_steps=25) if match == "must end by" else Cooldown(cooldown_fraction=0.8)
    trainer = _trainer(tmp_path, max_steps, [cooldown], max_epochs=1)
    with pytest.raises(MisconfigurationException, match=match):
        trainer.fit(_Model(**model_kwargs))


def test_cooldown_start_before_resumed_step(tmp_path):
    """Resuming at step 40 with a cooldown that would start at 36 raises, naming the resumed step."""
    seed_everything(0)
    _trainer(tmp_path / "trunk", 40, [_epoch_ckpt(tmp_path / "ckpt")]).fit(_Model())
    ckpt = str(tmp_path / "ckpt" / "step=40.ckpt")
    trainer = _trainer(tmp_path / "branch", 45, [Cooldown(cooldown_fraction=0.2)])
    with pytest.raises(MisconfigurationException, match="resumed step 40"):
        trainer.fit(_Model(), ckpt_path=ckpt)


def test_cooldown_fast_dev_run_skips_placement(tmp_path):
    """Under fast_dev_run the cooldown is not placed (no warmup-overlap error); bad schedulers still raise."""
    rec = _LRRecorder()
    cooldown = Cooldown()
    trainer = Trainer(
        default_root_dir=tmp_path, fast_dev_run=True, callbacks=[rec, cooldown], enable_progress_bar=False
    )
    trainer.fit(_Model({"warmup_steps": 30}))
    assert cooldown.start is None and rec.lrs == [0.0]  # step 0 of a 30-step warmup from 0
    trainer = Trainer(default_root_dir=tmp_path, fast_dev_run=True, callbacks=[Cooldown()], enable_progress_bar=False)
    with pytest.raises(MisconfigurationException, match="StepLR"):
        trainer.fit(_Model({}, kind="steplr"))
