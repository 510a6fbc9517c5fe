"""Pure AdamW update functions (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization", Alg. 2).

For step t with gradient g (Kingma & Ba 2015, Alg. 1, with decoupled weight decay lambda):

    p   <- p * (1 - lr * lambda)                          (decoupled weight decay)
    m   <- beta1 * m + (1 - beta1) * g                    (first moment)
    v   <- beta2 * v + (1 - beta2) * g^2                  (second moment)
    p   <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

:func:`adamw_step_32bit` runs exactly the operations of ``torch.optim.AdamW``'s single-tensor path, in the
same order, so a float32 parameter gets bit-identical results. :func:`adamw_step_8bit` keeps m and v as
blockwise 8-bit codes (Dettmers et al. 2022, section 2): it dequantizes both moments to float32, applies the
update and requantizes them with fresh block maxima. Its float32 arithmetic is fixed to plain IEEE
operations, each rounded on its own (no fused multiply-add; sqrt correctly rounded), in the order written
above, so that its two backends agree bit for bit: the fused numba kernel (:mod:`fourbit.optim._numba_8bit`,
used when numba is installed and the tensors are float32 on the CPU) and chunked torch operations (any
device and dtype; chunks of whole blocks keep temporaries in cache, and results do not depend on the chunk
size). bitsandbytes computes the same formula with fused operations, so it differs in the last bits.
"""

from __future__ import annotations

import math

import torch

from fourbit.optim._numba_8bit import adamw_8bit_numba, numba_available
from fourbit.optim.quant8 import StateCodebook, nearest_code

__all__ = ["adamw_step_32bit", "adamw_step_8bit", "adamw_step_8bit_packed", "DEFAULT_CHUNK_ELEMENTS"]

#: Elements per chunk of the 8-bit update (a multiple of every power-of-two block size up to 2^18).
DEFAULT_CHUNK_ELEMENTS = 1 << 18


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


def _chunk_8bit(
    p: torch.Tensor,
    g: torch.Tensor,
    s1: torch.Tensor,
    a1: torch.Tensor,
    s2: torch.Tensor,
    a2: torch.Tensor,
    cb1: StateCodebook,
    cb2: StateCodebook,
    ws: _Workspace,
    hp: tuple[float, float, float, float, float, float, bool],
    block_size: int,
) -> None:
    """The 8-bit AdamW update of one chunk of whole blocks (all 1-D views; a1, a2 have one value per block)."""
    beta1, beta2, correction2, eps, decay, step_size, decayed = hp
    n = p.numel()
    k = n // block_size
    m, v, f, ia = ws.m[:n], ws.v[:n], ws.f[:n], ws.ia[:n]
    # Dequantize: m = code1[s1] * absmax1, v = code2[s2] * absmax2.
    ia.copy_(s1)
    torch.index_select(cb1.code, 0, ia, out=m)
    m.view(k, block_size).mul_(a1.unsqueeze(1))
    ia.copy_(s2)
    torch.index_select(cb2.code, 0, ia, out=v)
    v.view(k, block_size).mul_(a2.unsqueeze(1))
    g = g if g.dtype == torch.float32 else g.float()
    # Update, every product and sum rounded on its own (no fused multiply-add, so the numba kernel can
    # reproduce it bit for bit): m = m*b1 + g*(1-b1); v = v*b2 + (g*g)*(1-b2); p = p*decay + s*(m/denom).
    torch.mul(g, 1.0 - beta1, out=f)
    m.mul_(beta1).add_(f)
    torch.mul(g, g, out=f)
    v.mul_(beta2).add_(f.mul_(1.0 - beta2))
    # sqrt in float64, rounded once to float32: torch's float32 CPU sqrt is not correctly rounded (differs
    # from IEEE sqrt for ~20 % of inputs on AVX2), the kernel's is; this keeps both paths identical.
    d = ws.d[:n]
    d.copy_(v)
    f.copy_(d.sqrt_())
    denom = f.div_(correction2).add_(eps)
    update = torch.div(m, denom, out=f).mul_(step_size)
    p32 = p if p.dtype == torch.float32 else p.float()
    if decayed:
        p32.mul_(decay)
    p32.add_(update)
    if p32 is not p:
        p.copy_(p32)
    # abs + amax (torch.aminmax over dim 1 measured 10x slower on CPU).
    torch.amax(torch.abs(m, out=f).view(k, block_size), dim=1, out=a1)
    m.view(k, block_size).div_(_nonzero_scale(a1))
    nearest_code(m, cb1, out=s1, work=(ws.ia, ws.ib, ws.f))
    torch.amax(v.view(k, block_size), dim=1, out=a2)
    v.view(k, block_size).div_(_nonzero_scale(a2))
    nearest_code(v, cb2, out=s2, work=(ws.ia, ws.ib, ws.f))


def _numba_ok(param: torch.Tensor, grad: torch.Tensor) -> bool:
    return (
        param.device.type == "cpu"
        and param.dtype == torch.float32
        and grad.dtype == torch.float32
        and param.is_contiguous()
        and numba_available()
    )


def _zero_code(cb: StateCodebook) -> int:
    return int(cb.code.abs().argmin())


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
        ValueError: for an unknown backend.
        NotImplementedError: for ``backend="numba"`` when it cannot run on these tensors.
    """
    n = param.numel()
    chunk = max(block_size, chunk_elements // block_size * block_size)
    p_flat = param.view(-1)
    g_flat = grad.reshape(-1)
    s1 = state1.view(-1)
    s2 = state2.view(-1)
    hp = (
        beta1,
        beta2,
        math.sqrt(1.0 - beta2**step),
        eps,
        1.0 - lr * weight_decay,
        -lr / (1.0 - beta1**step),
        weight_decay > 0.0,
    )
    if backend not in ("auto", "torch", "numba"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'numba', got {backend!r}")
    if backend != "torch" and _numba_ok(param, grad):
        beta1_, beta2_, correction2, eps_, decay, step_size, decayed = hp
        adamw_8bit_numba(
            param, grad, state1, absmax1, state2, absmax2, cb1, cb2, beta1=beta1_, beta2=beta2_,
            correction2=correction2, eps=eps_, decay=decay, step_size=step_size, decayed=decayed,
            block_size=block_size,
        )
        return
    if backend == "numba":
        raise NotImplementedError("backend='numba' needs numba and float32 CPU tensors")
    full = n // block_size * block_size
    ws = _Workspace(min(chunk, max(full, block_size)), param.device)
    for start in range(0, full, chunk):
        end = min(full, start + chunk)
        b0, b1 = start // block_size, end // block_size
        _chunk_8bit(
            p_flat[start:end], g_flat[start:end], s1[start:end], absmax1[b0:b1], s2[start:end], absmax2[b0:b1],
            cb1, cb2, ws, hp, block_size,
        )
    if full < n:
        # The partial last block, padded to a whole block: padding has zero gradient and codes of 0, so its
        # moments stay exactly 0 and do not change the block's absmax.
        r = n - full
        pad_p = torch.zeros(block_size, dtype=param.dtype, device=param.device)
        pad_g = torch.zeros(block_size, dtype=grad.dtype, device=grad.device)
        pad_s1 = torch.full((block_size,), _zero_code(cb1), dtype=torch.uint8, device=param.device)
        pad_s2 = torch.full((block_size,), _zero_code(cb2), dtype=torch.uint8, device=param.device)
        pad_p[:r] = p_flat[full:]
        pad_g[:r] = g_flat[full:]
        pad_s1[:r] = s1[full:]
        pad_s2[:r] = s2[full:]
        nb = absmax1.numel()
        _chunk_8bit(
            pad_p, pad_g, pad_s1, absmax1[nb - 1 :], pad_s2, absmax2[nb - 1 :], cb1, cb2, ws, hp, block_size
        )
        p_flat[full:] = pad_p[:r]
        s1[full:] = pad_s1[:r]
        s2[full:] = pad_s2[:r]


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

    Each tensor is padded to whole blocks (zero gradient, zero codes: the padding's moments stay exactly 0
    and never change a block maximum), the tensors are concatenated, updated as one, and copied back. This
    replaces ~60 small torch calls per tensor by a handful per pack, which dominates the step time for the
    many small matrices of LoRA adapters.

    Args:
        params: tensors of one dtype and device, each contiguous.
        grads: their gradients.
        states: per tensor ``(state1, absmax1, state2, absmax2)`` as in :func:`adamw_step_8bit`.
        cb1, cb2, step, lr, beta1, beta2, eps, weight_decay, block_size, chunk_elements, backend: as there.
    """
    if len(params) == 1 or (backend != "torch" and all(_numba_ok(p, g) for p, g in zip(params, grads, strict=True))):
        # The fused kernel has little per-call overhead: no need to concatenate.
        for p, g, st in zip(params, grads, states, strict=True):
            adamw_step_8bit(
                p, g, *st, cb1, cb2, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                weight_decay=weight_decay, block_size=block_size, chunk_elements=chunk_elements, backend=backend,
            )
        return
    z1, z2 = _zero_code(cb1), _zero_code(cb2)
    ps, gs, s1s, s2s = [], [], [], []
    for p, g, (s1, _, s2, _) in zip(params, grads, states, strict=True):
        n = p.numel()
        pad = -n % block_size
        ps.append(p.view(-1))
        gs.append(g.reshape(-1))
        s1s.append(s1.view(-1))
        s2s.append(s2.view(-1))
        if pad:
            ps.append(p.new_zeros(pad))
            gs.append(g.new_zeros(pad))
            s1s.append(torch.full((pad,), z1, dtype=torch.uint8, device=p.device))
            s2s.append(torch.full((pad,), z2, dtype=torch.uint8, device=p.device))
    p_cat, g_cat, s1_cat, s2_cat = torch.cat(ps), torch.cat(gs), torch.cat(s1s), torch.cat(s2s)
    a1_cat = torch.cat([st[1] for st in states])
    a2_cat = torch.cat([st[3] for st in states])
    adamw_step_8bit(
        p_cat, g_cat, s1_cat, a1_cat, s2_cat, a2_cat, cb1, cb2, step=step, lr=lr, beta1=beta1, beta2=beta2,
        eps=eps, weight_decay=weight_decay, block_size=block_size, chunk_elements=chunk_elements,
        backend="torch",
    )
    sizes = [p.numel() for p in params]
    padded = [n + (-n % block_size) for n in sizes]
    blocks = [st[1].numel() for st in states]

    def parts(cat: torch.Tensor, lengths: list[int], keep: list[int]) -> list[torch.Tensor]:
        return [t[:k] for t, k in zip(cat.split(lengths), keep, strict=True)]

    torch._foreach_copy_([p.view(-1) for p in params], parts(p_cat, padded, sizes))
    torch._foreach_copy_([st[0].view(-1) for st in states], parts(s1_cat, padded, sizes))
    torch._foreach_copy_([st[2].view(-1) for st in states], parts(s2_cat, padded, sizes))
    torch._foreach_copy_([st[1] for st in states], list(a1_cat.split(blocks)))
    torch._foreach_copy_([st[3] for st in states], list(a2_cat.split(blocks)))
