"""Communication topologies and mixing matrices
==============================================

Pure-tensor graph builders, mixing rules, validity checks and spectral quantities for gossip-style collaborative
learning (decentralized SGD, Decor, CoBo's consensus step). No Lightning import.

A :class:`Topology` is an undirected simple graph (symmetric boolean adjacency, no self-loops). A *mixing matrix*
``W`` ([n, n], float64) is supported on the edges plus the diagonal; for gossip averaging it must be nonnegative,
symmetric and doubly stochastic, and the graph it induces must be connected so that repeated mixing
``X <- W X`` converges to the mean at the linear rate ``lambda = ||W - 11^T/n||_2 = 1 - spectral_gap``
(Boyd et al., "Randomized gossip algorithms", IEEE TIT 2006; Xiao & Boyd, "Fast linear iterations for distributed
averaging", 2004).

API notes:

* ``Topology.torus(rows, cols=None)``: with ``cols=None`` the first argument is the *number of nodes*, which must be
  a perfect square (``torus(16)`` is the 4x4 torus); with ``cols`` given it is a ``rows x cols`` torus.
* ``Topology`` defines ``__eq__``/``__hash__`` itself (a generated dataclass ``__eq__`` cannot compare tensors).
* ``check_mixing_matrix`` adds two keyword-only extensions: ``connected`` (default ``True``) and ``name``
  (default ``"W"``), the argument name used in error messages so a caller can report its own argument.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "MixingReport",
    "Topology",
    "check_mixing_matrix",
    "mixing_contraction",
    "mixing_matrix",
    "spectral_gap",
]


def _bfs_components(adjacency: Tensor) -> list[list[int]]:
    """Connected components of a symmetric boolean adjacency matrix, in order of their smallest node."""
    n = adjacency.shape[0]
    neighbours = [torch.nonzero(adjacency[i], as_tuple=False).flatten().tolist() for i in range(n)]
    seen = [False] * n
    components: list[list[int]] = []
    for start in range(n):
        if seen[start]:
            continue
        seen[start] = True
        queue, comp = deque([start]), []
        while queue:
            i = queue.popleft()
            comp.append(i)
            for j in neighbours[i]:
                if not seen[j]:
                    seen[j] = True
                    queue.append(j)
        components.append(sorted(comp))
    return components


@dataclass(frozen=True)
class Topology:
    """An undirected communication graph without self-loops.

    Args:
        adjacency: ``[n, n]`` boolean (or 0/1) symmetric matrix with a zero diagonal. Stored as a CPU bool tensor.
        name: A label (``"ring"``, ``"torus"``, ``"complete"``, ``"erdos_renyi"``, ``"custom"``).

    Raises:
        ValueError: If ``adjacency`` is not a square 2-D matrix, is not symmetric, has self-loops, or has entries
            other than 0/1.
    """

    adjacency: Tensor
    name: str = "custom"

    def __post_init__(self) -> None:
        a = torch.as_tensor(self.adjacency)
        if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 1:
            raise ValueError(f"`adjacency` must be a non-empty square [n, n] matrix, got shape {tuple(a.shape)}.")
        if a.dtype != torch.bool:
            if not bool(((a == 0) | (a == 1)).all()):
                raise ValueError("`adjacency` must contain only 0/1 (or booleans).")
            a = a != 0
        a = a.detach().cpu().clone()
        if bool(a.diagonal().any()):
            i = int(torch.nonzero(a.diagonal())[0])
            raise ValueError(f"`adjacency` must have no self-loops, got adjacency[{i}, {i}] = True.")
        asym = a != a.T
        if bool(asym.any()):
            i, j = torch.nonzero(asym)[0].tolist()
            raise ValueError(
                f"`adjacency` must be symmetric (undirected graph); adjacency[{i}, {j}] != adjacency[{j}, {i}]."
            )
        object.__setattr__(self, "adjacency", a)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Topology):
            return NotImplemented
        return self.name == other.name and torch.equal(self.adjacency, other.adjacency)

    def __hash__(self) -> int:
        return hash((self.name, self.n, bytes(self.adjacency.to(torch.uint8).flatten().tolist())))

    # ------------------------------------------------------------------ builders
    @classmethod
    def ring(cls, n: int) -> Topology:
        """Cycle graph ``i ~ i +- 1 (mod n)``.

        Raises:
            ValueError: If ``n < 3`` (smaller rings would need multi-edges or self-loops).
        """
        if n < 3:
            raise ValueError(f"`n` must be >= 3 for a ring, got {n}.")
        a = torch.zeros(n, n, dtype=torch.bool)
        idx = torch.arange(n)
        a[idx, (idx + 1) % n] = True
        a[(idx + 1) % n, idx] = True
        return cls(a, name="ring")

    @classmethod
    def torus(cls, rows: int, cols: int | None = None) -> Topology:
        """2-D torus (grid with wrap-around), every node of degree 4.

        Args:
            rows: Number of rows; when ``cols`` is ``None`` this is the total number of nodes, which must be a
                perfect square.
            cols: Number of columns, or ``None`` for a square torus.

        Raises:
            ValueError: If ``cols`` is ``None`` and ``rows`` is not a perfect square, or a side is below 3
                (wrap-around would create multi-edges).
        """
        if cols is None:
            side = math.isqrt(max(rows, 0))
            if side * side != rows:
                raise ValueError(f"`cols` is None, so the number of nodes `rows`={rows} must be a perfect square.")
            rows = cols = side
        if rows < 3 or cols < 3:
            raise ValueError(f"a torus needs `rows` >= 3 and `cols` >= 3, got rows={rows}, cols={cols}.")
        n = rows * cols
        a = torch.zeros(n, n, dtype=torch.bool)
        for r in range(rows):
            for c in range(cols):
                i = r * cols + c
                for j in (((r + 1) % rows) * cols + c, r * cols + (c + 1) % cols):
                    a[i, j] = a[j, i] = True
        return cls(a, name="torus")

    @classmethod
    def complete(cls, n: int) -> Topology:
        """Complete graph on ``n >= 1`` nodes.

        Raises:
            ValueError: If ``n < 1``.
        """
        if n < 1:
            raise ValueError(f"`n` must be >= 1, got {n}.")
        return cls(~torch.eye(n, dtype=torch.bool), name="complete")

    @classmethod
    def erdos_renyi(cls, n: int, p: float, seed: int = 0, max_tries: int = 100) -> Topology:
        """Connected Erdős–Rényi graph G(n, p), re-drawn until connected.

        Each unordered pair is an edge independently with probability ``p``; draws come from a
        ``torch.Generator`` seeded with ``seed`` (deterministic). Connectivity needs roughly ``p > ln(n)/n``.

        Raises:
            ValueError: If ``n < 1``, ``p`` is outside ``(0, 1]``, ``max_tries < 1``, or no connected graph was drawn
                in ``max_tries`` attempts.
        """
        if n < 1:
            raise ValueError(f"`n` must be >= 1, got {n}.")
        if not 0.0 < p <= 1.0:
            raise ValueError(f"`p` must be in (0, 1], got {p}.")
        if max_tries < 1:
            raise ValueError(f"`max_tries` must be >= 1, got {max_tries}.")
        gen = torch.Generator().manual_seed(seed)
        upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
        for _ in range(max_tries):
            a = (torch.rand(n, n, generator=gen, dtype=torch.float64) < p) & upper
            topo = cls(a | a.T, name="erdos_renyi")
            if topo.is_connected():
                return topo
        raise ValueError(
            f"no connected Erdős–Rényi graph G(n={n}, p={p}) in `max_tries`={max_tries} draws; "
            f"use `p` above ln(n)/n = {math.log(max(n, 2)) / n:.3f}."
        )

    @classmethod
    def from_adjacency(cls, adjacency: Tensor) -> Topology:
        """Wrap a user adjacency matrix (``[n, n]``, symmetric, zero diagonal) as a ``"custom"`` topology."""
        return cls(torch.as_tensor(adjacency), name="custom")

    @classmethod
    def from_mixing_matrix(cls, W: Tensor, atol: float = 1e-12) -> Topology:
        """The graph supporting a mixing matrix: an edge ``i ~ j`` wherever ``|W_ij| > atol`` or ``|W_ji| > atol``.

        Raises:
            ValueError: If ``W`` is not a square 2-D matrix.
        """
        w = torch.as_tensor(W).detach().cpu().to(torch.float64)
        if w.ndim != 2 or w.shape[0] != w.shape[1]:
            raise ValueError(f"`W` must be a square [n, n] matrix, got shape {tuple(w.shape)}.")
        support = (w.abs() > atol) | (w.abs() > atol).T
        support.fill_diagonal_(False)
        return cls(support, name="custom")

    # ---------------------------------------------------------------- properties
    @property
    def n(self) -> int:
        """Number of nodes."""
        return int(self.adjacency.shape[0])

    @property
    def degrees(self) -> Tensor:
        """``[n]`` int64 node degrees."""
        return self.adjacency.sum(dim=1)

    @property
    def edges(self) -> list[tuple[int, int]]:
        """Undirected edges as ``(i, j)`` with ``i < j``, in lexicographic order."""
        return [tuple(e) for e in torch.nonzero(torch.triu(self.adjacency, diagonal=1)).tolist()]

    def neighbours(self, i: int) -> tuple[int, ...]:
        """Sorted neighbours of node ``i`` (excluding ``i``)."""
        return tuple(torch.nonzero(self.adjacency[i]).flatten().tolist())

    def laplacian(self) -> Tensor:
        """Graph Laplacian ``L = D - A`` ([n, n], float64)."""
        a = self.adjacency.to(torch.float64)
        return torch.diag(a.sum(dim=1)) - a

    def algebraic_connectivity(self) -> float:
        """Fiedler value ``lambda_2(L)`` (0 for a disconnected graph; 0 for ``n = 1``)."""
        if self.n == 1:
            return 0.0
        return float(torch.linalg.eigvalsh(self.laplacian())[1])

    def components(self) -> list[list[int]]:
        """Connected components (sorted node lists, ordered by smallest node)."""
        return _bfs_components(self.adjacency)

    def is_connected(self) -> bool:
        """Whether the graph is connected (breadth-first search)."""
        return len(self.components()) == 1

    def subgraph(self, nodes: Sequence[int]) -> Topology:
        """Induced subgraph on ``nodes``, relabelled ``0..len(nodes)-1`` in the given order."""
        idx = torch.as_tensor(list(nodes), dtype=torch.long)
        return Topology(self.adjacency[idx][:, idx], name=f"{self.name}_sub")


# ------------------------------------------------------------------ mixing rules
def mixing_matrix(t: Topology, rule: Literal["uniform", "metropolis_hastings"] = "uniform") -> Tensor:
    """Symmetric doubly-stochastic gossip weights on a topology.

    * ``"uniform"`` (max-degree rule): ``W_ij = 1/(d_max + 1)`` on edges. Gives ``1/3`` on a ring, ``1/5`` on a
      torus and ``11^T/n`` on the complete graph.
    * ``"metropolis_hastings"``: ``W_ij = 1/(max(d_i, d_j) + 1)`` on edges (Xiao, Boyd & Kim 2007, eq. 11 with
      the "+1" lazy variant); better for irregular graphs such as Erdős–Rényi.

    In both cases ``W_ii = 1 - sum_{j != i} W_ij`` and ``W_ij = 0`` off the graph.

    Args:
        t: The topology.
        rule: The weighting rule.

    Returns:
        ``[n, n]`` float64 tensor.

    Raises:
        ValueError: If ``rule`` is unknown.
    """
    a = t.adjacency.to(torch.float64)
    deg = a.sum(dim=1)
    if rule == "uniform":
        w = a / (deg.max() + 1.0)
    elif rule == "metropolis_hastings":
        w = a / (torch.maximum(deg[:, None], deg[None, :]) + 1.0)
    else:
        raise ValueError(f"`rule` must be 'uniform' or 'metropolis_hastings', got {rule!r}.")
    return w + torch.diag(1.0 - w.sum(dim=1))


# ------------------------------------------------------------ spectral quantities
def spectral_gap(W: Tensor) -> float:
    """Spectral gap ``1 - max(|lambda_2(W)|, |lambda_n(W)|)`` of a stochastic matrix.

    For a symmetric ``W`` the eigenvalues come from ``eigvalsh``; otherwise the gap is ``1 -`` the second-largest
    eigenvalue modulus. A gap ``> 0`` means gossip with ``W`` converges to consensus. ``n = 1`` gives ``1``.

    Args:
        W: ``[n, n]`` mixing matrix.
    """
    w = torch.as_tensor(W).detach().cpu().to(torch.float64)
    if w.shape[0] == 1:
        return 1.0
    if torch.allclose(w, w.T, atol=1e-12, rtol=0):
        moduli = torch.linalg.eigvalsh(w).abs()
    else:
        moduli = torch.linalg.eigvals(w).abs()
    return float(1.0 - torch.sort(moduli, descending=True).values[1])


def mixing_contraction(W: Tensor) -> float:
    """Per-step contraction factor ``lambda = ||W - 11^T/n||_2`` of gossip averaging.

    For doubly-stochastic ``W``: ``||W^t X - Xbar|| <= lambda^t ||X - Xbar||`` (Xiao & Boyd 2004).

    Args:
        W: ``[n, n]`` mixing matrix.
    """
    w = torch.as_tensor(W).detach().cpu().to(torch.float64)
    n = w.shape[0]
    return float(torch.linalg.matrix_norm(w - torch.full_like(w, 1.0 / n), ord=2))


@dataclass(frozen=True)
class MixingReport:
    """Result of :func:`check_mixing_matrix`.

    Attributes:
        n: Number of nodes.
        symmetric: Whether ``W`` equals ``W^T`` within ``atol``.
        max_row_error: ``max_i |sum_j W_ij - 1|``.
        max_col_error: ``max_j |sum_i W_ij - 1|``.
        algebraic_connectivity: ``lambda_2`` of the Laplacian of ``W``'s support graph.
        spectral_gap: ``1 - max(|lambda_2(W)|, |lambda_n(W)|)``.
    """

    n: int
    symmetric: bool
    max_row_error: float
    max_col_error: float
    algebraic_connectivity: float
    spectral_gap: float


def check_mixing_matrix(
    W: Tensor,
    topology: Topology | None = None,
    *,
    symmetric: bool = True,
    doubly_stochastic: bool = True,
    atol: float = 1e-10,
    connected: bool = True,
    name: str = "W",
) -> MixingReport:
    """Validate a gossip mixing matrix and report its spectral quantities.

    Checks, in order (each failure raises ``ValueError`` naming ``name``, the property and the worst entry):
    square and finite; nonnegative; support within ``topology``'s edges plus the diagonal (when given); symmetric
    (when ``symmetric``); rows sum to 1, and columns too (when ``doubly_stochastic``); the support graph is
    connected (when ``connected``; BFS, reporting ``lambda_2(L)``).

    Args:
        W: ``[n, n]`` mixing matrix.
        topology: The graph ``W`` must live on, or ``None`` to skip the support check.
        symmetric: Require ``W == W^T``.
        doubly_stochastic: Require column sums of 1 as well as row sums (rows are always checked).
        atol: Absolute tolerance of every equality check.
        connected: Require the support graph to be connected.
        name: Argument name used in error messages.

    Returns:
        A :class:`MixingReport`.

    Raises:
        ValueError: On the first failed check.
    """
    w = torch.as_tensor(W).detach().cpu().to(torch.float64)
    if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] < 1:
        raise ValueError(f"`{name}` must be a non-empty square [n, n] matrix, got shape {tuple(w.shape)}.")
    n = w.shape[0]
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"`{name}` must be finite, got NaN/inf entries.")
    if bool((w < -atol).any()):
        i, j = divmod(int(torch.argmin(w)), n)
        raise ValueError(f"`{name}` must be nonnegative; worst entry {name}[{i}, {j}] = {float(w[i, j]):.3g}.")
    if topology is not None:
        if topology.n != n:
            raise ValueError(f"`{name}` is {n}x{n} but `topology` has {topology.n} nodes.")
        allowed = topology.adjacency | torch.eye(n, dtype=torch.bool)
        off = w.abs().masked_fill(allowed, 0.0)
        if bool((off > atol).any()):
            i, j = divmod(int(torch.argmax(off)), n)
            raise ValueError(
                f"`{name}` has weight outside the topology's edges: {name}[{i}, {j}] = {float(w[i, j]):.3g} "
                f"but ({i}, {j}) is not an edge."
            )
    asym = (w - w.T).abs()
    is_sym = bool((asym <= atol).all())
    if symmetric and not is_sym:
        i, j = divmod(int(torch.argmax(asym)), n)
        raise ValueError(
            f"`{name}` must be symmetric; worst entry |{name}[{i}, {j}] - {name}[{j}, {i}]| = {float(asym[i, j]):.3g}."
        )
    row_err = (w.sum(dim=1) - 1.0).abs()
    col_err = (w.sum(dim=0) - 1.0).abs()
    if bool((row_err > atol).any()):
        i = int(torch.argmax(row_err))
        raise ValueError(f"rows of `{name}` must sum to 1; row {i} sums to {float(w[i].sum()):.12g}.")
    if doubly_stochastic and bool((col_err > atol).any()):
        j = int(torch.argmax(col_err))
        raise ValueError(
            f"`{name}` must be doubly stochastic (columns sum to 1); column {j} sums to {float(w[:, j].sum()):.12g}."
        )
    support = Topology.from_mixing_matrix(w, atol=atol)
    lam2 = support.algebraic_connectivity()
    if connected:
        comps = support.components()
        if len(comps) > 1:
            raise ValueError(
                f"`{name}` must describe a connected graph; its support has {len(comps)} components "
                f"(first: {comps[0][:10]}), lambda_2(L) = {lam2:.3g}."
            )
    return MixingReport(
        n=n,
        symmetric=is_sym,
        max_row_error=float(row_err.max()),
        max_col_error=float(col_err.max()),
        algebraic_connectivity=lam2,
        spectral_gap=spectral_gap(w),
    )
