"""Every checkpoint format in and out, the errors for bad ones, and the real tokenizers.

The writers for Meta's shards and llama2.c's .bin are written here from those projects' layouts, not taken
from checkpoint.py, so a reader that misunderstands a layout fails against them.
"""
import json
import re
import struct
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from minialpaca.checkpoint import (CheckpointError, check_tokenizer, detect_format, find_tokenizer, hf_permute,
                                   hf_unpermute, load_model, save_hf, save_model, save_state_dict,
                                   with_hidden_dim)
from minialpaca.model import ModelArgs, Transformer
from minialpaca.tokenizer import Tokenizer

STORY_PROMPT = [1, 403, 407, 261, 378]  # BOS + "Once upon a time" with tok512.model


def tiny_model(seed=0, **overrides) -> Transformer:
    args = ModelArgs(**{**dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                               norm_eps=1e-5, rope_theta=10000.0, max_seq_len=32), **overrides})
    model = Transformer(args)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # random norms too, so swapping any two tensors changes the logits
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def logits_of(model, tokens=(1, 7, 3, 60, 22, 9)):
    with torch.no_grad():
        return model(torch.tensor([list(tokens)]))


def greedy(model, prompt, steps):
    """The plainest greedy decoding: re-run the whole sequence, append the most likely next token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids


# ---- writers for other projects' formats, from their layouts

META_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def write_meta(model, folder, n_shards):
    """Meta's layout: params.json with vocab_size -1, model-parallel shards with Meta's splits, rope.freqs."""
    folder.mkdir(parents=True, exist_ok=True)
    a = model.args
    shards = [{"rope.freqs": torch.zeros(a.head_dim // 2)} for _ in range(n_shards)]
    for name, t in model.state_dict().items():
        dim = META_SPLIT_DIM.get(name.split(".")[-2])
        for j in range(n_shards):
            shards[j][name] = t.clone() if dim is None else t.chunk(n_shards, dim)[j].clone()
    for j, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{j:02d}.pth")
    params = dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, vocab_size=-1,
                  multiple_of=a.multiple_of, norm_eps=a.norm_eps, rope_theta=a.rope_theta)
    (folder / "params.json").write_text(json.dumps(params))
    return folder


def write_llama2c(model, path, shared):
    """llama2.c's legacy_export: 7-int32 header (negative vocab: separate classifier), then fp32 arrays."""
    a, sd = model.args, model.state_dict()
    with open(path, "wb") as f:
        f.write(struct.pack("7i", a.dim, a.hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads,
                            a.vocab_size if shared else -a.vocab_size, a.max_seq_len))
        put = lambda t: f.write(t.detach().float().contiguous().numpy().tobytes())
        put(sd["tok_embeddings.weight"])
        for name in ["attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
                     "ffn_norm", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]:
            for i in range(a.n_layers):
                put(sd[f"layers.{i}.{name}.weight"])
        put(sd["norm.weight"])
        put(model.rope_cos[:a.max_seq_len])
        put(model.rope_sin[:a.max_seq_len])
        if not shared:
            put(sd["output.weight"])
    return path


def edit_safetensors(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def edit_json(path, edit):
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


# ---- the real stories260K model in three formats

def test_stories260k_formats_agree_and_tell_about_lily(shared_data):
    root = shared_data / "stories260K"
    models = {p: load_model(root / p) for p in ["stories260K.bin", "meta", "hf"]}
    tokens = STORY_PROMPT + [283, 10, 2]
    reference = logits_of(models["stories260K.bin"], tokens)
    for name in ["meta", "hf"]:
        torch.testing.assert_close(logits_of(models[name], tokens), reference, rtol=1e-6, atol=1e-6)

    tokenizer = Tokenizer(root / "tok512.model")
    assert tokenizer.encode("Once upon a time") == STORY_PROMPT
    check_tokenizer(models["meta"], tokenizer)
    assert find_tokenizer(root / "meta") == root / "meta" / "tokenizer.model"
    story = tokenizer.decode(greedy(models["hf"], STORY_PROMPT, 20))
    assert story.startswith("Once upon a time") and "Lily" in story, story


def test_formats_are_detected(shared_data):
    root = shared_data / "stories260K"
    assert detect_format(root / "stories260K.bin") == "llama2c"
    assert detect_format(root / "meta") == "meta"
    assert detect_format(root / "hf") == "hf"
    assert detect_format(root / "hf" / "config.json") == "hf"


# ---- round trips with random tiny models

def test_own_format_round_trip(tmp_path, shared_data):
    model = tiny_model(vocab_size=512)
    tok = shared_data / "stories260K" / "tok512.model"
    save_model(model, tmp_path / "ckpt", tokenizer_path=tok)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model.safetensors", "params.json",
                                                                       "tokenizer.model"]
    assert detect_format(tmp_path / "ckpt") == "own"
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.args == model.args and not loaded.training
    torch.testing.assert_close(logits_of(loaded), logits_of(model), rtol=0, atol=0)
    check_tokenizer(loaded, Tokenizer(find_tokenizer(tmp_path / "ckpt")))

    save_model(model, tmp_path / "ckpt")  # overwriting in place leaves no temporary files behind
    assert len(list((tmp_path / "ckpt").iterdir())) == 3
    half = load_model(tmp_path / "ckpt", dtype=torch.bfloat16, max_seq_len=8)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.args.max_seq_len == 8 and half.rope_cos.shape == (16, model.args.head_dim // 2)


def test_state_dict_from_a_compiled_model_saves_under_plain_names(tmp_path):
    model = tiny_model()
    compiled_names = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    save_state_dict(compiled_names, model.args, tmp_path / "ckpt")
    torch.testing.assert_close(logits_of(load_model(tmp_path / "ckpt")), logits_of(model), rtol=0, atol=0)


def test_meta_two_shards_merge(tmp_path):
    model = tiny_model(seed=1)
    write_meta(model, tmp_path / "meta", n_shards=2)
    loaded = load_model(tmp_path / "meta")
    assert loaded.args.vocab_size == 64  # -1 in params.json: taken from the embedding
    torch.testing.assert_close(logits_of(loaded), logits_of(model), rtol=0, atol=0)
    assert load_model(tmp_path / "meta" / "consolidated.00.pth").args == loaded.args  # a file names its folder


@pytest.mark.parametrize("shared", [True, False], ids=["shared-classifier", "own-classifier"])
def test_llama2c_round_trip(tmp_path, shared):
    model = tiny_model(seed=2, multiple_of=1, n_kv_heads=4)
    if shared:
        with torch.no_grad():
            model.output.weight.copy_(model.tok_embeddings.weight)
    path = write_llama2c(model, tmp_path / "model.bin", shared)
    loaded = load_model(path)
    assert loaded.args.hidden_dim == model.args.hidden_dim and loaded.args.max_seq_len == 32
    torch.testing.assert_close(logits_of(loaded), logits_of(model), rtol=0, atol=0)
    assert loaded.output.weight.data_ptr() != loaded.tok_embeddings.weight.data_ptr()  # two parameters


def test_hf_permutation_is_the_half_split_rotation():
    """Hugging Face's rotate_half RoPE on the permuted rows equals Meta's interleaved RoPE, reordered."""
    n_heads, D, dim, pos = 2, 8, 16, 5
    gen = torch.Generator().manual_seed(3)
    w, x = torch.randn(n_heads * D, dim, generator=gen, dtype=torch.float64), torch.randn(dim, generator=gen,
                                                                                          dtype=torch.float64)
    angles = pos / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2,)
    q = (w @ x).view(n_heads, D // 2, 2)
    meta = torch.view_as_real(torch.view_as_complex(q) * torch.polar(torch.ones_like(angles), angles))
    meta = meta.reshape(n_heads, D)
    qh = (hf_permute(w, n_heads) @ x).view(n_heads, D)
    cos, sin = torch.cat([angles.cos()] * 2), torch.cat([angles.sin()] * 2)
    rotate_half = torch.cat([-qh[:, D // 2:], qh[:, :D // 2]], dim=-1)
    hf = qh * cos + rotate_half * sin
    evens_then_odds = list(range(0, D, 2)) + list(range(1, D, 2))
    torch.testing.assert_close(hf, meta[:, evens_then_odds])
    torch.testing.assert_close(hf_unpermute(hf_permute(w, n_heads), n_heads), w, rtol=0, atol=0)


@pytest.mark.parametrize("dim, hidden", [(4096, 11008), (8192, 28672), (4096, 14336), (3200, 8640), (64, 172),
                                         (128, 40)], ids=["llama-7b", "llama2-70b", "llama3-8b", "open-llama-3b",
                                                          "stories260K", "smaller-than-meta-rule"])
def test_any_hf_intermediate_size_is_reproduced(dim, hidden):
    args = with_hidden_dim(ModelArgs(dim=dim, n_heads=dim // 64 or 1), hidden)
    assert args.hidden_dim == hidden
    assert ModelArgs.from_dict(json.loads(json.dumps(args.to_dict()))).hidden_dim == hidden  # survives params.json


def test_hf_round_trip(tmp_path):
    model = tiny_model(seed=4)
    save_hf(model, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["intermediate_size"] == 96
    assert config["num_key_value_heads"] == 2 and config["head_dim"] == 8 and config["torch_dtype"] == "float32"
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert not torch.equal(weights["model.layers.0.self_attn.q_proj.weight"], model.layers[0].attention.wq.weight)
    loaded = load_model(tmp_path / "hf")
    # HF stores the hidden size, not Meta's recipe for it (multiple_of 16 and 32 both give 96 here)
    assert replace(loaded.args, multiple_of=16) == model.args and loaded.args.hidden_dim == 96
    torch.testing.assert_close(logits_of(loaded), logits_of(model), rtol=0, atol=0)


def test_hf_sharded_with_index_and_nested_rope_theta(tmp_path):
    model = tiny_model(seed=5, rope_theta=500000.0)
    folder = save_hf(model, tmp_path / "hf")
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    for file, keys in halves.items():
        save_file({k: weights[k] for k in keys}, folder / file)
    index = {"metadata": {}, "weight_map": {k: file for file, keys in halves.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    def nest(config):  # transformers 5 keeps rope_theta inside rope_parameters
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": config.pop("rope_theta")}
    edit_json(folder / "config.json", nest)
    loaded = load_model(folder)
    assert loaded.args.rope_theta == 500000.0
    torch.testing.assert_close(logits_of(loaded), logits_of(model), rtol=0, atol=0)


def test_hf_tied_embeddings(tmp_path):
    model = tiny_model(seed=6)
    with torch.no_grad():
        model.output.weight.copy_(model.tok_embeddings.weight)
    folder = save_hf(model, tmp_path / "hf")
    edit_safetensors(folder / "model.safetensors", lambda t: t.pop("lm_head.weight"))
    edit_json(folder / "config.json", lambda c: c.update(tie_word_embeddings=True))
    loaded = load_model(folder)
    torch.testing.assert_close(loaded.output.weight, model.tok_embeddings.weight, rtol=0, atol=0)
    torch.testing.assert_close(logits_of(loaded), logits_of(model), rtol=0, atol=0)


# ---- bad inputs: one clear sentence each, naming the file and the problem

def test_missing_and_unrecognised_paths(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere: no such file or directory"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: directory has no params.json or config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "weights.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="weights.txt: unknown format"):
        load_model(tmp_path / "weights.txt")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "params.json").write_text("{}")
    with pytest.raises(CheckpointError, match="half: has params.json but neither consolidated"):
        load_model(tmp_path / "half")


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("layers.1.ffn_norm.weight"), "missing 1 key: layers.1.ffn_norm.weight"),
    (lambda t: t.update({"layers.0.attention.bias": torch.zeros(3)}), "unexpected 1 key: layers.0.attention.bias"),
    (lambda t: t.update({"layers.0.attention.wk.weight": torch.zeros(32, 32)}),
     "layers.0.attention.wk.weight has shape (32, 32) but the model config needs (16, 32)"),
], ids=["missing", "unexpected", "misshaped"])
def test_bad_keys_are_named(tmp_path, edit, message):
    folder = save_model(tiny_model(), tmp_path / "ckpt")
    edit_safetensors(folder / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_model(folder)


def test_hf_bad_keys_are_named(tmp_path):
    folder = save_hf(tiny_model(), tmp_path / "hf")
    edit_safetensors(folder / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=re.escape("missing 1 key: layers.1.feed_forward.w3.weight")):
        load_model(folder)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("intermediate_size"), "config.json: missing config field: intermediate_size"),
    (lambda c: c.update(head_dim=16), "config.json: head_dim 16 is not hidden_size / num_attention_heads"),
    (lambda c: c.update(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "RoPE scaling 'llama3'"),
    (lambda c: c.update(num_key_value_heads=3), "n_heads 4 is not a multiple of n_kv_heads 3"),
], ids=["missing-field", "head-dim", "rope-scaling", "inconsistent"])
def test_bad_hf_configs(tmp_path, edit, message):
    folder = save_hf(tiny_model(), tmp_path / "hf")
    edit_json(folder / "config.json", edit)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_model(folder)


def test_hf_index_naming_a_missing_file(tmp_path):
    folder = save_hf(tiny_model(), tmp_path / "hf")
    (folder / "model.safetensors").rename(folder / "part1.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "part2.safetensors"}}))
    with pytest.raises(CheckpointError, match="lists part2.safetensors, which does not exist"):
        load_model(folder)


def test_meta_params_missing_a_field(tmp_path):
    folder = write_meta(tiny_model(), tmp_path / "meta", n_shards=1)
    edit_json(folder / "params.json", lambda p: p.pop("n_heads"))
    with pytest.raises(CheckpointError, match="params.json: missing config field: n_heads"):
        load_model(folder)


def _break_second_shard(folder, edit):
    shard = torch.load(folder / "consolidated.01.pth", weights_only=True)
    edit(shard)
    torch.save(shard, folder / "consolidated.01.pth")


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("layers.1.attention.wv.weight"),
     "shards consolidated.00.pth and consolidated.01.pth in .* disagree: 21 vs 20 keys "
     r"\(differing: layers.1.attention.wv.weight\)"),
    (lambda s: s.update({"layers.0.attention.wq.weight": torch.zeros(16, 20)}),
     r"do not concatenate along dim 0 for layers.0.attention.wq.weight: consolidated.00.pth \(16, 32\), "
     r"consolidated.01.pth \(16, 20\)"),
    (lambda s: s["norm.weight"].add_(1.0),
     "shards consolidated.00.pth and consolidated.01.pth in .* disagree on the replicated norm.weight"),
], ids=["key-count", "shapes", "norms"])
def test_meta_shards_that_disagree(tmp_path, edit, message):
    folder = write_meta(tiny_model(), tmp_path / "meta", n_shards=2)
    _break_second_shard(folder, edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(folder)


def test_llama2c_file_of_the_wrong_size(tmp_path):
    path = write_llama2c(tiny_model(), tmp_path / "model.bin", shared=False)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match=r"model.bin: file is \d+ bytes but its header .* needs exactly \d+"):
        load_model(path)


def test_files_that_are_not_what_they_claim(tmp_path):
    folder = write_meta(tiny_model(), tmp_path / "meta", n_shards=1)
    (folder / "consolidated.00.pth").write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="consolidated.00.pth: not a PyTorch checkpoint of plain tensors"):
        load_model(folder)
    folder = save_model(tiny_model(), tmp_path / "own")
    (folder / "model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(CheckpointError, match="model.safetensors: not a safetensors file"):
        load_model(folder)
    torch.save({"x": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: is a PyTorch archive"):
        load_model(tmp_path / "pytorch_model.bin")
    (tmp_path / "short.bin").write_bytes(b"\x00" * 12)
    with pytest.raises(CheckpointError, match="short.bin: 12 bytes is too short for a llama2.c header"):
        load_model(tmp_path / "short.bin")


def test_tokenizer_of_another_vocabulary(shared_data, tmp_path):
    tokenizer = Tokenizer(shared_data / "stories260K" / "tok512.model")
    with pytest.raises(CheckpointError, match="tok512.model has 512 pieces but the model's vocabulary has 64"):
        check_tokenizer(tiny_model(), tokenizer)
    assert find_tokenizer(tmp_path) is None


# ---- the real LLaMA tokenizer

def test_llama_tokenizer(shared_data):
    tok = Tokenizer(shared_data / "llama_tokenizer.model")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    assert tok.encode("Hello world", bos=False) == [15043, 3186]
    ids = tok.encode("Hello world")
    assert ids[0] == 1 and tok.decode(ids) == "Hello world"
    check_tokenizer(ModelArgs(dim=64, n_heads=2, vocab_size=32000), tok)
