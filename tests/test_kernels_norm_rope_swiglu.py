"""kernels/rmsnorm.py, rope.py and swiglu.py against their PyTorch references: outputs and every gradient.

On a CPU the Triton kernels run in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1), which is
slow per program, so the shapes are small and odd: hidden sizes that are not powers of two (123, 3000),
1, 7 and 199 rows, strided views. bf16 is left out because the interpreter (numpy) has no bfloat16.
"""
import pytest
import torch

import kernels.rmsnorm as rmsnorm_module
from kernels.rmsnorm import MAX_HIDDEN, add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference
from kernels.rope import apply_rope, rope_reference
from kernels.swiglu import swiglu, swiglu_reference
from kernels.runtime import runs_triton
from minialpaca.model import RMSNorm, apply_rotary_emb, rope_tables

pytestmark = pytest.mark.skipif(not runs_triton(torch.empty(0)), reason="needs triton (CUDA, or TRITON_INTERPRET=1)")

# (atol, rtol) of kernel vs reference, per dtype of the inputs: the only tolerances in this file. fp16 allows
# a couple of ulps: the references round intermediates to fp16 that the kernels keep in fp32.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3)}


def close(actual, expected, dtype, what):
    atol, rtol = TOLERANCE[dtype]
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != reference {expected.dtype}"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def with_strides_of(values, template):
    """values laid out in memory like template (a strided view), as a view that passes gradients to values."""
    storage = torch.zeros(template.untyped_storage().nbytes() // template.element_size(), dtype=values.dtype)
    return storage.as_strided(template.shape, template.stride(), template.storage_offset()).copy_(values)


def check(fn, reference, inputs, dtype, constants=()):
    """Run fn and reference forward and backward on the same inputs (strided views keep their strides)
    with one random output gradient; compare every output and the gradient of every input whose index is
    not in constants."""
    gen = torch.Generator().manual_seed(1)
    grads_out = None
    results = []
    for f in (fn, reference):
        leaves = [x if i in constants else x.detach().clone().requires_grad_() for i, x in enumerate(inputs)]
        args = [leaf if i in constants else with_strides_of(leaf, x) for i, (leaf, x) in enumerate(zip(leaves, inputs))]
        outs = f(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        if grads_out is None:
            grads_out = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs]
        torch.autograd.backward(outs, grads_out)
        results.append((outs, [leaf.grad for i, leaf in enumerate(leaves) if i not in constants]))
    (outs, grads), (ref_outs, ref_grads) = results
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        close(o, r, dtype, f"output {i}")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        close(g, r, dtype, f"gradient of input {i}")


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


# ---------------------------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows, hidden", [(1, 123), (7, 123), (199, 123), (1, 3000), (7, 3000), (199, 3000)])
def test_rms_norm_matches_reference(rows, hidden, dtype):
    x = randn(rows, hidden, dtype=dtype, scale=3.0)
    weight = 1 + randn(hidden, seed=1, scale=0.1)  # fp32 weight: output is fp32, as in the model
    check(lambda x, w: rms_norm(x, w, 1e-5), lambda x, w: rms_norm_reference(x, w, 1e-5), [x, weight], dtype)


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.float16, torch.float16), (torch.float32, torch.float16)])
def test_rms_norm_output_dtype_is_the_promotion_of_input_and_weight(x_dtype, w_dtype):
    x = randn(2, 3, 123, dtype=x_dtype)  # leading shape (2, 3)
    weight = (1 + randn(123, seed=1, scale=0.1)).to(w_dtype)
    check(rms_norm, rms_norm_reference, [x, weight], torch.float16)


def test_rms_norm_rounds_to_the_input_dtype_before_the_weight():
    """Meta's order, which a fp16 tolerance alone would not notice: with fp16 x and an fp32 weight the output
    is fp32 and equals the reference to fp32 precision, except where the last bit of rstd tips a rounding."""
    x, weight = randn(7, 3000, dtype=torch.float16, scale=3.0), 1 + randn(3000, seed=1, scale=0.1)
    agree = torch.isclose(rms_norm(x, weight), rms_norm_reference(x, weight), atol=1e-6, rtol=1e-6)
    assert agree.float().mean() > 0.99


def test_rms_norm_strided_inputs():
    base = randn(14, 123)
    every_other_row = base[::2]  # rows apart in memory: read through the row stride
    transposed = randn(123, 7, seed=2).t()  # columns apart: copied to contiguous rows on purpose
    weight = 1 + randn(123, seed=1, scale=0.1)
    for x in (every_other_row, transposed):
        check(rms_norm, rms_norm_reference, [x, weight], torch.float32)


def test_rms_norm_reference_is_the_models_rmsnorm():
    x = randn(3, 5, 64, dtype=torch.float16)
    norm = RMSNorm(64, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + randn(64, seed=1, scale=0.1))
        assert torch.equal(rms_norm_reference(x, norm.weight, 1e-6), norm(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows, hidden", [(7, 123), (1, 3000)])
def test_add_rms_norm_matches_reference(rows, hidden, dtype):
    x, residual = randn(rows, hidden, dtype=dtype), randn(rows, hidden, dtype=dtype, seed=3)
    weight = (1 + randn(hidden, seed=1, scale=0.1)).to(dtype)
    check(add_rms_norm, add_rms_norm_reference, [x, residual, weight], dtype)


def test_add_rms_norm_sum_takes_x_dtype_and_residual_gets_its_own():
    x, residual = randn(2, 5, 123, dtype=torch.float16), randn(2, 5, 123, seed=3)  # fp32 residual stream
    weight = 1 + randn(123, seed=1, scale=0.1)
    h, normed = add_rms_norm(x, residual, weight)
    assert h.dtype == torch.float16 and normed.dtype == torch.float32
    check(add_rms_norm, add_rms_norm_reference, [x, residual, weight], torch.float16)


def test_rms_norm_bad_weight_is_one_clear_error():
    with pytest.raises(ValueError, match=r"weight \(124,\) must be \(hidden,\) = \(123,\)"):
        rms_norm(randn(2, 123), randn(124))
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(randn(2, 123), randn(3, 123), randn(123))


def test_rms_norm_rows_wider_than_a_program_take_the_reference():
    x, weight = randn(2, MAX_HIDDEN + 3), randn(MAX_HIDDEN + 3, seed=1)
    assert torch.equal(rms_norm(x, weight), rms_norm_reference(x, weight))


def test_without_a_triton_device_every_kernel_falls_back_to_its_reference(monkeypatch):
    """CPU tensors outside the interpreter must never reach a Triton launch: they get the reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not runs_triton(torch.empty(1))

    def no_launch(*args, **kwargs):
        raise AssertionError("a Triton kernel was launched for a CPU tensor without the interpreter")

    monkeypatch.setattr(rmsnorm_module, "_forward", no_launch)
    x, weight = randn(3, 123).requires_grad_(), randn(123, seed=1)
    assert torch.equal(rms_norm(x, weight), rms_norm_reference(x, weight))
    h, normed = add_rms_norm(x, x, weight)
    assert torch.equal(normed, add_rms_norm_reference(x, x, weight)[1])
    cos, sin = torch.ones(1, 3, 1, 2), torch.zeros(1, 3, 1, 2)
    q = randn(1, 3, 2, 4)
    assert torch.equal(apply_rope(q, cos, sin), q)
    assert swiglu(x, x).grad_fn.name() == "MulBackward0"


# ---------------------------------------------------------------------------------------------- RoPE
def rope_angles(B, T, D, positions, max_positions=64):
    cos_table, sin_table = rope_tables(D, max_positions, 10000.0)
    return cos_table[positions].unsqueeze(2), sin_table[positions].unsqueeze(2)  # (B or 1, T, 1, D/2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_per_token_positions(dtype):
    """Packed rows: positions restart at each example, and each batch row has its own."""
    B, T, H, D = 2, 7, 3, 10
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4]])
    cos, sin = rope_angles(B, T, D, positions)
    check(apply_rope, rope_reference, [randn(B, T, H, D, dtype=dtype), cos, sin], dtype, constants=(1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_with_cache_offset_shared_by_the_batch(dtype):
    """KV-cache decoding: tokens at positions start_pos.., one table row for every batch row; head_dim 96
    is not a power of two."""
    B, T, H, D, start_pos = 3, 5, 4, 96, 17
    cos, sin = rope_angles(1, T, D, torch.arange(start_pos, start_pos + T)[None])
    check(apply_rope, rope_reference, [randn(B, T, H, D, dtype=dtype), cos, sin], dtype, constants=(1, 2))


def test_rope_strided_inputs():
    B, T, H, D = 2, 5, 3, 16
    cos, sin = rope_angles(B, T, D, torch.arange(T).expand(B, T))
    heads_first = randn(B, H, T, D).transpose(1, 2)  # (B, T, H, D) view: read through its strides
    pairs_apart = randn(B, T, H, 2 * D)[..., ::2]  # last dim strided: copied on purpose
    q_of_fused_qkv = randn(B, T, 3 * H, D)[:, :, :H]  # a slice of a fused projection
    for x in (heads_first, pairs_apart, q_of_fused_qkv):
        check(apply_rope, rope_reference, [x, cos, sin], torch.float32, constants=(1, 2))


def test_rope_reference_is_the_models_rotary_embedding(monkeypatch):
    cos, sin = rope_angles(2, 4, 8, torch.arange(4).expand(2, 4))
    x = randn(2, 4, 3, 8)
    # Eager: Meta's complex multiply, the same arithmetic up to rounding.
    torch.testing.assert_close(apply_rotary_emb(x, cos, sin), rope_reference(x, cos, sin), rtol=1e-6, atol=1e-6)
    x16 = x.half()
    torch.testing.assert_close(apply_rotary_emb(x16, cos, sin), rope_reference(x16, cos, sin), rtol=1e-3, atol=1e-3)
    # Under torch.compile: the real-number form, exactly the reference.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(apply_rotary_emb(x, cos, sin), rope_reference(x, cos, sin))


def test_rope_bad_tables_are_one_clear_error():
    with pytest.raises(ValueError, match=r"cos must be \(B=2 or 1, T=4, 1, D/2=4\)"):
        apply_rope(randn(2, 4, 3, 8), torch.ones(2, 4, 1, 8), torch.zeros(2, 4, 1, 4))


# ---------------------------------------------------------------------------------------------- SwiGLU
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(7, 123), (2, 1, 3000), (1,)])
def test_swiglu_matches_reference(shape, dtype):
    check(swiglu, swiglu_reference, [randn(*shape, dtype=dtype, scale=3.0), randn(*shape, dtype=dtype, seed=1)], dtype)


def test_swiglu_strided_and_mixed_dtype_inputs():
    gate = randn(123, 7, scale=3.0).t()  # made contiguous on purpose: the kernel walks flat memory
    up = randn(7, 246, seed=1)[:, ::2]
    check(swiglu, swiglu_reference, [gate, up], torch.float32)
    check(swiglu, swiglu_reference, [gate.half(), randn(7, 123, seed=1)], torch.float16)  # -> fp32 output


def test_swiglu_shape_mismatch_is_one_clear_error():
    with pytest.raises(ValueError, match=r"gate \(2, 3\) and up \(2, 4\) must have the same shape"):
        swiglu(randn(2, 3), randn(2, 4))


# ---------------------------------------------------------------------------------------------- compile
def test_kernels_under_torch_compile():
    """fullgraph=True: the kernels are opaque custom ops to the compiler, never a graph break. aot_eager
    traces forward and backward with fake tensors as inductor would, without its slow C++ build."""
    def block(x, residual, weight, q, cos, sin):
        h, normed = add_rms_norm(x, residual, weight)
        return rms_norm(h, weight) + swiglu(normed, h), apply_rope(q, cos, sin)

    def reference(x, residual, weight, q, cos, sin):
        h, normed = add_rms_norm_reference(x, residual, weight)
        return rms_norm_reference(h, weight) + swiglu_reference(normed, h), rope_reference(q, cos, sin)

    cos, sin = rope_angles(2, 3, 8, torch.arange(3).expand(2, 3))
    inputs = [randn(2, 3, 40), randn(2, 3, 40, seed=1), 1 + randn(40, seed=2, scale=0.1), randn(2, 3, 4, 8), cos, sin]
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    check(compiled, reference, inputs, torch.float32, constants=(4, 5))
