"""Tests of the WSD schedule math and ``WSDScheduler`` (spec wsd_swa.md §5 checks 1-5, slow qualitative check)."""

import csv
import io
import math
import random
from pydoc_data.topics import topics

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger

from lightning_epfl.functional.averaging import running_mean_
from lightning_epfl.functional.schedules import (
    WSDScheduler,
    cooldown_factor,
    resolve_cooldown,
    wsd_lr_factor,
)

# g(1/4), g(1/2) from the spec's table (wsd_swa.md §1), computed by hand.
_TABLE = {
    "1-sqrt": (0.5, 1 - math.sqrt(0.5)),
    "linear": (0.75, 0.5),
    "cosine": (0.5 * (1 + math.cos(math.pi / 4)), 0.5),
    "mirror_cosine": (1.5 - 0.5 * (1 + math.cos(math.pi / 4)), 0.5),
    "1-square": (0.9375, 0.75),
}
_SHAPES = list(_TABLE)


def _opt(lrs=(0.1,)):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in lrs]
    return torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)])


def _lrs(sched, steps):
    """LR of group 0 used by each of the next ``steps`` optimizer steps."""
    out = []
    for _ in range(steps):
        out.append(float(sched.optimizer.param_groups[0]["lr"]))
        sched.optimizer.step()
        sched.step()
    return out


@pytest.mark.parametrize("shape", _SHAPES)
def test_cooldown_factor_table(shape):
    """cooldown_factor reproduces the spec table at t = 0, 1/4, 1/2, 1 (1e-12), with and without a final ratio."""
    q, h = _TABLE[shape]
    assert cooldown_factor(0.0, shape) == pytest.approx(1.0, abs=1e-12)
    assert cooldown_factor(0.25, shape) == pytest.approx(q, abs=1e-12)
    assert cooldown_factor(0.5, shape) == pytest.approx(h, abs=1e-12)
    assert cooldown_factor(1.0, shape) == pytest.approx(0.0, abs=1e-12)
    assert cooldown_factor(0.25, shape, 0.1) == pytest.approx(0.1 + 0.9 * q, abs=1e-12)
    assert cooldown_factor(1.0, shape, 0.1) == pytest.approx(0.1, abs=1e-12)


def test_cooldown_factor_table_values():
    """The hand-computed table agrees with the rounded values printed in the spec."""
    printed = {
        "1-sqrt": (0.5, 0.292893),
        "linear": (0.75, 0.5),
        "cosine": (0.853553, 0.5),
        "mirror_cosine": (0.646447, 0.5),
        "1-square": (0.9375, 0.75),
    }
    for shape, (q, h) in printed.items():
        assert cooldown_factor(0.25, shape) == pytest.approx(q, abs=1e-6)
        assert cooldown_factor(0.5, shape) == pytest.approx(h, abs=1e-6)


@pytest.mark.parametrize("shape", _SHAPES)
@pytest.mark.parametrize("ratios", [(0.0, 0.0), (0.05, 0.1)])
def test_wsd_lr_factor_phases(shape, ratios):
    """lambda(0)=r0, lambda(W)=lambda(S-1)=lambda(S)=1, lambda(N)=lambda(N+7)=rf, monotone after W, in [rf, 1]."""
    r0, rf = ratios
    w, n = 10, 100
    s, length = resolve_cooldown(n, cooldown_fraction=0.2)
    assert (s, length) == (80, 20)
    kw = dict(warmup_steps=w, cooldown_start=s, cooldown_steps=length, shape=shape, init_lr_ratio=r0)
    lam = [wsd_lr_factor(i, final_lr_ratio=rf, **kw) for i in range(n + 8)]
    assert lam[0] == pytest.approx(r0, abs=1e-15)
    assert lam[5] == pytest.approx(r0 + (1 - r0) * 0.5, abs=1e-15)
    assert lam[w] == lam[s - 1] == lam[s] == 1.0
    assert lam[n] == pytest.approx(rf, abs=1e-15) and lam[n + 7] == pytest.approx(rf, abs=1e-15)
    after = lam[w:]
    assert all(b <= a + 1e-15 for a, b in zip(after, after[1:]))
    assert all(rf - 1e-15 <= x <= 1.0 + 1e-15 for x in after)
    assert lam[s + 5] == pytest.approx(cooldown_factor(0.25, shape, rf), abs=1e-15)


def test_wsd_lr_factor_trunk_is_constant():
    """Without a cooldown start the multiplier stays 1 after warmup, forever."""
    assert [wsd_lr_factor(i, warmup_steps=3) for i in (3, 10, 10**6)] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("ratio", [0.0, 0.1])
@pytest.mark.parametrize("warmup", [0, 7])
def test_wsd_scheduler_matches_transformers(shape, ratio, warmup):
    """WSDScheduler equals transformers' get_wsd_schedule step by step for the shapes both implement (oracle)."""
    tf_opt = pytest.importorskip("transformers.optimization")
    n, length = 60, 12
    ours = WSDScheduler(
        _opt(),
        warmup_steps=warmup,
        total_steps=n,
        cooldown_steps=length,
        shape=shape,
        init_lr_ratio=ratio,
        final_lr_ratio=ratio,
    )
    ref = tf_opt.get_wsd_schedule(
        _opt(),
        num_warmup_steps=warmup,
        num_decay_steps=length,
        num_training_steps=n,
        decay_type=shape,
        min_lr_ratio=ratio,
    )
    lam_ref = ref.lr_lambdas[0]
    for i in range(n + 6):
        assert ours.lr_factor(i) == pytest.approx(lam_ref(i), abs=1e-12, rel=0)
    ours_lrs, ref_lrs = _lrs(ours, n + 5), _lrs(ref, n + 5)
    assert ours_lrs == pytest.approx(ref_lrs, abs=1e-12, rel=0)


def test_wsd_scheduler_exact_resume():
    """Saving and loading mid-cooldown continues the identical LR sequence."""
    kw = dict(warmup_steps=5, total_steps=50, cooldown_fraction=0.4, shape="cosine")
    full = WSDScheduler(_opt((0.1, 0.02)), **kw)
    expected = _lrs(full, 50)
    first = WSDScheduler(_opt((0.1, 0.02)), **kw)
    got = _lrs(first, 35)
    buf = io.BytesIO()
    torch.save({"opt": first.optimizer.state_dict(), "sched": first.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    opt = _opt((0.1, 0.02))
    resumed = WSDScheduler(opt, **kw)
    opt.load_state_dict(state["opt"])
    resumed.load_state_dict(state["sched"])
    got += _lrs(resumed, 15)
    assert got == expected


class _OldLambda:
    """Callable-object lambda, pickled into LambdaLR's state_dict (the negative control)."""

    def __init__(self, **kw):
        self.kw = kw

    def __call__(self, step):
        return wsd_lr_factor(step, **self.kw)


def test_wsd_scheduler_new_config_on_resume():
    """Resuming 100 constant steps into (total 150, cooldown 30, new peak) follows the new closed form at once."""
    trunk = WSDScheduler(_opt((0.1,)), warmup_steps=10)
    _lrs(trunk, 100)
    opt_state, sched_state = trunk.optimizer.state_dict(), trunk.state_dict()
    opt = _opt((0.05,))
    branch = WSDScheduler(opt, warmup_steps=10, total_steps=150, cooldown_steps=30)
    opt.load_state_dict(opt_state)  # restores the trunk's lr 0.1 and initial_lr 0.1
    with pytest.warns(RuntimeWarning, match="peak LRs"):
        branch.load_state_dict(sched_state)
    assert branch.last_epoch == 100
    got = _lrs(branch, 55)
    expected = [
        0.05 * wsd_lr_factor(i, warmup_steps=10, cooldown_start=120, cooldown_steps=30) for i in range(100, 155)
    ]
    assert got == pytest.approx(expected, abs=1e-15, rel=0)
    assert got[0] == 0.05 and got[-1] == 0.0


def test_lambdalr_keeps_old_config_on_resume():
    """Negative control: LambdaLR restores its old callable-object lambda and peak, ignoring the new config."""
    old = _OldLambda(warmup_steps=10)
    trunk = torch.optim.lr_scheduler.LambdaLR(_opt((0.1,)), old)
    _lrs(trunk, 100)
    opt_state, sched_state = trunk.optimizer.state_dict(), trunk.state_dict()
    opt = _opt((0.05,))
    branch = torch.optim.lr_scheduler.LambdaLR(opt, _OldLambda(warmup_steps=10, cooldown_start=120, cooldown_steps=30))
    opt.load_state_dict(opt_state)
    branch.load_state_dict(sched_state)
    got = _lrs(branch, 55)
    new = [0.05 * wsd_lr_factor(i, warmup_steps=10, cooldown_start=120, cooldown_steps=30) for i in range(100, 155)]
    assert got != pytest.approx(new, abs=1e-6)
    assert got[-1] == pytest.approx(0.1)  # still the old constant schedule at the old peak


def test_wsd_scheduler_set_cooldown_and_phase():
    """set_cooldown rewrites the current LR at once; phase follows the steps."""
    sched = WSDScheduler(_opt((0.2,)), warmup_steps=2)
    assert sched.phase == "warmup"
    _lrs(sched, 10)
    assert sched.phase == "stable"
    sched.set_cooldown(start=8, steps=4, shape="linear")
    assert sched.phase == "cooldown"
    assert sched.optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * 0.5, abs=1e-15)
    _lrs(sched, 2)
    assert sched.phase == "final" and sched.optimizer.param_groups[0]["lr"] == 0.0


def test_wsd_scheduler_tensor_lr():
    """A tensor LR (capturable optimizers) is filled in place with the closed form, never replaced by a float."""
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([param], lr=torch.tensor(0.1))
    lr_tensor = opt.param_groups[0]["lr"]
    sched = WSDScheduler(opt, warmup_steps=2, total_steps=10)
    got = [float(v) for v in _lrs(sched, 10)]
    expected = [0.1 * wsd_lr_factor(n, warmup_steps=2, cooldown_start=8, cooldown_steps=2) for n in range(10)]
    assert got == pytest.approx(expected, rel=1e-6)
    assert opt.param_groups[0]["lr"] is lr_tensor


class _TwoGroupModel(BoringModel):
    def __init__(self, peaks=(0.1, 0.03)):
        super().__init__()
        self.extra = torch.nn.Linear(2, 2)
        self.peaks = peaks

    def configure_optimizers(self):
        opt = torch.optim.SGD(
            [
                {"params": self.layer.parameters(), "lr": self.peaks[0]},
                {"params": self.extra.parameters(), "lr": self.peaks[1]},
            ]
        )
        sched = WSDScheduler(opt, warmup_steps=3, total_steps=12, cooldown_steps=4, shape="linear")
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_wsd_scheduler_lr_monitor_accumulation(tmp_path):
    """With two groups and accumulate_grad_batches=2, LearningRateMonitor logs base*lambda per optimizer step."""
    torch.manual_seed(0)
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_steps=12,
        accumulate_grad_batches=2,
        limit_val_batches=0,
        log_every_n_steps=1,
        callbacks=[LearningRateMonitor(logging_interval="step")],
        logger=CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(_TwoGroupModel())
    assert trainer.global_step == 12
    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lr-SGD/pg1")]
    by_step = {int(r["step"]): (float(r["lr-SGD/pg1"]), float(r["lr-SGD/pg2"])) for r in rows}
    assert sorted(by_step) == list(range(12))
    for n, (lr1, lr2) in by_step.items():
        lam = wsd_lr_factor(n, warmup_steps=3, cooldown_start=8, cooldown_steps=4, shape="linear")
        assert lr1 == pytest.approx(0.1 * lam, abs=1e-12) and lr2 == pytest.approx(0.03 * lam, abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(total_steps=100, cooldown_fraction=0.0), "cooldown_fraction"),
        (dict(total_steps=100, cooldown_fraction=1.5), "cooldown_fraction"),
        (dict(total_steps=100, warmup_steps=90, cooldown_fraction=0.2), "warmup_steps"),
        (dict(total_steps=100, cooldown_steps=120), "total_steps"),
        (dict(total_steps=100, shape="exp"), "shape"),
        (dict(init_lr_ratio=-0.1), "init_lr_ratio"),
        (dict(final_lr_ratio=1.5), "final_lr_ratio"),
        (dict(warmup_steps=10, cooldown_start=5, cooldown_steps=3), "cooldown_start"),
        (dict(cooldown_start=5), "cooldown_steps"),
    ],
)
def test_wsd_scheduler_bad_input(kwargs, match):
    """Bad configurations raise a ValueError naming the argument."""
    with pytest.raises(ValueError, match=match):
        WSDScheduler(_opt(), **kwargs)


def test_wsd_functional_bad_input():
    """The pure functions reject out-of-range progress, steps and overlapping phases."""
    with pytest.raises(ValueError, match="progress"):
        cooldown_factor(1.5)
    with pytest.raises(ValueError, match="shape"):
        cooldown_factor(0.5, "exp")
    with pytest.raises(ValueError, match="cooldown_start"):
        wsd_lr_factor(3, warmup_steps=10, cooldown_start=5)
    with pytest.raises(ValueError, match="step"):
        wsd_lr_factor(-1)
    with pytest.raises(ValueError, match="total_steps"):
        resolve_cooldown(0)
    with pytest.raises(ValueError, match="start"):
        WSDScheduler(_opt(), warmup_steps=5).set_cooldown(start=2, steps=3)


# ---------------------------------------------------------------------------------------------- qualitative (slow)


def _pydoc_bytes():
    """Spec §4 setup: pydoc topics, keys sorted then shuffled with Random(0), 90/10 topic split, newline-joined."""
    keys = sorted(topics)
    random.Random(0).shuffle(keys)
    cut = int(0.9 * len(keys))

    def encode(ks):
        return torch.tensor(list("\n".join(topics[k] for k in ks).encode("utf-8")), dtype=torch.long)

    return encode(keys[:cut]), encode(keys[cut:])


class _NextByteMLP(torch.nn.Module):
    """12-byte context -> Embedding(256, 24) -> Linear 256 + GELU -> residual GELU(Linear 256) -> 256 logits."""

    def __init__(self, context: int = 12):
        super().__init__()
        self.emb = torch.nn.Embedding(256, 24)
        self.fc1 = torch.nn.Linear(24 * context, 256)
        self.fc2 = torch.nn.Linear(256, 256)
        self.out = torch.nn.Linear(256, 256)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.fc1(self.emb(x).flatten(1)))
        h = h + torch.nn.functional.gelu(self.fc2(h))
        return self.out(h)


def _train_next_byte(train, val_x, val_y, lr, sched_kwargs, steps=3000, swa=None):
    """Train with WSDScheduler; return val CE (nats/byte) of the final weights and, if ``swa=(H, k)``, of the last
    closed SWA window (via the package's running_mean_)."""
    torch.manual_seed(0)
    model = _NextByteMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = WSDScheduler(opt, **sched_kwargs)
    g = torch.Generator().manual_seed(0)
    params = list(model.parameters())
    mean, count, closed = [torch.zeros_like(p) for p in params], 0, None
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(train) - 13, (64,), generator=g)
        x = torch.stack([train[i : i + 12] for i in idx.tolist()])
        y = train[idx + 12]
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if swa is not None and step % swa[1] == 0:
            count += 1
            running_mean_(mean, [p.detach() for p in params], count)
            if step % swa[0] == 0:
                closed, count = [m.clone() for m in mean], 0

    def val_ce():
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(val_x), val_y).item()

    raw = val_ce()
    if closed is None:
        return raw, None
    with torch.no_grad():
        for p, m in zip(params, closed):
            p.copy_(m)
    return raw, val_ce()


@pytest.mark.slow
def test_wsd_qualitative_pydoc_next_byte():
    """Spec §5 qualitative checks on real text (seed 0): constant > SWA > WSD, WSD close to cosine, 40 % closer."""
    train, val = _pydoc_bytes()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, len(val) - 13, (20_000,), generator=g)
    val_x, val_y = torch.stack([val[i : i + 12] for i in idx.tolist()]), val[idx + 12]
    n, w = 3000, 60
    cosine, _ = _train_next_byte(
        train,
        val_x,
        val_y,
        3e-3,
        dict(warmup_steps=w, total_steps=n, cooldown_steps=n - w, shape="cosine", final_lr_ratio=0.1),
    )
    wsd, _ = _train_next_byte(train, val_x, val_y, 2e-3, dict(warmup_steps=w, total_steps=n, cooldown_fraction=0.2))
    wsd40, _ = _train_next_byte(train, val_x, val_y, 2e-3, dict(warmup_steps=w, total_steps=n, cooldown_fraction=0.4))
    linear, _ = _train_next_byte(
        train, val_x, val_y, 2e-3, dict(warmup_steps=w, total_steps=n, cooldown_fraction=0.2, shape="linear")
    )
    constant, swa1 = _train_next_byte(train, val_x, val_y, 2e-3, dict(warmup_steps=w), swa=(300, 3))
    print(
        f"\nval CE (nats/byte): cosine {cosine:.4f}  WSD-20% 1-sqrt {wsd:.4f}  WSD-20% linear {linear:.4f}  "
        f"WSD-40% {wsd40:.4f}  constant {constant:.4f}  constant+SWA(1 window) {swa1:.4f}"
    )
    assert constant - wsd >= 0.05
    assert constant - swa1 >= 0.04
    assert swa1 > wsd
    assert wsd - cosine <= 0.05
    assert wsd40 - cosine <= 0.035
