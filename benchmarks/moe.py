"""MoE router design choices (Fan, Messmer, Jaggi, arXiv:2402.13089) and the speed of ``MoEMLP``.

Parts, each printed as a Markdown table:

1. **quality**: byte-level Llama LMs (hidden 64, 3 layers, 4 heads, sequences of 128 bytes) trained for
   ``--steps`` steps on four real text domains found on the machine (Python's ``pydoc_data`` prose, standard-library
   source code, and the German and French gettext catalogs; domains without text here are skipped), 4 sequences
   of each domain per batch, AdamW 2e-3. Configurations: dense MLPs of width 172 (= one expert) and 344 (= the
   active width of top-2), and MoE with 4 experts of width 172, top-2: token routing learned / frozen / re-drawn,
   sequence routing (causal running mean, the default) learned / frozen / re-drawn, and the paper's full-sequence
   mean (which lets position t see tokens after t in a causal LM). Printed per configuration: validation
   perplexity per domain and the mean over domains (mean +- std over seeds), and the routing specialization: the
   normalized mutual information between each position's top-1 expert and its domain or its byte class (7 classes:
   lower, upper, digit, space, newline, punctuation, other), as min-max over layers and seeds, from
   ``ExpertUtilizationMonitor`` at the last validation.
2. **speed**: forward + backward time of one ``MoEMLP`` layer (SwiGLU experts of width 344, hidden 128, top-2, learned
   token router, load-balancing and z losses included) against transformers' ``MixtralSparseMoeBlock`` with the
   same shapes (the fastest of its ``eager``, ``batched_mm`` and ``grouped_mm`` experts implementations, per shape)
   and against the floor, a dense SwiGLU MLP of width top_k x 344 (the same active parameters); experts E in
   {4, 8, 64} x tokens per call in {256, 2048}; float32, median of ``--repeats`` calls, the three measured in turns
   in the same process.

Usage::

    python benchmarks/moe.py --parts speed --threads 2           # ~3 min
    python benchmarks/moe.py --parts quality --seeds 0 1          # ~20-40 min on 2 cores (2 worker processes)

Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

HIDDEN, EXPERT_WIDTH, TOP_K = 128, 344, 2
DOMAINS = ["prose", "code", "german", "french"]
BACKBONE = {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 4, "max_position_embeddings": 128}  # fmt: skip
CONFIGS: list[tuple[str, dict[str, Any] | None, int]] = [
    ("dense, width 172 (= 1 expert)", None, 172),
    ("dense, width 344 (= top-2 active)", None, 344),
    ("token, learned", {"routing": "token", "router": "learned"}, 172),
    ("token, frozen", {"routing": "token", "router": "frozen"}, 172),
    ("token, re-drawn", {"routing": "token", "router": "resampled"}, 172),
    ("sequence (causal mean), learned", {"routing": "sequence", "router": "learned"}, 172),
    ("sequence (causal mean), frozen", {"routing": "sequence", "router": "frozen"}, 172),
    ("sequence (causal mean), re-drawn", {"routing": "sequence", "router": "resampled"}, 172),
    ("sequence (full mean, sees the future), learned",
     {"routing": "sequence", "sequence_pooling": "mean", "router": "learned"}, 172),
]  # fmt: skip


# ------------------------------------------------------------------------------------------------------- quality
def _train(job: tuple[int, int, int, str]) -> dict[str, Any]:
    """One configuration and seed; runs in a worker process with its own thread count."""
    index, seed, steps, root = job
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging

    from lightning.pytorch import Trainer, seed_everything

    from lightning_epfl.callbacks import ExpertUtilizationMonitor
    from lightning_epfl.datamodules import MultiDomainTextDataModule
    from lightning_epfl.datamodules.domains import domain_available
    from lightning_epfl.modules import CausalLMModule, MoEConfig

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    label, moe, width = CONFIGS[index]
    domains = [d for d in DOMAINS if domain_available(d)]
    seed_everything(seed, verbose=False)
    dm = MultiDomainTextDataModule(domains=domains, block_size=128, batch_size=4 * len(domains), max_chars=300_000)
    module = CausalLMModule(
        config={**BACKBONE, "intermediate_size": width},
        moe=None if moe is None else MoEConfig(num_experts=4, top_k=TOP_K, router_seed=seed, **moe),
        optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3),
    )
    callbacks = [] if moe is None else [ExpertUtilizationMonitor(log_every_n_steps=50, plot=False)]
    trainer = Trainer(
        max_steps=steps, max_epochs=-1, val_check_interval=steps, limit_val_batches=16, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, default_root_dir=os.path.join(root, f"{index}-{seed}"), accelerator="cpu",
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, dm)
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    layers = BACKBONE["num_hidden_layers"]
    return {
        "config": label, "seed": seed, "seconds": time.perf_counter() - start, "domains": domains,
        "ppl": {d: m[f"val/ppl/{d}"] for d in domains},
        "nmi_domain": [m.get(f"moe/L{i}/nmi_domain") for i in range(layers)] if moe else None,
        "nmi_token_class": [m.get(f"moe/L{i}/nmi_token_class") for i in range(layers)] if moe else None,
    }  # fmt: skip


def _span(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def part_quality(seeds: list[int], steps: int, workers: int, out: str) -> None:
    import tempfile

    jobs = [(i, s, steps, tempfile.mkdtemp(prefix="moe-bench-")) for i in range(len(CONFIGS)) for s in seeds]
    print(f"\n## MoE design choices: byte-level Llama, {steps} steps, seeds {seeds}, {workers} worker process(es) "
          "x 1 thread\n", flush=True)  # fmt: skip
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(_train, jobs))
    domains = results[0]["domains"]
    head = " | ".join(f"ppl {d}" for d in domains)
    print(f"| configuration | {head} | mean ppl | NMI(expert, domain) | NMI(expert, byte class) | s/run |")
    print("|---" * (len(domains) + 5) + "|")
    for label, _, _ in CONFIGS:
        rows = [r for r in results if r["config"] == label]
        cells = []
        for d in domains:
            values = [r["ppl"][d] for r in rows]
            cells.append(f"{statistics.mean(values):.2f}")
        means = [statistics.mean(r["ppl"].values()) for r in rows]
        spread = f" +- {statistics.stdev(means):.2f}" if len(means) > 1 else ""
        nmi_d = _span([v for r in rows for v in r["nmi_domain"]]) if rows[0]["nmi_domain"] else "-"
        nmi_c = _span([v for r in rows for v in r["nmi_token_class"]]) if rows[0]["nmi_token_class"] else "-"
        secs = statistics.mean(r["seconds"] for r in rows)
        print(f"| {label} | {' | '.join(cells)} | **{statistics.mean(means):.2f}**{spread} | {nmi_d} | {nmi_c} | "
              f"{secs:.0f} |", flush=True)  # fmt: skip
    print(f"\n(total {time.perf_counter() - start:.0f} s; per-seed values in {out})")
    with open(out, "w") as fh:
        json.dump(results, fh, indent=1)


# --------------------------------------------------------------------------------------------------------- speed
def _median_ms(fn: Any, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def part_speed(repeats: int) -> None:
    from transformers import LlamaConfig, MixtralConfig
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from lightning_epfl.modules import MoEConfig, MoEMLP

    threads = torch.get_num_threads()
    print(f"\n## MoEMLP forward + backward vs the Mixtral block and the dense floor: hidden {HIDDEN}, expert width "
          f"{EXPERT_WIDTH}, top-{TOP_K}, float32, {threads} thread(s), median of {repeats}\n")  # fmt: skip
    print("| experts | tokens | dense floor (width 688), ms | MoEMLP, ms | Mixtral block (fastest impl.), ms | "
          "MoEMLP / floor | Mixtral / floor | Mixtral / MoEMLP |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")

    def step(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Any:
        def run() -> None:
            module.zero_grad(set_to_none=True)
            out = module(x)
            out = out[0] if isinstance(out, tuple) else out
            loss = (out * grad).sum()
            if isinstance(module, MoEMLP):
                loss = loss + 0.01 * module.last_aux.lb + 1e-3 * module.last_aux.z
            loss.backward()

        return run

    def mlp(width: int) -> torch.nn.Module:
        return LlamaMLP(LlamaConfig(hidden_size=HIDDEN, intermediate_size=width, num_attention_heads=4))

    for experts in (4, 8, 64):
        for tokens in (256, 2048):
            torch.manual_seed(0)
            x = torch.randn(4, tokens // 4, HIDDEN, requires_grad=True)
            grad = torch.randn_like(x)
            dense = mlp(TOP_K * EXPERT_WIDTH)
            moe = MoEMLP(mlp(EXPERT_WIDTH), HIDDEN, MoEConfig(num_experts=experts, top_k=TOP_K)).train()
            mixtral = MixtralSparseMoeBlock(MixtralConfig(
                hidden_size=HIDDEN, intermediate_size=EXPERT_WIDTH, num_local_experts=experts,
                num_experts_per_tok=TOP_K, num_attention_heads=4, num_key_value_heads=4,
            ))  # fmt: skip
            for p in mixtral.parameters():
                torch.nn.init.normal_(p, 0.0, 0.02)
            runs: dict[str, list[float]] = {"dense": [], "moe": []}
            impls = ["eager", "batched_mm", "grouped_mm"]
            runs.update({i: [] for i in impls})
            for _ in range(3):  # in turns, so that load changes hit all of them alike
                runs["dense"].append(_median_ms(step(dense, x, grad), repeats))
                runs["moe"].append(_median_ms(step(moe, x, grad), repeats))
                for impl in impls:
                    mixtral.experts.config._experts_implementation = impl
                    try:
                        runs[impl].append(_median_ms(step(mixtral, x, grad), max(3, repeats // 4)))
                    except Exception:  # an implementation this build cannot run on CPU
                        runs[impl].append(float("inf"))
            t = {k: min(v) for k, v in runs.items()}
            best = min(impls, key=lambda i: t[i])
            print(f"| {experts} | {tokens} | {t['dense']:.2f} | {t['moe']:.2f} | {t[best]:.2f} ({best}) | "
                  f"**{t['moe'] / t['dense']:.2f}x** | {t[best] / t['dense']:.2f}x | {t[best] / t['moe']:.2f}x |",
                  flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["speed", "quality"], choices=["speed", "quality"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=300, help="training steps per quality run (>= 1)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the quality part")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per speed measurement")
    parser.add_argument("--threads", type=int, default=2, help="threads of the speed part")
    parser.add_argument("--out", default="moe_quality.json", help="JSON of every quality run (refused if present)")
    args = parser.parse_args()
    if args.steps < 1 or args.workers < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--steps, --workers, --repeats and --threads must be >= 1")
    if "quality" in args.parts and os.path.exists(args.out):
        parser.error(f"--out {args.out!r} exists; give another path")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}")
    if "speed" in args.parts:
        part_speed(args.repeats)
    if "quality" in args.parts:
        part_quality(args.seeds, args.steps, args.workers, args.out)


if __name__ == "__main__":
    main()
