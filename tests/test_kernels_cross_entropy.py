"""kernels/cross_entropy.py against F.cross_entropy on fp64 logits: the loss and both gradients.

Both row-wise paths are tested: the Triton kernel (in the interpreter on a CPU, tests/conftest.py) and the
PyTorch one. Small odd shapes: 37 tokens in chunks of 16 (the last one short), a vocabulary of 300 that spans
three 128-wide kernel tiles (the last one partial), ignored targets including a whole chunk.
"""
import pytest
import torch
import torch.nn.functional as F

from kernels.cross_entropy import (_linear_cross_entropy, cross_entropy_reference, default_chunk_size,
                                   linear_cross_entropy)
from kernels.runtime import runs_triton

# (atol, rtol) against the fp64 reference, per input dtype: the only tolerances in this file.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3)}
PATHS = {"triton": True, "torch": False}


def make_inputs(N=37, dim=24, V=300, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, dim, generator=gen).to(dtype)
    weight = (torch.randn(V, dim, generator=gen) / dim**0.5).to(dtype)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[3] = -100
    targets[16:32] = -100  # the whole second chunk of 16
    return hidden, weight, targets


def check_against_fp64(loss_fn, hidden, weight, targets, reduction, ignore_index=-100):
    atol, rtol = TOLERANCE[hidden.dtype]
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = loss_fn(hidden, weight, targets)
    loss.backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    logits64 = h64.reshape(-1, h64.shape[-1]) @ w64.T  # (N, V)
    ref = F.cross_entropy(logits64, targets.reshape(-1), ignore_index=ignore_index, reduction=reduction)
    ref.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(weight.grad.double(), w64.grad, atol=atol, rtol=rtol)


def test_interpreter_reaches_the_kernel():
    assert runs_triton(torch.empty(1))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_fp64(path, reduction):
    hidden, weight, targets = make_inputs()
    check_against_fp64(lambda h, w, t: _linear_cross_entropy(h, w, t, -100, reduction, 16, PATHS[path]),
                       hidden, weight, targets, reduction)


@pytest.mark.parametrize("path", PATHS)
def test_fp16(path):
    hidden, weight, targets = make_inputs(dtype=torch.float16)
    check_against_fp64(lambda h, w, t: _linear_cross_entropy(h, w, t, -100, "mean", 16, PATHS[path]),
                       hidden, weight, targets, "mean")


def test_public_function_default_chunks_and_leading_dims():
    """(B, T, dim) hidden and (B, T) targets, the default chunk size, a custom ignore_index."""
    hidden, weight, targets = make_inputs(N=2 * 19)
    targets[targets == -100] = 7
    hidden, targets = hidden.view(2, 19, -1), targets.view(2, 19)
    check_against_fp64(lambda h, w, t: linear_cross_entropy(h, w, t, ignore_index=7), hidden, weight, targets,
                       "mean", ignore_index=7)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_ignored_gives_zero_loss_and_zero_grads(path, reduction):
    hidden, weight, _ = make_inputs()
    targets = torch.full((hidden.shape[0],), -100)
    hidden.requires_grad_(), weight.requires_grad_()
    loss = _linear_cross_entropy(hidden, weight, targets, -100, reduction, 16, PATHS[path])
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


def test_sum_divided_by_a_global_count_is_the_global_mean():
    """Two micro-batches with different target counts: their sums over the total count is the mean of all."""
    hidden, weight, targets = make_inputs()
    a, b = slice(0, 20), slice(20, None)
    total = (targets != -100).sum()
    split = sum(linear_cross_entropy(hidden[s], weight, targets[s], reduction="sum") for s in (a, b)) / total
    torch.testing.assert_close(split, linear_cross_entropy(hidden, weight, targets))


def test_only_the_needed_gradients_and_no_grad_eval():
    hidden, weight, targets = make_inputs()
    weight.requires_grad_()
    loss = linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    assert hidden.grad is None and weight.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets),
                                   cross_entropy_reference(hidden, weight, targets))


def test_second_backward_through_the_same_graph_is_refused():
    # The stored gradients are scaled in place by the first backward; a second must fail, not double them.
    hidden, weight, targets = make_inputs()
    hidden.requires_grad_()
    loss = linear_cross_entropy(hidden, weight, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_default_chunk_size():
    # Liger's rule: chunk logits (chunk, V) about the size of hidden (N, dim), power of two, at least 256.
    assert default_chunk_size(8192, 256, 32000) == 256
    assert default_chunk_size(8192, 4096, 32000) == 1024
    assert default_chunk_size(32768, 4096, 32000) == 4096
    assert default_chunk_size(10, 64, 512) == 256


def test_bad_inputs_are_rejected():
    hidden, weight, targets = make_inputs()
    with pytest.raises(ValueError, match="reduction must be"):
        linear_cross_entropy(hidden, weight, targets, reduction="none")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        linear_cross_entropy(hidden, weight, targets.clamp(min=0) + 300)
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy(hidden, weight[:, :5], targets)
    with pytest.raises(ValueError, match="leading shape"):
        linear_cross_entropy(hidden, weight, targets[:5])
