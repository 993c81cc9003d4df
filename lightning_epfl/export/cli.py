"""``lightning-epfl export <method>``: compress a pretrained model without training.

``lightning-epfl export quarot --model smollm2-135m-instruct --output out/w4a4kv4`` or
``lightning-epfl export sparse-quant --model smollm2-135m-instruct --output out/2of4-int4`` loads the model (a local
transformers folder, a ``.gguf`` file or a packaged model name), draws calibration and evaluation sequences from
local text (Python's ``pydoc_data`` topics by default, or ``--data.paths``), compresses it with a progress bar over
layers, prints the perplexity before and after and writes the export atomically. Every field of the method's config
(:class:`~lightning_epfl.export.QuaRotConfig`, :class:`~lightning_epfl.export.SparseQuantConfig`) is an option
(``--config.w_bits 8``, ``--config.pattern unstructured``). The transform, the checks and the export are those of
the method's callback (:class:`~lightning_epfl.export.QuaRotExport`, :class:`~lightning_epfl.export.
SparseQuantExport`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import torch

METHODS = ("quarot", "sparse-quant")


def _callback_class(method: str) -> Any:
    from lightning_epfl.export.callback import QuaRotExport, SparseQuantExport

    return {"quarot": QuaRotExport, "sparse-quant": SparseQuantExport}[method]


def _parser(method: str) -> Any:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog=f"lightning-epfl export {method}", description=__doc__)
    parser.add_argument("--model", type=str, required=True, help="transformers folder, .gguf file or packaged name")
    parser.add_argument("--output", type=str, required=True, help="export folder (written atomically)")
    parser.add_dataclass_arguments(_callback_class(method).config_class, "config")
    parser.add_argument("--data.paths", type=list[str] | None, default=None, help="local text files (default pydoc)")
    parser.add_argument("--data.block_size", type=int, default=512, help="tokens per calibration/evaluation sequence")
    parser.add_argument(
        "--eval_batches", type=int, default=8, help="evaluation sequences (0: skip perplexity and max_abs_dlogit)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the text split and sampling (not config.seed)")
    parser.add_argument("--overwrite", type=bool, default=False, help="replace an earlier export in --output")
    return parser


def export_main(argv: Sequence[str]) -> dict[str, Any]:
    """Run ``export <method> ...``; returns the printed summary.

    Raises:
        ValueError: An unknown method (the message names the known ones) or a bad option value, before the model
            is loaded; a config the model cannot take, before it is changed.
        FileExistsError: ``--output`` is a file or a non-empty folder (an earlier export is replaced only with
            ``--overwrite``).
    """
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: lightning-epfl export {{{','.join(METHODS)}}} [options]; `lightning-epfl export quarot --help`")
        return {}
    if not argv or argv[0] not in METHODS:
        got = argv[0] if argv else "nothing"
        raise ValueError(f"`export` takes a method, one of {', '.join(METHODS)}; got {got!r}.")
    method = argv[0]
    args = _parser(method).parse_args(list(argv[1:]))
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from lightning_epfl.datamodules import TextDataModule
    from lightning_epfl.export.quarot import perplexity
    from lightning_epfl.models import resolve_pretrained
    from lightning_epfl.utilities import check_export_target

    callback_class = _callback_class(method)
    if dataclasses.is_dataclass(args.config):
        config = args.config
    else:  # a Namespace (holding `__path__` when read from a --config file)
        fields = {k: v for k, v in vars(args.config).items() if not k.startswith("__")}
        config = callback_class.config_class.from_dict(fields)
    if args.eval_batches < 0:
        raise ValueError(f"`eval_batches` must be >= 0, got {args.eval_batches}.")
    check_export_target(args.output, replace=args.overwrite)  # before any work
    export = callback_class(config, when="manual", export_dir=args.output)
    folder = resolve_pretrained(args.model, argument="model")
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    if export.check_model(model):
        raise ValueError(f"{args.model!r} holds an already transformed model; start from the float model.")
    dm = TextDataModule(
        paths=args.data.paths, tokenizer_path=str(folder), block_size=args.data.block_size, batch_size=1,
        seed=args.seed,
    )  # fmt: skip
    dm.setup("fit")
    calib = [b["input_ids"] for _, b in zip(range(config.calib_samples), dm.train_dataloader())]
    evals = [b["input_ids"] for _, b in zip(range(args.eval_batches), dm.val_dataloader())]
    summary: dict[str, Any] = {"method": method, "model": args.model, "output": args.output}
    if evals:
        summary["ppl_fp"] = perplexity(model, evals)
    desc = f"{method}: compressing layers"
    export.report, dlogit = export.transform(model, calib, evals[0] if evals else None, lambda it: tqdm(it, desc=desc))
    if evals:
        summary["ppl_q"] = perplexity(model, evals)
    summary["max_abs_dlogit"] = dlogit
    summary.update({key.split("/", 1)[1]: value for key, value in export.report_metrics(export.report).items()})
    summary["timings_s"] = export.report.timings
    summary["output"] = export.save(model, args.output, dm.tokenizer)
    print(json.dumps(summary, indent=2))
    return summary
