"""Meta-learning benchmark: exact MAML, FO-MAML, Reptile and FO-B-MAML (arXiv:2409.03682) at equal budget.

Four parts, each printed as a Markdown table (``--parts`` selects):

``estimator``
    Relative error ``||d - grad F|| / ||grad F||`` of each first-order direction against the exact (autograd) MAML
    meta-gradient at the initialization, sinusoid tanh MLP 1-40-40-1, 25 tasks, float32, at (K = 1, alpha = 0.1) and
    (K = 5, alpha = 0.05): FO-MAML, Reptile (K_r = 5), FO-B-MAML symmetric/forward with delta = 1e-2 and forward 1e-3.

``methods``
    Every algorithm trains the same initialization on the same task stream for the same number of outer steps
    (Adam, lr 1e-3, ``torch.func.vmap`` over tasks), on few-shot sinusoid regression (10-shot, 25 tasks per step,
    tanh MLP 1-40-40-1, K = 1, alpha = 0.1) and on 5-way 1-shot digits (16 tasks per step, tanh MLP 64-64-5, K = 1,
    alpha = 0.5). Reported: the MAML objective F (post-adaptation query loss) and the **exact** second-order
    ``||grad F||`` on a fixed batch of 100 training-distribution tasks, the post-adaptation loss (and accuracy) on the
    held-out validation tasks, training wall time per step, and peak memory of the training loop (see below; the
    final evaluation runs after the reading).
``vmap``
    Time of one task-mean meta-gradient at 32 sinusoid tasks with ``torch.func.vmap`` vs a per-task Python loop
    (same function, ``vectorize=False``), median of repeats, per algorithm. Goal: >= 3x.
``memory``
    Peak extra memory of one meta-gradient, exact MAML vs FO-B-MAML (symmetric), tanh MLP of width 64 and depth
    2/4/8/16, K = 5 (and K = 1/10 at depth 8), 8 tasks of 500 support + 500 query points (activations >> parameters).

    python benchmarks/meta_learning.py                        # all parts, ~5-10 min on a shared 2-core machine
    python benchmarks/meta_learning.py --parts vmap memory    # the quick parts
    python benchmarks/meta_learning.py --sinusoid-steps 3000  # the reference budget of the design notes

Memory on CPU: the peak resident set size (``VmHWM``) above the resident set measured just before the measured code,
after trimming the heap and resetting the high-water mark (``/proc/self/clear_refs``, Linux >= 4.0); glibc serves
allocations >= 64 KiB by ``mmap`` so that freed tensors leave the resident set. All runs share one process.

One thread (``torch.set_num_threads(1)``). The machine may be shared with other jobs: ratios measured within one run
are meaningful, absolute times less so. Results go to ``<out>/results.json`` and a figure to
``<out>/meta_learning.png`` (written to a temporary name and renamed).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import time
from typing import Any

from lightning_epfl.utilities import atomic_write_bytes, save_figure

ALGORITHMS = ("maml", "fo_b_maml", "fomaml", "reptile")


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{key} not in /proc/self/status")


def _configure_malloc() -> None:
    """Serve allocations >= 64 KiB by mmap, so freed tensors leave the resident set at once (glibc)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except OSError:  # pragma: no cover - not glibc
        pass


def _reset_peak() -> float:
    """Trim the heap, reset the resident-set high-water mark (Linux >= 4.0) and return the current RSS in MiB."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mib("VmRSS")


def _peak_since(rss0: float) -> float:
    """Peak resident memory above ``rss0`` (MiB) since the last :func:`_reset_peak`."""
    return _status_mib("VmHWM") - rss0


def _setup(task: str, seed: int):
    import torch

    from lightning_epfl.datamodules.few_shot import FewShotDigits, SinusoidTasks
    from lightning_epfl.modules.meta_learning import MLP

    torch.manual_seed(seed)
    if task == "sinusoid":
        dm = SinusoidTasks(tasks_per_batch=25, seed=seed)
        net = MLP(1, [40, 40], 1)
        common = {"loss": "mse", "inner_lr": 0.1, "inner_steps": 1}
    else:
        dm = FewShotDigits(n_way=5, k_shot=1, q_queries=15, tasks_per_batch=16, val_tasks=500, seed=seed)
        net = MLP(64, [64], 5)
        common = {"loss": "cross_entropy", "inner_lr": 0.5, "inner_steps": 1}
    return dm, net, common


def _train(task: str, algorithm: str, steps: int, seed: int) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    torch.set_num_threads(1)
    from lightning_epfl.functional.meta import (
        adapt_and_predict,
        batched_task_grad,
        maml_task_grad,
        resolve_loss,
        task_grad_fn,
        tree_norm,
    )

    dm, net, common = _setup(task, seed)
    kwargs = dict(common)
    if algorithm == "reptile":
        kwargs["reptile_steps"] = 5
    if algorithm == "fo_b_maml":
        kwargs.update(fd_scheme="symmetric", fd_delta=1e-2)
    fn = task_grad_fn(algorithm)
    params = [p for p in net.parameters()]
    names = [n for n, _ in net.named_parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    curve = []
    rss0 = _reset_peak()
    t0 = time.perf_counter()
    for step in tqdm(range(steps), desc=f"{task}/{algorithm}", mininterval=5.0):
        b = dm.train_batch(step)
        detached = {n: p.detach() for n, p in zip(names, params)}
        d, stats = batched_task_grad(fn, net, detached, {}, b.support_x, b.support_y, b.query_x, b.query_y, **kwargs)
        for n, p in zip(names, params):
            p.grad = d[n]
        opt.step()
        curve.append(float(stats["query_loss_post"]))
    wall = time.perf_counter() - t0
    peak = _peak_since(rss0)

    detached = {n: p.detach() for n, p in zip(names, params)}
    mon = dm.monitor_batch(100)
    exact, stats = batched_task_grad(
        maml_task_grad, net, detached, {}, mon.support_x, mon.support_y, mon.query_x, mon.query_y, **common
    )
    val = dm.val_batch()
    loss = resolve_loss(common["loss"])
    with torch.no_grad():
        _, post = adapt_and_predict(
            net, detached, {}, val.support_x, val.support_y, val.query_x, chunk_size=100, **common
        )
        val_loss = float(torch.func.vmap(loss)(post, val.query_y).mean())
        val_acc = float((post.argmax(-1) == val.query_y).float().mean()) if task == "digits" else None
    return {
        "task": task,
        "algorithm": algorithm,
        "steps": steps,
        "objective": float(stats["query_loss_post"]),
        "maml_grad_norm": float(tree_norm(exact)),
        "val_loss_post": val_loss,
        "val_acc_post": val_acc,
        "ms_per_step": 1000 * wall / steps,
        "peak_mib": peak,
        "curve": curve,
    }


def _memory(algorithm: str, depth: int, inner_steps: int, seed: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from lightning_epfl.functional.meta import batched_task_grad, task_grad_fn
    from lightning_epfl.modules.meta_learning import MLP

    torch.manual_seed(seed)
    net = MLP(1, [64] * depth, 1)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(8, 1000, 1, generator=g) * 10 - 5
    y = torch.sin(x)
    params = {n: p.detach() for n, p in net.named_parameters()}
    kwargs = {"loss": "mse", "inner_lr": 0.01, "inner_steps": inner_steps}
    if algorithm == "fo_b_maml":
        kwargs["fd_delta"] = 1e-2
    rss0 = _reset_peak()
    t0 = time.perf_counter()
    batched_task_grad(
        task_grad_fn(algorithm), net, params, {}, x[:, :500], y[:, :500], x[:, 500:], y[:, 500:], **kwargs
    )
    return {
        "algorithm": algorithm,
        "depth": depth,
        "inner_steps": inner_steps,
        "peak_mib": _peak_since(rss0),
        "s": time.perf_counter() - t0,
        "params": sum(p.numel() for p in params.values()),
    }


def part_methods(args) -> list[dict[str, Any]]:
    rows = []
    for task, steps in (("sinusoid", args.sinusoid_steps), ("digits", args.digits_steps)):
        for algorithm in ALGORITHMS:
            rows.append(_train(task, algorithm, steps, args.seed))
    print("\n### Four methods, equal budget (Adam 1e-3, K = 1; F and exact ||grad F|| on 100 fixed training tasks)\n")
    print("| task | algorithm | steps | F (MAML objective) | exact ‖∇F‖ | val loss post | val acc post | ms/step | "
          "peak Δ RSS (MiB) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        acc = "-" if r["val_acc_post"] is None else f"{r['val_acc_post']:.4f}"
        print(
            f"| {r['task']} | {r['algorithm']} | {r['steps']} | {r['objective']:.4f} | {r['maml_grad_norm']:.4f} | "
            f"{r['val_loss_post']:.4f} | {acc} | {r['ms_per_step']:.1f} | {r['peak_mib']:.1f} |"
        )
    for task in ("sinusoid", "digits"):
        by = {r["algorithm"]: r for r in rows if r["task"] == task}
        gap = by["fo_b_maml"]["objective"] / by["maml"]["objective"] - 1
        print(
            f"\n{task}: fo_b_maml F vs exact MAML: {100 * gap:+.2f}%; exact ||grad F||: fo_b_maml "
            f"{by['fo_b_maml']['maml_grad_norm']:.4f} vs FO-MAML {by['fomaml']['maml_grad_norm']:.4f}"
        )
    return rows


def part_estimator(args) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(1)
    from lightning_epfl.functional.meta import batched_task_grad, maml_task_grad, task_grad_fn, tree_norm

    dm, net, common = _setup("sinusoid", args.seed)
    b = dm.train_batch(0)
    params = {n: p.detach() for n, p in net.named_parameters()}
    data = (b.support_x, b.support_y, b.query_x, b.query_y)
    variants = [
        ("FO-MAML", "fomaml", {}),
        ("Reptile K_r=5", "reptile", {"reptile_steps": 5}),
        ("sym 1e-2", "fo_b_maml", {"fd_scheme": "symmetric", "fd_delta": 1e-2}),
        ("fwd 1e-2", "fo_b_maml", {"fd_scheme": "forward", "fd_delta": 1e-2}),
        ("fwd 1e-3", "fo_b_maml", {"fd_scheme": "forward", "fd_delta": 1e-3}),
    ]
    rows = []
    for inner_steps, inner_lr in ((1, 0.1), (5, 0.05)):
        kw = {"loss": "mse", "inner_lr": inner_lr, "inner_steps": inner_steps}
        exact, _ = batched_task_grad(maml_task_grad, net, params, {}, *data, **kw)
        row: dict[str, Any] = {"K": inner_steps, "alpha": inner_lr}
        for label, algorithm, extra in variants:
            d, _ = batched_task_grad(task_grad_fn(algorithm), net, params, {}, *data, **kw, **extra)
            row[label] = float(tree_norm({n: d[n] - exact[n] for n in d}) / tree_norm(exact))
        rows.append(row)
    labels = [v[0] for v in variants]
    print("\n### Estimator error ||d - grad F|| / ||grad F|| at init (sinusoid MLP 1-40-40-1, 25 tasks, float32)\n")
    print("| K, alpha | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    for r in rows:
        print(f"| {r['K']}, {r['alpha']} | " + " | ".join(f"{r[k]:.2g}" for k in labels) + " |")
    return rows


def part_vmap(args) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(1)
    from lightning_epfl.functional.meta import batched_task_grad, task_grad_fn

    dm, net, common = _setup("sinusoid", args.seed)
    dm.tasks_per_batch = 32
    b = dm.train_batch(0)
    params = {n: p.detach() for n, p in net.named_parameters()}
    rows = []
    for algorithm in ALGORITHMS:
        kwargs = dict(common)
        if algorithm == "reptile":
            kwargs["reptile_steps"] = 5
        times = {}
        for vectorize in (True, False):
            fn = task_grad_fn(algorithm)

            def call(fn=fn, vectorize=vectorize, kwargs=kwargs):
                return batched_task_grad(
                    fn, net, params, {}, b.support_x, b.support_y, b.query_x, b.query_y, vectorize=vectorize, **kwargs
                )

            call()
            samples = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                call()
                samples.append(time.perf_counter() - t0)
            times[vectorize] = statistics.median(samples)
        rows.append({"algorithm": algorithm, "vmap_ms": 1000 * times[True], "loop_ms": 1000 * times[False]})
    print("\n### vmap over 32 tasks vs a per-task Python loop (one meta-gradient, sinusoid MLP 1-40-40-1, K = 1)\n")
    print("| algorithm | vmap (ms) | loop (ms) | speed-up |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['algorithm']} | {r['vmap_ms']:.1f} | {r['loop_ms']:.1f} | {r['loop_ms'] / r['vmap_ms']:.1f}x |")
    return rows


def part_memory(args) -> list[dict[str, Any]]:
    configs = [(a, d, 5) for d in args.depths for a in ("maml", "fo_b_maml")]
    configs += [(a, 8, k) for k in (1, 10) for a in ("maml", "fo_b_maml")]
    rows = [_memory(a, d, k, args.seed) for a, d, k in configs]
    print(
        "\n### Peak extra memory of one meta-gradient (peak RSS delta; tanh MLP width 64, 8 tasks x 500+500 points)\n"
    )
    print("| depth | K | params | exact MAML (MiB) | FO-B-MAML (MiB) | ratio | exact (s) | FO-B-MAML (s) |")
    print("|---|---|---|---|---|---|---|---|")
    keyed = {(r["algorithm"], r["depth"], r["inner_steps"]): r for r in rows}
    for d, k in sorted({(d, k) for _, d, k in configs}, key=lambda t: (t[1] != 5, t[0], t[1])):
        e, f = keyed[("maml", d, k)], keyed[("fo_b_maml", d, k)]
        print(
            f"| {d} | {k} | {e['params']} | {e['peak_mib']:.1f} | {f['peak_mib']:.1f} | "
            f"{e['peak_mib'] / max(f['peak_mib'], 1e-3):.1f}x | {e['s']:.2f} | {f['s']:.2f} |"
        )
    return rows


def plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [k for k in ("methods", "memory") if k in results]
    if not panels:
        return
    ncols = 3 if "methods" in results and "memory" in results else (2 if "methods" in results else 1)
    fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 4))
    axes = np.atleast_1d(axes)
    i = 0
    if "methods" in results:
        for task in ("sinusoid", "digits"):
            ax = axes[i]
            i += 1
            for r in results["methods"]:
                if r["task"] != task:
                    continue
                c = np.asarray(r["curve"])
                w = max(1, len(c) // 50)
                smooth = np.convolve(c, np.ones(w) / w, mode="valid")
                ax.plot(np.arange(len(smooth)) + w, smooth, label=f"{r['algorithm']} (‖∇F‖={r['maml_grad_norm']:.3f})")
            ax.set_title(f"{task}: post-adaptation query loss (train, smoothed)")
            ax.set_xlabel("outer step")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    if "memory" in results:
        ax = axes[i]
        for alg, marker in (("maml", "o"), ("fo_b_maml", "s")):
            pts = sorted(
                (r["depth"], r["peak_mib"])
                for r in results["memory"]
                if r["algorithm"] == alg and r["inner_steps"] == 5
            )
            ax.plot(*zip(*pts), marker=marker, label=alg)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("depth (hidden layers, width 64), K = 5")
        ax.set_ylabel("peak extra resident memory (MiB)")
        ax.set_title("memory of one meta-gradient")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = ["estimator", "methods", "vmap", "memory"]
    parser.add_argument("--parts", nargs="+", default=parts, choices=parts)
    parser.add_argument("--sinusoid-steps", type=int, default=600)
    parser.add_argument("--digits-steps", type=int, default=300)
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/meta_learning")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    _configure_malloc()
    t0 = time.time()
    results: dict[str, Any] = {}
    for part in args.parts:
        run = {"estimator": part_estimator, "methods": part_methods, "vmap": part_vmap, "memory": part_memory}[part]
        results[part] = run(args)
    path = os.path.join(args.out, "results.json")
    atomic_write_bytes(path, json.dumps(results, indent=1).encode())
    plot(results, os.path.join(args.out, "meta_learning.png"))
    print(f"\ntotal {time.time() - t0:.0f} s; results: {path}; figure: {os.path.join(args.out, 'meta_learning.png')}")


if __name__ == "__main__":
    main()
