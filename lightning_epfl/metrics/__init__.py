"""torchmetrics ``Metric`` classes over ``lightning_epfl.functional``: exam outcomes (arXiv:2408.11841)."""

from lightning_epfl.metrics.exam import ExamOutcomeMatrix

__all__: list[str] = ["ExamOutcomeMatrix"]
