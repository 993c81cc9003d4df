"""Export-time model compression: QuaRot rotations with 4-bit weights, activations and KV cache
(:mod:`lightning_epfl.export.quarot`), pruning combined with block-format quantization
(:mod:`lightning_epfl.export.sparse_quant`), and the Lightning callbacks that run them (:class:`QuaRotExport`,
:class:`SparseQuantExport`)."""

from lightning_epfl.export.callback import CompressionExport, QuaRotExport, SparseQuantExport, find_causal_lm
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
from lightning_epfl.export.sparse_quant import (
    SparseQuantConfig,
    SparseQuantReport,
    load_sparse_quantized,
    save_sparse_quantized,
    sparse_quantize_,
    target_linears,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CompressionExport",
    "QuaRotConfig",
    "QuaRotExport",
    "QuaRotReport",
    "SparseQuantConfig",
    "SparseQuantExport",
    "SparseQuantReport",
    "find_causal_lm",
    "fuse_norms",
    "install_quantizers",
    "load_quantized",
    "load_sparse_quantized",
    "make_rotation",
    "perplexity",
    "quarot_quantize_",
    "remove_quantizers",
    "rotate_model",
    "save_quantized",
    "save_sparse_quantized",
    "set_quantization_enabled",
    "sparse_quantize_",
    "target_linears",
]
