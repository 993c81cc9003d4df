"""Lightning callbacks: Cooldown, WindowedSWA, FeatureRankMonitor, CollaborationMatrixLogger, ValidateAtStart,
SavePretrained, SparseFinetune, ExpertUtilizationMonitor."""

from lightning_epfl.callbacks.collaboration_matrix import (
    CollaborationMatrixLogger,
    plot_collaboration_matrix,
    plot_matrix_history,
)
from lightning_epfl.callbacks.cooldown import Cooldown
from lightning_epfl.callbacks.expert_utilization import ExpertUtilizationMonitor, plot_expert_load
from lightning_epfl.callbacks.feature_rank import FeatureRankMonitor
from lightning_epfl.callbacks.save_pretrained import SavePretrained
from lightning_epfl.callbacks.sparse_finetune import SparseFinetune
from lightning_epfl.callbacks.validate_at_start import ValidateAtStart
from lightning_epfl.callbacks.windowed_swa import WindowedSWA

__all__ = [
    "CollaborationMatrixLogger",
    "Cooldown",
    "ExpertUtilizationMonitor",
    "FeatureRankMonitor",
    "plot_collaboration_matrix",
    "plot_expert_load",
    "plot_matrix_history",
    "SavePretrained",
    "SparseFinetune",
    "ValidateAtStart",
    "WindowedSWA",
]
