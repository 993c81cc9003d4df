"""Datamodules on real data that needs no download: text, digits, client-partitioned data and text, few-shot tasks,
exam questions."""

from lightning_epfl.datamodules.client_data import ClientEvalStream, served_client_ids
from lightning_epfl.datamodules.digits import (
    DigitsDataModule,
    load_digits_arrays,
)
from lightning_epfl.datamodules.exam import (
    ExamDataModule,
    ExamDemo,
    ExamQuestion,
    build_stdlib_exam,
    collate_questions,
    convert_exam_cli,
    convert_mmlu_csv,
    convert_nlp4education,
    fixture_exam_path,
    load_course_programs,
    load_demos,
    load_exam,
    save_exam,
    validate_question,
)
from lightning_epfl.datamodules.federated import FederatedDataModule
from lightning_epfl.datamodules.federated_text import FederatedTextDataModule
from lightning_epfl.datamodules.few_shot import (
    FewShotDigits,
    LinearRegressionTasks,
    SinusoidTasks,
    TaskBatch,
)
from lightning_epfl.datamodules.multi_domain import MultiDomainTextDataModule
from lightning_epfl.datamodules.partition import (
    Partition,
    dirichlet_partition,
    group_mixture,
    iid_partition,
    label_permutation_clusters,
    label_skew_clusters,
)
from lightning_epfl.datamodules.streams import PositionedBatches, ResumableLoader, StreamPosition
from lightning_epfl.datamodules.tabular import load_sklearn_arrays
from lightning_epfl.datamodules.text import (
    ByteTokenizer,
    TextDataModule,
    load_tokenizer,
)

__all__ = [
    "ByteTokenizer",
    "ClientEvalStream",
    "DigitsDataModule",
    "dirichlet_partition",
    "FederatedDataModule",
    "FederatedTextDataModule",
    "FewShotDigits",
    "group_mixture",
    "iid_partition",
    "label_permutation_clusters",
    "label_skew_clusters",
    "LinearRegressionTasks",
    "load_digits_arrays",
    "load_sklearn_arrays",
    "load_tokenizer",
    "MultiDomainTextDataModule",
    "Partition",
    "PositionedBatches",
    "ResumableLoader",
    "served_client_ids",
    "SinusoidTasks",
    "StreamPosition",
    "TaskBatch",
    "TextDataModule",
    "ExamDataModule",
    "ExamDemo",
    "ExamQuestion",
    "build_stdlib_exam",
    "collate_questions",
    "convert_exam_cli",
    "convert_mmlu_csv",
    "convert_nlp4education",
    "fixture_exam_path",
    "load_course_programs",
    "load_demos",
    "load_exam",
    "save_exam",
    "validate_question",
]
