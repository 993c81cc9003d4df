"""lightning_epfl.functional"""

from lightning_epfl.functional.collab_metrics import (
    adjusted_rand_index,
    cluster_assignments,
    consensus_distance,
    improved_fraction,
    pair_accuracy,
    recovery_metrics,
    w_within_between,
)
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

from lightning_epfl.functional.schedules import (  # noqa: E402
    CooldownShape,
    WSDScheduler,
    cooldown_factor,
    resolve_cooldown,
    wsd_lr_factor,
)

__all__ += ["CooldownShape", "WSDScheduler", "cooldown_factor", "resolve_cooldown", "wsd_lr_factor"]

from lightning_epfl.functional.rank import (  # noqa: E402
    dead_units,
    effective_rank,
    numerical_rank,
    pca_rank,
    rankme,
    spectral_metrics,
    stable_rank,
)

__all__ += ["dead_units", "effective_rank", "numerical_rank", "pca_rank", "rankme", "spectral_metrics", "stable_rank"]
__all__ += [
    "adjusted_rand_index",
    "cluster_assignments",
    "consensus_distance",
    "improved_fraction",
    "pair_accuracy",
    "recovery_metrics",
    "w_within_between",
]

from lightning_epfl.functional.meta import (  # noqa: E402
    adapt_and_predict,
    batched_task_grad,
    fo_b_maml_task_grad,
    fomaml_task_grad,
    inner_adapt,
    maml_task_grad,
    quadratic_fomaml_fixed_point,
    quadratic_maml_gradient,
    quadratic_maml_solution,
    reptile_task_grad,
)
from lightning_epfl.functional.meta_optim import global_norm, outer_step_scale  # noqa: E402

__all__ += [
    "adapt_and_predict",
    "batched_task_grad",
    "fo_b_maml_task_grad",
    "fomaml_task_grad",
    "global_norm",
    "inner_adapt",
    "maml_task_grad",
    "outer_step_scale",
    "quadratic_fomaml_fixed_point",
    "quadratic_maml_gradient",
    "quadratic_maml_solution",
    "reptile_task_grad",
]
