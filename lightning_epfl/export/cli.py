"""``lightning-epfl export <method>``: compress a pretrained model without training.

``lightning-epfl export quarot --model smollm2-135m-instruct --output out/w4a4kv4`` loads the model (a local
transformers folder, a ``.gguf`` file or a packaged model name), draws calibration and evaluation sequences from
local text (Python's ``pydoc_data`` topics by default, or ``--data.paths``), runs the QuaRot transform with a
progress bar over layers, prints the perplexity before and after and writes the export atomically. Every
:class:`~lightning_epfl.export.QuaRotConfig` field is an option (``--config.w_bits 8``, ``--config.w_method rtn``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

METHODS = ("quarot",)


def _parser() -> Any:
    from jsonargparse import ArgumentParser

    from lightning_epfl.export.quarot import QuaRotConfig

    parser = ArgumentParser(prog="lightning-epfl export quarot", description=__doc__)
    parser.add_argument("--model", type=str, required=True, help="transformers folder, .gguf file or packaged name")
    parser.add_argument("--output", type=str, required=True, help="export folder (written atomically)")
    parser.add_dataclass_arguments(QuaRotConfig, "config")
    parser.add_argument("--data.paths", type=list[str] | None, default=None, help="local text files (default pydoc)")
    parser.add_argument("--data.block_size", type=int, default=512, help="tokens per calibration/evaluation sequence")
    parser.add_argument("--eval_batches", type=int, default=8, help="evaluation sequences (0: skip perplexity)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def export_main(argv: Sequence[str]) -> dict[str, Any]:
    """Run ``export <method> ...``; returns the printed summary.

    Raises:
        ValueError: An unknown method (the message names the known ones) or a bad option value.
    """
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: lightning-epfl export {{{','.join(METHODS)}}} [options]; `lightning-epfl export quarot --help`")
        return {}
    if not argv or argv[0] not in METHODS:
        got = argv[0] if argv else "nothing"
        raise ValueError(f"`export` takes a method, one of {', '.join(METHODS)}; got {got!r}.")
    args = _parser().parse_args(list(argv[1:]))
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from lightning_epfl.datamodules import TextDataModule
    from lightning_epfl.export.quarot import (
        QuaRotConfig,
        perplexity,
        quarot_quantize_,
        save_quantized,
        validate_model,
    )
    from lightning_epfl.models import resolve_pretrained
    from lightning_epfl.utilities import check_export_target

    config = args.config if isinstance(args.config, QuaRotConfig) else QuaRotConfig(**vars(args.config))
    if args.eval_batches < 0:
        raise ValueError(f"`eval_batches` must be >= 0, got {args.eval_batches}.")
    check_export_target(args.output)  # before any work
    folder = resolve_pretrained(args.model, argument="model")
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    validate_model(model, config)
    dm = TextDataModule(
        paths=args.data.paths, tokenizer_path=str(folder), block_size=args.data.block_size, batch_size=1,
        seed=args.seed,
    )  # fmt: skip
    dm.setup("fit")
    calib = [b["input_ids"] for _, b in zip(range(config.calib_samples), dm.train_dataloader())]
    evals = [b["input_ids"] for _, b in zip(range(args.eval_batches), dm.val_dataloader())]
    summary: dict[str, Any] = {"model": args.model, "output": args.output}
    if evals:
        summary["ppl_fp"] = perplexity(model, evals)
    report = quarot_quantize_(
        model, config, calib, evals[0] if evals else None, lambda it: tqdm(it, desc="QuaRot: quantizing layers")
    )
    if evals:
        summary["ppl_q"] = perplexity(model, evals)
    summary["max_abs_dlogit"] = report.max_abs_dlogit
    summary["timings_s"] = report.timings
    summary["output"] = save_quantized(model, config, args.output, report, dm.tokenizer)
    print(json.dumps(summary, indent=2))
    return summary
