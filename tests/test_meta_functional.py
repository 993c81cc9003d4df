import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_epfl.datamodules.few_shot import LinearRegressionTasks
from lightning_epfl.functional.meta import (
    batched_task_grad,
    fo_b_maml_task_grad,
    fomaml_task_grad,
    maml_task_grad,
    quadratic_fomaml_fixed_point,
    quadratic_maml_gradient,
    quadratic_maml_solution,
    reptile_task_grad,
    task_grad_fn,
    tree_norm,
)


class Quadratic(nn.Module):
    """``forward(L) = L @ x``; with ``half_sq`` and target ``L c`` the loss is ``1/2 (x - c)^T L^T L (x - c)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.zeros(dim, dtype=torch.float64))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return inp @ self.x


class Scalar(nn.Module):
    """Returns its single parameter; the loss function defines ``f(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return self.x


def half_sq(pred, target):
    return 0.5 * ((pred - target) ** 2).sum()


def half_sq_mean(pred, target):
    return 0.5 * ((pred - target) ** 2).mean()


def smooth_1d(pred, target):
    return (0.5 * pred**2 + torch.sin(pred)).sum()


def logcosh(pred, target):
    r = pred - target
    return (r + nn.functional.softplus(-2 * r) - math.log(2)).mean()


def random_quadratics(seed: int, tasks: int = 4, dim: int = 5):
    g = torch.Generator().manual_seed(seed)
    ls, lq = (torch.randn(tasks, dim, dim, generator=g, dtype=torch.float64) for _ in range(2))
    cs, cq = (torch.randn(tasks, dim, generator=g, dtype=torch.float64) for _ in range(2))
    a_s, a_q = ls.transpose(1, 2) @ ls, lq.transpose(1, 2) @ lq
    alpha = 0.5 / torch.linalg.eigvalsh(a_s).max().item()
    data = (ls, torch.einsum("tij,tj->ti", ls, cs), lq, torch.einsum("tij,tj->ti", lq, cq))
    return data, (a_s, cs, a_q, cq), alpha


def one_d_family():
    """f_i = a_i/2 (x - c_i)^2 with a = (1, 3), c = (0, 1), support = query."""
    a = torch.tensor([1.0, 3.0], dtype=torch.float64)
    c = torch.tensor([0.0, 1.0], dtype=torch.float64)
    inp = a.sqrt().reshape(2, 1, 1)
    tgt = (a.sqrt() * c).reshape(2, 1)
    return (inp, tgt, inp, tgt), a, c


@pytest.mark.parametrize("inner_steps", [1, 3])
def test_maml_closed_form_random_quadratics(inner_steps):
    """Exact MAML equals (I - aA^s)^K A^q ((I - aA^s)^K (x - c^s) + c^s - c^q) to 1e-10 on random quadratics."""
    data, (a_s, cs, a_q, cq), alpha = random_quadratics(0)
    x = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    d, _ = batched_task_grad(
        maml_task_grad, Quadratic(5), {"x": x}, {}, *data, loss=half_sq, inner_lr=alpha, inner_steps=inner_steps
    )
    ref = quadratic_maml_gradient(x, a_s, cs, a_q, cq, alpha, inner_steps).mean(0)
    torch.testing.assert_close(d["x"], ref, rtol=0, atol=1e-10)


def test_maml_closed_form_one_dimensional_values():
    """In 1-D with a = (1, 3), c = (0, 1), alpha = 0.2, K = 1: grad F(0) = -0.24 and x*_MAML = 3/7."""
    data, a, c = one_d_family()
    d, stats = batched_task_grad(
        maml_task_grad, Quadratic(1), {"x": torch.zeros(1, dtype=torch.float64)}, {}, *data, loss=half_sq,
        inner_lr=0.2, inner_steps=1,
    )  # fmt: skip
    assert d["x"].item() == pytest.approx(-0.24, abs=1e-12)
    # support loss at 0: mean(0, 3/2) = 0.75; query loss after adaptation: mean(0, 3/2 * 0.4^2) = 0.12
    assert stats["support_loss_pre"].item() == pytest.approx(0.75, abs=1e-12)
    assert stats["query_loss_post"].item() == pytest.approx(0.12, abs=1e-12)
    x_star = quadratic_maml_solution(a.reshape(2, 1, 1), c.reshape(2, 1), 0.2, 1)
    assert x_star.item() == pytest.approx(3 / 7, abs=1e-12)
    assert quadratic_fomaml_fixed_point(a.reshape(2, 1, 1), c.reshape(2, 1), 0.2, 1).item() == pytest.approx(0.6)


@pytest.mark.parametrize("fd_scheme", ["forward", "symmetric"])
@pytest.mark.parametrize("fd_delta", [1e-6, 1e-3, 1e-1])
@pytest.mark.parametrize("inner_steps", [1, 3])
def test_fo_b_maml_unbiased_on_quadratics(fd_scheme, fd_delta, inner_steps):
    """On quadratics the finite differences are exact: fo_b_maml equals exact MAML to 1e-8 for any delta."""
    data, (a_s, cs, a_q, cq), alpha = random_quadratics(2)
    x = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    d, _ = batched_task_grad(
        fo_b_maml_task_grad, Quadratic(5), {"x": x}, {}, *data, loss=half_sq, inner_lr=alpha,
        inner_steps=inner_steps, fd_scheme=fd_scheme, fd_delta=fd_delta,
    )  # fmt: skip
    ref = quadratic_maml_gradient(x, a_s, cs, a_q, cq, alpha, inner_steps).mean(0)
    torch.testing.assert_close(d["x"], ref, rtol=0, atol=1e-8)


def _run_gd(algorithm: str, steps: int, lr: float, **kwargs) -> float:
    data, _, _ = one_d_family()
    x = torch.zeros(1, dtype=torch.float64)
    for _ in range(steps):
        d, _ = batched_task_grad(
            task_grad_fn(algorithm), Quadratic(1), {"x": x}, {}, *data, loss=half_sq_mean, inner_lr=0.2, inner_steps=1,
            **kwargs,
        )  # fmt: skip
        x = x - lr * d["x"]
    return x.item()


def test_fomaml_and_reptile_biased_where_fo_b_maml_is_not():
    """On the 1-D family FO-MAML -> 0.6, Reptile (K_r = 5) -> 0.5955, fo_b_maml -> the MAML optimum 3/7."""
    # step sizes ~ 1 / curvature of each fixed-point map, so 25 steps converge to ~1e-12
    x_fo = _run_gd("fomaml", 25, 0.9)
    x_rep = _run_gd("reptile", 25, 1.1, reptile_steps=5)
    x_new = _run_gd("fo_b_maml", 25, 1.6, fd_scheme="symmetric", fd_delta=1e-2)
    x_fwd = _run_gd("fo_b_maml", 25, 1.6, fd_scheme="forward", fd_delta=1e-2)
    w = 1 - 0.8**5, 1 - 0.4**5  # Reptile's weights 1 - (1 - alpha a_i)^5
    assert x_fo == pytest.approx(0.6, abs=1e-9)
    assert x_rep == pytest.approx(w[1] / (w[0] + w[1]), abs=1e-9)
    assert x_rep == pytest.approx(0.5955, abs=1e-4)
    assert x_new == pytest.approx(3 / 7, abs=1e-9)
    assert x_fwd == pytest.approx(3 / 7, abs=1e-9)
    assert abs(x_fo - 3 / 7) > 0.1 and abs(x_rep - 3 / 7) > 0.1


def test_fo_b_maml_bias_orders():
    """f = x^2/2 + sin x, alpha = 0.3, x0 = 1: forward error O(delta), symmetric O(delta^2) (log-log slopes)."""
    x0 = {"x": torch.ones(1, dtype=torch.float64)}
    z = torch.zeros(1, 1, dtype=torch.float64)
    common = {"loss": smooth_1d, "inner_lr": 0.3, "inner_steps": 1}
    exact, _ = batched_task_grad(maml_task_grad, Scalar(), x0, {}, z, z, z, z, **common)
    # Hand derivation: U = x - 0.3 (x + cos x); F' = (1 - 0.3 (1 - sin x)) (U + cos U).
    u = 1 - 0.3 * (1 + math.cos(1))
    assert exact["x"].item() == pytest.approx((1 - 0.3 * (1 - math.sin(1))) * (u + math.cos(u)), abs=1e-12)
    assert exact["x"].item() == pytest.approx(1.330266, abs=1e-6)
    deltas = np.array([1e-1, 1e-2, 1e-3])
    errors = {}
    for scheme in ("forward", "symmetric"):
        errors[scheme] = np.array(
            [
                abs(
                    batched_task_grad(
                        fo_b_maml_task_grad, Scalar(), x0, {}, z, z, z, z, fd_scheme=scheme, fd_delta=float(d),
                        **common,
                    )[0]["x"].item()
                    - exact["x"].item()
                )
                for d in deltas
            ]
        )  # fmt: skip
    np.testing.assert_allclose(errors["forward"], [1.07e-2, 1.13e-3, 1.13e-4], rtol=0.02)
    np.testing.assert_allclose(errors["symmetric"], [5.87e-4, 5.88e-6, 5.88e-8], rtol=0.02)
    slope_fwd = np.polyfit(np.log(deltas), np.log(errors["forward"]), 1)[0]
    slope_sym = np.polyfit(np.log(deltas), np.log(errors["symmetric"]), 1)[0]
    assert slope_fwd == pytest.approx(1.0, abs=0.1)
    assert slope_sym == pytest.approx(2.0, abs=0.1)


def _tanh_mlp_tasks(seed: int = 0, tasks: int = 3):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(tasks, 10, 1, generator=g, dtype=torch.float64) * 10 - 5
    amp = torch.rand(tasks, 1, 1, generator=g, dtype=torch.float64) * 4 + 1
    y = amp * torch.sin(x)
    params = {n: p.detach() for n, p in net.named_parameters()}
    return net, params, (x[:, :5], y[:, :5], x[:, 5:], y[:, 5:])


@pytest.mark.parametrize("inner_steps", [1, 3])
@pytest.mark.parametrize("adapt_names", [None, ("4.weight", "4.bias")])
def test_fo_b_maml_matches_autograd_on_tanh_mlp(inner_steps, adapt_names):
    """On a tanh MLP, symmetric delta = 1e-3 is within 1e-5 relative of exact MAML, while FO-MAML is far off."""
    net, params, data = _tanh_mlp_tasks()
    common = {"loss": "mse", "inner_lr": 0.05, "inner_steps": inner_steps, "adapt_names": adapt_names}
    exact, _ = batched_task_grad(maml_task_grad, net, params, {}, *data, **common)
    est, _ = batched_task_grad(fo_b_maml_task_grad, net, params, {}, *data, fd_delta=1e-3, **common)
    fo, _ = batched_task_grad(fomaml_task_grad, net, params, {}, *data, **common)
    rel = tree_norm({n: est[n] - exact[n] for n in exact}) / tree_norm(exact)
    rel_fo = tree_norm({n: fo[n] - exact[n] for n in exact}) / tree_norm(exact)
    assert rel.item() < 1e-5
    assert rel_fo.item() > 1e-2


def test_reptile_single_step_is_joint_gradient():
    """Reptile with K_r = 1 is the gradient of the loss on support and query joined."""
    net, params, (sx, sy, qx, qy) = _tanh_mlp_tasks()
    leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
    d, _ = batched_task_grad(
        reptile_task_grad, net, params, {}, sx, sy, qx, qy, loss="mse", inner_lr=0.1, inner_steps=1, reptile_steps=1
    )
    ref = {n: torch.zeros_like(p) for n, p in params.items()}
    for t in range(sx.shape[0]):
        net.zero_grad()
        out = torch.func.functional_call(net, leaves, (torch.cat([sx[t], qx[t]]),))
        grads = torch.autograd.grad(nn.functional.mse_loss(out, torch.cat([sy[t], qy[t]])), list(leaves.values()))
        for (n, _), g in zip(params.items(), grads):
            ref[n] += g / sx.shape[0]
    for n in params:
        torch.testing.assert_close(d[n], ref[n], rtol=0, atol=1e-12)


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile", "fo_b_maml"])
def test_vmap_equals_per_task_loop(algorithm):
    """The vmapped task mean equals the per-task Python loop to 1e-6 + 1e-5 relative (float32), stats included."""
    net, params, data = _tanh_mlp_tasks(tasks=4)
    net = net.float()
    params = {n: p.float() for n, p in params.items()}
    data = [t.float() for t in data]
    common = {"loss": "mse", "inner_lr": 0.05, "inner_steps": 2}
    vec = batched_task_grad(task_grad_fn(algorithm), net, params, {}, *data, **common)
    loop = batched_task_grad(task_grad_fn(algorithm), net, params, {}, *data, vectorize=False, **common)
    chunked = batched_task_grad(task_grad_fn(algorithm), net, params, {}, *data, chunk_size=3, **common)
    for a, b in ((vec, loop), (vec, chunked)):
        for n in params:
            torch.testing.assert_close(a[0][n], b[0][n], rtol=1e-5, atol=1e-6)
        for k in a[1]:
            torch.testing.assert_close(a[1][k], b[1][k], rtol=1e-5, atol=1e-6)


def test_fo_b_maml_reaches_stationarity_fomaml_does_not():
    """Full-batch GD on log-cosh regression: exact ||grad F|| < 1e-6 with fo_b_maml, > 1e-3 with FO-MAML."""
    g = torch.Generator().manual_seed(0)
    scales = torch.linspace(0.5, 1.5, 4, dtype=torch.float64).reshape(4, 1, 1)
    x = torch.randn(4, 10, 3, generator=g, dtype=torch.float64) * scales
    y = x @ torch.randn(4, 3, 1, generator=g, dtype=torch.float64)
    net = nn.Linear(3, 1, bias=False).double()
    common = {"loss": logcosh, "inner_lr": 0.5, "inner_steps": 1}
    norms = {}
    for algorithm, kwargs in (("fo_b_maml", {"fd_delta": 1e-3}), ("fomaml", {})):
        w = {"weight": torch.zeros(1, 3, dtype=torch.float64)}
        for _ in range(200):
            d, _ = batched_task_grad(task_grad_fn(algorithm), net, w, {}, x, y, x, y, **common, **kwargs)
            w = {"weight": w["weight"] - 2.0 * d["weight"]}
            if tree_norm(d).item() < 1e-12:
                break
        exact, _ = batched_task_grad(maml_task_grad, net, w, {}, x, y, x, y, **common)
        norms[algorithm] = tree_norm(exact).item()
        assert tree_norm(d).item() < 1e-12  # both reached their own fixed point
    assert norms["fo_b_maml"] < 1e-6 < 1e-3 < norms["fomaml"]


def test_linear_regression_tasks_closed_forms():
    """LinearRegressionTasks' MAML solution zeroes the exact meta-gradient; its FO-MAML fixed point zeroes FO-MAML's."""
    dm = LinearRegressionTasks(dim=4, num_tasks=5, rows=12, dtype="float64")
    batch = dm.full_batch()
    net = nn.Linear(4, 1, bias=False).double()
    alpha = 0.5 / torch.linalg.eigvalsh(dm.hessians()).max().item()
    for inner_steps in (1, 2):
        common = {"loss": "mse", "inner_lr": alpha, "inner_steps": inner_steps}
        x_maml = {"weight": dm.exact_maml_solution(alpha, inner_steps).reshape(1, 4)}
        x_fo = {"weight": dm.fomaml_fixed_point(alpha, inner_steps).reshape(1, 4)}
        d, _ = batched_task_grad(maml_task_grad, net, x_maml, {}, *_fields(batch), **common)
        d_fo, _ = batched_task_grad(fomaml_task_grad, net, x_fo, {}, *_fields(batch), **common)
        d_at_fo, _ = batched_task_grad(maml_task_grad, net, x_fo, {}, *_fields(batch), **common)
        assert tree_norm(d).item() < 1e-10
        assert tree_norm(d_fo).item() < 1e-10
        assert tree_norm(d_at_fo).item() > 1e-3


def _fields(batch):
    return batch.support_x, batch.support_y, batch.query_x, batch.query_y


def test_zero_query_gradient_gives_no_nan():
    """At a task minimizer (g = 0) the estimator returns exactly zero, not NaN."""
    data, _, _ = one_d_family()
    data = tuple(t[1:] for t in data)  # the task with c = 1
    for scheme in ("forward", "symmetric"):
        d, _ = batched_task_grad(
            fo_b_maml_task_grad, Quadratic(1), {"x": torch.ones(1, dtype=torch.float64)}, {}, *data, loss=half_sq,
            inner_lr=0.2, inner_steps=2, fd_scheme=scheme,
        )  # fmt: skip
        assert torch.equal(d["x"], torch.zeros(1, dtype=torch.float64))


@pytest.mark.parametrize(
    ("fn", "kwargs", "match"),
    [
        (maml_task_grad, {"inner_steps": 0}, "inner_steps"),
        (fomaml_task_grad, {"inner_lr": 0.0}, "inner_lr"),
        (fo_b_maml_task_grad, {"fd_delta": 0.0}, "fd_delta"),
        (fo_b_maml_task_grad, {"fd_scheme": "central"}, "fd_scheme"),
        (reptile_task_grad, {"reptile_steps": 0}, "reptile_steps"),
        (maml_task_grad, {"loss": "hinge"}, "loss"),
    ],
)
def test_meta_functional_bad_input(fn, kwargs, match):
    """Bad hyper-parameters raise ValueError naming the argument."""
    net, params, data = _tanh_mlp_tasks()
    args = {"loss": "mse", "inner_lr": 0.1, "inner_steps": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        batched_task_grad(fn, net, params, {}, *data, **args)


def test_meta_functional_shape_errors():
    """MSE with mismatched prediction/target shapes and tasks of different counts raise clear errors."""
    net, params, (sx, sy, qx, qy) = _tanh_mlp_tasks()
    with pytest.raises(ValueError, match="same shape"):
        batched_task_grad(maml_task_grad, net, params, {}, sx, sy[..., 0], qx, qy, loss="mse", inner_lr=0.1,
                          inner_steps=1)  # fmt: skip
    with pytest.raises(ValueError, match="task dimension"):
        batched_task_grad(maml_task_grad, net, params, {}, sx, sy, qx[:2], qy[:2], loss="mse", inner_lr=0.1,
                          inner_steps=1)  # fmt: skip
    with pytest.raises(ValueError, match="algorithm"):
        task_grad_fn("imaml")


def test_maml_objective_is_l0_l1_smooth_not_l_smooth():
    """f = x^2/2 + sin x, alpha = 0.3: |F''| grows (0.94 on |x| <= 1, 209.7 on |x| <= 1000) yet stays below
    L0 + L1 |F'| with L0 = (1 + alpha L)^2 L = 5.12, L1 = alpha rho / (1 - alpha L) = 0.75 (L = 2, rho = 1)."""
    net, z = Scalar(), torch.zeros(1, 1, dtype=torch.float64)

    def f_prime(x):
        d, _ = maml_task_grad(net, {"x": x}, {}, z, z, z, z, loss=smooth_1d, inner_lr=0.3, inner_steps=1)
        return d["x"].sum()

    maxima = []
    for radius, points in ((1.0, 2001), (1000.0, 200001)):
        xs = torch.linspace(-radius, radius, points, dtype=torch.float64).reshape(-1, 1)
        f1 = torch.func.vmap(f_prime)(xs)
        f2 = torch.func.vmap(torch.func.grad(f_prime))(xs).reshape(-1)
        assert bool((f2.abs() <= 5.12 + 0.75 * f1.abs()).all())
        maxima.append(f2.abs().max().item())
    assert maxima[0] == pytest.approx(0.942, abs=1e-3)
    assert maxima[1] == pytest.approx(209.7, abs=0.1)
