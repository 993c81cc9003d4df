"""Datamodules on real data that needs no download: text, digits, federated partitions, few-shot tasks."""

from lightning_epfl.datamodules.digits import (
    DigitsDataModule,
    load_digits_arrays,
)
from lightning_epfl.datamodules.federated import (
    ClientBatchStream,
    ClientEvalStream,
    FederatedDataModule,
    load_sklearn_arrays,
)
from lightning_epfl.datamodules.few_shot import (
    FewShotDigits,
    LinearRegressionTasks,
    SinusoidTasks,
    TaskBatch,
)
from lightning_epfl.datamodules.partition import (
    Partition,
    dirichlet_partition,
    group_mixture,
    iid_partition,
    label_permutation_clusters,
    label_skew_clusters,
)
from lightning_epfl.datamodules.text import (
    ByteTokenizer,
    TextDataModule,
    load_tokenizer,
)

__all__ = [
    "ByteTokenizer",
    "ClientBatchStream",
    "ClientEvalStream",
    "DigitsDataModule",
    "dirichlet_partition",
    "FederatedDataModule",
    "FewShotDigits",
    "group_mixture",
    "iid_partition",
    "label_permutation_clusters",
    "label_skew_clusters",
    "LinearRegressionTasks",
    "load_digits_arrays",
    "load_sklearn_arrays",
    "load_tokenizer",
    "Partition",
    "SinusoidTasks",
    "TaskBatch",
    "TextDataModule",
]
