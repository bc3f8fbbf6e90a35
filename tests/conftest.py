import os
from pathlib import Path

import pytest
import torch

# Triton reads this when it is imported: CPU-only machines run the kernels in its interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests' tensors are tiny: one thread is as fast, and two threads spin against the subprocesses some
# tests start (torchrun workers, the CLIs) on a 2-core machine, slowing everything many times over.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The read-only real files beside the repo (../shared/data); tests that need them skip without them."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
