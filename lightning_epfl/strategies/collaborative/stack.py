"""Client stack
==============

Stacks the trainable parameters of a one-client module over ``n_local`` clients: every trainable tensor of shape ``S``
becomes an ``nn.Parameter`` of shape ``[n_local, *S]`` that is a *view* of one flat buffer ``X`` of shape
``[n_local, d]`` (communicated tensors first), so that optimizer updates land in ``X`` and mixing is a single matrix
product on ``X[:, :d_comm]``. Frozen parameters and buffers are not stacked: one copy serves every client (passed
unbatched to ``vmap``), so a frozen base model under per-client adapters costs one copy. Client losses, gradients and
metrics are evaluated with ``torch.func.functional_call`` either vectorized over clients (``vmap``) or in a Python
loop (the reference). Batches are any pytree (tuples or dicts) of tensors with a leading client dimension.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from lightning_epfl.seeding import derive_seed


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


def _structure(batch: Any) -> str:
    if isinstance(batch, dict):
        return "dict with keys " + str(sorted(batch))
    if isinstance(batch, (tuple, list)):
        return f"{type(batch).__name__} of {len(batch)} tensors"
    return type(batch).__name__


def _has_mask(batch: Any) -> bool:
    return (isinstance(batch, dict) and "mask" in batch) or (isinstance(batch, (tuple, list)) and len(batch) > 2)


def _with_mask(batch: Any, mask: Tensor) -> Any:
    if isinstance(batch, dict):
        return {**batch, "mask": mask}
    return (*batch[:2], mask)


def stack_client_batches(batches: Sequence[Any], force_mask: bool = False) -> Any:
    """Stack per-client batches into one batch with a leading client dimension.

    Every client's batch has the same structure: a tuple ``(x, y)`` / ``(x, y, mask)``, or a dict of tensors (an
    optional ``"mask"`` entry). The first dimension of every tensor is the example dimension. Batches of unequal
    length are padded to the longest by repeating their first example, and a float mask ``[n, B_max]`` (1 real,
    0 padding) is added (the third tuple element, or the ``"mask"`` key); an existing mask is padded with zeros.

    Args:
        batches: One batch per client.
        force_mask: Add the mask even when no padding is needed.

    Returns:
        The stacked batch, of the same structure, with tensors ``[n, B, ...]``.

    Raises:
        ValueError: If the clients' batches differ in structure (e.g. dict keys), or the tensors of one batch
            differ in their example dimension.
    """
    if not batches:
        raise ValueError("no client batch to stack.")
    leaves0, spec0 = tree_flatten(batches[0])
    flat = []
    for c, b in enumerate(batches):
        leaves, spec = tree_flatten(b)
        if spec != spec0:
            raise ValueError(
                f"client batches differ in structure: client 0 gives a {_structure(batches[0])}, client {c} a "
                f"{_structure(b)}; every client's batch must have the same keys."
            )
        sizes = {int(t.shape[0]) for t in leaves}
        if len(sizes) != 1:
            raise ValueError(f"client {c}'s batch mixes example dimensions {sorted(sizes)}.")
        flat.append(leaves)
    lengths = [int(leaves[0].shape[0]) for leaves in flat]
    masked = _has_mask(batches[0])
    if not masked and not force_mask and len(set(lengths)) == 1:
        return tree_unflatten([torch.stack(ts) for ts in zip(*flat)], spec0)
    if not masked:
        batches = [_with_mask(b, torch.ones(n, dtype=torch.float32, device=flat[c][0].device))
                   for c, (b, n) in enumerate(zip(batches, lengths))]  # fmt: skip
        flat = [tree_flatten(b)[0] for b in batches]
        spec0 = tree_flatten(batches[0])[1]
    mask_pos = _mask_position(batches[0])
    longest = max(lengths)
    padded = []
    for leaves, n in zip(flat, lengths):
        out = []
        for k, t in enumerate(leaves):
            if n < longest:
                fill = torch.zeros_like(t[:1]) if k == mask_pos else t[:1]
                t = torch.cat([t, fill.expand(longest - n, *t.shape[1:])])
            out.append(t)
        padded.append(out)
    return tree_unflatten([torch.stack(ts) for ts in zip(*padded)], spec0)


def _mask_position(batch: Any) -> int:
    """Index of the mask among the flattened leaves of a masked batch."""
    if isinstance(batch, dict):
        return sorted(batch).index("mask")
    return 2


def _independent_init(module: nn.Module, trainable: set[str], seed: int) -> dict[str, Tensor]:
    """Fresh values of the trainable tensors: each owning module's init, under ``torch.manual_seed(seed)``.

    The module keeps its weights (they are restored); the global RNG is left as it was.
    """
    backup = {n: p.detach().clone() for n, p in module.named_parameters()}
    done: set[str] = set()
    skip: set[int] = set()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for prefix, m in module.named_modules():
            if id(m) in skip:
                continue
            if hasattr(m, "reset_lora_parameters") and hasattr(m, "lora_A"):  # peft LoRA layer: A random, B zero
                for adapter in list(m.lora_A.keys()):
                    m.reset_lora_parameters(adapter, True)
                for sub_prefix, sub in m.named_modules():
                    if sub_prefix.startswith(("lora_", "lora_A", "lora_B")):
                        skip.add(id(sub))
                        done.update(
                            f"{prefix}.{sub_prefix}.{n}".lstrip(".") for n, _ in sub.named_parameters(recurse=False)
                        )
                continue
            own = [n for n, _ in m.named_parameters(recurse=False)]
            names = {f"{prefix}.{n}".lstrip(".") for n in own}
            if own and names <= trainable and hasattr(m, "reset_parameters"):
                m.reset_parameters()
                done |= names
        missing = sorted(trainable - done)
        if missing:
            raise ValueError(
                f"`client_init='independent'` cannot re-initialize {missing[:3]}: their modules have no "
                "`reset_parameters()` (or also hold frozen tensors); use `client_init='same'`."
            )
        values = {n: p.detach().clone() for n, p in module.named_parameters() if n in trainable}
        for n, p in module.named_parameters():
            p.copy_(backup[n])
    return values


def _example_mask(batch: Any, like: Tensor) -> Tensor:
    """One client's padding mask ``[B]`` (ones without one)."""
    if isinstance(batch, dict) and "mask" in batch:
        return batch["mask"].to(like.dtype)
    if isinstance(batch, (tuple, list)) and len(batch) > 2:
        return batch[2].to(like.dtype)
    return torch.ones_like(like)


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
        client_ids: The clients of the rows (default ``0..n_local-1``); seeds ``client_init="independent"``.
        client_init: ``"same"`` (every row starts from the module's current weights) or ``"independent"`` (row of
            client ``c`` re-initialized by its modules' ``reset_parameters()``, peft LoRA layers by
            ``reset_lora_parameters``, under a generator seeded by ``(seed, c)``: the same in every process layout).
        seed: Seed of ``client_init="independent"``.

    Raises:
        ValueError: If ``n_local < 1``, the module has no trainable parameter, dtypes differ, ``execution`` is unknown,
            a ``communicate`` pattern matches nothing, or ``client_init="independent"`` meets a trainable tensor whose
            module cannot re-initialize it.
    """

    def __init__(
        self,
        module: nn.Module,
        n_local: int,
        communicate: Literal["trainable", "all"] | list[str] = "trainable",
        execution: Literal["vmap", "loop"] = "vmap",
        chunk_size: int | None = None,
        client_ids: Sequence[int] | None = None,
        client_init: Literal["same", "independent"] = "same",
        seed: int = 0,
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
        ids = list(range(n_local)) if client_ids is None else [int(i) for i in client_ids]
        if client_init not in ("same", "independent"):
            raise ValueError(f"`client_init` must be 'same' or 'independent', got {client_init!r}.")
        rows: list[dict[str, Tensor]] | None = None
        if client_init == "independent":
            rows = [_independent_init(module, {n for n, _ in named}, derive_seed(seed, "client_init", c)) for c in ids]
        slots = []
        offset = 0
        with torch.no_grad():
            for name, p in ordered:
                slot = StackSlot(name, tuple(p.shape), offset, p.numel(), name in comm)
                view = self.X[:, offset : offset + p.numel()]
                if rows is None:
                    view.copy_(p.detach().reshape(1, -1).expand(n_local, -1))
                else:
                    view.copy_(torch.stack([r[name].reshape(-1) for r in rows]))
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
        if rows.shape[0] == 1:  # one client: no batching over clients needed (and vmap's overhead avoided)
            out = fn(rows[0], tree_map(lambda t: t[0], batch))
            return tree_map(lambda t: t.unsqueeze(0), out)
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

        def lossfn(params: dict[str, Tensor], b: Any) -> Tensor:
            named = {f"module.{k}": v for k, v in params.items()}
            return functional_call(self._adapter, named, (b, "client_loss"))

        def one(x: Tensor, b: Any) -> tuple[Tensor, Tensor]:
            # differentiating the per-tensor views (not the flat row) spares a zero-filled [d] gradient per tensor
            grads, loss = grad_and_value(lossfn)(self.unflatten(x), b)
            return torch.cat([grads[s.name].reshape(-1) for s in self.layout]), loss

        G, losses = self._map(one, rows.detach(), batch)
        return G, losses

    def clipped_example_grad_sum(self, rows: Tensor, batch: Any, clip_norm: float) -> tuple[Tensor, Tensor]:
        """Sum over each client's examples of the per-example gradients clipped at norm ``clip_norm``.

        ``sum_x g_x min(1, C / ||g_x||)`` over the real examples (``mask`` 1) of each row's batch, computed tensor by
        tensor: the norms are accumulated over the parameter tensors and the ``[m, B, d]`` flat per-example gradients
        are never formed (the per-tensor ones are, as in Opacus).

        Args:
            rows: Flat parameters ``[m, d]`` (constants).
            batch: Stacked batch with leading dimensions ``[m, B]`` (an optional mask: third tuple element or
                ``"mask"`` key).
            clip_norm: ``C > 0``.

        Returns:
            ``(G [m, d], losses [m, B])``.
        """

        def one(params: dict[str, Tensor], example: Any) -> Tensor:
            named = {f"module.{k}": v for k, v in params.items()}
            return functional_call(self._adapter, named, (tree_map(lambda t: t.unsqueeze(0), example), "client_loss"))

        per_example = vmap(grad_and_value(one), in_dims=(None, 0))

        def client(x: Tensor, b: Any) -> tuple[Tensor, Tensor]:
            grads, losses = per_example(self.unflatten(x), b)
            sq = sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads.values())
            scale = (clip_norm / sq.sqrt().clamp_min(1e-12)).clamp_max(1.0) * _example_mask(b, losses)
            flat = [torch.einsum("b,b...->...", scale, grads[s.name]).reshape(-1) for s in self.layout]
            return torch.cat(flat), losses

        return self._map(client, rows.detach(), batch)

    def losses(self, rows: Tensor, batch: Any) -> Tensor:
        """``client_loss`` per row (no gradient): ``[m]`` for rows ``[m, d]`` and a stacked batch."""
        with torch.no_grad():
            return self._map(self._call("client_loss"), rows.detach(), batch)

    def metrics(self, rows: Tensor, batch: Any) -> dict[str, Tensor]:
        """``client_metrics`` per row: ``{name: [m]}`` sums for rows ``[m, d]`` and a stacked batch."""
        with torch.no_grad():
            return self._map(self._call("client_metrics"), rows.detach(), batch)

    def call(self, hook: str, rows: Tensor, batch: Any, transform: Callable[[Any], Any] | None = None) -> Any:
        """A client hook (a module method taking one batch) per row, without gradient.

        Args:
            hook: Name of the module method, e.g. ``"client_logits"``.
            rows: Flat parameters ``[m, d]``.
            batch: Stacked batch with leading dimension ``m``.
            transform: Applied to each row's output inside the map (e.g. a top-k that keeps the full output of all
                rows from being materialized at once).

        Returns:
            The (transformed) outputs stacked over rows.
        """
        f = self._call(hook)
        g = f if transform is None else (lambda x, b: transform(f(x, b)))
        with torch.no_grad():
            return self._map(g, rows.detach(), batch)

    def row_state_dict(self, row: Tensor) -> dict[str, Tensor]:
        """One client's trainable tensors (``{name: [*S]}``) from a flat row ``[d]``."""
        return {k: v.detach().clone() for k, v in self.unflatten(row).items()}
