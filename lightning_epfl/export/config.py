"""Shared behaviour of the export configs (peft-style dataclasses): JSON round trip with unknown keys refused."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T", bound="ExportConfig")


class ExportConfig:
    """Mixin of the export config dataclasses: :meth:`skips`, :meth:`to_dict` and :meth:`from_dict`."""

    skip_modules: list[str]

    def skips(self, name: str) -> bool:
        """Whether the module called ``name`` is excluded: a ``skip_modules`` entry equals its qualified name or a
        whole trailing part of it (``"lm_head"`` matches ``"x.lm_head"``, not ``"my_lm_head"``)."""
        return any(name == s or name.endswith("." + s) for s in self.skip_modules)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serializable dict."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: On unknown keys (named in the message, with the known ones) or invalid values.
        """
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(known)}.")
        return cls(**data)
