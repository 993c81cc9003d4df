"""Text domains found on the machine
===================================

Heterogeneous real text with no download, for client-partitioned language-model experiments (e.g. trust-weighted
collaborative LoRA, arXiv:2404.09753, whose clients each hold text of one language or kind):

- ``"prose"``: English documentation, Python's own ``pydoc_data`` topics;
- ``"code"``: Python source, the standard library's top-level ``*.py`` files;
- ``"german"``: German, the translated messages of the machine's gettext catalogs
  (``/usr/share/locale/de/LC_MESSAGES/*.mo``, read with :mod:`gettext`); absent on minimal systems;
- ``"french"``: French, the same from ``/usr/share/locale/fr/LC_MESSAGES/*.mo``;
- any local text file or folder (read as :class:`~lightning_epfl.datamodules.text.TextDataModule` reads ``paths``).
"""

from __future__ import annotations

import glob
import os
import random
import sysconfig

from lightning.pytorch.utilities.exceptions import MisconfigurationException

__all__ = ["BUILTIN_DOMAINS", "FRENCH_CATALOGS", "GERMAN_CATALOGS", "domain_available", "domain_documents"]

BUILTIN_DOMAINS = ("prose", "code", "german", "french")
"""Names of the built-in domains."""

GERMAN_CATALOGS = "/usr/share/locale/de/LC_MESSAGES"
"""Folder of the German gettext catalogs read by the ``"german"`` domain."""

FRENCH_CATALOGS = "/usr/share/locale/fr/LC_MESSAGES"
"""Folder of the French gettext catalogs read by the ``"french"`` domain."""


def _catalogs(name: str) -> str:
    return GERMAN_CATALOGS if name == "german" else FRENCH_CATALOGS


def _gettext_documents(folder: str) -> list[str]:
    import gettext

    docs = []
    for path in sorted(glob.glob(os.path.join(folder, "*.mo"))):
        try:
            with open(path, "rb") as fh:
                catalog = gettext.GNUTranslations(fh)
        except (OSError, UnicodeDecodeError):
            continue  # a corrupt or non-UTF-8 catalog: skip it
        # `_catalog` is the only way the module exposes all messages; the "" entry is the catalog's header
        texts = [v for k, v in catalog._catalog.items() if k != "" and isinstance(v, str) and v.strip()]
        if texts:
            docs.append("\n".join(sorted(set(texts))))
    return docs


def _stdlib_documents() -> list[str]:
    docs = []
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as fh:
            docs.append(fh.read())
    return docs


def _path_documents(path: str) -> list[str]:
    from lightning_epfl.datamodules.text import TextDataModule

    return TextDataModule(paths=[path]).load_documents()


def _pieces(doc: str, size: int) -> list[str]:
    """Cut a document into runs of whole lines of about ``size`` characters (long files become several
    documents, so that train/validation splits and client shares stay balanced)."""
    out, cur, n = [], [], 0
    for line in doc.splitlines(keepends=True):
        cur.append(line)
        n += len(line)
        if n >= size:
            out.append("".join(cur))
            cur, n = [], 0
    if cur:
        out.append("".join(cur))
    return out


def domain_available(name: str) -> bool:
    """Whether a domain can be read here (``"german"`` / ``"french"`` need the catalogs; a path must exist)."""
    if name in ("german", "french"):
        return bool(glob.glob(os.path.join(_catalogs(name), "*.mo")))
    return name in BUILTIN_DOMAINS or os.path.exists(name)


def domain_documents(name: str, max_chars: int | None = None, seed: int = 0, piece_chars: int = 4000) -> list[str]:
    """The documents of one domain, at most ``max_chars`` characters in all.

    Args:
        name: ``"prose"``, ``"code"``, ``"german"``, ``"french"`` or a local file/folder.
        max_chars: Cap on the total characters (``None``: everything). Documents are taken in a seeded random order
            until the cap; the last one is cut. Deterministic for a given ``(name, max_chars, seed)``.
        seed: Seed of the order.
        piece_chars: Documents longer than this are cut into runs of whole lines of about this many characters.

    Returns:
        A non-empty list of documents.

    Raises:
        MisconfigurationException: If ``name`` is neither a built-in domain nor an existing path, or the domain
            has no text here.
    """
    if name == "prose":
        from lightning_epfl.datamodules.text import pydoc_documents

        docs = pydoc_documents()
    elif name == "code":
        docs = _stdlib_documents()
    elif name in ("german", "french"):
        docs = _gettext_documents(_catalogs(name))
    elif os.path.exists(name):
        docs = _path_documents(name)
    else:
        raise MisconfigurationException(
            f"domain {name!r} is neither one of {list(BUILTIN_DOMAINS)} nor an existing file or folder."
        )
    docs = [p for d in docs for p in _pieces(d, piece_chars) if p.strip()]
    if not docs:
        where = f" (no readable catalog in {_catalogs(name)})" if name in ("german", "french") else ""
        raise MisconfigurationException(f"domain {name!r} has no text{where}.")
    if max_chars is None:
        return docs
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    out, total = [], 0
    for j in order:
        if total >= max_chars:
            break
        doc = docs[j][: max_chars - total]
        out.append(doc)
        total += len(doc)
    return out
