"""Training-step throughput: tokens/s (and MFU on GPUs) of forward + backward + AdamW.

    python benchmarks/bench_train.py --preset small-60m --batch-size 8 --seq-len 256
    python benchmarks/bench_train.py --hf          # also time Hugging Face's LlamaForCausalLM on the same config

--hf needs `transformers` importable, in a separate environment: it is never a dependency of minialpaca.
Both models get the same weights, batch, optimizer (train.py's fused AdamW; HF Trainer's default is fused
too), dtype and thread count; they take turns step by step after warm-up and the median is reported.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minialpaca.model import Transformer  # noqa: E402
from minialpaca.presets import get_preset  # noqa: E402
from train import flops_per_token, fused_adamw, peak_flops  # noqa: E402


def time_steps(step_fns: dict, warmup: int, steps: int, device) -> dict:
    """Median seconds per step of each implementation. They take turns step by step, so a change of load
    on the machine (a shared CPU drifts by 20% and more) hits them alike."""
    times = {name: [] for name in step_fns}
    for i in range(warmup + steps):
        for name, step_fn in step_fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step_fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def sft_labels(tokens, prompt_fraction: float):
    """Labels of an instruction-tuning batch: the first prompt_fraction of each row is prompt (-100)."""
    labels = tokens.clone()
    labels[:, : int(prompt_fraction * tokens.shape[1])] = -100
    return labels


def ours(args, model_args, tokens, device, dtype):
    torch.manual_seed(0)
    model = Transformer(model_args, kernels=args.kernels).to(device=device, dtype=dtype)
    if args.compile:
        for block in model.layers:
            block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused_adamw(device))
    labels = sft_labels(tokens, args.prompt_fraction)
    n_targets = (labels[:, 1:] != -100).sum()

    def step():
        loss = model(tokens, labels=labels) / n_targets
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def hf(args, model_args, tokens, device, dtype, our_model):
    """Hugging Face's LlamaForCausalLM with the same configuration and weights (imported only here)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=model_args.dim, intermediate_size=model_args.hidden_dim, num_hidden_layers=model_args.n_layers,
        num_attention_heads=model_args.n_heads, num_key_value_heads=model_args.n_kv_heads,
        vocab_size=model_args.vocab_size, rms_norm_eps=model_args.norm_eps, rope_theta=model_args.rope_theta,
        max_position_embeddings=model_args.max_seq_len, tie_word_embeddings=False, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    from minialpaca.checkpoint import hf_permute, meta_to_hf_name

    state = {}
    for name, w in our_model.state_dict().items():
        if name.endswith(("wq.weight", "wk.weight")):
            w = hf_permute(w, model_args.n_heads if "wq" in name else model_args.n_kv_heads)
        state[meta_to_hf_name(name)] = w
    model.load_state_dict(state)
    if args.compile:
        model.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused_adamw(device))

    labels = sft_labels(tokens, args.prompt_fraction)

    def step():
        model(input_ids=tokens, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", nargs="+", default=["tiny", "small-60m"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--prompt-fraction", type=float, default=0.54,
                   help="share of each row that is prompt, without loss (0.54 in Alpaca's data with LLaMA's tokenizer)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--kernels", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both models (default: torch's)")
    p.add_argument("--hf", action="store_true", help="also time transformers' LlamaForCausalLM (must be installed)")
    p.add_argument("--out", default="benchmarks/results/train.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    peak = peak_flops(device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"

    rows = []
    for preset in args.preset:
        model_args = get_preset(preset, vocab_size=32000 if preset != "tiny" else 1024, max_seq_len=max(args.seq_len, 256))
        tokens = torch.randint(0, model_args.vocab_size, (args.batch_size, args.seq_len), device=device)
        n_tok = tokens.numel()
        model, step = ours(args, model_args, tokens, device, dtype)
        params = sum(p.numel() for p in model.parameters())
        impls = {"minialpaca": step}
        if args.hf:
            impls["hf-transformers"] = hf(args, model_args, tokens, device, dtype, model)
        for name, sec in time_steps(impls, args.warmup, args.steps, device).items():
            tps = n_tok / sec
            rows.append({"preset": preset, "impl": name, "params_m": round(params / 1e6, 2), "batch": args.batch_size,
                         "seq_len": args.seq_len, "prompt_fraction": args.prompt_fraction, "dtype": str(dtype).replace("torch.", ""), "compile": args.compile,
                         "step_ms": round(sec * 1e3, 1), "tokens_per_s": round(tps, 1),
                         "mfu": round(tps * flops_per_token(model_args, args.seq_len) / peak, 4) if peak else None})
        if args.hf:
            rows[-2]["speedup_vs_hf"] = round(rows[-2]["tokens_per_s"] / rows[-1]["tokens_per_s"], 2)

    print(f"training step (forward + backward + AdamW) on {machine}, torch {torch.__version__}")
    cols = ["preset", "impl", "params_m", "batch", "seq_len", "dtype", "compile", "step_ms", "tokens_per_s", "mfu", "speedup_vs_hf"]
    print(" | ".join(f"{c:>12}" for c in cols))
    for r in rows:
        print(" | ".join(f"{str(r.get(c, '')):>12}" for c in cols))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
