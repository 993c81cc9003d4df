import copy

import pytest
import torch

from lightning_epfl.functional.meta_optim import ema_momentum_, global_norm, outer_step_scale
from lightning_epfl.modules.meta_optim import MetaOptimizer


def _params(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(3, 2, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]


def _step(opt, params, grads):
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    return [p.detach() - b for p, b in zip(params, before)]


def _grads(scale: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 2, generator=g) * scale, torch.randn(5, generator=g) * scale]


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_meta_optim_normalized_step_has_length_lr(scale):
    """Normalized steps have global length exactly lr over two param groups, whatever the gradient scale."""
    params = _params()
    opt = MetaOptimizer([{"params": params[:1]}, {"params": params[1:]}], lr=0.05, mode="normalized", momentum=0.9)
    for seed in range(4):
        delta = _step(opt, params, _grads(scale, seed))
        assert global_norm(delta).item() == pytest.approx(0.05, rel=1e-4)


def test_meta_optim_clipped_step_bound():
    """Clipped steps: ||dx|| <= lr * clip_norm, equal when ||m|| >= clip_norm, plain-sized when ||m|| < clip_norm."""
    lr, gamma = 0.1, 0.5
    big, small = _params(), _params()
    opt_big = MetaOptimizer(big, lr=lr, mode="clipped", momentum=0.0, clip_norm=gamma)
    opt_small = MetaOptimizer(small, lr=lr, mode="clipped", momentum=0.0, clip_norm=gamma)
    grads_big, grads_small = _grads(10.0, 1), _grads(1e-3, 1)
    delta = _step(opt_big, big, grads_big)
    assert global_norm(delta).item() == pytest.approx(lr * gamma, rel=1e-5)
    delta = _step(opt_small, small, grads_small)
    assert global_norm(delta).item() == pytest.approx(lr * global_norm(grads_small).item(), rel=1e-3)
    assert global_norm(delta).item() < lr * gamma


def test_meta_optim_plain_momentum_matches_loop():
    """Plain mode equals a hand-written EMA-momentum loop m = b m + (1 - b) g, x -= lr m."""
    params = _params()
    ref = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in ref]
    opt = MetaOptimizer(params, lr=0.3, mode="plain", momentum=0.7)
    for seed in range(5):
        grads = _grads(1.0, seed)
        _step(opt, params, grads)
        for i, g in enumerate(grads):
            m[i] = 0.7 * m[i] + 0.3 * g
            ref[i] = ref[i] - 0.3 * m[i]
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-6)


def test_meta_optim_state_dict_resume():
    """Reloading the optimizer state mid-way reproduces the uninterrupted trajectory bit for bit."""
    a = _params()
    opt_a = MetaOptimizer(a, lr=0.1, mode="normalized", momentum=0.9)
    for seed in range(3):
        _step(opt_a, a, _grads(1.0, seed))
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = MetaOptimizer(b, lr=0.1, mode="normalized", momentum=0.9)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as a checkpoint round trip
    for seed in range(3, 6):
        _step(opt_a, a, _grads(1.0, seed))
        _step(opt_b, b, _grads(1.0, seed))
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_meta_optim_scale_and_momentum_functions():
    """outer_step_scale and ema_momentum_ follow their formulas."""
    n = torch.tensor(4.0)
    assert outer_step_scale(n, "plain").item() == 1.0
    assert outer_step_scale(n, "normalized").item() == pytest.approx(0.25)
    assert outer_step_scale(n, "clipped", clip_norm=2.0).item() == pytest.approx(0.5)
    assert outer_step_scale(n, "clipped", clip_norm=8.0).item() == 1.0
    assert outer_step_scale(torch.tensor(0.0), "normalized").isfinite()
    m = [torch.ones(2)]
    ema_momentum_(m, [torch.full((2,), 3.0)], 0.5)
    torch.testing.assert_close(m[0], torch.full((2,), 2.0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, "lr"),
        ({"mode": "adam"}, "mode"),
        ({"momentum": 1.0}, "momentum"),
        ({"clip_norm": 0.0}, "clip_norm"),
    ],
)
def test_meta_optim_bad_input(kwargs, match):
    """Bad arguments raise ValueError naming the argument."""
    with pytest.raises(ValueError, match=match):
        MetaOptimizer(_params(), **kwargs)
    with pytest.raises(ValueError, match="mode"):
        outer_step_scale(torch.tensor(1.0), "sign")
