r"""
Block (shared-scale) number formats: INT, HBFP and OCP microscaling (MXINT / MXFP)
================================================================================

Fake quantizers for the block formats compared by Harma et al., "Effective Interplay between Sparsity and
Quantization: From Theory to Practice" (arXiv:2405.20935). Every format splits the tensor into blocks of
``block_size`` *contiguous* elements along one axis ``dim`` and gives each block one shared scale.

Conventions
-----------
* **Fake quantization.** :func:`block_quantize` returns ``dequantize(quantize(x))`` with ``x``'s shape and dtype;
  no integer codes are returned. Computation runs in float64 for float64 inputs, else in float32.
* **Layouts.** Weights are ``[out, in]`` (``torch.nn.Linear``, ``y = x Wᵀ`` with row vectors ``x``); the default
  ``dim=-1`` therefore blocks along the input features, the reduction axis of the matrix product.
* **Blocks.** ``block_size`` must divide ``x.shape[dim]``; block ``k`` is ``x[..., k·B:(k+1)·B, ...]`` along ``dim``.
* **Zero blocks.** A block whose ``amax = max|x|`` is 0 uses a scale of 1 and dequantizes to exactly 0 (no NaN).
* **Powers of two** are applied with :func:`torch.ldexp`, so scaling by a shared exponent is exact (barring
  under/overflow of the compute dtype).
* **Rounding.** ``"nearest"`` is ``torch.round`` (round half to even) on the element grid;
  ``"stochastic"`` is ``floor(t + u)`` with ``u ~ U[0, 1)`` drawn from ``generator``, so ``E[floor(t + u)] = t``
  (unbiased) everywhere except where saturation clamps the value.

Formats
-------
``"int"`` (``bits = b``, ``b ∈ [2, 16]``): symmetric absmax per block, as
:func:`lightning_epfl.functional.quantize.quantize_symmetric` with ``group_size = block_size``:

.. math::

    q_{max} = 2^{b-1} - 1, \quad s = \frac{\max|x|}{q_{max}}, \quad \hat x = \mathrm{clamp}(R(x / s), -q_{max}-1,
    q_{max}) \cdot s.

``"hbfp"`` (hybrid block floating point, ``bits = m`` mantissa bits, ``m ∈ [1, 16]``; HBFP8: ``m = 7``, HBFP6:
``m = 5``): shared exponent ``e = ⌈log₂ max|x|⌉``, step ``δ = 2^{e-m}``,

.. math::

    \hat x = \mathrm{clamp}(R(x / δ), -(2^m - 1), 2^m - 1) \cdot δ \in [-(2^e - δ), 2^e - δ].

``"mxint"`` (OCP Microscaling Formats (MX) Specification v1.0, §5 "MXINT8"): shared E8M0 scale
``X = 2^{⌊log₂ amax⌋ - e_{max}}`` with element ``e_max = 0``; each element is a ``b``-bit two's complement integer
``k`` with an implicit scale ``2^{-(b-2)}`` (``b = 8``: ``k·2^{-6}``, i.e. values in ``[-2, 2)``), and
``k`` is clamped to the *symmetric* range ``[-(2^{b-1}-1), 2^{b-1}-1]`` (``±127`` for MXINT8; the code ``-128``
is never produced). ``bits=8`` is the OCP MXINT8 format; other widths are the same construction, not OCP formats.

``"mxfp"`` (OCP MX v1.0, §5 "MXFP8 / MXFP6 / MXFP4"): shared E8M0 scale ``X = 2^{⌊log₂ amax⌋ - e_{max}}`` with
the element format's largest normal exponent ``e_max``; elements ``x / X`` are rounded to the element format
(normals and subnormals, no infinities/NaN) and saturate to ``±max normal``; the result is ``element · X``.
``bits`` is ignored; ``element_format`` is one of

=========  ====================  =====  ==========
format     (exp, mantissa) bits  e_max  max normal
=========  ====================  =====  ==========
``e4m3``   (4, 3) FP8            8      448
``e5m2``   (5, 2) FP8            15     57344
``e3m2``   (3, 2) FP6            4      28
``e2m3``   (2, 3) FP6            2      7.5
``e2m1``   (2, 1) FP4            2      6
=========  ====================  =====  ==========

With the minimum normal exponent ``e_min = 2 - 2^{E-1}`` (``E`` exponent bits), an element ``v`` is rounded on the
grid of spacing ``2^{max(⌊log₂|v|⌋, e_min) - M}`` (``M`` mantissa bits). The shared-scale exponent is clamped to
the E8M0 range ``[-127, 127]``. Note that ``amax / X ∈ [2^{e_max}, 2^{e_max+1})`` may exceed the max normal (e.g.
``e2m1``: up to 8 > 6), in which case the largest elements saturate — that is the OCP rule, not a bug.
"""

from __future__ import annotations

import numbers
from typing import Literal

import torch
from torch import Tensor

from lightning_epfl.functional.quantize import quantize_symmetric

__all__ = ["ELEMENT_FORMATS", "FORMATS", "block_quantize"]

FORMATS = ("int", "hbfp", "mxint", "mxfp")
ROUNDINGS = ("nearest", "stochastic")

#: OCP MX element formats: name -> (exponent bits, mantissa bits, emax, max normal).
ELEMENT_FORMATS: dict[str, tuple[int, int, int, float]] = {
    "e4m3": (4, 3, 8, 448.0),
    "e5m2": (5, 2, 15, 57344.0),
    "e3m2": (3, 2, 4, 28.0),
    "e2m3": (2, 3, 2, 7.5),
    "e2m1": (2, 1, 2, 6.0),
}

_BITS_RANGE = {"int": (2, 16), "hbfp": (1, 16), "mxint": (2, 16)}
_E8M0_MIN, _E8M0_MAX = -127, 127


def _check_bits(bits: int, fmt: str) -> int:
    lo, hi = _BITS_RANGE[fmt]
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not lo <= int(bits) <= hi:
        raise ValueError(f"`bits` for fmt={fmt!r} must be an int in [{lo}, {hi}], got {bits!r}.")
    return int(bits)


def _round(t: Tensor, rounding: str, generator: torch.Generator | None) -> Tensor:
    """Rounds to integers: half-to-even (``"nearest"``) or ``floor(t + u)``, ``u ~ U[0, 1)`` (``"stochastic"``)."""
    if rounding == "nearest":
        return torch.round(t)
    device = generator.device if generator is not None else t.device
    u = torch.rand(t.shape, generator=generator, device=device, dtype=t.dtype).to(t.device)
    return torch.floor(t + u)


def _floor_log2(a: Tensor) -> Tensor:
    """Exact ``⌊log₂ a⌋`` for ``a > 0`` (int32); entries with ``a == 0`` give an unspecified value."""
    _, exp = torch.frexp(a)  # a = mant · 2^exp, mant ∈ [0.5, 1)
    return exp - 1


def _ceil_log2(a: Tensor) -> Tensor:
    """Exact ``⌈log₂ a⌉`` for ``a > 0`` (int32)."""
    mant, exp = torch.frexp(a)
    return torch.where(mant == 0.5, exp - 1, exp)


def _int_stochastic(xb: Tensor, bits: int, generator: torch.Generator | None) -> Tensor:
    qmax = 2 ** (bits - 1) - 1
    amax = xb.abs().amax(-1, keepdim=True)
    scale = amax / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(_round(xb / safe, "stochastic", generator), -qmax - 1, qmax)
    return q * scale


def _hbfp(xb: Tensor, m: int, rounding: str, generator: torch.Generator | None) -> Tensor:
    amax = xb.abs().amax(-1, keepdim=True)
    nonzero = amax > 0
    e = torch.where(nonzero, _ceil_log2(torch.where(nonzero, amax, torch.ones_like(amax))), 0)
    shift = (e - m).to(torch.int32)  # step = 2^(e - m)
    kmax = 2**m - 1
    k = torch.clamp(_round(torch.ldexp(xb, -shift), rounding, generator), -kmax, kmax)
    return torch.ldexp(k, shift)


def _shared_exponent(xb: Tensor, emax: int) -> Tensor:
    """E8M0 shared exponent ``⌊log₂ amax⌋ - emax`` per block (``[..., 1]``, int32); 0 (scale 1) for zero blocks."""
    amax = xb.abs().amax(-1, keepdim=True)
    nonzero = amax > 0
    e = _floor_log2(torch.where(nonzero, amax, torch.ones_like(amax))) - emax
    return torch.where(nonzero, e, torch.zeros_like(e)).clamp(_E8M0_MIN, _E8M0_MAX).to(torch.int32)


def _mxint(xb: Tensor, bits: int, rounding: str, generator: torch.Generator | None) -> Tensor:
    shared = _shared_exponent(xb, 0)
    frac = bits - 2  # implicit element scale 2^-(bits-2)
    kmax = 2 ** (bits - 1) - 1
    k = torch.clamp(_round(torch.ldexp(xb, -shared + frac), rounding, generator), -kmax, kmax)
    return torch.ldexp(k, shared - frac)


def _fp_element(
    v: Tensor, ebits: int, mbits: int, max_normal: float, rounding: str, gen: torch.Generator | None
) -> Tensor:
    """Rounds ``v`` to a minifloat with ``ebits``/``mbits`` (subnormals included), saturating at ``±max_normal``."""
    emin = 2 - 2 ** (ebits - 1)
    mag = v.abs()
    e = torch.where(mag > 0, _floor_log2(torch.where(mag > 0, mag, torch.ones_like(mag))), emin).clamp(min=emin)
    shift = (e - mbits).to(torch.int32)  # spacing 2^(e - mbits)
    q = torch.ldexp(_round(torch.ldexp(v, -shift), rounding, gen), shift)
    return q.clamp(-max_normal, max_normal)


def _mxfp(xb: Tensor, element_format: str, rounding: str, generator: torch.Generator | None) -> Tensor:
    ebits, mbits, emax, max_normal = ELEMENT_FORMATS[element_format]
    shared = _shared_exponent(xb, emax)
    elem = _fp_element(torch.ldexp(xb, -shared), ebits, mbits, max_normal, rounding, generator)
    return torch.ldexp(elem, shared)


def block_quantize(
    x: Tensor,
    fmt: Literal["int", "hbfp", "mxint", "mxfp"],
    *,
    bits: int = 4,
    element_format: str | None = None,
    block_size: int = 32,
    dim: int = -1,
    rounding: Literal["nearest", "stochastic"] = "nearest",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Block (shared-scale) fake quantization in INT, HBFP, MXINT or MXFP format (see the module docstring).

    Each block of ``block_size`` contiguous elements along ``dim`` gets one shared scale:

    * ``"int"``: ``s = max|x| / (2^{b-1} - 1)``, ``x̂ = clamp(R(x/s), -2^{b-1}, 2^{b-1}-1)·s``;
    * ``"hbfp"``: ``e = ⌈log₂ max|x|⌉``, ``δ = 2^{e-m}`` (``m = bits``), ``x̂ = clamp(R(x/δ)·δ, ±(2^e - δ))``;
    * ``"mxint"``: ``X = 2^{⌊log₂ amax⌋}``, ``x̂ = clamp(R(x/X · 2^{b-2}), ±(2^{b-1}-1)) · 2^{-(b-2)} · X``
      (``b = bits``; ``bits=8`` is OCP MXINT8);
    * ``"mxfp"``: ``X = 2^{⌊log₂ amax⌋ - e_max}``, ``x̂ = FP_elem(x / X) · X`` with saturation at the max normal.

    Args:
        x: Floating tensor with at least one dimension, e.g. a weight ``[out, in]``.
        fmt: ``"int"``, ``"hbfp"``, ``"mxint"`` or ``"mxfp"``.
        bits: Total bits (``"int"``, ``[2, 16]``), mantissa bits ``m`` (``"hbfp"``, ``[1, 16]``) or element bits
            (``"mxint"``, ``[2, 16]``). Ignored for ``"mxfp"``. Default ``4``.
        element_format: Element format for ``"mxfp"``: one of ``"e4m3"``, ``"e5m2"``, ``"e3m2"``, ``"e2m3"``,
            ``"e2m1"``. Ignored by the other formats. Default ``None``.
        block_size: Number ``B`` of contiguous elements per block along ``dim``; must divide ``x.shape[dim]``.
            Default ``32`` (the OCP MX block size).
        dim: Axis along which blocks are formed. Default ``-1``.
        rounding: ``"nearest"`` (half to even, default) or ``"stochastic"`` (``floor(t + u)``, unbiased); both are
            supported by all four formats.
        generator: Random generator for stochastic rounding (seed it for reproducibility). Default ``None``
            (global RNG).

    Returns:
        Dequantized tensor of ``x``'s shape and dtype. All-zero blocks stay exactly zero.

    Raises:
        ValueError: If ``x`` is not a floating tensor with ``ndim >= 1``; ``fmt`` or ``rounding`` is unknown (the
            message lists the allowed values); ``bits`` is out of range for the format; ``element_format`` is
            missing or unknown for ``"mxfp"``; ``dim`` is out of range; ``block_size`` is not a positive int
            dividing ``x.shape[dim]``.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim == 0:
        raise ValueError("`x` must be a floating-point torch.Tensor with at least one dimension.")
    if fmt not in FORMATS:
        raise ValueError(f"`fmt` must be one of {FORMATS}, got {fmt!r}.")
    if rounding not in ROUNDINGS:
        raise ValueError(f"`rounding` must be one of {ROUNDINGS}, got {rounding!r}.")
    if fmt == "mxfp":
        if element_format not in ELEMENT_FORMATS:
            raise ValueError(
                f"`element_format` is required for fmt='mxfp' and must be one of {tuple(ELEMENT_FORMATS)}, "
                f"got {element_format!r}."
            )
    else:
        bits = _check_bits(bits, fmt)
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or not -x.ndim <= int(dim) < x.ndim:
        raise ValueError(f"`dim` must be an int in [{-x.ndim}, {x.ndim - 1}], got {dim!r}.")
    d = int(dim) % x.ndim
    size = x.shape[d]
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) or int(block_size) < 1:
        raise ValueError(f"`block_size` must be a positive int, got {block_size!r}.")
    if size % int(block_size) != 0:
        raise ValueError(f"`block_size` ({block_size}) must divide the size of dimension {dim} ({size}).")
    block_size = int(block_size)
    if x.numel() == 0:
        return x.clone()

    if fmt == "int" and rounding == "nearest":
        return quantize_symmetric(x, bits, dim=d, group_size=block_size)

    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xt = x.detach().to(dtype).movedim(d, -1)
    moved_shape = xt.shape
    xb = xt.unflatten(-1, (size // block_size, block_size))
    if fmt == "int":
        out = _int_stochastic(xb, bits, generator)
    elif fmt == "hbfp":
        out = _hbfp(xb, bits, rounding, generator)
    elif fmt == "mxint":
        out = _mxint(xb, bits, rounding, generator)
    else:
        out = _mxfp(xb, element_format, rounding, generator)
    return out.reshape(moved_shape).movedim(-1, d).to(x.dtype)
