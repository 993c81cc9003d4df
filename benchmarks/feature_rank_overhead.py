"""Training throughput with and without FeatureRankMonitor at its default interval (goal: <= 5% overhead).

Setting: the ``examples/grokking_digits.yaml`` model and data (digits, 200 training images, full batch, MLP depth 8,
width 128, alpha 4, AdamW) trained for ``--steps`` steps per run, runs alternating without / with the monitor in the
same process (``--repeats`` pairs). The monitor uses its default ``every_n_steps=1000`` and metrics
(``numerical_rank`` + ``effective_rank`` in float64 on all 8 Linear layers) with a 1000-image probe (the example's;
the default 2048 exceeds the 1597 held-out digits). Validation and logging are off in both arms so that only the
monitor differs. Prints the median wall time of each arm, their ratio (the anchor is the run without the monitor),
and the cost of one measurement timed directly.

    python benchmarks/feature_rank_overhead.py                  # 2 pairs x 5000 steps, ~3-6 min on one core

One thread (``torch.set_num_threads(1)``). On a shared machine the ratio is noisy: compare the per-measurement
cost x number of measurements with the training time, printed as the "expected" ratio, and the ratio of process CPU
times, which load from other processes disturbs much less than wall time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _fit(steps: int, with_monitor: bool, every_n_steps: int, seed: int = 0) -> tuple[float, float, int]:
    from lightning.pytorch import Trainer, seed_everything

    from lightning_epfl.callbacks import FeatureRankMonitor
    from lightning_epfl.datamodules import DigitsDataModule
    from lightning_epfl.modules import DeepMLPClassifier

    seed_everything(seed, verbose=False)
    model = DeepMLPClassifier(depth=8, width=128, init_scale=4.0)
    data = DigitsDataModule(train_size=200, batch_size=200, test_fraction=0.0)
    callbacks = [FeatureRankMonitor(num_samples=1000, every_n_steps=every_n_steps, plot=False)] if with_monitor else []
    trainer = Trainer(
        max_steps=steps,
        max_epochs=-1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.fit(model, data)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, len(callbacks[0].history) if callbacks else 0


def _probe_cost(repeats: int = 5) -> float:
    from lightning_epfl.callbacks import FeatureRankMonitor
    from lightning_epfl.datamodules import load_digits_arrays
    from lightning_epfl.functional.rank import spectral_metrics
    from lightning_epfl.modules import DeepMLPClassifier

    model = DeepMLPClassifier(depth=8, width=128, init_scale=4.0)
    x = torch.from_numpy(load_digits_arrays()[0][:1000])
    monitor = FeatureRankMonitor(num_samples=1000)
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        for h in monitor.collect_features(model, x).values():
            spectral_metrics(h, monitor.metrics)
        times.append(time.process_time() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--every-n-steps", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    _fit(50, True, args.every_n_steps)  # warm-up (imports, allocator)
    base, mon, n_meas = [], [], 0
    for r in range(args.repeats):
        base.append(_fit(args.steps, False, args.every_n_steps)[:2])
        wall, cpu, n_meas = _fit(args.steps, True, args.every_n_steps)
        mon.append((wall, cpu))
        print(
            f"pair {r}: without {base[-1][0]:.2f} s wall / {base[-1][1]:.2f} s CPU, "
            f"with {wall:.2f} s wall / {cpu:.2f} s CPU ({n_meas} measurements)",
            flush=True,
        )
    probe = _probe_cost()
    bw, bc = (statistics.median(v) for v in zip(*base))
    mw, mc = (statistics.median(v) for v in zip(*mon))
    print(f"\n{args.repeats} pair(s) of {args.steps} steps, monitor every {args.every_n_steps} steps, medians:")
    print("| arm | wall (s) | process CPU (s) |")
    print("|---|---|---|")
    print(f"| without monitor (anchor) | {bw:.2f} | {bc:.2f} |")
    print(f"| with monitor | {mw:.2f} | {mc:.2f} |")
    print(f"| ratio with/without | {mw / bw:.3f} | {mc / bc:.3f} |")
    print(f"one measurement (8 layers, 1000 samples, float64): {probe * 1e3:.1f} ms CPU; {n_meas} per run")
    print(f"expected CPU ratio from the measurement cost: {(bc + n_meas * probe) / bc:.3f}")


if __name__ == "__main__":
    main()
