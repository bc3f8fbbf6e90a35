"""Teach a LLaMA to follow instructions: Stanford Alpaca's fine-tuning, written out by hand.

    python train.py                      # the tiny preset, from scratch, on the bundled task suite (CPU, minutes)
    torchrun --nproc_per_node 8 train.py --preset alpaca-7b --model llama-7b/ --data alpaca_data.json

The story of a run: read the config, build the data, build the model on the meta device, shard it with
FSDP2 and fill the shards, then loop (forward, loss, backward, clip, step, log, save), and at the end export
the model and answer held-out instructions. Distribution is applied to the model from outside
(minialpaca/distributed.py); the loop below is the same on one CPU process or on many GPUs.
"""
import argparse
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import torch

from minialpaca import distributed
from minialpaca.checkpoint import (CheckpointError, build_model, check_tokenizer, find_tokenizer, read_checkpoint,
                                   save_state_dict)
from minialpaca.data import (DataError, StepSampler, collate, encode_records, example_length, format_prompt,
                             load_records, pack_examples, pad_id_for)
from minialpaca.generation import generate
from minialpaca.model import KERNEL_CHOICES, ModelArgs, Transformer
from minialpaca.presets import PRESETS, get_preset
from minialpaca.tokenizer import Tokenizer


def option(default, help: str):
    """A TrainConfig field and its --help line."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # what to train, on what
    out: Optional[str] = option(None, "the run's directory: checkpoints, metrics, export (default runs/<preset>)")
    preset: str = option("tiny", "a recipe (tiny, alpaca-7b) or any model preset, trained from scratch")
    model: Optional[str] = option(None, "pretrained weights to fine-tune, any format load_model reads")
    data: Optional[str] = option(None, "Alpaca JSON/JSONL records (default: the bundled task suite)")
    tokenizer: Optional[str] = option(None, "SentencePiece model (default: beside --model, or trained for the suite)")
    # the schedule
    epochs: float = option(1.0, "passes over the training data")
    max_steps: Optional[int] = option(None, "stop after this many optimizer steps (the schedule spans them)")
    global_batch_size: int = option(32, "examples per optimizer step, over all processes")
    micro_batch_size: int = option(32, "examples per forward/backward on each process, at most its share of the "
                                       "global batch; gradients accumulate over the rest")
    lr: float = option(1e-3, "peak learning rate, after linear warmup; cosine decay to 0")
    warmup_ratio: float = option(0.03, "share of the steps spent warming up")
    weight_decay: float = option(0.0, "AdamW weight decay, on matrices only (norm gains are never decayed)")
    beta2: float = option(0.999, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    # how records become batches
    max_seq_len: int = option(512, "tokens per example (or per packed row); longer responses are truncated")
    packing: bool = option(False, "concatenate examples into full rows, attention kept within each example")
    group_by_length: bool = option(True, "batch examples of similar length together (less padding)")
    train_on_inputs: bool = option(False, "learn the prompt tokens too, not only the response")
    seed: int = option(0, "seeds the data order, the initial weights and the held-out split")
    # checkpoints and evaluation
    save_every: int = option(0, "optimizer steps between checkpoints; 0: only on SIGTERM/SIGINT")
    keep_checkpoints: int = option(2, "complete checkpoints kept, older ones deleted; 0: keep all")
    resume: bool = option(False, "continue from the newest complete checkpoint in OUT/checkpoints")
    eval_every: int = option(0, "optimizer steps between held-out loss evaluations; 0: at the end only")
    # how the step runs
    kernels: str = option("auto", "torch | triton | auto (Triton on CUDA tensors, PyTorch elsewhere)")
    activation_checkpointing: bool = option(False, "recompute each block's activations in the backward")
    compile: bool = option(False, "torch.compile each transformer block")
    dtype: Optional[str] = option(None, "float32 | bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    device: Optional[str] = option(None, "cuda | cpu (default: cuda when there is one)")
    # the end of the run
    hf_export: bool = option(False, "also export OUT/final-hf in Hugging Face's layout")
    task_examples: int = option(2000, "bundled suite: training records per task")
    eval_examples: int = option(50, "held-out records per task (suite), or held-out records (own data)")
    max_new_tokens: int = option(32, "tokens generated for each held-out answer")


# Named recipes: a model preset plus the hyper-parameters that go with it.
RECIPES = {
    # The default demo: a ~1M-parameter LLaMA learns the bundled tasks from scratch on a 2-core CPU.
    # Many small steps beat few large ones here: 6000 steps of 16 reach ~96% held-out exact match where
    # 750 steps of 32 reach ~41% (measured; the copying tasks are learned late, after a plateau).
    "tiny": dict(model_preset="tiny", epochs=1, global_batch_size=16, micro_batch_size=16, lr=2e-3,
                 warmup_ratio=0.03, weight_decay=0.1, beta2=0.95, max_seq_len=256, task_examples=8000),
    # Stanford Alpaca: LLaMA-7B, 3 epochs, global batch 128, lr 2e-5, cosine, warmup 3%, no weight decay,
    # max length 512, bf16 (Taori et al., 2023; their train.py with HF Trainer defaults: AdamW betas
    # (0.9, 0.999), gradient clipping at 1.0).
    "alpaca-7b": dict(model_preset="llama-7b", requires_model=True, epochs=3, global_batch_size=128,
                      micro_batch_size=4, lr=2e-5, warmup_ratio=0.03, weight_decay=0.0, beta2=0.999,
                      max_seq_len=512, dtype="bfloat16", eval_examples=64, max_new_tokens=256),
}


class ConfigError(ValueError):
    pass


# The options that decide the data order, the schedule and the updates: a resumed run that changes one of
# them does not continue the interrupted run exactly (it warns).
SHAPES_THE_RUN = ("model", "data", "tokenizer", "epochs", "max_steps", "global_batch_size", "lr", "warmup_ratio",
                  "weight_decay", "beta2", "grad_clip", "max_seq_len", "packing", "group_by_length", "train_on_inputs",
                  "seed", "dtype", "task_examples")

# (option, bound, strictly above it?): numbers outside these make no sense; refuse them before any work.
RANGES = [("epochs", 0, True), ("lr", 0, True), ("global_batch_size", 1, False), ("micro_batch_size", 1, False),
          ("max_seq_len", 1, False), ("max_steps", 1, False), ("max_new_tokens", 1, False),
          ("warmup_ratio", 0, False), ("weight_decay", 0, False), ("grad_clip", 0, False), ("save_every", 0, False),
          ("keep_checkpoints", 0, False), ("eval_every", 0, False), ("task_examples", 1, False),
          ("eval_examples", 0, False)]


def parse_args(argv=None) -> TrainConfig:
    """Every TrainConfig field is a flag; values not given come from the recipe, then the defaults."""
    recipes = "\n".join(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in recipe.items()) for name, recipe in RECIPES.items())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"A recipe's values replace the defaults above; flags replace both.\n{recipes}")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help = f.metadata["help"] + ("" if f.default is None else f" [default: {f.default}]")
        if f.type is bool:
            # default=None tells "not given" apart from a given value, so a recipe can fill it in.
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:
            typ = int if "int" in str(f.type) else float if "float" in str(f.type) else str
            parser.add_argument(flag, type=typ, default=None, metavar=f.name.upper(), help=help)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    preset = given.get("preset", TrainConfig.preset)
    if preset not in RECIPES and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; recipes: {', '.join(RECIPES)}; model presets: {', '.join(PRESETS)}")
    recipe = RECIPES.get(preset, {})
    if recipe.get("requires_model") and "model" not in given:
        raise ConfigError(f"--preset {preset} fine-tunes pretrained weights: pass --model PATH (Meta, HF, llama2.c or our format)")
    known = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{**{k: v for k, v in recipe.items() if k in known}, **given})
    cfg.model_preset = recipe.get("model_preset", preset)
    cfg.out = cfg.out or f"runs/{preset}"
    for name, lowest, strict in RANGES:
        value = getattr(cfg, name)
        if value is not None and (value <= lowest if strict else value < lowest):
            raise ConfigError(f"--{name.replace('_', '-')} must be {'above' if strict else 'at least'} {lowest}, got {value}")
    if cfg.warmup_ratio >= 1:
        raise ConfigError(f"--warmup-ratio must be below 1, got {cfg.warmup_ratio}")
    if cfg.kernels not in KERNEL_CHOICES:
        raise ConfigError(f"--kernels must be one of {', '.join(KERNEL_CHOICES)}, got {cfg.kernels!r}")
    if cfg.dtype not in (None, "float32", "bfloat16"):
        raise ConfigError(f"--dtype must be float32 or bfloat16, got {cfg.dtype!r}")
    return cfg


def fit_batch_sizes(cfg: TrainConfig, world_size: int, log):
    """Each process takes an equal share of the global batch, in micro-batches of at most --micro-batch-size:
    a recipe's micro-batch is capped at that share, so the same command runs on 1 process or N."""
    if cfg.global_batch_size % world_size:
        raise ConfigError(f"--global-batch-size {cfg.global_batch_size} does not split evenly over {world_size} processes")
    share = cfg.global_batch_size // world_size
    if cfg.micro_batch_size > share:
        log(f"micro-batch {cfg.micro_batch_size} is more than each process's share of the global batch "
            f"({cfg.global_batch_size} / {world_size} processes): using {share}")
        cfg.micro_batch_size = share
    if share % cfg.micro_batch_size:
        raise ConfigError(
            f"--global-batch-size {cfg.global_batch_size} is not a multiple of --micro-batch-size "
            f"{cfg.micro_batch_size} x {world_size} processes = {cfg.micro_batch_size * world_size}"
        )


def lr_at(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup from 0, then cosine decay to 0 (HF's `cosine` schedule, as Stanford used): a factor of lr."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ---- data


def build_data(cfg: TrainConfig, tokenizer: Tokenizer, log):
    """Training examples (encoded, maybe packed) and held-out records."""
    from minialpaca import tasks

    if cfg.data:
        records = load_records(cfg.data)
        # Hold out a few records (a fixed random choice) for the held-out loss and the final answers.
        order = list(range(len(records)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = min(cfg.eval_examples, len(records) // 10)
        held_out = [records[i] for i in sorted(order[:n_eval])]
        train_records = [records[i] for i in sorted(order[n_eval:])]
    else:
        train_records = tasks.make_records("train", cfg.task_examples, seed=cfg.seed)
        held_out = tasks.make_records("test", cfg.eval_examples, seed=cfg.seed)
    examples, stats = encode_records(tokenizer, train_records, cfg.max_seq_len, cfg.train_on_inputs)
    if stats.n_dropped or stats.n_truncated:
        log(f"data: {stats.n_dropped} records dropped (prompt longer than {cfg.max_seq_len} tokens), "
            f"{stats.n_truncated} responses truncated")
    eval_examples, _ = encode_records(tokenizer, held_out, cfg.max_seq_len, cfg.train_on_inputs)
    if cfg.packing:
        examples = pack_examples(examples, cfg.max_seq_len, pad_id_for(tokenizer))
        eval_examples = pack_examples(eval_examples, cfg.max_seq_len, pad_id_for(tokenizer))
    log(f"data: {len(train_records)} training records -> {len(examples)} {'packed rows' if cfg.packing else 'examples'}, "
        f"{stats.n_target_tokens} target tokens; {len(held_out)} held out")
    return examples, eval_examples, held_out


def batch_to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ---- model


def model_args(cfg: TrainConfig, tokenizer: Tokenizer, dist: distributed.Dist):
    """The model's shape, and on rank 0 the pretrained weights (memory-mapped on the CPU; None elsewhere)."""
    pretrained = None
    if cfg.model:
        if dist.is_main:  # only rank 0 reads the weights; the others learn the shape from it
            args, pretrained = read_checkpoint(cfg.model, dtype=torch.float32)
        args = distributed.broadcast_object(args if dist.is_main else None)
    else:
        args = get_preset(cfg.model_preset, vocab_size=tokenizer.vocab_size)
    args.max_seq_len = max(args.max_seq_len, cfg.max_seq_len)
    check_tokenizer(args, tokenizer)
    return args, pretrained


def build_training_model(cfg: TrainConfig, args: ModelArgs, pretrained, dist: distributed.Dist, param_dtype: torch.dtype):
    """The model on the meta device, then sharded, then filled: rank 0 holds the weights (or makes the
    initial ones) on the CPU and each rank receives only its shards."""
    with torch.device("meta"):
        model = Transformer(args, kernels=cfg.kernels)
    if cfg.activation_checkpointing:
        distributed.apply_activation_checkpointing(model)
    if cfg.compile:
        distributed.apply_compile(model)
    if dist.sharded:
        distributed.shard_model(model, param_dtype)
    model.to_empty(device=dist.device)
    model.reset_rope(dist.device)

    state_dict = pretrained
    if dist.is_main and pretrained is None:  # from scratch: the same initial weights for any world size
        with torch.device("cpu"):
            fresh = Transformer(args)
        fresh.init_weights(seed=cfg.seed)
        state_dict = fresh.state_dict()
    distributed.load_full_state_dict(model, state_dict)
    return model


def build_optimizer(model, cfg: TrainConfig, device):
    # Decay matrices only: norms' gains are scales, and decaying them toward 0 fights the normalization.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel updates every parameter (CUDA and CPU); the for-each version makes ~10 passes over
    # parameters and moments, which on a CPU is a tenth of a 60M model's step.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8, fused=fused_adamw(device))


def fused_adamw(device) -> bool:
    return device.type in ("cuda", "cpu")


# ---- measuring


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def peak_flops(device) -> Optional[float]:
    if device.type != "cuda":
        return None  # no honest peak for a CPU: MFU is reported as null
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6 per matmul parameter, plus attention's 12 * L * dim * T."""
    matmul_params = args.n_layers * (args.dim * (2 * args.dim + 2 * args.n_kv_heads * args.head_dim)
                                     + 3 * args.dim * args.hidden_dim) + args.dim * args.vocab_size
    return 6 * matmul_params + 12 * args.n_layers * args.dim * seq_len


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource  # the process's resident-set high-water mark (kilobytes on Linux)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Progress:
    """One status line on a terminal; on a log file, a line every 5% instead."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.tty, self.start = total, enabled, sys.stderr.isatty(), time.time()
        self.first_step = None

    def update(self, step: int, loss: float, tokens_per_s: float):
        if not self.enabled:
            return
        if self.first_step is None:
            self.first_step = step - 1
        done = (step - self.first_step) / max(1, self.total - self.first_step)
        eta = (time.time() - self.start) * (1 - done) / max(done, 1e-9)
        bar = "#" * int(30 * step / self.total) + "." * (30 - int(30 * step / self.total))
        line = f"step {step}/{self.total} [{bar}] loss {loss:.4f} | {tokens_per_s / 1e3:.1f}k tok/s | ETA {eta // 60:.0f}m{eta % 60:02.0f}s"
        if self.tty:
            print("\r" + line, end="\n" if step == self.total else "", file=sys.stderr, flush=True)
        elif step == self.total or step % max(1, self.total // 20) == 0:
            print(line, file=sys.stderr, flush=True)


@torch.no_grad()
def held_out_loss(model, examples, cfg, tokenizer, device, autocast) -> float:
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for i in range(0, len(examples), cfg.micro_batch_size):
        batch = batch_to(collate(examples[i : i + cfg.micro_batch_size], pad_id_for(tokenizer)), device)
        with autocast:
            total += model(batch["input_ids"], positions=batch.get("positions"),
                           segment_ids=batch.get("segment_ids"), labels=batch["labels"])
        count += (batch["labels"][:, 1:] != -100).sum()
    model.train()
    return (total / count.clamp(min=1)).item()


# ---- the run


def main(argv=None) -> int:
    cfg = parse_args(argv)
    dist = distributed.setup(cfg.device)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if dist.is_main else (lambda msg: None)
    fit_batch_sizes(cfg, dist.world_size, log)
    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"
    dtype = getattr(torch, cfg.dtype or ("bfloat16" if dist.device.type == "cuda" else "float32"))
    torch.manual_seed(cfg.seed)

    # Data first: a bad file should fail before any model is built.
    if cfg.tokenizer:
        tokenizer = Tokenizer(cfg.tokenizer)
    elif cfg.model:
        found = find_tokenizer(cfg.model)
        if found is None:
            raise ConfigError(f"no tokenizer.model beside {cfg.model}: pass --tokenizer PATH")
        tokenizer = Tokenizer(found)
    elif cfg.data:
        raise ConfigError("training from scratch on your own data needs --tokenizer PATH (a SentencePiece model)")
    else:
        from minialpaca.tasks import demo_tokenizer

        tokenizer = demo_tokenizer()
    args, pretrained = model_args(cfg, tokenizer, dist)  # the tokenizer must fit the model: check it first
    examples, eval_examples, held_out = build_data(cfg, tokenizer, log)
    if len(examples) < cfg.global_batch_size:
        raise ConfigError(f"only {len(examples)} training examples (after dropping those longer than "
                          f"--max-seq-len {cfg.max_seq_len}) for a global batch of {cfg.global_batch_size}")
    lengths = [len(e["input_ids"]) for e in examples]
    sampler = StepSampler(lengths, cfg.global_batch_size, cfg.micro_batch_size, dist.rank, dist.world_size,
                          seed=cfg.seed, group_by_length=cfg.group_by_length and not cfg.packing)
    total_steps = math.ceil(cfg.epochs * sampler.steps_per_epoch)
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    warmup_steps = max(1, math.ceil(cfg.warmup_ratio * total_steps)) if cfg.warmup_ratio > 0 else 0

    found = distributed.list_checkpoints(ckpt_root)
    if found and not cfg.resume:
        # A fresh run would mix its checkpoints with these, and keep-last-K would delete by step number.
        raise ConfigError(f"{ckpt_root} holds an earlier run's checkpoints (newest: {found[-1].name}): pass --resume "
                          f"to continue it, or another --out (or remove {ckpt_root}) to start over")
    resume_from = found[-1] if found else None
    if cfg.resume and resume_from is None:
        log(f"--resume: no complete checkpoint in {ckpt_root}; starting from scratch")
    if resume_from is not None:
        saved = json.loads((resume_from / "trainer_state.json").read_text())
        if saved["model_args"] != args.to_dict():
            raise ConfigError(f"checkpoint {resume_from} is of another model shape: {saved['model_args']} "
                              f"vs this run's {args.to_dict()}")
        # Allowed, but then the run is no longer the one that was interrupted: say so.
        before = saved.get("config", {})
        changed = [f"--{k.replace('_', '-')} {v} (was {before[k]})" for k, v in asdict(cfg).items()
                   if k in SHAPES_THE_RUN and k in before and before[k] != v]
        if changed:
            log(f"warning: resuming with other settings than {resume_from.name} had: {', '.join(changed)}")

    model = build_training_model(cfg, args, pretrained, dist, dtype)
    del pretrained
    optimizer = build_optimizer(model, cfg, dist.device)
    # On one process, bf16 compute comes from autocast; under FSDP2 from its mixed-precision policy.
    single_bf16 = not dist.sharded and dtype == torch.bfloat16
    autocast = torch.autocast(dist.device.type, dtype=torch.bfloat16) if single_bf16 else nullcontext()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {cfg.model or cfg.model_preset}, {n_params / 1e6:.2f}M parameters, dim {args.dim}, "
        f"{args.n_layers} layers; {dist.world_size} process(es) on {dist.device.type}, {dtype}; kernels={cfg.kernels}")
    log(f"schedule: {total_steps} steps of {cfg.global_batch_size} ({sampler.accum_steps} micro-batches of "
        f"{cfg.micro_batch_size} per process), {sampler.steps_per_epoch} steps per epoch, warmup {warmup_steps}")

    step = 0
    if resume_from is not None:
        step = distributed.load_checkpoint(resume_from, model, optimizer)["step"]
        log(f"resumed from {resume_from} at step {step}")

    metrics_path = out / "metrics.jsonl"
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({**asdict(cfg), "model_args": args.to_dict()}, indent=2))
        keep_metrics_up_to(metrics_path, step)  # a resumed run rewrites the steps after its checkpoint

    # SIGTERM (preemption) or Ctrl-C: finish this step, save, stop. A second Ctrl-C quits at once.
    stop_signal = []

    def on_signal(signum, frame):
        if stop_signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop_signal.append(signum)
        log(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint"
            + (" (Ctrl-C again to quit now, without one)" if signum == signal.SIGINT else ""))

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    def save(step):
        state = {"step": step, "model_args": args.to_dict(), "config": asdict(cfg),
                 "sampler": {"epoch": step // sampler.steps_per_epoch, "step": step % sampler.steps_per_epoch}}
        path = distributed.save_checkpoint(ckpt_root, step, model, optimizer, state, cfg.keep_checkpoints, dist.is_main)
        log(f"saved {path}")

    flops_token = flops_per_token(args, cfg.max_seq_len)
    peak = peak_flops(dist.device)
    progress = Progress(total_steps, dist.is_main)
    model.train()
    while step < total_steps:
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_at(step, total_steps, warmup_steps)
        epoch, step_in_epoch = divmod(step, sampler.steps_per_epoch)
        indices = sampler.micro_batches(epoch, step_in_epoch)  # this rank's share, in micro-batches
        micro_batches = [batch_to(collate([examples[i] for i in idx], pad_id_for(tokenizer)), dist.device)
                         for idx in indices]
        # Normalize by the target tokens of the *global* batch (all micro-batches, all ranks): each token
        # then weighs the same however the batch is split, so 1 process and N processes agree.
        n_targets = sum((b["labels"][:, 1:] != -100).sum() for b in micro_batches)
        n_targets = distributed.all_reduce_sum(n_targets.to(torch.float32))
        loss_sum = torch.zeros((), device=dist.device)
        for i, batch in enumerate(micro_batches):
            if dist.sharded:  # reduce-scatter gradients once, after the last micro-batch
                model.set_requires_gradient_sync(i == len(micro_batches) - 1)
            with autocast:
                loss = model(batch["input_ids"], positions=batch.get("positions"),
                             segment_ids=batch.get("segment_ids"), labels=batch["labels"])
            # FSDP averages gradients over ranks; scaling by world_size turns that into the global sum.
            (loss * dist.world_size / n_targets).backward()
            loss_sum += loss.detach()
        # --grad-clip 0 turns clipping off: an infinite bound still measures the norm for the log.
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor when the parameters are sharded
            grad_norm = grad_norm.full_tensor()
        loss = (distributed.all_reduce_sum(loss_sum) / n_targets).item()
        if not math.isfinite(loss) or not math.isfinite(grad_norm.item()):
            # Stop before the optimizer step: the weights and the last checkpoint stay good.
            raise FloatingPointError(f"loss is {loss} (grad norm {grad_norm.item()}) at step {step + 1}; "
                                     f"stopping without saving; the last good checkpoint is in {ckpt_root}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        # ---- log
        dt = time.perf_counter() - t0
        n_tokens = sum(example_length(examples[i]) for idx in indices for i in idx)  # text, not padding
        tokens_per_s = distributed.all_reduce_sum(torch.tensor(float(n_tokens), device=dist.device)).item() / dt
        record = {"step": step, "epoch": round(step / sampler.steps_per_epoch, 4), "loss": round(loss, 6),
                  "lr": optimizer.param_groups[0]["lr"], "grad_norm": round(grad_norm.item(), 6),
                  "tokens_per_s": round(tokens_per_s, 1),
                  "mfu": round(tokens_per_s * flops_token / (peak * dist.world_size), 4) if peak else None,
                  "peak_memory_gb": round(peak_memory_gb(dist.device), 3)}
        if dist.is_main:
            append_jsonl(metrics_path, record)
        progress.update(step, loss, tokens_per_s)
        if cfg.eval_every and eval_examples and (step % cfg.eval_every == 0 or step == total_steps):
            eval_loss = held_out_loss(model, eval_examples, cfg, tokenizer, dist.device, autocast)
            if dist.is_main:
                append_jsonl(metrics_path, {"step": step, "eval": True, "loss": round(eval_loss, 6)})
            log(f"step {step}: held-out loss {eval_loss:.4f}")

        # ---- save
        stop = distributed.all_reduce_sum(torch.tensor(float(bool(stop_signal)), device=dist.device)).item() > 0
        if stop or (cfg.save_every and step % cfg.save_every == 0):
            save(step)
        if stop:
            log(f"stopped by signal at step {step}/{total_steps}; continue with --resume")
            distributed.teardown()
            return 128 + (stop_signal[0] if stop_signal else signal.SIGTERM)

    # The whole model on rank 0's CPU: the last collective. Every rank then leaves the group together, and
    # what is left (export, answers) is rank 0's alone and needs no group.
    state_dict = distributed.full_state_dict(model) if dist.sharded else {k: v.detach().cpu() for k, v in model.state_dict().items()}
    distributed.teardown()
    if dist.is_main:
        finish(cfg, state_dict, args, tokenizer, held_out, dist.device, out, metrics_path, log)
    return 0


def finish(cfg, state_dict, args, tokenizer, held_out, device, out, metrics_path, log):
    """Export the model, then answer the held-out instructions with it."""
    final = out / "final"
    save_state_dict(state_dict, args, final, tokenizer.path)
    if cfg.hf_export:
        save_state_dict(state_dict, args, out / "final-hf", tokenizer.path, format="hf")
    log(f"exported {final} (load it with minialpaca.load_model or generate.py)")

    # An unsharded copy for decoding, built around the exported tensors (no random init of a 7B model).
    plain = build_model(args, state_dict, device=device)
    prompts = [tokenizer.encode(format_prompt(r["instruction"], r.get("input", ""))) for r in held_out]
    answers = []
    for i in range(0, len(prompts), 64):
        new = generate(plain, prompts[i : i + 64], cfg.max_new_tokens, eos_id=tokenizer.eos_id)
        answers += [tokenizer.decode(ids).strip() for ids in new]
    if held_out and "task" in held_out[0]:
        from minialpaca.tasks import evaluate

        result = evaluate(held_out, answers)
        write_json_atomic(out / "eval.json", result)
        log("held-out exact match per task:")
        for task, acc in sorted(result["per_task"].items()):
            log(f"  {task:<24} {acc:6.1%}")
        log(f"  {'mean':<24} {result['exact_match']:6.1%}  (written to {out / 'eval.json'})")
    if held_out:
        r = held_out[0]
        log(f"\nsample instruction: {r['instruction']}" + (f"\ninput: {r['input']}" if r.get("input") else ""))
        log(f"answer: {answers[0]}")
    if metrics_path.is_file():
        plot_losses(metrics_path, out / "loss.png", log)


def append_jsonl(path: Path, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def keep_metrics_up_to(path: Path, step: int):
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def write_text_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2))


def plot_losses(metrics_path: Path, png: Path, log):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # optional: pip install matplotlib
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    train = [(r["step"], r["loss"]) for r in rows if not r.get("eval")]
    held = [(r["step"], r["loss"]) for r in rows if r.get("eval")]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train")
    if held:
        ax.plot(*zip(*held), "o-", label="held-out")
    ax.set(xlabel="optimizer step", ylabel="loss", yscale="log", title=str(metrics_path.parent))
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    log(f"loss curve: {png}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, DataError, CheckpointError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # the second Ctrl-C; an unfinished save stays a .tmp that --resume ignores
        print("interrupted: no checkpoint of this step", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
