"""Where a kernel runs: Triton on CUDA tensors, Triton's interpreter for CPU tensors when
TRITON_INTERPRET=1 (how the tests reach the kernels without a GPU), the PyTorch reference otherwise."""
import importlib.util
import os

import torch

# Looked up once, without importing triton (a CPU-only torch may not have it). A plain constant, not a cached
# function: torch.compile traces this module's checks.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    return TRITON_INSTALLED


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_triton(x: torch.Tensor) -> bool:
    """True when the Triton kernel should handle tensor x. Not bf16 on a CPU: the interpreter has no bf16
    and would silently write zeros."""
    if not TRITON_INSTALLED:
        return False
    if x.is_cuda:
        return True
    return x.device.type == "cpu" and interpreting() and x.dtype != torch.bfloat16
