import numpy as np
import pytest
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_epfl.datamodules import DigitsDataModule


def test_digits_split_deterministic_stratified_disjoint():
    """Splits are disjoint, cover the data, stratified, and the same for the same seed."""
    dm = DigitsDataModule(train_size=200, test_fraction=0.2, seed=3)
    a, b = dm.split_indices(), DigitsDataModule(train_size=200, test_fraction=0.2, seed=3).split_indices()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    allidx = np.concatenate([a["train"], a["val"], a["test"]])
    assert len(allidx) == 1797 and len(np.unique(allidx)) == 1797
    assert len(a["train"]) == 200 and len(a["test"]) == 360
    dm.setup()
    counts = np.bincount(dm.train_dataset.tensors[1].numpy(), minlength=10)
    assert counts.min() >= 19 and counts.max() <= 21
    x, _ = dm.train_dataset[0]
    assert x.shape == (64,) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_digits_image_shape_and_full_batch():
    """flatten=False gives (1, 8, 8) images; batch_size=None gives one full batch."""
    dm = DigitsDataModule(batch_size=None, flatten=False)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (1, 8, 8) and len(x) == len(dm.train_dataset)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_size": 0}, "train_size"),
        ({"train_size": 5000}, "train_size"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"test_fraction": -0.1}, "test_fraction"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_digits_bad_input(kwargs, match):
    """Bad arguments raise naming the argument."""
    with pytest.raises(MisconfigurationException, match=match):
        DigitsDataModule(**kwargs)
