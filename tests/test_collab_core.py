"""Collaborative core: stacking, execution, surrogate loss, stacked optimizers, communicator, baselines, resume."""

from __future__ import annotations

import copy
from functools import partial

import lightning as L
import pytest
import torch
from collab_toy import ToyFederatedData
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_epfl.modules.client import MLPClassifier
from lightning_epfl.strategies.collaborative import (
    IFCA,
    ClientStack,
    CoBo,
    CollaborativeStrategy,
    Ditto,
    FedAvg,
    Local,
    LocalCommunicator,
    Oracle,
    stack_client_batches,
)


def _model(lr: float = 0.1, momentum: float = 0.0, opt=torch.optim.SGD, seed: int = 0, **kw) -> MLPClassifier:
    torch.manual_seed(seed)
    if opt is torch.optim.SGD:
        factory = partial(torch.optim.SGD, lr=lr, momentum=momentum, **kw)
    else:
        factory = partial(opt, lr=lr, **kw)
    return MLPClassifier(5, [6], 3, optimizer=factory)


def _trainer(tmp_path, strategy, max_steps: int, double: bool = True, **kw) -> L.Trainer:
    return L.Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        strategy=strategy,
        accelerator="cpu",
        devices=1,
        precision="64-true" if double else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=kw.pop("limit_val_batches", 0),
        **kw,
    )


def _ref_grad(template: MLPClassifier, flat: dict[str, torch.Tensor], x, y) -> dict[str, torch.Tensor]:
    """Slow reference: autograd on an ordinary one-client module."""
    m = copy.deepcopy(template).double()
    with torch.no_grad():
        for k, p in m.named_parameters():
            p.copy_(flat[k])
    m.zero_grad()
    m.client_loss((x, y)).backward()
    return {k: p.grad.detach().clone() for k, p in m.named_parameters()}


def _rows(model: MLPClassifier) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ------------------------------------------------------------------------------------------------------- stacking
def test_stack_parameters_are_views_of_flat_buffer():
    """Stacked parameters are leaves sharing X's storage; an optimizer step lands in X; layout covers d."""
    model = _model()
    w0 = model.net[0].weight.detach().clone()
    stack = ClientStack(model, n_local=3)
    assert model.net[0].weight.shape == (3, 6, 5) and model.net[0].weight.is_leaf
    assert torch.equal(model.net[0].weight[2], w0)
    assert sum(s.numel for s in stack.layout) == stack.d == 5 * 6 + 6 + 6 * 3 + 3
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert torch.allclose(stack.X, stack.flatten({k: v.detach() for k, v in model.named_parameters()}))
    assert torch.allclose(stack.X[:, : 6 * 5], (w0.reshape(1, -1) - 1).expand(3, -1))


def test_stack_vmap_matches_loop_and_autograd():
    """vmap and loop execution give the same losses and gradients as autograd on separate modules (1e-6)."""
    dm = ToyFederatedData(n_clients=4, dtype=torch.float32)
    batch = dm.train_batch(tuple(range(4)), 0)
    model = _model()
    template = copy.deepcopy(model)
    stack = ClientStack(model, 4)
    X = stack.X + 0.1 * torch.randn(stack.X.shape, generator=torch.Generator().manual_seed(1))
    Gv, lv = stack.loss_and_grad(X, batch)
    stack.execution = "loop"
    Gl, ll = stack.loss_and_grad(X, batch)
    torch.testing.assert_close(Gv, Gl, atol=1e-6, rtol=0)
    torch.testing.assert_close(lv, ll, atol=1e-6, rtol=0)
    for i in range(4):
        n_i = dm.client_sizes[i]
        ref = _ref_grad(template, stack.row_state_dict(X[i]), dm.x[i].double(), dm.y[i])
        got = stack.unflatten(Gv[i])
        assert batch[0].shape[1] == max(dm.client_sizes) and batch[2][i].sum() == n_i  # padded with a mask
        for k in ref:
            torch.testing.assert_close(got[k].double(), ref[k], atol=1e-6, rtol=0)


def test_stack_client_batches_pads_with_mask():
    """Unequal client batches are padded and masked; equal ones are stacked as is."""
    a = (torch.zeros(2, 3), torch.tensor([1, 2]))
    b = (torch.ones(3, 3), torch.tensor([0, 1, 2]))
    x, y, mask = stack_client_batches([a, b])
    assert x.shape == (2, 3, 3) and mask.tolist() == [[1, 1, 0], [1, 1, 1]] and y[0, 2] == 1
    assert len(stack_client_batches([a, a])) == 2


# ------------------------------------------------------------------------------------------------------- strategy
def test_strategy_surrogate_loss_and_grads(tmp_path):
    """The surrogate's value is the mean client loss and Lightning's backward leaves exactly G in .grad."""
    seen = {}

    class Probe(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            st = trainer.strategy
            seen["grad"] = st.stack.grads_flat().clone()
            seen["G"] = st.ctx.G.clone()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen["loss"] = outputs["loss"].detach().clone()
            seen["losses"] = trainer.strategy.stack.losses(seen["X0"], batch)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["X0"] = trainer.strategy.stack.X.detach().clone()

    dm = ToyFederatedData(n_clients=4, dtype=torch.float64)
    model = _model()
    tr = _trainer(tmp_path, CollaborativeStrategy(algorithm=Local()), 1, callbacks=[Probe()])
    tr.fit(model, dm)
    assert torch.equal(seen["grad"], seen["G"])
    torch.testing.assert_close(seen["loss"], seen["losses"].mean(), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("opt", "kw"),
    [(torch.optim.SGD, {"momentum": 0.9, "weight_decay": 0.01}), (torch.optim.Adam, {}), (torch.optim.AdamW, {})],
)
def test_stacked_optimizer_equals_separate_optimizers(opt, kw):
    """One element-wise optimizer over [n, ...] tensors equals n optimizers on n modules after 10 steps (1e-6)."""
    n = 3
    models = [_model(opt=opt, lr=0.05, **kw) for _ in range(n)]
    stacked = _model(opt=opt, lr=0.05, **kw)
    ClientStack(stacked, n)
    opts = [m.configure_optimizers() for m in models]
    sopt = stacked.configure_optimizers()
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        grads = [{k: torch.randn(p.shape, generator=g) for k, p in models[0].named_parameters()} for _ in range(n)]
        for m, o, gr in zip(models, opts, grads):
            for k, p in m.named_parameters():
                p.grad = gr[k].clone()
            o.step()
        for k, p in stacked.named_parameters():
            p.grad = torch.stack([gr[k] for gr in grads])
        sopt.step()
    for i, m in enumerate(models):
        for k, p in m.named_parameters():
            torch.testing.assert_close(stacked.get_parameter(k)[i], p, atol=1e-6, rtol=0)


def test_local_communicator_contract():
    """all_gather keeps client order, mix equals a dense W @ X, exchange returns the right rows."""
    comm = LocalCommunicator(4)
    X = torch.arange(12.0).reshape(4, 3)
    W = torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(comm.all_gather(X), X)
    torch.testing.assert_close(comm.mix(X, W), W @ X)
    out = comm.exchange(X, [[1], [0, 3], [], [2]])
    assert torch.equal(out[1][3], X[3]) and set(out[1]) == {0, 3} and out[2] == {}
    assert torch.equal(comm.broadcast(X, 2), X[2])
    assert torch.equal(comm.all_reduce(X, "mean"), X)


# ------------------------------------------------------------------------------------------------------- baselines
def _run(tmp_path, algorithm, steps=4, n=4, lr=0.1, momentum=0.0, **kw):
    dm = ToyFederatedData(n_clients=n, dtype=torch.float64)
    model = _model(lr=lr, momentum=momentum)
    template = copy.deepcopy(model).double()
    tr = _trainer(tmp_path, CollaborativeStrategy(algorithm=algorithm, **kw), steps)
    tr.fit(model, dm)
    return dm, template, tr


def _reference_fedavg(dm, template, groups, steps, lr):
    """Loop reference: per group, SGD on the mean of the members' full-batch gradients."""
    x0 = {k: v.detach().clone() for k, v in template.named_parameters()}
    out = {}
    for members in groups:
        x = {k: v.clone() for k, v in x0.items()}
        for _ in range(steps):
            grads = [_ref_grad(template, x, dm.x[i], dm.y[i]) for i in members]
            x = {k: x[k] - lr * sum(g[k] for g in grads) / len(grads) for k in x}
        out.update({i: x for i in members})
    return out


def test_fedavg_equals_sgd_on_mean_gradient(tmp_path):
    """FedAvg (local_steps=1, SGD, uniform) equals SGD on the mean client gradient (1e-10, float64)."""
    dm, template, tr = _run(tmp_path, FedAvg(), steps=4)
    ref = _reference_fedavg(dm, template, [range(4)], 4, 0.1)
    rows = tr.strategy.stack.X
    for i in range(4):
        torch.testing.assert_close(tr.strategy.stack.row_state_dict(rows[i]), ref[i], atol=1e-10, rtol=0)


def test_oracle_equals_per_cluster_fedavg(tmp_path):
    """Oracle equals FedAvg run separately inside each true cluster (1e-10)."""
    dm, template, tr = _run(tmp_path, Oracle(), steps=4)
    groups = [[i for i in range(4) if dm.true_clusters[i] == c] for c in range(2)]
    ref = _reference_fedavg(dm, template, groups, 4, 0.1)
    for i in range(4):
        torch.testing.assert_close(tr.strategy.stack.row_state_dict(tr.strategy.stack.X[i]), ref[i], atol=1e-10, rtol=0)


def test_ifca_single_cluster_equals_fedavg(tmp_path):
    """IFCA with K=1 equals FedAvg started from the same point (1e-10)."""
    dm, template, tr = _run(tmp_path, IFCA(1), steps=4)
    template_c = copy.deepcopy(template)
    with torch.no_grad():
        centre0 = IFCA(1)
        # IFCA starts from its centre 0: rebuild it exactly as the algorithm does, then run the FedAvg reference.
        stack = ClientStack(copy.deepcopy(template), 1)
        from lightning_epfl.strategies.collaborative.algorithm import StepContext

        centre0.setup(StepContext(stack=stack, comm=LocalCommunicator(1)))
        for k, v in stack.row_state_dict(centre0.centres[0]).items():
            template_c.get_parameter(k).copy_(v)
    ref = _reference_fedavg(dm, template_c, [range(4)], 4, 0.1)
    for i in range(4):
        torch.testing.assert_close(tr.strategy.stack.row_state_dict(tr.strategy.stack.X[i]), ref[i], atol=1e-10, rtol=0)
    assert torch.equal(tr.strategy.algorithm.collaboration_matrix(), torch.ones(4, 4, dtype=torch.float64))


def test_ditto_lambda_zero_is_local_and_fedavg(tmp_path):
    """Ditto with lambda=0: personal models equal Local, the global model equals FedAvg (1e-10)."""
    dm, template, tr = _run(tmp_path, Ditto(lam=0.0), steps=3)
    ref_fed = _reference_fedavg(dm, template, [range(4)], 3, 0.1)
    ref_loc = _reference_fedavg(dm, template, [[i] for i in range(4)], 3, 0.1)
    st = tr.strategy
    torch.testing.assert_close(st.stack.row_state_dict(st.algorithm.w), ref_fed[0], atol=1e-10, rtol=0)
    for i in range(4):
        torch.testing.assert_close(st.stack.row_state_dict(st.stack.X[i]), ref_loc[i], atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------------------------------- resume
def _cobo() -> CoBo:
    return CoBo(rho=0.2, gamma=0.5, pair_batch_size=-1, pair_sampling="mixed", pair_warmup_steps=3, pair_decay=1.0)


@pytest.mark.parametrize("algorithm", ["cobo", "ifca"])
def test_resume_mid_run_reproduces_uninterrupted_run(tmp_path, algorithm):
    """10 steps + checkpoint + 10 more equals 20 straight steps: stacked weights, momentum and algorithm state."""

    def make(steps, sub):
        alg = _cobo() if algorithm == "cobo" else IFCA(n_clusters=2)
        return _model(lr=0.1, momentum=0.9), _trainer(tmp_path / sub, CollaborativeStrategy(algorithm=alg), steps)

    model, tr = make(20, "straight")
    tr.fit(model, ToyFederatedData(n_clients=4, dtype=torch.float64))
    m1, t1 = make(10, "first")
    t1.fit(m1, ToyFederatedData(n_clients=4, dtype=torch.float64))
    ckpt = tmp_path / "mid.ckpt"
    t1.save_checkpoint(ckpt)
    m2, t2 = make(20, "second")
    t2.fit(m2, ToyFederatedData(n_clients=4, dtype=torch.float64), ckpt_path=ckpt)
    assert t2.global_step == 20
    assert torch.equal(t2.strategy.stack.X, tr.strategy.stack.X)
    assert torch.equal(t2.strategy.collaboration_matrix(), tr.strategy.collaboration_matrix())
    s_ref = tr.strategy.optimizers[0].state_dict()["state"]
    s_got = t2.strategy.optimizers[0].state_dict()["state"]
    for k in s_ref:
        assert torch.equal(s_ref[k]["momentum_buffer"], s_got[k]["momentum_buffer"])
    if algorithm == "cobo":
        assert not torch.equal(tr.strategy.collaboration_matrix(), CoBo().initial_W(4))  # W did move


# ------------------------------------------------------------------------------------------------------- bad input
def test_bad_input_errors(tmp_path, monkeypatch):
    """Bad arguments raise early with the argument's name."""
    with pytest.raises(MisconfigurationException, match="`topology` must be one of"):
        CollaborativeStrategy(topology="hypercube")
    with pytest.raises(MisconfigurationException, match="`rho` must be >= 0"):
        CoBo(rho=-0.1)
    with pytest.raises(MisconfigurationException, match="`gamma` must be > 0"):
        CoBo(gamma=0.0)
    with pytest.raises(MisconfigurationException, match="`pair_batch_size`"):
        CoBo(pair_batch_size=-2)
    with pytest.raises(MisconfigurationException, match="`n_clusters` must be >= 1"):
        IFCA(n_clusters=0)
    with pytest.raises(MisconfigurationException, match="`w_init`"):
        CoBo(domain="simplex", w_init=0.0)
    with pytest.raises(TypeError, match="baseline"):
        CoBo(baseline="fedavg")  # one algorithm per class: no switch to other algorithms
    with pytest.raises(MisconfigurationException, match="`algorithm` must be a CollaborativeAlgorithm"):
        CollaborativeStrategy(algorithm="cobo")
    disconnected = [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]
    with pytest.raises(
        MisconfigurationException, match=r"`topology` is disconnected: 2 components \[\[0, 1\], \[2, 3\]\]"
    ):
        CollaborativeStrategy(topology=disconnected)
    with pytest.raises(MisconfigurationException, match="`topology`='ring' with 2 clients"):
        CollaborativeStrategy(topology="ring").check_config(
            type("T", (), {"num_devices": 1, "num_nodes": 1})(), None, ToyFederatedData(n_clients=2)
        )
    dm = ToyFederatedData(n_clients=4)
    with pytest.raises(MisconfigurationException, match="`n_clients`=6 does not match the datamodule's partition"):
        _trainer(tmp_path, CollaborativeStrategy(n_clients=6), 1, double=False).fit(_model(), dm)
    st = CollaborativeStrategy(n_clients=6)
    four_processes = type("T", (), {"num_devices": 4, "num_nodes": 1, "datamodule": None})()
    with pytest.raises(
        MisconfigurationException,
        match=r"`n_clients`=6 must be divisible.* = 4; use `trainer.devices` in \[1, 2, 3, 6\]",
    ):
        st.check_config(four_processes, None, None)


def test_bad_trainer_settings_are_refused(tmp_path):
    """gradient_clip_val, BatchNorm, unstable rho and non-element-wise optimizers are refused in setup."""
    dm = ToyFederatedData(n_clients=4)
    with pytest.raises(MisconfigurationException, match="gradient_clip_val"):
        _trainer(tmp_path, CollaborativeStrategy(), 1, double=False, gradient_clip_val=1.0).fit(_model(), dm)
    bn = _model()
    bn.net.insert(1, nn.BatchNorm1d(6))
    with pytest.raises(MisconfigurationException, match="BatchNorm"):
        _trainer(tmp_path, CollaborativeStrategy(), 1, double=False).fit(bn, dm)
    with pytest.raises(MisconfigurationException, match=r"unstable consensus: eta\*rho\*lambda_max"):
        _trainer(tmp_path, CollaborativeStrategy(algorithm=CoBo(rho=6.0)), 1, double=False).fit(_model(lr=0.1), dm)
    lbfgs = MLPClassifier(5, [6], 3, optimizer=partial(torch.optim.LBFGS, lr=0.1))
    with pytest.raises(MisconfigurationException, match="LBFGS is not element-wise"):
        _trainer(tmp_path, CollaborativeStrategy(), 1, double=False).fit(lbfgs, dm)
    dm_workers = ToyFederatedData(n_clients=4)
    dm_workers.train_dataloader = lambda: torch.utils.data.DataLoader(
        [dm_workers.train_batch(tuple(range(4)), 0)] * 2, batch_size=None, num_workers=1
    )
    with pytest.raises(MisconfigurationException, match="`num_workers`=1"):
        _trainer(tmp_path, CollaborativeStrategy(), 1, double=False).fit(_model(), dm_workers)
    with pytest.raises(MisconfigurationException, match="Oracle needs `datamodule.true_clusters`"):
        dm2 = ToyFederatedData(n_clients=4)
        dm2.true_clusters = None
        _trainer(tmp_path, CollaborativeStrategy(algorithm=Oracle()), 1, double=False).fit(_model(), dm2)


def test_evaluation_logs_per_client_metrics(tmp_path):
    """val/acc (mean over clients), val/acc_min and val/acc_client_i equal the per-client accuracies by hand."""
    dm = ToyFederatedData(n_clients=4, dtype=torch.float64)
    tr = _trainer(tmp_path, CollaborativeStrategy(log_per_client=True), 2, limit_val_batches=1, val_check_interval=2)
    tr.fit(_model(), dm)
    st = tr.strategy
    accs = []
    for i in range(4):
        m = MLPClassifier(5, [6], 3).double()
        m.load_state_dict(st.client_state_dict(i))
        accs.append(float((m(dm.x[i]).argmax(1) == dm.y[i]).double().mean()))
    got = tr.callback_metrics
    assert abs(float(got["val/acc"]) - sum(accs) / 4) < 1e-6  # logged as float32
    assert abs(float(got["val/acc_min"]) - min(accs)) < 1e-6
    assert abs(float(got["val/acc_client_3"]) - accs[3]) < 1e-6
