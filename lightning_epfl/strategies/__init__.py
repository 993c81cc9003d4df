"""lightning_epfl.strategies"""

__all__: list[str] = []

from lightning_epfl.strategies.collaborative import (  # noqa: E402
    IFCA,
    ClientStack,
    CoBo,
    CoBoStrategy,
    CollaborativeAlgorithm,
    CollaborativeStrategy,
    Communicator,
    Ditto,
    FedAvg,
    FedAvgFineTune,
    Local,
    LocalCommunicator,
    Oracle,
    StepContext,
    TorchDistributedCommunicator,
)

__all__ += [
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
]
