"""torchmetrics ``Metric`` classes over :mod:`lightning_epfl.functional`: routing specialization (``RoutingNMI``)."""

from lightning_epfl.metrics.routing import RoutingNMI

__all__ = ["RoutingNMI"]
