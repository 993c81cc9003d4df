"""Client-partitioned text: per-client documents, dict batches, determinism, resume, LM clients under the strategy."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_epfl.datamodules import FederatedTextDataModule, TextDataModule
from lightning_epfl.modules import CausalLMModule
from lightning_epfl.strategies import CollaborativeStrategy, FedAvg


def test_pydoc_topics_are_dealt_to_clients_without_overlap():
    """Each client gets a contiguous run of topics; together they are the whole corpus; batches are dicts."""
    from lightning_epfl.datamodules.text import pydoc_documents

    dm = FederatedTextDataModule(n_clients=4, block_size=32, batch_size=3)
    docs = dm.client_documents()
    assert sum(len(d) for d in docs) == len(pydoc_documents()) and all(docs)
    assert [t for d in docs for t in d] == pydoc_documents()
    dm.setup()
    batch = dm.train_batch(5)
    assert set(batch) == {"input_ids"} and batch["input_ids"].shape == (4, 3, 32)
    again = FederatedTextDataModule(n_clients=4, block_size=32, batch_size=3)
    assert torch.equal(again.train_batch(5)["input_ids"], batch["input_ids"])  # a pure function of (seed, k)
    assert torch.equal(dm.train_batch(5, client_ids=[2])["input_ids"][0], batch["input_ids"][2])  # any layout


def test_client_batches_walk_each_clients_own_permutation(tmp_path):
    """Client i's batches over one epoch visit each of its blocks once (its own seeded order)."""
    texts = []
    for i in range(2):
        p = tmp_path / f"c{i}.txt"
        p.write_text("\n\n".join(f"client {i} paragraph {j} " + "abcdefgh" * (j % 5 + 1) for j in range(300)))
        texts.append([str(p)])
    dm = FederatedTextDataModule(n_clients=2, client_paths=texts, block_size=16, batch_size=4, val_fraction=0.2)
    dm.setup()
    n0 = len(dm._train[0])
    epoch = [j for k in range(n0 // 4) for j in dm.client_batch_indices(0, k)]
    assert len(set(epoch)) == len(epoch) == 4 * (n0 // 4) and epoch != sorted(epoch)  # no block twice, shuffled
    assert dm.client_batch_indices(0, 0) != dm.client_batch_indices(1, 0)  # each client its own order
    batch = dm.train_batch(0, [0])["input_ids"][0]
    assert torch.equal(batch[1], dm._train[0][dm.client_batch_indices(0, 0)[1]]["input_ids"])
    assert b"client 1" not in bytes(
        torch.cat([dm.train_batch(k, [0])["input_ids"].flatten() for k in range(5)]).tolist()
    )


def test_lm_clients_train_under_the_strategy_with_federated_text(tmp_path):
    """LoRA clients on a shared tiny Llama learn from their own text (FedAvg); val/loss and val/ppl are logged; a
    resumed run equals the uninterrupted one."""

    def fit(steps, ckpt=None):
        torch.manual_seed(0)
        dm = FederatedTextDataModule(n_clients=4, block_size=32, batch_size=2, steps_per_epoch=3)
        tiny = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2}
        model = CausalLMModule(config=tiny, lora={"r": 2}, optimizer=partial(torch.optim.AdamW, lr=1e-2))
        trainer = L.Trainer(
            max_steps=steps, strategy=CollaborativeStrategy(algorithm=FedAvg(), seed=0), accelerator="cpu",
            devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            limit_val_batches=2, val_check_interval=3, default_root_dir=tmp_path, enable_checkpointing=False,
        )  # fmt: skip
        trainer.fit(model, dm, ckpt_path=ckpt)
        return trainer

    straight = fit(5)
    metrics = straight.callback_metrics
    assert {"val/loss", "val/ppl", "train/loss"} <= set(metrics)
    per_client = straight.strategy.last_client_metrics["val"]  # every metric is the mean of the clients' values
    assert float(metrics["val/loss"]) == pytest.approx(float(per_client["loss"].mean()), rel=1e-5)
    assert float(metrics["val/ppl"]) == pytest.approx(float(per_client["loss"].exp().mean()), rel=1e-5)
    assert len(set(per_client["loss"].tolist())) == 4
    first = fit(3)
    first.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = fit(5, str(tmp_path / "mid.ckpt"))
    assert torch.equal(resumed.strategy.stack.X, straight.strategy.stack.X)


def test_federated_text_bad_input(tmp_path):
    """Bad arguments raise naming the argument; a client with too little text fails in setup."""
    with pytest.raises(MisconfigurationException, match="`n_clients`"):
        FederatedTextDataModule(n_clients=0)
    with pytest.raises(MisconfigurationException, match="`client_paths` must hold one list per client"):
        FederatedTextDataModule(n_clients=2, client_paths=[["a.txt"]])
    with pytest.raises(MisconfigurationException, match="`paths` entry"):
        FederatedTextDataModule(n_clients=1, client_paths=[[str(tmp_path / "missing.txt")]])
    small = tmp_path / "small.txt"
    small.write_text("tiny\n\ntext")
    dm = FederatedTextDataModule(n_clients=1, client_paths=[[str(small)]], block_size=64)
    with pytest.raises(MisconfigurationException, match="client 0's train text"):
        dm.setup()
    assert isinstance(dm.clients[0], TextDataModule)
