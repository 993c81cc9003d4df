"""Schedules on real text: cosine vs WSD (1-sqrt, linear) vs constant vs constant + windowed SWA, and cooldowns
branched from the constant run's checkpoints (arXiv:2405.18392).

Same model, same data order, same seed and same number of steps for every schedule; the table reports the final
validation loss (nats/byte on the held-out pydoc topics) of each run, relative to the cosine anchor of this run.

    python benchmarks/schedules.py                  # defaults: 1000 steps, small Llama, ~10 min on 2 cores
    python benchmarks/schedules.py --steps 200      # quick look

Runs:
  cosine           warmup, then cosine to 10% of peak (the usual baseline, the anchor)
  wsd-1sqrt        warmup, constant, 20% cooldown 1-sqrt to 0
  wsd-linear       same, linear cooldown
  constant         warmup, then constant (the trunk; checkpoints at 0.8N and N)
  constant+swa     the constant run's WindowedSWA average (same run: SWA never changes training)
  branch@0.8N->N   resume the trunk's step-0.8N checkpoint (weights + optimizer state), 20% cooldown to N
  branch@N->1.25N  resume the trunk's final checkpoint and cool down for 0.25N more steps (a longer budget, no
                   retraining of the trunk)
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time
from functools import partial

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_epfl import WSDScheduler
from lightning_epfl.callbacks import Cooldown, WindowedSWA
from lightning_epfl.datamodules import TextDataModule
from lightning_epfl.modules import CausalLMModule
from lightning_epfl.utilities import save_figure

MODEL = {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4}


def make_module(lr: float, scheduler_kwargs: dict) -> CausalLMModule:
    return CausalLMModule(
        config=dict(MODEL),
        optimizer=partial(torch.optim.AdamW, lr=lr, betas=(0.9, 0.95), weight_decay=0.1),
        lr_scheduler=partial(WSDScheduler, **scheduler_kwargs),
    )


def trainer(root: str, max_steps: int, callbacks: list, val_batches: int) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        val_check_interval=max_steps,
        check_val_every_n_epoch=None,
        limit_val_batches=val_batches,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        callbacks=callbacks,
        default_root_dir=root,
    )


def plot(path: str, n: int, w: int, lr: float, cosine_lr: float, results: dict[str, float]) -> None:
    """Save the LR schedules of the runs, labelled with their final validation loss (temp file + rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_epfl.functional.schedules import wsd_lr_factor

    s, longer = int(0.8 * n), int(1.25 * n)
    curves = {
        "cosine": (
            cosine_lr,
            range(n + 1),
            {"cooldown_start": w, "cooldown_steps": n - w, "shape": "cosine", "final_lr_ratio": 0.1},
        ),
        "wsd-1sqrt": (lr, range(n + 1), {"cooldown_start": s, "cooldown_steps": n - s}),
        "wsd-linear": (lr, range(n + 1), {"cooldown_start": s, "cooldown_steps": n - s, "shape": "linear"}),
        "constant": (lr, range(n + 1), {}),
        "branch@N->1.25N": (lr, range(n, longer + 1), {"cooldown_start": n, "cooldown_steps": longer - n}),
    }
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (peak, steps, kw) in curves.items():
        ys = [peak * wsd_lr_factor(t, warmup_steps=w, **kw) for t in steps]
        label = f"{name}: val {results[name]:.3f}" if name in results else name
        ax.plot(list(steps), ys, label=label, linestyle="--" if name.startswith("branch") else "-")
    if "constant+swa1" in results:
        ax.plot([], [], " ", label=f"constant+SWA (1 window): val {results['constant+swa1']:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title("Schedules and final validation loss (nats/byte)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="N, optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak LR of the WSD/constant runs")
    parser.add_argument("--cosine-lr", type=float, default=3e-3, help="peak LR of the cosine run (spec: 1.5x)")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--val-batches", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plot", default="runs/schedules/schedules.png", help="PNG of the LR schedules ('' for none)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, w = args.steps, args.warmup
    root = tempfile.mkdtemp(prefix="schedules-")
    results: dict[str, float] = {}
    seconds: dict[str, float] = {}

    def run(name: str, module: CausalLMModule, max_steps: int, callbacks: list, ckpt: str | None = None):
        L.seed_everything(args.seed, verbose=False)
        dm = TextDataModule(block_size=args.block_size, batch_size=args.batch_size, seed=args.seed)
        t = trainer(os.path.join(root, name), max_steps, callbacks, args.val_batches)
        t0 = time.perf_counter()
        t.fit(module, dm, ckpt_path=ckpt)
        seconds[name] = time.perf_counter() - t0
        results[name] = float(t.callback_metrics["val/loss"])
        print(f"  {name:<16} val/loss {results[name]:.4f}  ({seconds[name]:.0f} s)", flush=True)
        return t

    cos = {"warmup_steps": w, "cooldown_start": w, "cooldown_steps": n - w, "shape": "cosine", "final_lr_ratio": 0.1}
    run("cosine", make_module(args.cosine_lr, cos), n, [])
    for shape in ("1-sqrt", "linear"):
        sched = {"warmup_steps": w, "total_steps": n, "cooldown_fraction": 0.2, "shape": shape}
        run(f"wsd-{shape.replace('-', '')}", make_module(args.lr, sched), n, [])

    ckdir = os.path.join(root, "trunk-ckpt")
    s = int(0.8 * n)
    swa = WindowedSWA(window_steps=max(n // 10, 10), every_n_steps=2, horizons=[1, 2, 4])
    trunk_ckpt = ModelCheckpoint(dirpath=ckdir, filename="{step}", every_n_train_steps=s, save_top_k=-1)
    final_ckpt = ModelCheckpoint(dirpath=ckdir, filename="final-{step}", every_n_train_steps=n, save_top_k=-1)
    t = run("constant", make_module(args.lr, {"warmup_steps": w}), n, [swa, trunk_ckpt, final_ckpt])
    for key, label in (("val/loss_swa", "constant+swa1"), ("val/loss_swa_h2", "constant+swa2")):
        if key in t.callback_metrics:
            results[label] = float(t.callback_metrics[key])
    if "val/loss_swa_h4" in t.callback_metrics:
        results["constant+swa4"] = float(t.callback_metrics["val/loss_swa_h4"])

    at_s = glob.glob(os.path.join(ckdir, f"step={s}*.ckpt"))[0]
    at_n = glob.glob(os.path.join(ckdir, f"final-step={n}*.ckpt"))[0]
    run("branch@0.8N->N", make_module(args.lr, {"warmup_steps": w}), n, [Cooldown(cooldown_fraction=0.2)], at_s)
    longer = int(1.25 * n)
    cooldown = Cooldown(cooldown_start=n, cooldown_steps=longer - n)
    run("branch@N->1.25N", make_module(args.lr, {"warmup_steps": w}), longer, [cooldown], at_n)

    anchor = results["cosine"]
    print(f"\nN={n} steps, warmup {w}, block {args.block_size}, batch {args.batch_size}, model {MODEL}")
    print(f"{'schedule':<18}{'val loss':>10}{'- cosine':>10}   (nats/byte, pydoc held-out topics)")
    for name, value in results.items():
        print(f"{name:<18}{value:>10.4f}{value - anchor:>+10.4f}")
    gap = results["constant"] - anchor
    if gap > 0:
        closed = (results["constant"] - results["wsd-1sqrt"]) / gap
        print(f"WSD 1-sqrt closes {100 * closed:.0f}% of the constant->cosine gap")
    if args.plot:
        plot(args.plot, n, w, args.lr, args.cosine_lr, results)
    diff = results["branch@0.8N->N"] - results["wsd-1sqrt"]
    print(f"branch@0.8N->N - wsd-1sqrt (same schedule, resumed vs planned): {diff:+.2e}")
    print(f"trunk+branch steps / separate run steps: {(n + (n - s)) / (2 * n):.2f} for two budgets")


if __name__ == "__main__":
    main()
