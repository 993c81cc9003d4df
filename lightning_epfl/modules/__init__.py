"""lightning_epfl.modules"""

__all__: list[str] = []
