"""Fast paths for the quantization kernels behind one dispatch point (``fourbit.kernels.dispatch``)."""

from fourbit.kernels import dispatch, reference

__all__ = ["dispatch", "reference"]
