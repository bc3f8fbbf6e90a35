"""Fused Triton kernels, each beside the plain PyTorch reference that defines what it computes.

One file per kernel: the Triton kernels, the torch.autograd.Function that ties forward and backward
together, the function users call, and the reference. Triton itself is imported only when a kernel runs,
so `import kernels` works on a CPU-only torch without triton installed. The functions are imported
eagerly on purpose: two of them share their module's name (kernels.swiglu, kernels.flash_attention),
and a lazy export would hand out the module instead.
"""
from kernels.cross_entropy import linear_cross_entropy
from kernels.flash_attention import flash_attention
from kernels.rmsnorm import add_rms_norm, rms_norm
from kernels.rope import apply_rope
from kernels.swiglu import swiglu

__all__ = ["rms_norm", "add_rms_norm", "apply_rope", "swiglu", "flash_attention", "linear_cross_entropy"]
