"""Decode-time packing (minialpaca/packing.py): the same function, the same parameters, no second copy."""
import pytest
import torch

from minialpaca import packing
from minialpaca.checkpoint import load_model, save_model
from minialpaca.generation import generate
from minialpaca.model import ModelArgs, Transformer

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=32)


def fresh_model(dtype=torch.float32):
    model = Transformer(ARGS).to(dtype).eval()
    model.init_weights(seed=3)
    return model


@pytest.fixture(params=["row-major", "transposed"])
def layout(request, monkeypatch):
    """Run each test with both layouts forced, whatever this machine's timings say."""
    monkeypatch.setattr(packing, "_wants_transposed", lambda shape, dtype, device: request.param == "transposed"
                        and device.type == "cpu" and dtype == torch.float32)
    return request.param


def test_packed_model_is_the_same_function_with_the_same_parameters(layout):
    model = fresh_model()
    tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    before_logits = model(tokens).detach()
    before_state = {k: v.clone() for k, v in model.state_dict().items()}

    packing.pack(model)
    attn, ffn = model.layers[0].attention, model.layers[0].feed_forward
    assert attn.wqkv.shape == (64 + 2 * 32, 64) and ffn.w13.shape == (2 * ARGS.hidden_dim, 64)
    # The parameters are views of the stacked matrices: no second copy of any weight.
    assert attn.wq.weight.data_ptr() == attn.wqkv.data_ptr()
    assert attn.wv.weight.untyped_storage().data_ptr() == attn.wqkv.untyped_storage().data_ptr()
    assert ffn.w3.weight.untyped_storage().data_ptr() == ffn.w13.untyped_storage().data_ptr()
    assert (attn.wqkv.stride(0) == 1) == (layout == "transposed")
    torch.testing.assert_close(model(tokens), before_logits, rtol=1e-5, atol=1e-5)
    state = model.state_dict()
    assert state.keys() == before_state.keys()
    for name, value in before_state.items():
        assert torch.equal(state[name], value), name

    # Packing again reuses the stacked storage instead of copying it.
    pointer = attn.wqkv.data_ptr()
    packing.pack(model)
    assert attn.wqkv.data_ptr() == pointer
    packing.unpack(model)
    assert attn.wqkv is None and ffn.w13 is None
    torch.testing.assert_close(model(tokens), before_logits, rtol=1e-5, atol=1e-5)


def test_after_decoding_the_model_saves_loads_and_trains(layout, tmp_path):
    model = fresh_model()
    prompt = [[1, 5, 9, 13]]
    first = generate(model, prompt, 6)
    assert model.layers[0].attention.wqkv is None  # generate unpacks when done

    save_model(model, tmp_path / "m")
    reloaded = load_model(tmp_path / "m")
    assert generate(reloaded, prompt, 6) == first

    # A training step updates the parameters, which are views of the stacked storage: the next decoding
    # sees the new values.
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    tokens = torch.tensor([[1, 5, 9, 13, 20, 21]])
    model(tokens, labels=tokens).backward()
    opt.step()
    wq_after = model.layers[0].attention.wq.weight.detach().clone()
    packing.pack(model)
    torch.testing.assert_close(model.layers[0].attention.wqkv[:64], wq_after)
    packing.unpack(model)


def test_half_precision_and_gpu_weights_keep_their_layout():
    model = fresh_model(torch.bfloat16)
    packing.pack(model)
    assert model.layers[0].attention.wqkv.stride() == (64, 1)
    assert model.output.weight.is_contiguous()
    packing.unpack(model)


def test_layout_is_measured_once_per_shape(monkeypatch):
    timed = []
    monkeypatch.setattr(packing, "_transposed_faster", {})
    monkeypatch.setattr(packing, "_matvec_seconds", lambda shape, dtype, transposed: timed.append(shape) or 1.0)
    packing.pack(fresh_model())  # every matrix under 1 MiB: nothing to time, all row-major
    assert timed == []
    args = ModelArgs(dim=512, n_layers=2, n_heads=8, vocab_size=600, multiple_of=256, max_seq_len=16)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    packing.pack(model)
    packing.pack(model)
    # wqkv, w13, wo, w2, output: each shape timed in both layouts, once, whatever the number of layers
    assert set(timed) == {(3 * 512, 512), (2 * 1536, 512), (512, 512), (512, 1536), (600, 512)}
    assert len(timed) == 2 * 5
    assert model.output.weight.is_contiguous()  # a tie keeps row-major
