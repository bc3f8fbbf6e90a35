"""RMSNorm, and residual-add + RMSNorm fused, as Triton kernels.

    y = rms_norm(x, weight, eps)                         # Meta's RMSNorm (minialpaca/model.py)
    h, y = add_rms_norm(x, residual, weight, eps)        # h = x + residual; y = rms_norm(h)

What is computed (rms_norm_reference at the end of this file is the definition): normalize each row in
fp32, cast the result back to the input's dtype, *then* multiply by the weight, so the output dtype is
torch's promotion of (x.dtype, weight.dtype). The fused variant rounds the sum to x's dtype before
normalizing it, exactly as the unfused `h = x + residual` would.

How:
- forward: one program per row; the whole row (BLOCK = next_power_of_2(hidden) <= 64K elements) sits in
  registers, so x is read once, y written once, and only the per-row rstd (fp32) is kept for backward.
- backward: a fixed number of programs (one per SM), each looping over a contiguous run of rows. dx needs
  only its own row; the weight gradient is accumulated in fp32 registers across the program's rows and
  written as one partial row per program, summed in fp32 afterwards (no atomics, deterministic).
  The fused variant adds the gradient arriving at the sum h to dx in the same pass.
Byte model (what kernels/bench.py counts): forward reads x (and residual) and writes y (and h); backward
reads dy, x (and dh), writes dx; the weight and rstd are negligible next to (rows x hidden).
"""
from __future__ import annotations  # Triton reads `tl.constexpr` annotations as strings; lets this file import without triton

from typing import Optional

import torch

from kernels.runtime import runs_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch without triton: only the reference can run
    triton = tl = None

_jit = triton.jit if triton is not None else (lambda fn: fn)

MAX_HIDDEN = 65536  # a row must fit one program's registers


# ---------------------------------------------------------------------------------------------- kernels
@_jit
def _rms_norm_fwd_kernel(
    Y, RSTD, H, X, RES, W,  # Y (rows, n) output; RSTD (rows,) fp32; H (rows, n) the sum, when HAS_RESIDUAL
    stride_y, stride_h, stride_x, stride_res,  # row strides; every row is contiguous
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # 64-bit: row * stride may pass 2^31
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    # x is streamed once (evict_first); the weight is read by every program, so it should stay in cache.
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0, eviction_policy="evict_first")
    if HAS_RESIDUAL:
        res = tl.load(RES + row * stride_res + cols, mask=mask, other=0.0, eviction_policy="evict_first")
        x = (x.to(tl.float32) + res.to(tl.float32)).to(X.dtype.element_ty)  # the sum, rounded as torch would
        tl.store(H + row * stride_h + cols, x, mask=mask)
    w = tl.load(W + cols, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)

    x = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    # Meta's order: round the normalized row to the input dtype first, then scale in the output's precision.
    normed = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (normed * w).to(Y.dtype.element_ty), mask=mask)


@_jit
def _rms_norm_bwd_kernel(
    DX, DW_PARTIAL, DY, DH, X, W, RSTD,  # X is what was normalized (the sum h in the fused variant)
    stride_dx, stride_dy, stride_dh, stride_x,
    n_rows, n_cols, rows_per_program,
    HAS_DH: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        x_hat = x * rstd
        # y = round(x_hat) * w: the weight sees the rounded row, the rounding itself passes gradients through.
        dw += dy * x_hat.to(X.dtype.element_ty).to(tl.float32)
        dn = dy * w
        # d/dx of x * rstd(x): rstd * (dn - x_hat * mean(dn * x_hat))
        dx = rstd * (dn - x_hat * (tl.sum(dn * x_hat, axis=0) / n_cols))
        if HAS_DH:
            dx += tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)


# ---------------------------------------------------------------------------------------------- launchers
def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, hidden) with contiguous rows: a view when the layout allows, a copy on purpose otherwise."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _row_config(n_cols: int) -> tuple[int, int]:
    """BLOCK covering a whole row, and enough warps that each thread holds 8-16 elements (16-byte loads)."""
    block = triton.next_power_of_2(n_cols)
    num_warps = 4 if block < 2048 else 8 if block < 8192 else 16 if block < 32768 else 32
    return block, num_warps


def _n_programs(device: torch.device, n_rows: int) -> int:
    """Backward programs: one per SM fills the GPU while keeping the weight-gradient partials few."""
    n = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(n, n_rows))


def _forward(x, residual, weight, eps):
    """-> (y, rstd, h): h is the sum x + residual, or None without a residual."""
    x2 = _rows(x)
    n_rows, n_cols = x2.shape
    y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if residual is not None:
        res2 = _rows(residual)
        h = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    else:
        res2 = h = x2  # unused: HAS_RESIDUAL=False compiles those loads and stores away
    block, num_warps = _row_config(n_cols)
    _rms_norm_fwd_kernel[(n_rows,)](
        y, rstd, h, x2, res2, weight.contiguous(),
        y.stride(0), h.stride(0), x2.stride(0), res2.stride(0),
        n_cols, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps,
    )
    return y.view(x.shape), rstd, (h.view(x.shape) if residual is not None else None)


def _backward(dy, dh, x, weight, rstd):
    """-> (dx, dweight); dh is the gradient arriving at the sum in the fused variant (else None)."""
    x2, dy2 = _rows(x), _rows(dy)
    n_rows, n_cols = x2.shape
    dh2 = _rows(dh) if dh is not None else dy2
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    n_programs = _n_programs(x.device, n_rows)
    dw_partial = torch.empty((n_programs, n_cols), dtype=torch.float32, device=x.device)
    block, num_warps = _row_config(n_cols)
    _rms_norm_bwd_kernel[(n_programs,)](
        dx, dw_partial, dy2, dh2, x2, weight.contiguous(), rstd,
        dx.stride(0), dy2.stride(0), dh2.stride(0), x2.stride(0),
        n_rows, n_cols, triton.cdiv(n_rows, n_programs),
        HAS_DH=dh is not None, BLOCK=block, num_warps=num_warps,
    )
    return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype)


# Under torch.compile every launch goes through an opaque custom op: the compiler needs only the output
# shapes (register_fake) and never traces into Triton. Eager calls skip the op dispatcher, which would add
# tens of microseconds per call.
if triton is not None:
    @torch.library.custom_op("minialpaca::rms_norm_fwd", mutates_args=())
    def _forward_op(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, rstd, h = _forward(x, residual, weight, eps)
        return y, rstd, (h if h is not None else x.new_empty(0))

    @_forward_op.register_fake
    def _(x, residual, weight, eps):
        rows = x.numel() // x.shape[-1]
        y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
        return y, x.new_empty(rows, dtype=torch.float32), x.new_empty(x.shape if residual is not None else 0)

    @torch.library.custom_op("minialpaca::rms_norm_bwd", mutates_args=())
    def _backward_op(dy: torch.Tensor, dh: Optional[torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
                     rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _backward(dy, dh, x, weight, rstd)

    @_backward_op.register_fake
    def _(dy, dh, x, weight, rstd):
        return torch.empty_like(x), torch.empty_like(weight)


def _run_forward(x, residual, weight, eps):
    if torch.compiler.is_compiling():
        y, rstd, h = _forward_op(x, residual, weight, eps)
        return y, rstd, (h if residual is not None else None)
    return _forward(x, residual, weight, eps)


def _run_backward(dy, dh, x, weight, rstd):
    return (_backward_op if torch.compiler.is_compiling() else _backward)(dy, dh, x, weight, rstd)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd, _ = _run_forward(x, None, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _run_backward(dy, None, x, weight, rstd)
        return dx, dw, None


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        y, rstd, h = _run_forward(x, residual, weight, eps)
        ctx.save_for_backward(h, weight, rstd)  # the sum is an output anyway: saving it costs nothing
        ctx.residual_dtype = residual.dtype
        return h, y

    @staticmethod
    def backward(ctx, dh, dy):
        h, weight, rstd = ctx.saved_tensors
        dx, dw = _run_backward(dy, dh, h, weight, rstd)
        return dx, dx.to(ctx.residual_dtype), dw, None


# ---------------------------------------------------------------------------------------------- public
def _check(x, weight, residual=None):
    name = "add_rms_norm" if residual is not None else "rms_norm"
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"{name}: weight {tuple(weight.shape)} must be (hidden,) = ({x.shape[-1]},) for x {tuple(x.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")


def _kernel_applies(x, weight, residual=None) -> bool:
    """Triton runs this call: a Triton device, a row that fits one program, and no bf16 in the interpreter
    (numpy has no bfloat16)."""
    tensors = (x, weight) if residual is None else (x, weight, residual)
    return (runs_triton(x) and 0 < x.shape[-1] <= MAX_HIDDEN and x.numel() > 0
            and not (x.device.type == "cpu" and any(t.dtype == torch.bfloat16 for t in tensors)))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Meta's RMSNorm over the last dim of x (any leading shape): Triton where it runs, the reference otherwise."""
    _check(x, weight)
    if _kernel_applies(x, weight):
        return _RMSNorm.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, rms_norm(h)) with h = x + residual in x's dtype: one pass over the residual stream, not two."""
    _check(x, weight, residual)
    if _kernel_applies(x, weight, residual):
        return _AddRMSNorm.apply(x, residual, weight, eps)
    return add_rms_norm_reference(x, residual, weight, eps)


# ---------------------------------------------------------------------------------------------- reference
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """What the kernels compute: minialpaca.model.RMSNorm's torch path."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    h = (x + residual).to(x.dtype)
    return h, rms_norm_reference(h, weight, eps)
