"""Fused output projection + cross-entropy that never holds the full (N, V) logits.

    loss = linear_cross_entropy(hidden, weight, targets)   # == F.cross_entropy(hidden @ weight.T, targets)

With a LLaMA vocabulary the logits dwarf everything else a training step keeps: 8192 tokens x 32000 words in
fp32 is 1 GiB, and eager autograd keeps that several times over (logits, log-softmax, their gradient).
Here the tokens are processed in chunks (the Liger-Kernel recipe): for each chunk,

    logits = hidden_chunk @ weight.T              (chunk, V), fp32
    loss_i, dlogits = softmax-cross-entropy row by row, dlogits written over the logits in place
    grad_hidden[chunk] = dlogits @ weight;  grad_weight += dlogits.T @ hidden_chunk

so the gradients are computed during the forward, the chunk's logits are freed before the next one, and the
backward only scales the stored gradients by the incoming grad_output. The matmuls are torch's; the row-wise
step is a Triton kernel (CUDA, or the interpreter on CPU under TRITON_INTERPRET=1) or the same arithmetic in
PyTorch (`_rows_torch`); both paths share the chunk loop, so they have the same memory behaviour.

reduction="mean" divides by the number of non-ignored targets in this call; with none at all the loss is 0
and the gradients are zero (not nan). reduction="sum" returns the plain sum, for training that normalizes by a
global count of target tokens across micro-batches and ranks: loss = linear_cross_entropy(..., "sum") / count.
"""
from __future__ import annotations  # Triton reads `tl.constexpr` annotations as strings; lets this file import without triton

import math
from typing import Optional

import torch
import torch.nn.functional as F

from kernels.runtime import runs_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch without triton: the PyTorch row-wise path still works
    triton = tl = None

_jit = triton.jit if triton is not None else (lambda fn: fn)


@_jit
def _ce_rows_kernel(LOGITS, stride_row, TARGETS, LOSS, SCALE, V, ignore_index,
                    BLOCK_V: tl.constexpr, WITH_GRAD: tl.constexpr):
    """One program per row: loss = logsumexp(x) - x[target]; with WITH_GRAD the row is overwritten by
    d(scale * loss)/dx = scale * (softmax(x) - onehot(target)). Ignored rows: loss 0, gradient 0."""
    row = tl.program_id(0).to(tl.int64)
    x_ptr = LOGITS + row * stride_row
    target = tl.load(TARGETS + row)
    if target == ignore_index:
        tl.store(LOSS + row, 0.0)
        if WITH_GRAD:
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                tl.store(x_ptr + cols, tl.zeros((BLOCK_V,), tl.float32), mask=cols < V)
        return

    # Pass 1: the running max and the sum of exp(x - max), rescaled whenever the max grows (online softmax).
    m = float("-inf")
    d = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(d)
    x_target = tl.load(x_ptr + target, mask=(target >= 0) & (target < V), other=0.0).to(tl.float32)
    tl.store(LOSS + row, lse - x_target)

    # Pass 2: the gradient, over the logits it came from.
    if WITH_GRAD:
        scale = tl.load(SCALE)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(x_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            tl.store(x_ptr + cols, g * scale, mask=cols < V)


def _rows_triton(logits, targets, loss_out, scale, ignore_index, with_grad):
    """Row-wise loss (and gradient in place of the fp32 logits (n, V)) with the Triton kernel."""
    n, V = logits.shape
    if logits.is_cuda:
        # Wide tiles to stream a row (Liger uses 32K); 16K is the widest that compiles for sm_90 without
        # register spills in the gradient pass.
        block_v = min(16384, triton.next_power_of_2(V))
        warps = min(32, max(4, block_v // 512))
    else:  # interpreter: small tiles, so test vocabularies span several of them
        block_v, warps = min(128, triton.next_power_of_2(V)), 1
    _ce_rows_kernel[(n,)](logits, logits.stride(0), targets, loss_out, scale, V, ignore_index,
                          BLOCK_V=block_v, WITH_GRAD=with_grad, num_warps=warps)


def _rows_torch(logits, targets, loss_out, scale, ignore_index, with_grad):
    """The same row-wise step in PyTorch: what the kernel computes, and the path without Triton."""
    valid = targets != ignore_index  # (n,)
    safe = torch.where(valid, targets, 0)[:, None]  # (n, 1): any index will do for ignored rows
    lse = torch.logsumexp(logits, dim=1)  # (n,)
    loss_out.copy_(torch.where(valid, lse - logits.gather(1, safe).squeeze(1), 0.0))
    if with_grad:
        logits.sub_(lse[:, None]).exp_()  # softmax, in place: no second (n, V) buffer
        logits.scatter_add_(1, safe, torch.full_like(safe, -1.0, dtype=logits.dtype))
        logits.mul_((valid * scale)[:, None])


def default_chunk_size(n_tokens: int, dim: int, vocab_size: int) -> int:
    """Tokens per chunk: a chunk's logits about as large as `hidden` itself (Liger's rule), so the loss adds
    no more than one more activation-sized buffer, rounded up to a power of two. At least 256 rows: every
    chunk reads the weight twice and reads and writes grad_weight (V, dim) once, and thin matmuls run far
    below peak, so smaller chunks cost more time than their memory is worth (a 256-row chunk of a
    32000-word vocabulary is 31 MiB of fp32 logits; 64-row chunks made a 60M model's loss 1.5x slower)."""
    chunks = math.ceil(vocab_size / dim)
    return max(256, 1 << (math.ceil(n_tokens / chunks) - 1).bit_length())


def _chunked_loss(hidden, weight, targets, ignore_index, reduction, chunk_size, rows, need_grad_hidden,
                  need_grad_weight):
    """The loss (fp32 scalar) and, when asked, grad_hidden (N, dim) and grad_weight (V, dim) of it."""
    N = hidden.shape[0]
    with_grad = need_grad_hidden or need_grad_weight
    if reduction == "mean":
        # Divide by the count of real targets; clamp so no targets at all gives 0 / 1 = 0, not nan.
        scale = 1.0 / (targets != ignore_index).sum().clamp(min=1).to(torch.float32)
    else:
        scale = torch.ones((), dtype=torch.float32, device=hidden.device)
    scale = scale.reshape(1)
    loss_rows = torch.empty(N, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_grad_hidden else None
    # Accumulated in the weight's dtype, as Liger does: an fp32 copy would cost a full (V, dim) buffer.
    grad_weight = torch.zeros_like(weight) if need_grad_weight else None
    for start in range(0, N, chunk_size):
        end = min(start + chunk_size, N)
        h = hidden[start:end]  # (n, dim)
        logits = (h @ weight.T).float()  # (n, V) in fp32, as the model's logits
        rows(logits, targets[start:end], loss_rows[start:end], scale, ignore_index, with_grad)
        if with_grad:
            dlogits = logits.to(hidden.dtype)  # (n, V), no copy in fp32
            if need_grad_hidden:
                torch.mm(dlogits, weight, out=grad_hidden[start:end])
            if need_grad_weight:
                grad_weight.addmm_(dlogits.T, h)
        del logits
    return loss_rows.sum() * scale[0], grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, chunk_size, rows):
        loss, grad_hidden, grad_weight = _chunked_loss(hidden, weight, targets, ignore_index, reduction, chunk_size,
                                                       rows, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # Scaled in place: no second copy of grad_weight. Autograd's version check then refuses a second
        # backward through the same graph (retain_graph) instead of scaling twice.
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None, None


def _linear_cross_entropy(hidden, weight, targets, ignore_index, reduction, chunk_size, use_triton):
    """linear_cross_entropy with the row-wise path chosen by the caller (the tests reach both this way)."""
    rows = _rows_triton if use_triton else _rows_torch
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], hidden.shape[1], weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, reduction, chunk_size, rows)
    loss, _, _ = _chunked_loss(hidden, weight, targets, ignore_index, reduction, chunk_size, rows, False, False)
    return loss


def _check(hidden, weight, targets, reduction, chunk_size):
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: weight must be (V, dim={hidden.shape[-1]}) to match hidden "
                         f"{tuple(hidden.shape)}; got {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: targets {tuple(targets.shape)} must be hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"linear_cross_entropy: targets must be integer class ids, got {targets.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"linear_cross_entropy: hidden, weight, targets on different devices "
                         f"({hidden.device}, {weight.device}, {targets.device})")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be positive, got {chunk_size}")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean", chunk_size: Optional[int] = None,
                         use_triton: Optional[bool] = None) -> torch.Tensor:
    """F.cross_entropy(hidden @ weight.T, targets, ignore_index=ignore_index, reduction=reduction), computed in
    chunks of `chunk_size` tokens (default: default_chunk_size) without the full logits.

    hidden (..., dim), weight (V, dim), targets (...) integer ids -> fp32 scalar. reduction "mean": over the
    targets that are not ignore_index (0 with zero gradients when all are ignored); "sum": the plain sum, for
    dividing by a global target count. Targets outside [0, V) are rejected on CPU; on CUDA they are not
    checked (that would synchronize every step) and give a wrong loss. Backward may run once per forward.
    use_triton: None lets the device decide (kernels.runtime.runs_triton); True/False picks the row kernel.
    """
    _check(hidden, weight, targets, reduction, chunk_size)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])  # (N, dim)
    targets1d = targets.reshape(-1)  # (N,)
    if not targets1d.is_cuda and targets1d.numel():
        bad = (targets1d != ignore_index) & ((targets1d < 0) | (targets1d >= weight.shape[0]))
        if bad.any():
            raise ValueError(f"linear_cross_entropy: target {targets1d[bad][0].item()} is outside the vocabulary "
                             f"[0, {weight.shape[0]}) and is not ignore_index={ignore_index}")
    if use_triton is None:  # the device decides (the model passes its own kernels= choice instead)
        use_triton = runs_triton(hidden)
    use_triton = use_triton and not (hidden.device.type == "cpu" and hidden.dtype == torch.bfloat16)
    return _linear_cross_entropy(hidden2d, weight, targets1d, ignore_index, reduction, chunk_size, use_triton)


def cross_entropy_reference(hidden, weight, targets, ignore_index: int = -100, reduction: str = "mean"):
    """What linear_cross_entropy computes, holding the full logits: fp32 logits, then F.cross_entropy; an
    all-ignored mean is 0 rather than F.cross_entropy's nan."""
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.T).float()  # (N, V)
    targets = targets.reshape(-1)
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    if reduction == "mean":
        loss = loss / (targets != ignore_index).sum().clamp(min=1)
    return loss
