"""LightningModules and layers: CausalLMModule, DeepMLPClassifier, ClientModule/MLPClassifier, MetaLearningModule."""

from lightning_epfl.modules.causal_lm import CausalLMModule
from lightning_epfl.modules.client import (
    ClientModule,
    LogisticRegression,
    MLPClassifier,
)
from lightning_epfl.modules.deep_mlp import DeepMLPClassifier
from lightning_epfl.modules.meta_learning import (
    MLP,
    MetaLearningModule,
)
from lightning_epfl.modules.meta_optim import MetaOptimizer

__all__ = [
    "CausalLMModule",
    "ClientModule",
    "DeepMLPClassifier",
    "LogisticRegression",
    "MetaLearningModule",
    "MetaOptimizer",
    "MLP",
    "MLPClassifier",
]
