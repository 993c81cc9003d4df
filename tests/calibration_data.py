"""Synthetic calibration data shared by the quantizer and pruning tests (helpers, not tests)."""

from __future__ import annotations

import torch

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    """A CPU generator seeded ``seed``."""
    return torch.Generator().manual_seed(seed)


def calibration(seed: int, n: int = 256, d_in: int = 32, d_out: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``[n, d_in]`` with strongly correlated features (low rank + noise, uneven scales) and a random weight
    ``[d_out, d_in]``, float64."""
    g = gen(seed)
    latent = torch.randn(n, 6, generator=g, dtype=F64)
    mix = torch.randn(6, d_in, generator=g, dtype=F64)
    x = latent @ mix + 0.3 * torch.randn(n, d_in, generator=g, dtype=F64)
    x = x * torch.linspace(0.5, 2.0, d_in, dtype=F64)
    w = torch.randn(d_out, d_in, generator=g, dtype=F64)
    return x, w
