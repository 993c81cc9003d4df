"""lightning_epfl.modules"""

__all__: list[str] = []

from lightning_epfl.modules.deep_mlp import DeepMLPClassifier  # noqa: E402

__all__ += ["DeepMLPClassifier"]
