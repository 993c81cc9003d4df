"""Datamodules on real data that needs no download."""

from lightning_epfl.datamodules.digits import DigitsDataModule, load_digits_arrays
from lightning_epfl.datamodules.text import ByteTokenizer, TextDataModule, load_tokenizer

__all__ = ["ByteTokenizer", "DigitsDataModule", "TextDataModule", "load_digits_arrays", "load_tokenizer"]

from lightning_epfl.datamodules.few_shot import (  # noqa: E402
    FewShotDigits,
    LinearRegressionTasks,
    SinusoidTasks,
    TaskBatch,
)

__all__ += ["FewShotDigits", "LinearRegressionTasks", "SinusoidTasks", "TaskBatch"]

from lightning_epfl.datamodules.federated import (  # noqa: E402
    ClientBatchStream,
    ClientEvalStream,
    FederatedDataModule,
    load_sklearn_arrays,
)
from lightning_epfl.datamodules.partition import (  # noqa: E402
    Partition,
    dirichlet_partition,
    group_mixture,
    iid_partition,
    label_permutation_clusters,
    label_skew_clusters,
)

__all__ += ["ClientBatchStream", "ClientEvalStream", "FederatedDataModule", "load_sklearn_arrays"]
__all__ += [
    "Partition",
    "dirichlet_partition",
    "group_mixture",
    "iid_partition",
    "label_permutation_clusters",
    "label_skew_clusters",
]
