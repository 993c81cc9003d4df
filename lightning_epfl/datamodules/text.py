"""Text datamodule for causal language modelling
=================================================

Packs documents into fixed-length token blocks for next-token prediction. Sources, none of which needs a download:

* the default corpus: the English text of Python's own ``pydoc_data.topics`` (79 topics, about 465k characters,
  shipped with every CPython);
* local text files or folders (``paths``);
* a Hugging Face ``datasets`` dataset from local files (``dataset_path``: a ``save_to_disk`` folder, or
  ``.txt``/``.json``/``.jsonl``/``.csv``/``.parquet`` files).

Tokenization is byte-level by default (UTF-8 bytes, vocabulary 256), or the tokenizer of a pretrained model
(``tokenizer_path``: a local folder, a ``.gguf`` file or a packaged model name such as ``"smollm2-135m-instruct"``,
resolved by :func:`lightning_epfl.models.resolve_pretrained` and loaded with
``AutoTokenizer.from_pretrained(folder, local_files_only=True)``).
"""

from __future__ import annotations

import glob as globlib
import json
import os
import random
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, Dataset

from lightning_epfl.datamodules.streams import ResumableLoader, StreamPosition
from lightning_epfl.seeding import epoch_permutation, loader_generator

BYTE_VOCAB_SIZE = 256
TOKENIZER_DESCRIPTION_FILE = "lightning_epfl_tokenizer.json"


class ByteTokenizer:
    """UTF-8 byte tokenizer: token ids are the bytes ``0..255``; no special tokens.

    Decoding replaces invalid UTF-8 sequences (a sampled model may produce them) with U+FFFD.
    """

    vocab_size = BYTE_VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        """Return the UTF-8 bytes of ``text`` as a list of ints."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Return the text of byte ids (invalid UTF-8 is replaced)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return BYTE_VOCAB_SIZE

    def save_pretrained(self, directory: str) -> None:
        """Write the tokenizer description (``lightning_epfl_tokenizer.json``) into ``directory``."""
        with open(os.path.join(directory, TOKENIZER_DESCRIPTION_FILE), "w") as f:
            json.dump({"type": "byte", "vocab_size": BYTE_VOCAB_SIZE}, f)


def load_tokenizer(path: str | None) -> Any:
    """Load the byte tokenizer or the tokenizer of a pretrained model.

    Args:
        path: ``None`` for the byte tokenizer; a folder written by ``CausalLMModule.save_pretrained`` with a byte
            tokenizer description; a folder holding a Hugging Face tokenizer; a ``.gguf`` file or a packaged model
            name (:func:`lightning_epfl.models.resolve_pretrained`).

    Returns:
        A :class:`ByteTokenizer` or a ``transformers`` tokenizer.

    Raises:
        ValueError: If ``path`` cannot be resolved or holds no tokenizer.
        ModuleNotFoundError: If a packaged model or GGUF support is not installed (the message gives the command).
    """
    if path is None:
        return ByteTokenizer()
    from lightning_epfl.models import resolve_pretrained

    try:
        path = str(resolve_pretrained(path, "tokenizer_path", need="tokenizer"))
    except FileNotFoundError as err:
        raise ValueError(str(err)) from err
    description = os.path.join(path, TOKENIZER_DESCRIPTION_FILE)
    if os.path.isfile(description):
        with open(description) as f:
            if json.load(f).get("type") == "byte":
                return ByteTokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # transformers raises OSError, ValueError or KeyError depending on what is missing
        raise ValueError(
            f"`tokenizer_path` {path!r} holds no loadable tokenizer (expected a folder written by "
            f"`save_pretrained`, with tokenizer.json / tokenizer_config.json): {err}"
        ) from err


_MIN_PIECE_CHARS = 256


def split_single_text(text: str, smallest_fraction: float, pieces_per_quota: int = 8) -> list[str]:
    """Cut the text of one file into documents small enough for every held-out split to get its share.

    The text is split at blank lines (paragraphs); any paragraph longer than ``smallest_fraction * len(text) /
    pieces_per_quota`` characters is cut further at line ends into runs of lines of at most that size (a single
    longer line is cut at that size). A file with one sentence per line and no blank line thus still yields a
    validation split. Pieces are never cut below 256 characters.

    Args:
        text: The whole file.
        smallest_fraction: The smallest non-zero held-out fraction (``val_fraction`` or ``test_fraction``).
        pieces_per_quota: How many documents at least fit in that fraction. Default 8.

    Returns:
        The non-blank documents, in file order; joining them with ``"\\n"`` gives back every line of ``text``.
    """
    limit = max(_MIN_PIECE_CHARS, int(smallest_fraction * len(text) / pieces_per_quota))
    docs: list[str] = []
    for paragraph in text.split("\n\n"):
        if not paragraph.strip():
            continue
        if len(paragraph) <= limit:
            docs.append(paragraph)
            continue
        current: list[str] = []
        size = 0
        for line in paragraph.split("\n"):
            while len(line) > limit:  # a line longer than a piece: cut it
                if current:
                    docs.append("\n".join(current))
                    current, size = [], 0
                docs.append(line[:limit])
                line = line[limit:]
            if current and size + len(line) + 1 > limit:
                docs.append("\n".join(current))
                current, size = [], 0
            current.append(line)
            size += len(line) + 1
        if current:
            docs.append("\n".join(current))
    return [d for d in docs if d.strip()]


def pydoc_documents() -> list[str]:
    """Return the ``pydoc_data.topics`` texts, one document per topic, in sorted-key order."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


class TokenBlocks(Dataset):
    """Non-overlapping blocks of ``block_size`` tokens cut from one packed token stream.

    Each item is a dict with ``input_ids`` of shape ``(block_size,)`` (int64); labels equal the inputs (the
    causal-LM loss shifts them).
    """

    def __init__(self, tokens: torch.Tensor, block_size: int) -> None:
        self.tokens = tokens
        self.block_size = block_size

    def __len__(self) -> int:
        return len(self.tokens) // self.block_size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = index * self.block_size
        return {"input_ids": self.tokens[start : start + self.block_size]}


class LazyTokenizer:
    """Mixin of the text datamodules: :attr:`tokenizer` loaded from ``self.tokenizer_path`` on first access
    (:func:`load_tokenizer`; bytes when it is ``None``) and :attr:`vocab_size`. Subclasses set ``tokenizer_path``
    and ``_tokenizer = None`` in ``__init__``."""

    tokenizer_path: str | None
    _tokenizer: Any

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (:class:`ByteTokenizer` or a ``transformers`` tokenizer), loaded on first access.

        Raises:
            MisconfigurationException: If ``tokenizer_path`` names no readable tokenizer.
        """
        if self._tokenizer is None:
            try:
                self._tokenizer = load_tokenizer(self.tokenizer_path)
            except (ValueError, OSError, ImportError) as err:
                raise MisconfigurationException(str(err)) from err
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Vocabulary size (``len(tokenizer)``)."""
        return len(self.tokenizer)

    def _encode(self, documents: list[str]) -> torch.Tensor:
        """The documents as one id stream ``[N]``: bytes joined by newlines, or subword ids each followed by EOS."""
        if isinstance(self.tokenizer, ByteTokenizer):
            return torch.tensor(list("\n".join(documents).encode("utf-8")), dtype=torch.long)
        eos = self.tokenizer.eos_token_id
        ids: list[int] = []
        for d in documents:
            ids += self.tokenizer(d, add_special_tokens=False)["input_ids"]
            if eos is not None:
                ids.append(eos)
        return torch.tensor(ids, dtype=torch.long)


class TextDataModule(LazyTokenizer, LightningDataModule):
    """Causal-LM datamodule: documents → tokens → packed blocks, deterministic document-level split.

    Documents (pydoc topics, files, dataset rows; a single file is cut into paragraphs, and long paragraphs into runs
    of lines, by :func:`split_single_text`) are shuffled with
    ``random.Random(seed)`` and assigned to validation/test until each holds ``val_fraction``/``test_fraction`` of
    the characters; the rest is training text. Each split's documents are joined with a separator (``"\\n"`` for
    bytes, the tokenizer's EOS token otherwise) and packed into non-overlapping blocks of ``block_size`` tokens.
    Training blocks are reshuffled every epoch (:func:`lightning_epfl.seeding.epoch_permutation` of ``(seed,
    epoch)``); training batch ``k`` is a pure function of ``(seed, k)`` and the loader's position ``k`` is
    checkpointed (:mod:`lightning_epfl.datamodules.streams`), so a resumed run continues with the same batches.

    Args:
        paths: Local text files and/or folders (read recursively with ``glob``); ``None`` uses ``dataset_path``
            or, if that is ``None`` too, the embedded ``pydoc_data`` corpus.
        dataset_path: A local Hugging Face dataset: a ``save_to_disk`` folder, or data files
            (``.txt``/``.json``/``.jsonl``/``.csv``/``.parquet``). Mutually exclusive with ``paths``.
        text_column: Column of ``dataset_path`` that holds the text.
        tokenizer_path: The tokenizer of a pretrained model: a local folder, a ``.gguf`` file or a packaged model name
            (``"smollm2-135m-instruct"``); the same value as the model's ``pretrained_path`` gives the model's own
            tokenizer. ``None`` (default) for byte-level tokens (vocabulary 256). Loaded on first use.
        block_size: Tokens per training sequence.
        batch_size: Sequences per batch.
        val_fraction: Fraction of the characters held out for validation, in ``(0, 1)``.
        test_fraction: Fraction held out for testing, in ``[0, 1)``; ``0`` makes the test loader reuse validation.
        glob: File pattern inside folders given in ``paths``.
        num_workers: DataLoader workers of the validation and test loaders (the training stream is produced in the
            main process).
        seed: Seed of the split and of the batch order.

    Attributes:
        vocab_size: Vocabulary size of the tokenizer (256 for bytes); read by ``CausalLMModule``.
        tokenizer: The tokenizer object (loaded, and a GGUF source converted, on first access).

    Raises:
        MisconfigurationException: In ``__init__`` if a path does not exist, both ``paths`` and ``dataset_path``
            are given, a fraction is out of range, ``block_size``/``batch_size`` is not positive, or
            ``tokenizer_path`` cannot be resolved (unknown name, missing path, missing package); in ``setup`` if a
            split is shorter than one block (``block_size`` larger than the corpus) or no text was found.
    """

    def __init__(
        self,
        paths: list[str] | str | None = None,
        dataset_path: str | None = None,
        text_column: str = "text",
        tokenizer_path: str | None = None,
        block_size: int = 128,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        glob: str = "**/*.txt",
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(paths, str):
            paths = [paths]
        if paths is not None and dataset_path is not None:
            raise MisconfigurationException("Give either `paths` or `dataset_path`, not both.")
        for p in paths or []:
            if not os.path.exists(p):
                raise MisconfigurationException(f"TextDataModule: `paths` entry {p!r} does not exist.")
        if dataset_path is not None and not os.path.exists(dataset_path):
            raise MisconfigurationException(f"TextDataModule: `dataset_path` {dataset_path!r} does not exist.")
        if block_size < 2:
            raise MisconfigurationException(f"TextDataModule: `block_size` must be >= 2, got {block_size}.")
        if batch_size < 1:
            raise MisconfigurationException(f"TextDataModule: `batch_size` must be >= 1, got {batch_size}.")
        if not 0.0 < val_fraction < 1.0:
            raise MisconfigurationException(f"TextDataModule: `val_fraction` must be in (0, 1), got {val_fraction}.")
        if not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
            raise MisconfigurationException(
                f"TextDataModule: `test_fraction` must be in [0, 1) with `val_fraction + test_fraction < 1`, got "
                f"{test_fraction}."
            )
        if tokenizer_path is not None:
            from lightning_epfl.models import check_pretrained

            try:
                check_pretrained(tokenizer_path, "tokenizer_path", need="tokenizer")
            except (ValueError, OSError, ImportError) as err:
                raise MisconfigurationException(str(err)) from err
        self.save_hyperparameters()
        self._tokenizer: Any = None
        self.paths = paths
        self.dataset_path = dataset_path
        self.text_column = text_column
        self.tokenizer_path = tokenizer_path
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.glob = glob
        self.num_workers = num_workers
        self.seed = seed
        self.datasets: dict[str, TokenBlocks] = {}
        self._train_position = StreamPosition(0)

    # ------------------------------------------------------------------ documents
    def _files(self) -> list[str]:
        files: list[str] = []
        for p in self.paths or []:
            if os.path.isdir(p):
                files += sorted(
                    f for f in globlib.glob(os.path.join(p, self.glob), recursive=True) if os.path.isfile(f)
                )
            else:
                files.append(p)
        return files

    def load_documents(self) -> list[str]:
        """Return the list of documents of the configured source (before splitting)."""
        if self.dataset_path is not None:
            return self._dataset_documents()
        if self.paths is None:
            return pydoc_documents()
        docs = []
        for f in self._files():
            with open(f, encoding="utf-8", errors="replace") as fh:
                docs.append(fh.read())
        if len(docs) == 1:  # one file: split into paragraphs (and long paragraphs into runs of lines)
            docs = split_single_text(docs[0], min(f for f in (self.val_fraction, self.test_fraction) if f > 0))
        return docs

    def _dataset_documents(self) -> list[str]:
        import datasets

        path = self.dataset_path
        assert path is not None
        if os.path.isdir(path):
            try:
                ds: Any = datasets.load_from_disk(path)
            except FileNotFoundError as err:
                raise MisconfigurationException(
                    f"`dataset_path` folder {path!r} is not a `Dataset.save_to_disk` folder: {err}"
                ) from err
        else:
            ext = os.path.splitext(path)[1].lstrip(".")
            builder = {"txt": "text", "jsonl": "json"}.get(ext, ext)
            if builder not in {"text", "json", "csv", "parquet"}:
                raise MisconfigurationException(
                    f"`dataset_path` must be a `save_to_disk` folder or a .txt/.json/.jsonl/.csv/.parquet file, "
                    f"got {path!r}."
                )
            ds = datasets.load_dataset(builder, data_files=path, split="train")
        if isinstance(ds, datasets.DatasetDict):
            ds = datasets.concatenate_datasets([ds[k] for k in sorted(ds)])
        if self.text_column not in ds.column_names:
            raise MisconfigurationException(
                f"`text_column` {self.text_column!r} is not a column of the dataset; columns: {ds.column_names}."
            )
        return [t for t in ds[self.text_column] if t]

    def split_documents(self, documents: list[str]) -> dict[str, list[str]]:
        """Assign documents to ``train``/``val``/``test`` deterministically (seeded shuffle, character quotas)."""
        order = list(range(len(documents)))
        random.Random(self.seed).shuffle(order)
        total = sum(len(d) for d in documents)
        quotas = [("val", self.val_fraction * total), ("test", self.test_fraction * total)]
        splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        i = 0
        for name, quota in quotas:
            taken = 0
            while i < len(order) and taken < quota and len(order) - i > 1:
                splits[name].append(documents[order[i]])
                taken += len(documents[order[i]])
                i += 1
        splits["train"] = [documents[j] for j in order[i:]]
        return splits

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        documents = self.load_documents()
        if not documents:
            raise MisconfigurationException(f"No text found in `paths`={self.paths} (pattern {self.glob!r}).")
        splits = self.split_documents(documents)
        for name in ("train", "val", "test"):
            if name == "test" and self.test_fraction == 0:
                continue
            tokens = self._encode(splits[name])
            if len(tokens) < self.block_size:
                raise MisconfigurationException(
                    f"`block_size`={self.block_size} is larger than the {name} split ({len(tokens)} tokens); "
                    f"use a smaller `block_size` or more text."
                )
            self.datasets[name] = TokenBlocks(tokens, self.block_size)
        if "test" not in self.datasets:
            self.datasets["test"] = self.datasets["val"]

    @property
    def batches_per_epoch(self) -> int:
        """Training batches per epoch: full batches only when there is more than one batch of blocks."""
        n = len(self.datasets["train"])
        return n // self.batch_size if n > self.batch_size else 1

    def train_batch(self, k: int) -> dict[str, torch.Tensor]:
        """Training batch ``k`` (counted across epochs): ``{"input_ids": [B, block_size]}``, a pure function of
        ``(seed, k)`` (epoch ``k // batches_per_epoch`` in its own seeded order)."""
        train = self.datasets["train"]
        epoch, j = divmod(k, self.batches_per_epoch)
        order = epoch_permutation(len(train), self.seed, epoch)[j * self.batch_size : (j + 1) * self.batch_size]
        return {"input_ids": torch.stack([train[int(i)]["input_ids"] for i in order])}

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(self.train_batch, self.batches_per_epoch, self._train_position, self.seed)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.datasets["val"], self.batch_size, num_workers=self.num_workers, generator=loader_generator(self.seed)
        )

    def test_dataloader(self) -> DataLoader:
        return DataLoader(
            self.datasets["test"], self.batch_size, num_workers=self.num_workers, generator=loader_generator(self.seed)
        )

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
