"""lightning_epfl.metrics"""

__all__: list[str] = []
