"""Client stack
==============

Stacks the trainable parameters of a one-client module over ``n_local`` clients (``collaborative_core.md`` §2.1):
every trainable tensor of shape ``S`` becomes an ``nn.Parameter`` of shape ``[n_local, *S]`` that is a *view* of one
flat buffer ``X`` of shape ``[n_local, d]`` (communicated tensors first), so that optimizer updates land in ``X`` and
mixing is a single matrix product on ``X[:, :d_comm]``. Client losses, gradients and metrics are evaluated with
``torch.func.functional_call`` either vectorized over clients (``vmap``) or in a Python loop (the reference).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils._pytree import tree_map


@dataclass(frozen=True)
class StackSlot:
    """Where one stacked tensor lives in the flat buffer: columns ``[offset, offset + numel)``."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    communicated: bool


class _ClientAdapter(nn.Module):
    """Private adapter whose ``forward`` calls a client hook, so that ``functional_call`` (forward only) reaches it."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: Any, hook: str) -> Any:
        return getattr(self.module, hook)(batch)


def _set_submodule_param(root: nn.Module, name: str, param: nn.Parameter) -> None:
    *path, leaf = name.split(".")
    owner = root
    for part in path:
        owner = getattr(owner, part)
    owner._parameters[leaf] = param


def stack_client_batches(batches: Sequence[Any]) -> Any:
    """Stack per-client batches ``(x, y[, mask])`` into one batch with a leading client dimension.

    Batches of unequal length are padded (by repeating the first example) to the longest one, and a float ``mask``
    ``[n, B_max]`` (1 real, 0 padding) is appended, which :class:`~lightning_epfl.modules.ClientModule` hooks honour.

    Args:
        batches: One tuple/list of tensors per client; the first dimension of each tensor is the example dimension.

    Returns:
        A tuple of stacked tensors ``[n, B, ...]`` (plus the mask when padding was needed or a mask was given).
    """
    lengths = [len(b[0]) for b in batches]
    has_mask = len(batches[0]) > 2
    if not has_mask and len(set(lengths)) == 1:
        return tuple(torch.stack([b[k] for b in batches]) for k in range(len(batches[0])))
    longest = max(lengths)
    out: list[list[Tensor]] = [[] for _ in range(3)]
    for b, n in zip(batches, lengths):
        pad = longest - n
        mask = b[2].float() if has_mask else torch.ones(n, dtype=torch.float32, device=b[0].device)
        for k, t in enumerate((b[0], b[1], mask)):
            if pad:
                filler = (
                    torch.zeros_like(t[:1]).expand(pad, *t.shape[1:]) if k == 2 else t[:1].expand(pad, *t.shape[1:])
                )
                t = torch.cat([t, filler])
            out[k].append(t)
    return tuple(torch.stack(ts) for ts in out)


class ClientStack:
    """Stacked, flat-buffer view of a module's trainable parameters over ``n_local`` clients.

    After construction, every trainable parameter ``p`` of ``module`` (shape ``S``) is replaced by a leaf
    ``nn.Parameter`` of shape ``[n_local, *S]`` sharing storage with :attr:`X` (``[n_local, d]``); all rows start as
    copies of the module's current weights. Frozen parameters and buffers are not stacked (one shared copy).

    Args:
        module: The one-client module. Modified in place.
        n_local: Number of clients held by this process.
        communicate: ``"trainable"``/``"all"`` (every stacked tensor is communicated) or a list of glob patterns over
            parameter names selecting the communicated subset; the others stay personal.
        execution: ``"vmap"`` (vectorized over clients) or ``"loop"`` (Python loop, the reference).
        chunk_size: ``vmap`` chunk size over clients (bounds activation memory); ``None`` for all at once.

    Raises:
        ValueError: If ``n_local < 1``, the module has no trainable parameter, dtypes differ, ``execution`` is unknown,
            or a ``communicate`` pattern matches nothing.
    """

    def __init__(
        self,
        module: nn.Module,
        n_local: int,
        communicate: Literal["trainable", "all"] | list[str] = "trainable",
        execution: Literal["vmap", "loop"] = "vmap",
        chunk_size: int | None = None,
    ) -> None:
        if n_local < 1:
            raise ValueError(f"`n_local` must be >= 1, got {n_local}.")
        if execution not in ("vmap", "loop"):
            raise ValueError(f"`execution` must be 'vmap' or 'loop', got {execution!r}.")
        self.module = module
        self.n_local = n_local
        self.execution = execution
        self.chunk_size = chunk_size
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the module has no trainable parameter to stack.")
        if len({p.dtype for _, p in named}) != 1:
            raise ValueError("all trainable parameters must share one dtype to live in one flat buffer.")
        if isinstance(communicate, str):
            if communicate not in ("trainable", "all"):
                raise ValueError(f"`communicate` must be 'trainable', 'all' or a list of globs, got {communicate!r}.")
            comm = {n for n, _ in named}
        else:
            comm = {n for n, _ in named if any(fnmatch.fnmatchcase(n, pat) for pat in communicate)}
            if not comm:
                raise ValueError(f"`communicate` patterns {communicate} match no trainable parameter.")
        ordered = [x for x in named if x[0] in comm] + [x for x in named if x[0] not in comm]
        self.d = sum(p.numel() for _, p in named)
        self.d_comm = sum(p.numel() for n, p in named if n in comm)
        ref = named[0][1]
        self.X = torch.empty(n_local, self.d, dtype=ref.dtype, device=ref.device)
        slots = []
        offset = 0
        with torch.no_grad():
            for name, p in ordered:
                slot = StackSlot(name, tuple(p.shape), offset, p.numel(), name in comm)
                view = self.X[:, offset : offset + p.numel()]
                view.copy_(p.detach().reshape(1, -1).expand(n_local, -1))
                _set_submodule_param(module, name, nn.Parameter(view.view(n_local, *p.shape)))
                slots.append(slot)
                offset += p.numel()
        self.layout: list[StackSlot] = slots
        self._adapter = _ClientAdapter(module)

    # ----------------------------------------------------------------------------------------------- parameters
    def parameters(self) -> list[nn.Parameter]:
        """The stacked parameters in layout order (each ``[n_local, *S]``, a view of :attr:`X`)."""
        return [self.module.get_parameter(s.name) for s in self.layout]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.layout]

    def unflatten(self, x: Tensor) -> dict[str, Tensor]:
        """Split rows ``x`` of shape ``[..., d]`` into ``{name: [..., *S]}`` (works under ``vmap``)."""
        lead = x.shape[:-1]
        return {s.name: x[..., s.offset : s.offset + s.numel].reshape(*lead, *s.shape) for s in self.layout}

    def flatten(self, tensors: dict[str, Tensor]) -> Tensor:
        """Inverse of :meth:`unflatten`: ``{name: [m, *S]}`` to rows ``[m, d]``."""
        return torch.cat([tensors[s.name].reshape(tensors[s.name].shape[0], -1) for s in self.layout], dim=1)

    def grads_flat(self) -> Tensor:
        """Copy the stacked parameters' ``.grad`` into one ``[n_local, d]`` tensor (zeros where ``.grad`` is None)."""
        G = torch.zeros_like(self.X)
        for s, p in zip(self.layout, self.parameters()):
            if p.grad is not None:
                G[:, s.offset : s.offset + s.numel] = p.grad.reshape(self.n_local, -1)
        return G

    def write_grads(self, G: Tensor) -> None:
        """Set every stacked parameter's ``.grad`` from the flat gradient ``G`` of shape ``[n_local, d]``."""
        for s, p in zip(self.layout, self.parameters()):
            p.grad = G[:, s.offset : s.offset + s.numel].reshape(p.shape).clone()

    # ----------------------------------------------------------------------------------------------- evaluation
    def _call(self, hook: str) -> Callable[[Tensor, Any], Any]:
        def f(x: Tensor, batch: Any) -> Any:
            params = {f"module.{k}": v for k, v in self.unflatten(x).items()}
            return functional_call(self._adapter, params, (batch, hook))

        return f

    def _map(self, fn: Callable[[Tensor, Any], Any], rows: Tensor, batch: Any) -> Any:
        if self.execution == "vmap":
            return vmap(fn, in_dims=(0, 0), randomness="different", chunk_size=self.chunk_size)(rows, batch)
        outs = [fn(rows[i], tree_map(lambda t, i=i: t[i], batch)) for i in range(rows.shape[0])]
        return tree_map(lambda *xs: torch.stack(xs), *outs)

    def loss_and_grad(self, rows: Tensor, batch: Any) -> tuple[Tensor, Tensor]:
        """Per-row gradients and losses of ``client_loss``.

        Args:
            rows: Flat parameters ``[m, d]`` (clients, or CoBo's pair midpoints). Treated as constants.
            batch: Stacked batch whose tensors have leading dimension ``m`` (row ``k`` uses ``batch[.][k]``).

        Returns:
            ``(G, losses)``: gradients ``[m, d]`` and mean losses ``[m]``.
        """

        def lossfn(x: Tensor, b: Any) -> Tensor:
            return self._call("client_loss")(x, b)

        G, losses = self._map(grad_and_value(lossfn), rows.detach(), batch)
        return G, losses

    def losses(self, rows: Tensor, batch: Any) -> Tensor:
        """``client_loss`` per row (no gradient): ``[m]`` for rows ``[m, d]`` and a stacked batch."""
        with torch.no_grad():
            return self._map(self._call("client_loss"), rows.detach(), batch)

    def metrics(self, rows: Tensor, batch: Any) -> dict[str, Tensor]:
        """``client_metrics`` per row: ``{name: [m]}`` sums for rows ``[m, d]`` and a stacked batch."""
        with torch.no_grad():
            return self._map(self._call("client_metrics"), rows.detach(), batch)

    def row_state_dict(self, row: Tensor) -> dict[str, Tensor]:
        """One client's trainable tensors (``{name: [*S]}``) from a flat row ``[d]``."""
        return {k: v.detach().clone() for k, v in self.unflatten(row).items()}
