"""Datamodules on real data that needs no download."""

from lightning_epfl.datamodules.digits import DigitsDataModule, load_digits_arrays

__all__ = ["DigitsDataModule", "load_digits_arrays"]
