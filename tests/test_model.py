"""The model against a deliberately plain LLaMA written here, plus cache, packing, presets and config checks.

The reference below shares nothing with minialpaca/model.py except the parameters it reads: explicit loops
over heads and positions, a naive softmax, float64, and RoPE as Meta writes it (complex numbers from
torch.polar multiplying interleaved pairs).
"""
import math

import pytest
import torch

from minialpaca.model import ModelArgs, Transformer
from minialpaca.presets import get_preset


def random_model(seed=0, **overrides) -> Transformer:
    """A small model with weights large enough that attention is far from uniform and every norm matters."""
    args = ModelArgs(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16,
                               norm_eps=1e-6, rope_theta=500.0, max_seq_len=32), **overrides})
    model = Transformer(args)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]) * 1.5)
    return model.eval()


def reference_logits(model: Transformer, tokens: list) -> torch.Tensor:
    """LLaMA's forward pass for one sequence, written as plainly as possible, in float64: (T, vocab)."""
    a = model.args
    p = {k: v.detach().double() for k, v in model.state_dict().items()}
    T, D = len(tokens), a.dim // a.n_heads
    group = a.n_heads // a.n_kv_heads  # query heads per key/value head

    freqs = 1.0 / a.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), freqs)
    freqs_cis = torch.polar(torch.ones_like(angles), angles)  # (T, D/2) complex

    def rope(x):  # x (T, D): rotate the pairs (x[2i], x[2i+1]) as complex numbers
        xc = torch.view_as_complex(x.reshape(T, D // 2, 2).contiguous())
        return torch.view_as_real(xc * freqs_cis).reshape(T, D)

    def rmsnorm(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + a.norm_eps) * w

    h = p["tok_embeddings.weight"][tokens]  # (T, dim)
    for i in range(a.n_layers):
        w = lambda name: p[f"layers.{i}.{name}.weight"]
        x = rmsnorm(h, w("attention_norm"))
        q, k, v = x @ w("attention.wq").T, x @ w("attention.wk").T, x @ w("attention.wv").T
        out = torch.zeros(T, a.n_heads * D, dtype=torch.float64)
        for head in range(a.n_heads):
            kv = head // group
            qh = rope(q[:, head * D:(head + 1) * D])
            kh = rope(k[:, kv * D:(kv + 1) * D])
            vh = v[:, kv * D:(kv + 1) * D]
            for t in range(T):
                scores = [float(qh[t] @ kh[s]) / math.sqrt(D) for s in range(t + 1)]  # causal: s <= t
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                out[t, head * D:(head + 1) * D] = sum(wt / total * vh[s] for s, wt in enumerate(weights))
        h = h + out @ w("attention.wo").T
        x = rmsnorm(h, w("ffn_norm"))
        gate, up = x @ w("feed_forward.w1").T, x @ w("feed_forward.w3").T
        h = h + (gate / (1 + torch.exp(-gate)) * up) @ w("feed_forward.w2").T
    return rmsnorm(h, p["norm.weight"]) @ p["output.weight"].T


@pytest.mark.parametrize("n_kv_heads", [2, 4], ids=["gqa", "mha"])
def test_matches_plain_reference(n_kv_heads):
    model = random_model(n_kv_heads=n_kv_heads)
    tokens = [5, 17, 3, 96, 42, 0, 8, 8, 61]
    with torch.no_grad():
        logits = model(torch.tensor([tokens]))[0]
    expected = reference_logits(model, tokens)
    assert expected.abs().max() > 1.0  # the weights are large enough for the comparison to mean something
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-4)


def test_kv_cache_decoding_equals_full_forward():
    model = random_model(seed=1)
    tokens = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)

        # prefill 4 tokens, then one token per step
        model.setup_cache(batch_size=2, max_seq_len=16)
        steps = [model(tokens[:, :4], start_pos=0)]
        steps += [model(tokens[:, t:t + 1], start_pos=t) for t in range(4, 11)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)

        # chunked prefill: later chunks start at start_pos > 0 and must see the earlier ones
        model.setup_cache(batch_size=2, max_seq_len=16)
        chunks = [model(tokens[:, :3], start_pos=0), model(tokens[:, 3:7], start_pos=3),
                  model(tokens[:, 7:], start_pos=7)]
        torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)
        model.clear_cache()


def test_packed_row_equals_examples_alone():
    model = random_model(seed=2)
    a, b = [3, 14, 15, 92], [65, 35, 89, 79, 32]
    packed = torch.tensor([a + b])
    positions = torch.tensor([list(range(len(a))) + list(range(len(b)))])
    segment_ids = torch.tensor([[0] * len(a) + [1] * len(b)])
    with torch.no_grad():
        logits = model(packed, positions=positions, segment_ids=segment_ids)[0]
        alone_a, alone_b = model(torch.tensor([a]))[0], model(torch.tensor([b]))[0]
    torch.testing.assert_close(logits[:len(a)], alone_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[len(a):], alone_b, rtol=1e-5, atol=1e-5)
    # and without the segments, b would have attended to a: the test can tell the difference
    with torch.no_grad():
        unmasked = model(packed, positions=positions)[0]
    assert not torch.allclose(unmasked[len(a):], alone_b, atol=1e-3)


@pytest.mark.parametrize("name, hidden", [("llama-7b", 11008), ("llama-13b", 13824), ("llama-30b", 17920),
                                          ("llama-65b", 22016), ("llama2-70b", 28672)])
def test_preset_hidden_dims_match_meta(name, hidden):
    assert get_preset(name).hidden_dim == hidden


def test_llama_7b_parameter_count():
    with torch.device("meta"):
        model = Transformer(get_preset("llama-7b"))
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 6_738_415_616  # LLaMA-7B: 32 layers of 202,383,360 plus two 32000 x 4096 tables and a norm
    assert get_preset("llama2-70b").n_kv_heads == 8


@pytest.mark.parametrize("kwargs, message", [
    (dict(dim=100, n_heads=8), "dim 100 is not a multiple of n_heads 8"),
    (dict(dim=64, n_heads=8, n_kv_heads=3), "n_heads 8 is not a multiple of n_kv_heads 3"),
    (dict(dim=36, n_heads=4), "head_dim 9 is odd"),
    (dict(dim=64, n_heads=8, vocab_size=0), "vocab_size must be positive"),
])
def test_model_args_reject_inconsistent_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs(**kwargs)


def test_unknown_kernel_choice_is_refused():
    with pytest.raises(ValueError, match="kernels must be one of"):
        Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=8), kernels="cuda")


def test_blocks_compile_whole_with_dynamic_shapes():
    """What train.py --compile does to each block, with fullgraph=True so a graph break fails (a symbolic
    sequence length once reached SDPA's is_causal and split the graph). aot_eager traces forward and
    backward as inductor would, without compiling C++: seconds instead of a minute."""
    model = random_model()
    block = model.layers[0]
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True, dynamic=True)
    for T in (5, 9):  # two lengths: the second runs the dynamic-shape graph
        x = torch.randn(2, T, model.args.dim, requires_grad=True)
        cos, sin = model.rope_cos[:T][None, :, None], model.rope_sin[:T][None, :, None]
        expected = block(x, cos, sin)
        (expected_grad,) = torch.autograd.grad(expected.sum(), x)
        out = compiled(x, cos, sin)
        (grad,) = torch.autograd.grad(out.sum(), x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_casting_the_model_keeps_the_rotary_tables_fp32(dtype):
    """model.to(bf16) casts every floating buffer; the rotary tables are rebuilt in fp32, as Meta keeps them,
    and the cast model still runs (complex numbers have no bf16) and gives the fp32 model's logits."""
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=256))
    tokens = torch.randint(0, 256, (2, 16))
    expected = model(tokens)
    cos = model.rope_cos.clone()
    model.to(dtype)
    assert model.tok_embeddings.weight.dtype == dtype
    assert model.rope_cos.dtype == model.rope_sin.dtype == torch.float32
    assert torch.equal(model.rope_cos, cos)
    torch.testing.assert_close(model(tokens), expected, atol=0.05, rtol=0.05)
