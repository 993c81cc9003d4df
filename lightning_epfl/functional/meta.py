"""Meta-gradients for gradient-based meta-learning
=================================================

Pure, ``torch.func``-based and Lightning-free per-task meta-gradients for MAML-type meta-learning.

Setting (Finn et al., 2017, arXiv:1703.03400): task ``i`` has a support loss ``f_i^s`` and a query loss ``f_i^q``; the
meta-parameters ``x`` are adapted by ``K`` inner gradient steps ``x^{k+1} = x^k - alpha * grad f_i^s(x^k)``, ending at
``U_i(x) = x^K``. The meta-objective is ``F(x) = mean_i f_i^q(U_i(x))`` and its exact gradient is
``grad F_i = J_i^T g_i`` with ``g_i = grad f_i^q(U_i(x))`` and ``J_i = (I - alpha H^{K-1}) ... (I - alpha H^0)``.

Every ``*_task_grad`` function has the signature
``(net, params, buffers, support_x, support_y, query_x, query_y, *, loss, inner_lr, inner_steps, ...)`` and returns
``(d_i, stats)``: a per-task meta-gradient estimate ``d_i`` (a dict shaped like ``params``) and a dict of scalar
statistics (``support_loss_pre``, ``query_loss_post``). They are vmappable over tasks; :func:`batched_task_grad`
averages them over a batch of tasks with ``torch.func.vmap`` (or a plain per-task loop, the reference).

Algorithms:

- :func:`maml_task_grad`: exact (second-order) MAML, nesting ``torch.func.grad``.
- :func:`fomaml_task_grad`: first-order MAML, ``d_i = g_i`` (biased).
- :func:`reptile_task_grad`: Reptile (Nichol et al., 2018, arXiv:1803.02999), ``d_i = (x - phi_i) / (alpha K_r)``.
- :func:`fo_b_maml_task_grad`: the first-order method of Chayti & Jaggi (2024, arXiv:2409.03682; "FO-B-MAML"):
  ``J_i^T g_i`` by a reverse sweep whose Hessian-vector products are finite differences of support gradients along
  the current vector (forward or symmetric); at ``K = 1`` the symmetric form coincides with HF-MAML
  (Fallah et al., 2020, arXiv:1908.10400).

Closed forms for quadratic task families (:func:`quadratic_maml_gradient`, :func:`quadratic_maml_solution`,
:func:`quadratic_fomaml_fixed_point`) serve as references.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, vmap

__all__ = [
    "ALGORITHMS",
    "LossFn",
    "adapt_and_predict",
    "batched_task_grad",
    "fo_b_maml_task_grad",
    "fomaml_task_grad",
    "inner_adapt",
    "maml_task_grad",
    "quadratic_fomaml_fixed_point",
    "quadratic_maml_gradient",
    "quadratic_maml_solution",
    "reptile_task_grad",
    "resolve_loss",
    "task_grad_fn",
    "task_loss",
    "tree_norm",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
Params = dict[str, Tensor]

_NORM_EPS = 1e-12


def _mse(pred: Tensor, target: Tensor) -> Tensor:
    if pred.shape != target.shape:
        raise ValueError(
            f"loss='mse' needs predictions and targets of the same shape, got {tuple(pred.shape)} and "
            f"{tuple(target.shape)} (per task)."
        )
    return F.mse_loss(pred, target)


def _cross_entropy(pred: Tensor, target: Tensor) -> Tensor:
    if pred.ndim != 2 or target.shape != pred.shape[:1]:
        raise ValueError(
            "loss='cross_entropy' needs logits of shape (N, C) and integer labels of shape (N,), got "
            f"{tuple(pred.shape)} and {tuple(target.shape)} (per task)."
        )
    return F.cross_entropy(pred, target)


_LOSSES: dict[str, LossFn] = {"mse": _mse, "cross_entropy": _cross_entropy}


def resolve_loss(loss: str | LossFn) -> LossFn:
    """Return the per-task loss function for a name (``"mse"``, ``"cross_entropy"``) or a callable.

    Args:
        loss: ``"mse"`` (mean squared error, prediction and target shapes must be equal), ``"cross_entropy"`` (logits
            ``(N, C)``, labels ``(N,)``) or a callable ``(pred, target) -> scalar``.

    Raises:
        ValueError: If ``loss`` is an unknown name.
    """
    if callable(loss):
        return loss
    if loss not in _LOSSES:
        raise ValueError(f"`loss` must be one of {sorted(_LOSSES)} or a callable, got {loss!r}.")
    return _LOSSES[loss]


def task_loss(net: nn.Module, params: Params, buffers: Params, x: Tensor, y: Tensor, loss: LossFn) -> Tensor:
    """Loss of ``net`` with parameters ``params`` (and ``buffers``) on one task's data ``(x, y)``; a scalar."""
    return loss(functional_call(net, (params, buffers), (x,)), y)


def tree_norm(tree: Params | Sequence[Tensor]) -> Tensor:
    """Global Euclidean norm of a dict (or sequence) of tensors; a scalar (vmappable)."""
    values = tree.values() if isinstance(tree, dict) else tree
    return torch.sqrt(sum((v * v).sum() for v in values))


def _adapted(name: str, adapt_names: frozenset[str] | None) -> bool:
    return adapt_names is None or name in adapt_names


def _sgd_step(params: Params, grads: Params, lr: float, adapt_names: frozenset[str] | None) -> Params:
    return {n: p - lr * grads[n] if _adapted(n, adapt_names) else p for n, p in params.items()}


def _check_hyper(inner_lr: float, inner_steps: int) -> None:
    if inner_steps < 1:
        raise ValueError(f"`inner_steps` must be >= 1, got {inner_steps}.")
    if not inner_lr > 0:
        raise ValueError(f"`inner_lr` must be > 0, got {inner_lr}.")


def inner_adapt(
    net: nn.Module,
    params: Params,
    buffers: Params,
    support_x: Tensor,
    support_y: Tensor,
    *,
    loss: str | LossFn,
    inner_lr: float,
    inner_steps: int,
    adapt_names: Sequence[str] | None = None,
) -> tuple[Params, Tensor]:
    """Run ``inner_steps`` gradient steps of size ``inner_lr`` on one task's support loss.

    Differentiable with respect to ``params`` through ``torch.func`` transforms (exact MAML nests it in ``grad``).

    Args:
        net: The model; called through ``torch.func.functional_call``.
        params: Meta-parameters ``x`` (name -> tensor).
        buffers: Buffers and frozen parameters passed to ``functional_call`` and never adapted.
        support_x: Support inputs ``(S, ...)``.
        support_y: Support targets ``(S, ...)``.
        loss: Loss name or callable, see :func:`resolve_loss`.
        inner_lr: Inner learning rate ``alpha > 0``.
        inner_steps: Number of inner steps ``K >= 1``.
        adapt_names: Names of the parameters adapted in the inner loop (ANIL-style); ``None`` adapts all.

    Returns:
        The adapted parameters ``U(x)`` and the support loss at ``x`` (scalar).
    """
    fn = resolve_loss(loss)
    adapt = None if adapt_names is None else frozenset(adapt_names)
    p = params
    pre = None
    for _ in range(inner_steps):
        g, value = grad_and_value(task_loss, argnums=1)(net, p, buffers, support_x, support_y, fn)
        pre = value if pre is None else pre
        p = _sgd_step(p, g, inner_lr, adapt)
    return p, pre


def maml_task_grad(
    net: nn.Module,
    params: Params,
    buffers: Params,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    *,
    loss: str | LossFn,
    inner_lr: float,
    inner_steps: int,
    adapt_names: Sequence[str] | None = None,
) -> tuple[Params, dict[str, Tensor]]:
    """Exact (second-order) MAML meta-gradient ``grad_x f^q(U(x))`` of one task (arXiv:1703.03400, Eq. 1).

    Nests ``torch.func.grad``: the inner steps are differentiated through, so memory grows with
    ``inner_steps`` x activations.

    Args:
        net, params, buffers, support_x, support_y, loss, inner_lr, inner_steps, adapt_names: See
            :func:`inner_adapt`.
        query_x: Query inputs ``(Q, ...)``.
        query_y: Query targets ``(Q, ...)``.

    Returns:
        ``(d, stats)``: ``d`` shaped like ``params``; ``stats`` holds scalar ``support_loss_pre`` and
        ``query_loss_post``.
    """
    _check_hyper(inner_lr, inner_steps)
    fn = resolve_loss(loss)

    def objective(p: Params) -> tuple[Tensor, Tensor]:
        adapted, pre = inner_adapt(
            net,
            p,
            buffers,
            support_x,
            support_y,
            loss=fn,
            inner_lr=inner_lr,
            inner_steps=inner_steps,
            adapt_names=adapt_names,
        )
        post = task_loss(net, adapted, buffers, query_x, query_y, fn)
        return post, (pre, post)

    d, (pre, post) = grad(objective, has_aux=True)(params)
    return d, {"support_loss_pre": pre.detach(), "query_loss_post": post.detach()}


def fomaml_task_grad(
    net: nn.Module,
    params: Params,
    buffers: Params,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    *,
    loss: str | LossFn,
    inner_lr: float,
    inner_steps: int,
    adapt_names: Sequence[str] | None = None,
) -> tuple[Params, dict[str, Tensor]]:
    """First-order MAML: ``d = grad f^q(U(x))``, the query gradient at the adapted point (arXiv:1703.03400, Sec. 5.2).

    Drops the Jacobian ``J`` of the inner loop, hence biased: it does not converge to a stationary point of the
    MAML objective (arXiv:1908.10400, Thm. 4). Arguments and returns as :func:`maml_task_grad`.
    """
    _check_hyper(inner_lr, inner_steps)
    fn = resolve_loss(loss)
    with torch.no_grad():
        adapted, pre = inner_adapt(
            net,
            params,
            buffers,
            support_x,
            support_y,
            loss=fn,
            inner_lr=inner_lr,
            inner_steps=inner_steps,
            adapt_names=adapt_names,
        )
        d, post = grad_and_value(task_loss, argnums=1)(net, adapted, buffers, query_x, query_y, fn)
    return d, {"support_loss_pre": pre, "query_loss_post": post}


def reptile_task_grad(
    net: nn.Module,
    params: Params,
    buffers: Params,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    *,
    loss: str | LossFn,
    inner_lr: float,
    inner_steps: int,
    reptile_steps: int = 5,
    adapt_names: Sequence[str] | None = None,
) -> tuple[Params, dict[str, Tensor]]:
    """Reptile direction ``d = (x - phi) / (alpha K_r)`` (Nichol et al., 2018, arXiv:1803.02999, Alg. 1).

    ``phi`` is reached by ``reptile_steps`` (``K_r``) gradient steps of size ``inner_lr`` on the support and query
    sets concatenated along the sample dimension; ``K_r = 1`` gives the joint-training gradient. Reptile adapts all
    parameters (``adapt_names`` only affects the reported ``query_loss_post``, which is the query loss after the
    ``inner_steps``-step support adaptation used by every algorithm).

    Args:
        reptile_steps: ``K_r >= 1``.
        Others: See :func:`maml_task_grad`.

    Raises:
        ValueError: If ``reptile_steps < 1``.
    """
    _check_hyper(inner_lr, inner_steps)
    if reptile_steps < 1:
        raise ValueError(f"`reptile_steps` must be >= 1, got {reptile_steps}.")
    fn = resolve_loss(loss)
    with torch.no_grad():
        joint_x = torch.cat([support_x, query_x], dim=0)
        joint_y = torch.cat([support_y, query_y], dim=0)
        phi, _ = inner_adapt(
            net, params, buffers, joint_x, joint_y, loss=fn, inner_lr=inner_lr, inner_steps=reptile_steps
        )
        d = {n: (params[n] - phi[n]) / (inner_lr * reptile_steps) for n in params}
        adapted, pre = inner_adapt(
            net,
            params,
            buffers,
            support_x,
            support_y,
            loss=fn,
            inner_lr=inner_lr,
            inner_steps=inner_steps,
            adapt_names=adapt_names,
        )
        post = task_loss(net, adapted, buffers, query_x, query_y, fn)
    return d, {"support_loss_pre": pre, "query_loss_post": post}


def fo_b_maml_task_grad(
    net: nn.Module,
    params: Params,
    buffers: Params,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    *,
    loss: str | LossFn,
    inner_lr: float,
    inner_steps: int,
    fd_scheme: str = "symmetric",
    fd_delta: float = 1e-2,
    adapt_names: Sequence[str] | None = None,
) -> tuple[Params, dict[str, Tensor]]:
    """First-order estimate of the exact MAML meta-gradient from gradients only (Chayti & Jaggi, arXiv:2409.03682).

    Stores the inner iterates ``x^0..x^K`` and sweeps backwards from ``v = g = grad f^q(x^K)``:
    ``v <- v - alpha * Hv_k`` for ``k = K-1..0``, where the Hessian-vector product of the support loss at ``x^k``
    along ``u = P v`` (``P`` keeps the adapted parameters) is a finite difference of support gradients with
    ``h = fd_delta / ||u||`` (``fd_delta`` is a parameter-space length):

    - forward: ``Hv ~ [grad f^s(x^k + h u) - grad f^s(x^k)] / h`` (bias ``O(delta)``);
    - symmetric: ``Hv ~ [grad f^s(x^k + h u) - grad f^s(x^k - h u)] / (2h)`` (bias ``O(delta^2)``); at ``K = 1`` this
      is HF-MAML (arXiv:1908.10400, Eq. 8).

    Exact on quadratic support losses for every ``fd_delta``. Memory holds ``K`` iterates (and ``K`` gradients for
    the forward scheme), never the inner computation graph. When ``u = 0`` the product is zero (no NaN).

    Args:
        fd_scheme: ``"forward"`` or ``"symmetric"``.
        fd_delta: Finite-difference step length ``delta > 0`` in parameter space; about ``1e-2`` (symmetric) or
            ``3e-4`` (forward) in float32.
        Others: See :func:`maml_task_grad`.

    Returns:
        ``(d, stats)`` as :func:`maml_task_grad`.

    Raises:
        ValueError: If ``fd_scheme`` is unknown or ``fd_delta <= 0``.
    """
    _check_hyper(inner_lr, inner_steps)
    if fd_scheme not in ("forward", "symmetric"):
        raise ValueError(f"`fd_scheme` must be 'forward' or 'symmetric', got {fd_scheme!r}.")
    if not fd_delta > 0:
        raise ValueError(f"`fd_delta` must be > 0, got {fd_delta}.")
    fn = resolve_loss(loss)
    adapt = None if adapt_names is None else frozenset(adapt_names)
    support_grad = grad(task_loss, argnums=1)
    with torch.no_grad():
        iterates: list[Params] = []
        grads: list[Params] = []
        p = params
        pre = None
        for _ in range(inner_steps):
            g, value = grad_and_value(task_loss, argnums=1)(net, p, buffers, support_x, support_y, fn)
            pre = value if pre is None else pre
            iterates.append(p)
            grads.append(g)
            p = _sgd_step(p, g, inner_lr, adapt)
        v, post = grad_and_value(task_loss, argnums=1)(net, p, buffers, query_x, query_y, fn)
        for k in reversed(range(inner_steps)):
            u = {n: t for n, t in v.items() if _adapted(n, adapt)}
            h = fd_delta / tree_norm(u).clamp_min(_NORM_EPS)
            xk = iterates[k]
            plus = support_grad(net, _shift(xk, u, h), buffers, support_x, support_y, fn)
            if fd_scheme == "symmetric":
                minus = support_grad(net, _shift(xk, u, -h), buffers, support_x, support_y, fn)
                v = {n: v[n] - inner_lr * (plus[n] - minus[n]) / (2 * h) for n in v}
            else:
                v = {n: v[n] - inner_lr * (plus[n] - grads[k][n]) / h for n in v}
    return v, {"support_loss_pre": pre, "query_loss_post": post}


def _shift(params: Params, direction: Params, step: Tensor) -> Params:
    return {n: p + step * direction[n] if n in direction else p for n, p in params.items()}


ALGORITHMS: dict[str, Callable[..., tuple[Params, dict[str, Tensor]]]] = {
    "maml": maml_task_grad,
    "fomaml": fomaml_task_grad,
    "reptile": reptile_task_grad,
    "fo_b_maml": fo_b_maml_task_grad,
}


def task_grad_fn(algorithm: str) -> Callable[..., tuple[Params, dict[str, Tensor]]]:
    """Return the per-task meta-gradient function for ``algorithm`` (one of :data:`ALGORITHMS`).

    Raises:
        ValueError: If ``algorithm`` is unknown.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"`algorithm` must be one of {sorted(ALGORITHMS)}, got {algorithm!r}.")
    return ALGORITHMS[algorithm]


def batched_task_grad(
    task_grad: Callable[..., tuple[Params, dict[str, Tensor]]],
    net: nn.Module,
    params: Params,
    buffers: Params,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    *,
    vectorize: bool = True,
    chunk_size: int | None = None,
    randomness: str = "error",
    **kwargs: Any,
) -> tuple[Params, dict[str, Tensor]]:
    """Average a per-task meta-gradient over a batch of ``T`` tasks: ``d = mean_i d_i``.

    Args:
        task_grad: One of the ``*_task_grad`` functions.
        net: The model.
        params: Meta-parameters, shared by all tasks (detached tensors).
        buffers: Buffers and frozen parameters, shared by all tasks.
        support_x: ``(T, S, ...)``; ``support_y``: ``(T, S, ...)``; ``query_x``: ``(T, Q, ...)``; ``query_y``:
            ``(T, Q, ...)``.
        vectorize: ``torch.func.vmap`` over tasks (default) or a Python loop (the reference).
        chunk_size: ``vmap`` chunk size over tasks (bounds memory), ``None`` for all at once.
        randomness: ``vmap`` randomness (``"error"``, ``"different"``, ``"same"``).
        **kwargs: Keyword arguments of ``task_grad`` (``loss``, ``inner_lr``, ``inner_steps``, ...).

    Returns:
        The task-mean meta-gradient (shaped like ``params``) and task-mean statistics (scalars).

    Raises:
        ValueError: If the four task tensors do not share the task dimension ``T``.
    """
    sizes = {t.shape[0] if t.ndim else -1 for t in (support_x, support_y, query_x, query_y)}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(
            "support_x, support_y, query_x and query_y must share the leading task dimension, got shapes "
            f"{[tuple(t.shape) for t in (support_x, support_y, query_x, query_y)]}."
        )

    def one(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Params, dict[str, Tensor]]:
        return task_grad(net, params, buffers, sx, sy, qx, qy, **kwargs)

    if vectorize:
        d, stats = vmap(one, randomness=randomness, chunk_size=chunk_size)(support_x, support_y, query_x, query_y)
        return {n: t.mean(0) for n, t in d.items()}, {k: s.mean(0) for k, s in stats.items()}
    outs = [one(*task) for task in zip(support_x, support_y, query_x, query_y)]
    d = {n: torch.stack([o[0][n] for o in outs]).mean(0) for n in params}
    stats = {k: torch.stack([o[1][k] for o in outs]).mean(0) for k in outs[0][1]}
    return d, stats


def adapt_and_predict(
    net: nn.Module,
    params: Params,
    buffers: Params,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    *,
    loss: str | LossFn,
    inner_lr: float,
    inner_steps: int,
    adapt_names: Sequence[str] | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Query predictions before and after support adaptation, for a batch of tasks (vmapped).

    Works under ``torch.inference_mode`` (``torch.func.grad`` does its own autograd).

    Args:
        support_x: ``(T, S, ...)``; ``support_y``: ``(T, S, ...)``; ``query_x``: ``(T, Q, ...)``.
        Others: See :func:`inner_adapt`.

    Returns:
        ``(pred_pre, pred_post)``, each ``(T, Q, ...)`` (the net's output per query point).
    """

    def one(sx: Tensor, sy: Tensor, qx: Tensor) -> tuple[Tensor, Tensor]:
        adapted, _ = inner_adapt(
            net, params, buffers, sx, sy, loss=loss, inner_lr=inner_lr, inner_steps=inner_steps, adapt_names=adapt_names
        )
        pre = functional_call(net, (params, buffers), (qx,))
        post = functional_call(net, (adapted, buffers), (qx,))
        return pre, post

    return vmap(one, chunk_size=chunk_size)(support_x, support_y, query_x)


# ----------------------------------------------------------------------------------------------------------------------
# Closed forms on quadratic task families: f_i^s(x) = 1/2 (x - c_i^s)^T A_i^s (x - c_i^s) (+ const), same for f_i^q.
# ----------------------------------------------------------------------------------------------------------------------


def _contraction(a_s: Tensor, inner_lr: float, inner_steps: int) -> Tensor:
    eye = torch.eye(a_s.shape[-1], dtype=a_s.dtype, device=a_s.device)
    return torch.linalg.matrix_power(eye - inner_lr * a_s, inner_steps)


def quadratic_maml_gradient(
    x: Tensor, a_s: Tensor, c_s: Tensor, a_q: Tensor, c_q: Tensor, inner_lr: float, inner_steps: int
) -> Tensor:
    """Exact MAML meta-gradient on quadratic tasks, per task [derived from arXiv:1703.03400, Eq. 1].

    ``grad F_i(x) = B_i A_i^q (B_i (x - c_i^s) + c_i^s - c_i^q)`` with ``B_i = (I - alpha A_i^s)^K`` (symmetric).

    Args:
        x: Meta-parameters ``(d,)``.
        a_s, a_q: Symmetric support/query Hessians ``(T, d, d)``.
        c_s, c_q: Support/query minimizers ``(T, d)``.
        inner_lr: ``alpha``.
        inner_steps: ``K``.

    Returns:
        Per-task meta-gradients ``(T, d)``.
    """
    b = _contraction(a_s, inner_lr, inner_steps)
    adapted_minus_cq = torch.einsum("tij,tj->ti", b, x - c_s) + c_s - c_q
    return torch.einsum("tij,tjk,tk->ti", b, a_q, adapted_minus_cq)


def quadratic_maml_solution(a: Tensor, c: Tensor, inner_lr: float, inner_steps: int) -> Tensor:
    """Minimizer of the MAML objective for quadratic tasks with ``f^s = f^q`` [derived].

    ``x* = (sum_i M_i)^{-1} sum_i M_i c_i`` with ``M_i = (I - alpha A_i)^K A_i (I - alpha A_i)^K``.

    Args:
        a: Task Hessians ``(T, d, d)`` (symmetric positive definite).
        c: Task minimizers ``(T, d)``.
        inner_lr: ``alpha``.
        inner_steps: ``K``.

    Returns:
        ``x*`` of shape ``(d,)``.
    """
    b = _contraction(a, inner_lr, inner_steps)
    m = b @ a @ b
    return torch.linalg.solve(m.sum(0), torch.einsum("tij,tj->i", m, c))


def quadratic_fomaml_fixed_point(a: Tensor, c: Tensor, inner_lr: float, inner_steps: int) -> Tensor:
    """Fixed point of FO-MAML for quadratic tasks with ``f^s = f^q`` [derived]: ``sum_i W_i (x - c_i) = 0``.

    ``W_i = A_i (I - alpha A_i)^K``; it differs from :func:`quadratic_maml_solution` unless all ``A_i`` are equal,
    which is FO-MAML's bias. Shapes as :func:`quadratic_maml_solution`.
    """
    w = a @ _contraction(a, inner_lr, inner_steps)
    return torch.linalg.solve(w.sum(0), torch.einsum("tij,tj->i", w, c))
