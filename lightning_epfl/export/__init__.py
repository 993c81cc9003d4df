"""Export-time model compression: QuaRot rotations with 4-bit weights, activations and KV cache
(:mod:`lightning_epfl.export.quarot`), and the Lightning callback that runs it (:class:`QuaRotExport`)."""

from lightning_epfl.export.callback import QuaRotExport, find_causal_lm
from lightning_epfl.export.quarot import (
    SUPPORTED_MODEL_TYPES,
    QuaRotConfig,
    QuaRotReport,
    fuse_norms,
    install_quantizers,
    load_quantized,
    make_rotation,
    perplexity,
    quarot_quantize_,
    remove_quantizers,
    rotate_model,
    save_quantized,
    set_quantization_enabled,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "QuaRotConfig",
    "QuaRotExport",
    "QuaRotReport",
    "find_causal_lm",
    "fuse_norms",
    "install_quantizers",
    "load_quantized",
    "make_rotation",
    "perplexity",
    "quarot_quantize_",
    "remove_quantizers",
    "rotate_model",
    "save_quantized",
    "set_quantization_enabled",
]
