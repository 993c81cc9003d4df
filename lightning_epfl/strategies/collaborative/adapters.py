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
        directories: ``n_clients`` folders written by :func:`export_client_adapter` or ``PeftModel.save_pretrained``
            (safetensors or ``.bin`` weights, read by peft's ``load_peft_weights``).

    Raises:
        MisconfigurationException: If the count differs from ``n_clients``, a folder lacks the adapter files, an
            adapter's rank, ``lora_alpha``, ``use_rslora``, ``use_dora`` or ``fan_in_fan_out`` differs from the
            module's, or its tensors miss or add keys or differ in shape. Every folder is checked before any row is
            written.
    """
    from peft.utils import load_peft_weights

    model = _peft_model(strategy)
    if len(directories) != strategy.n_clients:
        raise MisconfigurationException(
            f"`directories` must hold one adapter folder per client ({strategy.n_clients}), got {len(directories)}."
        )
    own = model.peft_config[_ADAPTER]
    stack = strategy.stack
    expected = {_peft_key(s.name): s for s in stack.layout}
    local = {c: p for p, c in enumerate(strategy.local_client_ids)}
    rows: dict[int, dict[str, torch.Tensor]] = {}
    for i, folder in enumerate(directories):  # check every folder before writing any row
        config_path = os.path.join(folder, "adapter_config.json")
        if not os.path.isfile(config_path):
            raise MisconfigurationException(f"`directories[{i}]` ({folder!r}) has no adapter_config.json.")
        with open(config_path, encoding="utf-8") as fh:
            config = json.load(fh)
        if config.get("r") != own.r:
            raise MisconfigurationException(
                f"client {i}'s adapter ({folder!r}) has LoRA rank {config.get('r')}, the module's adapters have rank "
                f"{own.r}; every client must use the same rank."
            )
        for key in ("lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out"):
            if key in config and config[key] != getattr(own, key, None):
                raise MisconfigurationException(
                    f"client {i}'s adapter ({folder!r}) has `{key}`={config[key]!r}, the module's adapters "
                    f"{getattr(own, key, None)!r}: the adapter would be scaled or applied differently."
                )
        try:
            tensors = load_peft_weights(str(folder), device="cpu")
        except (OSError, ValueError) as err:
            raise MisconfigurationException(f"client {i}'s adapter ({folder!r}) cannot be read: {err}") from err
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise MisconfigurationException(
                f"client {i}'s adapter ({folder!r}) does not match the model: {len(missing)} missing keys "
                f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}."
            )
        for key, slot in expected.items():
            if tuple(tensors[key].shape) != slot.shape:
                raise MisconfigurationException(
                    f"client {i}'s adapter tensor {key} has shape {tuple(tensors[key].shape)}, the model's "
                    f"{slot.shape}."
                )
        if i in local:
            rows[i] = tensors
    with torch.no_grad():
        for i, tensors in rows.items():
            for key, slot in expected.items():
                stack.X[local[i], slot.offset : slot.offset + slot.numel] = tensors[key].reshape(-1).to(stack.X)
