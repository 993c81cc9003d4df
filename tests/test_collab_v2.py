"""Collaborative core, second version: baselines against loop references at non-trivial settings, LoRA clients on a
shared frozen base, pairwise keys, neighbour exchange, topology on the context and in checkpoints, any batch."""

from __future__ import annotations

import copy
import pickle
from functools import partial

import lightning as L
import pytest
import torch
from collab_toy import ToyFederatedData
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_epfl.modules.client import MLPClassifier
from lightning_epfl.strategies.collaborative import (
    IFCA,
    ClientStack,
    CollaborativeAlgorithm,
    CollaborativeStrategy,
    Ditto,
    Local,
    LocalCommunicator,
    stack_client_batches,
)


def _model(lr: float = 0.1, seed: int = 0) -> MLPClassifier:
    torch.manual_seed(seed)
    return MLPClassifier(5, [6], 3, optimizer=partial(torch.optim.SGD, lr=lr))


def _trainer(root, strategy, steps: int, precision: str = "64-true", **kw) -> L.Trainer:
    return L.Trainer(
        default_root_dir=root,
        max_steps=steps,
        strategy=strategy,
        accelerator="cpu",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=kw.pop("limit_val_batches", 0),
        **kw,
    )


def _grad(template, params: dict, x, y) -> tuple[dict, float]:
    m = copy.deepcopy(template).double()
    with torch.no_grad():
        for k, p in m.named_parameters():
            p.copy_(params[k])
    loss = m.client_loss((x, y))
    loss.backward()
    return {k: p.grad.clone() for k, p in m.named_parameters()}, float(loss)


def test_ditto_with_positive_lambda_equals_loop_reference(tmp_path):
    """Ditto (lam=0.5): personal v_i <- v_i - lr (grad f_i(v_i) + lam (v_i - w)), w <- w - lr mean_i grad f_i(w)."""
    lam, lr, steps, n = 0.5, 0.1, 4, 4
    dm = ToyFederatedData(n_clients=n, dtype=torch.float64)
    model = _model(lr)
    template = copy.deepcopy(model).double()
    tr = _trainer(tmp_path, CollaborativeStrategy(algorithm=Ditto(lam=lam)), steps)
    tr.fit(model, dm)
    x0 = {k: v.detach().clone().double() for k, v in template.named_parameters()}
    w = {k: v.clone() for k, v in x0.items()}
    v = [{k: t.clone() for k, t in x0.items()} for _ in range(n)]
    for _ in range(steps):
        gw = [_grad(template, w, dm.x[i], dm.y[i])[0] for i in range(n)]
        for i in range(n):
            g = _grad(template, v[i], dm.x[i], dm.y[i])[0]
            v[i] = {k: v[i][k] - lr * (g[k] + lam * (v[i][k] - w[k])) for k in g}
        w = {k: w[k] - lr * sum(g[k] for g in gw) / n for k in w}
    st = tr.strategy
    for i in range(n):
        torch.testing.assert_close(st.stack.row_state_dict(st.stack.X[i]), v[i], atol=1e-10, rtol=0)
    torch.testing.assert_close(st.stack.row_state_dict(st.algorithm.w), w, atol=1e-10, rtol=0)
    assert max(float((v[0][k] - w[k]).abs().max()) for k in w) > 1e-3  # lam > 0 keeps them apart but coupled


def test_ifca_with_two_centres_equals_loop_reference(tmp_path):
    """IFCA (K=2): each client takes the lowest-loss centre, steps from it; each centre = mean of its clients."""
    lr, steps, n, K = 0.1, 4, 4, 2
    dm = ToyFederatedData(n_clients=n, dtype=torch.float64)
    model = _model(lr)
    template = copy.deepcopy(model).double()
    seen = {}

    class Grab(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["centres"] = trainer.strategy.algorithm.centres.clone()

    strategy = CollaborativeStrategy(algorithm=IFCA(n_clusters=K), seed=2)  # seed 2: the centres split the clusters
    tr = _trainer(tmp_path, strategy, steps, callbacks=[Grab()])
    tr.fit(model, dm)
    st = tr.strategy
    centres = [st.stack.row_state_dict(seen["centres"][k]) for k in range(K)]
    assert max(float((centres[0][k] - centres[1][k]).abs().max()) for k in centres[0]) > 1e-3
    history = []
    for _ in range(steps):
        assign, rows = [], []
        for i in range(n):
            losses = [_grad(template, c, dm.x[i], dm.y[i])[1] for c in centres]
            a = min(range(K), key=lambda k: (losses[k], k))
            g = _grad(template, centres[a], dm.x[i], dm.y[i])[0]
            assign.append(a)
            rows.append({k: centres[a][k] - lr * g[k] for k in g})
        for k in range(K):
            members = [rows[i] for i in range(n) if assign[i] == k]
            if members:
                centres[k] = {p: sum(m[p] for m in members) / len(members) for p in members[0]}
        history.append(assign)
    for i in range(n):
        torch.testing.assert_close(st.stack.row_state_dict(st.stack.X[i]), centres[assign[i]], atol=1e-10, rtol=0)
    assert len({a for step in history for a in step}) == 2  # both centres used: the K > 1 machinery is exercised
    assert torch.equal(st.algorithm.assignment, torch.tensor(assign))


# ------------------------------------------------------------------------------------------------------- LoRA clients
class _TextClients(L.LightningDataModule):
    """Dict batches ``{"input_ids": [n, B, T]}`` of random tokens per client (fixed per step)."""

    def __init__(self, n_clients: int = 3, vocab: int = 64) -> None:
        super().__init__()
        from lightning_epfl.datamodules import StreamPosition

        self.n_clients, self.vocab, self.position = n_clients, vocab, StreamPosition()

    def _batch(self, k: int):
        g = torch.Generator().manual_seed(k)
        return {"input_ids": torch.randint(0, self.vocab, (self.n_clients, 2, 12), generator=g)}

    def train_dataloader(self):
        from lightning_epfl.datamodules import ResumableLoader

        return ResumableLoader(self._batch, 4, self.position)

    def val_dataloader(self):
        return torch.utils.data.DataLoader([self._batch(100)], batch_size=None)


def _lora_module():
    from lightning_epfl.modules import CausalLMModule

    torch.manual_seed(0)
    tiny = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 32}  # fmt: skip
    module = CausalLMModule(config=tiny, lora={"r": 2, "lora_alpha": 4}, optimizer=partial(torch.optim.AdamW, lr=1e-2))
    module.configure_model()
    return module


@pytest.mark.parametrize("client_init", ["same", "independent"])
def test_lora_clients_vmap_equal_loop_and_share_one_frozen_base(tmp_path, client_init):
    """A tiny Llama + peft LoRA trains under the strategy: vmap == loop, only adapters stacked (n x trainable
    bytes), the frozen base bit-identical after training, val/loss and val/ppl logged."""
    runs = {}
    for execution in ("vmap", "loop"):
        module = _lora_module()
        base_before = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
        trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
        strategy = CollaborativeStrategy(n_clients=3, execution=execution, client_init=client_init, seed=1)
        tr = _trainer(tmp_path / execution, strategy, 4, "32-true", limit_val_batches=1, val_check_interval=4)
        tr.fit(module, _TextClients())
        X = strategy.stack.X
        assert X.numel() * X.element_size() == 3 * trainable
        assert all("lora_" in s.name for s in strategy.stack.layout)
        for n, p in module.named_parameters():
            if not p.requires_grad:
                assert torch.equal(p, base_before[n]), n
        runs[execution] = (X.detach().clone(), dict(tr.callback_metrics))
    torch.testing.assert_close(runs["vmap"][0], runs["loop"][0], atol=1e-5, rtol=1e-4)
    metrics = runs["vmap"][1]
    assert {"val/loss", "val/ppl", "train/loss"} <= set(metrics)
    rows = runs["vmap"][0]
    assert (rows[0] - rows[1]).abs().max() > 0  # clients trained on their own batches


def test_independent_client_init_is_seeded_per_client():
    """client_init='independent': LoRA A differs per client, B stays zero; rows depend on (seed, client) only."""
    a = ClientStack(_lora_module(), 3, client_init="independent", seed=5)
    b = ClientStack(_lora_module(), 2, client_ids=[1, 2], client_init="independent", seed=5)  # another layout
    torch.testing.assert_close(a.X[1:], b.X)
    names = {s.name: s for s in a.layout}
    lora_a = [s for n, s in names.items() if "lora_A" in n][0]
    lora_b = [s for n, s in names.items() if "lora_B" in n][0]
    cols_a = slice(lora_a.offset, lora_a.offset + lora_a.numel)
    assert not torch.equal(a.X[0, cols_a], a.X[1, cols_a])
    assert torch.all(a.X[:, lora_b.offset : lora_b.offset + lora_b.numel] == 0)
    c = ClientStack(_lora_module(), 3, client_init="independent", seed=6)
    assert not torch.equal(a.X, c.X)


# ------------------------------------------------------------------------------------------------------- keys
def test_pairwise_keys_agree_at_both_ends_and_differ_across_edges():
    """X25519 + HKDF: both ends derive the same key; edges and repeated agreements give different keys."""
    from lightning_epfl.strategies.collaborative.secrets import derive_pair_key, generate_key_pairs

    private, public = generate_key_pairs(3)
    k01 = derive_pair_key(private[0], bytes(public[1].tolist()), (0, 1), b"ctx")
    k10 = derive_pair_key(private[1], bytes(public[0].tolist()), (0, 1), b"ctx")
    assert k01 == k10 and len(k01.key) == 32
    k02 = derive_pair_key(private[0], bytes(public[2].tolist()), (0, 2), b"ctx")
    assert k02.key != k01.key
    assert derive_pair_key(private[0], bytes(public[1].tolist()), (0, 1), b"other").key != k01.key
    comm = LocalCommunicator(4)
    edges = [(0, 1), (1, 2), (2, 3), (3, 0)]
    first, second = comm.agree_pairwise_keys(edges, b"run"), comm.agree_pairwise_keys(edges, b"run")
    assert sorted(first) == [(0, 1), (0, 3), (1, 2), (2, 3)]
    assert len({s.key for s in first.values()}) == 4
    assert all(first[e].key != second[e].key for e in first)  # fresh keys each time
    assert "hidden" in repr(first[(0, 1)]) and first[(0, 1)].key.hex() not in repr(first[(0, 1)])
    with pytest.raises(TypeError, match="never serialized"):
        pickle.dumps(first[(0, 1)])
    with pytest.raises(ValueError, match="self-loop"):
        comm.agree_pairwise_keys([(1, 1)])


class _KeyHolder(CollaborativeAlgorithm):
    """Agrees keys on the topology at setup and keeps them in memory (as Decor will)."""

    def setup(self, ctx):
        self.keys = ctx.pairwise_keys(b"test")


def test_pairwise_keys_never_reach_the_checkpoint(tmp_path):
    """Keys agreed through the step context are not in the checkpoint's bytes; the topology is."""
    algo = _KeyHolder()
    tr = _trainer(tmp_path, CollaborativeStrategy(algorithm=algo, topology="ring"), 2)
    tr.fit(_model(), ToyFederatedData(n_clients=4, dtype=torch.float64))
    assert len(algo.keys) == 4
    path = tmp_path / "k.ckpt"
    tr.save_checkpoint(path)
    raw = path.read_bytes()
    assert all(s.key not in raw for s in algo.keys.values())
    entry = torch.load(path, weights_only=True)["collaborative"]
    assert entry["topology_name"] == "ring" and entry["adjacency"].sum() == 8


# ------------------------------------------------------------------------------------------------------- topology
def test_topology_is_on_the_context_and_restored_from_checkpoints(tmp_path):
    """ctx has W, neighbours and edges; a resumed run uses the checkpoint's topology (with a warning if different)."""
    seen = {}

    class Peek(CollaborativeAlgorithm):
        def after_optimizer_step(self, ctx):
            seen["neighbours"], seen["edges"] = ctx.neighbours, ctx.edges
            seen["rows"] = ctx.exchange_with_neighbours(ctx.X)
            seen["W"] = ctx.mixing_W

    dm = ToyFederatedData(n_clients=4, dtype=torch.float64)
    tr = _trainer(tmp_path / "a", CollaborativeStrategy(algorithm=Peek(), topology="ring"), 2)
    tr.fit(_model(), dm)
    assert seen["neighbours"] == [(1, 3), (0, 2), (1, 3), (0, 2)] and seen["edges"] == [(0, 1), (0, 3), (1, 2), (2, 3)]
    X = tr.strategy.stack.X
    assert torch.equal(seen["rows"][0][3], X[3]) and set(seen["rows"][1]) == {0, 2}
    torch.testing.assert_close(seen["W"].sum(1), torch.ones(4, dtype=torch.float64))
    assert float(seen["W"][0, 1]) == pytest.approx(1 / 3)
    ckpt = tmp_path / "ring.ckpt"
    tr.save_checkpoint(ckpt)
    resumed = _trainer(tmp_path / "b", CollaborativeStrategy(algorithm=Peek(), topology="complete"), 3)
    with pytest.warns(RuntimeWarning, match="topology differs"):
        resumed.fit(_model(), ToyFederatedData(n_clients=4, dtype=torch.float64), ckpt_path=ckpt)
    assert resumed.strategy.topology.name == "ring" and seen["edges"] == [(0, 1), (0, 3), (1, 2), (2, 3)]


# ------------------------------------------------------------------------------------------------------- batches
def test_dict_batches_stack_with_padding_and_mask():
    """Dict batches of unequal length are padded with a 'mask' key; mismatched keys raise naming both."""
    a = {"input_ids": torch.arange(6).view(3, 2)}
    b = {"input_ids": torch.arange(4).view(2, 2)}
    out = stack_client_batches([a, b])
    assert out["input_ids"].shape == (2, 3, 2) and out["mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert torch.equal(out["input_ids"][1, 2], b["input_ids"][0])
    with pytest.raises(ValueError, match=r"client 0 gives a dict with keys \['input_ids'\], client 1 a dict"):
        stack_client_batches([a, {"input_ids": b["input_ids"], "labels": b["input_ids"]}])


def test_unknown_algorithm_argument_is_refused_by_the_cli(tmp_path, capsys):
    """A misspelt algorithm argument in the YAML is refused before anything runs, naming it."""
    from pathlib import Path

    from lightning_epfl.cli import main

    example = Path(__file__).parent.parent / "examples" / "cobo_digits.yaml"
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", str(example), f"--trainer.default_root_dir={tmp_path}",
              "--trainer.strategy.init_args.algorithm.init_args.rhoo=0.3"])  # fmt: skip
    assert exc.value.code != 0
    assert "rhoo" in capsys.readouterr().err
    assert not (tmp_path / "lightning_logs").exists()


def test_local_default_and_wrong_algorithm_type():
    """The default algorithm is Local; a non-algorithm is refused naming the argument."""
    assert isinstance(CollaborativeStrategy().algorithm, Local)
    with pytest.raises(MisconfigurationException, match="`algorithm` must be a CollaborativeAlgorithm"):
        CollaborativeStrategy(algorithm=object())


def test_save_frozen_false_keeps_only_client_tensors_and_resumes(tmp_path):
    """save_frozen=False: the checkpoint holds the stacked adapters but not the shared base; resuming (the base
    rebuilt by the module) continues exactly."""

    def fit(steps, ckpt=None, root="a"):
        module = _lora_module()
        strategy = CollaborativeStrategy(n_clients=3, save_frozen=False)
        tr = _trainer(tmp_path / root, strategy, steps, "32-true")
        tr.fit(module, _TextClients(), ckpt_path=ckpt)
        return tr

    first = fit(2)
    path = tmp_path / "adapters.ckpt"
    first.save_checkpoint(path)
    keys = set(torch.load(path, weights_only=True)["state_dict"])
    assert keys and all("lora_" in k for k in keys)
    resumed = fit(4, str(path), "b")
    straight = fit(4, root="c")
    torch.testing.assert_close(resumed.strategy.stack.X, straight.strategy.stack.X, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------------- trial fixes
def _tiny_lm_fit(tmp_path, algorithm, steps=2, **strategy_kw):
    from lightning_epfl.datamodules import FederatedTextDataModule
    from lightning_epfl.modules import CausalLMModule

    torch.manual_seed(0)
    dm = FederatedTextDataModule(n_clients=4, block_size=16, batch_size=2, steps_per_epoch=2)
    tiny = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2}
    model = CausalLMModule(config=tiny, lora={"r": 2}, optimizer=partial(torch.optim.SGD, lr=0.1))
    tr = _trainer(tmp_path, CollaborativeStrategy(algorithm=algorithm, **strategy_kw), steps, "32-true")
    tr.fit(model, dm)
    return tr


def test_cobo_runs_on_language_model_clients(tmp_path):
    """CoBo's pair gradients on dict batches (LoRA clients on client-partitioned text)."""
    from lightning_epfl.strategies import CoBo

    tr = _tiny_lm_fit(tmp_path, CoBo(rho=0.01, gamma=0.1, pair_batch_size=2, pair_sampling="all"))
    assert float(tr.callback_metrics["cobo/pairs_updated"]) == 6


def test_topology_ignored_by_the_algorithm_warns(tmp_path):
    """A topology given to an algorithm that averages over everyone warns instead of silently doing nothing."""
    from lightning_epfl.strategies import FedAvg

    strategy = CollaborativeStrategy(algorithm=FedAvg(), topology="ring")
    trainer = type("T", (), {"num_devices": 1, "num_nodes": 1, "max_steps": 5})()
    with pytest.warns(RuntimeWarning, match="does not communicate along it"):
        strategy.check_config(trainer, None, ToyFederatedData(n_clients=4))


def test_fedavg_finetune_longer_than_the_run_is_refused_and_its_matrix_follows_the_phase(tmp_path):
    """finetune_steps >= max_steps is refused (it would be Local); the matrix is all ones, then the identity."""
    from lightning_epfl.strategies import FedAvgFineTune

    with pytest.raises(MisconfigurationException, match="`finetune_steps`=5 >= `trainer.max_steps`=5"):
        _trainer(tmp_path, CollaborativeStrategy(algorithm=FedAvgFineTune(finetune_steps=5)), 5).fit(
            _model(), ToyFederatedData(n_clients=4, dtype=torch.float64)
        )
    algo = FedAvgFineTune(finetune_steps=2)
    _trainer(tmp_path, CollaborativeStrategy(algorithm=algo), 5).fit(
        _model(), ToyFederatedData(n_clients=4, dtype=torch.float64)
    )
    assert torch.equal(algo.collaboration_matrix(), torch.eye(4, dtype=torch.float64))


def test_recovery_of_a_structureless_matrix_is_not_noise():
    """All-ones (FedAvg) or identity (Local) matrices have no clusters: ARI 0 against two true clusters, no
    spectral-clustering noise."""
    from lightning_epfl.functional.collab_metrics import recovery_metrics

    truth = torch.tensor([0, 0, 1, 1, 0, 1])
    for W in (torch.ones(6, 6, dtype=torch.float64), torch.eye(6, dtype=torch.float64)):
        rec = recovery_metrics(W, truth)
        assert rec["ari_spectral"] == rec["ari_components"] == pytest.approx(0.0, abs=1e-12)


def test_save_frozen_false_refuses_a_different_base(tmp_path):
    """Adapters saved without their base are refused on another random base (fingerprint mismatch)."""
    first = CollaborativeStrategy(n_clients=3, save_frozen=False)
    tr = _trainer(tmp_path / "a", first, 2, "32-true")
    tr.fit(_lora_module(), _TextClients())
    path = tmp_path / "a.ckpt"
    tr.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["collaborative"]["frozen_fingerprint"]
    other = _lora_module()
    with torch.no_grad():
        next(p for p in other.parameters() if not p.requires_grad).add_(1.0)  # another base
    tr2 = _trainer(tmp_path / "b", CollaborativeStrategy(n_clients=3, save_frozen=False), 4, "32-true")
    with pytest.raises(MisconfigurationException, match="trained on another frozen base"):
        tr2.fit(other, _TextClients(), ckpt_path=str(path))


def test_cli_unknown_option_is_one_line_with_its_key(tmp_path, capsys):
    """A misspelt option prints one line naming the key and class, exit status 1."""
    from pathlib import Path

    from lightning_epfl.cli import main

    example = Path(__file__).parent.parent / "examples" / "cobo_digits.yaml"
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", str(example), "--trainer.strategy.init_args.algorithm.init_args.gama=0.1"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 1
    assert last == (
        "lightning-epfl: error: trainer.strategy.algorithm (lightning_epfl.strategies.CoBo): Option 'gama' is not "
        "accepted"
    )
