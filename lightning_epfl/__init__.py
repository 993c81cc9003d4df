"""lightning-epfl: recent EPFL machine-learning methods as PyTorch Lightning components."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {"WSDScheduler": "lightning_epfl.functional.schedules"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_epfl' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
