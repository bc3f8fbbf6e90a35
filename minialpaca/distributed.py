"""Distribution, applied *to* an unchanged model: the process group, FSDP2 sharding, sharded checkpoints.

Launched by torchrun (RANK/WORLD_SIZE/LOCAL_RANK in the environment) every process joins one group:
nccl on GPUs, gloo on CPUs. Launched as a plain `python train.py` there is no group and no sharding; the
same loop runs on one process.
"""
import contextlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1


def setup(device: Optional[str] = None) -> Dist:
    """Join the process group torchrun set up, if any, and pick this process's device."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if launched and world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, world_size, local_rank, dev)


def teardown():
    """Leave the group together. A rank that destroyed it and exited while another still used it could
    abort on its way out ("terminate called without an active exception", exit code -6), and torchrun
    then reports the whole run failed."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def apply_activation_checkpointing(model):
    """Recompute each block's activations in backward instead of storing them: memory for compute."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model):
    """Compile each block on its own: the blocks are identical, so one graph serves all of them."""
    for block in model.layers:
        block.compile()


def shard_model(model, param_dtype: torch.dtype = torch.float32):
    """FSDP2: shard every block, then the root (embeddings, final norm, output). Each block's parameters
    are gathered just before it runs and freed right after, so a rank holds 1/world_size of the model
    plus one block at a time. Gradients are reduced in fp32 even when compute runs in bf16.

    Inputs are not cast: the residual stream is already in the parameters' dtype (it starts at the
    embedding), and the rotary tables must stay fp32, as in Meta's reference: a bf16 cos/sin would put
    errors of 1 part in 256 into every rotation (and complex numbers have no bf16 at all)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again at once by backward: keeping them saves a gather.
        fully_shard(block, mp_policy=mp, reshard_after_forward=i < len(model.layers) - 1)
    fully_shard(model, mp_policy=mp)
    return model


def load_full_state_dict(model, state_dict: Optional[dict]):
    """Fill a (possibly sharded) model from a full state dict held by rank 0 only; the other ranks pass
    None. Each rank receives just its shards, so no rank ever holds the whole model on its device."""
    if dist.is_initialized():
        set_model_state_dict(
            model, state_dict if dist.get_rank() == 0 else {},
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
        )
    else:
        model.load_state_dict(state_dict, strict=True)  # names and shapes were checked when read


def full_state_dict(model) -> dict:
    """The whole model's parameters, gathered to CPU on rank 0 (empty on the other ranks)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---- training checkpoints: sharded with torch.distributed.checkpoint, written atomically


def save_checkpoint(ckpt_root: Path, step: int, model, optimizer, trainer_state: dict, keep: int, is_main: bool):
    """Save under ckpt_root/step-N/. Every rank writes its shards into step-N.tmp/; only when all ranks
    are done does rank 0 rename it, so a crash mid-save never leaves a directory that looks complete."""
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f"step-{step}.tmp"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with single_process_quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    # RNG states differ per rank; plain tensors, so they load with weights_only=True.
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng-rank{rank}.pt")
    if is_main:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    barrier()
    if is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


@contextlib.contextmanager
def single_process_quiet():
    """DCP warns that it "assumes" a single process when there is no group: here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def list_checkpoints(ckpt_root: Path) -> list:
    """Complete checkpoints (renamed from .tmp, so fully written), oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit() and (p / "trainer_state.json").is_file():
            found.append((int(p.name[5:]), p))
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore model, optimizer and RNG from a checkpoint written by save_checkpoint; returns trainer state."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with single_process_quiet():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = path / f"rng-rank{rank}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((path / "trainer_state.json").read_text())
