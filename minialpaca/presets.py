"""Named model sizes. The LLaMA ones match Meta's params.json (vocab -1 there means "from the tokenizer":
32000 for LLaMA-1/2)."""
from .model import ModelArgs

PRESETS = {
    # LLaMA-1 (Touvron et al., 2023a)
    "llama-7b": dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256, norm_eps=1e-6, max_seq_len=2048),
    "llama-13b": dict(dim=5120, n_layers=40, n_heads=40, multiple_of=256, norm_eps=1e-6, max_seq_len=2048),
    "llama-30b": dict(dim=6656, n_layers=60, n_heads=52, multiple_of=256, norm_eps=1e-6, max_seq_len=2048),
    "llama-65b": dict(dim=8192, n_layers=80, n_heads=64, multiple_of=256, norm_eps=1e-5, max_seq_len=2048),
    # Llama 2 (Touvron et al., 2023b): longer context; 70B uses grouped-query attention
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256, norm_eps=1e-5, max_seq_len=4096),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, multiple_of=256, norm_eps=1e-5, max_seq_len=4096),
    "llama2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                       ffn_dim_multiplier=1.3, norm_eps=1e-5, max_seq_len=4096),
    # Small models for a CPU. `tiny` is the default demo: trained from scratch in minutes on the task suite.
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=1024, multiple_of=32, max_seq_len=256),
    # About 60M parameters with the LLaMA vocabulary: the benchmark's "real-sized but CPU-friendly" model.
    "small-60m": dict(dim=512, n_layers=8, n_heads=8, multiple_of=256, max_seq_len=1024),
}


def get_preset(name: str, **overrides) -> ModelArgs:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ModelArgs(**{**PRESETS[name], **overrides})
