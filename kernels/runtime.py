"""Where a kernel runs: Triton on CUDA tensors, Triton's interpreter for CPU tensors when
TRITON_INTERPRET=1 (how the tests reach the kernels without a GPU), the PyTorch reference otherwise."""
import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_triton(x: torch.Tensor) -> bool:
    """True when the Triton kernel should handle tensor x."""
    return triton_installed() and (x.is_cuda or (x.device.type == "cpu" and interpreting()))
