"""Pure AdamW update functions (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization", Alg. 2).

For step t with gradient g (Kingma & Ba 2015, Alg. 1, with decoupled weight decay lambda):

    p   <- p * (1 - lr * lambda)                          (decoupled weight decay)
    m   <- beta1 * m + (1 - beta1) * g                    (first moment)
    v   <- beta2 * v + (1 - beta2) * g^2                  (second moment)
    p   <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

:func:`adamw_step_32bit` runs exactly the operations of ``torch.optim.AdamW``'s single-tensor path, in the
same order, so a float32 parameter gets bit-identical results. :func:`adamw_step_8bit` keeps m and v as
blockwise 8-bit codes (Dettmers et al. 2022, section 2) and runs the update in four named steps:
:func:`_dequantize_moments` (codes x block absmax -> float32 m, v), :func:`_update_moments`,
:func:`_update_parameter` (decay, then the bias-corrected step) and :func:`_requantize_moments` (fresh block
maxima, nearest codes). Its float32 arithmetic is fixed to plain IEEE
operations, each rounded on its own (no fused multiply-add; sqrt correctly rounded), in the order written
above, so that its two backends agree bit for bit: the fused numba kernel (:mod:`fourbit.optim._numba_8bit`,
used when numba is installed and the tensors are float32 on the CPU) and chunked torch operations (any
device and dtype; chunks of whole blocks keep temporaries in cache, and results do not depend on the chunk
size). bitsandbytes computes the same formula with fused operations, so it differs in the last bits.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fourbit._errors import FieldError
from fourbit.optim._numba_8bit import adamw_8bit_numba, numba_available
from fourbit.optim.quant8 import StateCodebook, nearest_code

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "adamw_step_32bit",
    "adamw_step_8bit",
    "adamw_step_8bit_packed",
    "uses_fused_kernel",
]

#: Elements per chunk of the 8-bit update (a multiple of every power-of-two block size up to 2^18).
DEFAULT_CHUNK_ELEMENTS = 1 << 18

_BACKENDS = ("auto", "torch", "numba")


@torch.no_grad()
def adamw_step_32bit(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step with float32 moments, in place (same operations as ``torch.optim.AdamW``).

    Args:
        param: the parameter, any float dtype; updated in place (computed in float32 if not float32).
        grad: its gradient, same shape.
        exp_avg, exp_avg_sq: float32 moments of the parameter's shape, updated in place.
        step: the step number t >= 1 (after incrementing).
        lr, beta1, beta2, eps, weight_decay: hyperparameters.
    """
    p = param if param.dtype == torch.float32 else param.float()
    g = grad if grad.dtype == torch.float32 else grad.float()
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-step_size)
    if p is not param:
        param.copy_(p)


class _StepConstants(NamedTuple):
    """The scalars of one 8-bit AdamW step, computed once in float64 and shared by both backends.

    Attributes:
        beta1, beta2: the moment decay rates.
        correction2: ``sqrt(1 - beta2^t)`` (the second moment's bias correction, under the square root).
        eps: added to the denominator.
        decay: ``1 - lr * weight_decay`` (decoupled weight decay as one factor).
        step_size: ``-lr / (1 - beta1^t)`` (the first moment's bias correction folded into the step).
        decayed: whether weight decay is on (``decay`` is applied only then).
    """

    beta1: float
    beta2: float
    correction2: float
    eps: float
    decay: float
    step_size: float
    decayed: bool


def _step_constants(
    step: float, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float
) -> _StepConstants:
    return _StepConstants(
        beta1=beta1,
        beta2=beta2,
        correction2=math.sqrt(1.0 - beta2**step),
        eps=eps,
        decay=1.0 - lr * weight_decay,
        step_size=-lr / (1.0 - beta1**step),
        decayed=weight_decay > 0.0,
    )


class _Workspace:
    """Scratch buffers for one chunk, reused across chunks so the loop allocates nothing and stays in cache."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.m = torch.empty(size, dtype=torch.float32, device=device)
        self.v = torch.empty(size, dtype=torch.float32, device=device)
        self.f = torch.empty(size, dtype=torch.float32, device=device)
        self.ia = torch.empty(size, dtype=torch.int32, device=device)
        self.ib = torch.empty(size, dtype=torch.int32, device=device)
        self.d = torch.empty(size, dtype=torch.float64, device=device)


def _nonzero_scale(absmax: torch.Tensor) -> torch.Tensor:
    # A zero block keeps absmax 0 (it dequantizes to 0); divide by 1 there instead of 0. No clamp is needed
    # after the division: |x| <= absmax implies |x / absmax| <= 1 under IEEE arithmetic.
    return torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)


# ---- the four steps of the 8-bit update, on one chunk of whole blocks (torch backend) ------------------


def _dequantize_moments(
    state1: torch.Tensor,
    absmax1: torch.Tensor,
    state2: torch.Tensor,
    absmax2: torch.Tensor,
    cb1: StateCodebook,
    cb2: StateCodebook,
    ws: _Workspace,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1, dequantize: ``m = code1[state1] * absmax1``, ``v = code2[state2] * absmax2`` (float32 [n])."""
    n = state1.numel()
    blocks = (n // block_size, block_size)
    m, v, index = ws.m[:n], ws.v[:n], ws.ia[:n]
    index.copy_(state1)
    torch.index_select(cb1.code, 0, index, out=m)
    m.view(blocks).mul_(absmax1.unsqueeze(1))
    index.copy_(state2)
    torch.index_select(cb2.code, 0, index, out=v)
    v.view(blocks).mul_(absmax2.unsqueeze(1))
    return m, v


def _update_moments(
    m: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, c: _StepConstants, scratch: torch.Tensor
) -> None:
    """Step 2, update the moments in place: ``m = m*b1 + g*(1-b1)``, ``v = v*b2 + (g*g)*(1-b2)``.

    Every product and sum is rounded on its own (no fused multiply-add), so the numba kernel can reproduce
    it bit for bit.
    """
    g = grad if grad.dtype == torch.float32 else grad.float()
    torch.mul(g, 1.0 - c.beta1, out=scratch)
    m.mul_(c.beta1).add_(scratch)
    torch.mul(g, g, out=scratch)
    v.mul_(c.beta2).add_(scratch.mul_(1.0 - c.beta2))


def _update_parameter(
    param: torch.Tensor, m: torch.Tensor, v: torch.Tensor, c: _StepConstants, ws: _Workspace
) -> None:
    """Step 3, the parameter update: ``p = p*decay + step_size * (m / (sqrt(v)/correction2 + eps))``."""
    n = param.numel()
    f, d = ws.f[:n], ws.d[:n]
    # sqrt in float64, rounded once to float32: torch's float32 CPU sqrt is not correctly rounded (differs
    # from IEEE sqrt for ~20 % of inputs on AVX2), the kernel's is; this keeps both paths identical.
    d.copy_(v)
    f.copy_(d.sqrt_())
    denom = f.div_(c.correction2).add_(c.eps)
    update = torch.div(m, denom, out=f).mul_(c.step_size)
    p32 = param if param.dtype == torch.float32 else param.float()
    if c.decayed:
        p32.mul_(c.decay)
    p32.add_(update)
    if p32 is not param:
        param.copy_(p32)


def _requantize_moments(
    m: torch.Tensor,
    v: torch.Tensor,
    state1: torch.Tensor,
    absmax1: torch.Tensor,
    state2: torch.Tensor,
    absmax2: torch.Tensor,
    cb1: StateCodebook,
    cb2: StateCodebook,
    ws: _Workspace,
    block_size: int,
) -> None:
    """Step 4, requantize: fresh block maxima, then the nearest code of each normalised moment (in place)."""
    n = m.numel()
    blocks = (n // block_size, block_size)
    work = (ws.ia, ws.ib, ws.f)
    # abs + amax (torch.aminmax over dim 1 measured 10x slower on CPU); v >= 0 needs no abs.
    torch.amax(torch.abs(m, out=ws.f[:n]).view(blocks), dim=1, out=absmax1)
    m.view(blocks).div_(_nonzero_scale(absmax1))
    nearest_code(m, cb1, out=state1, work=work)
    torch.amax(v.view(blocks), dim=1, out=absmax2)
    v.view(blocks).div_(_nonzero_scale(absmax2))
    nearest_code(v, cb2, out=state2, work=work)


def _step_chunk(
    param: torch.Tensor,
    grad: torch.Tensor,
    state1: torch.Tensor,
    absmax1: torch.Tensor,
    state2: torch.Tensor,
    absmax2: torch.Tensor,
    cb1: StateCodebook,
    cb2: StateCodebook,
    c: _StepConstants,
    ws: _Workspace,
    block_size: int,
) -> None:
    """The 8-bit AdamW update of one chunk of whole blocks (1-D views; absmax with one value per block)."""
    m, v = _dequantize_moments(state1, absmax1, state2, absmax2, cb1, cb2, ws, block_size)
    _update_moments(m, v, grad, c, ws.f[: m.numel()])
    _update_parameter(param, m, v, c, ws)
    _requantize_moments(m, v, state1, absmax1, state2, absmax2, cb1, cb2, ws, block_size)


def _zero_code(cb: StateCodebook) -> int:
    return int(cb.code.abs().argmin())


def _step_partial_block(
    param: torch.Tensor,
    grad: torch.Tensor,
    state1: torch.Tensor,
    absmax1: torch.Tensor,
    state2: torch.Tensor,
    absmax2: torch.Tensor,
    cb1: StateCodebook,
    cb2: StateCodebook,
    c: _StepConstants,
    ws: _Workspace,
    block_size: int,
) -> None:
    """The update of a last block shorter than ``block_size`` (absmax1, absmax2: one value each).

    The block is padded to full size: padding has zero gradient and the code of 0, so its moments stay
    exactly 0 and never change the block's absmax.
    """
    r = param.numel()
    device = param.device
    pad_p = torch.zeros(block_size, dtype=param.dtype, device=device)
    pad_g = torch.zeros(block_size, dtype=grad.dtype, device=device)
    pad_s1 = torch.full((block_size,), _zero_code(cb1), dtype=torch.uint8, device=device)
    pad_s2 = torch.full((block_size,), _zero_code(cb2), dtype=torch.uint8, device=device)
    pad_p[:r] = param
    pad_g[:r] = grad
    pad_s1[:r] = state1
    pad_s2[:r] = state2
    _step_chunk(pad_p, pad_g, pad_s1, absmax1, pad_s2, absmax2, cb1, cb2, c, ws, block_size)
    param.copy_(pad_p[:r])
    state1.copy_(pad_s1[:r])
    state2.copy_(pad_s2[:r])


# ---- the two backends --------------------------------------------------------------------------------------


def uses_fused_kernel(param: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether ``backend="auto"`` runs the fused numba kernel for this parameter (once it is contiguous):
    numba is installed and works, and parameter and gradient are float32 CPU tensors."""
    return param.is_cpu and param.dtype == torch.float32 and grad.dtype == torch.float32 and numba_available()


def _numba_ok(param: torch.Tensor, grad: torch.Tensor) -> bool:
    return param.is_contiguous() and uses_fused_kernel(param, grad)


def _step_numba(
    param: torch.Tensor,
    grad: torch.Tensor,
    state1: torch.Tensor,
    absmax1: torch.Tensor,
    state2: torch.Tensor,
    absmax2: torch.Tensor,
    cb1: StateCodebook,
    cb2: StateCodebook,
    c: _StepConstants,
    block_size: int,
) -> None:
    """All four steps in one fused pass per block (:mod:`fourbit.optim._numba_8bit`)."""
    adamw_8bit_numba([param], [grad], [(state1, absmax1, state2, absmax2)], cb1, cb2, block_size=block_size,
                     **c._asdict())


def _step_torch(
    param: torch.Tensor,
    grad: torch.Tensor,
    state1: torch.Tensor,
    absmax1: torch.Tensor,
    state2: torch.Tensor,
    absmax2: torch.Tensor,
    cb1: StateCodebook,
    cb2: StateCodebook,
    c: _StepConstants,
    block_size: int,
    chunk_elements: int,
) -> None:
    """The four steps as torch operations on chunks of whole blocks (1-D tensors), then the partial block."""
    n = param.numel()
    chunk = max(block_size, chunk_elements // block_size * block_size)
    full = n // block_size * block_size
    ws = _Workspace(min(chunk, max(full, block_size)), param.device)
    for start in range(0, full, chunk):
        end = min(full, start + chunk)
        b0, b1 = start // block_size, end // block_size
        _step_chunk(
            param[start:end], grad[start:end], state1[start:end], absmax1[b0:b1], state2[start:end],
            absmax2[b0:b1], cb1, cb2, c, ws, block_size,
        )
    if full < n:
        _step_partial_block(
            param[full:], grad[full:], state1[full:], absmax1[-1:], state2[full:], absmax2[-1:], cb1, cb2, c, ws,
            block_size,
        )


@torch.no_grad()
def adamw_step_8bit(
    param: torch.Tensor,
    grad: torch.Tensor,
    state1: torch.Tensor,
    absmax1: torch.Tensor,
    state2: torch.Tensor,
    absmax2: torch.Tensor,
    cb1: StateCodebook,
    cb2: StateCodebook,
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    block_size: int = 256,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    backend: str = "auto",
) -> None:
    """One AdamW step with blockwise 8-bit moments, in place.

    Args:
        param: contiguous parameter with n elements, any float dtype.
        grad: its gradient, same shape.
        state1: uint8 codes of m in ``cb1`` (signed map), n elements; absmax1: float32 [ceil(n / block_size)].
        state2: uint8 codes of v in ``cb2`` (unsigned map), n elements; absmax2: float32 [ceil(n / block_size)].
        cb1, cb2: codebooks of the two moments.
        step: the step number t >= 1.
        lr, beta1, beta2, eps, weight_decay: hyperparameters.
        block_size: elements per quantization block.
        chunk_elements: elements processed at once (rounded down to whole blocks); does not change results.
        backend: "torch" (torch operations on chunks), "numba" (the fused kernel of
            :mod:`fourbit.optim._numba_8bit`), or "auto" (numba when installed and the tensors are float32
            on the CPU). Both give bit-identical results.

    Raises:
        FieldError: for an unknown ``backend``.
        NotImplementedError: for ``backend="numba"`` when it cannot run on these tensors.
    """
    if backend not in _BACKENDS:
        raise FieldError("backend", f"must be one of {', '.join(map(repr, _BACKENDS))}, got {backend!r}")
    c = _step_constants(step, lr, beta1, beta2, eps, weight_decay)
    if backend != "torch" and _numba_ok(param, grad):
        _step_numba(param, grad, state1, absmax1, state2, absmax2, cb1, cb2, c, block_size)
    elif backend == "numba":
        raise NotImplementedError("backend='numba' needs numba and float32 CPU tensors")
    else:
        _step_torch(
            param.view(-1), grad.reshape(-1), state1.view(-1), absmax1, state2.view(-1), absmax2, cb1, cb2, c,
            block_size, chunk_elements,
        )


# ---- many small tensors as one --------------------------------------------------------------------------------


class _Packed(NamedTuple):
    """Several tensors and their 8-bit states concatenated, each padded to whole blocks."""

    param: torch.Tensor
    grad: torch.Tensor
    state1: torch.Tensor
    absmax1: torch.Tensor
    state2: torch.Tensor
    absmax2: torch.Tensor


def _pack(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    cb1: StateCodebook,
    cb2: StateCodebook,
    block_size: int,
) -> _Packed:
    """Concatenate the tensors, padding each to whole blocks with zero gradient and the code of 0 (the
    padding's moments stay exactly 0 and never change a block maximum)."""
    z1, z2 = _zero_code(cb1), _zero_code(cb2)
    ps, gs, s1s, s2s = [], [], [], []
    for p, g, (s1, _, s2, _) in zip(params, grads, states, strict=True):
        ps.append(p.view(-1))
        gs.append(g.reshape(-1))
        s1s.append(s1.view(-1))
        s2s.append(s2.view(-1))
        pad = -p.numel() % block_size
        if pad:
            ps.append(p.new_zeros(pad))
            gs.append(g.new_zeros(pad))
            s1s.append(torch.full((pad,), z1, dtype=torch.uint8, device=p.device))
            s2s.append(torch.full((pad,), z2, dtype=torch.uint8, device=p.device))
    return _Packed(
        param=torch.cat(ps),
        grad=torch.cat(gs),
        state1=torch.cat(s1s),
        absmax1=torch.cat([st[1] for st in states]),
        state2=torch.cat(s2s),
        absmax2=torch.cat([st[3] for st in states]),
    )


def _unpadded_parts(packed: torch.Tensor, sizes: list[int], block_size: int) -> list[torch.Tensor]:
    padded = [n + (-n % block_size) for n in sizes]
    return [part[:n] for part, n in zip(packed.split(padded), sizes, strict=True)]


def _unpack(
    packed: _Packed,
    params: list[torch.Tensor],
    states: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    block_size: int,
) -> None:
    """Copy the updated parameters and states back into the original tensors (padding dropped)."""
    sizes = [p.numel() for p in params]
    blocks = [st[1].numel() for st in states]
    torch._foreach_copy_([p.view(-1) for p in params], _unpadded_parts(packed.param, sizes, block_size))
    torch._foreach_copy_([st[0].view(-1) for st in states], _unpadded_parts(packed.state1, sizes, block_size))
    torch._foreach_copy_([st[2].view(-1) for st in states], _unpadded_parts(packed.state2, sizes, block_size))
    torch._foreach_copy_([st[1] for st in states], list(packed.absmax1.split(blocks)))
    torch._foreach_copy_([st[3] for st in states], list(packed.absmax2.split(blocks)))


@torch.no_grad()
def adamw_step_8bit_packed(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    cb1: StateCodebook,
    cb2: StateCodebook,
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    block_size: int = 256,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    backend: str = "auto",
) -> None:
    """:func:`adamw_step_8bit` for several small tensors at once, with identical results.

    With the numba backend all tensors go to one kernel call, where they are (the per-call cost, not the
    arithmetic, dominates the step time for the many small matrices of LoRA adapters). With the torch backend
    they are packed (each padded to whole blocks, then concatenated), updated as one tensor and unpacked,
    which replaces ~60 small torch calls per tensor by a handful per pack.

    Args:
        params: tensors of one dtype and device, each contiguous.
        grads: their gradients.
        states: per tensor ``(state1, absmax1, state2, absmax2)`` as in :func:`adamw_step_8bit`.
        cb1, cb2, step, lr, beta1, beta2, eps, weight_decay, block_size, chunk_elements, backend: as there.
    """
    hparams = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                   block_size=block_size, chunk_elements=chunk_elements)
    if len(params) == 1:
        adamw_step_8bit(params[0], grads[0], *states[0], cb1, cb2, backend=backend, **hparams)
        return
    if backend not in _BACKENDS:
        raise FieldError("backend", f"must be one of {', '.join(map(repr, _BACKENDS))}, got {backend!r}")
    if backend != "torch" and all(_numba_ok(p, g) for p, g in zip(params, grads, strict=True)):
        # The fused kernel takes the tensors where they are: one call, nothing concatenated.
        c = _step_constants(step, lr, beta1, beta2, eps, weight_decay)
        adamw_8bit_numba(params, grads, states, cb1, cb2, block_size=block_size, **c._asdict())
        return
    if backend == "numba":
        raise NotImplementedError("backend='numba' needs numba and float32 CPU tensors")
    packed = _pack(params, grads, states, cb1, cb2, block_size)
    adamw_step_8bit(*packed, cb1, cb2, backend="torch", **hparams)
    _unpack(packed, params, states, block_size)
