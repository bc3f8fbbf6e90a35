"""minialpaca: Stanford Alpaca rebuilt from scratch in plain PyTorch."""
from .model import ModelArgs, Transformer
from .presets import PRESETS, get_preset
from .tokenizer import Tokenizer

__all__ = ["ModelArgs", "Transformer", "PRESETS", "get_preset", "Tokenizer", "load_model", "generate"]


def __getattr__(name):
    # checkpoint.py and generation.py import lazily so `import minialpaca` stays light.
    if name == "load_model":
        from .checkpoint import load_model
        return load_model
    if name == "generate":
        from .generation import generate
        return generate
    raise AttributeError(f"module 'minialpaca' has no attribute {name!r}")
