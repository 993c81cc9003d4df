"""lightning_epfl.callbacks"""

__all__: list[str] = []

from lightning_epfl.callbacks.feature_rank import FeatureRankMonitor  # noqa: E402

__all__ += ["FeatureRankMonitor"]

from lightning_epfl.callbacks.cooldown import Cooldown  # noqa: E402

__all__ += ["Cooldown"]

from lightning_epfl.callbacks.windowed_swa import WindowedSWA  # noqa: E402

__all__ += ["WindowedSWA"]

from lightning_epfl.callbacks.collaboration_matrix import (  # noqa: E402
    CollaborationMatrixLogger,
    plot_collaboration_matrix,
    plot_matrix_history,
)

__all__ += ["CollaborationMatrixLogger", "plot_collaboration_matrix", "plot_matrix_history"]
