"""Deep grokking on digits: depth 4 / 8 / 12 with FeatureRankMonitor (arXiv:2405.19454, claim 1: deeper nets grok
later).

Runs ``examples/grokking_digits.yaml`` once per depth (each in its own process, one thread each, in parallel by
default), then prints per depth: the first logged step with train accuracy >= 99.5%, the val ("test") accuracy
there, the first steps at which val accuracy reaches 0.5 / 0.8 / 0.9, the step of the steepest 1000-step rise of val
accuracy (the "jump"), the largest rise between two consecutive evaluations, and the turning point of the
effective-rank curve of the last hidden layer (step of its peak, peak value, final value and final/peak ratio).
Results go to ``<out>/results.json`` and a figure to ``<out>/grokking_depths.png``
(both written to a temp name and renamed).

    python benchmarks/grokking_depths.py                       # depths 4 8 12, 20 000 steps: ~25 CPU-min
    python benchmarks/grokking_depths.py --depths 8 --steps 3000   # quick look

The machine may be shared: wall times are printed for information only; the step counts are what matters.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import time

from lightning_epfl.utilities import atomic_write_bytes, save_figure

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "grokking_digits.yaml")


def _run_depth(depth: int, steps: int, out: str, seed: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from lightning_epfl.cli import cli_main

    save_dir = os.path.join(out, f"depth{depth}")
    t0 = time.time()
    cli_main(
        [
            "fit",
            "--config",
            EXAMPLE,
            f"--seed_everything={seed}",
            f"--model.init_args.depth={depth}",
            f"--trainer.max_steps={steps}",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={save_dir}",
            "--trainer.enable_checkpointing=false",
        ]
    )
    wall = time.time() - t0
    result = load_run(depth, out, wall_s=wall)
    _write_json(os.path.join(out, f"depth{depth}.json"), result)
    return result


def load_run(depth: int, out: str, wall_s: float | None = None) -> dict:
    """Read one run's accuracies and FeatureRankMonitor values back from its CSV log (also for stopped runs)."""
    logs = os.path.join(out, f"depth{depth}", "lightning_logs")
    version = max(os.listdir(logs), key=lambda v: int(v.split("_")[-1]))
    with open(os.path.join(logs, version, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    train = sorted((int(r["step"]), float(r["train/acc"])) for r in rows if r.get("train/acc"))
    val = sorted((int(r["step"]), float(r["val/acc"])) for r in rows if r.get("val/acc"))
    ranks: dict[str, dict[str, list[list[float]]]] = {"effective_rank": {}, "numerical_rank": {}}
    for r in sorted(rows, key=lambda r: int(r["step"])):
        for key, value in r.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "feature_rank" and parts[1] in ranks and value:
                steps, vals = ranks[parts[1]].setdefault(parts[2], [[], []])
                steps.append(int(r["step"]))
                vals.append(float(value))
    last = max([s for s, _ in train] + [s for layer in ranks["effective_rank"].values() for s in layer[0]])
    return {
        "depth": depth,
        "last_step": last,
        "wall_s": wall_s,
        "train_acc": train,
        "val_acc": val,
        "effective_rank": ranks["effective_rank"],
        "numerical_rank": ranks["numerical_rank"],
        "log_dir": os.path.join(logs, version),
    }


def _write_json(path: str, obj: object) -> None:
    atomic_write_bytes(path, json.dumps(obj).encode())


def summarize(result: dict) -> dict:
    """Landmark steps of one run (see module docstring)."""
    train, val = result["train_acc"], result["val_acc"]
    fit = next((s for s, a in train if a >= 0.995), None)
    val_at = dict(val)

    def val_near(step: int | None) -> float | None:
        if step is None or not val:
            return None
        return val_at[min(val_at, key=lambda s: abs(s - step))]

    reach = {q: next((s for s, a in val if a >= q), None) for q in (0.5, 0.8, 0.9)}
    jump, best = None, -1.0
    for s, a in val:
        prev = [b for t, b in val if s - 1000 <= t < s]
        if prev and a - prev[0] > best:
            best, jump = a - prev[0], s
    # largest rise between two consecutive evaluations (every 250 steps in the example): the sharpest jump
    pairs = list(zip(val[:-1], val[1:]))
    sharp = max(pairs, key=lambda p: p[1][1] - p[0][1]) if pairs else None
    last_hidden = f"linears.{result['depth'] - 2}"  # the output layer is linears.{depth - 1}
    steps, eff = result["effective_rank"][last_hidden]
    peak_i = max(range(len(eff)), key=eff.__getitem__)
    return {
        "depth": result["depth"],
        "fit_step": fit,
        "val_at_fit": val_near(fit),
        "val_0.5": reach[0.5],
        "val_0.8": reach[0.8],
        "val_0.9": reach[0.9],
        "jump_step": jump,
        "jump_size": best,
        "sharpest_jump": f"{sharp[0][0]}->{sharp[1][0]}: {sharp[0][1]:.3f}->{sharp[1][1]:.3f}" if sharp else None,
        "final_val": val[-1][1] if val else None,
        "layer": last_hidden,
        "rank_peak_step": steps[peak_i],
        "rank_peak": eff[peak_i],
        "rank_final": eff[-1],
        "rank_ratio": eff[-1] / eff[peak_i],
        "last_step": result["last_step"],
        "wall_s": result["wall_s"],
    }


def plot(results: list[dict], path: str) -> None:
    """Val/train accuracy and last-hidden-layer effective rank vs step, one colour per depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_rank) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for i, r in enumerate(results):
        color = plt.get_cmap("tab10")(i)
        ax_acc.plot(*zip(*r["val_acc"]), color=color, label=f"depth {r['depth']} val")
        ax_acc.plot(*zip(*r["train_acc"]), color=color, ls=":", label=f"depth {r['depth']} train")
        layer = summarize(r)["layer"]
        ax_rank.plot(*r["effective_rank"][layer], color=color, marker=".", label=f"depth {r['depth']} ({layer})")
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend(fontsize=8, ncol=2)
    ax_acc.grid(alpha=0.3)
    ax_rank.set_ylabel("effective rank, last hidden layer")
    ax_rank.set_xlabel("optimizer step")
    ax_rank.legend(fontsize=8)
    ax_rank.grid(alpha=0.3)
    fig.suptitle("Digits, 200 train / 1597 val, MLP width 128, alpha 4, AdamW wd 0.1, MSE")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 12])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/grokking_depths")
    parser.add_argument("--sequential", action="store_true", help="run depths one after the other")
    parser.add_argument(
        "--summarize-only", action="store_true", help="re-read the CSV logs under <out> (also of stopped runs)"
    )
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.summarize_only:
        results = [load_run(d, args.out) for d in args.depths]
    elif args.sequential:
        results = [_run_depth(d, args.steps, args.out, args.seed) for d in args.depths]
    else:
        with mp.get_context("spawn").Pool(len(args.depths)) as pool:
            results = pool.starmap(_run_depth, [(d, args.steps, args.out, args.seed) for d in args.depths])
    rows = [summarize(r) for r in results]
    _write_json(os.path.join(args.out, "results.json"), rows)
    plot(results, os.path.join(args.out, "grokking_depths.png"))
    cols = [
        "depth",
        "fit_step",
        "val_at_fit",
        "val_0.5",
        "val_0.8",
        "val_0.9",
        "jump_step",
        "sharpest_jump",
        "final_val",
        "rank_peak_step",
        "rank_peak",
        "rank_final",
        "rank_ratio",
        "last_step",
        "wall_s",
    ]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        cells = [f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in cols]
        print("| " + " | ".join(cells) + " |")
    print(f"figure: {os.path.join(args.out, 'grokking_depths.png')}")


if __name__ == "__main__":
    main()
