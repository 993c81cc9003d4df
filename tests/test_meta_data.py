import numpy as np
import pytest
import torch

from lightning_epfl.datamodules.digits import load_digits_arrays
from lightning_epfl.datamodules.few_shot import FewShotDigits, LinearRegressionTasks, SinusoidTasks


def test_meta_data_sinusoid_stream_deterministic_and_shaped():
    """Batch j of the stream depends only on (seed, j); shapes follow k_shot/q_queries; y = A sin(x - phase)."""
    a, b = SinusoidTasks(tasks_per_batch=3, seed=1), SinusoidTasks(tasks_per_batch=3, seed=1)
    x, y = a.train_batch(5), b.train_batch(5)
    assert torch.equal(x.support_x, y.support_x) and torch.equal(x.query_y, y.query_y) and x.index == 5
    assert not torch.equal(a.train_batch(6).support_x, x.support_x)
    assert not torch.equal(a.train_batch(5, rank=1).support_x, x.support_x)  # each data-parallel rank its own tasks
    assert x.support_x.shape == (3, 10, 1) and x.query_x.shape == (3, 10, 1)
    val = a.val_batch()
    assert val.support_x.shape == (500, 10, 1) and val.query_x.shape == (500, 100, 1)
    assert float(val.support_y.abs().max()) <= 5.0 and float(val.support_x.abs().max()) <= 5.0
    # one amplitude/phase per task: support and query lie on the same sinusoid (fit A, phase by least squares)
    xs, ys = torch.cat([x.support_x[0], x.query_x[0]]).double(), torch.cat([x.support_y[0], x.query_y[0]]).double()
    basis = torch.cat([torch.sin(xs), torch.cos(xs)], dim=1)
    coef = torch.linalg.lstsq(basis, ys).solution
    torch.testing.assert_close(basis @ coef, ys, rtol=0, atol=1e-5)


def test_meta_data_cursor_state_dict_round_trip():
    """state_dict/load_state_dict carry the stream position; the loader resumes at the cursor."""
    a = SinusoidTasks(tasks_per_batch=2, batches_per_epoch=3, seed=0)
    a.load_state_dict({"cursor": 7, "seed": 0})
    b = SinusoidTasks(tasks_per_batch=2, batches_per_epoch=3, seed=0)
    b.load_state_dict(a.state_dict())
    batches = list(b.train_dataloader())
    assert [t.index for t in batches] == [7, 8, 9]
    assert torch.equal(batches[0].support_x, a.train_batch(7).support_x)


def _true_classes(images: torch.Tensor) -> np.ndarray:
    x, y = load_digits_arrays(scale=True)
    lookup = {row.tobytes(): label for row, label in zip(x, y)}
    return np.array([lookup[row.numpy().tobytes()] for row in images])


@pytest.mark.parametrize("split", ["samples", "classes"])
def test_meta_data_digits_tasks_are_n_way_k_shot_with_permuted_labels(split):
    """Each task uses n_way distinct digits, one label per digit in support and query, relabelled per task."""
    dm = FewShotDigits(n_way=5, k_shot=2, q_queries=3, split=split, tasks_per_batch=6, val_tasks=4, seed=0)
    batch = dm.train_batch(0)
    assert batch.support_x.shape == (6, 10, 64) and batch.query_x.shape == (6, 15, 64)
    mappings = set()
    for t in range(6):
        s_cls, q_cls = _true_classes(batch.support_x[t]), _true_classes(batch.query_x[t])
        mapping = {}
        for lab, cls in zip(torch.cat([batch.support_y[t], batch.query_y[t]]).tolist(), [*s_cls, *q_cls]):
            assert mapping.setdefault(lab, cls) == cls
        assert sorted(mapping) == list(range(5)) and len(set(mapping.values())) == 5
        assert np.bincount(batch.support_y[t].numpy()).tolist() == [2] * 5
        mappings.add(tuple(mapping[i] for i in range(5)))
        if split == "classes":
            assert set(mapping.values()) <= {0, 1, 2, 3, 4}
    assert len(mappings) > 1
    if split == "classes":
        assert set(_true_classes(dm.val_batch().support_x.reshape(-1, 64))) <= {5, 6, 7, 8, 9}
    else:  # training and validation tasks draw from disjoint images
        train_rows = {r.numpy().tobytes() for r in batch.support_x.reshape(-1, 64)}
        val_rows = {r.numpy().tobytes() for r in dm.val_batch().query_x.reshape(-1, 64)}
        assert not train_rows & val_rows


def test_meta_data_linear_regression_hessians_match_autograd():
    """A_i = (2/rows) X_i^T X_i is the Hessian of the task's MSE, and y = X w_i (w_i the task minimizer)."""
    dm = LinearRegressionTasks(dim=3, num_tasks=4, rows=6, dtype="float64")
    batch = dm.full_batch()
    x, y = batch.support_x[2], batch.support_y[2]
    zero = torch.zeros(3, dtype=torch.float64)
    hess = torch.autograd.functional.hessian(lambda w: torch.nn.functional.mse_loss(x @ w[:, None], y), zero)
    torch.testing.assert_close(dm.hessians()[2], hess, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x @ dm.task_minimizers[2][:, None], y, rtol=0, atol=1e-12)
    assert torch.equal(batch.support_x, batch.query_x)


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (SinusoidTasks, {"k_shot": 0}, "k_shot"),
        (SinusoidTasks, {"tasks_per_batch": 0}, "tasks_per_batch"),
        (SinusoidTasks, {"amplitude": (5.0, 0.1)}, "amplitude"),
        (FewShotDigits, {"n_way": 6, "split": "classes"}, "n_way"),
        (FewShotDigits, {"n_way": 1}, "n_way"),
        (FewShotDigits, {"split": "tasks"}, "split"),
        (FewShotDigits, {"k_shot": 60, "q_queries": 60}, "k_shot"),
        (LinearRegressionTasks, {"num_tasks": 1}, "num_tasks"),
        (LinearRegressionTasks, {"curvature": (0.0, 1.0)}, "curvature"),
    ],
)
def test_meta_data_bad_input(cls, kwargs, match):
    """Bad arguments raise ValueError naming the argument."""
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)
