"""The whole model with kernels="triton" against kernels="torch": logits, loss and every parameter gradient
of a training step on packed rows, and KV-cache decoding. Tiny config, fp32, so any difference is a bug in
a kernel or in its wiring, not rounding."""
import collections
import importlib

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.runtime import runs_triton
from minialpaca.model import ModelArgs, Transformer

pytestmark = pytest.mark.skipif(not runs_triton(torch.empty(0)), reason="needs triton (CUDA, or TRITON_INTERPRET=1)")

# The modules by import path: the package attribute `kernels.swiglu` may be the function of that name.
RMSNORM, ROPE, SWIGLU = (importlib.import_module(f"kernels.{name}") for name in ("rmsnorm", "rope", "swiglu"))

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=32)
ATOL, RTOL = 1e-5, 1e-4  # fp32 throughout; the kernels sum in a different order than torch


def sdpa_flash_attention(q, k, v, causal=True, segment_ids=None):
    """Stand-in for kernels.flash_attention, which lives on another branch: the same function through SDPA,
    so these tests exercise exactly rmsnorm, rope and swiglu. Drop it once flash_attention is merged.
    q (B, T, H, D), k, v (B, T, H_kv, D) -> (B, T, H, D)."""
    T = q.shape[1]
    mask = None
    if segment_ids is not None:
        mask = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
        mask = (mask & torch.ones(T, T, dtype=torch.bool).tril()).unsqueeze(1)  # (B, 1, T, T)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         is_causal=causal and mask is None, enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)


@pytest.fixture
def launches(monkeypatch):
    """Counts the Triton launches of the three kernels, so a test can tell they really ran."""
    # Set in the package dict: getattr would first try to import the missing module through the lazy export.
    monkeypatch.setitem(vars(kernels), "flash_attention", sdpa_flash_attention)
    # kernels/__init__.py's lazy export hands out the submodule kernels.swiglu for the name `swiglu` (the
    # module and the function share it); bind the function here until the package exports it eagerly.
    monkeypatch.setattr(kernels, "swiglu", SWIGLU.swiglu)
    counts = collections.Counter()
    for module, name in [(RMSNORM, "_forward"), (RMSNORM, "_backward"), (ROPE, "_rotate"),
                         (SWIGLU, "_forward"), (SWIGLU, "_backward")]:
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
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
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
    assert launches["kernels.rmsnorm._forward"] == n_norms and launches["kernels.rmsnorm._backward"] == n_norms
    assert launches["kernels.rope._rotate"] == 2 * 2 * ARGS.n_layers  # q and k, forward and backward
    assert launches["kernels.swiglu._forward"] == launches["kernels.swiglu._backward"] == ARGS.n_layers


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
