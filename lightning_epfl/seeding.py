"""Seeding
=======

Every random stream of the package is seeded here, from the run's ``seed`` and names of what the stream serves, so
streams are the same in every process layout and after a resume, independent of each other and of the global RNG:

* :func:`derive_seed` / :func:`seeded_generator`: a scalar seed or a ``torch.Generator`` for a named stream
  (``derive_seed(seed, "client_init", client_id)``);
* :func:`counter_hash`: counter-based random bits, vectorized over clients and items (per-client data sampling);
* :func:`numpy_generator`: a NumPy generator for a named stream (task sampling);
* :func:`epoch_permutation`: the shuffled order of an epoch of ``n`` items;
* :func:`loader_generator`: a ``DataLoader``'s private generator.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

__all__ = [
    "counter_hash",
    "derive_seed",
    "epoch_permutation",
    "loader_generator",
    "numpy_generator",
    "seeded_generator",
    "uniform_from_bits",
]


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed derived from ``parts`` (SHA-256 of their text): the package's one way to seed a random stream.

    Streams are named by what they serve, e.g. ``derive_seed(seed, "client_init", client_id)``, so they are the same
    in every process layout and after a resume, and independent of each other and of the global RNG.
    """
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_generator(*parts: int | str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by :func:`derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def loader_generator(seed: int = 0) -> torch.Generator:
    """A ``torch.Generator`` to pass as ``DataLoader(generator=...)``.

    A DataLoader without its own generator draws a seed from the *global* RNG every time an iterator is created
    (each epoch, each validation). A run resumed from a checkpoint creates iterators at other moments than the
    uninterrupted run, so the global RNG (dropout, sampling) would drift; with a private generator it does not.
    """
    return torch.Generator().manual_seed(seed)


_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele, Lea & Flood, OOPSLA 2014), element-wise on uint64 (wrapping arithmetic)."""
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def counter_hash(*keys: Any) -> np.ndarray:
    """Counter-based random bits: a uint64 hash of integer keys (broadcast), chained through SplitMix64.

    ``counter_hash(seed, stream, client, step, item)`` is a pure function of its keys, so every process draws the
    same numbers for a client whatever the client-to-process layout, and the draws vectorize over clients/items.
    """
    with np.errstate(over="ignore"):
        h = np.zeros((), dtype=np.uint64)
        for key in keys:
            h = _splitmix64(h ^ np.asarray(key).astype(np.int64).astype(np.uint64))
    return h


def uniform_from_bits(bits: np.ndarray) -> np.ndarray:
    """Uniform floats in ``[0, 1)`` from :func:`counter_hash` bits (the top 53 bits)."""
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def numpy_generator(*parts: int) -> np.random.Generator:
    """``numpy.random.default_rng(list(parts))``: a NumPy generator for the stream named by integer ``parts``."""
    return np.random.default_rng(list(parts))


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order in which epoch ``epoch`` visits ``n`` items: ``randperm(n)`` from a generator seeded by
    ``seed * 1_000_003 + epoch``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
