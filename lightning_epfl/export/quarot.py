r"""
QuaRot: rotations that make 4-bit weights, activations and KV cache work
========================================================================

QuaRot (Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", arXiv:2404.00456) multiplies the
hidden states of a transformer by orthogonal matrices that leave the float function unchanged but spread the
outlier channels of the activations over all channels, so that per-token 4-bit quantization of every linear input
(and of the KV cache) loses little. On a transformers Llama-architecture model (Llama, Mistral, Qwen2) with row
vectors ``y = x W^T``:

1. :func:`fuse_norms` folds each RMSNorm scale into the linear layers that read its output (``W <- W diag(g)``;
   ``q/k/v`` from ``input_layernorm``, ``gate/up`` from ``post_attention_layernorm``, ``lm_head`` from the final
   norm, after untying a tied ``lm_head``), leaving weightless norms that commute with any orthogonal matrix.
2. :func:`rotate_model` rotates the residual stream by ``Q = diag(s) H_d / sqrt(d)`` (Sec. 4.1): the embedding
   ``E <- E Q``, readers ``W <- W Q``, writers (``o_proj``, ``down_proj``) ``W <- Q^T W`` and ``b <- b Q``. It folds
   a Hadamard into ``down_proj`` (``W <- W H_ff``) and applies ``x <- x H_ff`` online before it; it rotates each
   value head (``W_v <- (I (x) H_dh)^T W_v``) and folds ``H_nh (x) H_dh`` into ``o_proj`` with the head-axis factor
   ``H_nh`` applied online; and it rotates queries and keys per head after RoPE (``q k^T`` is unchanged).
3. :func:`quarot_quantize_` then fake-quantizes: weights per output channel (round-to-nearest with clip search, or
   GPTQ on calibration data, Sec. 4.2), activations per token (symmetric, clip 0.9) at every linear input but the
   skipped ones (``lm_head``), keys and values per (token, head) (asymmetric, clip 0.95) inside the attention
   function.

Hadamard matrices of every order with a Sylvester x Paley construction are used (SmolLM2's 576 = 16 * 36 and
1536 = 128 * 12 included); an order with none (a head count of 9, say) falls back to a block-diagonal Hadamard
(identity when no block exists), a dense random orthogonal matrix, or an error (``hadamard_fallback``). All folds are
done in float64 and cast back; the rotated float32 model matches the original's logits to about 1e-6 on tiny models
and 1e-4 on SmolLM2-135M (logits up to 34). Quantization is simulated ("fake quantization": weights are stored
dequantized, activations rounded on the fly) to measure accuracy; it has no straight-through estimator, so a
quantized model is for evaluation and export, not for further training.

The online transforms and activation quantizers are forward pre-hooks on ``nn.Linear``; the query/key rotation and
the KV quantization are an attention function registered with ``transformers.AttentionInterface`` under
``"quarot_sdpa"`` (it receives post-RoPE ``q, k, v`` after the cache update, so cached values are stored unquantized
and quantized per token on every call: incremental decoding equals a full prefill). Nothing in transformers is
patched.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_epfl.export.calibration import calibration_sequences, input_ids_of
from lightning_epfl.export.config import ExportConfig
from lightning_epfl.functional.hadamard import (
    hadamard_factorization,
    hadamard_transform,
    has_hadamard,
    random_orthogonal,
)
from lightning_epfl.functional.quantize import (
    HessianAccumulator,
    gptq_quantize,
    quantize_asymmetric,
    quantize_symmetric,
    rtn_quantize,
)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
"""``config.model_type`` values :func:`quarot_quantize_` accepts (Llama-architecture decoder blocks)."""

ATTENTION_NAME = "quarot_sdpa"
"""Name of the attention function registered with ``transformers.AttentionInterface``."""

FULL_PRECISION_BITS = 16
"""A bit width of 16 keeps that tensor in floating point (no fake quantization)."""

QUAROT_CONFIG_FILE = "quarot_config.json"

QUANT_METHOD = "lightning_epfl_quarot"
"""``quantization_config.quant_method`` of an export's ``config.json``: transformers' ``from_pretrained`` refuses the
folder (its weights compute the right function only with the online rotations :func:`load_quantized` installs)."""


@dataclass
class QuaRotConfig(ExportConfig):
    """Settings of a QuaRot export (peft-style: a plain dataclass, serializable as JSON and from YAML).

    Args:
        w_bits: Weight bits, 2..16 (16: weights stay float). Default 4.
        w_method: ``"gptq"`` (needs calibration batches) or ``"rtn"`` (round to nearest).
        w_clip_search: Search a clip ratio per output channel (minimizing ``sum |w - q|^2.4``).
        w_group_size: Weight group size along the input dimension (``None``: one scale per output channel).
        a_bits: Activation bits at linear inputs, 2..16 (16: float). Per token, symmetric.
        a_clip_ratio: Activation clip ratio in ``(0, 1]`` (paper: 0.9).
        k_bits: Key-cache bits, 2..16. Per (token, head), asymmetric.
        v_bits: Value-cache bits, 2..16.
        kv_clip_ratio: KV clip ratio in ``(0, 1]`` (paper: 0.95).
        rotate: Apply the rotations; ``False`` quantizes the unrotated model (the baseline QuaRot improves on).
        rotation: Residual rotation: ``"hadamard"`` (randomized Hadamard ``diag(s) H``) or ``"random"`` (a random
            orthogonal matrix).
        seed: Seed of the random signs / random orthogonal matrices.
        online_down_proj: Online Hadamard before ``down_proj``.
        online_o_proj: Head-axis Hadamard before ``o_proj`` (and the per-head value rotation).
        qk_rotation: Rotate queries and keys per head after RoPE.
        hadamard_fallback: For an order without a Hadamard construction: ``"block_diag"`` (block-diagonal Hadamard of
            the largest constructible block dividing it), ``"dense_orthogonal"`` (a dense random orthogonal matrix)
            or ``"error"``.
        skip_modules: Decoder-block linear layers left unquantized, by name suffix (``"mlp.down_proj"``,
            ``"layers.0.self_attn.q_proj"``); an entry that matches no layer raises. ``lm_head`` and the embeddings
            always stay float (``"lm_head"`` is accepted for clarity). Default ``["lm_head"]``.
        calib_samples: Calibration sequences GPTQ uses (at most).
        calib_seq_len: Calibration sequence length in tokens (longer sequences are cut).
        gptq_damp: GPTQ damping, a fraction of the mean Hessian diagonal.

    Raises:
        ValueError: For any value outside the ranges above; the message names the field.
    """

    w_bits: int = 4
    w_method: Literal["gptq", "rtn"] = "gptq"
    w_clip_search: bool = True
    w_group_size: int | None = None
    a_bits: int = 4
    a_clip_ratio: float = 0.9
    k_bits: int = 4
    v_bits: int = 4
    kv_clip_ratio: float = 0.95
    rotate: bool = True
    rotation: Literal["hadamard", "random"] = "hadamard"
    seed: int = 0
    online_down_proj: bool = True
    online_o_proj: bool = True
    qk_rotation: bool = True
    hadamard_fallback: Literal["block_diag", "dense_orthogonal", "error"] = "block_diag"
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])
    calib_samples: int = 128
    calib_seq_len: int = 2048
    gptq_damp: float = 0.01

    def __post_init__(self) -> None:
        for name in ("w_clip_search", "rotate", "online_down_proj", "online_o_proj", "qk_rotation"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"QuaRotConfig: `{name}` must be true or false, got {getattr(self, name)!r}.")
        for name in ("seed", "calib_samples", "calib_seq_len", "w_group_size"):
            value = getattr(self, name)
            if (value is not None or name != "w_group_size") and (
                isinstance(value, bool) or not isinstance(value, int)
            ):
                raise ValueError(f"QuaRotConfig: `{name}` must be an integer, got {value!r}.")
        for name in ("a_clip_ratio", "kv_clip_ratio", "gptq_damp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"QuaRotConfig: `{name}` must be a number, got {value!r}.")
        if isinstance(self.skip_modules, str) or not all(isinstance(m, str) for m in self.skip_modules):
            raise ValueError(f"QuaRotConfig: `skip_modules` must be a list of names, got {self.skip_modules!r}.")
        for name in ("w_bits", "a_bits", "k_bits", "v_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= FULL_PRECISION_BITS:
                raise ValueError(f"QuaRotConfig: `{name}` must be an integer in 2..16 (16 = float), got {value!r}.")
        choices = {
            "w_method": ("gptq", "rtn"),
            "rotation": ("hadamard", "random"),
            "hadamard_fallback": ("block_diag", "dense_orthogonal", "error"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"QuaRotConfig: `{name}` must be one of {allowed}, got {getattr(self, name)!r}.")
        for name in ("a_clip_ratio", "kv_clip_ratio"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"QuaRotConfig: `{name}` must be in (0, 1], got {getattr(self, name)!r}.")
        if self.w_group_size is not None and self.w_group_size < 1:
            raise ValueError(f"QuaRotConfig: `w_group_size` must be None or >= 1, got {self.w_group_size!r}.")
        for name in ("calib_samples", "calib_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"QuaRotConfig: `{name}` must be >= 1, got {getattr(self, name)!r}.")
        if not 0 <= self.gptq_damp < 1:
            raise ValueError(f"QuaRotConfig: `gptq_damp` must be in [0, 1), got {self.gptq_damp!r}.")
        self.skip_modules = list(self.skip_modules)


@dataclass
class QuaRotReport:
    """What :func:`quarot_quantize_` did.

    Attributes:
        config: The :class:`QuaRotConfig` as a dict.
        rotations: Per rotated size, how the rotation was built (e.g. ``"576: hadamard 16 x 36 (paley2(17))"``).
        max_abs_dlogit: Largest absolute logit difference between the rotated float model and the original on the
            check batch (``None`` without one or without rotation).
        weight_error: Per quantized linear, the relative Frobenius error ``||W - W_q|| / ||W||`` (in the rotated
            basis).
        timings: Seconds spent in ``"rotate"`` and ``"quantize_weights"``.
    """

    config: dict[str, Any]
    rotations: dict[str, str] = field(default_factory=dict)
    max_abs_dlogit: float | None = None
    weight_error: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------- architecture
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a supported transformers causal LM (``model.model.layers``).

    Raises:
        ValueError: If ``model.config.model_type`` is not one of :data:`SUPPORTED_MODEL_TYPES`.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"QuaRot supports transformers causal LMs of model_type {', '.join(SUPPORTED_MODEL_TYPES)}; got "
            f"{model_type!r} ({type(model).__name__})."
        )
    return model.model.layers


_PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def is_transformed(model: nn.Module) -> bool:
    """Whether QuaRot quantizers are installed on ``model`` (by :func:`quarot_quantize_` or :func:`load_quantized`)."""
    return bool(getattr(model, "quarot_hooks", None)) or any(
        isinstance(getattr(m, "quarot", None), _AttentionQuant) for m in model.modules()
    )


def validate_model(model: nn.Module, config: QuaRotConfig) -> None:
    """Every check :func:`quarot_quantize_` makes before it changes anything.

    Raises:
        ValueError: An unsupported architecture or a peft model (merge the adapters first), a decoder projection
            that is not a plain ``nn.Linear``, a model already transformed, a ``w_group_size`` that does not divide
            a layer's input size, a ``skip_modules`` entry matching no layer, or (under ``hadamard_fallback="error"``)
            a rotated size without Hadamard construction.
    """
    if callable(getattr(model, "merge_and_unload", None)):
        raise ValueError("QuaRot needs a plain transformers model; merge the peft adapters first (merge_and_unload).")
    layers = decoder_layers(model)
    if is_transformed(model) or getattr(model.config, "quarot", None) is not None:
        raise ValueError(
            "The model is already QuaRot-transformed (quantizers installed, or rotated weights marked `quarot` in its "
            "config); start from the float model, or load an export with load_quantized."
        )
    for i, layer in enumerate(layers):
        for name in _PROJECTIONS:
            module = layer.get_submodule(name)
            if type(module) is not nn.Linear:
                raise ValueError(
                    f"QuaRot: layers.{i}.{name} is a {type(module).__name__}, not a plain nn.Linear (LoRA or other "
                    "wrapped layers: merge them into the base weights first)."
                )
    linears = quantized_linears(model, config)
    if config.w_group_size is not None and config.w_bits < FULL_PRECISION_BITS:
        for name, lin in linears.items():
            if lin.in_features % config.w_group_size:
                raise ValueError(
                    f"QuaRotConfig: `w_group_size`={config.w_group_size} does not divide the input size "
                    f"{lin.in_features} of {name}."
                )
    names = [n for n, _ in model.named_modules()]
    for entry in config.skip_modules:
        if entry != "lm_head" and not any(n == entry or n.endswith("." + entry) for n in names):
            raise ValueError(
                f"QuaRotConfig: `skip_modules` entry {entry!r} matches no layer; use name suffixes such as "
                "'mlp.down_proj' or 'layers.0.self_attn.q_proj'."
            )
    if config.rotate:
        residual_rotation(int(model.config.hidden_size), config)
        rots = _Rotations.build(model, config)
        for rot in (rots.ff, rots.heads, rots.head_dim):
            if rot is not None and rot.kind == "identity":
                warnings.warn(
                    f"QuaRot: no Hadamard block divides {rot.n}; that rotation is the identity (exact, but it does "
                    "not spread outliers); hadamard_fallback='dense_orthogonal' uses a dense random rotation.",
                    RuntimeWarning,
                    stacklevel=2,
                )


def _head_sizes(model: nn.Module) -> tuple[int, int, int]:
    cfg = model.config
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    return n_heads, n_kv, head_dim


def untie_embeddings(model: nn.Module) -> None:
    """Give ``lm_head`` its own copy of a tied embedding matrix (the residual rotation changes them differently)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is embed.weight:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = {} if isinstance(model._tied_weights_keys, dict) else []


@torch.no_grad()
def _fold(linear: nn.Linear, fn: Callable[[Tensor], Tensor], bias_fn: Callable[[Tensor], Tensor] | None = None) -> None:
    """``W <- fn(W)`` (and ``b <- bias_fn(b)``) in float64, cast back to the parameter's dtype."""
    w = linear.weight
    w.copy_(fn(w.detach().double()).to(w.dtype))
    if bias_fn is not None and linear.bias is not None:
        linear.bias.copy_(bias_fn(linear.bias.detach().double()).to(linear.bias.dtype))


@torch.no_grad()
def fuse_norms(model: nn.Module) -> None:
    """Fold every RMSNorm scale into the linear layers reading the norm's output and set the scales to 1.

    ``RMSNorm(x) W^T = (x / rms(x)) (W diag(g))^T``: ``input_layernorm`` into ``q/k/v_proj``,
    ``post_attention_layernorm`` into ``gate/up_proj``, the final norm into ``lm_head`` (untied first). The float
    function is unchanged (up to float32 rounding of the folded weights).

    Raises:
        ValueError: For an unsupported architecture.
    """
    layers = decoder_layers(model)
    untie_embeddings(model)

    def scale(norm: nn.Module, readers: Sequence[nn.Linear]) -> None:
        g = norm.weight.detach().double()
        for lin in readers:
            _fold(lin, lambda w: w * g)
        norm.weight.fill_(1.0)

    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        scale(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        scale(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
    scale(model.model.norm, [model.get_output_embeddings()])


# ---------------------------------------------------------------------------------------------------- rotations
class Rotation:
    """``x -> x R`` along the last dimension for an orthonormal ``R`` of order ``n``.

    Built by :func:`make_rotation`: a (normalized) Hadamard applied by the fast transform, a block-diagonal Hadamard,
    the identity, or a dense matrix.

    Attributes:
        n: The order.
        kind: ``"hadamard"``, ``"block_diag"``, ``"identity"`` or ``"dense"``.
        description: How it was built, for reports.
    """

    def __init__(self, n: int, kind: str, description: str, block: int = 0, matrix: Tensor | None = None) -> None:
        self.n, self.kind, self.description, self.block, self.matrix = n, kind, description, block, matrix

    def __call__(self, x: Tensor) -> Tensor:
        if self.kind == "identity":
            return x
        if self.kind == "hadamard":
            return hadamard_transform(x)
        if self.kind == "block_diag":
            shape = x.shape
            return hadamard_transform(x.reshape(*shape[:-1], self.n // self.block, self.block)).reshape(shape)
        assert self.matrix is not None
        return x @ self.matrix.to(device=x.device, dtype=x.dtype)

    def on_axis(self, x: Tensor, axis: int) -> Tensor:
        """Apply along ``axis`` instead of the last dimension."""
        return self(x.movedim(axis, -1)).movedim(-1, axis)


def make_rotation(n: int, fallback: str = "block_diag", seed: int = 0, what: str = "size") -> Rotation:
    """An orthonormal rotation of order ``n``: a Hadamard when one is constructible, else the fallback.

    Args:
        n: The order.
        fallback: ``"block_diag"``, ``"dense_orthogonal"`` or ``"error"`` (see :class:`QuaRotConfig`).
        seed: Seed of the dense fallback.
        what: Name of the dimension, for messages.

    Raises:
        ValueError: If ``n`` has no Hadamard construction and ``fallback="error"``.
    """
    if has_hadamard(n):
        k2, m, how = hadamard_factorization(n)
        return Rotation(n, "hadamard", f"hadamard {k2} x {m} ({how})")
    if fallback == "error":
        raise ValueError(
            f"QuaRot: no Hadamard construction of order {n} ({what}); set hadamard_fallback='block_diag' or "
            "'dense_orthogonal'."
        )
    if fallback == "dense_orthogonal":
        return Rotation(n, "dense", "dense random orthogonal", matrix=random_orthogonal(n, seed))
    block = max(b for b in range(1, n + 1) if n % b == 0 and (b == 1 or has_hadamard(b)))
    if block == 1:
        return Rotation(n, "identity", "identity (no Hadamard block divides it)")
    return Rotation(n, "block_diag", f"block-diagonal hadamard {n // block} x {block}", block=block)


def residual_rotation(d: int, config: QuaRotConfig) -> tuple[Callable[[Tensor], Tensor], str]:
    """The residual rotation ``x -> x Q`` (last dimension ``d``, any dtype) and its description.

    ``Q = diag(s) H_d / sqrt(d)`` with random signs ``s`` from ``config.seed`` (applied by the fast transform), or a
    random orthogonal matrix for ``rotation="random"`` or an order without Hadamard construction (under the
    ``"dense_orthogonal"`` fallback; ``"block_diag"`` uses random signs times the block-diagonal Hadamard).
    """
    if config.rotation == "random":
        rot = Rotation(d, "dense", "random orthogonal", matrix=random_orthogonal(d, config.seed))
    else:
        rot = make_rotation(d, config.hadamard_fallback, config.seed, "hidden size")
    if rot.kind == "dense":
        return rot, rot.description
    signs = torch.where(torch.rand(d, generator=torch.Generator().manual_seed(config.seed)) < 0.5, -1.0, 1.0)

    def apply(x: Tensor) -> Tensor:
        return rot(x * signs.to(device=x.device, dtype=x.dtype))

    return apply, f"randomized {rot.description}"


@dataclass
class _Rotations:
    """The rotations of one model (rebuilt identically from the config for a saved export)."""

    ff: Rotation | None
    heads: Rotation | None
    head_dim: Rotation | None

    @classmethod
    def build(cls, model: nn.Module, config: QuaRotConfig) -> _Rotations:
        n_heads, _, head_dim = _head_sizes(model)
        fb, seed = config.hadamard_fallback, config.seed
        if not config.rotate:
            return cls(None, None, None)
        d_ff = int(model.config.intermediate_size)
        ff = make_rotation(d_ff, fb, seed + 1, "intermediate size") if config.online_down_proj else None
        heads = make_rotation(n_heads, fb, seed + 3, "number of heads") if config.online_o_proj else None
        use_dh = config.online_o_proj or config.qk_rotation
        return cls(ff, heads, make_rotation(head_dim, fb, seed + 2, "head dim") if use_dh else None)


@torch.no_grad()
def rotate_model(model: nn.Module, config: QuaRotConfig | None = None) -> dict[str, str]:
    """Fuse the norms and fold all offline rotations into the weights (the float function is unchanged once
    :func:`install_quantizers` adds the online parts).

    Args:
        model: A supported transformers causal LM (modified in place).
        config: Rotation settings (default :class:`QuaRotConfig`).

    Returns:
        Per rotated dimension, how its rotation was built.

    Raises:
        ValueError: For an unsupported architecture, or an order without construction under
            ``hadamard_fallback="error"``.
    """
    config = config or QuaRotConfig()
    validate_model(model, config)
    return _rotate(model, config)


def _rotate(model: nn.Module, config: QuaRotConfig) -> dict[str, str]:
    """:func:`rotate_model` on a model :func:`validate_model` has accepted."""
    layers = decoder_layers(model)
    fuse_norms(model)
    n_heads, n_kv, head_dim = _head_sizes(model)
    d = int(model.config.hidden_size)
    rotate_residual, how = residual_rotation(d, config)
    rots = _Rotations.build(model, config)
    report = {f"residual ({d})": how}
    for name, rot in (("down_proj input", rots.ff), ("heads", rots.heads), ("head dim", rots.head_dim)):
        if rot is not None:
            report[f"{name} ({rot.n})"] = rot.description

    embed = model.get_input_embeddings()
    embed.weight.copy_(rotate_residual(embed.weight.double()).to(embed.weight.dtype))

    def reader(w: Tensor) -> Tensor:  # W <- W Q
        return rotate_residual(w)

    def writer(w: Tensor) -> Tensor:  # W <- Q^T W
        return rotate_residual(w.T).T

    writer_bias = reader  # b <- b Q

    rdh = rots.head_dim if config.online_o_proj else None

    def v_fold(w: Tensor) -> Tensor:  # W_v <- (I (x) H_dh)^T W_v: each value head rotated
        return rdh(w.T.reshape(d, n_kv, head_dim)).reshape(d, n_kv * head_dim).T

    def v_bias_fold(b: Tensor) -> Tensor:
        return rdh(b.reshape(n_kv, head_dim)).reshape(-1)

    def o_fold(w: Tensor) -> Tensor:  # W_o <- W_o (H_nh (x) H_dh)
        w = rdh(w.reshape(d, n_heads, head_dim))
        if rots.heads is not None:
            w = rots.heads.on_axis(w, 1)
        return w.reshape(d, n_heads * head_dim)

    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _fold(lin, reader)
        if rdh is not None:
            _fold(attn.v_proj, v_fold, v_bias_fold)
            _fold(attn.o_proj, o_fold)
        if rots.ff is not None:
            _fold(mlp.down_proj, rots.ff)
        _fold(attn.o_proj, writer, writer_bias)
        _fold(mlp.down_proj, writer, writer_bias)
    _fold(model.get_output_embeddings(), reader)
    return report


# ---------------------------------------------------------------------------------------------------- quantizers
class _LinearInput:
    """Forward pre-hook of one ``nn.Linear``: optional online rotation, then optional per-token quantization."""

    def __init__(self, rotate: Callable[[Tensor], Tensor] | None, bits: int, clip_ratio: float) -> None:
        self.rotate, self.bits, self.clip_ratio = rotate, bits, clip_ratio
        self.quantize = bits < FULL_PRECISION_BITS

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        if self.rotate is not None:
            x = self.rotate(x)
        if self.quantize:
            x = quantize_symmetric(x, self.bits, clip_ratio=self.clip_ratio)
        return (x, *args[1:])


@dataclass
class _AttentionQuant:
    """Per-attention-module settings read by the ``quarot_sdpa`` attention function."""

    head_rotation: Rotation | None
    k_bits: int
    v_bits: int
    clip_ratio: float
    quantize: bool = True


def _quarot_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
) -> tuple[Tensor, Any]:
    """Attention with per-head query/key rotation and KV fake quantization, then transformers' SDPA attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    quant: _AttentionQuant | None = getattr(module, "quarot", None)
    if quant is not None:
        if quant.head_rotation is not None:
            query, key = quant.head_rotation(query), quant.head_rotation(key)
        if quant.quantize and quant.k_bits < FULL_PRECISION_BITS:
            key = quantize_asymmetric(key, quant.k_bits, clip_ratio=quant.clip_ratio)
        if quant.quantize and quant.v_bits < FULL_PRECISION_BITS:
            value = quantize_asymmetric(value, quant.v_bits, clip_ratio=quant.clip_ratio)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, _quarot_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


def quantized_linears(model: nn.Module, config: QuaRotConfig) -> dict[str, nn.Linear]:
    """The decoder-block linear layers QuaRot quantizes, by qualified name (``skip_modules`` excluded)."""
    layers = decoder_layers(model)
    out: dict[str, nn.Linear] = {}
    prefix = next(n for n, m in model.named_modules() if m is layers)
    for name, module in layers.named_modules():
        if isinstance(module, nn.Linear) and not config.skips(f"{prefix}.{name}"):
            out[f"{prefix}.{name}"] = module
    return out


def install_quantizers(model: nn.Module, config: QuaRotConfig) -> None:
    """Install the online rotations, activation quantizers and the KV-quantizing attention on a model whose
    weights are already rotated (by :func:`rotate_model`, or loaded from an export). Replaces earlier ones.

    Raises:
        ValueError: For an unsupported architecture.
    """
    layers = decoder_layers(model)
    remove_quantizers(model)
    rots = _Rotations.build(model, config)
    n_heads, _, head_dim = _head_sizes(model)
    handles = []
    linears = quantized_linears(model, config)
    a_bits = config.a_bits
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            rotate: Callable[[Tensor], Tensor] | None = None
            if lin is mlp.down_proj and rots.ff is not None:
                rotate = rots.ff
            elif lin is attn.o_proj and rots.heads is not None and rots.heads.kind != "identity":
                heads = rots.heads

                def rotate(x: Tensor, heads: Rotation = heads) -> Tensor:
                    shape = x.shape
                    return heads.on_axis(x.reshape(*shape[:-1], n_heads, head_dim), -2).reshape(shape)

            bits = a_bits if any(lin is m for m in linears.values()) else FULL_PRECISION_BITS
            if rotate is None and bits >= FULL_PRECISION_BITS:
                continue
            hook = _LinearInput(rotate, bits, config.a_clip_ratio)
            handles.append((hook, lin.register_forward_pre_hook(hook)))
        qk = rots.head_dim if (config.rotate and config.qk_rotation) else None
        attn.quarot = _AttentionQuant(qk, config.k_bits, config.v_bits, config.kv_clip_ratio)
    _register_attention()
    model.set_attn_implementation(ATTENTION_NAME)
    model.quarot_hooks = handles


def remove_quantizers(model: nn.Module) -> None:
    """Remove what :func:`install_quantizers` installed (the weights stay as they are)."""
    for _, handle in getattr(model, "quarot_hooks", []):
        handle.remove()
    model.quarot_hooks = []
    for module in model.modules():
        if hasattr(module, "quarot") and isinstance(module.quarot, _AttentionQuant):
            del module.quarot


def set_quantization_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch the activation and KV quantizers on or off (the online rotations stay on)."""
    for hook, _ in getattr(model, "quarot_hooks", []):
        hook.quantize = enabled and hook.bits < FULL_PRECISION_BITS
    for module in model.modules():
        if isinstance(getattr(module, "quarot", None), _AttentionQuant):
            module.quarot.quantize = enabled


# ---------------------------------------------------------------------------------------------------- weights
class _StopForward(Exception):
    pass


@torch.no_grad()
def _layer_inputs(model: nn.Module, calib: list[Tensor]) -> list[tuple[Tensor, dict[str, Any]]]:
    """The first decoder block's inputs (hidden states and keyword arguments) for each calibration batch."""
    layers = decoder_layers(model)
    captured: list[tuple[Tensor, dict[str, Any]]] = []

    def grab(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for ids in calib:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _layer_output(layer: nn.Module, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def quantize_weights_(
    model: nn.Module,
    config: QuaRotConfig,
    calib: list[Tensor] | None = None,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> dict[str, float]:
    """Fake-quantize the decoder linears' weights in place (RTN, or GPTQ block by block on calibration data).

    GPTQ follows the sequential order of each block (``q/k/v`` -> ``o`` -> ``gate/up`` -> ``down``), with the
    Hessians of the linear inputs *after* the online rotations and with activation/KV quantization off; each block
    sees the outputs of the already-quantized blocks before it.

    Returns:
        Per linear, ``||W - W_q||_F / ||W||_F``.

    Raises:
        ValueError: ``w_method="gptq"`` without calibration batches.
    """
    linears = quantized_linears(model, config)
    if config.w_bits >= FULL_PRECISION_BITS:
        return {}
    errors: dict[str, float] = {}

    def record(name: str, lin: nn.Linear, q: Tensor) -> None:
        w = lin.weight.detach()
        errors[name] = float((w.double() - q.double()).norm() / w.double().norm().clamp_min(1e-30))
        lin.weight.copy_(q.to(w.dtype))

    wrap = progress or (lambda it: it)
    if config.w_method == "rtn":
        for name, lin in wrap(list(linears.items())):
            q = rtn_quantize(
                lin.weight.detach().float(), config.w_bits, group_size=config.w_group_size,
                clip_search=config.w_clip_search,
            )  # fmt: skip
            record(name, lin, q)
        return errors
    if not calib:
        raise ValueError("QuaRot GPTQ: the calibration set is empty; pass calibration batches or use w_method='rtn'.")
    names = {id(m): n for n, m in linears.items()}
    set_quantization_enabled(model, False)
    try:
        inputs = _layer_inputs(model, calib)
        for layer in wrap(list(decoder_layers(model))):
            attn, mlp = layer.self_attn, layer.mlp
            for group in ([attn.q_proj, attn.k_proj, attn.v_proj], [attn.o_proj], [mlp.gate_proj, mlp.up_proj],
                          [mlp.down_proj]):  # fmt: skip
                group = [lin for lin in group if id(lin) in names]
                if not group:
                    continue
                accs = {id(lin): HessianAccumulator(lin.in_features) for lin in group}
                hooks = [
                    lin.register_forward_pre_hook(lambda m, args, acc=accs[id(lin)]: acc.add(args[0])) for lin in group
                ]
                try:
                    for hidden, kwargs in inputs:
                        _layer_output(layer, hidden, kwargs)
                finally:
                    for h in hooks:
                        h.remove()
                for lin in group:
                    q = gptq_quantize(
                        lin.weight.detach().float(), accs[id(lin)].hessian, bits=config.w_bits,
                        group_size=config.w_group_size, damp=config.gptq_damp, clip_search=config.w_clip_search,
                    )  # fmt: skip
                    record(names[id(lin)], lin, q)
            inputs = [(_layer_output(layer, hidden, kwargs), kwargs) for hidden, kwargs in inputs]
    finally:
        set_quantization_enabled(model, True)
    return errors


# ---------------------------------------------------------------------------------------------------- entry point
@torch.no_grad()
def quarot_quantize_(
    model: nn.Module,
    config: QuaRotConfig | None = None,
    calib_batches: Iterable[Any] | None = None,
    check_batch: Tensor | None = None,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> QuaRotReport:
    """Rotate (unless ``config.rotate`` is False) and fake-quantize a transformers causal LM in place.

    Args:
        model: A Llama, Mistral or Qwen2 ``*ForCausalLM`` (float32 recommended; folds are float64).
        config: :class:`QuaRotConfig` (default: W4A4KV4, GPTQ).
        calib_batches: Iterable of ``input_ids`` ``[B, T]`` tensors (or dicts / tuples holding them); the first
            ``config.calib_samples`` sequences, cut to ``config.calib_seq_len`` tokens, calibrate GPTQ.
        check_batch: ``[B, T]`` token ids on which the rotated float model's logits are compared with the
            original's (``report.max_abs_dlogit``).
        progress: Wrapper of the per-layer iterable (e.g. ``tqdm``).

    Returns:
        A :class:`QuaRotReport`.

    Raises:
        ValueError: Unsupported architecture, a group size that does not divide a layer's input size, an order
            without Hadamard construction under ``hadamard_fallback="error"``, or GPTQ without calibration data.
    """
    config = config or QuaRotConfig()
    validate_model(model, config)
    calib = [
        ids for ids, _ in calibration_sequences(calib_batches, config.calib_samples, config.calib_seq_len, "QuaRot")
    ]
    vocab = model.get_input_embeddings().num_embeddings
    for ids in calib + ([] if check_batch is None else [check_batch]):
        if (
            ids.is_floating_point()
            or ids.dim() != 2
            or ids.numel() == 0
            or int(ids.min()) < 0
            or int(ids.max()) >= vocab
        ):
            raise ValueError(
                f"QuaRot: calibration and check batches must be non-empty integer token ids [B, T] in [0, {vocab}); "
                f"got {ids.dtype} {tuple(ids.shape)}."
            )
    if config.w_method == "gptq" and config.w_bits < FULL_PRECISION_BITS and not calib:
        raise ValueError("QuaRot GPTQ: the calibration set is empty; pass calibration batches or use w_method='rtn'.")
    report = QuaRotReport(config=config.to_dict())
    reference = None
    device = next(model.parameters()).device
    if check_batch is not None:
        reference = model(input_ids=check_batch.to(device)).logits.float()
    t0 = time.perf_counter()
    if config.rotate:
        report.rotations = _rotate(model, config)
    else:
        untie_embeddings(model)
    install_quantizers(model, config)
    model.config.quarot = config.to_dict()  # marks the weights as transformed (saved with checkpoints and exports)
    report.timings["rotate"] = time.perf_counter() - t0
    if reference is not None and config.rotate:
        set_quantization_enabled(model, False)
        logits = model(input_ids=check_batch.to(device)).logits.float()
        set_quantization_enabled(model, True)
        report.max_abs_dlogit = float((logits - reference).abs().max())
    t0 = time.perf_counter()
    report.weight_error = quantize_weights_(model, config, calib, progress)
    report.timings["quantize_weights"] = time.perf_counter() - t0
    return report


# ---------------------------------------------------------------------------------------------------- save / load
def save_quantized(
    model: nn.Module, config: QuaRotConfig, directory: str | os.PathLike, report: QuaRotReport | None = None,
    tokenizer: Any = None,
) -> str:  # fmt: skip
    """Save a quantized model atomically: ``model.safetensors`` (dequantized weights), ``config.json`` (the
    transformers config), ``quarot_config.json`` (the :class:`QuaRotConfig` and report) and the tokenizer if given.

    The folder is written under a temporary name and renamed into place; an existing earlier export is replaced
    only after the new one is complete (:func:`lightning_epfl.utilities.atomic_directory`).

    Returns:
        The absolute path of the export.

    Raises:
        FileExistsError: If ``directory`` is a file or a non-empty folder that no export wrote.
    """
    from safetensors.torch import save_file

    from lightning_epfl.utilities import atomic_directory

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")

    def write(tmp: str) -> None:
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        # the marker makes a plain `from_pretrained` refuse the folder (the weights need the online rotations)
        hf = copy.deepcopy(model.config)
        hf.quantization_config = {"quant_method": QUANT_METHOD, "loader": "lightning_epfl.export.load_quantized"}
        hf.save_pretrained(tmp)
        payload = {
            "quarot": config.to_dict(),
            "dtype": dtype,
            "report": None if report is None else report.to_dict(),
        }
        with open(os.path.join(tmp, QUAROT_CONFIG_FILE), "w") as f:
            json.dump(payload, f, indent=2, default=str)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)

    return atomic_directory(directory, write)


def load_quantized(directory: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a :func:`save_quantized` export and re-install its online rotations and quantizers.

    Args:
        directory: The export folder.
        dtype: Parameter dtype; ``None``: the dtype the model was exported in.

    Returns:
        The model in eval mode, computing what the exported model computed.

    Raises:
        FileNotFoundError: If ``directory`` holds no ``quarot_config.json``.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.path.join(directory, QUAROT_CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{str(directory)!r} is not a QuaRot export (no {QUAROT_CONFIG_FILE}).")
    with open(path) as f:
        saved = json.load(f)
    config = QuaRotConfig.from_dict(saved["quarot"])
    dtype = dtype or getattr(torch, saved.get("dtype", "float32"))
    hf_config = AutoConfig.from_pretrained(directory, local_files_only=True)
    hf_config.tie_word_embeddings = False
    if getattr(hf_config, "quantization_config", None) is not None:
        del hf_config.quantization_config
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    untie_embeddings(model)
    state = load_file(os.path.join(directory, "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if [k for k in missing if "rotary" not in k] or unexpected:
        raise ValueError(f"QuaRot export {str(directory)!r} does not match its config: {missing[:3]}, {unexpected[:3]}")
    install_quantizers(model, config)
    return model.eval()


# ---------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[Any]) -> float:
    """Token perplexity ``exp(mean NLL)`` of a causal LM over batches of ``input_ids`` ``[B, T]`` (next-token
    prediction inside each sequence; an ``attention_mask`` in a dict batch masks padded targets)."""
    nll, count = 0.0, 0
    device = next(model.parameters()).device
    for batch in batches:
        ids = input_ids_of(batch).to(device)
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        logits = model(input_ids=ids, attention_mask=None if mask is None else mask.to(device)).logits.float()
        targets = ids[:, 1:]
        lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, targets[..., None])[..., 0]
        keep = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask[:, 1:].to(device).bool()
        nll -= float(lp[keep].double().sum())
        count += int(keep.sum())
    if count == 0:
        raise ValueError("perplexity: the evaluation batches hold no tokens.")
    return math.exp(nll / count)
