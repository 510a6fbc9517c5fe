"""LoftQ initialisation (Li et al. 2023): quantize the base and initialise the adapter together.

QLoRA starts from ``Q = quant(W)`` and ``B = 0``, so training begins with the whole quantization error
``W - Q``. LoftQ (Algorithm 1) alternates, for ``T`` iterations,

    Q_t = quant(W - A_{t-1} B_{t-1})            (A_0 B_0 = 0)
    A_t, B_t = rank-r SVD of (W - dequant(Q_t))

so that ``Q + A·B`` starts closer to ``W`` than ``Q`` alone. The 4-bit base then differs from plain quantization
of W: a LoftQ adapter belongs to the base it was computed against, and that base must be saved with it.

In fourbit's LoRA layer the update is ``s · B · A`` (``s = alpha / r``), so the SVD factors are stored with
``B = L / s``: ``Q + s·B·A = Q + L·R`` for any alpha (peft stores ``B = L`` and so adds ``s·L·R``, which equals
the algorithm's product only when ``alpha = r``).
"""

from __future__ import annotations

import torch
from torch import nn

from fourbit._errors import FieldError
from fourbit.nn.linear4bit import Linear4bit, frozen_weight, is_conv1d
from fourbit.nn.lora import LoRASpec, find_target_modules, inject_lora, lora_modules
from fourbit.quant import dequantize_4bit, quantize_4bit

__all__ = ["FULL_SVD_MAX_DIM", "inject_loftq", "loftq_decompose", "low_rank"]

#: Matrices whose smaller side is at most this use the exact SVD; larger ones (an 8B's 4096 x 14336) use a
#: randomized rank-r SVD (Halko et al. 2011, ``torch.svd_lowrank``), minutes instead of hours on a CPU.
FULL_SVD_MAX_DIM = 2048


def low_rank(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``r`` factors ``L [m, r]``, ``R [r, n]`` of ``matrix [m, n]`` (``L·R``, singular values split
    as ``sqrt(S)`` on each side, as LoftQ does), in float32."""
    m = matrix.float()
    if min(m.shape) <= FULL_SVD_MAX_DIM:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(0)  # the same factors every run: the init is part of the run's reproducible state
        u, s, v = torch.svd_lowrank(m, q=min(r + 8, min(m.shape)), niter=4)
        torch.random.set_rng_state(generator_state)
        u, s, vh = u[:, :r], s[:r], v[:, :r].t()
    root = s.sqrt()
    return u * root, root[:, None] * vh


@torch.no_grad()
def loftq_decompose(weight: torch.Tensor, r: int, num_iter: int = 1, *, quant_type: str = "nf4",
                    blocksize: int = 64, double_quant: bool = True):
    """LoftQ, Algorithm 1, on one weight ``[out, in]``.

    Args:
        weight: the full-precision weight (read, not modified).
        r: the adapter's rank.
        num_iter: T, the alternating steps (>= 1; T = 1 is plain quantization plus an SVD of its error).

    Returns:
        ``(packed, state, L [out, r], R [r, in])``: the 4-bit base (``quantize_4bit``'s output) and factors with
        ``dequant(packed) + L·R`` close to ``weight``.

    Raises:
        FieldError: ``num_iter`` < 1 (``loftq_iter``), or a rank above the weight's smaller side (``r``).
    """
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 1:
        raise FieldError("loftq_iter", f"must be an integer >= 1, got {num_iter!r}")
    if r > min(weight.shape):
        raise FieldError("r", f"rank {r} is larger than the weight's smaller side {min(weight.shape)}")
    w = weight.detach().float()
    residual = w
    for step in range(num_iter):
        packed, state = quantize_4bit(residual, quant_type, blocksize, double_quant)
        big_l, big_r = low_rank(w - dequantize_4bit(packed, state, torch.float32), r)
        if step + 1 < num_iter:
            residual = w - big_l @ big_r
    return packed, state, big_l, big_r


def inject_loftq(model: nn.Module, spec: LoRASpec, *, num_iter: int = 1, quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: bool = True,
                 compute_dtype: torch.dtype = torch.float32) -> list[str]:
    """Quantize the layers ``spec`` targets with LoftQ and put LoRA over them, initialised from the factors.

    ``model`` must still hold the float weights of its targets (LoftQ needs W); quantize the rest of the model
    afterwards (:func:`fourbit.models.quantize_model` leaves 4-bit layers alone). Conv1D layers keep their layout.

    Returns:
        The wrapped module names.

    Raises:
        FieldError: a target that is already 4-bit (``init_lora_weights``: LoftQ needs the float weights).
    """
    names = find_target_modules(model, spec.target_modules, spec.modules_to_save)
    factors = {}
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, Linear4bit):
            raise FieldError("init_lora_weights", f"loftq needs the full-precision weights and {name} is already "
                                                  "4-bit: start from the float checkpoint")
        conv = is_conv1d(layer)
        weight = layer.weight.t() if conv else layer.weight
        packed, state, big_l, big_r = loftq_decompose(weight, spec.r, num_iter, quant_type=quant_type,
                                                      blocksize=blocksize, double_quant=double_quant)
        q = Linear4bit(weight.shape[1], weight.shape[0], bias=layer.bias is not None, compute_dtype=compute_dtype,
                       device="meta", layout="conv1d" if conv else "linear")
        q.set_quantized(packed, state)
        if layer.bias is not None:
            q.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        model.set_submodule(name, q)
        factors[name] = (big_l, big_r)
    inject_lora(model, spec)
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            big_l, big_r = factors[name]
            m.lora_A.weight.copy_(big_r)
            m.lora_B.weight.copy_(big_l / m.scaling)
            if m.use_dora:  # the magnitude starts at the row norms of the initial weight Q + s·B·A = Q + L·R
                start = frozen_weight(m.base, torch.float32) + big_l @ big_r
                m.lora_magnitude_vector.copy_(start.norm(dim=1))
    return names
