"""Client-partitioned text
========================

:class:`FederatedTextDataModule` gives each client its own text (its own local files, or a share of a corpus's
documents) and serves **stacked dict batches** ``{"input_ids": [n_local, B, block_size]}`` of next-token blocks to
the collaborative core, for language-model clients (``CausalLMModule``, e.g. with LoRA adapters over a shared frozen
base). Every client's documents are split into train and validation documents; each split is tokenized with one
shared tokenizer and packed into blocks, as :class:`~lightning_epfl.datamodules.text.TextDataModule` does for one
corpus. Nothing is downloaded: the default corpus is Python's own ``pydoc_data`` text.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_epfl.datamodules.client_data import ClientEvalStream, served_client_ids
from lightning_epfl.datamodules.streams import ResumableLoader, StreamPosition
from lightning_epfl.datamodules.text import TextDataModule, TokenBlocks
from lightning_epfl.seeding import epoch_permutation, loader_generator, seeded_generator

__all__ = ["FederatedTextDataModule"]


class FederatedTextDataModule(LightningDataModule):
    """Text split over ``n_clients`` clients, served as stacked dict batches of token blocks.

    Sources: ``client_paths[i]`` (files or folders, as ``TextDataModule(paths=...)``) for client ``i``; or
    ``domains`` (see :mod:`~lightning_epfl.datamodules.domains`: ``"prose"``, ``"code"``, ``"german"`` or local
    paths), where client ``i``'s main domain is ``i mod C`` (``true_clusters``) and ``domain_split="mixed"`` gives it
    ``1 - mixed_share`` of its text from that domain and ``mixed_share`` from domain ``(i + 1) mod C``
    (``client_mixture``); ``reference_fraction`` of every domain is held out as a public reference set
    (:meth:`reference_batches`). Without either, the ``pydoc_data`` topics are dealt to the clients:
    ``partition="contiguous"`` gives each client a run of alphabetically adjacent topics (related subjects, a
    non-IID split), ``"shuffled"`` a random share.

    Training batch ``k`` of client ``i`` holds ``batch_size`` of its training blocks, in the order of its own per-epoch
    permutation (:func:`lightning_epfl.seeding.epoch_permutation` of ``(seed + i, epoch)``): a pure function of
    ``(seed, i, k)``, identical in every process layout, resumed exactly from the loader's position.

    Args:
        n_clients: Number of clients (``>= 1``).
        client_paths: One list of local text files/folders per client; ``None`` for the pydoc corpus.
        partition: How pydoc topics are dealt without ``client_paths``: ``"contiguous"`` or ``"shuffled"``.
        tokenizer_path: Tokenizer, as ``TextDataModule(tokenizer_path=...)`` (a model name or path; ``None`` bytes).
        block_size: Tokens per sequence (``>= 2``).
        batch_size: Sequences per client and batch (``>= 1``).
        val_fraction: Share of each client's characters held out for validation, in ``(0, 1)``.
        steps_per_epoch: Training batches per epoch; default: the smallest client's full batches.
        seed: Seed of the topic deal, the splits and the batch order.
        domains: Text domains (``C >= 1``, at most ``n_clients``); mutually exclusive with ``client_paths``. A
            built-in domain that is absent here (``"german"`` without gettext catalogs) is skipped with a warning.
        domain_split: ``"specific"`` (one domain per client) or ``"mixed"``.
        mixed_share: Share of a ``"mixed"`` client's characters from the next domain, in ``(0, 1)``.
        domain_chars: Characters read per domain (``None``: all; the stdlib alone is several MB).
        reference_fraction: Share of each domain's characters held out as the public reference set, in ``[0, 1)``.

    Attributes:
        vocab_size: The tokenizer's vocabulary size (read by ``CausalLMModule``).
        true_clusters: With ``domains``: each client's main domain ``[n_clients]``; else ``None``.
        client_mixture: With ``domains``: the measured client x domain character shares ``[n_clients][C]`` (every
            domain is cut to the smallest one's size, so they are the nominal split up to document granularity);
            else ``None``.
        domain_names: The domains in use (after skipping absent ones).

    Raises:
        MisconfigurationException: In ``__init__`` for a bad count or fraction, ``client_paths`` of the wrong length,
            a missing path, or an unresolvable tokenizer; in ``setup`` if a client has less than one block of
            training or validation text, or fewer pydoc topics than clients; for bad ``domains`` arguments (unknown
            name or missing path, more domains than clients, a share or fraction out of range).
    """

    def __init__(
        self,
        n_clients: int = 4,
        client_paths: list[list[str]] | None = None,
        partition: Literal["contiguous", "shuffled"] = "contiguous",
        tokenizer_path: str | None = None,
        block_size: int = 128,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        steps_per_epoch: int | None = None,
        seed: int = 0,
        domains: list[str] | None = None,
        domain_split: Literal["specific", "mixed"] = "specific",
        mixed_share: float = 0.25,
        domain_chars: int | None = 200_000,
        reference_fraction: float = 0.05,
    ) -> None:
        super().__init__()
        self._check_domains(n_clients, client_paths, domains, domain_split, mixed_share, domain_chars,
                            reference_fraction)  # fmt: skip
        if n_clients < 1:
            raise MisconfigurationException(f"`n_clients` must be >= 1, got {n_clients}.")
        if client_paths is not None and len(client_paths) != n_clients:
            raise MisconfigurationException(
                f"`client_paths` must hold one list per client ({n_clients}), got {len(client_paths)}."
            )
        if partition not in ("contiguous", "shuffled"):
            raise MisconfigurationException(f"`partition` must be 'contiguous' or 'shuffled', got {partition!r}.")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise MisconfigurationException(f"`steps_per_epoch` must be >= 1 or None, got {steps_per_epoch}.")
        # one TextDataModule per client checks paths, sizes, fractions and the tokenizer, and does the splitting
        self.clients = [
            TextDataModule(
                paths=None if client_paths is None else client_paths[i],
                tokenizer_path=tokenizer_path,
                block_size=block_size,
                batch_size=batch_size,
                val_fraction=val_fraction,
                seed=seed + i,
            )
            for i in range(n_clients)
        ]
        self.save_hyperparameters()
        self.n_clients = n_clients
        self.client_paths = client_paths
        self.partition = partition
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self._steps_per_epoch = steps_per_epoch
        self._train: list[TokenBlocks] = []
        self._val: list[TokenBlocks] = []
        self._train_position = StreamPosition(0)
        self.domains = None if domains is None else list(domains)
        self.domain_split = domain_split
        self.mixed_share = mixed_share
        self.domain_chars = domain_chars
        self.reference_fraction = reference_fraction
        self.domain_names: list[str] = []
        self.true_clusters: list[int] | None = None
        self.client_mixture: list[list[float]] | None = None
        self._reference: TokenBlocks | None = None
        self._reference_docs: list[str] = []

    @staticmethod
    def _check_domains(
        n_clients: int,
        client_paths: Any,
        domains: list[str] | None,
        domain_split: str,
        mixed_share: float,
        domain_chars: int | None,
        reference_fraction: float,
    ) -> None:
        from lightning_epfl.datamodules.domains import BUILTIN_DOMAINS

        if domain_split not in ("specific", "mixed"):
            raise MisconfigurationException(f"`domain_split` must be 'specific' or 'mixed', got {domain_split!r}.")
        if not 0 < mixed_share < 1:
            raise MisconfigurationException(f"`mixed_share` must be in (0, 1), got {mixed_share}.")
        if not 0 <= reference_fraction < 1:
            raise MisconfigurationException(f"`reference_fraction` must be in [0, 1), got {reference_fraction}.")
        if domain_chars is not None and domain_chars < 1:
            raise MisconfigurationException(f"`domain_chars` must be >= 1 or None, got {domain_chars}.")
        if domains is None:
            return
        if client_paths is not None:
            raise MisconfigurationException("Give either `client_paths` or `domains`, not both.")
        if not domains or len(domains) > n_clients:
            raise MisconfigurationException(
                f"`domains` must hold 1 to `n_clients`={n_clients} entries, got {len(domains)}."
            )
        if len(set(domains)) != len(domains):
            raise MisconfigurationException(f"`domains` must not repeat a domain, got {domains}.")
        for name in domains:
            if name not in BUILTIN_DOMAINS and not os.path.exists(name):
                raise MisconfigurationException(
                    f"`domains` entry {name!r} is neither one of {list(BUILTIN_DOMAINS)} nor an existing path."
                )

    def check_config(self, trainer: Any, pl_module: Any, datamodule: Any = None) -> None:
        """Tokenize and split now, so that a client with too little text fails before the run starts."""
        self.setup()

    @property
    def tokenizer(self) -> Any:
        """The shared tokenizer (loaded on first access)."""
        return self.clients[0].tokenizer

    @property
    def vocab_size(self) -> int:
        return self.clients[0].vocab_size

    def client_documents(self) -> list[list[str]]:
        """Each client's documents (before its train/validation split)."""
        if self.client_paths is not None:
            docs = [c.load_documents() for c in self.clients]
            for i, d in enumerate(docs):
                if not any(text.strip() for text in d):
                    raise MisconfigurationException(
                        f"client {i}'s `client_paths` {self.client_paths[i]} hold no text files (pattern "
                        f"{self.clients[i].glob!r}) or only empty ones."
                    )
            return docs
        if self.domains is not None:
            return self._domain_documents()
        from lightning_epfl.datamodules.text import pydoc_documents

        docs = pydoc_documents()
        if len(docs) < self.n_clients:
            raise MisconfigurationException(
                f"the pydoc corpus has {len(docs)} topics for `n_clients`={self.n_clients}; give `client_paths`."
            )
        order = list(range(len(docs)))
        if self.partition == "shuffled":
            random.Random(self.seed).shuffle(order)
        bounds = [round(i * len(docs) / self.n_clients) for i in range(self.n_clients + 1)]
        return [[docs[j] for j in order[bounds[i] : bounds[i + 1]]] for i in range(self.n_clients)]

    def _domain_documents(self) -> list[list[str]]:
        """Deal each domain's documents (after holding out the reference share) to the clients that read it."""
        from lightning_epfl.datamodules.domains import domain_available, domain_documents

        assert self.domains is not None
        names = []
        for name in self.domains:
            if domain_available(name):
                names.append(name)
            else:
                rank_zero_warn(f"FederatedTextDataModule: domain {name!r} is not available here; skipped.")
        if not names:
            raise MisconfigurationException(f"none of the `domains` {self.domains} is available here.")
        C, n = len(names), self.n_clients
        share = self.mixed_share if self.domain_split == "mixed" else 0.0
        mixture = [[0.0] * C for _ in range(n)]
        for i in range(n):
            mixture[i][i % C] += 1.0 - share
            mixture[i][(i + 1) % C] += share
        docs_out: list[list[str]] = [[] for _ in range(n)]
        self._reference_docs = []
        # pieces small enough that every reader's share holds several (train/validation splits are by document)
        piece = 4000 if self.domain_chars is None else max(256, min(4000, self.domain_chars // (8 * n)))
        pools = [domain_documents(name, self.domain_chars, self.seed + c, piece_chars=piece) for c, name in
                 enumerate(names)]  # fmt: skip
        # equal characters per domain (the smallest domain's), so that client shares are the nominal mixture
        cap = min(sum(len(d) for d in docs) for docs in pools)
        chars = [[0.0] * C for _ in range(n)]
        for c, docs in enumerate(pools):
            kept, total = [], 0
            for d in docs:
                if total >= cap:
                    break
                kept.append(d[: cap - total])
                total += len(kept[-1])
            docs = kept
            k, held = 0, 0
            while k < len(docs) - 1 and held < self.reference_fraction * total:
                held += len(docs[k])
                k += 1
            self._reference_docs += docs[:k]
            docs = docs[k:]
            # readers of domain c and their weights; cut the documents at the cumulative character quotas
            readers = [(i, mixture[i][c]) for i in range(n) if mixture[i][c] > 0]
            weight = sum(w for _, w in readers)
            rest = sum(len(d) for d in docs)
            bounds, acc = [], 0.0
            for _, w in readers:
                acc += w / weight
                bounds.append(acc * rest)
            pos, r = 0, 0
            for d in docs:
                while r < len(readers) - 1 and pos >= bounds[r]:
                    r += 1
                docs_out[readers[r][0]].append(d)
                chars[readers[r][0]][c] += len(d)
                pos += len(d)
        self.domain_names = names
        self.true_clusters = [i % C for i in range(n)]
        # the measured character shares (the nominal ones up to document granularity)
        self.client_mixture = [[x / max(sum(row), 1.0) for x in row] for row in chars]
        return docs_out

    def reference_batches(self, n: int) -> list[dict[str, Tensor]]:
        """``n`` batches ``{"input_ids": [batch_size, block_size]}`` of the public reference set (held out of every
        domain), the same at every call: the first ``n * batch_size`` blocks of a seeded permutation.

        Raises:
            MisconfigurationException: Without ``domains``, with ``reference_fraction=0``, or with fewer reference
                blocks than ``n * batch_size``.
        """
        self.setup()
        if self._reference is None:
            raise MisconfigurationException(
                "this datamodule has no public reference set: set `domains` and `reference_fraction` > 0."
            )
        need = n * self.batch_size
        if len(self._reference) < need:
            raise MisconfigurationException(
                f"the reference set has {len(self._reference)} blocks, fewer than the {n} x {self.batch_size} asked "
                "for; raise `reference_fraction` or `domain_chars`, or ask for fewer reference batches."
            )
        order = torch.randperm(len(self._reference), generator=seeded_generator(self.seed, "reference"))[:need].tolist()
        blocks = [self._reference[j]["input_ids"] for j in order]
        return [{"input_ids": torch.stack(blocks[b * self.batch_size : (b + 1) * self.batch_size])} for b in range(n)]

    def validation_batches(self, client_id: int, n: int, round: int) -> list[dict[str, Tensor]]:
        """``n`` batches of client ``client_id``'s validation blocks, drawn by ``(seed, client_id, round)`` (the same
        batches for every model evaluated in one round; with replacement across batches if the client has fewer
        than ``n * batch_size`` blocks)."""
        self.setup()
        blocks = self._val[client_id]
        g = seeded_generator(self.seed, "trust_validation", client_id, round)
        need = n * self.batch_size
        reps = math.ceil(need / len(blocks))
        idx = torch.cat([torch.randperm(len(blocks), generator=g) for _ in range(reps)])[:need].tolist()
        stacked = torch.stack([blocks[j]["input_ids"] for j in idx])
        return [{"input_ids": stacked[b * self.batch_size : (b + 1) * self.batch_size]} for b in range(n)]

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        if self._train:
            return
        tokenizer = self.clients[0].tokenizer
        for client in self.clients[1:]:
            client._tokenizer = tokenizer  # one tokenizer for all clients
        for i, (client, docs) in enumerate(zip(self.clients, self.client_documents())):
            splits = client.split_documents(docs)
            for name, store in (("train", self._train), ("val", self._val)):
                tokens = client._encode(splits[name])
                if len(tokens) < self.block_size:
                    raise MisconfigurationException(
                        f"client {i}'s {name} text has {len(tokens)} tokens, less than one `block_size` "
                        f"({self.block_size}); use a smaller `block_size`, fewer clients or more text."
                    )
                store.append(TokenBlocks(tokens, self.block_size))
        if self._reference_docs and self.reference_fraction > 0:
            tokens = self.clients[0]._encode(self._reference_docs)
            if len(tokens) >= self.block_size:
                self._reference = TokenBlocks(tokens, self.block_size)

    @property
    def steps_per_epoch(self) -> int:
        """Training batches per epoch (default: the smallest client's number of full batches, at least 1)."""
        if self._steps_per_epoch is not None:
            return self._steps_per_epoch
        self.setup()
        return max(1, min(len(t) for t in self._train) // self.batch_size)

    @property
    def client_sizes(self) -> list[int]:
        """Training blocks per client."""
        self.setup()
        return [len(t) for t in self._train]

    def local_client_ids(self) -> list[int]:
        """Clients served to this process (``strategy.local_client_ids`` under a collaborative strategy)."""
        return served_client_ids(self, self.n_clients)

    def client_batch_indices(self, client_id: int, k: int) -> list[int]:
        """Indices of client ``client_id``'s training blocks in its batch ``k``: positions ``[kB, (k+1)B)`` of the
        concatenation of its epoch permutations (a batch may straddle two epochs)."""
        self.setup()
        n, b = len(self._train[client_id]), self.batch_size
        start = k * b
        idx: list[int] = []
        while len(idx) < b:
            epoch, offset = divmod(start + len(idx), n)
            perm = epoch_permutation(n, self.seed + client_id, epoch)
            idx += perm[offset : offset + b - len(idx)].tolist()
        return idx

    def _client_batch(self, i: int, k: int) -> dict[str, Tensor]:
        blocks = self._train[i]
        return {"input_ids": torch.stack([blocks[j]["input_ids"] for j in self.client_batch_indices(i, k)])}

    def train_batch(self, k: int, client_ids: Sequence[int] | None = None) -> dict[str, Tensor]:
        """Training batch ``k`` stacked over ``client_ids`` (default all): ``{"input_ids": [n, B, block_size]}``."""
        self.setup()
        ids = range(self.n_clients) if client_ids is None else client_ids
        return {"input_ids": torch.stack([self._client_batch(int(i), k)["input_ids"] for i in ids])}

    def extra_batch(self, client_id: int, size: int, stream: str = "extra", step: int | None = None) -> Any:
        """``size`` training blocks of client ``client_id`` (``-1``: all), independent of the training stream."""
        self.setup()
        blocks = self._train[client_id]
        n = len(blocks)
        if size == -1 or size >= n:
            idx = list(range(n))
        else:
            from lightning_epfl.seeding import seeded_generator

            g = seeded_generator(self.seed, stream, client_id, -1 if step is None else step)
            idx = torch.randperm(n, generator=g)[:size].tolist()
        return {"input_ids": torch.stack([blocks[j]["input_ids"] for j in idx])}

    def train_dataloader(self) -> DataLoader:
        self.setup()
        ids = self.local_client_ids()
        return ResumableLoader(
            lambda k: self.train_batch(k, ids), self.steps_per_epoch, self._train_position, self.seed
        )

    def _eval_batch(self, i: int, b: int) -> dict[str, Tensor] | None:
        blocks = self._val[i]
        start = b * self.batch_size
        if start >= len(blocks):
            return None
        stop = min(start + self.batch_size, len(blocks))
        return {"input_ids": torch.stack([blocks[j]["input_ids"] for j in range(start, stop)])}

    def val_dataloader(self) -> DataLoader:
        self.setup()
        ids = self.local_client_ids()
        sizes = [len(self._val[i]) for i in ids]
        length = max(math.ceil(s / self.batch_size) for s in sizes)
        stream = ClientEvalStream(self._eval_batch, ids, length, masked=len(set(sizes)) > 1)
        return DataLoader(stream, batch_size=None, generator=loader_generator(self.seed))

    def test_dataloader(self) -> DataLoader:
        """Same as :meth:`val_dataloader` (the held-out split)."""
        return self.val_dataloader()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"train_position": self._train_position.value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_position.value = int(state_dict.get("train_position", 0))
