r"""
Mixture-of-experts MLP layers
=============================

Sparse mixture-of-experts layers that replace the MLP of transformer blocks, with the design choices compared by
Fan, Messmer & Jaggi, *Towards an empirical understanding of MoE design choices* (arXiv:2402.13089):

* routing unit: tokens (:class:`TokenRouter`) or sequences (:class:`SequenceRouter`, pooled router logits; a running
  causal mean by default, the full-sequence mean as an option) or a given label per sequence (``routing="label"``);
* ``top_k`` experts per unit;
* router weights that are learned, frozen at a random draw, or re-drawn at every training forward;
* one router per layer, or one decision shared by the whole network (``router_scope="network"``).

:class:`MoEMLP` computes ``y = Σ_{e ∈ I(x)} g_e(x) · E_e(x)``, where the experts have the architecture of the block's
own MLP (GELU for GPT-2, gated SwiGLU for Llama-type models), stored as stacked ``[E, ...]`` weights and run as one
grouped computation over the rows sorted by expert (:func:`~lightning_epfl.functional.moe.moe_dispatch`). Each
forward stores its auxiliary losses and statistics in ``last_aux`` (overwritten, never accumulated);
:func:`moe_aux_loss` collects them into the term to add to the training loss.

:func:`replace_mlps_with_moe` swaps the MLP of every (or chosen) block of a ``transformers`` GPT-2 or Llama-type
model, from scratch (``expert_init="random"``) or by sparse upcycling of a pretrained model (``expert_init="copy"``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_epfl.functional.moe import (
    capacity_slots,
    moe_dispatch,
    pool_router_logits,
    route_top_k,
    router_statistics,
)
from lightning_epfl.seeding import derive_seed

__all__ = [
    "SUPPORTED_MLPS",
    "MoEAux",
    "MoEConfig",
    "MoEMLP",
    "Routing",
    "SequenceRouter",
    "StackedExperts",
    "TokenRouter",
    "moe_aux_loss",
    "moe_layers",
    "replace_mlps_with_moe",
    "routing_context",
]

SUPPORTED_MLPS = (
    "GPT-2 style MLP (`c_fc`, `c_proj`: transformers Conv1D, `act`; e.g. GPT2MLP)",
    "Llama style gated MLP (`gate_proj`, `up_proj`, `down_proj`: nn.Linear, `act_fn`; e.g. LlamaMLP, MistralMLP, "
    "Qwen2MLP)",
)
"""The dense MLP layouts :class:`MoEMLP` and :func:`replace_mlps_with_moe` recognize."""

_CHOICES: dict[str, tuple[str, ...]] = {
    "routing": ("token", "sequence", "label"),
    "sequence_pooling": ("causal_mean", "mean", "prefix"),
    "router": ("learned", "frozen", "resampled"),
    "router_scope": ("layer", "network"),
    "expert_init": ("random", "copy"),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class MoEConfig:
    """Settings of the mixture-of-experts layers (a peft-style dataclass, usable as a nested YAML block).

    Example (YAML, as ``CausalLMModule``'s ``moe`` argument)::

        moe: {num_experts: 4, top_k: 2, routing: token, router: frozen}

    Raises:
        ValueError: For a value outside the documented range or choices, or an inconsistent combination; the
            message names the field(s) and the allowed values.
    """

    num_experts: int = field(default=8, metadata={"help": "Number of experts E per MoE layer (>= 1)."})
    top_k: int = field(
        default=2, metadata={"help": "Experts per routing unit, 1..num_experts (1 for routing='label')."}
    )
    routing: Literal["token", "sequence", "label"] = field(
        default="token",
        metadata={
            "help": "Routing unit: 'token' (each token), 'sequence' (pooled router logits, see sequence_pooling) or "
            "'label' (expert = label_to_expert[domain id] of the sequence, weight 1)."
        },
    )
    sequence_pooling: Literal["causal_mean", "mean", "prefix"] = field(
        default="causal_mean",
        metadata={
            "help": "Pooling of sequence routing: 'causal_mean' (running mean up to each position, no look-ahead), "
            "'mean' (whole-sequence mean: in a causal LM every position sees future tokens) or 'prefix' (the running "
            "mean of the first prefix_len positions from position prefix_len-1 on)."
        },
    )
    prefix_len: int | None = field(
        default=None, metadata={"help": "Prefix length m >= 1 for sequence_pooling='prefix' (only then)."}
    )
    router: Literal["learned", "frozen", "resampled"] = field(
        default="learned",
        metadata={
            "help": "'learned' (a trained parameter), 'frozen' (a random draw kept as a buffer, never trained) or "
            "'resampled' (re-drawn at every training forward from a seeded generator, fixed in eval)."
        },
    )
    router_scope: Literal["layer", "network"] = field(
        default="layer",
        metadata={
            "help": "'layer': one router per MoE layer; 'network': every layer reuses the first layer's decision."
        },
    )
    normalize_top_k: bool = field(
        default=True,
        metadata={"help": "For top_k >= 2, renormalize the chosen probabilities to sum to 1 (top_k = 1: never)."},
    )
    router_init_std: float = field(
        default=0.02, metadata={"help": "Standard deviation of the router weights' normal init / draws (> 0)."}
    )
    router_jitter_noise: float = field(
        default=0.0,
        metadata={"help": "Multiplicative noise U(1-eps, 1+eps) on the router input in training, eps in [0, 1)."},
    )
    router_seed: int = field(
        default=0, metadata={"help": "Seed of the frozen and re-drawn routers (each layer derives its own stream)."}
    )
    capacity_factor: float | None = field(
        default=None,
        metadata={
            "help": "None: dropless. Otherwise each expert takes at most ceil(cf * top_k * tokens / E) assignments "
            "(cf > 0, token routing only); the overflow is dropped."
        },
    )
    expert_init: Literal["random", "copy"] = field(
        default="random",
        metadata={
            "help": "'random': fresh normal weights with the dense MLP's per-matrix std; 'copy': every expert is a "
            "copy of the dense MLP (sparse upcycling of a pretrained model)."
        },
    )
    label_to_expert: list[int] | None = field(
        default=None, metadata={"help": "For routing='label': the expert of each domain id (required then, only then)."}
    )
    layers: list[int] | None = field(
        default=None, metadata={"help": "Indices of the blocks whose MLP becomes an MoE layer; None: every block."}
    )

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "router_seed"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"MoEConfig: `{name}` must be an integer, got {getattr(self, name)!r}.")
        if not isinstance(self.normalize_top_k, bool):
            raise ValueError(f"MoEConfig: `normalize_top_k` must be true or false, got {self.normalize_top_k!r}.")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"MoEConfig: `{name}` must be one of {allowed}, got {getattr(self, name)!r}.")
        if self.num_experts < 1:
            raise ValueError(f"MoEConfig: `num_experts` must be >= 1, got {self.num_experts}.")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"MoEConfig: `top_k` must be in 1..num_experts={self.num_experts}, got top_k={self.top_k}."
            )
        if self.routing != "sequence" and self.sequence_pooling != "causal_mean":
            raise ValueError(
                f"MoEConfig: `sequence_pooling` applies to routing='sequence' only, got routing={self.routing!r} with "
                f"sequence_pooling={self.sequence_pooling!r}; leave it at 'causal_mean'."
            )
        if self.routing == "label" and self.router != "learned":
            raise ValueError(
                f"MoEConfig: routing='label' has no router; `router` must stay 'learned' (its default), got "
                f"{self.router!r}."
            )
        if not _is_number(self.router_init_std) or not self.router_init_std > 0:
            raise ValueError(f"MoEConfig: `router_init_std` must be a number > 0, got {self.router_init_std!r}.")
        if not _is_number(self.router_jitter_noise) or not 0 <= self.router_jitter_noise < 1:
            raise ValueError(
                f"MoEConfig: `router_jitter_noise` must be a number in [0, 1), got {self.router_jitter_noise!r}."
            )
        if self.capacity_factor is not None:
            if not _is_number(self.capacity_factor) or not self.capacity_factor > 0:
                raise ValueError(
                    "MoEConfig: `capacity_factor` must be None (dropless) or a number > 0, got "
                    f"{self.capacity_factor!r}."
                )
            if self.routing != "token":
                raise ValueError(
                    f"MoEConfig: `capacity_factor` applies to routing='token' only, got routing={self.routing!r}; set "
                    "capacity_factor=None."
                )
        pooling_used = self.routing == "sequence" and self.sequence_pooling == "prefix"
        if pooling_used and (not _is_int(self.prefix_len) or self.prefix_len < 1):
            raise ValueError(
                f"MoEConfig: sequence_pooling='prefix' needs `prefix_len` >= 1, got prefix_len={self.prefix_len!r}."
            )
        if not pooling_used and self.prefix_len is not None:
            raise ValueError(
                "MoEConfig: `prefix_len` is used only with routing='sequence' and sequence_pooling='prefix'; got "
                f"routing={self.routing!r}, sequence_pooling={self.sequence_pooling!r}. Set prefix_len=None."
            )
        if self.routing == "label":
            if self.label_to_expert is None or isinstance(self.label_to_expert, str) or not self.label_to_expert:
                raise ValueError("MoEConfig: routing='label' needs `label_to_expert`, a list of expert ids per domain.")
            bad = [e for e in self.label_to_expert if not _is_int(e) or not 0 <= e < self.num_experts]
            if bad:
                raise ValueError(
                    f"MoEConfig: `label_to_expert` entries must be expert ids in 0..{self.num_experts - 1}, got {bad}."
                )
            if self.top_k != 1:
                raise ValueError(
                    f"MoEConfig: routing='label' picks one expert per sequence; set top_k=1 (got {self.top_k})."
                )
            self.label_to_expert = list(self.label_to_expert)
        elif self.label_to_expert is not None:
            raise ValueError(
                f"MoEConfig: `label_to_expert` is used only with routing='label', got routing={self.routing!r}."
            )
        if self.layers is not None:
            if isinstance(self.layers, str) or not self.layers or not all(_is_int(i) and i >= 0 for i in self.layers):
                raise ValueError(
                    f"MoEConfig: `layers` must be None or a non-empty list of block indices >= 0, got {self.layers!r}."
                )
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"MoEConfig: `layers` has duplicates: {self.layers}.")
            self.layers = sorted(self.layers)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON/YAML-serializable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoEConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: On unknown keys (named, with the known ones) or invalid values.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"MoEConfig: unknown field(s) {unknown}; known: {sorted(known)}.")
        return cls(**data)


# ---------------------------------------------------------------------------------------------------------- routing
@dataclass
class Routing:
    """One routing decision.

    Attributes:
        logits: Router logits of the units ``[U, E]`` (pooled for sequence routing; ``None`` for label routing).
        probs: ``softmax(logits)`` ``[U, E]`` (one-hot for label routing).
        weights: Gate weights of the units ``[U, k]``.
        indices: Chosen experts of the units ``[U, k]``.
        unit_mask: Valid units ``[U]`` or ``None`` (all valid).
        token_weights: Gate weights per token ``[B * T, k]`` (for ``mean`` pooling and labels: the sequence's).
        token_indices: Experts per token ``[B * T, k]``.
    """

    logits: Tensor | None
    probs: Tensor
    weights: Tensor
    indices: Tensor
    unit_mask: Tensor | None
    token_weights: Tensor
    token_indices: Tensor


class _GeneratorState(nn.Module):
    """Holds the generator of a re-drawn router; its state is checkpointed as the module's extra state."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def get_extra_state(self) -> dict[str, Tensor]:
        return {"rng_state": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["rng_state"])


class TokenRouter(nn.Module):
    r"""Linear softmax router over tokens: ``h = W_r x`` (no bias, float32), then :func:`route_top_k`.

    Weight modes:

    * ``"learned"``: ``weight`` is a parameter, initialized ``N(0, init_std²)`` from the global RNG;
    * ``"frozen"``: ``weight`` is a persistent *buffer* drawn once from ``torch.Generator().manual_seed(seed)``
      (not in ``parameters()``, so optimizers, weight decay and "unfreeze all" helpers never touch it; it is in the
      ``state_dict``);
    * ``"resampled"``: ``weight`` is a persistent buffer re-drawn from the seeded generator at every training
      forward and kept in eval; the generator state is checkpointed (``rng`` submodule's extra state), so a resumed
      run draws the same sequence. A forward with the same ``draw_key`` as the previous one (activation
      recomputation) does not draw again.

    Frozen and re-drawn routers receive no gradient; auxiliary losses then reach only the upstream activations.

    Args:
        d_model: Input width ``d``.
        num_experts: ``E``.
        top_k: Experts per token, ``1..E``.
        router: ``"learned"``, ``"frozen"`` or ``"resampled"``.
        normalize_top_k: See :func:`~lightning_epfl.functional.moe.route_top_k`.
        init_std: Standard deviation of the normal init and of every draw.
        jitter_noise: ``ε``: in training the router input is multiplied by ``U(1-ε, 1+ε)`` noise (0: off).
        seed: Seed of the frozen / re-drawn weights.

    Raises:
        ValueError: If ``top_k`` is not in ``1..E`` or ``router`` is unknown.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        router: Literal["learned", "frozen", "resampled"] = "learned",
        normalize_top_k: bool = True,
        init_std: float = 0.02,
        jitter_noise: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if router not in _CHOICES["router"]:
            raise ValueError(f"`router` must be one of {_CHOICES['router']}, got {router!r}.")
        if not _is_int(top_k) or not 1 <= top_k <= num_experts:
            raise ValueError(f"`top_k` must be in 1..num_experts={num_experts}, got {top_k!r}.")
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.mode = router
        self.normalize_top_k = normalize_top_k
        self.init_std = init_std
        self.jitter_noise = jitter_noise
        self._drawn_for: Any = None
        if router == "learned":
            self.weight = nn.Parameter(torch.empty(num_experts, d_model))
            nn.init.normal_(self.weight, 0.0, init_std)
        else:
            self.rng = _GeneratorState(seed)
            self.register_buffer("weight", self._draw(), persistent=True)

    def _draw(self) -> Tensor:
        return torch.randn(self.num_experts, self.d_model, generator=self.rng.generator) * self.init_std

    def resample(self) -> None:
        """Draw new weights now (``"resampled"`` routers only)."""
        if self.mode != "resampled":
            raise RuntimeError(f"resample() applies to router='resampled', not {self.mode!r}.")
        with torch.no_grad():
            self.weight.copy_(self._draw().to(self.weight.device, self.weight.dtype))

    def router_logits(self, x: Tensor, draw_key: Any = None) -> Tensor:
        """Logits ``[..., E]`` (float32, or float64 for float64 input) of inputs ``[..., d]``.

        In training, a ``"resampled"`` router first draws new weights (unless ``draw_key`` equals the previous
        training forward's key, ``None`` always draws), and jitter noise is applied to the input.
        """
        if self.training and self.mode == "resampled" and (draw_key is None or draw_key != self._drawn_for):
            self.resample()
            self._drawn_for = draw_key
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(dtype)
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        return F.linear(x, self.weight.to(dtype))

    def forward(self, x: Tensor, mask: Tensor | None = None, draw_key: Any = None) -> Routing:
        """Route tokens ``x`` ``[N, d]`` (``mask`` ``[N]``: valid tokens) to experts."""
        logits = self.router_logits(x, draw_key)
        probs, weights, indices = route_top_k(logits, self.top_k, self.normalize_top_k)
        unit_mask = None if mask is None else mask.reshape(-1).bool()
        return Routing(logits, probs, weights, indices, unit_mask, weights, indices)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, router={self.mode!r}"


class SequenceRouter(TokenRouter):
    r"""Router over sequences: token logits ``h = W_r x`` pooled over positions by
    :func:`~lightning_epfl.functional.moe.pool_router_logits`, then :func:`route_top_k`.

    * ``pooling="causal_mean"`` (default): position ``t`` is routed by the mean logits of positions ``<= t``; the
      routing units are the (valid) positions; no look-ahead, so it is safe in a causal language model.
    * ``pooling="prefix"``: as ``causal_mean`` up to position ``prefix_len - 1``, then that position's decision.
    * ``pooling="mean"``: one decision per sequence from the mean over all its valid positions; the units are the
      sequences. In a causal language model every position then depends on future tokens.

    Incremental decoding with a KV cache (one token per call) cannot see the earlier positions; models set up by
    :func:`replace_mlps_with_moe` raise on such calls (use ``generate(..., use_cache=False)``).

    Args:
        d_model, num_experts, top_k, router, normalize_top_k, init_std, jitter_noise, seed: As :class:`TokenRouter`.
        pooling: ``"causal_mean"``, ``"mean"`` or ``"prefix"``.
        prefix_len: ``m >= 1`` for ``"prefix"``.

    Raises:
        ValueError: As :class:`TokenRouter`, or for an unknown ``pooling`` / missing ``prefix_len``.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        router: Literal["learned", "frozen", "resampled"] = "learned",
        normalize_top_k: bool = True,
        init_std: float = 0.02,
        jitter_noise: float = 0.0,
        seed: int = 0,
        pooling: Literal["causal_mean", "mean", "prefix"] = "causal_mean",
        prefix_len: int | None = None,
    ) -> None:
        super().__init__(d_model, num_experts, top_k, router, normalize_top_k, init_std, jitter_noise, seed)
        if pooling not in _CHOICES["sequence_pooling"]:
            raise ValueError(f"`pooling` must be one of {_CHOICES['sequence_pooling']}, got {pooling!r}.")
        if pooling == "prefix" and (not _is_int(prefix_len) or prefix_len < 1):
            raise ValueError(f"`prefix_len` must be an integer >= 1 for pooling='prefix', got {prefix_len!r}.")
        self.pooling = pooling
        self.prefix_len = prefix_len

    def forward(self, x: Tensor, mask: Tensor | None = None, draw_key: Any = None) -> Routing:  # type: ignore[override]
        """Route sequences ``x`` ``[B, T, d]`` (``mask`` ``[B, T]``: valid tokens)."""
        if x.ndim != 3:
            raise ValueError(f"SequenceRouter expects hidden states [B, T, d], got {tuple(x.shape)}.")
        bsz, seq, _ = x.shape
        pooled = pool_router_logits(self.router_logits(x, draw_key), self.pooling, mask, self.prefix_len)
        if self.pooling == "mean":
            logits = pooled[:, 0]
            probs, weights, indices = route_top_k(logits, self.top_k, self.normalize_top_k)
            unit_mask = None if mask is None else mask.bool().any(dim=1)
            token_w = weights[:, None].expand(bsz, seq, self.top_k).reshape(bsz * seq, self.top_k)
            token_i = indices[:, None].expand(bsz, seq, self.top_k).reshape(bsz * seq, self.top_k)
            return Routing(logits, probs, weights, indices, unit_mask, token_w, token_i)
        logits = pooled.reshape(bsz * seq, -1)
        probs, weights, indices = route_top_k(logits, self.top_k, self.normalize_top_k)
        unit_mask = None if mask is None else mask.reshape(-1).bool()
        return Routing(logits, probs, weights, indices, unit_mask, weights, indices)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", pooling={self.pooling!r}"


class LabelRouter(nn.Module):
    """Routes every token of sequence ``b`` to expert ``label_to_expert[domain_ids[b]]`` with weight 1.

    The ablation of routing by a known label (language / domain). No parameters; the probabilities are one-hot and
    there are no logits (the z-loss is 0).
    """

    def __init__(self, num_experts: int, label_to_expert: list[int]) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.register_buffer("table", torch.tensor(label_to_expert, dtype=torch.long), persistent=False)

    def forward(self, x: Tensor, mask: Tensor | None, domain_ids: Tensor | None) -> Routing:
        if domain_ids is None:
            raise RuntimeError(
                "routing='label' needs the domain id of every sequence: run the model inside "
                "`routing_context(model, domain_ids=...)` (CausalLMModule does so for batches with a 'domain' key)."
            )
        bsz, seq = x.shape[0], x.shape[1]
        ids = torch.as_tensor(domain_ids, device=x.device).reshape(-1).long()
        if ids.numel() != bsz:
            raise ValueError(f"`domain_ids` must have one entry per sequence ({bsz}), got {ids.numel()}.")
        if int(ids.min()) < 0 or int(ids.max()) >= self.table.numel():
            raise ValueError(f"domain ids must lie in 0..{self.table.numel() - 1} (the length of `label_to_expert`).")
        indices = self.table.to(x.device)[ids][:, None]
        weights = torch.ones(bsz, 1, dtype=torch.float32, device=x.device)
        probs = F.one_hot(indices[:, 0], self.num_experts).to(torch.float32)
        unit_mask = None if mask is None else mask.bool().any(dim=1)
        token_i = indices[:, None].expand(bsz, seq, 1).reshape(-1, 1)
        token_w = weights[:, None].expand(bsz, seq, 1).reshape(-1, 1)
        return Routing(None, probs, weights, indices, unit_mask, token_w, token_i)


# ---------------------------------------------------------------------------------------------------------- experts
def _mlp_kind(mlp: Any) -> str | None:
    """``"gated"`` for a Llama-style MLP, ``"gpt2"`` for a GPT-2-style MLP, ``None`` otherwise."""
    if not isinstance(mlp, nn.Module):
        return None
    if all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")) and callable(
        getattr(mlp, "act_fn", None)
    ):
        return "gated"
    fc, proj = getattr(mlp, "c_fc", None), getattr(mlp, "c_proj", None)
    if (
        type(fc).__name__ == "Conv1D"
        and type(proj).__name__ == "Conv1D"
        and hasattr(fc, "nf")
        and callable(getattr(mlp, "act", None))
    ):
        return "gpt2"
    return None


def _grouped_mm_ok(rows: Tensor, *weights: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` can run these operands (a CPU float32/bfloat16 kernel with 16-byte strides)."""
    if not hasattr(torch, "_grouped_mm") or rows.device.type != "cpu":
        return False
    if rows.dtype not in (torch.float32, torch.bfloat16) or any(w.dtype != rows.dtype for w in weights):
        return False
    size = rows.element_size()
    return all(dim * size % 16 == 0 for w in weights for dim in w.shape[1:])


class StackedExperts(nn.Module):
    r"""``E`` MLP experts with stacked weights, run on rows sorted by expert.

    Expert ``e`` computes ``(act(x W_in[e] + b_in[e])) W_out[e] + b_out[e]`` (plain) or
    ``(act(x W_g[e]) ⊙ x W_u[e]) W_out[e]`` (gated, ``W_in[e] = [W_g[e] | W_u[e]]``), with ``W_in`` ``[E, d, H]``
    (``H = I`` or ``2I``) and ``W_out`` ``[E, I, d]``.

    Calling it with ``rows [M, d]`` and ``counts`` (``E`` ints: the lengths of the experts' contiguous segments) runs
    every expert on its segment as one computation; :attr:`implementation` picks how:

    * ``"grouped"``: ``torch._grouped_mm`` over the segments (CPU float32/bfloat16 with 16-byte aligned widths);
    * ``"padded"``: segments padded to the largest one and run as ``[E, C, d]`` batched matmuls (``torch.bmm``);
    * ``"loop"``: one matmul pair per expert on its slice (any dtype and device);
    * ``"auto"`` (default): ``"loop"`` when the experts average at least :attr:`loop_min_rows` rows (large matmuls:
      the per-expert call overhead is negligible), else ``"grouped"`` where it runs, else ``"padded"`` when the
      largest segment is at most 1.25× the mean one (the padding then wastes little), else ``"loop"``. (CPU timings
      of forward + backward, hidden 128, width 344, top-2: grouped was fastest below about 256 rows per expert,
      the loop above.)

    All are differentiable with respect to the rows and every weight.

    Args:
        num_experts: ``E``.
        d_model: ``d``.
        d_ff: Expert width ``I``.
        gated: Gated (SwiGLU-style) experts.
        activation: The activation module or function (e.g. ``nn.SiLU()``, ``transformers``' ``NewGELUActivation``).
        bias_in: Whether the input projection has a bias.
        bias_out: Whether the output projection has a bias.
    """

    implementations = ("auto", "grouped", "padded", "loop")
    loop_min_rows = 256
    """Mean rows per expert from which ``"auto"`` runs the per-expert loop."""

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        gated: bool,
        activation: Any,
        bias_in: bool = False,
        bias_out: bool = False,
    ) -> None:
        super().__init__()
        self.num_experts, self.d_model, self.d_ff, self.gated = num_experts, d_model, d_ff, gated
        width = 2 * d_ff if gated else d_ff
        self.w_in = nn.Parameter(torch.zeros(num_experts, d_model, width))
        self.w_out = nn.Parameter(torch.zeros(num_experts, d_ff, d_model))
        self.b_in = nn.Parameter(torch.zeros(num_experts, width)) if bias_in else None
        self.b_out = nn.Parameter(torch.zeros(num_experts, d_model)) if bias_out else None
        self.act = activation
        self.implementation: Literal["auto", "grouped", "padded", "loop"] = "auto"

    def _activate(self, h: Tensor) -> Tensor:
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.act(gate) * up
        return self.act(h)

    def expert_forward(self, e: int, x: Tensor) -> Tensor:
        """Expert ``e`` alone on rows ``x`` ``[n, d]`` → ``[n, d]``."""
        h = x @ self.w_in[e]
        if self.b_in is not None:
            h = h + self.b_in[e]
        y = self._activate(h) @ self.w_out[e]
        return y if self.b_out is None else y + self.b_out[e]

    def choose(self, rows: Tensor, counts: list[int]) -> str:
        """The implementation :meth:`forward` uses for these rows and segment lengths."""
        if self.implementation != "auto":
            return self.implementation
        total = sum(counts)
        if total == 0 or total >= self.loop_min_rows * self.num_experts:
            return "loop"
        if _grouped_mm_ok(rows, self.w_in, self.w_out):
            return "grouped"
        balanced = max(counts) * self.num_experts <= 1.25 * total
        return "padded" if balanced else "loop"

    def forward(self, rows: Tensor, counts: list[int]) -> Tensor:
        """Run expert ``e`` on segment ``e`` of ``rows`` ``[M, d]`` (segment lengths ``counts``) → ``[M, d]``."""
        if len(counts) != self.num_experts or sum(counts) != rows.shape[0]:
            raise ValueError(f"`counts` must be {self.num_experts} segment lengths summing to {rows.shape[0]}.")
        rows = rows.to(self.w_in.dtype)
        how = self.choose(rows, counts)
        if how == "grouped" and not _grouped_mm_ok(rows, self.w_in, self.w_out):
            how = "loop"
        if how == "grouped":
            return self._grouped(rows, counts)
        if how == "padded":
            return self._padded(rows, counts)
        return self._loop(rows, counts)

    def _segment_bias(self, bias: Tensor | None, counts: list[int], rows: Tensor) -> Tensor | None:
        if bias is None:
            return None
        sizes = torch.tensor(counts, device=rows.device)
        return bias.repeat_interleave(sizes, dim=0, output_size=rows.shape[0])

    def _grouped(self, rows: Tensor, counts: list[int]) -> Tensor:
        offs = torch.tensor(counts, device=rows.device).cumsum(0).to(torch.int32)
        h = _contiguous_grad(torch._grouped_mm(rows, self.w_in, offs=offs))
        bias = self._segment_bias(self.b_in, counts, rows)
        if bias is not None:
            h = h + bias
        y = _contiguous_grad(torch._grouped_mm(self._activate(h).contiguous(), self.w_out, offs=offs))
        bias = self._segment_bias(self.b_out, counts, rows)
        return y if bias is None else y + bias

    def _padded(self, rows: Tensor, counts: list[int]) -> Tensor:
        num, cap = self.num_experts, max(counts)
        sizes = torch.tensor(counts, device=rows.device)
        expert = torch.repeat_interleave(torch.arange(num, device=rows.device), sizes, output_size=rows.shape[0])
        starts = sizes.cumsum(0) - sizes
        slot = expert * cap + torch.arange(rows.shape[0], device=rows.device) - starts[expert]
        buf = rows.new_zeros(num * cap, rows.shape[1]).index_copy(0, slot, rows).view(num, cap, -1)
        h = torch.bmm(buf, self.w_in)
        if self.b_in is not None:
            h = h + self.b_in[:, None]
        y = torch.bmm(self._activate(h), self.w_out)
        if self.b_out is not None:
            y = y + self.b_out[:, None]
        return y.reshape(num * cap, -1)[slot]

    def _loop(self, rows: Tensor, counts: list[int]) -> Tensor:
        w_in, w_out = self.w_in.unbind(0), self.w_out.unbind(0)  # one backward node per stack, not per expert
        b_in = self.b_in.unbind(0) if self.b_in is not None else None
        b_out = self.b_out.unbind(0) if self.b_out is not None else None
        outs = []
        for e, chunk in enumerate(rows.split(counts)):
            if counts[e] == 0:
                continue
            h = chunk @ w_in[e]
            if b_in is not None:
                h = h + b_in[e]
            y = self._activate(h) @ w_out[e]
            outs.append(y if b_out is None else y + b_out[e])
        return torch.cat(outs) if outs else rows.new_zeros(0, self.d_model)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, gated={self.gated}"


def _contiguous_grad(t: Tensor) -> Tensor:
    """``torch._grouped_mm``'s backward needs a dense gradient (a broadcast one has zero strides)."""
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


def _dense_weights(mlp: nn.Module, kind: str) -> dict[str, Tensor | None]:
    """The dense MLP's weights in the stacked layout of one expert: ``w_in [d, H]``, ``w_out [I, d]``, biases."""
    if kind == "gated":
        gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj  # type: ignore[union-attr]
        b_in = None
        if gate.bias is not None or up.bias is not None:
            zeros = torch.zeros(gate.out_features, dtype=gate.weight.dtype, device=gate.weight.device)
            b_in = torch.cat([gate.bias if gate.bias is not None else zeros, up.bias if up.bias is not None else zeros])
        return {
            "w_in": torch.cat([gate.weight, up.weight], dim=0).t(),
            "w_out": down.weight.t(),
            "b_in": b_in,
            "b_out": down.bias,
        }
    fc, proj = mlp.c_fc, mlp.c_proj  # type: ignore[union-attr]
    return {"w_in": fc.weight, "w_out": proj.weight, "b_in": fc.bias, "b_out": proj.bias}


# ---------------------------------------------------------------------------------------------------------- layer
@dataclass
class MoEAux:
    """Auxiliary losses and statistics of one :class:`MoEMLP` forward.

    Attributes:
        lb: Load-balancing loss (scalar, in the autograd graph).
        z: Router z-loss (scalar, in the graph; 0 for label routing).
        load: Fraction of assignments per expert ``[E]`` (detached; sums to 1).
        mean_probs: Mean router probability per expert ``[E]`` (detached).
        entropy: Mean entropy (nats) of the units' router distributions (detached scalar).
        dropped_frac: Fraction of valid token assignments dropped by the capacity limit (detached scalar).
        unit_indices: Chosen experts per position ``[B, T, k]`` (detached; the sequence's for ``mean`` pooling and
            labels).
        token_mask: Valid positions ``[B, T]`` (bool) or ``None``.
        router_logits: Router logits of the units ``[U, E]`` (detached; ``None`` for label routing).
    """

    lb: Tensor
    z: Tensor
    load: Tensor
    mean_probs: Tensor
    entropy: Tensor
    dropped_frac: Tensor
    unit_indices: Tensor
    token_mask: Tensor | None
    router_logits: Tensor | None


@dataclass
class _Context:
    attention_mask: Tensor | None = None
    domain_ids: Tensor | None = None


class _MoEShared:
    """State shared by the MoE layers of one model: routing context, forward counter, network-scope decision."""

    def __init__(self) -> None:
        self.context: _Context | None = None  # set by `routing_context`
        self.auto_mask: Tensor | None = None  # the root forward's `attention_mask` keyword
        self.forward_id: int | None = None  # advanced by the root pre-hook (None: no root hook)
        self.network: Routing | None = None  # router_scope="network": the first layer's decision
        self.sequence_routing = False

    def mask(self) -> Tensor | None:
        if self.context is not None and self.context.attention_mask is not None:
            return self.context.attention_mask
        return self.auto_mask

    def domains(self) -> Tensor | None:
        return None if self.context is None else self.context.domain_ids


class MoEMLP(nn.Module):
    r"""Sparse mixture-of-experts replacement of a transformer block's MLP (arXiv:2402.13089).

    ``y = Σ_{e ∈ I(x)} g_e(x) · E_e(x)`` where the experts have the dense MLP's architecture (GPT-2 GELU MLP or
    Llama-style gated MLP, see :data:`SUPPORTED_MLPS`) and the router is chosen by ``config`` (:class:`TokenRouter`,
    :class:`SequenceRouter` or label routing). Maps ``[B, T, d]`` to ``[B, T, d]`` (``[N, d]`` is accepted for token
    routing), so it drops in for ``GPT2Block.mlp`` and ``LlamaDecoderLayer.mlp``. Dropless by default; with
    ``capacity_factor`` each expert takes at most ``⌈cf · k · U / E⌉`` of the ``U`` valid tokens' assignments (first
    choices in position order, then second choices) and the rest contribute 0.

    Padding (``attention_mask`` 0, from :func:`routing_context` or the root model's ``attention_mask`` keyword when
    installed by :func:`replace_mlps_with_moe`) is neither dispatched (its output is 0) nor counted in the losses.

    Every forward overwrites :attr:`last_aux` (:class:`MoEAux`: load-balancing and z-loss in the graph, detached
    statistics); nothing accumulates across forwards. :func:`moe_aux_loss` consumes it.

    Args:
        dense_mlp: The dense MLP to replace; its architecture, activation, biases and (GPT-2) dropout are reused,
            and its weights with ``expert_init="copy"``.
        d_model: Hidden width ``d`` (must equal the MLP's input width).
        config: :class:`MoEConfig`.
        layer_index: Index of the block; seeds the frozen / re-drawn router's stream
            (``derive_seed(router_seed, "moe_router", layer_index)``).

    Raises:
        ValueError: If ``dense_mlp`` is not a supported MLP (the message lists :data:`SUPPORTED_MLPS`) or
            ``d_model`` does not match it.
    """

    def __init__(self, dense_mlp: nn.Module, d_model: int, config: MoEConfig, layer_index: int = 0) -> None:
        super().__init__()
        kind = _mlp_kind(dense_mlp)
        if kind is None:
            raise ValueError(
                f"MoEMLP: {type(dense_mlp).__name__} is not a supported MLP; supported: {'; '.join(SUPPORTED_MLPS)}."
            )
        dense = _dense_weights(dense_mlp, kind)
        w_in, w_out = dense["w_in"], dense["w_out"]
        assert w_in is not None and w_out is not None
        if w_in.shape[0] != d_model:
            raise ValueError(f"MoEMLP: `d_model`={d_model} but the MLP's input width is {w_in.shape[0]}.")
        self.config = config
        self.num_experts, self.top_k, self.d_model = config.num_experts, config.top_k, d_model
        self.layer_index = layer_index
        act = dense_mlp.act_fn if kind == "gated" else dense_mlp.act  # type: ignore[union-attr]
        d_ff = w_out.shape[0]
        self.experts = StackedExperts(
            config.num_experts,
            d_model,
            d_ff,
            kind == "gated",
            act,
            dense["b_in"] is not None,
            dense["b_out"] is not None,
        ).to(device=w_in.device, dtype=w_in.dtype)
        self._init_experts(dense, config.expert_init)
        self.dropout = dense_mlp.dropout if kind == "gpt2" else None  # type: ignore[union-attr]
        seed = derive_seed(config.router_seed, "moe_router", layer_index)
        common = {
            "d_model": d_model,
            "num_experts": config.num_experts,
            "top_k": config.top_k,
            "router": config.router,
            "normalize_top_k": config.normalize_top_k,
            "init_std": config.router_init_std,
            "jitter_noise": config.router_jitter_noise,
            "seed": seed,
        }
        self.router: nn.Module | None
        if config.routing == "label":
            assert config.label_to_expert is not None
            self.router = LabelRouter(config.num_experts, config.label_to_expert)
        elif config.routing == "sequence":
            self.router = SequenceRouter(**common, pooling=config.sequence_pooling, prefix_len=config.prefix_len)
        else:
            self.router = TokenRouter(**common)
        if self.router is not None:
            self.router.to(w_in.device)
        self._shared = _MoEShared()
        self._shared.sequence_routing = config.routing == "sequence"
        self._network_follower = False
        self.last_aux: MoEAux | None = None

    def _init_experts(self, dense: dict[str, Tensor | None], how: str) -> None:
        with torch.no_grad():
            for name in ("w_in", "w_out", "b_in", "b_out"):
                target = getattr(self.experts, name)
                source = dense[name]
                if target is None or source is None:
                    continue
                if how == "copy":
                    target.copy_(source.detach()[None].expand_as(target))
                elif name.startswith("w"):
                    std = float(source.detach().float().std()) if source.numel() > 1 else 0.02
                    target.normal_(0.0, std if math.isfinite(std) and std > 0 else 0.02)
                else:
                    target.zero_()

    # ------------------------------------------------------------------ routing
    def _route(self, x: Tensor, mask: Tensor | None) -> Routing:
        shared = self._shared
        if self._network_follower:
            routing = shared.network
            if routing is None or routing.token_indices.shape[0] != x.shape[0] * x.shape[1]:
                raise RuntimeError(
                    "router_scope='network': the first MoE layer has not routed this forward's tokens (call the whole "
                    "model, not a single layer)."
                )
            return routing
        router = self.router
        if isinstance(router, LabelRouter):
            routing = router(x, mask, shared.domains())
        elif isinstance(router, SequenceRouter):
            routing = router(x, mask, draw_key=shared.forward_id)
        else:
            assert isinstance(router, TokenRouter)
            flat_mask = None if mask is None else mask.reshape(-1)
            routing = router(x.reshape(-1, x.shape[-1]), flat_mask, draw_key=shared.forward_id)
        if self.config.router_scope == "network":
            shared.network = routing
        return routing

    def _mask(self, bsz: int, seq: int, device: torch.device) -> Tensor | None:
        mask = self._shared.mask()
        if mask is None:
            return None
        mask = torch.as_tensor(mask, device=device)
        if mask.ndim != 2 or mask.shape[0] != bsz or mask.shape[1] < seq:
            raise ValueError(
                f"MoEMLP: the attention mask has shape {tuple(mask.shape)}, expected [B={bsz}, T>={seq}] for hidden "
                f"states [B, T, d] of shape [{bsz}, {seq}, d]."
            )
        mask = mask[:, -seq:].bool()
        return None if bool(mask.all()) else mask

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states: Tensor) -> Tensor:
        """Map ``[B, T, d]`` (or ``[N, d]`` with token routing) to the same shape."""
        shape = hidden_states.shape
        if hidden_states.ndim == 2 and self.config.routing == "token":
            x = hidden_states[None]
        elif hidden_states.ndim == 3:
            x = hidden_states
        else:
            raise ValueError(f"MoEMLP expects hidden states [B, T, d], got {tuple(shape)}.")
        bsz, seq, d = x.shape
        mask = self._mask(bsz, seq, x.device)
        routing = self._route(x, mask)
        flat_mask = None if mask is None else mask.reshape(-1)
        capacity = None
        if self.config.capacity_factor is not None:
            tokens = bsz * seq if flat_mask is None else int(flat_mask.sum())
            capacity = capacity_slots(self.config.capacity_factor, self.top_k, tokens, self.num_experts)
        out, kept = moe_dispatch(
            x.reshape(-1, d),
            routing.token_indices,
            routing.token_weights,
            self.experts,
            capacity,
            mask=flat_mask,
            num_experts=self.num_experts,
        )
        if self.dropout is not None:
            out = self.dropout(out)
        self.last_aux = self._aux(routing, kept, flat_mask, bsz, seq)
        return out.to(hidden_states.dtype).reshape(shape)

    def _aux(self, routing: Routing, kept: Tensor, flat_mask: Tensor | None, bsz: int, seq: int) -> MoEAux:
        stats = router_statistics(routing.probs, routing.indices, self.num_experts, routing.logits, routing.unit_mask)
        with torch.no_grad():
            if self.config.capacity_factor is None:
                dropped = torch.zeros((), device=kept.device)
            else:
                valid_kept = kept if flat_mask is None else kept[flat_mask]
                dropped = 1.0 - valid_kept.float().sum() / max(valid_kept.numel(), 1)
        return MoEAux(
            lb=stats["lb"],
            z=stats["z"],
            load=stats["load"],
            mean_probs=stats["mean_probs"],
            entropy=stats["entropy"],
            dropped_frac=dropped,
            unit_indices=routing.token_indices.detach().reshape(bsz, seq, -1),
            token_mask=None if flat_mask is None else flat_mask.reshape(bsz, seq),
            router_logits=None if routing.logits is None else routing.logits.detach(),
        )

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"layer_index={self.layer_index}, routing={c.routing!r}, router={c.router!r}, scope={c.router_scope!r}, "
            f"capacity_factor={c.capacity_factor}"
        )


# ---------------------------------------------------------------------------------------------------------- model
def moe_layers(model: nn.Module) -> list[MoEMLP]:
    """The :class:`MoEMLP` modules of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, MoEMLP)]


class _RootPreHook:
    """Forward pre-hook of the root model: new forward id, network cache reset, automatic attention mask, and the
    refusal of one-token cached decoding under sequence routing."""

    def __init__(self, shared: _MoEShared) -> None:
        self.shared = shared

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        shared = self.shared
        shared.forward_id = (shared.forward_id or 0) + 1
        shared.network = None
        mask = kwargs.get("attention_mask")
        shared.auto_mask = mask if isinstance(mask, Tensor) and mask.ndim == 2 else None
        if shared.sequence_routing:
            caches = [kwargs.get(k) for k in ("past_key_values", "cache")]  # the keyword's name varies by version
            if any(hasattr(c, "get_seq_length") and c.get_seq_length() > 0 for c in caches):
                raise RuntimeError(
                    "MoE sequence routing pools over all earlier positions, which an incremental decoding step with a "
                    "KV cache does not see; generate with `use_cache=False` (e.g. model.generate(..., "
                    "use_cache=False))."
                )


class _RootPostHook:
    """Forward hook of the root model: forget the forward's automatic mask and network decision."""

    def __init__(self, shared: _MoEShared) -> None:
        self.shared = shared

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.shared.auto_mask = None
        self.shared.network = None


def replace_mlps_with_moe(model: nn.Module, config: MoEConfig, mlp_attr: str = "mlp") -> list[MoEMLP]:
    r"""Replace the MLP of every (or each chosen) transformer block of ``model`` by an :class:`MoEMLP`, in place.

    A block is any submodule whose attribute ``mlp_attr`` is a supported MLP (:data:`SUPPORTED_MLPS`: GPT-2's
    ``GPT2MLP``, Llama-style ``LlamaMLP`` / ``MistralMLP`` / ``Qwen2MLP`` ...); blocks are numbered in module order and
    ``config.layers`` selects among them. With ``expert_init="copy"`` each expert starts as a copy of the block's MLP
    (sparse upcycling: the logits equal the dense model's up to float rounding); with a learned router the
    parameter count becomes ``dense + Σ_layers ((E - 1) · mlp + router)`` (frozen and re-drawn routers are buffers,
    not parameters).

    The experts and routers are new modules the model's own ``save_pretrained`` / ``from_pretrained`` do not know:
    a plain ``from_pretrained`` of such a folder drops them and re-initializes the dense MLPs. Keep MoE models in
    Lightning checkpoints or ``state_dict`` files (``CausalLMModule.save_pretrained`` refuses an MoE model).

    The layers share one state: forward hooks on ``model`` advance a forward counter (a re-drawn router draws once
    per forward, also under activation recomputation), reset the network-scope decision, pick up the
    ``attention_mask`` keyword argument of ``model(...)`` as the padding mask, and refuse one-token cached decoding
    under sequence routing.

    Args:
        model: A ``transformers`` GPT-2 or Llama-type model (or any model with such blocks).
        config: :class:`MoEConfig`.
        mlp_attr: Attribute name of the MLP in a block. Default ``"mlp"``.

    Returns:
        The new :class:`MoEMLP` layers, in block order.

    Raises:
        ValueError: If no block has a supported MLP (the message names the supported types and what was found), a
            ``config.layers`` index is out of range, or the model already has MoE layers.
    """
    if not isinstance(config, MoEConfig):
        raise TypeError(f"`config` must be a MoEConfig, got {type(config).__name__}.")
    if moe_layers(model):
        raise ValueError("replace_mlps_with_moe: the model already has MoE layers.")
    found: list[str] = []
    blocks: list[nn.Module] = []
    for _, module in model.named_modules():
        mlp = getattr(module, mlp_attr, None)
        if isinstance(mlp, nn.Module):
            found.append(type(mlp).__name__)
            if _mlp_kind(mlp) is not None:
                blocks.append(module)
    if not blocks:
        seen = f"found `{mlp_attr}` modules of type(s) {sorted(set(found))}" if found else f"no `.{mlp_attr}` module"
        raise ValueError(
            f"replace_mlps_with_moe: {type(model).__name__} has no block with a supported MLP ({seen}); supported: "
            f"{'; '.join(SUPPORTED_MLPS)}."
        )
    chosen = list(range(len(blocks))) if config.layers is None else list(config.layers)
    bad = [i for i in chosen if i >= len(blocks)]
    if bad:
        raise ValueError(
            f"MoEConfig.layers: {bad} out of range; the model has {len(blocks)} blocks (0..{len(blocks) - 1})."
        )
    shared = _MoEShared()
    shared.sequence_routing = config.routing == "sequence"
    layers = []
    for n, i in enumerate(chosen):
        block = blocks[i]
        dense = getattr(block, mlp_attr)
        d_model = _dense_weights(dense, _mlp_kind(dense) or "")["w_in"].shape[0]  # type: ignore[union-attr]
        layer = MoEMLP(dense, d_model, config, layer_index=i)
        layer._shared = shared
        if config.router_scope == "network" and n > 0:
            layer.router = None
            layer._network_follower = True
        setattr(block, mlp_attr, layer)
        layers.append(layer)
    model.register_forward_pre_hook(_RootPreHook(shared), with_kwargs=True)
    model.register_forward_hook(_RootPostHook(shared), always_call=True)
    return layers


@contextmanager
def routing_context(
    model: nn.Module, attention_mask: Tensor | None = None, domain_ids: Tensor | None = None
) -> Iterator[None]:
    """Give the MoE layers of ``model`` the padding mask and per-sequence domain ids of the next forward(s).

    Transformer blocks call ``mlp(hidden_states)`` alone, so what routing needs beyond the hidden states comes
    through this context: ``attention_mask`` ``[B, T]`` (1 = token; excludes padding from pooling, dispatch and
    losses; needed for left padding) and ``domain_ids`` ``[B]`` (needed by ``routing="label"``). The previous
    context is restored on exit. A model without MoE layers is left alone.

    Args:
        model: The model holding :class:`MoEMLP` layers.
        attention_mask: ``[B, T]`` or ``None``.
        domain_ids: ``[B]`` integer ids or ``None``.
    """
    states = []
    for layer in moe_layers(model):
        if not any(s is layer._shared for s in states):
            states.append(layer._shared)
    previous = [s.context for s in states]
    for s in states:
        s.context = _Context(attention_mask, domain_ids)
    try:
        yield
    finally:
        for s, prev in zip(states, previous):
            s.context = prev


def moe_aux_loss(
    model: nn.Module, router_aux_loss_coef: float = 0.01, router_z_loss_coef: float = 1e-3
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""The auxiliary term ``α_lb · mean_layers L_lb + α_z · mean_layers L_z`` of the last forward, to add to the loss.

    Consumes (and clears) every layer's :attr:`MoEMLP.last_aux`. Both losses are always computed and returned, so a
    coefficient of 0 is the only way to switch a term off. Defaults: ``α_lb = 0.01`` (Switch Transformer,
    arXiv:2101.03961), ``α_z = 1e-3`` (ST-MoE, arXiv:2202.08906).

    Args:
        model: The model holding :class:`MoEMLP` layers.
        router_aux_loss_coef: ``α_lb >= 0``.
        router_z_loss_coef: ``α_z >= 0``.

    Returns:
        ``(aux, stats)``: the scalar term (in the graph) and detached ``{"lb", "z", "dropped_frac"}`` layer means.

    Raises:
        ValueError: If a coefficient is negative or the model has no MoE layer.
        RuntimeError: If a layer in training mode has no stored forward (the forward did not run through it, or its
            losses were already consumed).
    """
    for name, value in (("router_aux_loss_coef", router_aux_loss_coef), ("router_z_loss_coef", router_z_loss_coef)):
        if not _is_number(value) or not value >= 0:
            raise ValueError(f"`{name}` must be a number >= 0, got {value!r}.")
    layers = moe_layers(model)
    if not layers:
        raise ValueError("moe_aux_loss: the model has no MoE layer.")
    auxes = []
    for layer in layers:
        aux = layer.last_aux
        if aux is None:
            if layer.training:
                raise RuntimeError(
                    f"moe_aux_loss: MoE layer {layer.layer_index} has no auxiliary losses stored: the forward did not "
                    "run through it, or they were already consumed (call moe_aux_loss once per forward)."
                )
            continue
        auxes.append(aux)
        layer.last_aux = None
    if not auxes:
        raise RuntimeError("moe_aux_loss: no MoE layer has run since the last call.")
    dtype = torch.float64 if any(a.lb.dtype == torch.float64 for a in auxes) else torch.float32
    lb = torch.stack([a.lb.to(dtype) for a in auxes]).mean()
    z = torch.stack([a.z.to(dtype) for a in auxes]).mean()
    dropped = torch.stack([a.dropped_frac.float() for a in auxes]).mean()
    total = router_aux_loss_coef * lb + router_z_loss_coef * z
    return total, {"lb": lb.detach(), "z": z.detach(), "dropped_frac": dropped.detach()}
