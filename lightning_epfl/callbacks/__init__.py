"""lightning_epfl.callbacks"""

__all__: list[str] = []
