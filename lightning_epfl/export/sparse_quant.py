r"""
Sparse-then-quantize export of ``nn.Linear`` weights
===================================================

Prunes and fake-quantizes every target ``nn.Linear`` of a model in place, following Harma et al., "Effective
Interplay between Sparsity and Quantization: From Theory to Practice" (arXiv:2405.20935). With a keep-mask ``m``
(magnitude, Wanda or SparseGPT, :mod:`lightning_epfl.functional.sparsity`) and a block fake quantizer ``Q``
(:func:`lightning_epfl.functional.formats.block_quantize`, blocks along the input dimension):

.. math::

    \mathrm{SQ}(W) = m ⊙ Q(m ⊙ W), \qquad \mathrm{QS}(W) = m' ⊙ Q(W),

where ``m'`` is recomputed by the same rule on ``Q(W)``. For SparseGPT, SQ quantizes the SparseGPT-updated weights
(``m ⊙ Q(W_sgpt)``). The report holds relative Frobenius errors

.. math::

    ε_s = ‖W - m ⊙ W‖_F / ‖W‖_F, \quad ε_q = ‖W - Q(W)‖_F / ‖W‖_F, \quad
    ε_{sq} = ‖W - \mathrm{SQ}(W)‖_F / ‖W‖_F, \quad ε_{qs} = ‖W - \mathrm{QS}(W)‖_F / ‖W‖_F

per layer and over all target weights concatenated, with the orthogonality bound ``ε_s + ε_q`` and its excess
(:func:`~lightning_epfl.functional.sparsity.orthogonality`).

Weights are stored dequantized (plain float tensors with exact zeros), so an export written by
:func:`save_sparse_quantized` loads with a plain ``from_pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_epfl.export.calibration import calibration_sequences
from lightning_epfl.export.config import ExportConfig
from lightning_epfl.functional.formats import block_quantize
from lightning_epfl.functional.quantize import HessianAccumulator
from lightning_epfl.functional.sparsity import (
    input_norms,
    magnitude_mask,
    orthogonality,
    sparse_quantize,
    sparsegpt_prune,
    wanda_scores,
)

__all__ = [
    "SPARSE_QUANT_CONFIG_FILE",
    "SparseQuantConfig",
    "SparseQuantReport",
    "load_sparse_quantized",
    "save_sparse_quantized",
    "sparse_quantize_",
    "target_linears",
    "validate_model",
]

SPARSE_QUANT_CONFIG_FILE = "sparse_quant_config.json"
"""File of an export holding the :class:`SparseQuantConfig` and the :class:`SparseQuantReport`."""

_CHOICES: dict[str, tuple[Any, ...]] = {
    "pattern": ("unstructured", "n:m"),
    "scope": ("row", "tensor"),
    "scorer": ("magnitude", "wanda", "sparsegpt"),
    "fmt": ("int", "hbfp", "mxint", "mxfp", "none"),
    "order": ("SQ", "QS"),
    "rounding": ("nearest", "stochastic"),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SparseQuantConfig(ExportConfig):
    """Settings of a sparse-then-quantize export (peft style: a plain dataclass, serializable as JSON).

    Args:
        sparsity: Fraction of weights removed for ``pattern="unstructured"``, in ``[0, 1)``. Default ``0.5``.
        pattern: ``"unstructured"`` or ``"n:m"`` (default).
        n: Weights kept per group of ``m`` for ``"n:m"``, ``1 <= n <= m``. Default ``2``.
        m: Group length along the input dimension for ``"n:m"``; must divide every target layer's input size.
            Default ``4``.
        scope: Where the unstructured top-k is taken: ``"row"`` (default) or ``"tensor"`` (magnitude scorer only;
            Wanda and SparseGPT decide per row).
        scorer: ``"magnitude"`` (default, ``|W|``), ``"wanda"`` (``|W|·‖X_j‖``, needs calibration) or
            ``"sparsegpt"`` (OBS pruning with weight updates, needs calibration).
        fmt: Block format ``"int"`` (default), ``"hbfp"``, ``"mxint"``, ``"mxfp"`` or ``"none"`` (no quantization).
        bits: Total bits (``"int"``), mantissa bits (``"hbfp"``: 7 for HBFP8) or element bits (``"mxint"``: 8 for
            MXINT8); ignored for ``"mxfp"``, whose ``element_format`` sets the width (see
            :func:`~lightning_epfl.functional.formats.block_quantize`). Default ``4``.
        element_format: Element format for ``fmt="mxfp"`` (e.g. ``"e2m1"``). Default ``None``.
        block_size: Elements per shared scale along the input dimension; must divide every target layer's input
            size. Default ``32``.
        order: ``"SQ"`` (default, prune then quantize) or ``"QS"`` (quantize then prune; an ablation).
        rounding: ``"nearest"`` (default) or ``"stochastic"``.
        seed: Seed of the stochastic rounding; layer ``i`` (in :func:`target_linears` order) draws from a generator
            seeded ``seed + i``, so an export is reproducible. Default ``0``.
        skip_modules: Linear layers left untouched, by qualified-name suffix. Default ``["lm_head"]``.
        calib_samples: Calibration sequences used at most (Wanda / SparseGPT). Default ``32``.
        calib_seq_len: Calibration tokens per sequence at most. Default ``512``.
        damp: SparseGPT dampening, a fraction of the mean Hessian diagonal, in ``[0, 1)``. Default ``0.01``.

    Raises:
        ValueError: For any value outside the ranges above; the message names the field and the allowed values.
    """

    sparsity: float = 0.5
    pattern: Literal["unstructured", "n:m"] = "n:m"
    n: int = 2
    m: int = 4
    scope: Literal["row", "tensor"] = "row"
    scorer: Literal["magnitude", "wanda", "sparsegpt"] = "magnitude"
    fmt: Literal["int", "hbfp", "mxint", "mxfp", "none"] = "int"
    bits: int = 4
    element_format: str | None = None
    block_size: int = 32
    order: Literal["SQ", "QS"] = "SQ"
    rounding: Literal["nearest", "stochastic"] = "nearest"
    seed: int = 0
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])
    calib_samples: int = 32
    calib_seq_len: int = 512
    damp: float = 0.01

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"SparseQuantConfig: `{name}` must be one of {allowed}, got {getattr(self, name)!r}.")
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1:
            raise ValueError(f"SparseQuantConfig: `sparsity` must be a number in [0, 1), got {s!r}.")
        for name in ("n", "m", "bits", "block_size", "calib_samples", "calib_seq_len"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"SparseQuantConfig: `{name}` must be an integer >= 1, got {value!r}.")
        if self.element_format is not None and self.fmt != "mxfp":
            raise ValueError(
                f"SparseQuantConfig: `element_format` applies to fmt='mxfp' only, got {self.element_format!r} with "
                f"fmt={self.fmt!r}; remove it or set fmt='mxfp'."
            )
        if self.scope == "tensor" and self.scorer != "magnitude":
            raise ValueError(
                f"SparseQuantConfig: scope='tensor' applies to scorer='magnitude' only (Wanda and SparseGPT decide "
                f"per row), got scorer={self.scorer!r}."
            )
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"SparseQuantConfig: `seed` must be an integer >= 0, got {self.seed!r}.")
        if self.n > self.m:
            raise ValueError(f"SparseQuantConfig: `n` must satisfy 1 <= n <= m, got n={self.n} > m={self.m}.")
        d = self.damp
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
            raise ValueError(f"SparseQuantConfig: `damp` must be a number in [0, 1), got {d!r}.")
        if isinstance(self.skip_modules, str) or not all(isinstance(x, str) for x in self.skip_modules):
            raise ValueError(
                f"SparseQuantConfig: `skip_modules` must be a list of name suffixes, got {self.skip_modules!r}."
            )
        self.skip_modules = list(self.skip_modules)
        if self.fmt != "none":  # format-specific checks (bits range, element_format) of block_quantize
            try:
                block_quantize(
                    torch.zeros(1, self.block_size),
                    self.fmt,
                    bits=self.bits,
                    element_format=self.element_format,
                    block_size=self.block_size,
                    rounding=self.rounding,
                )
            except ValueError as err:
                raise ValueError(f"SparseQuantConfig: invalid quantizer for fmt={self.fmt!r}: {err}") from err


@dataclass
class SparseQuantReport:
    """What :func:`sparse_quantize_` did.

    Attributes:
        config: The :class:`SparseQuantConfig` as a dict.
        layers: Per target layer (qualified name): ``eps_s``, ``eps_q``, ``eps_sq``, ``eps_qs`` (relative Frobenius
            errors, see the module docstring), ``bound = eps_s + eps_q``, ``excess = eps_sq - bound``,
            ``orthogonal`` (``excess <= 0``) and ``sparsity`` (fraction of zeros of the written weight).
        eps_s: Whole-model ``ε_s`` over all target weights concatenated.
        eps_q: Whole-model ``ε_q``.
        eps_sq: Whole-model ``ε_sq``.
        eps_qs: Whole-model ``ε_qs``.
        bound: ``eps_s + eps_q`` (whole model).
        excess: ``eps_sq - bound`` (whole model).
        sparsity_achieved: Fraction of zeros in all target weights after the change.
        timings: Seconds spent in ``"calibrate"`` and ``"sparsify_quantize"``.
    """

    config: dict[str, Any]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    eps_s: float = 0.0
    eps_q: float = 0.0
    eps_sq: float = 0.0
    eps_qs: float = 0.0
    bound: float = 0.0
    excess: float = 0.0
    sparsity_achieved: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serializable dict."""
        return dataclasses.asdict(self)


def target_linears(model: nn.Module, config: SparseQuantConfig) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of ``model`` whose qualified name ends with none of ``config.skip_modules``.

    Works for any architecture (causal LMs, encoders such as ``BertModel``). A suffix matches a whole name component
    (``"lm_head"`` matches ``"lm_head"`` and ``"x.lm_head"``, not ``"my_lm_head"``).

    Args:
        model: Any module.
        config: Supplies ``skip_modules``.

    Returns:
        ``{qualified name: layer}`` in ``named_modules`` order.
    """
    return {n: mod for n, mod in model.named_modules() if isinstance(mod, nn.Linear) and not config.skips(n)}


# ---------------------------------------------------------------------------------------------------- calibration
@torch.no_grad()
def _collect_statistics(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    calib: list[tuple[Tensor, Tensor | None]],
    scorer: str,
) -> dict[str, Any]:
    """Runs the dense model over ``calib`` with forward pre-hooks on ``linears``; positions an ``attention_mask``
    marks as padding are left out of the statistics.

    Returns:
        Per layer name: the ``[in]`` input norms ``‖X_{:,j}‖₂`` (``scorer="wanda"``) or a
        :class:`HessianAccumulator` (``scorer="sparsegpt"``).
    """
    sq_norms: dict[str, Tensor] = {}
    hessians: dict[str, HessianAccumulator] = {}
    handles = []
    current: dict[str, Tensor | None] = {"mask": None}

    def make_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            mask = current["mask"]
            if mask is not None and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.to(x.device).bool()]  # [real tokens, in]
            if scorer == "wanda":
                norms = input_norms(x).to(torch.float64) ** 2
                sq_norms[name] = norms if name not in sq_norms else sq_norms[name] + norms
            else:
                hessians.setdefault(name, HessianAccumulator(module.in_features)).add(x)

        return hook

    for name, layer in linears.items():
        handles.append(layer.register_forward_pre_hook(make_hook(name)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for ids, mask in calib:
            current["mask"] = mask
            model(input_ids=ids.to(device), attention_mask=None if mask is None else mask.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if scorer == "wanda":
        return {name: v.sqrt() for name, v in sq_norms.items()}
    return hessians


# ---------------------------------------------------------------------------------------------------- per layer
def _quantizer(config: SparseQuantConfig, seed: int = 0) -> Callable[[Tensor], Tensor]:
    """``Q``: block fake quantization along the input dimension (identity for ``fmt="none"``). Stochastic rounding
    draws from a generator seeded ``seed`` at every call, so ``Q(W)``, ``S→Q`` and ``Q→S`` share their uniforms."""
    if config.fmt == "none":
        return lambda t: t.clone()

    def quantize(t: Tensor) -> Tensor:
        return block_quantize(
            t,
            config.fmt,
            bits=config.bits,
            element_format=config.element_format,
            block_size=config.block_size,
            dim=-1,
            rounding=config.rounding,
            generator=torch.Generator(t.device).manual_seed(seed) if config.rounding == "stochastic" else None,
        )

    return quantize


def _mask_rule(config: SparseQuantConfig, stat: Any) -> Callable[[Tensor], Tensor]:
    """The keep-mask rule ``W -> m`` of the configured scorer (SparseGPT's mask of its own sweep)."""
    if config.scorer == "magnitude":
        return lambda w: magnitude_mask(
            w, config.sparsity, pattern=config.pattern, n=config.n, m=config.m, scope=config.scope
        )
    if config.scorer == "wanda":
        return lambda w: magnitude_mask(
            w,
            config.sparsity,
            pattern=config.pattern,
            n=config.n,
            m=config.m,
            scope="row",
            scores=wanda_scores(w, stat.to(w.dtype)),
        )
    return lambda w: _sparsegpt(w, stat, config)[1]


def _sparsegpt(w: Tensor, hessian: HessianAccumulator, config: SparseQuantConfig) -> tuple[Tensor, Tensor]:
    return sparsegpt_prune(
        w,
        hessian.hessian,
        sparsity=config.sparsity,
        pattern=config.pattern,
        n=config.n,
        m=config.m,
        damp=config.damp,
    )


def _sq_qs(w: Tensor, config: SparseQuantConfig, stat: Any, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(mask, Q(W), SQ(W), QS(W))`` of one weight ``[out, in]`` (computed in ``w``'s dtype)."""
    quantize = _quantizer(config, seed)
    rule = _mask_rule(config, stat)
    qw = quantize(w)
    if config.scorer == "sparsegpt":
        updated, mask = _sparsegpt(w, stat, config)
        sq = sparse_quantize(updated, mask, quantize, "SQ")
    else:
        mask = rule(w)
        sq = sparse_quantize(w, mask, quantize, "SQ")
    qs = sparse_quantize(w, mask, quantize, "QS", mask_fn=rule)
    return mask, qw, sq, qs


def _tied_input_embedding(model: nn.Module, linears: dict[str, nn.Linear]) -> str | None:
    """The name of a target linear whose weight is the input embedding's (``None`` if none is)."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    weight = getattr(embedding, "weight", None)
    return next((n for n, layer in linears.items() if weight is not None and layer.weight is weight), None)


def validate_model(model: nn.Module, config: SparseQuantConfig) -> dict[str, nn.Linear]:
    """Checks, without changing anything, that ``config`` applies to ``model``; returns its target linears.

    Args:
        model: Any module with ``nn.Linear`` layers.
        config: The settings.

    Returns:
        :func:`target_linears` of ``model``.

    Raises:
        ValueError: If ``config`` is not a :class:`SparseQuantConfig`, no layer is targeted, or ``m`` (``"n:m"``) or
            ``block_size`` (any ``fmt`` but ``"none"``) does not divide a target layer's input size.

    Warns:
        UserWarning: A ``skip_modules`` entry that matches no linear, or a target linear tied to the input
            embedding.
    """
    if not isinstance(config, SparseQuantConfig):
        raise ValueError(f"sparse_quantize_: `config` must be a SparseQuantConfig, got {type(config).__name__}.")
    linears = target_linears(model, config)
    if not linears:
        raise ValueError(f"sparse_quantize_: no nn.Linear left to process (skip_modules={config.skip_modules}).")
    names = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    unmatched = [s for s in config.skip_modules if not any(n == s or n.endswith("." + s) for n in names)]
    if unmatched:
        warnings.warn(
            f"sparse_quantize_: skip_modules {unmatched} match no nn.Linear (entries are whole trailing parts of a "
            f"qualified name, e.g. {names[-1]!r}); nothing is skipped for them.",
            UserWarning,
            stacklevel=3,
        )
    shared = _tied_input_embedding(model, linears)
    if shared:
        warnings.warn(
            f"sparse_quantize_: {shared!r} shares its weight with the input embedding (tied embeddings); pruning and "
            "quantizing it changes the embedding too. Add it to skip_modules to keep both dense.",
            UserWarning,
            stacklevel=3,
        )
    for name, layer in linears.items():
        size = layer.in_features
        if config.pattern == "n:m" and size % config.m != 0:
            raise ValueError(f"sparse_quantize_: `m` ({config.m}) must divide the input size {size} of {name!r}.")
        if config.fmt != "none" and size % config.block_size != 0:
            raise ValueError(
                f"sparse_quantize_: `block_size` ({config.block_size}) must divide the input size {size} of {name!r}."
            )
    return linears


# ---------------------------------------------------------------------------------------------------- entry point
@torch.no_grad()
def sparse_quantize_(
    model: nn.Module,
    config: SparseQuantConfig,
    calib_batches: Iterable[Any] | None = None,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> SparseQuantReport:
    r"""Prunes and fake-quantizes the target linears of ``model`` in place (see the module docstring).

    For ``scorer="wanda"`` / ``"sparsegpt"`` the dense model first runs once over the calibration batches, with
    forward pre-hooks collecting per-layer input norms (Wanda) or Hessians ``2XᵀX/N`` (SparseGPT). Every layer is
    then processed independently from its original weights. ``order="SQ"`` writes ``m ⊙ Q(m ⊙ W)`` (SparseGPT:
    ``m ⊙ Q(W_sgpt)``); ``order="QS"`` writes ``m' ⊙ Q(W)`` with ``m'`` the same rule applied to ``Q(W)``. Both are
    computed for the report. Weights stay in their dtype (bfloat16 / float16 are processed in float32).

    Args:
        model: Any module with ``nn.Linear`` layers; with calibration it must accept
            ``model(input_ids=..., attention_mask=...)``.
        config: The settings.
        calib_batches: Iterable of ``input_ids`` tensors ``[B, T]`` or dicts with ``input_ids`` (and optionally
            ``attention_mask``); required for Wanda / SparseGPT. Default ``None``.
        progress: Wrapper of the per-layer iterable (e.g. ``tqdm``). Default ``None``.

    Returns:
        The :class:`SparseQuantReport`.

    Raises:
        ValueError: Before any change, if the calibration set is empty for Wanda / SparseGPT, ``m`` (``"n:m"``) or
            ``block_size`` (any ``fmt`` but ``"none"``) does not divide a target layer's input size, or no layer is
            targeted.
    """
    linears = validate_model(model, config)
    stats: dict[str, Any] = {}
    timings: dict[str, float] = {}
    if config.scorer in ("wanda", "sparsegpt"):
        calib = calibration_sequences(calib_batches, config.calib_samples, config.calib_seq_len, "sparse_quantize_")
        if not calib:
            raise ValueError(f"sparse_quantize_: scorer={config.scorer!r} needs calibration batches; none were given.")
        start = time.perf_counter()
        stats = _collect_statistics(model, linears, calib, config.scorer)
        timings["calibrate"] = time.perf_counter() - start
        missing = [name for name in linears if name not in stats]
        if missing:
            raise ValueError(f"sparse_quantize_: the calibration forward never reached {missing[:3]}.")
    if config.order == "QS":
        warnings.warn(
            "sparse_quantize_: order='QS' (quantize, then prune) is an ablation; 'SQ' has the lower error.",
            UserWarning,
            stacklevel=2,
        )

    start = time.perf_counter()
    report = SparseQuantReport(config=config.to_dict())
    sums = dict.fromkeys(("norm", "s", "q", "sq", "qs"), 0.0)
    zeros, total = 0, 0
    for index, (name, layer) in (progress or (lambda it: it))(list(enumerate(linears.items()))):
        weight = layer.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        w = weight.detach().to(dtype)
        mask, qw, sq, qs = _sq_qs(w, config, stats.get(name), config.seed + index)
        w64 = w.to(torch.float64)
        sqerr = {
            "norm": float(w64.square().sum()),
            "s": float((w64 - torch.where(mask, w64, 0.0)).square().sum()),
            "q": float((w64 - qw.to(torch.float64)).square().sum()),
            "sq": float((w64 - sq.to(torch.float64)).square().sum()),
            "qs": float((w64 - qs.to(torch.float64)).square().sum()),
        }
        for key, value in sqerr.items():
            sums[key] += value
        new = sq if config.order == "SQ" else qs
        weight.copy_(new.to(weight.dtype))
        zeros += int((weight == 0).sum())
        total += weight.numel()
        entry = _errors(sqerr)
        entry["sparsity"] = float((weight == 0).sum()) / weight.numel()
        report.layers[name] = entry
    overall = _errors(sums)
    for key in ("eps_s", "eps_q", "eps_sq", "eps_qs", "bound", "excess"):
        setattr(report, key, overall[key])
    report.sparsity_achieved = zeros / max(total, 1)
    timings["sparsify_quantize"] = time.perf_counter() - start
    report.timings = timings
    return report


def _errors(sqerr: dict[str, float]) -> dict[str, Any]:
    """Relative errors ``sqrt(err² / ‖W‖²)`` and the orthogonality fields (all 0 for an all-zero weight)."""
    norm = sqerr["norm"]
    eps = {f"eps_{k}": (math.sqrt(sqerr[k] / norm) if norm > 0 else 0.0) for k in ("s", "q", "sq", "qs")}
    return {**orthogonality(eps["eps_s"], eps["eps_q"], eps["eps_sq"]), "eps_qs": eps["eps_qs"]}


# ---------------------------------------------------------------------------------------------------- save / load
def save_sparse_quantized(
    model: nn.Module,
    directory: str | os.PathLike,
    config: SparseQuantConfig,
    report: SparseQuantReport | None = None,
    tokenizer: Any = None,
) -> str:
    """Saves a sparse-quantized transformers model atomically.

    Writes ``model.save_pretrained`` (the dequantized weights, loadable by a plain ``from_pretrained``),
    :data:`SPARSE_QUANT_CONFIG_FILE` (``{"sparse_quant": config, "report": report}``) and the tokenizer if given,
    under a temporary name renamed into place (:func:`lightning_epfl.utilities.atomic_directory`).

    Args:
        model: A transformers ``PreTrainedModel``.
        directory: Target folder.
        config: The settings used.
        report: The report of :func:`sparse_quantize_`. Default ``None``.
        tokenizer: Anything with ``save_pretrained``. Default ``None``.

    Returns:
        The absolute path of the export.

    Raises:
        FileExistsError: If ``directory`` is a file or a non-empty folder that no export wrote.
    """
    from lightning_epfl.utilities import atomic_directory

    def write(tmp: str) -> None:
        model.save_pretrained(tmp)
        payload = {"sparse_quant": config.to_dict(), "report": None if report is None else report.to_dict()}
        with open(os.path.join(tmp, SPARSE_QUANT_CONFIG_FILE), "w") as f:
            json.dump(payload, f, indent=2, default=str)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)

    return atomic_directory(directory, write)


def load_sparse_quantized(directory: str | os.PathLike, model_class: Any = None) -> nn.Module:
    """Loads a :func:`save_sparse_quantized` export with ``model_class.from_pretrained(directory)``.

    Args:
        directory: The export folder.
        model_class: A transformers model class (or auto class). Default ``None`` (``AutoModelForCausalLM``).

    Returns:
        The model (eval mode, as ``from_pretrained`` returns it).

    Raises:
        FileNotFoundError: If ``directory`` holds no :data:`SPARSE_QUANT_CONFIG_FILE`.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{str(directory)!r} does not exist or is not a folder.")
    if not os.path.isfile(os.path.join(directory, SPARSE_QUANT_CONFIG_FILE)):
        raise FileNotFoundError(f"{str(directory)!r} is not a sparse-quant export (no {SPARSE_QUANT_CONFIG_FILE}).")
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    return model_class.from_pretrained(directory, local_files_only=True)
