"""kernels/flash_attention.py against attention written out in fp64: outputs and all three gradients.

On a CPU the Triton kernels run in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1), which picks
small tiles, so these small odd shapes cross several query and key blocks and every loop phase runs.
"""
import math

import pytest
import torch

from kernels.flash_attention import attention_reference, flash_attention, segment_bounds
from kernels.runtime import runs_triton

# (atol, rtol) against the fp64 reference, per input dtype: the only tolerances in this file.
TOLERANCE = {torch.float32: (2e-5, 1e-4), torch.float16: (3e-3, 3e-3)}


def attention_fp64(q, k, v, causal, segment_ids):
    """softmax(q k^T / sqrt(D) + mask) v in fp64 with K/V heads repeated explicitly: the definition."""
    B, T, H, D = q.shape
    group = H // k.shape[2]
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))  # (B, heads, T, D)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, T, T)
    visible = torch.ones(B, 1, T, T, dtype=torch.bool)
    if causal:
        visible = visible & torch.ones(T, T, dtype=torch.bool).tril()
    if segment_ids is not None:
        visible = visible & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return (scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v).transpose(1, 2)  # (B, T, H, D)


def packed_segments(B, T, seed=0):
    """Rows packed with examples of uneven lengths, boundaries falling inside blocks; the last row has
    random ids, so one id appears in several separate runs."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B - 1):
        cuts = sorted(torch.randperm(T - 1, generator=gen)[:3].add(1).tolist())
        row = torch.zeros(T, dtype=torch.long)
        for c in cuts:
            row[c:] += 1
        rows.append(row)
    rows.append(torch.randint(0, 3, (T,), generator=gen))
    return torch.stack(rows)


def make_qkv(B, T, H, H_kv, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=gen).to(dtype)
    k = torch.randn(B, T, H_kv, D, generator=gen).to(dtype)
    v = torch.randn(B, T, H_kv, D, generator=gen).to(dtype)
    return q, k, v


def check_against_fp64(attn, q, k, v, causal, segment_ids):
    """Run attn forward and backward; compare output and dq, dk, dv with the fp64 definition."""
    atol, rtol = TOLERANCE[q.dtype]
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = attn(q, k, v, causal, segment_ids)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    out.backward(grad_out)

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = attention_fp64(q64, k64, v64, causal, segment_ids)
    ref.backward(grad_out.double())
    assert out.shape == ref.shape and out.dtype == q.dtype
    for name, got, want in (("out", out, ref), ("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def test_interpreter_reaches_the_kernels():
    # Without this the tests below would quietly test the SDPA reference twice.
    assert runs_triton(torch.empty(1))


@pytest.mark.parametrize(
    "B, T, H, H_kv, D, causal, segmented",
    [
        (2, 37, 4, 4, 16, True, False),  # multi-head, odd length
        (2, 37, 4, 2, 16, True, True),  # GQA H_kv = H/2, packed rows
        (1, 37, 4, 1, 32, True, True),  # multi-query H_kv = 1
        (2, 45, 2, 1, 8, False, False),  # non-causal, stories260K's head dim
        (2, 45, 4, 2, 16, False, True),  # non-causal within segments
        (1, 32, 2, 2, 16, True, True),  # a block multiple: the tail phases are empty
        (1, 29, 2, 1, 48, True, False),  # head dim not a power of two (stories15M)
        (1, 33, 2, 2, 64, True, True),
        (1, 20, 2, 1, 128, True, False),
        (1, 1, 2, 1, 16, True, False),  # one token
    ],
)
def test_flash_attention_matches_fp64(B, T, H, H_kv, D, causal, segmented):
    q, k, v = make_qkv(B, T, H, H_kv, D, torch.float32)
    segment_ids = packed_segments(B, T) if segmented else None
    check_against_fp64(flash_attention, q, k, v, causal, segment_ids)


@pytest.mark.parametrize("causal", [True, False])
def test_flash_attention_fp16(causal):
    q, k, v = make_qkv(2, 37, 4, 2, 16, torch.float16)
    check_against_fp64(flash_attention, q, k, v, causal, packed_segments(2, 37))


def test_strided_inputs_are_read_in_place():
    """q, k, v as views of one fused projection (B, T, (H + 2 H_kv) * D), and a (B, H, T, D) layout."""
    B, T, H, H_kv, D = 2, 21, 4, 2, 16
    qkv = torch.randn(B, T, (H + 2 * H_kv) * D)
    q = qkv[..., : H * D].view(B, T, H, D)
    k = qkv[..., H * D : (H + H_kv) * D].view(B, T, H_kv, D)
    v = qkv[..., (H + H_kv) * D :].view(B, T, H_kv, D)
    assert not q.is_contiguous()
    check_against_fp64(flash_attention, q, k, v, True, packed_segments(B, T))

    q_t = torch.randn(B, H, T, D).transpose(1, 2)  # (B, T, H, D) with head-major strides
    k_t = torch.randn(B, H_kv, T, D).transpose(1, 2)
    v_t = torch.randn(B, H_kv, T, D).transpose(1, 2)
    check_against_fp64(flash_attention, q_t, k_t, v_t, False, None)


@pytest.mark.parametrize("causal, segmented, H_kv", [(True, True, 2), (True, False, 1), (False, True, 4)])
def test_torch_reference_path(causal, segmented, H_kv):
    """The path taken without Triton: SDPA with the model's masks."""
    q, k, v = make_qkv(2, 23, 4, H_kv, 16, torch.float32)
    segment_ids = packed_segments(2, 23) if segmented else None
    check_against_fp64(attention_reference, q, k, v, causal, segment_ids)


def test_bf16_on_cpu_takes_the_reference():
    # The interpreter misreads bf16; the function must give the reference's answer, not garbage.
    q, k, v = (x.bfloat16() for x in make_qkv(1, 19, 2, 1, 16, torch.float32))
    seg = packed_segments(1, 19)
    torch.testing.assert_close(flash_attention(q, k, v, True, seg), attention_reference(q, k, v, True, seg))


def test_segment_bounds():
    seg = torch.tensor([[5, 5, 2, 2, 2, 5, 7], [0, 0, 0, 0, 1, 1, 1]])
    first, last = segment_bounds(seg)
    assert first.tolist() == [[0, 0, 2, 2, 2, 0, 6], [0, 0, 0, 0, 4, 4, 4]]
    assert last.tolist() == [[5, 5, 4, 4, 4, 5, 6], [3, 3, 3, 3, 6, 6, 6]]


def test_bad_inputs_are_rejected():
    q, k, v = make_qkv(1, 8, 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="not a multiple"):
        flash_attention(q, k[:, :, :1].expand(1, 8, 3, 16), v[:, :, :1].expand(1, 8, 3, 16))
    with pytest.raises(ValueError, match="must both be"):
        flash_attention(q, k[:, :5], v[:, :5])
    with pytest.raises(ValueError, match="segment_ids must be integers"):
        flash_attention(q, k, v, segment_ids=torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="share one of"):
        flash_attention(q, k.double(), v)


def test_expanded_output_gradient():
    """out.sum().backward() hands the backward a dO with all-zero strides; the kernels read it through them."""
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 19, 2, 1, 16, torch.float32))
    flash_attention(q, k, v).sum().backward()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    attention_fp64(q64, k64, v64, True, None).sum().backward()
    atol, rtol = TOLERANCE[torch.float32]
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)
