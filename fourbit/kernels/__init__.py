"""Fast paths for the eleven heavy kernels (4-bit and 8-bit block quantization, the 4-bit matmul, and the softmax
cross-entropy, SwiGLU, RMSNorm and dropout training rows) behind one dispatch point (``fourbit.kernels.dispatch``):
the PyTorch reference, the compiled CPU kernels (``cpu``, ``csrc/``) and the Triton GPU kernels.

``scales.BlockScales`` describes a tensor's block scales to every backend; ``scales.SMALL_BATCH_ROWS`` is the
one row count up to which the fused 4-bit matmul runs; ``cpu_features.native_bf16`` says whether a device
computes bf16 natively.
"""

from fourbit.kernels import cpu_features, dispatch, reference, scales
from fourbit.kernels.scales import SMALL_BATCH_ROWS, BlockScales

__all__ = ["SMALL_BATCH_ROWS", "BlockScales", "cpu_features", "dispatch", "reference", "scales"]
