"""Fused Triton kernels, each beside the plain PyTorch reference that defines what it computes.

One file per kernel: the Triton kernels, the torch.autograd.Function that ties forward and backward
together, the function users call, and the reference. Triton is imported only when a kernel runs, so
`import kernels` works on a CPU-only torch without triton installed.
"""
import importlib

_EXPORTS = {
    "rms_norm": "rmsnorm",
    "add_rms_norm": "rmsnorm",
    "apply_rope": "rope",
    "swiglu": "swiglu",
    "flash_attention": "flash_attention",
    "linear_cross_entropy": "cross_entropy",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
