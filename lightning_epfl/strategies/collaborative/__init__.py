"""Collaborative core: one strategy, pluggable algorithms (CoBo, Decor, trust-weighted LoRA and the baselines),
stacked clients, communicators, pairwise secrets, the SecLDP accountant and per-client adapter files.

``CollaborativeStrategy(algorithm=...)`` is the single entry point; the name ``"collaborative"`` is registered in
Lightning's strategy registry on import.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_epfl.strategies.collaborative.accountant import SecLDPAccountant
from lightning_epfl.strategies.collaborative.adapters import export_client_adapter, load_client_adapters
from lightning_epfl.strategies.collaborative.algorithm import CollaborativeAlgorithm, StepContext
from lightning_epfl.strategies.collaborative.baselines import IFCA, Ditto, FedAvg, FedAvgFineTune, Local, Oracle
from lightning_epfl.strategies.collaborative.cobo import CoBo
from lightning_epfl.strategies.collaborative.communicator import (
    Communicator,
    LocalCommunicator,
    TorchDistributedCommunicator,
)
from lightning_epfl.strategies.collaborative.decor import Decor
from lightning_epfl.strategies.collaborative.secrets import PairwiseSecret
from lightning_epfl.strategies.collaborative.stack import ClientStack, stack_client_batches
from lightning_epfl.strategies.collaborative.strategy import CollaborativeStrategy
from lightning_epfl.strategies.collaborative.trust_weighted import TrustWeighted

if "collaborative" not in StrategyRegistry:
    CollaborativeStrategy.register_strategies(StrategyRegistry)

__all__ = [
    "ClientStack",
    "CoBo",
    "CollaborativeAlgorithm",
    "CollaborativeStrategy",
    "Communicator",
    "Decor",
    "Ditto",
    "FedAvg",
    "FedAvgFineTune",
    "IFCA",
    "Local",
    "LocalCommunicator",
    "Oracle",
    "PairwiseSecret",
    "SecLDPAccountant",
    "StepContext",
    "TorchDistributedCommunicator",
    "TrustWeighted",
    "export_client_adapter",
    "load_client_adapters",
    "stack_client_batches",
]
