"""torchmetrics ``Metric`` classes over :mod:`lightning_epfl.functional`: routing specialization (``RoutingNMI``) and
exam outcomes (``ExamOutcomeMatrix``, arXiv:2408.11841)."""

from lightning_epfl.metrics.exam import ExamOutcomeMatrix
from lightning_epfl.metrics.routing import RoutingNMI

__all__ = ["ExamOutcomeMatrix", "RoutingNMI"]
