"""Where torchao computes the same thing on CPU, our formats and masks give identical results (skipped without
torchao; checked with torchao 0.18.0: ``pip install --no-deps torchao``)."""

import pytest
import torch

from lightning_epfl.functional.formats import block_quantize
from lightning_epfl.functional.sparsity import magnitude_mask

torchao = pytest.importorskip("torchao", reason="optional cross-check: pip install --no-deps torchao")


@pytest.mark.parametrize("element_format", ["e4m3", "e5m2", "e3m2", "e2m3", "e2m1"])
def test_mxfp_equals_torchao_mxtensor(element_format):
    from torchao.prototype.mx_formats import constants
    from torchao.prototype.mx_formats.mx_tensor import MXTensor

    dtypes = {
        "e4m3": torch.float8_e4m3fn,
        "e5m2": torch.float8_e5m2,
        "e3m2": constants.DTYPE_FP6_E3M2,
        "e2m3": constants.DTYPE_FP6_E2M3,
        "e2m1": torch.float4_e2m1fn_x2,
    }
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(0)) * 3
    x[0, :32] *= 1e-3  # a block of small values (subnormal elements)
    ref = MXTensor.to_mx(x, dtypes[element_format], 32).dequantize(torch.float32)
    torch.testing.assert_close(block_quantize(x, "mxfp", element_format=element_format), ref, atol=0, rtol=0)


def test_two_four_magnitude_mask_equals_torchao():
    from torchao.sparsity.utils import mask_creator

    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(magnitude_mask(w, pattern="n:m", n=2, m=4), mask_creator(w, 2, 4).bool())
