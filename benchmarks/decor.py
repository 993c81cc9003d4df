"""Decor benchmark: the paper's a9a result, the accountant against its references, per-example clipping speed.

Three parts, each printed as a table (arXiv:2405.01031; real data from ``../shared/data/a9a``):

1. **accountant**: our SecLDP accountant against the authors' reference rows (rho_step for n = 16, T = 3500), against
   Opacus where both compute the same thing (RDP conversion, example-level DP-SGD), and the calibrated pairwise noise
   against the reference figures.
2. **a9a**: 16 users, an iid split of LIBSVM's a9a (32,561 x 123), logistic regression (weight decay 1e-3 in the
   optimizer), user-level DP, clip C = 1, batch 32, T steps of SGD, delta = 1e-5. For epsilon in {3, 5, 10, 20, 40}:
   central DP (trusted average), Decor on a ring, a 4x4 torus and the complete graph, and local DP (ring), each
   calibrated to the same epsilon (sigma = 1.05 sigma_CDP for Decor). Metric: optimality gap
   ``f(x_bar) - f*`` of the training objective (mean logistic loss over all users' data + weight decay) at the
   average model, averaged over the last 5 of 20 evaluations, mean over seeds. Plot: gap vs epsilon.
3. **clipping speed**: per-example clipped gradients of 80 users x 16 examples (digits MLP 64-32-10) by our nested
   ``torch.func.vmap`` against an Opacus ``GradSampleModule`` + ``DPOptimizer`` loop over the users (the anchor), and
   for a single user; both clip the same gradients (checked).

The training runs use the Decor algorithm object and the core's ``ClientStack``/``StepContext`` directly, in a plain
loop without a Trainer (the same hooks the strategy calls: ``compute_gradients``, ``before_optimizer_step``, the
optimizer step, ``after_optimizer_step``), so that 75+ runs of 5000 steps fit in minutes.

Usage::

    python benchmarks/decor.py                                  # all parts (a9a: 3 seeds, T = 5000)
    python benchmarks/decor.py --parts a9a --seeds 0 --steps 2000
    python benchmarks/decor.py --parts accountant speed
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

import torch

from lightning_epfl.datamodules import FederatedDataModule
from lightning_epfl.functional.privacy import gdp_epsilon, rdp_epsilon, rho_budget, rho_step, sensitivity, zcdp_epsilon
from lightning_epfl.functional.topology import Topology, mixing_matrix
from lightning_epfl.modules import LogisticRegression, MLPClassifier
from lightning_epfl.strategies import ClientStack, Decor, LocalCommunicator, SecLDPAccountant, StepContext
from lightning_epfl.utilities import atomic_write_bytes, new_figure, save_figure

A9A = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "a9a", "a9a.txt")
N_USERS = 16
WEIGHT_DECAY = 1e-3
METHODS = {
    "CDP": ("cdp", "complete"),
    "Decor complete": ("decor", "complete"),
    "Decor torus": ("decor", "torus"),
    "Decor ring": ("decor", "ring"),
    "LDP ring": ("ldp", "ring"),
}
LR = {"cdp": 1e-3, "decor": 1e-3, "ldp": 3e-4}
"""SGD learning rate per noise mode at epsilon = 10 (``--tune``, seed 0, T = 5000; LDP needs a smaller one)."""
LR_GRID = {"cdp": [3e-4, 1e-3, 3e-3], "decor": [3e-4, 1e-3, 3e-3], "ldp": [1e-4, 3e-4, 1e-3]}
"""Per-epsilon learning-rate grid of each noise mode (``--tune-each``: picked on seed 0, Decor on the ring)."""
TUNED_ON = {"cdp": "CDP", "decor": "Decor ring", "ldp": "LDP ring"}
PAPER = {3: (0.23, "0.25-0.29", 0.29), 10: (0.085, "0.09-0.105", 0.22), 40: (0.05, "0.05-0.053", 0.11)}
"""The paper's a9a train-loss gaps (CDP, Decor range over graphs, LDP), read off the authors' plots."""


def _graph(name: str) -> Topology:
    return {"ring": Topology.ring(N_USERS), "torus": Topology.torus(N_USERS), "complete": Topology.complete(N_USERS)}[
        name
    ]


# ---------------------------------------------------------------------------------------------------- accountant
def part_accountant() -> None:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    print("\n## Accountant agreement\n")
    print("| quantity | ours | reference | relative difference |")
    print("|---|---|---|---|")
    rows = [
        ("rho_step ring, sigma 22.9695, sigma_cor 94", "ring", 22.96953176771683, 94, 4.787249e-4),
        ("rho_step torus, sigma 22.9695, sigma_cor 47", "torus", 22.96953176771683, 47, 4.612681e-4),
        ("rho_step complete, sigma 17.8271, sigma_cor 32", "complete", 17.827099282407094, 32, 5.055857e-4),
    ]
    for label, graph, sigma, sigma_cor, ref in rows:
        ours = rho_step(_graph(graph).adjacency, sigma, sigma_cor, sensitivity(1.0))
        print(f"| {label} (authors' CSV, 7 digits) | {ours:.7e} | {ref:.7e} | {abs(ours / ref - 1):.1e} |")
    ours = zcdp_epsilon(3500 * rho_step(_graph("ring").adjacency, rows[0][2], 94, sensitivity(1.0)), 1e-5)
    print(f"| epsilon zCDP, ring row, T = 3500 | {ours:.5f} | 10.45969 | {abs(ours / 10.45969 - 1):.1e} |")
    rho = rho_budget(10.0, 1e-5, 1)
    alphas = RDPAccountant.DEFAULT_ALPHAS
    z = math.sqrt(100 / (2 * rho))
    ref, _ = get_privacy_spent(
        orders=alphas, rdp=compute_rdp(q=1.0, noise_multiplier=z, steps=100, orders=alphas), delta=1e-5
    )
    ours = rdp_epsilon(rho, 1e-5)
    print(f"| epsilon RDP at rho = {rho:.7f} | {ours:.9f} | Opacus {ref:.9f} | {abs(ours / ref - 1):.1e} |")
    print(f"| epsilon zCDP at the same rho | {zcdp_epsilon(rho, 1e-5):.9f} | 10 (definition of the budget) | - |")
    print(f"| epsilon GDP at the same rho | {gdp_epsilon(rho, 1e-5):.7f} | 8.5552009 (spec, dp-accounting PLD) | "
          f"{abs(gdp_epsilon(rho, 1e-5) / 8.5552009 - 1):.1e} |")  # fmt: skip
    acc = SecLDPAccountant(_graph("ring").adjacency, 1.0, level="example", neighbouring="add_remove")
    b, sigma, q, T = 16, 0.08, 0.05, 300
    ref, _ = get_privacy_spent(
        orders=alphas, rdp=compute_rdp(q=q, noise_multiplier=b * sigma, steps=T, orders=alphas), delta=1e-5
    )
    ours = acc.epsilon(sigma, 0.0, T, 1e-5, sample_rate=q, batch_size=b)
    print(f"| example-level LDP, q = {q}, b = {b}, T = {T} | {ours:.9f} | Opacus DP-SGD {ref:.9f} | "
          f"{abs(ours / ref - 1):.1e} |")  # fmt: skip
    spec = {"complete": (28.4, 84.9), "torus": (60.8, 181.6), "ring": (134.3, 401.5)}
    for graph, (ref10, ref3) in spec.items():
        acc = SecLDPAccountant(_graph(graph).adjacency, 1.0)
        for eps, ref in ((10.0, ref10), (3.0, ref3)):
            sigma, sigma_cor = acc.calibrate(eps, 1e-5, 1000)
            got = acc.epsilon(sigma, sigma_cor, 1000, 1e-5)
            print(f"| sigma_cor {graph}, eps {eps:g}, T = 1000 (epsilon reached {got:.9f}) | {sigma_cor:.1f} | "
                  f"{ref} (independent numpy accountant) | {abs(sigma_cor / ref - 1):.1e} |")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- a9a
def _objective(x_bar: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> float:
    w, b = x_bar[:-1], x_bar[-1]
    logits = X @ w + b
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
    return float(loss + 0.5 * WEIGHT_DECAY * x_bar.pow(2).sum())


def _optimum(X: torch.Tensor, y: torch.Tensor) -> float:
    x = torch.zeros(X.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        w, b = x[:-1], x[-1]
        f = torch.nn.functional.binary_cross_entropy_with_logits(X @ w + b, y) + 0.5 * WEIGHT_DECAY * x.pow(2).sum()
        f.backward()
        return f

    for _ in range(5):
        opt.step(closure)
    return _objective(x.detach(), X, y)


def _a9a_data(seed: int) -> FederatedDataModule:
    dm = FederatedDataModule(
        dataset=A9A, n_features=123, n_clients=N_USERS, partition="iid", batch_size=32, test_fraction=0.01,
        standardize=False, seed=seed,
    )  # fmt: skip
    dm.setup("fit")
    return dm


def _all_data(dm: FederatedDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    """All users' training data (float64 features, float labels): the training objective's data."""
    X = torch.cat([dm.client_data(i)[0] for i in range(N_USERS)]).double()
    y = torch.cat([dm.client_data(i)[1] for i in range(N_USERS)]).double()
    return X, y


def run_decor(method: str, epsilon: float, seed: int, steps: int, dm: FederatedDataModule, lr: float | None = None,
              evals: int = 20) -> list[float]:  # fmt: skip
    """Train one (method, epsilon, seed) on ``dm``'s users; return the training objective of the average model at
    ``evals`` evenly spaced steps."""
    noise, graph = METHODS[method]
    lr = LR[noise] if lr is None else lr
    torch.manual_seed(seed)
    model = LogisticRegression(int(dm.num_features)).double()
    stack = ClientStack(model, N_USERS)
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    topo = _graph(graph)
    ctx = StepContext(stack=stack, comm=LocalCommunicator(N_USERS), seed=seed, datamodule=dm, max_steps=steps,
                      topology=topo, mixing_W=mixing_matrix(topo), lr=lr)  # fmt: skip
    algo = Decor(target_epsilon=epsilon, delta=1e-5, total_steps=steps, noise=noise, clip_norm=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        algo.setup(ctx)
    X, y = _all_data(dm)
    values, every = [], steps // evals
    for k in range(steps):
        ctx.step = k
        batch = tuple(t.double() if t.is_floating_point() else t for t in dm.train_batch(k))
        G, _ = algo.compute_gradients(ctx, batch)
        stack.write_grads(G)
        ctx.G = G
        with torch.no_grad():
            algo.before_optimizer_step(ctx)
            opt.step()
            algo.after_optimizer_step(ctx)
        if (k + 1) % every == 0:
            values.append(_objective(stack.X.detach().mean(0), X, y))
    assert algo.accountant.get_epsilon(1e-5) <= epsilon
    return values


_DATA: dict[int, tuple[FederatedDataModule, float]] = {}
"""Per-process cache: seed -> (the seed's split, f* of its training objective)."""


def _load(seeds: list[int], threads: int | None = None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
    for s in seeds:
        if s not in _DATA:
            dm = _a9a_data(s)
            _DATA[s] = (dm, _optimum(*_all_data(dm)))


def _gap(method: str, eps: float, seed: int, steps: int, lr: float) -> float:
    """Optimality gap of one run: mean of its last 5 evaluations minus the split's f*."""
    dm, f_star = _DATA[seed]
    return statistics.mean(run_decor(method, eps, seed, steps, dm, lr=lr)[-5:]) - f_star


def _run_all(jobs: list[tuple], seeds: list[int], workers: int) -> list[float]:
    """``_gap`` over ``jobs``, in ``workers`` single-threaded processes when ``workers > 1``."""
    if workers <= 1:
        return [_gap(*job) for job in jobs]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_load, initargs=(seeds, 1)) as pool:
        return list(pool.map(_gap, *zip(*jobs)))


def part_a9a(
    seeds: list[int], steps: int, epsilons: list[float], out: str, fig: str, tune_each: bool = False, workers: int = 1
) -> None:
    if not os.path.isfile(A9A):
        print(f"\n## a9a: skipped, {A9A} not found", file=sys.stderr)
        return
    print(f"\n## a9a: {N_USERS} users, T = {steps}, user-level DP, delta 1e-5, seeds {seeds}, {workers} worker(s)\n")
    t0 = time.time()
    _load(seeds)
    optima = {s: _DATA[s][1] for s in seeds}
    print(f"f* per split (LBFGS, float64): {', '.join(f'{optima[s]:.5f}' for s in seeds)}\n")
    chosen: dict[float, dict[str, float]] = {e: dict(LR) for e in epsilons}
    if tune_each:
        # Each noise mode's lr per epsilon, picked on seed 0 (Decor on the ring, used for every graph).
        tuning = [
            (m, e, seeds[0], steps, lr) for e in epsilons for noise, m in TUNED_ON.items() for lr in LR_GRID[noise]
        ]
        gaps = dict(zip(tuning, _run_all(tuning, seeds, workers)))
        for e in epsilons:
            for noise, m in TUNED_ON.items():
                chosen[e][noise] = min(LR_GRID[noise], key=lambda lr: gaps[(m, e, seeds[0], steps, lr)])
    jobs = [(m, e, s, steps, chosen[e][METHODS[m][0]]) for e in epsilons for m in METHODS for s in seeds]
    flat = iter(_run_all(jobs, seeds, workers))
    results: dict[str, dict[float, list[float]]] = {m: {} for m in METHODS}
    for e in epsilons:
        for m in METHODS:
            results[m][e] = [next(flat) for _ in seeds]
    print("| epsilon | " + " | ".join(METHODS) + " | Decor worst / CDP | paper (CDP, Decor, LDP) |")
    print("|---" * (len(METHODS) + 3) + "|")
    for eps in epsilons:
        cells = []
        for method in METHODS:
            gaps_m = results[method][eps]
            sd = statistics.stdev(gaps_m) if len(gaps_m) > 1 else 0.0
            cells.append(f"{statistics.mean(gaps_m):.4f} ± {sd:.4f}")
        worst = max(statistics.mean(results[m][eps]) for m in METHODS if m.startswith("Decor"))
        ratio = worst / statistics.mean(results["CDP"][eps])
        paper = PAPER.get(int(eps))
        ref = "-" if paper is None else f"{paper[0]}, {paper[1]}, {paper[2]}"
        print(f"| {eps:g} | " + " | ".join(cells) + f" | {ratio:.2f} | {ref} |", flush=True)
    n_runs = len(jobs) + (len(epsilons) * sum(len(LR_GRID[n]) for n in TUNED_ON) if tune_each else 0)
    print(f"\n({time.time() - t0:.0f} s for {n_runs} runs of {steps} steps)")
    print("learning rates (cdp / decor / ldp): " + "; ".join(
        f"eps {e:g}: {v['cdp']:g} / {v['decor']:g} / {v['ldp']:g}" for e, v in chosen.items()))  # fmt: skip
    record = {
        "f_star": optima,
        "steps": steps,
        "lr": {str(e): v for e, v in chosen.items()},
        "gaps": {m: {str(e): g for e, g in r.items()} for m, r in results.items()},
    }
    atomic_write_bytes(out, json.dumps(record, indent=1).encode())
    plot_a9a(record, len(seeds), fig)
    print(f"plot: {fig}; numbers: {out}")


def plot_a9a(record: dict, n_seeds: int, fig: str) -> None:
    """Gap vs epsilon (log-log), one line per method, with the paper's values as crosses."""
    figure = new_figure((6.0, 4.2))
    ax = figure.add_subplot()
    for method, by_eps in record["gaps"].items():
        epsilons = sorted(float(e) for e in by_eps)
        means = [statistics.mean(by_eps[str(e)] if str(e) in by_eps else by_eps[f"{e:g}"]) for e in epsilons]
        line = ax.plot(epsilons, means, marker="o", label=method)[0]
        col = {"CDP": 0, "LDP ring": 2}.get(method)
        if col is not None:
            known = [e for e in epsilons if int(e) in PAPER]
            ax.plot(known, [PAPER[int(e)][col] for e in known], "x", color=line.get_color(), markersize=8,
                    label=f"{method}, paper")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = sorted(float(e) for e in next(iter(record["gaps"].values())))
    ax.set_xticks(ticks, [f"{e:g}" for e in ticks])
    ax.minorticks_off()
    ax.set_xlabel("user-level epsilon (delta = 1e-5)")
    ax.set_ylabel("train-loss gap f(x_bar) - f*")
    ax.set_title(f"a9a, {N_USERS} users, T = {record['steps']}, mean of {n_seeds} seeds")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, fig)


def tune(steps: int, grid: list[float]) -> None:
    dm = _a9a_data(0)
    f_star = _optimum(*_all_data(dm))
    print(
        f"\n## lr tuning at epsilon 10, seed 0, T = {steps}\n\n| method | " + " | ".join(f"lr {g}" for g in grid) + " |"
    )
    print("|---" * (len(grid) + 1) + "|")
    for method in ("CDP", "Decor ring", "LDP ring"):
        gaps = [statistics.mean(run_decor(method, 10.0, 0, steps, dm, lr=g)[-5:]) - f_star for g in grid]
        print(f"| {method} | " + " | ".join(f"{x:.4f}" for x in gaps) + " |", flush=True)


# ---------------------------------------------------------------------------------------------------- speed
def _clipping_row(n: int, dm: FederatedDataModule, repeats: int, hidden: list[int] | None = None) -> None:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    hidden = hidden or [32]
    torch.manual_seed(0)
    template = MLPClassifier(64, hidden, 10)
    stack = ClientStack(MLPClassifier(64, hidden, 10), n)
    stack.X.data.copy_(torch.cat([p.detach().reshape(-1) for p in template.parameters()]).expand(n, -1))
    ctx = StepContext(stack=stack, comm=LocalCommunicator(n))
    ctx.datamodule = type("D", (), {"batch_size": 16, "client_sizes": [16] * n, "sampling": "shuffle"})()
    algo = Decor(sigma=1.0, noise="ldp", clip_norm=0.1, level="example")
    algo._sampling(ctx)
    x, y = dm.train_batch(0, list(range(n)))
    models = []
    for _ in range(n):
        gsm = GradSampleModule(MLPClassifier(64, hidden, 10))
        gsm._module.load_state_dict(template.state_dict())
        opt = DPOptimizer(
            torch.optim.SGD(gsm.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=0.1, expected_batch_size=16
        )
        models.append((gsm, opt))

    def ours() -> torch.Tensor:
        return algo.compute_gradients(ctx, (x, y))[0]

    def opacus() -> torch.Tensor:
        out = []
        for i, (gsm, opt) in enumerate(models):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(gsm(x[i]), y[i], reduction="sum").backward()
            opt.pre_step()
            out.append(torch.cat([p.grad.reshape(-1) for p in gsm.parameters()]))
        return torch.stack(out)

    times: dict[str, list[float]] = {"ours": [], "opacus": []}
    results: dict[str, torch.Tensor] = {}
    for r in range(repeats + 2):
        for name, fn in (("ours", ours), ("opacus", opacus)):  # interleaved so that load hits both
            t = time.perf_counter()
            results[name] = fn()
            if r >= 2:
                times[name].append(time.perf_counter() - t)
    a_ms, b_ms = 1e3 * statistics.median(times["ours"]), 1e3 * statistics.median(times["opacus"])
    diff = float((results["ours"] - results["opacus"]).abs().max())
    model = "64-" + "-".join(map(str, hidden)) + "-10"
    print(f"| {n} | {model} | {a_ms:.2f} | {b_ms:.2f} | **{b_ms / a_ms:.1f}x** | {diff:.1e} |", flush=True)


def part_speed(repeats: int = 10) -> None:
    print("\n## Per-example clipping: nested vmap vs Opacus (digits MLPs, 16 examples per user, median)\n")
    print("| users | MLP | ours (nested vmap), ms | Opacus GradSampleModule loop (anchor), ms | speed-up | max diff |")
    print("|---|---|---|---|---|---|")
    dm = FederatedDataModule("digits", n_clients=80, batch_size=16, standardize=False, seed=0)
    dm.setup("fit")
    for n, hidden in ((80, [32]), (1, [32]), (1, [512, 512]), (16, [512, 512])):
        _clipping_row(n, dm, repeats, hidden)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--parts", nargs="+", default=["accountant", "speed", "a9a"], choices=["accountant", "speed", "a9a"]
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--epsilons", nargs="+", type=float, default=[3, 5, 10, 20, 40])
    parser.add_argument("--tune", nargs="*", type=float, default=None, help="lr grid to tune at epsilon 10 (seed 0)")
    parser.add_argument("--tune-each", action="store_true", help="pick each noise mode's lr per epsilon on seed 0")
    parser.add_argument("--workers", type=int, default=1, help="a9a runs in this many single-threaded processes")
    parser.add_argument("--out", default="runs/decor/a9a.json")
    parser.add_argument("--plot-only", action="store_true", help="redraw the a9a plot from --out and exit")
    parser.add_argument(
        "--fig", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures", "decor_a9a.png")
    )
    args = parser.parse_args()
    if args.plot_only:
        with open(args.out) as fh:
            record = json.load(fh)
        plot_a9a(record, len(next(iter(next(iter(record["gaps"].values())).values()))), args.fig)
        print(f"plot: {args.fig}")
        return
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, 1 thread")
    if args.tune is not None:
        tune(args.steps, args.tune or [0.02, 0.05, 0.1, 0.2, 0.5])
        return
    if "accountant" in args.parts:
        part_accountant()
    if "speed" in args.parts:
        part_speed()
    if "a9a" in args.parts:
        part_a9a(args.seeds, args.steps, args.epsilons, args.out, args.fig, args.tune_each, args.workers)


if __name__ == "__main__":
    main()
