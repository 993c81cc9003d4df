"""Cost of windowed SWA: training step time and extra memory, against a plain run measured in the same process.

Model and data are the main job's (``examples/lm_wsd_swa.yaml``): a small Llama (``CausalLMModule``) on the byte-level
English text of Python's ``pydoc_data.topics`` (``TextDataModule``). Every configuration trains the same number of
optimizer steps from the same seed, validation off; configurations are run in interleaved order (A B C D, A B C D,
...) after one discarded warm-up run, and the median per-step time over repeats is reported as a ratio to the plain
run. Times are CPU time of this process (``time.process_time``, one thread, no loader workers), which other jobs on a
shared machine disturb much less than wall time. The averaging callback's own ``on_train_batch_end`` time is also
measured directly ("hook"), and given as a share of the plain step:

  plain                     no averaging (the anchor)
  WindowedSWA(k=5)          WindowedSWA(window_steps=100, every_n_steps=5), evaluation on (private module copy)
  WindowedSWA(k=1)          same, a snapshot after every step
  WeightAveraging           Lightning's ``WeightAveraging`` (an ``AveragedModel``, updated every step, its default)
  WeightAveraging(k=5)      same, ``should_update`` every 5th step

Extra memory is the bytes of the tensors each callback holds after the run (accumulator, closed windows, module copy
/ the ``AveragedModel``), in units of the model's parameter bytes.

    python benchmarks/wsd_swa_overhead.py                 # ~3 min of CPU on one core
    python benchmarks/wsd_swa_overhead.py --steps 40 --repeats 1   # quick look

The machine may be shared: even CPU time is disturbed by other jobs (caches, memory bandwidth); the hook share is the
least sensitive figure.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, WeightAveraging
from tqdm import tqdm

from lightning_epfl import WSDScheduler
from lightning_epfl.callbacks import WindowedSWA
from lightning_epfl.datamodules import TextDataModule
from lightning_epfl.modules import CausalLMModule

MODEL = {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4, "num_attention_heads": 4}


class _EveryK(WeightAveraging):
    """Lightning's WeightAveraging updated every k-th optimizer step (its documented customization point)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and (step_idx + 1) % self.k == 0


class _StepTimer(Callback):
    """CPU time of the training loop after ``skip`` warm-up steps (hooks of all callbacks included)."""

    def __init__(self, skip: int) -> None:
        self.skip, self.t0, self.t1, self.steps = skip, 0.0, 0.0, 0

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.skip:
            self.t0 = time.process_time()
        elif trainer.global_step > self.skip:
            self.t1 = time.process_time()
            self.steps = trainer.global_step - self.skip

    @property
    def per_step(self) -> float:
        return (self.t1 - self.t0) / max(self.steps, 1)


def _time_hook(cb: Callback) -> list[float]:
    """Wrap ``cb.on_train_batch_end`` to accumulate its CPU time; returns the one-element accumulator."""
    spent = [0.0]
    inner = cb.on_train_batch_end

    def timed(*args: Any, **kwargs: Any) -> None:
        t = time.process_time()
        inner(*args, **kwargs)
        spent[0] += time.process_time() - t

    cb.on_train_batch_end = timed  # type: ignore[method-assign]
    return spent


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _extra_bytes(cb: Callback | None) -> int:
    if isinstance(cb, WindowedSWA):
        total = _bytes(cb._mean or []) + _bytes(cb._others.values())
        total += sum(_bytes(w["state"].values()) for w in cb._closed)
        if cb._eval_module is not None:
            total += _bytes(cb._eval_module.state_dict().values())
        return total
    if isinstance(cb, WeightAveraging) and cb._average_model is not None:
        return _bytes(cb._average_model.state_dict().values())
    return 0


def _make(name: str) -> Callback | None:
    return {
        "plain": lambda: None,
        "WindowedSWA(k=5)": lambda: WindowedSWA(window_steps=100, every_n_steps=5, horizons=[1, 2]),
        "WindowedSWA(k=1)": lambda: WindowedSWA(window_steps=100, every_n_steps=1, horizons=[1, 2]),
        "WeightAveraging": lambda: WeightAveraging(),
        "WeightAveraging(k=5)": lambda: _EveryK(5),
    }[name]()


def run(name: str, steps: int, skip: int, batch_size: int, block_size: int) -> tuple[float, float, int, int]:
    """Train ``steps`` steps with ``name``; return (CPU s/step, hook CPU s/step, extra bytes, parameter bytes)."""
    L.seed_everything(0, verbose=False)
    module = CausalLMModule(
        config=dict(MODEL),
        optimizer=partial(torch.optim.AdamW, lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1),
        lr_scheduler=partial(WSDScheduler, warmup_steps=30),
    )
    data = TextDataModule(block_size=block_size, batch_size=batch_size, seed=0)
    timer = _StepTimer(skip)
    cb = _make(name)
    hook = _time_hook(cb) if cb is not None else [0.0]
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            max_steps=steps,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            callbacks=[c for c in (cb, timer) if c is not None],
            default_root_dir=root,
        )
        trainer.fit(module, datamodule=data)
    param_bytes = _bytes(module.parameters())
    return timer.per_step, hook[0] / steps, _extra_bytes(cb), param_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per run")
    parser.add_argument("--skip", type=int, default=20, help="warm-up steps excluded from the timing")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = ["plain", "WindowedSWA(k=5)", "WindowedSWA(k=1)", "WeightAveraging", "WeightAveraging(k=5)"]
    times: dict[str, list[float]] = {n: [] for n in names}
    hooks: dict[str, list[float]] = {n: [] for n in names}
    extra: dict[str, int] = {}
    param_bytes = 1
    jobs = [(-1, "plain")] + [(r, n) for r in range(args.repeats) for n in names]
    for r, name in tqdm(jobs, desc="runs"):
        t, h, e, param_bytes = run(name, args.steps, args.skip, args.batch_size, args.block_size)
        if r < 0:
            continue  # warm-up run (allocator, caches, lazy imports)
        times[name].append(t)
        hooks[name].append(h)
        extra[name] = e
    anchor = statistics.median(times["plain"])
    print(
        f"\nsmall Llama ({param_bytes / 4 / 1e6:.2f}M params), pydoc bytes, batch {args.batch_size}x{args.block_size}, "
        f"{args.steps - args.skip} timed steps x {args.repeats} repeats, 1 thread, CPU time"
    )
    print(
        f"{'configuration':<22} {'ms/step':>9} {'ratio to plain':>15} {'hook ms/step':>13} {'hook / plain step':>18} "
        f"{'extra memory (x params)':>24}"
    )
    for name in names:
        med, hook = statistics.median(times[name]), statistics.median(hooks[name])
        print(
            f"{name:<22} {1e3 * med:>9.1f} {med / anchor:>15.3f} {1e3 * hook:>13.2f} {hook / anchor:>18.4f} "
            f"{extra[name] / param_bytes:>24.2f}"
        )
    spread = {n: (min(v) / statistics.median(v), max(v) / statistics.median(v)) for n, v in times.items()}
    print("per-configuration min/max over repeats, relative to its median:")
    for name, (lo, hi) in spread.items():
        print(f"  {name:<22} {lo:.3f} .. {hi:.3f}")


if __name__ == "__main__":
    main()
