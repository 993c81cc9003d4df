"""Decor on the collaborative core: the noise (cancellation, covariance, freshness, in the applied update), clipping
against Opacus, central-DP equivalence, budget stop, secure mode and keys, data files, bad input."""

from __future__ import annotations

import copy
from functools import partial

import lightning as L
import pytest
import torch
from collab_toy import ToyFederatedData
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_epfl.functional.privacy import laplacian
from lightning_epfl.functional.topology import Topology, mixing_matrix
from lightning_epfl.modules import LogisticRegression, MLPClassifier
from lightning_epfl.strategies import ClientStack, CollaborativeStrategy, Decor, LocalCommunicator, StepContext


def _ctx(n: int = 6, d_model: MLPClassifier | None = None, topology: Topology | None = None, step: int = 0):
    torch.manual_seed(0)
    model = d_model or MLPClassifier(5, [4], 3)
    topo = topology or Topology.ring(n)
    stack = ClientStack(model.double(), n)
    return StepContext(
        stack=stack, comm=LocalCommunicator(n), seed=7, topology=topo, mixing_W=mixing_matrix(topo), step=step
    )


def _decor(**kw) -> Decor:
    return Decor(**{"sigma": 1.5, "sigma_cor": 40.0, **kw})


def test_pairwise_noise_cancels_over_the_graph():
    """With sigma = 0 the noise of all clients sums to zero (<= 1e-10 sigma_cor sqrt(d)), on ring and complete."""
    for topo in (Topology.ring(6), Topology.complete(6), Topology.torus(9)):
        ctx = _ctx(topo.n, topology=topo)
        algo = _decor(sigma=0.0)
        algo.setup(ctx)
        for step in (0, 1, 17):
            ctx.step = step
            z = algo.noise_for(ctx)
            d = z.shape[1]
            assert float(z.sum(0).abs().max()) <= 1e-10 * 40.0 * d**0.5
            assert float(z.abs().max()) > 10.0  # the terms themselves are large


def test_noise_covariance_and_freshness():
    """Across coordinates (iid) the client noise covariance is sigma^2 I + sigma_cor^2 L (5 %); consecutive steps are
    uncorrelated (|corr| < 0.02); scaling the pairwise noise by W (the reference code's variant) would fail this."""
    n, sigma, sigma_cor = 5, 2.0, 3.0
    topo = Topology.ring(n)
    wide = MLPClassifier(200, [100], 3)  # d = 20,403 coordinates: one step gives 20k draws per client
    ctx = _ctx(n, d_model=wide, topology=topo)
    algo = Decor(sigma=sigma, sigma_cor=sigma_cor)
    algo.setup(ctx)
    z = algo.noise_for(ctx)
    cov = z @ z.T / z.shape[1]
    expected = sigma**2 * torch.eye(n, dtype=torch.float64) + sigma_cor**2 * laplacian(topo.adjacency)
    assert float((cov - expected).abs().max() / expected.abs().max()) < 0.05
    ctx.step = 1
    z1 = algo.noise_for(ctx)
    corr = (z * z1).sum(1) / (z.norm(dim=1) * z1.norm(dim=1))
    assert float(corr.abs().max()) < 0.02
    scaled = sigma_cor * mixing_matrix(topo)[0, 1]  # W-scaled pairwise noise: variance off by 1/W_ij^2
    assert abs(float(cov[0, 1]) - (-(scaled**2))) > 0.05 * sigma_cor**2


def _trainer(root, strategy, steps, precision="64-true", **kw) -> L.Trainer:
    return L.Trainer(
        default_root_dir=root, max_steps=steps, strategy=strategy, accelerator="cpu", devices=1, precision=precision,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=kw.pop("limit_val_batches", 0), **kw,
    )  # fmt: skip


def _fit(root, algorithm, steps=1, topology="ring", seed=0, lr=0.1, momentum=0.0):
    torch.manual_seed(0)
    model = MLPClassifier(5, [6], 3, optimizer=partial(torch.optim.SGD, lr=lr, momentum=momentum))
    tr = _trainer(root, CollaborativeStrategy(algorithm=algorithm, topology=topology, seed=seed), steps)
    tr.fit(model, ToyFederatedData(n_clients=4, dtype=torch.float64))
    return tr


def test_noise_is_in_the_applied_update(tmp_path):
    """One step: parameters with noise minus parameters without equal -lr W z (gossip is linear): the closure and
    the optimizer keep the noise."""
    noisy = _fit(tmp_path / "a", Decor(sigma=0.5, sigma_cor=3.0, clip_norm=10.0), lr=0.1)
    clean = _fit(tmp_path / "b", Decor(sigma=0.0, sigma_cor=0.0, clip_norm=10.0), lr=0.1)
    algo = noisy.strategy.algorithm
    ctx = noisy.strategy.ctx
    ctx.step = 0
    z = algo.noise_for(ctx)
    W = algo.W
    diff = noisy.strategy.stack.X - clean.strategy.stack.X
    torch.testing.assert_close(diff, -0.1 * (W @ z), atol=1e-10, rtol=0)
    assert float(z.abs().max()) > 1.0


def test_example_level_clipping_equals_opacus():
    """Per-example clipped mean (nested vmap) equals Opacus GradSampleModule + DPOptimizer(noise_multiplier=0) within
    1e-5 (Opacus divides by ||g|| + 1e-6)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    torch.manual_seed(1)
    template = MLPClassifier(5, [6], 3).double()
    dm = ToyFederatedData(n_clients=3, dtype=torch.float64)
    ctx = _ctx(3, d_model=copy.deepcopy(template), topology=Topology.ring(3))
    ctx.datamodule = type("D", (), {"batch_size": 12, "client_sizes": [12, 13, 12], "sampling": "shuffle"})()
    algo = Decor(sigma=1.0, sigma_cor=1.0, clip_norm=0.05, level="example")
    algo.setup(ctx)
    batch = dm.train_batch((0, 1, 2), 0)  # unequal sizes: padded with a mask
    G, _ = algo.compute_gradients(ctx, batch)
    for i in range(3):
        model = copy.deepcopy(template)
        gsm = GradSampleModule(model)
        opt = DPOptimizer(
            torch.optim.SGD(gsm.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=0.05, expected_batch_size=12
        )
        opt.zero_grad()
        x, y = dm.x[i], dm.y[i]
        torch.nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
        opt.pre_step()
        ref = torch.cat([p.grad.reshape(-1) for p in gsm.parameters()])
        ours = ctx.stack.flatten({k: v[None] for k, v in ctx.stack.unflatten(G[i]).items()})[0]
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
        assert float(ref.norm()) > 0.01  # clipping is active: 12 examples, each clipped to 0.05


def test_cdp_with_zero_noise_is_sgd_on_mean_clipped_gradient(tmp_path):
    """noise='cdp', sigma=0: every client holds x_bar, which follows SGD on the mean of the clipped gradients."""
    lr, C, steps = 0.1, 0.3, 3
    tr = _fit(tmp_path, Decor(noise="cdp", sigma=0.0, clip_norm=C), steps=steps, topology=None, lr=lr)
    dm = ToyFederatedData(n_clients=4, dtype=torch.float64)
    torch.manual_seed(0)
    ref = MLPClassifier(5, [6], 3).double()
    for _ in range(steps):
        grads = []
        for i in range(4):
            ref.zero_grad()
            ref.client_loss((dm.x[i], dm.y[i])).backward()
            g = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
            grads.append(g * min(1.0, C / float(g.norm())))
        step = torch.stack(grads).mean(0)
        with torch.no_grad():
            offset = 0
            for p in ref.parameters():
                p -= lr * step[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
    X = tr.strategy.stack.X
    flat = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
    for i in range(4):
        row = tr.strategy.stack.flatten({k: v[None] for k, v in tr.strategy.stack.unflatten(X[i]).items()})[0]
        torch.testing.assert_close(row, flat, atol=1e-10, rtol=0)


def test_calibrated_run_logs_epsilon_and_stops_at_budget(tmp_path):
    """Calibrated for 5 steps but run for 20: privacy/epsilon is logged, reaches <= target, and training stops."""
    algo = Decor(target_epsilon=8.0, total_steps=5, clip_norm=1.0)
    with pytest.warns(RuntimeWarning, match="would be exceeded by the next step"):
        tr = _fit(tmp_path, algo, steps=20)
    assert tr.global_step == 5
    eps = float(tr.callback_metrics["privacy/epsilon"])
    assert 8.0 * (1 - 1e-6) <= eps <= 8.0
    assert float(tr.callback_metrics["privacy/sigma_cor"]) > float(tr.callback_metrics["privacy/sigma"])


def test_secure_mode_keys_never_reach_checkpoints_logs_or_hyperparameters(tmp_path):
    """secure_mode: pair keys from X25519, noise from ChaCha20; no key bytes in the checkpoint, metrics or hparams."""
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    algo = Decor(sigma=0.5, sigma_cor=2.0, secure_mode=True)
    model = MLPClassifier(5, [6], 3, optimizer=partial(torch.optim.SGD, lr=0.1))
    tr = L.Trainer(
        default_root_dir=tmp_path, max_steps=3, strategy=CollaborativeStrategy(algorithm=algo, topology="ring"),
        accelerator="cpu", devices=1, precision="64-true", logger=CSVLogger(tmp_path), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1, val_check_interval=3,
    )  # fmt: skip
    tr.fit(model, ToyFederatedData(n_clients=4, dtype=torch.float64))
    keys = [s.key for s in algo._pair_keys.values()] + [s.key for s in algo._private_keys.values()]
    assert len(algo._pair_keys) == 4 and all(len(k) == 32 for k in keys)
    path = tmp_path / "s.ckpt"
    tr.save_checkpoint(path)
    blobs = [path.read_bytes()] + [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p != path]
    for key in keys:
        assert all(key not in blob and key.hex().encode() not in blob for blob in blobs)
    assert "train/loss" not in tr.callback_metrics  # data-dependent: not logged in secure mode


def test_svmlight_files_load_and_bad_lines_are_named(tmp_path):
    """A LIBSVM file feeds FederatedDataModule (labels -1/+1 -> 0/1); a malformed line is reported with its number."""
    from lightning_epfl.datamodules import FederatedDataModule

    good = tmp_path / "tiny.svm"
    lines = [f"{'+1' if i % 2 else '-1'} 1:{i / 10} {2 + i % 3}:1 7:0.5" for i in range(40)]
    good.write_text("\n".join(lines) + "\n")
    dm = FederatedDataModule(dataset=str(good), n_features=8, n_clients=4, standardize=False, batch_size=4)
    dm.setup()
    x, y, _ = dm.load_arrays()
    assert x.shape == (40, 8) and sorted(set(y.tolist())) == [0, 1] and float(x[3, 0]) == pytest.approx(0.3)
    bad = tmp_path / "bad.svm"
    bad.write_text("\n".join(lines[:5] + ["+1 3:oops"] + lines[5:]) + "\n")
    with pytest.raises(MisconfigurationException, match=r"line 6 does not parse.*3:oops"):
        FederatedDataModule(dataset=str(bad), n_clients=4).setup()
    with pytest.raises(MisconfigurationException, match="`dataset` must be one of"):
        FederatedDataModule(dataset=str(tmp_path / "missing.svm"))


def test_logistic_regression_client_math():
    """LogisticRegression: masked mean BCE, sums and accuracy by hand."""
    torch.manual_seed(0)
    m = LogisticRegression(3)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    logits = x @ m.linear.weight[0] + m.linear.bias
    losses = torch.nn.functional.softplus(-logits) * y + torch.nn.functional.softplus(logits) * (1 - y)
    torch.testing.assert_close(m.client_loss((x, y, mask)), (losses * mask).sum() / 4)
    sums = m.client_metrics((x, y, mask))
    assert float(sums["count"]) == 4 and float(sums["correct"]) == float((((logits > 0).long() == y) * mask).sum())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sigma": 1.0, "sigma_cor": 1.0, "delta": 1.5}, "`delta` must be in"),
        ({"sigma": 1.0, "sigma_cor": 1.0, "clip_norm": 0.0}, "`clip_norm` must be > 0"),
        ({}, "exactly one of them"),
        ({"sigma": 1.0, "target_epsilon": 3.0}, "exactly one of them"),
        ({"sigma": 1.0}, "`sigma_cor` is required"),
        ({"sigma": 1.0, "noise": "ldp", "sigma_cor": 2.0}, "applies to noise='decor' only"),
        ({"target_epsilon": 3.0, "level": "example", "conversion": "gdp"}, "gdp"),
    ],
)
def test_decor_bad_arguments(kwargs, match):
    """Bad Decor arguments raise in the constructor naming the argument."""
    with pytest.raises(MisconfigurationException, match=match):
        Decor(**kwargs)


def test_decor_refuses_bad_setups(tmp_path):
    """Adam (breaks cancellation), half precision, gradient clipping across clients, no topology, BatchNorm."""
    dm = ToyFederatedData(n_clients=4)
    algo = partial(Decor, sigma=1.0, sigma_cor=1.0)
    adam = MLPClassifier(5, [6], 3, optimizer=partial(torch.optim.Adam, lr=0.1))
    with pytest.raises(MisconfigurationException, match="Decor needs SGD.*allow_nonlinear_optimizer"):
        _trainer(tmp_path, CollaborativeStrategy(algorithm=algo(), topology="ring"), 1, "32-true").fit(adam, dm)
    with pytest.raises(MisconfigurationException, match="precision"):
        _trainer(tmp_path, CollaborativeStrategy(algorithm=algo(), topology="ring"), 1, "bf16-mixed").fit(
            MLPClassifier(5, [6], 3), dm
        )
    with pytest.raises(MisconfigurationException, match="gradient_clip_val"):
        _trainer(
            tmp_path, CollaborativeStrategy(algorithm=algo(), topology="ring"), 1, "32-true", gradient_clip_val=1.0
        ).fit(MLPClassifier(5, [6], 3), dm)
    with pytest.raises(MisconfigurationException, match="Decor needs a communication graph"):
        _trainer(tmp_path, CollaborativeStrategy(algorithm=algo()), 1, "32-true").fit(MLPClassifier(5, [6], 3), dm)
    bn = MLPClassifier(5, [6], 3)
    bn.net.insert(1, torch.nn.BatchNorm1d(6))
    with pytest.raises(MisconfigurationException, match="BatchNorm.*GroupNorm"):
        _trainer(tmp_path, CollaborativeStrategy(algorithm=algo(level="example"), topology="ring"), 1, "32-true").fit(
            bn, dm
        )


def test_decor_example_yaml_fast_dev_run(tmp_path):
    """examples/decor_logreg.yaml runs through the CLI (one step), logging privacy/epsilon."""
    from pathlib import Path

    from lightning_epfl.cli import cli_main

    example = Path(__file__).parent.parent / "examples" / "decor_logreg.yaml"
    cli = cli_main(
        ["fit", "--config", str(example), "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}"]
    )
    algo = cli.trainer.strategy.algorithm
    assert isinstance(algo, Decor) and algo.sigma_cor > algo.sigma > 0
    assert float(cli.trainer.callback_metrics["privacy/epsilon"]) <= 10.0


@pytest.mark.slow
def test_decor_breast_cancer_experiment():
    """Slow (~2-4 min): breast cancer, epsilon 10, T = 1000, 4 seeds: every Decor graph within 2x of CDP, LDP at least
    1.5x the worst Decor gap, CDP in [0.06, 0.13] (the design's CPU reference: 0.090)."""
    import statistics
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    import decor as bench

    from lightning_epfl.datamodules import FederatedDataModule

    gaps = {}
    lrs = {"CDP": 5e-3, "Decor complete": 5e-3, "Decor torus": 5e-3, "Decor ring": 5e-3, "LDP ring": 2e-3}
    for method, lr in lrs.items():
        runs = []
        for seed in range(4):
            dm = FederatedDataModule(
                dataset="breast_cancer", n_clients=16, batch_size=16, test_fraction=0.01, seed=seed
            )
            dm.setup("fit")
            f_star = bench._optimum(*bench._all_data(dm))
            values = bench.run_decor(method, 10.0, seed, 1000, dm, lr=lr)
            runs.append(statistics.mean(values[-5:]) - f_star)
        gaps[method] = statistics.mean(runs)
    worst = max(v for k, v in gaps.items() if k.startswith("Decor"))
    assert 0.06 <= gaps["CDP"] <= 0.13, gaps
    assert worst <= 2 * gaps["CDP"], gaps
    assert gaps["LDP ring"] >= 1.5 * worst, gaps


def test_both_ends_draw_the_same_pairwise_noise_in_secure_mode():
    """The two ends of an edge derive the same key and hence the same ChaCha20 noise; steps and streams differ."""
    from lightning_epfl.strategies.collaborative.secrets import derive_pair_key, generate_key_pairs

    private, public = generate_key_pairs(2)
    at_0 = derive_pair_key(private[0], bytes(public[1].tolist()), (0, 1), b"lightning-epfl/decor")
    at_1 = derive_pair_key(private[1], bytes(public[0].tolist()), (0, 1), b"lightning-epfl/decor")
    a, b = at_0.gaussian(5, 4096), at_1.gaussian(5, 4096)
    assert torch.equal(a, b)
    assert not torch.equal(a, at_0.gaussian(6, 4096)) and not torch.equal(a, at_0.gaussian(5, 4096, stream=1))
    assert abs(float(a.mean())) < 0.06 and abs(float(a.std()) - 1.0) < 0.05


def _fit_ckpt(root, algorithm, steps, topology="ring", ckpt_path=None):
    torch.manual_seed(0)
    model = MLPClassifier(5, [6], 3, optimizer=partial(torch.optim.SGD, lr=0.1))
    tr = _trainer(root, CollaborativeStrategy(algorithm=algorithm, topology=topology), steps)
    tr.fit(model, ToyFederatedData(n_clients=4, dtype=torch.float64), ckpt_path=ckpt_path)
    return tr


def test_resume_refuses_a_spent_budget_and_changed_accounting(tmp_path):
    """A checkpoint whose budget is spent is not trained further; resuming with another noise mode or graph is
    refused (the account would be wrong); the same settings resume and keep epsilon <= target."""
    tr = _fit_ckpt(tmp_path / "a", Decor(target_epsilon=8.0, total_steps=5), steps=5)
    spent = tmp_path / "spent.ckpt"
    tr.save_checkpoint(spent)
    with pytest.raises(MisconfigurationException, match="spent its privacy budget"):
        _fit_ckpt(tmp_path / "b", Decor(target_epsilon=8.0, total_steps=5), steps=8, ckpt_path=str(spent))
    tr = _fit_ckpt(tmp_path / "c", Decor(target_epsilon=8.0, total_steps=10), steps=3)
    mid = tmp_path / "mid.ckpt"
    tr.save_checkpoint(mid)
    with pytest.raises(MisconfigurationException, match="another `noise` \\('decor' there, 'ldp' now\\)"):
        _fit_ckpt(tmp_path / "d", Decor(target_epsilon=8.0, total_steps=10, noise="ldp"), steps=6, ckpt_path=str(mid))
    with pytest.raises(MisconfigurationException, match="another the communication graph|communication graph"):
        _fit_ckpt(tmp_path / "e", Decor(target_epsilon=8.0, total_steps=10), 6, "complete", ckpt_path=str(mid))
    resumed = _fit_ckpt(tmp_path / "f", Decor(target_epsilon=8.0, total_steps=10), steps=6, ckpt_path=str(mid))
    assert resumed.global_step == 6 and resumed.strategy.algorithm.accountant.steps == 6
    assert float(resumed.callback_metrics["privacy/epsilon"]) < 8.0


def test_secure_mode_private_keys_refuse_pickling(tmp_path):
    """The per-client private-noise keys are in-memory secrets like the pair keys: no pickling, hidden repr."""
    import pickle

    tr = _fit(tmp_path, Decor(sigma=0.5, sigma_cor=0.0, noise="ldp", secure_mode=True))
    keys = tr.strategy.algorithm._private_keys
    assert len(keys) == 4 and "hidden" in repr(keys[0]) and keys[0].key.hex() not in repr(keys)
    with pytest.raises(TypeError, match="never serialized"):
        pickle.dumps(keys)
    with pytest.raises(TypeError, match="never serialized"):
        copy.deepcopy(tr.strategy.algorithm)
