"""The whole model with kernels="triton" against kernels="torch": logits, loss and every parameter gradient
of a training step on packed rows, and KV-cache decoding. Tiny config, fp32, so any difference is a bug in
a kernel or in its wiring, not rounding."""
import collections
import importlib

import pytest
import torch

from kernels.runtime import runs_triton
from minialpaca.model import ModelArgs, Transformer

pytestmark = pytest.mark.skipif(not runs_triton(torch.empty(0)), reason="needs triton (CUDA, or TRITON_INTERPRET=1)")

# The modules by import path: the package attribute `kernels.swiglu` may be the function of that name.
RMSNORM, ROPE, SWIGLU, ATTENTION, CROSS_ENTROPY = (
    importlib.import_module(f"kernels.{name}") for name in ("rmsnorm", "rope", "swiglu", "flash_attention", "cross_entropy"))

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=32)
ATOL, RTOL = 1e-5, 1e-4  # fp32 throughout; the kernels sum in a different order than torch


@pytest.fixture
def launches(monkeypatch):
    """Counts the Triton launches of the kernels, so a test can tell they really ran."""
    counts = collections.Counter()
    for module, name in [(RMSNORM, "_forward"), (RMSNORM, "_backward"), (ROPE, "_rotate"),
                         (SWIGLU, "_forward"), (SWIGLU, "_backward"), (ATTENTION, "_forward"),
                         (ATTENTION, "_backward"), (CROSS_ENTROPY, "_rows_triton")]:
        def counted(*args, _launch=getattr(module, name), _key=f"{module.__name__}.{name}"):
            counts[_key] += 1
            return _launch(*args)
        monkeypatch.setattr(module, name, counted)
    return counts


def model_pair():
    torch_model = Transformer(ARGS, kernels="torch")
    triton_model = Transformer(ARGS, kernels="triton")
    triton_model.load_state_dict(torch_model.state_dict())
    return torch_model, triton_model


def test_training_step_matches_torch(launches):
    torch_model, triton_model = model_pair()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 9), generator=gen)
    # Packed rows: two examples in row 0, three in row 1; positions restart at each.
    segment_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 2, 2, 2, 2]])
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4], [0, 1, 0, 1, 2, 0, 1, 2, 3]])
    results = []
    for model in (torch_model, triton_model):
        logits = model(tokens, positions=positions, segment_ids=segment_ids)  # (B, T, vocab)
        # The training loss as train.py computes it: summed over targets by the fused linear cross-entropy.
        loss = model(tokens, positions=positions, segment_ids=segment_ids, labels=tokens)
        loss.backward()
        results.append((logits, loss, {n: p.grad for n, p in model.named_parameters()}))
    (logits, loss, grads), (t_logits, t_loss, t_grads) = results

    torch.testing.assert_close(t_logits, logits, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(t_loss, loss, atol=ATOL, rtol=RTOL)
    assert t_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(t_grads[name], grads[name], atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")
    # Every norm but the final one runs through add_rms_norm's fused kernel or rms_norm's; the final norm too.
    n_norms = 2 * ARGS.n_layers + 1
    assert launches["kernels.rmsnorm._forward"] == 2 * n_norms  # logits pass, loss pass
    assert launches["kernels.rmsnorm._backward"] == n_norms
    assert launches["kernels.rope._rotate"] == 3 * 2 * ARGS.n_layers  # q and k: two forwards, one backward
    assert launches["kernels.swiglu._forward"] == 2 * ARGS.n_layers  # logits pass, loss pass
    assert launches["kernels.swiglu._backward"] == ARGS.n_layers
    assert launches["kernels.flash_attention._forward"] == 2 * ARGS.n_layers
    assert launches["kernels.flash_attention._backward"] == ARGS.n_layers
    assert launches["kernels.cross_entropy._rows_triton"] >= 1


@torch.no_grad()
def test_cached_decoding_matches_torch(launches):
    """Prefill, then tokens one at a time: rope at a cache offset, attention over the cache (SDPA)."""
    torch_model, triton_model = model_pair()
    tokens = torch.randint(0, ARGS.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    for model in (torch_model, triton_model):
        model.setup_cache(batch_size=2, max_seq_len=16)
    steps = [(0, tokens[:, :5]), (5, tokens[:, 5:6]), (6, tokens[:, 6:7])]
    for start_pos, step in steps:
        expected = torch_model(step, start_pos=start_pos)
        torch.testing.assert_close(triton_model(step, start_pos=start_pos), expected, atol=ATOL, rtol=RTOL)
    assert launches["kernels.rope._rotate"] == 2 * ARGS.n_layers * len(steps)


def test_generate_with_packed_projections_matches_torch(launches):
    """generate stacks wq/wk/wv and w1/w3 (packing.py): the kernels read slices of one matmul output."""
    from minialpaca.generation import generate

    torch_model, triton_model = model_pair()
    prompts = [[1, 5, 9, 13, 2, 40], [1, 7]]  # unequal lengths: left padding, segment masks
    assert generate(triton_model, prompts, 5) == generate(torch_model, prompts, 5)
    assert launches["kernels.swiglu._forward"] > 0 and launches["kernels.rope._rotate"] > 0
