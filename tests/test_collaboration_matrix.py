import os

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch import LightningModule, Trainer  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers.logger import Logger  # noqa: E402
from lightning.pytorch.strategies import SingleDeviceStrategy  # noqa: E402
from lightning.pytorch.utilities.exceptions import MisconfigurationException  # noqa: E402

from lightning_epfl.callbacks.collaboration_matrix import (  # noqa: E402
    CollaborationMatrixLogger,
    cluster_order,
    plot_collaboration_matrix,
    plot_matrix_history,
)
from lightning_epfl.datamodules.federated import FederatedDataModule  # noqa: E402


def _matrix_at(step: int, n: int = 8) -> torch.Tensor:
    """Within-cluster weight 1; between-cluster weight 1 - step/6 (clusters glued until step 3)."""
    c = torch.arange(n) // 2
    same = (c[:, None] == c[None, :]).double()
    return same + (1 - same) * max(0.0, 1 - step / 6)


class _FakeCollabStrategy(SingleDeviceStrategy):
    """Single-device strategy exposing a step-dependent collaboration matrix, like CoBoStrategy."""

    def __init__(self, none: bool = False) -> None:
        super().__init__(device=torch.device("cpu"))
        self.none = none

    def collaboration_matrix(self):
        return None if self.none else _matrix_at(self.lightning_module.trainer.global_step)


class _RecordingLogger(Logger):
    """Logger that records metrics and images (TensorBoard-like ``experiment.add_image``)."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics, self.images = [], []

    @property
    def name(self):
        return "rec"

    @property
    def version(self):
        return 0

    @property
    def experiment(self):
        return self

    def add_image(self, tag, img, global_step, dataformats):
        self.images.append((tag, img.shape, global_step, dataformats))

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class _Linear(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(64, 10)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.lin(batch[0].flatten(0, 1)), batch[1].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _dm():
    return FederatedDataModule(
        n_clients=8, partition="label_permutation_clusters", n_clusters=4, standardize=False, steps_per_epoch=3
    )


def _fit(tmp_path, max_steps, callbacks, logger=False, strategy=None, ckpt_path=None):
    trainer = Trainer(
        max_steps=max_steps,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        logger=logger,
        limit_val_batches=0,
        strategy=strategy or _FakeCollabStrategy(),
        callbacks=callbacks,
    )
    trainer.fit(_Linear(), datamodule=_dm(), ckpt_path=ckpt_path)
    return trainer


def test_collaboration_matrix_logs_files_metrics_and_images(tmp_path):
    """Every 2 steps (and at the end) the matrix is saved, plotted and scored against true clusters (history only)."""
    out = tmp_path / "cm"
    cb = CollaborationMatrixLogger(every_n_steps=2, save_dir=str(out))
    logger = _RecordingLogger()
    _fit(tmp_path, 5, [cb], logger=logger)
    steps = [2, 4, 5]
    for s in steps:
        assert np.array_equal(np.load(out / f"matrix_{s}.npy"), _matrix_at(s).numpy())
        png = matplotlib.image.imread(out / f"matrix_{s}.png")
        assert png.ndim == 3 and png.shape[0] > 100
    history = np.load(out / "history.npz")
    assert history["steps"].tolist() == steps
    assert np.array_equal(history["matrices"], np.stack([_matrix_at(s).numpy() for s in steps]))
    # step 2: between weight 2/3 > 0.5 glues all clusters (4 of 28 pairs right); from step 4 on: exact recovery
    assert history["pair_accuracy"].tolist() == pytest.approx([4 / 28, 1.0, 1.0])
    assert history["ari_components"].tolist() == pytest.approx([0.0, 1.0, 1.0])
    assert history["w_within"].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert history["w_between"].tolist() == pytest.approx([1 - s / 6 for s in steps])
    assert history["ari_spectral"][1] == pytest.approx(1.0)
    assert not [m for _, m in logger.metrics if any(k.startswith("collab/") for k in m)]  # the strategy owns them
    assert [(t, step, f) for t, _, step, f in logger.images] == [("collab/matrix", s, "HWC") for s in steps]
    assert all(shape[2] == 3 for _, shape, _, _ in logger.images)
    assert cb.last_logged_step == 5 and cb.last_metrics["ari_components"] == pytest.approx(1.0)
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_collaboration_matrix_default_dir_and_no_plot(tmp_path):
    """Without save_dir, files go to <log_dir>/collaboration_matrix; plot=False writes no PNG."""
    cb = CollaborationMatrixLogger(every_n_steps=3, plot=False)
    _fit(tmp_path, 3, [cb])
    out = tmp_path / "collaboration_matrix"
    assert sorted(os.listdir(out)) == ["history.npz", "matrix_3.npy"]


def test_collaboration_matrix_resume_continues_history(tmp_path):
    """Resuming from a step-4 checkpoint keeps history up to step 4 and re-logs later steps without duplicates."""
    straight = tmp_path / "straight"
    _fit(tmp_path / "a", 8, [CollaborationMatrixLogger(every_n_steps=2, save_dir=str(straight), plot=False)])
    out = tmp_path / "resumed"
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=4, save_top_k=-1)
    _fit(tmp_path / "b", 6, [CollaborationMatrixLogger(every_n_steps=2, save_dir=str(out), plot=False), ckpt])
    assert np.load(out / "history.npz")["steps"].tolist() == [2, 4, 6]
    cb = CollaborationMatrixLogger(every_n_steps=2, save_dir=str(out), plot=False)
    path = str(tmp_path / "ck" / "epoch=1-step=4.ckpt")
    _fit(tmp_path / "b", 8, [cb], ckpt_path=path)
    got, want = np.load(out / "history.npz"), np.load(straight / "history.npz")
    assert got["steps"].tolist() == want["steps"].tolist() == [2, 4, 6, 8]
    assert np.array_equal(got["matrices"], want["matrices"])
    assert cb.state_dict() == {"last_logged_step": 8}


def test_collaboration_matrix_state_dict_roundtrip():
    """The last logged step survives state_dict/load_state_dict; state_key includes the arguments."""
    a = CollaborationMatrixLogger(every_n_steps=5)
    a.last_logged_step = 35
    b = CollaborationMatrixLogger(every_n_steps=5)
    b.load_state_dict(a.state_dict())
    assert b.last_logged_step == 35
    assert a.state_key != CollaborationMatrixLogger(every_n_steps=7).state_key


def test_collaboration_matrix_none_matrix_warns_once(tmp_path):
    """A strategy whose matrix is None (e.g. Local) gets one RuntimeWarning and no files."""
    out = tmp_path / "cm"
    with pytest.warns(RuntimeWarning, match="no collaboration matrix"):
        _fit(
            tmp_path,
            4,
            [CollaborationMatrixLogger(every_n_steps=1, save_dir=str(out))],
            strategy=_FakeCollabStrategy(none=True),
        )
    assert not out.exists()


def test_collaboration_matrix_bad_input(tmp_path):
    """every_n_steps < 1 is refused in __init__; a strategy without a matrix accessor is refused in setup."""
    with pytest.raises(MisconfigurationException, match="`every_n_steps` must be >= 1"):
        CollaborationMatrixLogger(every_n_steps=0)
    with pytest.raises(MisconfigurationException, match="needs a strategy exposing `collaboration_matrix\\(\\)`"):
        _fit(tmp_path, 1, [CollaborationMatrixLogger()], strategy=SingleDeviceStrategy(device=torch.device("cpu")))


def test_plot_collaboration_matrix_orders_by_cluster_and_masks_diagonal():
    """The drawn array is W permuted by (stable) cluster order with the diagonal masked."""
    W = torch.arange(16, dtype=torch.float64).reshape(4, 4)
    clusters = torch.tensor([1, 0, 1, 0])
    order = cluster_order(clusters, 4)
    assert order.tolist() == [1, 3, 0, 2]
    ax = plot_collaboration_matrix(W, clusters)
    drawn = ax.images[0].get_array()
    assert np.array_equal(drawn.data, W.numpy()[np.ix_(order, order)])
    assert drawn.mask.tolist() == np.eye(4, dtype=bool).tolist()
    plain = plot_collaboration_matrix(W, clusters, mask_diagonal=False, order_by_cluster=False)
    assert np.array_equal(np.asarray(plain.images[0].get_array()), W.numpy())
    import matplotlib.pyplot as plt

    plt.close("all")


def test_plot_matrix_history_line_data():
    """History plots draw the requested metric against the steps; unknown metrics raise."""
    history = {"steps": np.array([2, 4]), "matrices": np.zeros((2, 3, 3)), "pair_accuracy": np.array([0.5, 1.0])}
    ax = plot_matrix_history(history, "pair_accuracy")
    x, y = ax.lines[0].get_data()
    assert x.tolist() == [2, 4] and y.tolist() == [0.5, 1.0]
    with pytest.raises(ValueError, match="`metric` must be one of"):
        plot_matrix_history(history, "ari")
    import matplotlib.pyplot as plt

    plt.close("all")
