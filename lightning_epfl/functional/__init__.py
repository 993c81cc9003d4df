"""lightning_epfl.functional"""

from lightning_epfl.functional.topology import (
    MixingReport,
    Topology,
    check_mixing_matrix,
    mixing_contraction,
    mixing_matrix,
    spectral_gap,
)

__all__: list[str] = []
__all__ += ["MixingReport", "Topology", "check_mixing_matrix", "mixing_contraction", "mixing_matrix", "spectral_gap"]
