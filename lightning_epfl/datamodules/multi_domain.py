"""Multi-domain text with domain labels
=====================================

:class:`MultiDomainTextDataModule` serves next-token blocks from several text domains (see
:mod:`~lightning_epfl.datamodules.domains`: ``"prose"``, ``"code"``, ``"german"`` or local paths) as dict batches
``{"input_ids": [B, block_size], "domain": [B]}``, with the same number of blocks from every domain in each training
batch. The ``"domain"`` ids let a model report perplexity per domain (``CausalLMModule`` logs ``val/ppl/<domain>``),
route by domain (mixture-of-experts ``routing="label"``) or measure how expert choice relates to the domain.
Nothing is downloaded.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_epfl.datamodules.streams import ResumableLoader, StreamPosition
from lightning_epfl.datamodules.text import LazyTokenizer, TokenBlocks
from lightning_epfl.seeding import epoch_permutation, loader_generator

__all__ = ["MultiDomainTextDataModule"]


class _LabelledBlocks(Dataset):
    """The blocks of all domains interleaved (block 0 of each domain, then block 1, ...; a domain that runs out is
    skipped), each item ``{"input_ids": [block_size], "domain": int64 scalar}``. Any prefix of the validation set
    (``limit_val_batches``) thus covers every domain."""

    def __init__(self, blocks: list[TokenBlocks]) -> None:
        self.blocks = blocks
        longest = max((len(b) for b in blocks), default=0)
        self.index = [(d, i) for i in range(longest) for d, b in enumerate(blocks) if i < len(b)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict[str, Tensor]:
        d, i = self.index[item]
        return {"input_ids": self.blocks[d][i]["input_ids"], "domain": torch.tensor(d, dtype=torch.long)}


class MultiDomainTextDataModule(LazyTokenizer, LightningDataModule):
    """Next-token blocks from several text domains, with balanced training batches and a domain id per sequence.

    Each domain's documents (:func:`~lightning_epfl.datamodules.domains.domain_documents`, at most ``max_chars``
    characters, seeded) are shuffled and split by characters: ``val_fraction`` to validation, the rest to training
    (whole documents; at least one in each split). Each split is tokenized (bytes by default) and packed into
    non-overlapping blocks of ``block_size`` tokens per domain.

    Training batch ``k`` holds ``batch_size / D`` blocks of each of the ``D`` domains, in each domain's own per-epoch
    order (:func:`lightning_epfl.seeding.epoch_permutation` of ``(seed + d, epoch)``): a pure function of
    ``(seed, k)``; the loader's position is checkpointed, so a resumed run sees the same batches. An epoch is as many
    batches as the smallest domain fills. Validation batches hold all validation blocks, the domains interleaved.

    Args:
        domains: Domain names or local paths (``D >= 1``). A built-in domain absent here (``"german"`` without
            gettext catalogs) is skipped with a warning.
        tokenizer_path: Tokenizer of a pretrained model (as ``TextDataModule``); ``None`` (default): bytes.
        block_size: Tokens per sequence (``>= 2``).
        batch_size: Sequences per training batch, a multiple of the number of domains in use.
        val_fraction: Share of each domain's characters held out for validation, in ``(0, 1)``. Default 0.1.
        max_chars: Characters read per domain (``None``: all of it). Default 200 000.
        seed: Seed of the document order, the split and the batch order.

    Attributes:
        domain_names: The domains in use, in id order.
        vocab_size: The tokenizer's vocabulary size (read by ``CausalLMModule``).

    Raises:
        MisconfigurationException: In ``__init__`` for an empty ``domains``, ``block_size < 2``, ``batch_size < 1``
            or a fraction outside ``(0, 1)``; in ``setup`` if no domain is available, ``batch_size`` is not a
            multiple of the domains in use, or a domain's split is shorter than one block.
    """

    def __init__(
        self,
        domains: list[str] | None = None,
        tokenizer_path: str | None = None,
        block_size: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        max_chars: int | None = 200_000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        domains = ["prose", "code"] if domains is None else list(domains)
        if not domains:
            raise MisconfigurationException("MultiDomainTextDataModule: `domains` must name at least one domain.")
        if block_size < 2:
            raise MisconfigurationException(f"MultiDomainTextDataModule: `block_size` must be >= 2, got {block_size}.")
        if batch_size < 1:
            raise MisconfigurationException(f"MultiDomainTextDataModule: `batch_size` must be >= 1, got {batch_size}.")
        if not 0.0 < val_fraction < 1.0:
            raise MisconfigurationException(
                f"MultiDomainTextDataModule: `val_fraction` must be in (0, 1), got {val_fraction}."
            )
        if max_chars is not None and max_chars < 1:
            raise MisconfigurationException(f"MultiDomainTextDataModule: `max_chars` must be >= 1, got {max_chars}.")
        self.save_hyperparameters()
        self.domains = domains
        self.tokenizer_path = tokenizer_path
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.max_chars = max_chars
        self.seed = seed
        self.domain_names: list[str] = []
        self.train_blocks: list[TokenBlocks] = []
        self.val_blocks: list[TokenBlocks] = []
        self._tokenizer: Any = None
        self._train_position = StreamPosition(0)

    def split_documents(self, documents: list[str], seed: int) -> tuple[list[str], list[str]]:
        """``(train, val)`` documents: a seeded shuffle, then documents go to validation until it holds
        ``val_fraction`` of the characters (at least one document stays in each split)."""
        order = list(range(len(documents)))
        random.Random(seed).shuffle(order)
        quota = self.val_fraction * sum(len(d) for d in documents)
        val, taken, i = [], 0, 0
        while i < len(order) - 1 and (taken < quota or not val):
            val.append(documents[order[i]])
            taken += len(documents[order[i]])
            i += 1
        return [documents[j] for j in order[i:]], val

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        if self.train_blocks:
            return
        from lightning_epfl.datamodules.domains import domain_available, domain_documents

        names = []
        for name in self.domains:
            if domain_available(name):
                names.append(name)
            else:
                rank_zero_warn(f"MultiDomainTextDataModule: domain {name!r} is not available here; skipped.")
        if not names:
            raise MisconfigurationException(f"MultiDomainTextDataModule: none of the `domains` {self.domains} is here.")
        if self.batch_size % len(names):
            raise MisconfigurationException(
                f"MultiDomainTextDataModule: `batch_size`={self.batch_size} must be a multiple of the {len(names)} "
                f"domains in use ({names}) for balanced batches."
            )
        piece = 4000 if self.max_chars is None else max(256, min(4000, self.max_chars // 40))
        train, val = [], []
        for d, name in enumerate(names):
            docs = domain_documents(name, self.max_chars, self.seed + d, piece_chars=piece)
            if len(docs) < 2:
                raise MisconfigurationException(
                    f"MultiDomainTextDataModule: domain {name!r} yields one document; raise `max_chars` to split it."
                )
            parts = self.split_documents(docs, self.seed + d)
            for split, blocks, text in (("train", train, parts[0]), ("validation", val, parts[1])):
                tokens = self._encode(text)
                if len(tokens) < self.block_size:
                    raise MisconfigurationException(
                        f"MultiDomainTextDataModule: the {split} split of domain {name!r} has {len(tokens)} tokens, "
                        f"fewer than `block_size`={self.block_size}; raise `max_chars` or lower `block_size`."
                    )
                blocks.append(TokenBlocks(tokens, self.block_size))
        self.domain_names, self.train_blocks, self.val_blocks = names, train, val

    @property
    def per_domain(self) -> int:
        """Blocks of each domain in a training batch."""
        return self.batch_size // max(len(self.domain_names), 1)

    @property
    def batches_per_epoch(self) -> int:
        """Training batches per epoch: the smallest domain's full per-domain shares (at least 1)."""
        return max(1, min(len(b) for b in self.train_blocks) // self.per_domain)

    def train_batch(self, k: int) -> dict[str, Tensor]:
        """Training batch ``k``: ``{"input_ids": [B, block_size], "domain": [B]}``, domains in id order."""
        m = self.per_domain
        ids, domains = [], []
        for d, blocks in enumerate(self.train_blocks):
            per_epoch = max(1, len(blocks) // m)
            epoch, j = divmod(k, per_epoch)
            order = epoch_permutation(len(blocks), self.seed + d, epoch)[j * m : (j + 1) * m]
            ids += [blocks[int(i)]["input_ids"] for i in order]
            domains += [d] * len(order)
        return {"input_ids": torch.stack(ids), "domain": torch.tensor(domains, dtype=torch.long)}

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(self.train_batch, self.batches_per_epoch, self._train_position, self.seed)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_LabelledBlocks(self.val_blocks), self.batch_size, generator=loader_generator(self.seed))

    def test_dataloader(self) -> DataLoader:
        """Same as :meth:`val_dataloader` (the held-out split)."""
        return self.val_dataloader()

    def state_dict(self) -> dict[str, Any]:
        return {"train_position": self._train_position.value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_position.value = int(state_dict.get("train_position", 0))
