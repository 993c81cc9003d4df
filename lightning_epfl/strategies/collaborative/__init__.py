"""Collaborative core: stacked clients, communicators, the strategy, baselines and CoBo.

See ``collaborative_core.md`` and ``cobo.md``. The strategy names ``"collaborative"`` and ``"cobo"`` are registered
in Lightning's strategy registry on import.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_epfl.strategies.collaborative.algorithm import CollaborativeAlgorithm, StepContext
from lightning_epfl.strategies.collaborative.baselines import IFCA, Ditto, FedAvg, FedAvgFineTune, Local, Oracle
from lightning_epfl.strategies.collaborative.cobo import CoBo, CoBoStrategy
from lightning_epfl.strategies.collaborative.communicator import (
    Communicator,
    LocalCommunicator,
    TorchDistributedCommunicator,
)
from lightning_epfl.strategies.collaborative.stack import ClientStack, stack_client_batches
from lightning_epfl.strategies.collaborative.strategy import CollaborativeStrategy

for _cls, _name in ((CollaborativeStrategy, "collaborative"), (CoBoStrategy, "cobo")):
    if _name not in StrategyRegistry:
        _cls.register_strategies(StrategyRegistry)

__all__ = [
    "ClientStack",
    "CoBo",
    "CoBoStrategy",
    "CollaborativeAlgorithm",
    "CollaborativeStrategy",
    "Communicator",
    "Ditto",
    "FedAvg",
    "FedAvgFineTune",
    "IFCA",
    "Local",
    "LocalCommunicator",
    "Oracle",
    "StepContext",
    "TorchDistributedCommunicator",
    "stack_client_batches",
]
