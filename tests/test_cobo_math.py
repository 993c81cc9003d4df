"""CoBo math: W step, X step, simplex projection, schedule, stability, quadratic toy, full run vs loop reference."""

from __future__ import annotations

import copy
import math
from functools import partial

import lightning as L
import pytest
import torch
from collab_toy import ToyFederatedData
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_epfl.functional.cobo import (
    cobo_w_update,
    consensus_laplacian,
    consensus_step,
    pair_probability,
    project_simplex,
    sample_pairs,
)
from lightning_epfl.modules.client import ClientModule, MLPClassifier
from lightning_epfl.seeding import derive_seed
from lightning_epfl.strategies.collaborative import ClientStack, CoBo, CollaborativeStrategy, LocalCommunicator
from lightning_epfl.strategies.collaborative.algorithm import StepContext


class Quadratic(ClientModule):
    """f_i(x) = 1/2 ||x - a_i||^2 with the target a_i given as the batch."""

    def __init__(self, x0: list[float], lr: float = 0.1) -> None:
        super().__init__(optimizer=partial(torch.optim.SGD, lr=lr))
        self.x = nn.Parameter(torch.tensor(x0, dtype=torch.float64))

    def client_loss(self, batch):
        return 0.5 * ((self.x - batch[0]) ** 2).sum(-1).mean()

    def client_metrics(self, batch):
        loss = 0.5 * ((self.x - batch[0]) ** 2).sum(-1)
        return {"loss_sum": loss.sum(), "count": torch.tensor(float(loss.numel()), dtype=loss.dtype)}


class _Repeat(IterableDataset):
    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


class QuadraticData(LightningDataModule):
    """Client i's only example is its target a_i."""

    def __init__(self, targets: torch.Tensor, clusters: torch.Tensor) -> None:
        super().__init__()
        self.targets, self.true_clusters, self.n_clients, self.batch_size = targets, clusters, len(targets), 1

    def extra_batch(self, client_id, size, stream):
        return self.targets[client_id][None], torch.zeros(1, dtype=torch.long)

    def train_dataloader(self):
        ids = list(self.trainer.strategy.local_client_ids)
        return DataLoader(_Repeat((self.targets[ids][:, None], torch.zeros(len(ids), 1, dtype=torch.long))), None)


def _ctx_for(targets: torch.Tensor, X: torch.Tensor) -> StepContext:
    module = Quadratic([0.0] * X.shape[1])
    stack = ClientStack(module, X.shape[0])
    with torch.no_grad():
        stack.X.copy_(X)
    return StepContext(stack=stack, comm=LocalCommunicator(X.shape[0]), datamodule=QuadraticData(targets, None))


# ------------------------------------------------------------------------------------------------------- W step
@pytest.mark.parametrize(("gamma", "expected"), [(0.1, 0.8), (1.0, 0.0)])
def test_cobo_w_step_two_clients_by_hand(gamma, expected):
    """Two quadratic clients: w <- clip(1 + gamma <z - a_1, z - a_2>, 0, 1) with z the midpoint, computed by hand.

    x_1 = (1, 0), x_2 = (0, 1): z = (.5, .5); a_1 = (2, 0), a_2 = (0, 3): g_1 = (-1.5, .5), g_2 = (.5, -2.5),
    <g_1, g_2> = -2. Using client 1's data for g_2 (the reference LLM code's bug) would give +2.5 and keep w = 1.
    """
    targets = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    ctx = _ctx_for(targets, torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    algo = CoBo(gamma=gamma, pair_sampling="all", pair_batch_size=1)
    algo.setup(ctx)
    algo.w_step(ctx, ctx.X.clone())
    assert abs(float(algo.W[0, 1]) - expected) < 1e-12 and abs(float(algo.W[1, 0]) - expected) < 1e-12
    assert algo.step_metrics()["cobo/inner_product_mean"] == pytest.approx(-2.0, abs=1e-12)


def test_cobo_w_step_quadratics_many_clients_matches_formula():
    """With f_i = 1/2||x - a_i||^2 every drawn pair gets clip(w + gamma <z - a_i, z - a_j>, 0, 1) (1e-12)."""
    g = torch.Generator().manual_seed(0)
    n, d = 6, 4
    targets = torch.randn(n, d, generator=g, dtype=torch.float64)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    ctx = _ctx_for(targets, X)
    algo = CoBo(gamma=0.05, pair_sampling="all", pair_batch_size=1)
    algo.setup(ctx)
    W0 = algo.W.clone() * 0.7
    algo.W = W0.clone()
    algo.w_step(ctx, X)
    for i in range(n):
        for j in range(n):
            if i != j:
                z = 0.5 * (X[i] + X[j])
                ref = min(1.0, max(0.0, float(W0[i, j] + 0.05 * torch.dot(z - targets[i], z - targets[j]))))
                assert abs(float(algo.W[i, j]) - ref) < 1e-12
    # the diagnostic record holds the unclipped inner products of exactly the pairs updated
    assert algo.last_pairs.shape == (n * (n - 1) // 2, 2)
    for (i, j), ip in zip(algo.last_pairs.tolist(), algo.last_inner_products.tolist()):
        z = 0.5 * (X[i] + X[j])
        assert ip == pytest.approx(float(torch.dot(z - targets[i], z - targets[j])), abs=1e-12)


def test_cobo_diagnostic_record_is_cleared_on_steps_without_w_step():
    g = torch.Generator().manual_seed(0)
    targets, X = (torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(2))
    ctx = _ctx_for(targets, X)
    algo = CoBo(gamma=0.05, pair_sampling="all", pair_batch_size=1, update_every=2)
    algo.setup(ctx)
    ctx.step = 0
    algo.before_optimizer_step(ctx)
    assert algo.last_pairs.shape == (6, 2) and algo.last_inner_products.shape == (6,)
    ctx.step = 1
    algo.before_optimizer_step(ctx)
    assert algo.last_pairs is None and algo.last_inner_products is None


def test_cobo_w_update_box_and_simplex_domains():
    """Box updates stay in [0, 1] and symmetric; simplex rows stay on the simplex with a zero diagonal."""
    g = torch.Generator().manual_seed(1)
    n = 7
    pairs = sample_pairs(n, 0.6, g)
    ip = torch.randn(len(pairs), generator=g, dtype=torch.float64) * 5
    Wb = cobo_w_update(torch.ones(n, n, dtype=torch.float64), pairs, ip, 0.3, "box")
    assert Wb.min() >= 0 and Wb.max() <= 1 and torch.equal(Wb, Wb.T)
    Ws = cobo_w_update((torch.ones(n, n) - torch.eye(n)).double() / (n - 1), pairs, ip, 0.3, "simplex")
    assert Ws.min() >= 0 and torch.allclose(Ws.sum(1), torch.ones(n, dtype=torch.float64), atol=1e-12)
    assert torch.all(torch.diagonal(Ws) == 0)


def _bisection_projection(v: torch.Tensor) -> torch.Tensor:
    """Slow reference: find theta with sum(max(v - theta, 0)) = 1 by bisection (KKT of the projection)."""
    lo, hi = float(v.min()) - 1.0, float(v.max())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float((v - mid).clamp_min(0).sum()) > 1 else (lo, mid)
    return (v - 0.5 * (lo + hi)).clamp_min(0)


def test_project_simplex_matches_bisection_and_is_idempotent():
    """Sort-and-threshold projection equals the bisection solution (1e-10), lies on the simplex, is idempotent."""
    g = torch.Generator().manual_seed(2)
    V = torch.randn(20, 9, generator=g, dtype=torch.float64) * 3
    P = project_simplex(V)
    for v, p in zip(V, P):
        torch.testing.assert_close(p, _bisection_projection(v), atol=1e-10, rtol=0)
    assert P.min() >= 0 and torch.allclose(P.sum(1), torch.ones(20, dtype=torch.float64), atol=1e-12)
    torch.testing.assert_close(project_simplex(P), P, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------------- X step
def test_consensus_step_matches_loop_and_is_equivariant():
    """X step equals the per-client loop formula (1e-12), is permutation-equivariant, and W = 0 is a no-op."""
    g = torch.Generator().manual_seed(3)
    n, d, coef = 5, 3, 0.07
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Xt = torch.randn(n, d, generator=g, dtype=torch.float64)
    W = torch.rand(n, n, generator=g, dtype=torch.float64)
    out = consensus_step(X, Xt, W, list(range(n)), coef)
    for i in range(n):
        ref = X[i] - coef * sum(W[i, k] * (Xt[i] - Xt[k]) for k in range(n) if k != i)
        torch.testing.assert_close(out[i], ref, atol=1e-12, rtol=0)
    perm = torch.randperm(n, generator=g)
    out_p = consensus_step(X[perm], Xt[perm], W[perm][:, perm], list(range(n)), coef)
    torch.testing.assert_close(out_p, out[perm], atol=1e-12, rtol=0)
    assert torch.equal(consensus_step(X, Xt, torch.zeros(n, n, dtype=torch.float64), list(range(n)), coef), X)
    torch.testing.assert_close(out[2:4], consensus_step(X[2:4], Xt, W, [2, 3], coef), atol=0, rtol=0)
    assert torch.allclose(consensus_laplacian(W).sum(1), torch.zeros(n, dtype=torch.float64), atol=1e-12)


# ------------------------------------------------------------------------------------------------------- schedule
def test_pair_probability_formula_and_sampled_fraction():
    """p_t follows the mixed/constant/all formulas; the sampled fraction is within 4 binomial sds of p."""
    assert pair_probability(5, 16, "mixed", 2.0, 30, 2.0) == pytest.approx(2 / 16)
    assert pair_probability(399, 16, "mixed", 2.0, 30, 2.0) == pytest.approx(min(2 / 16, 2 / math.sqrt(400)))
    assert pair_probability(10**6, 16, "mixed", 2.0, 30, 2.0) == pytest.approx(2 / 1000.0005, rel=1e-6)
    assert pair_probability(10**6, 80, "constant", 2.0) == pytest.approx(2 / 80)
    assert pair_probability(3, 4, "all") == 1.0
    assert pair_probability(0, 2, "constant", 3.0) == 1.0
    n, p = 142, 0.3
    m = n * (n - 1) // 2
    drawn = sample_pairs(n, p, torch.Generator().manual_seed(derive_seed(0, "cobo_pairs", 7)))
    assert abs(len(drawn) - p * m) <= 4 * math.sqrt(m * p * (1 - p))
    assert torch.all(drawn[:, 0] < drawn[:, 1])
    with pytest.raises(ValueError, match="`pair_sampling` must be"):
        pair_probability(0, 4, "cubic")


def test_stability_check_thresholds():
    """eta*rho*lambda_max(L_W) <= 1 is silent, in (1, 2] warns, > 2 raises unless allow_unstable (W0 = 11^T: n)."""
    algo = CoBo(rho=2.0)
    algo.W = algo.initial_W(4)  # lambda_max(L) = 4
    assert algo.check_stability(0.1) == pytest.approx(0.8)
    algo.rho = 3.0
    with pytest.warns(RuntimeWarning, match="may oscillate"):
        assert algo.check_stability(0.1) == pytest.approx(1.2)
    algo.rho = 6.0
    with pytest.raises(MisconfigurationException, match="unstable consensus"):
        algo.check_stability(0.1)
    algo.allow_unstable = True
    with pytest.warns(RuntimeWarning):
        algo.check_stability(0.1)


# ------------------------------------------------------------------------------------------------------- runs
def _trainer(tmp_path, strategy, steps, callbacks=()):
    return L.Trainer(
        default_root_dir=tmp_path,
        max_steps=steps,
        strategy=strategy,
        accelerator="cpu",
        devices=1,
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=list(callbacks),
    )


def test_cobo_quadratic_clusters_toy(tmp_path):
    """8 quadratic clients with optima +-e1, x0 = 10 e2: cross-cluster w is still 1 at step 10 (gradients agree far
    from the optima) and (W > 0.5) equals the true clusters by step 100."""
    n, d = 8, 10
    clusters = torch.arange(n) % 2
    targets = torch.zeros(n, d, dtype=torch.float64)
    targets[:, 0] = 1.0 - 2.0 * clusters.double()
    x0 = [0.0] * d
    x0[1] = 10.0
    seen = {}

    class Snap(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 10:
                seen[10] = trainer.strategy.collaboration_matrix().clone()

    cobo = CoBo(rho=0.1, gamma=0.1, pair_sampling="all", pair_batch_size=1)
    strategy = CollaborativeStrategy(algorithm=cobo, seed=0)
    _trainer(tmp_path, strategy, 100, [Snap()]).fit(Quadratic(x0, lr=0.1), QuadraticData(targets, clusters))
    same = clusters[:, None] == clusters[None, :]
    off = ~torch.eye(n, dtype=torch.bool)
    assert torch.all(seen[10][~same] == 1.0)
    assert torch.equal((cobo.W > 0.5)[off], same[off])
    assert torch.equal(strategy.cluster_assignments(), clusters)


def test_cobo_run_matches_slow_loop_reference(tmp_path):
    """Six CoBo steps through the strategy (vmap, mixed schedule, momentum-free SGD) equal a per-client, per-pair
    Python loop with autograd (W and X within 1e-10, float64)."""
    n, steps, lr, rho, gamma = 4, 6, 0.1, 0.3, 0.5
    dm = ToyFederatedData(n_clients=n, dtype=torch.float64)
    torch.manual_seed(0)
    model = MLPClassifier(5, [6], 3, optimizer=partial(torch.optim.SGD, lr=lr))
    template = copy.deepcopy(model).double()
    cobo = CoBo(rho=rho, gamma=gamma, w_init=0.5, pair_batch_size=-1, pair_warmup_steps=3, pair_decay=1.0)
    strategy = CollaborativeStrategy(algorithm=cobo, seed=5)
    _trainer(tmp_path, strategy, steps).fit(model, dm)

    def grad(params, i):
        m = copy.deepcopy(template)
        with torch.no_grad():
            for k, p in m.named_parameters():
                p.copy_(params[k])
        m.client_loss((dm.x[i], dm.y[i])).backward()
        return {k: p.grad for k, p in m.named_parameters()}

    X = [{k: v.detach().clone() for k, v in template.named_parameters()} for _ in range(n)]
    W = 0.5 * (torch.ones(n, n, dtype=torch.float64) - torch.eye(n, dtype=torch.float64))
    for t in range(steps):
        p = pair_probability(t, n, "mixed", 2.0, 3, 1.0)
        pairs = sample_pairs(n, p, torch.Generator().manual_seed(derive_seed(5, "cobo_pairs", t)))
        snap = [{k: v.clone() for k, v in x.items()} for x in X]
        for i, j in pairs.tolist():
            z = {k: 0.5 * (snap[i][k] + snap[j][k]) for k in snap[i]}
            gi, gj = grad(z, i), grad(z, j)
            ip = sum(float((gi[k] * gj[k]).sum()) for k in gi)
            W[i, j] = W[j, i] = min(1.0, max(0.0, float(W[i, j]) + gamma * ip))
        for i in range(n):
            gi = grad(snap[i], i)
            X[i] = {
                k: snap[i][k]
                - lr * gi[k]
                - lr * rho * sum(W[i, m] * (snap[i][k] - snap[m][k]) for m in range(n) if m != i)
                for k in gi
            }
    torch.testing.assert_close(cobo.W, W, atol=1e-10, rtol=0)
    for i in range(n):
        torch.testing.assert_close(strategy.client_state_dict(i), X[i], atol=1e-10, rtol=0)
    assert (W - 0.5 * (1 - torch.eye(n, dtype=torch.float64))).abs().max() > 1e-3  # the W step did act
