"""LightningModules and layers."""

from lightning_epfl.modules.causal_lm import CausalLMModule

__all__: list[str] = ["CausalLMModule"]

from lightning_epfl.modules.deep_mlp import DeepMLPClassifier  # noqa: E402

__all__ += ["DeepMLPClassifier"]

from lightning_epfl.modules.meta_learning import MLP, MetaLearningModule  # noqa: E402
from lightning_epfl.modules.meta_optim import MetaOptimizer  # noqa: E402

__all__ += ["MLP", "MetaLearningModule", "MetaOptimizer"]

from lightning_epfl.modules.client import ClientModule, MLPClassifier  # noqa: E402

__all__ += ["ClientModule", "MLPClassifier"]
