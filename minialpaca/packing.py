"""Weights arranged for decoding: stacked projections and, on a CPU, the faster memory layout.

Decoding one token multiplies every weight matrix by one vector. Those matrix-vector products are bound by
how fast the weights stream from memory, plus a fixed cost per product that dominates small models. Two
arrangements make them cheaper without changing a single value:

- Stacking. Attention's wq, wk, wv read the same input, and so do the feed-forward's w1 and w3; stacked
  into one matrix each (`wqkv`, `w13`), a layer makes 4 products instead of 7, and a wider matrix streams
  faster. The parameters become views of the stacked matrix: no second copy, and state_dict(), saving and
  training see the same Meta-named parameters as before.
- Layout. CPU BLAS libraries read the two memory layouts of a matrix at different speeds. With MKL, a
  (32000, 512) fp32 matrix, as PyTorch stores it (row-major, (out, in)), streams at about 7 GB/s and
  stored transposed at 13-15 GB/s, while matrices with long rows (in = 4096) run alike, and bf16/fp16
  run 10x slower transposed. So on a CPU each distinct fp32 shape of 1 MiB or more is timed once both
  ways, streaming from memory as decoding does, and the faster kept. Only strides change (saving writes
  contiguous tensors).

generate() calls pack(model) before decoding and unpack(model) after; the model uses `wqkv` and `w13`
only while they are set.
"""
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

# (shape, dtype) -> whether the transposed layout multiplies faster, measured once per process.
_transposed_faster: Dict[Tuple[Tuple[int, int], torch.dtype], bool] = {}
MARGIN = 1.1  # the transposed layout must be this much faster to be chosen (timings are noisy)
SMALL_BYTES = 1 << 20  # below 1 MiB a product's fixed cost outweighs any layout: not timed, kept row-major


@torch.inference_mode(False)  # generate runs in inference mode; parameters must stay trainable tensors
@torch.no_grad()
def pack(model) -> None:
    """Stack each layer's projections (wqkv, w13) and choose every matrix's layout; cheap when repeated."""
    for layer in model.layers:
        attn, ffn = layer.attention, layer.feed_forward
        attn.wqkv = _stack([attn.wq, attn.wk, attn.wv])  # (H*D + 2*H_kv*D, dim)
        ffn.w13 = _stack([ffn.w1, ffn.w3])  # (2 * hidden, dim)
        for linear in (attn.wo, ffn.w2):
            _relayout(linear)
    _relayout(model.output)


def unpack(model) -> None:
    """Back to one product per projection (the parameters stay views of the stacked storage)."""
    for layer in model.layers:
        layer.attention.wqkv = None
        layer.feed_forward.w13 = None


def _stack(linears: List[nn.Linear]) -> Optional[torch.Tensor]:
    """One matrix with the linears' weights one above the other, which become views of it. Weights that
    are already consecutive views of one matrix (packed before) give that matrix back without copying."""
    weights = [linear.weight.data for linear in linears]
    if type(weights[0]) is not torch.Tensor:  # a sharded DTensor: leave it to FSDP
        return None
    first = weights[0]
    transposed = _wants_transposed((sum(w.shape[0] for w in weights), first.shape[1]), first.dtype, first.device)
    stacked = _as_one_matrix(weights)
    if stacked is None or transposed != (stacked.stride(0) == 1):
        # Build it in the chosen layout: transposed is (in, sum of outs) contiguous, seen as its .t().
        stacked = torch.cat([w.t() for w in weights], dim=1).t() if transposed else torch.cat(weights)
        row = 0
        for linear, w in zip(linears, weights):
            linear.weight.data = stacked[row : row + w.shape[0]]
            row += w.shape[0]
    return stacked


def _as_one_matrix(weights: List[torch.Tensor]) -> Optional[torch.Tensor]:
    """The matrix the weights are consecutive row blocks of, as a view, or None if they are not."""
    first = weights[0]
    row = 0
    for w in weights:
        same_storage = w.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        if not (same_storage and w.stride() == first.stride() and w.dtype == first.dtype
                and w.storage_offset() == first.storage_offset() + row * first.stride(0)):
            return None
        row += w.shape[0]
    return first.as_strided((row, first.shape[1]), first.stride(), first.storage_offset())


def _relayout(linear: nn.Linear) -> None:
    w = linear.weight.data
    if type(w) is not torch.Tensor:
        return
    transposed = _wants_transposed(tuple(w.shape), w.dtype, w.device)
    if transposed != (w.stride(0) == 1):
        linear.weight.data = w.t().contiguous().t() if transposed else w.contiguous()


def _wants_transposed(shape: Tuple[int, int], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a matrix-vector product with an (out, in) = shape weight runs faster stored transposed: only
    ever for fp32 on a CPU, and only where measured (once per shape, on scratch matrices)."""
    if device.type != "cpu" or dtype != torch.float32 or shape[0] * shape[1] * 4 < SMALL_BYTES:
        return False
    key = (tuple(shape), dtype)
    if key not in _transposed_faster:
        row_major, transposed = _matvec_seconds(shape, dtype, False), _matvec_seconds(shape, dtype, True)
        _transposed_faster[key] = transposed * MARGIN < row_major
    return _transposed_faster[key]


def _matvec_seconds(shape: Tuple[int, int], dtype: torch.dtype, transposed: bool, reps: int = 3) -> float:
    """Seconds per product as decoding runs it: from memory, not from cache (a model's weights are far larger
    than the CPU's caches, and in-cache timings of small matrices pick the wrong layout). So enough copies
    to fill 64 MiB are multiplied in turn."""
    copies = max(1, (64 << 20) // (shape[0] * shape[1] * torch.finfo(dtype).bits // 8))
    matrices = [torch.full(shape, 0.01, dtype=dtype) for _ in range(copies)]  # values do not matter here
    if transposed:
        matrices = [m.t().contiguous().t() for m in matrices]
    x = torch.full((1, shape[1]), 0.01, dtype=dtype)
    for m in matrices:  # warm up
        F.linear(x, m)
    t0 = time.perf_counter()
    for _ in range(reps):
        for m in matrices:
            F.linear(x, m)
    return (time.perf_counter() - t0) / (reps * copies)
