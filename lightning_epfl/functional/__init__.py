"""lightning_epfl.functional"""

__all__: list[str] = []
