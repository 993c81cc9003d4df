"""Tests of windowed SWA: the averaging math and the ``WindowedSWA`` callback (spec wsd_swa.md §5, checks 7-12)."""

import os
from copy import deepcopy

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from lightning_epfl.callbacks import WindowedSWA
from lightning_epfl.functional.averaging import running_mean_, weighted_average

# ---------------------------------------------------------------------------------------------- functional core


def test_running_mean_matches_stack_mean():
    """running_mean_ over 7 snapshots equals torch.stack(...).mean in float64 (1e-6)."""
    g = torch.Generator().manual_seed(0)
    snaps = [[torch.randn(3, 4, generator=g), torch.randn(5, generator=g)] for _ in range(7)]
    avg = [torch.zeros(3, 4), torch.zeros(5)]
    for c, s in enumerate(snaps, start=1):
        running_mean_(avg, s, c)
    for i in range(2):
        ref = torch.stack([s[i].double() for s in snaps]).mean(0)
        torch.testing.assert_close(avg[i].double(), ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="count"):
        running_mean_(avg, snaps[0], 0)
    with pytest.raises(ValueError, match="Shape"):
        running_mean_(avg, [torch.zeros(2), torch.zeros(5)], 2)


def test_weighted_average_equals_pooled_mean():
    """Count-weighted mean of window means equals the mean of all their snapshots; output never aliases input."""
    g = torch.Generator().manual_seed(1)
    windows = [torch.randn(c, 6, generator=g, dtype=torch.float64) for c in (2, 5, 3)]
    states = [{"w": w.mean(0), "n": torch.tensor(i)} for i, w in enumerate(windows)]
    out = weighted_average(states, [2, 5, 3])
    torch.testing.assert_close(out["w"], torch.cat(windows).mean(0), atol=1e-12, rtol=0)
    assert out["n"].item() == 2  # non-float entries come from the newest state
    out["w"].add_(1.0)
    torch.testing.assert_close(states[0]["w"], windows[0].mean(0))
    with pytest.raises(ValueError, match="counts"):
        weighted_average(states, [1, 0, 1])
    with pytest.raises(ValueError, match="states"):
        weighted_average([], [])


def _bf16_ulp(x):
    return 2.0 ** (torch.floor(torch.log2(x.abs().clamp_min(1e-30))) - 7)


def test_running_mean_bf16_model_fp32_accumulator():
    """bf16 snapshots in an fp32 accumulator stay within 1 bf16 ulp of the fp64 mean; a bf16 accumulator does not."""
    g = torch.Generator().manual_seed(2)
    snaps = [(1.0 + 0.1 * torch.randn(4096, generator=g)).to(torch.bfloat16) for _ in range(64)]
    exact = torch.stack([s.double() for s in snaps]).mean(0)
    acc32, acc16 = [torch.zeros(4096)], [torch.zeros(4096, dtype=torch.bfloat16)]
    for c, s in enumerate(snaps, start=1):
        running_mean_(acc32, [s], c)
        running_mean_(acc16, [s], c)
    ulp = _bf16_ulp(exact)
    assert ((acc32[0].to(torch.bfloat16).double() - exact).abs() <= ulp).all()
    assert ((acc16[0].double() - exact).abs() > ulp).any()


# ---------------------------------------------------------------------------------------------- callback


class _Model(BoringModel):
    """Linear-BatchNorm-Dropout-Linear on fixed data; logs ``val/loss``.

    ``same_batches=True`` makes the 10 training batches identical: Lightning 2.6 resumes an epoch-end checkpoint by
    fetching one extra batch from a fresh iterator, so only identical batches make resumed and uninterrupted runs
    see the same data.
    """

    def __init__(self, dropout: float = 0.0, same_batches: bool = True, lr: float = 0.05):
        super().__init__()
        self.layer = torch.nn.Sequential(
            torch.nn.Linear(32, 16), torch.nn.BatchNorm1d(16), torch.nn.Dropout(dropout), torch.nn.Linear(16, 2)
        )
        g = torch.Generator().manual_seed(1)
        block = torch.randn(4, 32, generator=g)
        self.train_data = block.repeat(10, 1) if same_batches else torch.randn(40, 32, generator=g)
        self.val_data = torch.randn(12, 32, generator=g)
        self.lr = lr

    def train_dataloader(self):
        return DataLoader(self.train_data, batch_size=4, shuffle=False)

    def val_dataloader(self):
        return DataLoader(self.val_data, batch_size=4, shuffle=False)

    def validation_step(self, batch, batch_idx):
        loss = self.step(batch)
        self.log("val/loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: 1.0 / (1 + 0.05 * n))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _Snapshots(Callback):
    """Slow reference: store the full state after every k-th optimizer step (once per step)."""

    def __init__(self, every: int, start: int = 0):
        self.every, self.start, self.snaps, self.lrs = every, start, {}, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        s = trainer.global_step
        if s % self.every == 0 and s > self.start and s not in self.snaps:
            self.snaps[s] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


class _MetricsAtValidation(Callback):
    """Record ``callback_metrics`` after each validation run, keyed by global step."""

    def __init__(self):
        self.seen = {}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.seen[trainer.global_step] = {k: float(v) for k, v in trainer.callback_metrics.items()}


def _trainer(tmp_path, max_steps, callbacks=(), **kw):
    kw.setdefault("limit_val_batches", 0)
    kw.setdefault("limit_train_batches", 10)
    return Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        callbacks=list(callbacks),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        num_sanity_val_steps=0,
        **kw,
    )


def _float_keys(state):
    return [k for k, v in state.items() if torch.is_floating_point(v)]


def _mean_of(snaps, steps):
    keys = _float_keys(snaps[steps[0]])
    return {k: torch.stack([snaps[s][k].double() for s in steps]).mean(0) for k in keys}


def _assert_state_close(got, ref, atol=1e-6):
    for k, v in ref.items():
        torch.testing.assert_close(got[k].double(), v.double(), atol=atol, rtol=0, msg=k)


def test_windowed_swa_equals_slow_loop(tmp_path):
    """H=20, k=5, 3 windows: each window = explicit snapshot mean = AveragedModel; horizon j = last 4j snapshots."""
    seed_everything(0)
    swa = WindowedSWA(window_steps=20, every_n_steps=5, keep_windows=3, horizons=[1, 2, 3])
    rec = _Snapshots(5)
    model = _Model(same_batches=False)
    _trainer(tmp_path, 60, [swa, rec]).fit(model)
    assert sorted(rec.snaps) == list(range(5, 61, 5))
    assert swa.num_closed_windows == 3
    for w, window in enumerate(swa._closed):  # internal: the frozen windows
        steps = list(range(20 * w + 5, 20 * w + 21, 5))
        assert (window["window"], window["count"]) == (w, 4)
        _assert_state_close(window["state"], _mean_of(rec.snaps, steps))
        oracle = AveragedModel(deepcopy(model), use_buffers=True)
        tmp = deepcopy(model)
        for s in steps:
            tmp.load_state_dict(rec.snaps[s])
            oracle.update_parameters(tmp)
        ref = oracle.module.state_dict()
        _assert_state_close(window["state"], {k: ref[k] for k in _float_keys(ref)})
    for j in (1, 2, 3):
        _assert_state_close(swa.average_state_dict(j), _mean_of(rec.snaps, list(range(65 - 20 * j, 61, 5))))
    avg = swa.average_state_dict(1)
    assert avg["layer.1.num_batches_tracked"].item() == 60  # integer buffer: latest snapshot
    before = {k: v.clone() for k, v in avg.items()}
    for v in avg.values():
        v.add_(1)
    _assert_state_close(swa.average_state_dict(1), before, atol=0)  # editing the result does not leak


def test_windowed_swa_accumulation_and_misaligned_start(tmp_path):
    """accumulate_grad_batches=2 gives one update per k optimizer steps; a start_step window is count-weighted."""
    seed_everything(0)
    swa = WindowedSWA(window_steps=10, every_n_steps=2, start_step=12, horizons=[1, 2])
    rec = _Snapshots(2, start=12)
    _trainer(tmp_path, 30, [swa, rec], accumulate_grad_batches=2, limit_train_batches=20).fit(
        _Model(same_batches=False)
    )
    assert [(w["window"], w["count"]) for w in swa._closed] == [(1, 4), (2, 5)]
    assert sorted(rec.snaps) == list(range(14, 31, 2))
    _assert_state_close(swa.average_state_dict(2), _mean_of(rec.snaps, list(range(14, 31, 2))))
    _assert_state_close(swa.average_state_dict(1), _mean_of(rec.snaps, list(range(22, 31, 2))))


@pytest.mark.parametrize("use_save_dir", [False, True])
def test_windowed_swa_resume_mid_window(tmp_path, use_save_dir):
    """A run checkpointed at step 30 (mid-window, H=20) and resumed ends with the uninterrupted run's averages."""

    def make_swa(name):
        save_dir = str(tmp_path / name) if use_save_dir else None
        return WindowedSWA(window_steps=20, every_n_steps=5, keep_windows=3, horizons=[1, 2], save_dir=save_dir)

    seed_everything(0)
    full = make_swa("swa_full")
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", save_top_k=-1, every_n_epochs=1)
    _trainer(tmp_path / "a", 60, [full, ckpt_cb]).fit(_Model())
    ckpt = str(tmp_path / "ckpt" / "step=30.ckpt")
    saved = torch.load(ckpt, weights_only=False)["callbacks"][full.state_key]
    assert saved["count"] == 2 and saved["last_update_step"] == 30  # mid-window: 2 snapshots of window 1
    assert "state" in saved["closed"][0] and "file" not in saved["closed"][0]  # self-contained checkpoint

    resumed = make_swa("swa_resumed")
    trainer = _trainer(tmp_path / "b", 60, [resumed])
    trainer.fit(_Model(), ckpt_path=ckpt)
    assert trainer.global_step == 60
    assert [(w["window"], w["count"]) for w in resumed._closed] == [(0, 4), (1, 4), (2, 4)]
    for j in (1, 2):
        _assert_state_close(resumed.average_state_dict(j), full.average_state_dict(j))
    folder = tmp_path / "swa_resumed" if use_save_dir else tmp_path / "b" / "swa"  # default: in the run's folder
    assert sorted(os.listdir(folder)) == ["swa_average_h1.pt", "swa_average_h2.pt"]
    on_disk = torch.load(folder / "swa_average_h2.pt", weights_only=True)
    _assert_state_close(on_disk, full.average_state_dict(2), atol=0)


def _run_with_validation(tmp_path, callbacks, max_steps=30):
    seed_everything(0)
    model = _Model(dropout=0.3, same_batches=False)
    rec = _Snapshots(5)
    trainer = _trainer(tmp_path, max_steps, [rec, *callbacks], limit_val_batches=3, val_check_interval=5)
    trainer.fit(model)
    return model, rec, trainer


def test_windowed_swa_raw_training_bitwise_unchanged(tmp_path):
    """Raw weights, LRs, RNG state and val/loss are bitwise equal with and without WindowedSWA (eval pass included)."""
    plain, plain_rec, plain_trainer = _run_with_validation(tmp_path / "plain", [])
    rng_plain = torch.get_rng_state()
    swa = WindowedSWA(window_steps=10, every_n_steps=5, horizons=[1, 2])
    averaged, avg_rec, avg_trainer = _run_with_validation(tmp_path / "swa", [swa])
    rng_swa = torch.get_rng_state()
    assert "val/loss_swa" in avg_trainer.callback_metrics  # the eval pass did run
    assert torch.equal(rng_plain, rng_swa)
    assert plain_rec.lrs == avg_rec.lrs
    for (k, a), b in zip(plain.state_dict().items(), averaged.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(plain_trainer.callback_metrics["val/loss"], avg_trainer.callback_metrics["val/loss"])


def test_windowed_swa_val_loss_swa_matches_fresh_module(tmp_path):
    """val/loss_swa equals a fresh module loaded with average_state_dict(1); no _swa key before the first window."""
    swa = WindowedSWA(window_steps=10, every_n_steps=5, horizons=[1, 2])
    seen = _MetricsAtValidation()
    model, _, trainer = _run_with_validation(tmp_path, [swa, seen], max_steps=20)
    assert sorted(seen.seen) == [5, 10, 15, 20]
    assert not any("_swa" in k or k.startswith("swa/") for k in seen.seen[5])
    assert "val/loss_swa" in seen.seen[10] and "val/loss_swa_h2" not in seen.seen[10]
    assert seen.seen[20]["swa/windows"] == 2.0 and "val/loss_swa_h2" in seen.seen[20]

    for key, horizon in (("val/loss_swa", 1), ("val/loss_swa_h2", 2)):
        fresh = _Model(dropout=0.3, same_batches=False)
        fresh.load_state_dict(swa.average_state_dict(horizon))
        fresh.eval()
        with torch.no_grad():
            losses = [fresh.step(b) for b in list(fresh.val_dataloader())[:3]]
        expected = torch.stack(losses).mean().item()  # equal batch sizes: batch-weighted mean = mean
        assert seen.seen[20][key] == pytest.approx(expected, abs=1e-6)
    raw = torch.stack([model.step(b) for b in list(model.eval().val_dataloader())[:3]]).mean().item()
    assert seen.seen[20]["val/loss"] == pytest.approx(raw, abs=1e-6)  # raw metric is the raw model's
    assert seen.seen[20]["val/loss_swa"] != pytest.approx(raw, abs=1e-4)


def test_windowed_swa_apply_at_end_and_swapped(tmp_path):
    """apply_at_end loads the average at train end; default keeps raw weights; swapped() restores them."""
    seed_everything(0)
    keep = WindowedSWA(window_steps=10, every_n_steps=5, evaluate=False)
    model = _Model()
    _trainer(tmp_path / "a", 20, [keep]).fit(model)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with keep.swapped(model):
        _assert_state_close(model.state_dict(), {k: v for k, v in keep.average_state_dict(1).items()}, atol=0)
    _assert_state_close(model.state_dict(), raw, atol=0)
    assert not torch.equal(raw["layer.0.weight"], keep.average_state_dict(1)["layer.0.weight"])

    seed_everything(0)
    apply = WindowedSWA(window_steps=10, every_n_steps=5, evaluate=False, apply_at_end=True)
    model = _Model()
    _trainer(tmp_path / "b", 20, [apply]).fit(model)
    _assert_state_close(model.state_dict(), apply.average_state_dict(1), atol=1e-7)


def test_windowed_swa_changed_window_drops_state(tmp_path):
    """Resuming with a different window_steps warns and starts averaging afresh."""
    seed_everything(0)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", save_top_k=-1, every_n_epochs=1)
    _trainer(tmp_path / "a", 20, [WindowedSWA(window_steps=10, every_n_steps=5), ckpt_cb]).fit(_Model())
    changed = WindowedSWA(window_steps=20, every_n_steps=5)
    with pytest.warns(RuntimeWarning, match="dropped"):
        _trainer(tmp_path / "b", 30, [changed]).fit(_Model(), ckpt_path=str(tmp_path / "ckpt" / "step=20.ckpt"))
    assert [(w["window"], w["count"]) for w in changed._closed] == []  # window (20, 40] is still open
    assert changed._count == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window_steps": 0}, "window_steps"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"window_steps": 10, "every_n_steps": 3}, "must divide"),
        ({"start_step": -1}, "start_step"),
        ({"keep_windows": 0}, "keep_windows"),
        ({"horizons": [1, 6], "keep_windows": 5}, "horizons"),
        ({"horizons": [0]}, "horizons"),
        ({"horizons": []}, "horizons"),
        ({"dtype": "bfloat16"}, "dtype"),
        ({"log_suffix": ""}, "log_suffix"),
    ],
)
def test_windowed_swa_bad_arguments(kwargs, match):
    """Bad constructor arguments raise MisconfigurationException naming the argument."""
    with pytest.raises(MisconfigurationException, match=match):
        WindowedSWA(**kwargs)


def test_windowed_swa_no_average_before_first_window():
    """average_state_dict raises before any window has closed."""
    with pytest.raises(ValueError, match="No SWA window"):
        WindowedSWA().average_state_dict(1)
