"""Rotary position embeddings on Meta's interleaved layout, as a Triton kernel.

    q = apply_rope(q, cos, sin)

x (B, T, n_heads, D); cos, sin (B or 1, T, 1, D/2), already gathered per token by the caller (see
minialpaca/model.py Transformer.forward), so a KV-cache offset or per-token positions (packed rows that
restart at each example) need nothing here. Each pair (x[2i], x[2i+1]) turns by its angle, in fp32:

    y[2i]   = x[2i] cos_i - x[2i+1] sin_i
    y[2i+1] = x[2i] sin_i + x[2i+1] cos_i

rope_reference at the end of this file is the definition (the model's apply_rotary_emb).

How: one program per (token, block of heads) loads the token's cos/sin row once and rotates every head of
the block; the (heads, D) tile is read contiguously and split into its even and odd lanes in registers,
so loads stay vectorized. A rotation's inverse is its transpose, so the backward is the same kernel turning
the gradient by -angle; nothing but cos and sin (which the model keeps anyway) is saved.
Byte model (kernels/bench.py): forward and backward each read and write (B, T, n_heads, D) once; the cos
and sin rows are shared by all heads and negligible.
"""
from __future__ import annotations  # Triton reads `tl.constexpr` annotations as strings; lets this file import without triton

import torch

from kernels.runtime import runs_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch without triton: only the reference can run
    triton = tl = None

_jit = triton.jit if triton is not None else (lambda fn: fn)


# ---------------------------------------------------------------------------------------------- kernel
@_jit
def _rope_kernel(
    Y, X, COS, SIN,
    stride_yb, stride_yt, stride_yh,  # the last dim of every tensor is contiguous
    stride_xb, stride_xt, stride_xh,
    stride_cb, stride_ct, stride_sb, stride_st,  # batch stride 0 when one table row serves every batch row
    T, n_heads, n_pairs,
    INVERSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)  # 64-bit: token * stride may pass 2^31
    b, t = token // T, token % T
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    pairs = tl.arange(0, BLOCK_P)
    cos = tl.load(COS + b * stride_cb + t * stride_ct + pairs, mask=pairs < n_pairs, other=0.0).to(tl.float32)
    sin = tl.load(SIN + b * stride_sb + t * stride_st + pairs, mask=pairs < n_pairs, other=0.0).to(tl.float32)
    if INVERSE:
        sin = -sin

    cols = tl.arange(0, 2 * BLOCK_P)
    mask = (heads[:, None] < n_heads) & (cols[None, :] < 2 * n_pairs)
    x = tl.load(X + b * stride_xb + t * stride_xt + heads[:, None] * stride_xh + cols[None, :], mask=mask, other=0.0)
    # (BLOCK_H, 2 * BLOCK_P) -> even and odd lanes, each (BLOCK_H, BLOCK_P)
    x0, x1 = tl.split(tl.reshape(x.to(tl.float32), (BLOCK_H, BLOCK_P, 2)))
    y0 = x0 * cos[None, :] - x1 * sin[None, :]
    y1 = x0 * sin[None, :] + x1 * cos[None, :]
    y = tl.reshape(tl.join(y0, y1), (BLOCK_H, 2 * BLOCK_P))
    tl.store(Y + b * stride_yb + t * stride_yt + heads[:, None] * stride_yh + cols[None, :],
             y.to(Y.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- launchers
def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()  # a copy on purpose: lanes must be adjacent to vectorize


def _rotate(x, cos, sin, inverse: bool):
    """Rotate x (B, T, H, D) by cos/sin (or by -angle when inverse) into a new contiguous tensor."""
    x, cos, sin = _last_dim_contiguous(x), _last_dim_contiguous(cos), _last_dim_contiguous(sin)
    B, T, H, D = x.shape
    y = torch.empty((B, T, H, D), dtype=x.dtype, device=x.device)
    block_p = triton.next_power_of_2(D // 2)
    # About 4K elements per program: all heads of a token for LLaMA's D=128, H=32.
    block_h = min(triton.next_power_of_2(H), max(1, 4096 // (2 * block_p)))
    num_warps = 4 if block_h * block_p <= 1024 else 8
    _rope_kernel[(B * T, triton.cdiv(H, block_h))](
        y, x, cos, sin,
        y.stride(0), y.stride(1), y.stride(2),
        x.stride(0), x.stride(1), x.stride(2),
        cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1),
        sin.stride(0) if sin.shape[0] > 1 else 0, sin.stride(1),
        T, H, D // 2,
        INVERSE=inverse, BLOCK_H=block_h, BLOCK_P=block_p, num_warps=num_warps,
    )
    return y


# Under torch.compile the launch goes through an opaque custom op: the compiler needs only the output shape
# (register_fake) and never traces into Triton. Eager calls skip the op dispatcher and its overhead.
if triton is not None:
    @torch.library.custom_op("minialpaca::rope", mutates_args=())
    def _rotate_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
        return _rotate(x, cos, sin, inverse)

    @_rotate_op.register_fake
    def _(x, cos, sin, inverse):
        return x.new_empty(x.shape)


def _run(x, cos, sin, inverse):
    return (_rotate_op if torch.compiler.is_compiling() else _rotate)(x, cos, sin, inverse)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _run(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _run(dy, cos, sin, inverse=True), None, None  # the tables are derived, never trained


# ---------------------------------------------------------------------------------------------- public
def _check(x, cos, sin):
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"apply_rope expects x (B, T, n_heads, D) with D even; got {tuple(x.shape)}")
    B, T, _, D = x.shape
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() != 4 or table.shape[0] not in (1, B) or table.shape[1:] != (T, 1, D // 2):
            raise ValueError(f"apply_rope: {name} must be (B={B} or 1, T={T}, 1, D/2={D // 2}) for x "
                             f"{tuple(x.shape)}; got {tuple(table.shape)}")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs of x (B, T, n_heads, D) by per-token angles given as cos, sin
    (B or 1, T, 1, D/2); returns x's shape and dtype. Triton where it runs, the reference otherwise."""
    _check(x, cos, sin)
    if runs_triton(x) and x.numel() > 0:  # runs_triton already refuses bf16 in the interpreter
        return _Rope.apply(x, cos, sin)
    return rope_reference(x, cos, sin)


# ---------------------------------------------------------------------------------------------- reference
def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """What the kernel computes: Meta's complex multiply written in real numbers, as
    minialpaca.model.apply_rotary_emb runs it under torch.compile (eager, it multiplies complex numbers)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, n, D/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)  # (B, T, n, D)
