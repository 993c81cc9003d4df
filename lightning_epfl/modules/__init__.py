"""LightningModules and layers: CausalLMModule, DeepMLPClassifier, ClientModule/MLPClassifier, MetaLearningModule, and
the mixture-of-experts layers (MoEConfig, MoEMLP, routers, replace_mlps_with_moe)."""

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
from lightning_epfl.modules.moe import (
    MoEAux,
    MoEConfig,
    MoEMLP,
    SequenceRouter,
    TokenRouter,
    moe_aux_loss,
    replace_mlps_with_moe,
    routing_context,
)

__all__ = [
    "CausalLMModule",
    "ClientModule",
    "DeepMLPClassifier",
    "LogisticRegression",
    "MetaLearningModule",
    "MetaOptimizer",
    "MLP",
    "MLPClassifier",
    "MoEAux",
    "MoEConfig",
    "MoEMLP",
    "moe_aux_loss",
    "replace_mlps_with_moe",
    "routing_context",
    "SequenceRouter",
    "TokenRouter",
]
