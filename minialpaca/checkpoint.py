"""Weights in and out: Meta's checkpoints, Hugging Face's, llama2.c's `.bin`, and our own.

Reading is two steps. A reader per format (`read_meta`, `read_hf`, `read_llama2c`, `read_own`) turns files
into ModelArgs and a dict of tensors under Meta's names, checking every name and shape against the model
*before* it loads anything heavy. Then `load_model` builds the model on the meta device (no memory) and
assigns those tensors to it. Tensors come from memory maps (torch.load(mmap=True), safetensors, np.memmap)
and are cast one at a time, so loading a 7B model needs about one copy of it, not two.

Writing: `save_state_dict` writes our own format (params.json + model.safetensors) or Hugging Face's
(config.json + model.safetensors), each file atomically; `save_model` and `save_hf` call it on a model.

The only conversion between formats that is more than a renaming: Hugging Face rotates the two *halves* of
each head (x[i], x[i + D/2]) where Meta rotates interleaved pairs (x[2i], x[2i+1]), so its conversion script
permutes the rows of wq and wk. `hf_permute` is that permutation; `hf_unpermute` undoes it.

Nothing here downloads anything: users bring their own weights.
"""
import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from .model import ModelArgs, Transformer


class CheckpointError(ValueError):
    """A checkpoint or tokenizer that cannot be used, with a sentence saying which file and why."""


StateDict = Dict[str, torch.Tensor]

# ---------------------------------------------------------------------------------------------- names, shapes

def expected_shapes(args: ModelArgs) -> Dict[str, Tuple[int, ...]]:
    """Every parameter name of Transformer(args) with its shape, computed without allocating anything."""
    with torch.device("meta"):
        model = Transformer(args)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_names_and_shapes(args: ModelArgs, shapes: Dict[str, Tuple[int, ...]], where) -> None:
    """Raise one clear CheckpointError unless `shapes` has exactly the model's names, each with its shape."""
    expected = expected_shapes(args)
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    if missing:
        raise CheckpointError(f"{where}: missing {_plural(len(missing), 'key')}: {_names(missing)}")
    if unexpected:
        raise CheckpointError(f"{where}: unexpected {_plural(len(unexpected), 'key')}: {_names(unexpected)}")
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise CheckpointError(
                f"{where}: {name} has shape {tuple(shapes[name])} but the model config needs {shape}"
            )


def _names(keys, limit=6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _plural(n, word) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _cast(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    # No copy when the dtype already matches: an mmap-backed tensor stays mmap-backed.
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _torch_load(path: Path) -> StateDict:
    # mmap: tensors stay on disk until used; weights_only: a checkpoint is data and may not run code.
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a PyTorch checkpoint of plain tensors ({reason})") from None


def _safe_open(path: Path):
    from safetensors import safe_open
    try:
        return safe_open(path, framework="pt")
    except Exception as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from None


def _require(config: dict, fields, path: Path) -> None:
    missing = [f for f in fields if f not in config]
    if missing:
        raise CheckpointError(f"{path}: missing config field{'s' * (len(missing) > 1)}: {', '.join(missing)}")


def _known_fields(params: dict) -> dict:
    """The entries of a params.json that are ModelArgs fields (Meta's also hold others)."""
    return {k: v for k, v in params.items() if k in ModelArgs.__dataclass_fields__}


def _model_args(path: Path, **kwargs) -> ModelArgs:
    try:
        return ModelArgs(**kwargs)
    except ValueError as e:  # ModelArgs explains the inconsistency; say which file it came from
        raise CheckpointError(f"{path}: {e}") from None

# ---------------------------------------------------------------------------------------------- detection

def detect_format(path) -> str:
    """"meta", "hf", "llama2c" or "own" for a checkpoint directory or file; a clear error otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file or directory")
    if path.is_file():
        if path.suffix == ".bin":
            return "llama2c"
        if path.suffix in (".pth", ".safetensors", ".json"):
            return detect_format(path.parent)  # a file of a checkpoint directory: the directory decides
        raise CheckpointError(
            f"checkpoint {path}: unknown format (expected a llama2.c .bin file or a checkpoint directory)"
        )
    if (path / "params.json").is_file():
        if list(path.glob("consolidated.*.pth")):
            return "meta"
        if (path / "model.safetensors").is_file():
            return "own"
        raise CheckpointError(
            f"checkpoint {path}: has params.json but neither consolidated.*.pth (Meta) nor model.safetensors"
        )
    if (path / "config.json").is_file():
        return "hf"
    raise CheckpointError(f"checkpoint {path}: directory has no params.json or config.json")

# ---------------------------------------------------------------------------------------------- Meta

# Meta's model-parallel layers split these along dim 0 (ColumnParallelLinear) or dim 1 (RowParallelLinear,
# and ParallelEmbedding, which splits the embedding dimension); everything else (the norms) is replicated.
_META_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def _meta_split_dim(name: str) -> Optional[int]:
    return _META_SPLIT_DIM.get(name.split(".")[-2])


def read_meta(path, dtype=None) -> Tuple[ModelArgs, StateDict]:
    """Meta's params.json + consolidated.NN.pth, merging the model-parallel shards into one state dict."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    config_path = path / "params.json"
    params = _read_json(config_path)
    _require(params, ["dim", "n_layers", "n_heads"], config_path)
    if params.get("use_scaled_rope"):
        raise CheckpointError(f"{config_path}: use_scaled_rope (Llama 3.1's RoPE scaling) is not supported")
    files = sorted(path.glob("consolidated.*.pth"))  # zero-padded: 00, 01, ..., in model-parallel rank order
    if not files:
        raise CheckpointError(f"Meta checkpoint {path}: no consolidated.*.pth files")
    shards = [_torch_load(f) for f in files]
    for shard in shards:
        shard.pop("rope.freqs", None)  # a precomputed rotary table in LLaMA-1 files; we derive ours

    # Shards must hold the same names before anything else can be compared.
    for f, shard in zip(files[1:], shards[1:]):
        if shard.keys() != shards[0].keys():
            diff = sorted(shard.keys() ^ shards[0].keys())
            raise CheckpointError(
                f"shards {files[0].name} and {f.name} in {path} disagree: {len(shards[0])} vs {len(shard)} keys "
                f"(differing: {_names(diff)})"
            )
    if "tok_embeddings.weight" not in shards[0]:
        raise CheckpointError(f"{files[0]}: missing key: tok_embeddings.weight")
    vocab_size = params.get("vocab_size", -1)
    if vocab_size in (-1, None):  # Meta writes -1: "as many as the tokenizer has"; the embedding knows
        vocab_size = shards[0]["tok_embeddings.weight"].shape[0]
    args = _model_args(config_path, **{**_known_fields(params), "vocab_size": vocab_size})

    # Shapes of the merged tensors, checked before concatenating anything.
    merged_shapes = {}
    for name, t in shards[0].items():
        dim = _meta_split_dim(name)
        shapes = [tuple(s[name].shape) for s in shards]
        if dim is None or len(shards) == 1:
            merged_shapes[name] = shapes[0]
            continue
        rest = {s[:dim] + s[dim + 1:] for s in shapes}
        if len(rest) > 1 or len(shapes[0]) <= dim:
            listing = ", ".join(f"{f.name} {s}" for f, s in zip(files, shapes))
            raise CheckpointError(f"shards in {path} do not concatenate along dim {dim} for {name}: {listing}")
        merged_shapes[name] = shapes[0][:dim] + (sum(s[dim] for s in shapes),) + shapes[0][dim + 1:]
    check_names_and_shapes(args, merged_shapes, f"Meta checkpoint {path}")

    state_dict = {}
    for name in list(shards[0]):
        dim = _meta_split_dim(name)
        parts = [s.pop(name) for s in shards]  # pop: each merged tensor frees its shards' references
        if dim is None:
            for f, p in zip(files[1:], parts[1:]):
                if not torch.equal(p, parts[0]):
                    raise CheckpointError(
                        f"shards {files[0].name} and {f.name} in {path} disagree on the replicated {name}"
                    )
            state_dict[name] = _cast(parts[0], dtype)
        else:
            state_dict[name] = _cast(parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim), dtype)
    return args, state_dict


# ---------------------------------------------------------------------------------------------- Hugging Face

_HF_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "output.weight"}
_HF_LAYER = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
             "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
             "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
             "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
_META_TOP = {v: k for k, v in _HF_TOP.items()}
_META_LAYER = {v: k for k, v in _HF_LAYER.items()}
_LAYER_KEY = re.compile(r"^(model\.)?layers\.(\d+)\.(.+)\.weight$")


def hf_to_meta_name(name: str) -> str:
    """Hugging Face's parameter name -> Meta's; unknown names come back unchanged (and are then reported)."""
    if name in _HF_TOP:
        return _HF_TOP[name]
    m = _LAYER_KEY.match(name)
    if m and m.group(1) and m.group(3) in _HF_LAYER:
        return f"layers.{m.group(2)}.{_HF_LAYER[m.group(3)]}.weight"
    return name


def meta_to_hf_name(name: str) -> str:
    if name in _META_TOP:
        return _META_TOP[name]
    m = _LAYER_KEY.match(name)
    if m is None or m.group(3) not in _META_LAYER:
        raise CheckpointError(f"no Hugging Face name for parameter {name}")
    return f"model.layers.{m.group(2)}.{_META_LAYER[m.group(3)]}.weight"


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved-pair rows of wq/wk -> Hugging Face's half-split rows, per head (its conversion script)."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def hf_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of hf_permute: Hugging Face's rows back to Meta's."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def with_hidden_dim(args: ModelArgs, hidden_dim: int) -> ModelArgs:
    """`args` with multiple_of and ffn_dim_multiplier chosen so that Meta's rule gives exactly `hidden_dim`.

    Hugging Face and llama2.c store the size itself; ModelArgs stores Meta's recipe for it. Try the recipes
    Meta used (no multiplier, or 1.3 as in Llama-2 70B and Llama 3, with a power-of-two multiple), preferring
    LLaMA's 256, then the largest multiple. Any other size is reached by rounding up to a multiple of itself,
    after scaling 8/3 * dim down to it when it is smaller.
    """
    multiples = [256] + [1 << shift for shift in range(12, -1, -1)]
    for multiplier in (None, 1.3):
        for multiple_of in multiples:
            candidate = replace(args, multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
            if candidate.hidden_dim == hidden_dim:
                return candidate
    meta_hidden = replace(args, multiple_of=1, ffn_dim_multiplier=None).hidden_dim
    multiplier = None if meta_hidden <= hidden_dim else hidden_dim / meta_hidden
    return replace(args, multiple_of=hidden_dim, ffn_dim_multiplier=multiplier)


def read_hf(path, dtype=None) -> Tuple[ModelArgs, StateDict]:
    """A Hugging Face LlamaForCausalLM directory: config.json and model.safetensors, or shards listed in
    model.safetensors.index.json. Renamed to Meta's names, with wq/wk rows un-permuted."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    config_path = path / "config.json"
    config = _read_json(config_path)
    model_type = config.get("model_type", "llama")
    if model_type != "llama":
        raise CheckpointError(f"{config_path}: model_type {model_type!r} is not supported, only 'llama'")
    _require(config, ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "vocab_size", "rms_norm_eps"], config_path)
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise CheckpointError(f"{config_path}: {flag} is true, but LLaMA has no biases")
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{config_path}: hidden_act {config['hidden_act']!r} is not supported, only 'silu'")
    # Newer configs nest rope_theta in rope_parameters; both name a scaling type, which must be plain RoPE.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"{config_path}: RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not "
                              f"supported, only plain RoPE")
    rope_theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))  # 10000: HF's default, and LLaMA's
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    n_kv_heads = config.get("num_key_value_heads") or n_heads
    if config.get("head_dim") not in (None, dim // n_heads) or dim % n_heads:
        raise CheckpointError(f"{config_path}: head_dim {config.get('head_dim')} is not hidden_size / "
                              f"num_attention_heads = {dim} / {n_heads}; the model derives it that way")
    args = _model_args(
        config_path, dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads, n_kv_heads=n_kv_heads,
        vocab_size=config["vocab_size"], norm_eps=config["rms_norm_eps"], rope_theta=float(rope_theta),
        max_seq_len=config.get("max_position_embeddings", 2048),
    )
    args = with_hidden_dim(args, config["intermediate_size"])
    tied = bool(config.get("tie_word_embeddings", False))

    # Which file holds which tensor.
    index_path = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        with _safe_open(path / "model.safetensors") as f:
            file_of = {name: path / "model.safetensors" for name in f.keys()}
    elif index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: has no weight_map")
        file_of = {name: path / file for name, file in weight_map.items()}
        for file in sorted(set(file_of.values())):
            if not file.is_file():
                raise CheckpointError(f"{index_path}: lists {file.name}, which does not exist")
    else:
        raise CheckpointError(f"Hugging Face checkpoint {path}: no model.safetensors or model.safetensors.index.json"
                              f" (pickled pytorch_model.bin files are not loaded)")
    # Older conversions also saved the rotary table (a buffer); tied models may still carry lm_head.
    file_of = {n: f for n, f in file_of.items()
               if not n.endswith("rotary_emb.inv_freq") and not (tied and n == "lm_head.weight")}

    shapes = {}
    for file in sorted(set(file_of.values())):
        with _safe_open(file) as f:
            for name in f.keys():
                if name in file_of and file_of[name] == file:
                    shapes[hf_to_meta_name(name)] = tuple(f.get_slice(name).get_shape())
        missing_here = [n for n, fl in file_of.items() if fl == file and hf_to_meta_name(n) not in shapes]
        if missing_here:
            raise CheckpointError(f"{file}: missing {_plural(len(missing_here), 'key')} that the index lists: "
                                  f"{_names(missing_here)}")
    if tied:
        shapes["output.weight"] = shapes.get("tok_embeddings.weight")
    check_names_and_shapes(args, shapes, f"Hugging Face checkpoint {path}")

    state_dict = {}
    for file in sorted(set(file_of.values())):
        with _safe_open(file) as f:
            for hf_name, fl in file_of.items():
                if fl != file:
                    continue
                name, t = hf_to_meta_name(hf_name), f.get_tensor(hf_name)
                if name.endswith("attention.wq.weight"):
                    t = hf_unpermute(t, args.n_heads)
                elif name.endswith("attention.wk.weight"):
                    t = hf_unpermute(t, args.n_kv_heads)
                state_dict[name] = _cast(t, dtype)
    if tied:
        # A copy, not the same tensor: our model has two parameters, and two Parameters sharing one
        # storage would each be stepped by an optimizer.
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"].clone()
    return args, state_dict

# ---------------------------------------------------------------------------------------------- llama2.c

_LLAMA2C_HEADER = 7  # int32: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len


def read_llama2c(path, dtype=None) -> Tuple[ModelArgs, StateDict]:
    """llama2.c's legacy (version 0) .bin: a 7-int32 header, then fp32 arrays in the order its export
    writes them. A negative vocab_size means the classifier is stored separately (not shared)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":  # a zip archive: torch.save's format, which may hold pickled code
            raise CheckpointError(f"{path}: is a PyTorch archive (like Hugging Face's pytorch_model.bin), not a "
                                  f"llama2.c file; only safetensors are read for Hugging Face checkpoints")
    if size < 4 * _LLAMA2C_HEADER:
        raise CheckpointError(f"{path}: {size} bytes is too short for a llama2.c header")
    header = tuple(int(x) for x in np.fromfile(path, dtype="<i4", count=_LLAMA2C_HEADER))
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = header
    shared = vocab > 0
    vocab = abs(vocab)
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len) <= 0 or dim % n_heads:
        raise CheckpointError(f"{path}: not a llama2.c version-0 file (its header {header} is not a model config)")
    head_dim, kv_dim = dim // n_heads, dim // n_heads * n_kv_heads
    # (name, shape of one layer's array or of the whole), in file order
    per_layer = [("attention_norm", (dim,)), ("attention.wq", (dim, dim)), ("attention.wk", (kv_dim, dim)),
                 ("attention.wv", (kv_dim, dim)), ("attention.wo", (dim, dim)), ("ffn_norm", (dim,)),
                 ("feed_forward.w1", (hidden, dim)), ("feed_forward.w2", (dim, hidden)),
                 ("feed_forward.w3", (hidden, dim))]
    n_floats = (vocab * dim + n_layers * sum(int(np.prod(s)) for _, s in per_layer) + dim
                + seq_len * head_dim  # freq_cis real and imag, each (seq_len, head_dim / 2)
                + (0 if shared else vocab * dim))
    expected = 4 * (_LLAMA2C_HEADER + n_floats)
    if size != expected:
        raise CheckpointError(f"{path}: file is {size} bytes but its header (dim {dim}, hidden {hidden}, "
                              f"{n_layers} layers, vocab {vocab}, seq_len {seq_len}) needs exactly {expected}")
    args = _model_args(path, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                       vocab_size=vocab, max_seq_len=seq_len)
    args = with_hidden_dim(args, hidden)

    # mode "c": copy-on-write, so tensors may be written in memory while the file stays untouched.
    data = np.memmap(path, dtype="<f4", mode="c", offset=4 * _LLAMA2C_HEADER, shape=(n_floats,))
    offset = 0

    def take(shape):
        nonlocal offset
        n = int(np.prod(shape))
        t = torch.from_numpy(data[offset:offset + n].reshape(shape))
        offset += n
        return t

    state_dict = {"tok_embeddings.weight": _cast(take((vocab, dim)), dtype)}
    for name, shape in per_layer:
        stacked = take((n_layers, *shape))  # the export writes each array for every layer in turn
        for i in range(n_layers):
            state_dict[f"layers.{i}.{name}.weight"] = _cast(stacked[i], dtype)
    state_dict["norm.weight"] = _cast(take((dim,)), dtype)
    take((seq_len, head_dim))  # the rotary table; ours is recomputed from rope_theta
    state_dict["output.weight"] = _cast(take((vocab, dim)), dtype) if not shared else \
        state_dict["tok_embeddings.weight"].clone()  # a copy: two Parameters must not share storage
    check_names_and_shapes(args, {k: tuple(v.shape) for k, v in state_dict.items()}, f"llama2.c file {path}")
    return args, state_dict

# ---------------------------------------------------------------------------------------------- own format

def read_own(path, dtype=None) -> Tuple[ModelArgs, StateDict]:
    """Our format: params.json (the ModelArgs fields) and model.safetensors under Meta's names."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    config_path, weights_path = path / "params.json", path / "model.safetensors"
    params = _read_json(config_path)
    _require(params, ["dim", "n_layers", "n_heads", "vocab_size"], config_path)
    args = _model_args(config_path, **_known_fields(params))
    with _safe_open(weights_path) as f:
        check_names_and_shapes(args, {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}, weights_path)
        state_dict = {name: _cast(f.get_tensor(name), dtype) for name in f.keys()}
    return args, state_dict


READERS: Dict[str, Callable[..., Tuple[ModelArgs, StateDict]]] = {
    "meta": read_meta, "hf": read_hf, "llama2c": read_llama2c, "own": read_own,
}

# ---------------------------------------------------------------------------------------------- building

def read_checkpoint(path, dtype=None) -> Tuple[ModelArgs, StateDict]:
    """(ModelArgs, state dict under Meta's names) of the checkpoint at `path`, whatever its format."""
    return READERS[detect_format(path)](path, dtype=dtype)


def load_model(path, device="cpu", dtype=torch.float32, kernels="torch", max_seq_len=None) -> Transformer:
    """The model stored at `path` (any supported format, detected), in eval mode on `device` in `dtype`
    (None keeps the stored dtype). max_seq_len overrides the checkpoint's context length (rotary tables and
    cache limit)."""
    args, state_dict = read_checkpoint(path, dtype=dtype)
    if max_seq_len is not None:
        args = replace(args, max_seq_len=max_seq_len)
    return build_model(args, state_dict, device=device, kernels=kernels)


def build_model(args: ModelArgs, state_dict: StateDict, device="cpu", kernels="torch") -> Transformer:
    """Transformer(args) holding `state_dict`'s tensors, without ever allocating random weights: the model is
    built on the meta device and the tensors are assigned to it, moved to `device` one at a time."""
    with torch.device("meta"):
        model = Transformer(args, kernels=kernels)
    for name in list(state_dict):
        state_dict[name] = state_dict[name].to(device)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.reset_rope(torch.device(device))
    return model.eval()

# ---------------------------------------------------------------------------------------------- tokenizer

def find_tokenizer(checkpoint_path) -> Optional[Path]:
    """The tokenizer.model beside a checkpoint, or in its parent directory (Meta's downloads keep one
    tokenizer.model next to the llama-2-7b/, llama-2-13b/, ... directories); None if there is none."""
    path = Path(checkpoint_path)
    folder = path if path.is_dir() else path.parent
    for candidate in (folder / "tokenizer.model", folder.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    return None


def check_tokenizer(model_or_args, tokenizer) -> None:
    """Raise unless the tokenizer has exactly as many pieces as the model has embeddings.

    Equal is what LLaMA's checkpoints have. A smaller tokenizer is refused too: the model could then
    produce ids the tokenizer cannot decode, and a mismatch usually means the wrong tokenizer.model."""
    args = model_or_args.args if isinstance(model_or_args, Transformer) else model_or_args
    if tokenizer.vocab_size != args.vocab_size:
        raise CheckpointError(
            f"tokenizer {getattr(tokenizer, 'path', tokenizer)} has {tokenizer.vocab_size} pieces but the model's "
            f"vocabulary has {args.vocab_size}; use the tokenizer the model was trained with"
        )

# ---------------------------------------------------------------------------------------------- writing

def save_state_dict(state_dict: StateDict, args: ModelArgs, out_dir, tokenizer_path=None, format="own") -> Path:
    """Write a full (unsharded) state dict under Meta's names as our format ("own": params.json +
    model.safetensors) or Hugging Face's ("hf": config.json + model.safetensors), plus tokenizer.model if given.

    Each file is written to a temporary name and renamed into place, weights first and config last, so a
    crash never leaves a half-written file under its real name."""
    from safetensors.torch import save_file

    if format not in ("own", "hf"):
        raise ValueError(f"format must be 'own' or 'hf', got {format!r}")
    if tokenizer_path is not None and not Path(tokenizer_path).is_file():
        raise CheckpointError(f"tokenizer {tokenizer_path}: no such file")
    # torch.compile wraps modules and prefixes their names with _orig_mod.; the weights are the same.
    state_dict = {k.replace("_orig_mod.", ""): v for k, v in state_dict.items()}
    check_names_and_shapes(args, {k: tuple(v.shape) for k, v in state_dict.items()}, "state dict to save")

    tensors, seen = {}, set()
    for name, t in state_dict.items():
        t = t.detach().to("cpu").contiguous()
        if t.data_ptr() in seen:  # safetensors refuses tensors that share memory
            t = t.clone()
        seen.add(t.data_ptr())
        if format == "hf":
            if name.endswith("attention.wq.weight"):
                t = hf_permute(t, args.n_heads)
            elif name.endswith("attention.wk.weight"):
                t = hf_permute(t, args.n_kv_heads)
            name = meta_to_hf_name(name)
        tensors[name] = t
    dtype = state_dict["tok_embeddings.weight"].dtype
    config = args.to_dict() if format == "own" else hf_config(args, dtype)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    config_name = "params.json" if format == "own" else "config.json"
    _write_atomic(out_dir / config_name, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    if tokenizer_path is not None and Path(tokenizer_path).resolve() != (out_dir / "tokenizer.model").resolve():
        _write_atomic(out_dir / "tokenizer.model", lambda p: shutil.copyfile(tokenizer_path, p))
    return out_dir


def save_model(model: Transformer, out_dir, tokenizer_path=None) -> Path:
    """`model` in our format: params.json + model.safetensors (+ tokenizer.model)."""
    return save_state_dict(model.state_dict(), model.args, out_dir, tokenizer_path, format="own")


def save_hf(model: Transformer, out_dir, tokenizer_path=None) -> Path:
    """`model` as a Hugging Face LlamaForCausalLM directory: config.json + model.safetensors (+ tokenizer.model)."""
    return save_state_dict(model.state_dict(), model.args, out_dir, tokenizer_path, format="hf")


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict:
    """LlamaForCausalLM's config.json for `args`."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_len,
        "vocab_size": args.vocab_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
