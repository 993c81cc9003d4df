"""Simulated (one process) vs multi-process (2 CPU processes, gloo) collaborative runs give the same parameters."""

from __future__ import annotations

import os
import socket
from functools import partial

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from collab_toy import ToyFederatedData

from lightning_epfl.modules.client import MLPClassifier
from lightning_epfl.strategies.collaborative import (
    CoBo,
    CollaborativeStrategy,
    Decor,
    FedAvg,
    Local,
    TorchDistributedCommunicator,
)

BASELINES = ("local", "fedavg", "cobo")
TRUST = ("weight_similarity", "validation", "prediction")
STEPS = 5
TOL = 1e-10  # float64; only the order of floating-point sums differs between layouts


def _strategy(baseline: str, **kw) -> CollaborativeStrategy:
    # pair batches of 4 random examples exercise the per-client extra-batch streams in both layouts
    algorithm = {
        "local": Local,
        "fedavg": FedAvg,
        "cobo": lambda: CoBo(rho=0.3, gamma=0.5, w_init=0.5, pair_batch_size=4, pair_warmup_steps=2),
        "decor": lambda: Decor(sigma=0.2, sigma_cor=1.5, clip_norm=0.5),
    }[baseline]()
    return CollaborativeStrategy(algorithm=algorithm, seed=3, **kw)


def _fit(
    root, baseline: str, devices: int, steps: int = STEPS, ckpt_path=None, limit_val_batches=0, **strategy_kw
) -> L.Trainer:
    torch.manual_seed(0)
    model = MLPClassifier(5, [6], 3, optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9))
    trainer = L.Trainer(
        default_root_dir=root,
        max_steps=steps,
        strategy=_strategy(baseline, **strategy_kw),
        accelerator="cpu",
        devices=devices,
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=limit_val_batches,
        val_check_interval=STEPS if limit_val_batches else None,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, ToyFederatedData(n_clients=4, batch_size=3, dtype=torch.float64), ckpt_path=ckpt_path)
    return trainer


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    results = {}
    for baseline in BASELINES:
        trainer = _fit(out, baseline, devices=world)
        st = trainer.strategy
        W = st.collaboration_matrix()
        results[baseline] = {"X": st.comm.all_gather(st.stack.X.detach()), "W": W, "ids": st.local_client_ids}
        if baseline == "cobo":
            trainer.save_checkpoint(os.path.join(out, "p2.ckpt"))
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # epoch-level logs of the strategy under 2 processes
        warnings.simplefilter("always")
        trainer = _fit(out, "cobo", devices=world, limit_val_batches=1)
    results["sync_dist_warnings"] = [str(w.message) for w in caught if "sync_dist" in str(w.message)]
    # neighbour-only exchange on a ring over the two processes, pairwise keys, independent client init
    trainer = _fit(out, "local", devices=world, steps=1, topology="ring", client_init="independent")
    st = trainer.strategy
    rows = st.ctx.exchange_with_neighbours(st.stack.X.detach())
    received = [{j: r for j, r in got.items()} for got in rows]
    keys = st.ctx.pairwise_keys(b"test")
    import hashlib

    digests = {e: hashlib.sha256(k.key).hexdigest() for e, k in keys.items()}
    everything = [None] * world
    dist.all_gather_object(everything, {"received": received, "digests": digests, "ids": st.local_client_ids})
    results["exchange"] = everything
    results["X_independent"] = st.comm.all_gather(st.stack.X.detach())
    # Decor on a ring over the two processes: parameters, and the pairwise noise cancelling across processes
    trainer = _fit(out, "decor", devices=world, topology="ring")
    st = trainer.strategy
    results["X_decor"] = st.comm.all_gather(st.stack.X.detach())
    algo = st.algorithm
    algo.sigma = 0.0  # pairwise part only
    st.ctx.step = 3
    results["decor_pair_noise"] = st.comm.all_gather(algo.noise_for(st.ctx))
    # TrustWeighted LoRA clients (tiny Llama, float64, dropout 0): W and adapters for the collective trust schemes
    from test_trust_weighted import _fast
    from test_trust_weighted import _fit as _fit_lm

    for trust in TRUST:
        trainer = _fit_lm(out, _fast(trust), steps=4, devices=world)
        st = trainer.strategy
        results[f"trust_{trust}"] = {"X": st.comm.all_gather(st.stack.X.detach()), "W": st.algorithm.W}
    try:
        TorchDistributedCommunicator(3)
    except ValueError as err:
        results["divisibility_error"] = str(err)
    if rank == 0:
        torch.save(results, os.path.join(out, "p2.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("p2"))
    # fork: the children inherit the imported modules (spawn would re-import torch and Lightning in each)
    mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="fork")
    return out, torch.load(os.path.join(out, "p2.pt"), weights_only=False)


@pytest.mark.parametrize("baseline", BASELINES)
def test_simulated_equals_two_processes(tmp_path, two_process_results, baseline):
    """Local, FedAvg and CoBo: P=1 (vmap) and P=2 (gloo) give the same parameters and W after 5 steps (1e-10)."""
    _, results = two_process_results
    trainer = _fit(tmp_path, baseline, devices=1)
    torch.testing.assert_close(trainer.strategy.stack.X, results[baseline]["X"], atol=TOL, rtol=0)
    if baseline == "cobo":
        W = trainer.strategy.collaboration_matrix()
        torch.testing.assert_close(W, results[baseline]["W"], atol=TOL, rtol=0)
        assert (W - 0.5 * (1 - torch.eye(4, dtype=torch.float64))).abs().max() > 1e-3
    assert results[baseline]["ids"] == (0, 1)
    assert "world size 2" in results["divisibility_error"]
    assert results["sync_dist_warnings"] == []  # evaluation metrics are logged with sync_dist under 2 processes


def test_two_process_checkpoint_resumes_in_one_process(tmp_path, two_process_results):
    """A CoBo checkpoint written by 2 processes resumes under P=1 and equals an uninterrupted P=1 run (1e-10)."""
    out, _ = two_process_results
    resumed = _fit(tmp_path / "a", "cobo", devices=1, steps=STEPS + 3, ckpt_path=os.path.join(out, "p2.ckpt"))
    straight = _fit(tmp_path / "b", "cobo", devices=1, steps=STEPS + 3)
    torch.testing.assert_close(resumed.strategy.stack.X, straight.strategy.stack.X, atol=TOL, rtol=0)
    W_resumed, W_straight = resumed.strategy.collaboration_matrix(), straight.strategy.collaboration_matrix()
    torch.testing.assert_close(W_resumed, W_straight, atol=TOL, rtol=0)


def test_two_process_exchange_keys_and_independent_init(tmp_path, two_process_results):
    """Ring neighbour exchange over 2 processes returns the neighbours' rows; both ends of an edge that crosses
    processes derive the same key; independent client init equals the simulated layout's."""
    _, results = two_process_results
    trainer = _fit(tmp_path, "local", devices=1, steps=1, topology="ring", client_init="independent")
    X = trainer.strategy.stack.X.detach()
    torch.testing.assert_close(results["X_independent"], X, atol=TOL, rtol=0)
    ring = {0: (1, 3), 1: (0, 2), 2: (1, 3), 3: (0, 2)}
    for part in results["exchange"]:
        for k, cid in enumerate(part["ids"]):
            assert sorted(part["received"][k]) == list(ring[cid])
            for j, row in part["received"][k].items():
                torch.testing.assert_close(row, results["X_independent"][j], atol=0, rtol=0)
    d0, d1 = results["exchange"][0]["digests"], results["exchange"][1]["digests"]
    crossing = [e for e in d0 if e in d1]
    assert sorted(crossing) == [(0, 3), (1, 2)]  # clients 0,1 on rank 0 and 2,3 on rank 1
    assert all(d0[e] == d1[e] for e in crossing) and len(set(d0.values())) == len(d0)


def test_two_process_decor_equals_simulated_and_noise_cancels(tmp_path, two_process_results):
    """Decor (ring, secure_mode=False) gives the same parameters with 1 and 2 processes (1e-10); the pairwise noise
    drawn by the two processes sums to zero over all clients."""
    _, results = two_process_results
    trainer = _fit(tmp_path, "decor", devices=1, topology="ring")
    torch.testing.assert_close(trainer.strategy.stack.X, results["X_decor"], atol=TOL, rtol=0)
    z = results["decor_pair_noise"]
    assert float(z.abs().max()) > 0.5 and float(z.sum(0).abs().max()) <= 1e-10 * 1.5 * z.shape[1] ** 0.5


@pytest.mark.parametrize("trust", TRUST)
def test_two_process_trust_weighted_equals_simulated(tmp_path, two_process_results, trust):
    """TrustWeighted on LoRA clients: P=1 and P=2 (gloo) give the same W and adapters (float64, dropout 0)."""
    from test_trust_weighted import _fast
    from test_trust_weighted import _fit as _fit_lm

    _, results = two_process_results
    trainer = _fit_lm(tmp_path, _fast(trust), steps=4)
    got = results[f"trust_{trust}"]
    torch.testing.assert_close(got["W"], trainer.strategy.algorithm.W, atol=TOL, rtol=0)
    torch.testing.assert_close(got["X"], trainer.strategy.stack.X, atol=TOL, rtol=0)
    assert trainer.strategy.algorithm.rounds == 3
