"""Training strategies: the collaborative core and the algorithms on it (CoBo and baselines)."""

from lightning_epfl.strategies.collaborative import (
    IFCA,
    ClientStack,
    CoBo,
    CollaborativeAlgorithm,
    CollaborativeStrategy,
    Communicator,
    Ditto,
    FedAvg,
    FedAvgFineTune,
    Local,
    LocalCommunicator,
    Oracle,
    PairwiseSecret,
    StepContext,
    TorchDistributedCommunicator,
)

__all__ = [
    "ClientStack",
    "CoBo",
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
    "PairwiseSecret",
    "StepContext",
    "TorchDistributedCommunicator",
]
