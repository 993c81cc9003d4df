import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_epfl.datamodules.federated import FederatedDataModule
from lightning_epfl.datamodules.tabular import load_sklearn_arrays
from lightning_epfl.seeding import counter_hash


class _StackedLinear(LightningModule):
    """One shared linear model trained on the flattened client-stacked batches (a datamodule consumer)."""

    def __init__(self, in_features: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(in_features, num_classes)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        return F.cross_entropy(self.lin(x.flatten(0, 1)), y.flatten())

    def validation_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        self.log("val/loss", F.cross_entropy(self.lin(x.flatten(0, 1)), y.flatten()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _dm(**kw):
    args = {"n_clients": 8, "partition": "label_permutation_clusters", "n_clusters": 4, "standardize": False}
    args.update(kw)
    dm = FederatedDataModule(**args)
    dm.setup("fit")
    return dm


def test_federated_80_clients_10_permutation_clusters():
    """80 clients / 10 permutation clusters on digits: shapes, true clusters and labels equal pi_k(original)."""
    dm = _dm(n_clients=80, n_clusters=10)
    x_raw, y_raw = load_sklearn_arrays("digits")
    assert dm.n_clients == 80
    assert torch.bincount(dm.true_clusters).tolist() == [8] * 10
    assert sum(dm.client_sizes) == 1797 - math.ceil(0.3 * 1797)
    x, y = dm.train_batch(0)
    assert x.shape == (80, 16, 64) and y.shape == (80, 16) and y.dtype == torch.long
    label_map = dm.client_partition.label_map
    for i in (0, 9, 41, 79):
        gidx = dm.client_indices(i)
        xi, yi = dm.client_data(i)
        assert torch.equal(xi, torch.from_numpy(x_raw)[gidx])
        assert torch.equal(yi, label_map[dm.true_clusters[i]][torch.from_numpy(y_raw)[gidx]])
    xe, ye = next(iter(dm.val_dataloader()))
    assert xe.shape == (80, 540, 64)
    assert torch.equal(xe[0], xe[79])
    for i in range(80):
        assert torch.equal(ye[i], label_map[dm.true_clusters[i]][ye[0]])  # client 0 is in cluster 0 (identity)


def test_federated_label_skew_eval_sets_and_masks():
    """Label-skew clients are evaluated on their cluster's classes only; uneven sets are padded with a mask."""
    dm = _dm(partition="label_skew_clusters", n_clusters=3, eval_batch_size=40, relabel=True)
    lm = dm.client_partition.label_map
    counts = torch.zeros(8)
    labels = [[] for _ in range(8)]
    for batch in dm.val_dataloader():
        assert len(batch) == 3
        x, y, mask = batch
        assert x.shape[:2] == y.shape == mask.shape and y.shape[1] <= 40
        counts += mask.sum(1)
        for i in range(8):
            labels[i] += y[i][mask[i] > 0].tolist()
    for i in range(8):
        k = int(dm.true_clusters[i])
        assert set(labels[i]) == set(range(int((lm[k] >= 0).sum())))
    assert counts.tolist() == [len(v) for v in labels]
    assert dm.true_clusters.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert counts[0] + counts[3] + counts[6] == 540  # disjoint class sets cover the whole held-out split
    assert dm.num_classes == 4  # ten classes over three clusters: 4 + 3 + 3, relabelled


def test_federated_same_seed_same_fingerprint_and_batches():
    """The same seed gives the same fingerprint and batches; another seed changes both."""
    a, b, c = _dm(seed=3), _dm(seed=3), _dm(seed=4)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    for k in range(3):
        assert all(torch.equal(u, v) for u, v in zip(a.train_batch(k), b.train_batch(k)))
    assert not torch.equal(a.train_batch(0)[1], c.train_batch(0)[1])


@pytest.mark.parametrize("sampling", ["shuffle", "replacement", "poisson"])
def test_federated_batches_independent_of_client_layout(sampling):
    """Rows for a subset of clients (one process's block) equal the same rows of the all-client batch."""
    dm = _dm(partition="dirichlet", alpha=0.5, sampling=sampling, batch_size=8)
    for k in (0, 7):
        full = dm.train_batch(k)
        for block in ([0, 1], [5], [6, 7]):
            part = dm.train_batch(k, block)
            assert all(torch.equal(p, f[block]) for p, f in zip(part, full))


def test_federated_shuffle_visits_each_item_once_per_pass():
    """With shuffle sampling, consecutive batches walk each client through a permutation of its data."""
    dm = _dm(batch_size=5, n_clients=80, n_clusters=10)  # 15-16 items per client
    steps = 7
    seq = np.concatenate([dm.train_indices(k) for k in range(steps)], axis=1)  # [n, steps*B]
    for i, n_i in enumerate(dm.client_sizes):
        assert sorted(seq[i, :n_i].tolist()) == list(range(n_i))
        assert sorted(seq[i, n_i : 2 * n_i].tolist()) == list(range(n_i))
        assert not np.array_equal(seq[i, :n_i], seq[i, n_i : 2 * n_i])
    xb, yb = dm.train_batch(3)
    x1, y1 = dm.client_data(1)
    assert torch.equal(xb[1], x1[dm.train_indices(3)[1]]) and torch.equal(yb[1], y1[dm.train_indices(3)[1]])


def test_federated_poisson_batch_size_matches_rate():
    """Poisson batches keep each item with probability B/n_i: mean mask count is B within 4 standard errors."""
    dm = _dm(sampling="poisson", batch_size=10, n_clients=4, n_clusters=2)
    counts = torch.stack([dm.train_batch(k)[2].sum(1) for k in range(300)])  # [steps, n]
    for i, n_i in enumerate(dm.client_sizes):
        q = 10 / n_i
        se = math.sqrt(n_i * q * (1 - q) / 300)
        assert abs(counts[:, i].mean().item() - 10) < 4 * se


def test_counter_hash_uniform_bits():
    """The counter hash is deterministic and its top bits look uniform (mean of 2^16 uniforms within 5 sigma)."""
    h = counter_hash(0, 1, np.arange(256)[:, None], np.arange(256)[None, :])
    assert np.array_equal(h, counter_hash(0, 1, np.arange(256)[:, None], np.arange(256)[None, :]))
    u = (h >> np.uint64(11)).astype(np.float64) / 2**53
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / u.size)
    assert np.unique(h).size == h.size


def test_federated_train_loader_state_resumes_stream():
    """state_dict/load_state_dict continue the training stream exactly where it stopped."""
    dm = _dm(steps_per_epoch=5)
    straight = [b for _, b in zip(range(8), (b for _ in range(2) for b in dm.train_dataloader()))]
    first = _dm(steps_per_epoch=5)
    it = iter(first.train_dataloader())
    for _ in range(3):
        next(it)
    state = first.state_dict()
    second = _dm(steps_per_epoch=5)
    second.load_state_dict(state)
    resumed = list(second.train_dataloader()) + list(second.train_dataloader())[:0]
    for got, want in zip(resumed, straight[3:8]):
        assert all(torch.equal(u, v) for u, v in zip(got, want))


def test_federated_fingerprint_mismatch_raises():
    """Loading a state made with another partition raises, naming the differing arguments."""
    state = _dm(seed=0).state_dict()
    with pytest.raises(ValueError, match="fingerprint mismatch.*`seed`"):
        _dm(seed=1).load_state_dict(state)


def test_federated_trainer_resume_reproduces_run(tmp_path):
    """Lightning fit for 7 steps equals 3 steps + checkpoint + resume to 7 (mid-epoch), parameters exact."""

    def trainer(max_steps, **kw):
        return Trainer(
            max_steps=max_steps,
            default_root_dir=tmp_path,
            enable_progress_bar=False,
            enable_model_summary=False,
            logger=False,
            limit_val_batches=0,
            accelerator="cpu",
            devices=1,
            **kw,
        )

    straight = _StackedLinear()
    trainer(7, enable_checkpointing=False).fit(straight, datamodule=_dm(steps_per_epoch=5))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=-1)
    trainer(3, callbacks=[ckpt]).fit(_StackedLinear(), datamodule=_dm(steps_per_epoch=5))
    dm = _dm(steps_per_epoch=5)
    resumed = _StackedLinear()
    trainer(7, enable_checkpointing=False).fit(
        resumed, datamodule=dm, ckpt_path=str(tmp_path / "ck" / "epoch=0-step=3.ckpt")
    )
    assert dm.state_dict()["train_position"] == 7
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_federated_extra_batches():
    """Extra batches come from the client's own data, are reproducible from state, and never move the stream."""
    dm = _dm()
    x3, y3 = dm.client_data(3)
    full = dm.extra_batch(3, -1)
    assert torch.equal(full[0], x3) and torch.equal(full[1], y3)
    before = dm.train_batch(0)
    a = dm.extra_batch(3, 10)
    state = dm.state_dict()
    b = dm.extra_batch(3, 10)
    assert not torch.equal(a[0], b[0])
    rows = {tuple(r.tolist()) for r in x3}
    assert all(tuple(r.tolist()) in rows for r in b[0])
    assert a[0].shape == (10, 64) and len({tuple(r.tolist()) for r in a[0]}) == len(set(map(tuple, a[0].tolist())))
    other = _dm()
    other.load_state_dict(state)
    assert torch.equal(other.extra_batch(3, 10)[0], b[0])
    assert torch.equal(dm.extra_batch(3, 10, step=5)[0], other.extra_batch(3, 10, step=5)[0])
    assert all(torch.equal(u, v) for u, v in zip(before, dm.train_batch(0)))
    assert dm.state_dict()["train_position"] == 0
    with pytest.raises(ValueError, match="`size` must be -1"):
        dm.extra_batch(0, 0)


def test_federated_validation_and_reference_batches():
    """validation_batches are deterministic per round and come from the held-out set; reference split is shared."""
    dm = _dm(reference_fraction=0.1, eval_batch_size=8)
    v0 = dm.validation_batches(2, 3, round=0)
    assert len(v0) == 3 and v0[0][0].shape == (8, 64)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(v0, dm.validation_batches(2, 3, round=0)))
    assert not torch.equal(v0[0][0], dm.validation_batches(2, 3, round=1)[0][0])
    ref = dm.reference_batches(2)
    assert len(ref) == 2 and ref[0][0].shape == (16, 64)
    assert sum(dm.client_sizes) + math.ceil(0.1 * (1797 - math.ceil(0.3 * 1797))) == 1797 - math.ceil(0.3 * 1797)
    with pytest.raises(ValueError, match="set `reference_fraction` > 0"):
        _dm().reference_batches(1)


class _ArraysDM(FederatedDataModule):
    def load_arrays(self):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(400, 3, 2)).astype(np.float32)
        y = rng.integers(0, 3, size=400)
        groups = np.repeat(np.arange(2), 200)
        return x, y, groups


def test_federated_load_arrays_hook_group_mixture():
    """A subclass's load_arrays() feeds group_mixture; identical mixture rows form the true clusters."""
    mixture = [[1.0, 0.0], [1.0, 0.0], [0.25, 0.75]]
    dm = _ArraysDM(n_clients=3, partition="group_mixture", mixture=mixture, standardize=True)
    dm.setup()
    assert dm.true_clusters.tolist() == [0, 0, 1]
    x, y = dm.train_batch(0)
    assert x.shape == (3, 16, 3, 2)
    assert dm.num_features == 6
    pooled = torch.cat([dm.client_data(i)[0] for i in range(3)])
    assert pooled.mean().abs().item() < 0.2  # standardized with the training pool's statistics


@pytest.mark.parametrize(("dataset", "classes"), [("wine", 3), ("breast_cancer", 2)])
def test_federated_other_sklearn_datasets(dataset, classes):
    """wine and breast_cancer load, standardize and partition with Dirichlet label skew."""
    dm = FederatedDataModule(dataset=dataset, n_clients=4, partition="dirichlet", alpha=1.0, batch_size=4)
    dm.setup()
    assert dm.num_classes == classes
    assert dm.train_batch(0)[0].shape[:2] == (4, 4)
    assert dm.true_clusters is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dataset": "mnist"}, "`dataset` must be one of"),
        ({"n_clients": 0}, "`n_clients` must be >= 1"),
        ({"partition": "shards"}, "`partition` must be one of"),
        ({"partition": "label_skew_clusters"}, r"`n_clusters` must be in \[1, n_clients=16\]"),
        ({"partition": "label_permutation_clusters", "n_clusters": 17}, r"`n_clusters` must be in \[1, n_clients"),
        ({"partition": "group_mixture", "mixture": [[1.0]]}, "one row per client"),
        ({"alpha": 0.0}, "`alpha` must be > 0"),
        ({"test_fraction": 0.0}, r"`test_fraction` must be in \(0, 1\)"),
        ({"reference_fraction": 1.0}, r"`reference_fraction` must be in \[0, 1\)"),
        ({"batch_size": 0}, "`batch_size` must be >= 1"),
        ({"eval_batch_size": 0}, "`eval_batch_size` must be >= 1"),
        ({"sampling": "stratified"}, "`sampling` must be one of"),
        ({"steps_per_epoch": 0}, "`steps_per_epoch` must be >= 1"),
        ({"min_client_size": 0}, "`min_client_size` must be >= 1"),
    ],
)
def test_federated_bad_input_init(kwargs, match):
    """Bad constructor arguments raise MisconfigurationException naming the argument and allowed values."""
    with pytest.raises(MisconfigurationException, match=match):
        FederatedDataModule(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_clients": 2000}, "`n_clients`=2000 exceeds the 1257 training items"),
        ({"partition": "label_skew_clusters", "n_clients": 16, "n_clusters": 12}, r"`n_clusters` must be in \[1, 10\]"),
        (
            {"partition": "dirichlet", "alpha": 0.01, "n_clients": 50, "min_client_size": 20, "max_retries": 2},
            "min_size",
        ),
    ],
)
def test_federated_bad_input_setup(kwargs, match):
    """Inconsistent partitions are refused at setup with a message naming the argument."""
    with pytest.raises(MisconfigurationException, match=match):
        FederatedDataModule(**kwargs).setup()


def test_federated_datamodule_lightning_cli(tmp_path):
    """LightningCLI builds the datamodule from typed command-line arguments (subclass mode)."""
    from lightning_epfl.cli import cli_main

    cli = cli_main(
        [
            "--model=lightning.pytorch.demos.boring_classes.BoringModel",
            "--data=lightning_epfl.datamodules.FederatedDataModule",
            "--data.n_clients=12",
            "--data.partition=label_skew_clusters",
            "--data.n_clusters=3",
            "--data.sampling=poisson",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    dm = cli.datamodule
    assert isinstance(dm, FederatedDataModule)
    assert (dm.n_clients, dm.partition_name, dm.n_clusters, dm.sampling) == (12, "label_skew_clusters", 3, "poisson")
    assert torch.bincount(dm.true_clusters).tolist() == [4, 4, 4]


def test_federated_loaders_follow_strategy_local_client_ids():
    """Under a strategy with local_client_ids, loaders stack exactly those clients' rows; bad ids are refused."""
    from types import SimpleNamespace

    dm = _dm(partition="label_skew_clusters", n_clusters=3)
    full_train, full_val = dm.train_batch(0), next(iter(dm.val_dataloader()))
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(local_client_ids=(4, 5)))
    train = next(iter(dm.train_dataloader()))
    assert all(torch.equal(t, f[[4, 5]]) for t, f in zip(train, full_train))
    val = next(iter(dm.val_dataloader()))
    n4, n5 = int(full_val[2][4].sum()), int(full_val[2][5].sum())
    assert torch.equal(val[1][0][:n4], full_val[1][4][:n4]) and torch.equal(val[1][1][:n5], full_val[1][5][:n5])
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(local_client_ids=(7, 8)))
    with pytest.raises(MisconfigurationException, match="do not fit the datamodule's `n_clients`=8"):
        dm.train_dataloader()
