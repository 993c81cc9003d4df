"""lightning_epfl.strategies"""

__all__: list[str] = []
