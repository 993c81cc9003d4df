"""Per-client LoRA adapter files
==============================

Each client of a :class:`~.strategy.CollaborativeStrategy` over a peft-wrapped ``CausalLMModule`` holds one LoRA
adapter. :func:`export_client_adapter` writes client ``i``'s adapter in peft's own format (``adapter_config.json``
+ ``adapter_model.safetensors``, the files ``PeftModel.save_pretrained`` writes and ``PeftModel.from_pretrained``
reads), built under a temporary name and renamed into place; :func:`load_client_adapters` puts such files back
into the clients' stacked rows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_epfl.utilities import atomic_directory

__all__ = ["export_client_adapter", "load_client_adapters"]

_ADAPTER = "default"


def _peft_model(strategy: Any) -> Any:
    model = getattr(strategy.lightning_module, "model", None)
    if model is None or not hasattr(model, "peft_config"):
        raise MisconfigurationException(
            "adapter files need a module whose `model` is a peft model (CausalLMModule(lora={...}))."
        )
    return model


def _peft_key(name: str) -> str:
    """Stacked parameter name (``model.base_model...lora_A.default.weight``) to peft's file key (adapter name
    dropped, the module's ``model.`` prefix removed)."""
    key = name[len("model.") :] if name.startswith("model.") else name
    return key.replace(f".{_ADAPTER}.", ".")


def export_client_adapter(strategy: Any, client_id: int, directory: str | os.PathLike) -> str | None:
    """Write client ``client_id``'s LoRA adapter to ``directory`` in peft's format.

    Collective in multi-process runs (every process must call it); global rank 0 writes. The folder is built under a
    temporary name and renamed, so an earlier export is replaced whole or not at all. Load it with
    ``PeftModel.from_pretrained(base_model, directory)``.

    Args:
        strategy: A set-up ``CollaborativeStrategy`` (after or during ``fit``).
        client_id: Client index in ``[0, n_clients)``.
        directory: Output folder.

    Returns:
        The absolute folder path on global rank 0, ``None`` on the other processes.

    Raises:
        MisconfigurationException: If the module is not a peft model or ``client_id`` is out of range.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    model = _peft_model(strategy)
    if not 0 <= client_id < strategy.n_clients:
        raise MisconfigurationException(f"`client_id` must be in [0, {strategy.n_clients}), got {client_id}.")
    state = strategy.client_state_dict(client_id)
    stripped = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    tensors = get_peft_model_state_dict(model, state_dict=stripped, adapter_name=_ADAPTER)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    if set(tensors) != {_peft_key(k) for k in state}:
        raise RuntimeError("peft's adapter keys do not match the stacked LoRA tensors; check the peft version.")
    if getattr(strategy, "global_rank", 0) != 0:
        return None

    def write(tmp: str) -> None:
        model.peft_config[_ADAPTER].save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})

    return atomic_directory(directory, write)


def load_client_adapters(strategy: Any, directories: Sequence[str | os.PathLike]) -> None:
    """Set every client's stacked LoRA tensors from adapter folders (one per client, in client order).

    Args:
        strategy: A set-up ``CollaborativeStrategy`` whose module wraps its model with LoRA.
        directories: ``n_clients`` folders written by :func:`export_client_adapter` or ``PeftModel.save_pretrained``.

    Raises:
        MisconfigurationException: If the count differs from ``n_clients``, a folder lacks the adapter files, an
            adapter's rank differs from the module's, or its tensors miss or add keys or differ in shape.
    """
    from safetensors.torch import load_file

    model = _peft_model(strategy)
    if len(directories) != strategy.n_clients:
        raise MisconfigurationException(
            f"`directories` must hold one adapter folder per client ({strategy.n_clients}), got {len(directories)}."
        )
    rank = model.peft_config[_ADAPTER].r
    stack = strategy.stack
    expected = {_peft_key(s.name): s for s in stack.layout}
    local = {c: p for p, c in enumerate(strategy.local_client_ids)}
    for i, folder in enumerate(directories):
        config_path = os.path.join(folder, "adapter_config.json")
        weights = os.path.join(folder, "adapter_model.safetensors")
        if not (os.path.isfile(config_path) and os.path.isfile(weights)):
            raise MisconfigurationException(
                f"`directories[{i}]` ({folder!r}) has no adapter_config.json + adapter_model.safetensors."
            )
        with open(config_path, encoding="utf-8") as fh:
            r = json.load(fh).get("r")
        if r != rank:
            raise MisconfigurationException(
                f"client {i}'s adapter ({folder!r}) has LoRA rank {r}, the module's adapters have rank {rank}; every "
                "client must use the same rank."
            )
        tensors = load_file(weights)
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise MisconfigurationException(
                f"client {i}'s adapter ({folder!r}) does not match the model: {len(missing)} missing keys "
                f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}."
            )
        if i not in local:
            continue
        with torch.no_grad():
            for key, slot in expected.items():
                t = tensors[key]
                if tuple(t.shape) != slot.shape:
                    raise MisconfigurationException(
                        f"client {i}'s adapter tensor {key} has shape {tuple(t.shape)}, the model's {slot.shape}."
                    )
                stack.X[local[i], slot.offset : slot.offset + slot.numel] = t.reshape(-1).to(stack.X)
