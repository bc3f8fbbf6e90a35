"""The SwiGLU gate, silu(a) * b, as Triton kernels.

    h = swiglu(gate, up)    # the feed-forward's w2(silu(w1 x) * w3 x) without the matmuls

a and b have one shape (any); the output has that shape and torch's promotion of their dtypes; the math
is fp32 whatever the inputs. swiglu_reference at the end of this file is the definition.

How: an elementwise kernel over the flattened tensors, BLOCK elements per program (64-bit offsets). The
backward recomputes sigmoid(a) instead of keeping silu(a) from the forward: only a and b are saved, which
the matmuls that made them keep anyway.
    d/da = dy * b * sigmoid(a) * (1 + a * (1 - sigmoid(a)))      d/db = dy * silu(a)
Byte model (kernels/bench.py): forward reads a, b and writes y (3 tensors); backward reads dy, a, b and
writes da, db (5 tensors).
"""
from __future__ import annotations  # Triton reads `tl.constexpr` annotations as strings; lets this file import without triton

import torch
import torch.nn.functional as F

from kernels.runtime import runs_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch without triton: only the reference can run
    triton = tl = None

_jit = triton.jit if triton is not None else (lambda fn: fn)

BLOCK = 1024  # with 4 warps: 8 elements per thread, one 16-byte load per tensor in half precision


# ---------------------------------------------------------------------------------------------- kernels
@_jit
def _swiglu_fwd_kernel(Y, A, B, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # 64-bit: n may pass 2^31
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    y = a * tl.sigmoid(a) * b
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@_jit
def _swiglu_bwd_kernel(DA, DB, DY, A, B, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    a = tl.load(A + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    sig = tl.sigmoid(a)  # recomputed: cheaper than storing silu(a) and reading it back
    silu = a * sig
    tl.store(DA + offs, (dy * b * (sig + silu * (1.0 - sig))).to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + offs, (dy * silu).to(DB.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- launchers
# The kernels walk flat memory, so every tensor is made contiguous on purpose (a no-op for matmul outputs).
def _forward(a, b):
    a, b = a.contiguous(), b.contiguous()
    y = torch.empty(a.shape, dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
    n = a.numel()
    _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](y, a, b, n, BLOCK=BLOCK, num_warps=4)
    return y


def _backward(dy, a, b):
    dy, a, b = dy.contiguous(), a.contiguous(), b.contiguous()
    da, db = torch.empty_like(a), torch.empty_like(b)
    n = a.numel()
    _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](da, db, dy, a, b, n, BLOCK=BLOCK, num_warps=4)
    return da, db


# Under torch.compile each launch goes through an opaque custom op: the compiler needs only the output
# shapes (register_fake) and never traces into Triton. Eager calls skip the op dispatcher and its overhead.
if triton is not None:
    @torch.library.custom_op("minialpaca::swiglu_fwd", mutates_args=())
    def _forward_op(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _forward(a, b)

    @_forward_op.register_fake
    def _(a, b):
        return a.new_empty(a.shape, dtype=torch.promote_types(a.dtype, b.dtype))

    @torch.library.custom_op("minialpaca::swiglu_bwd", mutates_args=())
    def _backward_op(dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _backward(dy, a, b)

    @_backward_op.register_fake
    def _(dy, a, b):
        return torch.empty_like(a, memory_format=torch.contiguous_format), torch.empty_like(b, memory_format=torch.contiguous_format)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return (_forward_op if torch.compiler.is_compiling() else _forward)(a, b)

    @staticmethod
    def backward(ctx, dy):
        a, b = ctx.saved_tensors
        return (_backward_op if torch.compiler.is_compiling() else _backward)(dy, a, b)


# ---------------------------------------------------------------------------------------------- public
def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for a, b of one shape, computed in fp32: Triton where it runs, the reference otherwise."""
    if a.shape != b.shape:
        raise ValueError(f"swiglu: gate {tuple(a.shape)} and up {tuple(b.shape)} must have the same shape")
    if a.device != b.device:
        raise ValueError(f"swiglu: gate is on {a.device}, up on {b.device}")
    bf16_in_interpreter = a.device.type == "cpu" and torch.bfloat16 in (a.dtype, b.dtype)  # numpy has no bfloat16
    if runs_triton(a) and a.numel() > 0 and not bf16_in_interpreter:
        return _SwiGLU.apply(a, b)
    return swiglu_reference(a, b)


# ---------------------------------------------------------------------------------------------- reference
def swiglu_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """What the kernels compute: minialpaca.model.FeedForward's torch path."""
    return F.silu(a) * b
