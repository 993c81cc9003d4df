"""Pairwise secrets
================

Key agreement between the two ends of every edge of a communication graph: each client draws an X25519 key pair
(RFC 7748), the 32-byte public keys are exchanged through the communicator, and each end derives the edge's
32-byte key with HKDF-SHA256 (RFC 5869) from the Diffie-Hellman shared secret, with ``info = context || i || j``
(``i < j``). Both ends obtain the same key; no one else can (against a passive eavesdropper: the public keys are not
authenticated, so an active attacker who substitutes them needs to be excluded by pinned identity keys).

Keys live in memory only: :class:`PairwiseSecret` refuses to be pickled, so it cannot end up in a checkpoint, a log
or hyperparameters, and its ``repr`` does not show the key. Private keys are dropped as soon as the keys are derived.
Uses the ``cryptography`` package.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["PUBLIC_KEY_BYTES", "PairwiseSecret", "chacha_gaussian", "derive_pair_key", "generate_key_pairs"]

PUBLIC_KEY_BYTES = 32


class _KeyedStream:
    """A 32-byte key and its ChaCha20 Gaussian stream; in memory only (refuses pickling, hides its bytes)."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError(f"a stream key has 32 bytes, got {len(key)}.")
        self._key = bytes(key)

    @property
    def key(self) -> bytes:
        """The 32 key bytes (never log or store them)."""
        return self._key

    def gaussian(self, step: int, size: int, stream: int = 0) -> Tensor:
        """Standard normal ``[size]`` (float64) from the key's ChaCha20 keystream at ``(step, stream)``: fresh for
        every step (:func:`chacha_gaussian`)."""
        return chacha_gaussian(self._key, step, stream, size)

    def __reduce__(self) -> None:  # type: ignore[override]
        raise TypeError(
            f"{type(self).__name__} is never serialized (checkpoints, logs and hyperparameters must not hold it)."
        )


class PairwiseSecret(_KeyedStream):
    """The shared 32-byte key of one edge ``(i, j)``, ``i < j``: both ends draw the same stream.

    Attributes:
        edge: The edge ``(i, j)`` with ``i < j``.
    """

    __slots__ = ("edge",)

    def __init__(self, edge: tuple[int, int], key: bytes) -> None:
        super().__init__(key)
        self.edge = edge

    def __repr__(self) -> str:
        return f"PairwiseSecret(edge={self.edge}, key=<32 bytes hidden>)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PairwiseSecret) and self.edge == other.edge and self._key == other._key

    def __hash__(self) -> int:
        return hash(self.edge)


class PrivateSecret(_KeyedStream):
    """One client's own 32-byte key (its private noise stream), drawn from the operating system's CSPRNG.

    Attributes:
        client: The client id.
    """

    __slots__ = ("client",)

    def __init__(self, client: int) -> None:
        super().__init__(os.urandom(32))
        self.client = client

    def __repr__(self) -> str:
        return f"PrivateSecret(client={self.client}, key=<32 bytes hidden>)"


def generate_key_pairs(n: int) -> tuple[list[object], Tensor]:
    """Draw ``n`` fresh X25519 key pairs from the operating system's CSPRNG.

    Returns:
        The private keys (``cryptography`` objects; drop them after :func:`derive_pair_key`) and the public keys as a
        ``uint8`` tensor ``[n, 32]``.
    """
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    private = [X25519PrivateKey.generate() for _ in range(n)]
    public = [p.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) for p in private]
    table = torch.tensor([list(b) for b in public], dtype=torch.uint8) if n else torch.empty(0, 32, dtype=torch.uint8)
    return private, table


def derive_pair_key(private: object, peer_public: bytes, edge: tuple[int, int], context: bytes) -> PairwiseSecret:
    """Both ends' key of ``edge``: HKDF-SHA256 of the X25519 shared secret, ``info = context || i || j``.

    Args:
        private: This end's ``X25519PrivateKey``.
        peer_public: The other end's 32-byte public key.
        edge: ``(i, j)`` with ``i < j``.
        context: Domain separation (e.g. the algorithm's name and the run); the same on both ends.
    """
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    i, j = edge
    shared = private.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))  # type: ignore[attr-defined]
    info = bytes(context) + struct.pack(">QQ", i, j)
    return PairwiseSecret(edge, HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared))


def normalize_edges(edges: Sequence[tuple[int, int]], n_clients: int) -> list[tuple[int, int]]:
    """Edges as sorted ``(i, j)`` with ``i < j``, without duplicates.

    Raises:
        ValueError: On a self-loop or a client id outside ``[0, n_clients)``.
    """
    out = set()
    for a, b in edges:
        a, b = int(a), int(b)
        if a == b:
            raise ValueError(f"edge ({a}, {b}) is a self-loop.")
        if not (0 <= a < n_clients and 0 <= b < n_clients):
            raise ValueError(f"edge ({a}, {b}) names a client outside [0, {n_clients}).")
        out.add((min(a, b), max(a, b)))
    return sorted(out)


def chacha_gaussian(key: bytes, step: int, stream: int, size: int) -> Tensor:
    """``size`` standard normal draws (float64) from the ChaCha20 keystream of ``key``.

    The 16-byte nonce is a 4-byte block counter (0) followed by ``step`` (8 bytes) and ``stream`` (4 bytes), so a
    ``(key, nonce)`` pair is never reused across steps or streams. The keystream is read as 64-bit words, turned into
    53-bit uniforms in ``(0, 1)`` and into normals by the Box-Muller transform.

    Args:
        key: 32-byte key.
        step: Step counter (``>= 0``).
        stream: Stream id (``>= 0``), for several independent draws per step.
        size: Number of draws.
    """
    import numpy as np
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    pairs = (size + 1) // 2
    nonce = struct.pack("<I", 0) + struct.pack("<QI", int(step), int(stream))
    encryptor = Cipher(algorithms.ChaCha20(bytes(key), nonce), mode=None).encryptor()
    words = np.frombuffer(encryptor.update(bytes(16 * pairs)), dtype="<u8")
    u = ((words >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 2**53)
    u1, u2 = u[:pairs], u[pairs:]
    radius = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])[:size]
    return torch.from_numpy(z)
