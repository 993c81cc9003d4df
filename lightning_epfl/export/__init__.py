"""lightning_epfl.export"""

__all__: list[str] = []
