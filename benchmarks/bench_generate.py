"""Prefill and decode speed of minialpaca.generate, and optionally of Hugging Face's generate on the same weights.

    python benchmarks/bench_generate.py                      # stories260K + a random ~60M model, batch 1 and 8
    python benchmarks/bench_generate.py --compile            # also with the decode step under torch.compile
    PYTHONPATH=. /path/to/venv-with-transformers/bin/python benchmarks/bench_generate.py --hf

Every case: a prompt of --prompt-len random tokens per row, greedy, exactly --new-tokens new tokens (no EOS),
--warmup untimed runs, then the median of --runs timed runs. Prefill = from the call until the first new
token is known (time to first token); decode = each later step. Tokens/s count all rows of the batch.
`--hf` compares greedy batch-1 decoding with transformers' LlamaForCausalLM.generate, timed the same way (a
streamer notes when each token arrives), and checks both produce the same tokens. transformers is imported
only inside that function: it is never a dependency of minialpaca.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from minialpaca.checkpoint import load_model, save_hf  # noqa: E402
from minialpaca.generation import generate  # noqa: E402
from minialpaca.model import Transformer  # noqa: E402
from minialpaca.presets import get_preset  # noqa: E402

DEFAULT_CKPT = REPO.parent / "shared" / "data" / "stories260K" / "meta"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_generate(model, prompts, new_tokens, compile=False):
    """(seconds to the first token, seconds for the later steps, the tokens) of one greedy generate call."""
    device = model.tok_embeddings.weight.device
    first = []
    sync(device)
    t0 = time.perf_counter()
    out = generate(model, prompts, new_tokens, compile=compile,
                   on_token=lambda row, t: first.append(time.perf_counter()) if not first else None)
    end = time.perf_counter()  # generate's last .tolist() has already waited for the device
    return first[0] - t0, end - first[0], out


def measure(runs_by_impl: dict, batch, prompt_len, new_tokens, warmup, runs) -> dict:
    """Median prefill and decode tokens/s of each `run()` -> (prefill s, decode s, tokens). Several
    implementations take turns run by run, so a load change on the machine hits them alike."""
    for run in runs_by_impl.values():
        for _ in range(warmup):
            run()
    times = {impl: ([], []) for impl in runs_by_impl}
    tokens = {}
    for _ in range(runs):
        for impl, run in runs_by_impl.items():
            p, d, tokens[impl] = run()
            times[impl][0].append(p)
            times[impl][1].append(d)
    results = {}
    for impl, (prefill, decode) in times.items():
        p, d = statistics.median(prefill), statistics.median(decode)
        results[impl] = {
            "prefill_tok_s": batch * prompt_len / p,
            "decode_tok_s": batch * (new_tokens - 1) / d,
            "decode_ms_per_step": 1000 * d / (new_tokens - 1),
            "tokens": tokens[impl],
        }
    return results


def random_prompts(vocab, batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).tolist()  # skip unk/bos/eos


def bench_ours(name, model, args) -> list:
    rows = []
    modes = ["eager", "compile"] if args.compile else ["eager"]
    for mode in modes:
        for batch in args.batch_sizes:
            prompts = random_prompts(model.args.vocab_size, batch, args.prompt_len)
            r = measure({mode: lambda: timed_generate(model, prompts, args.new_tokens, compile=mode == "compile")},
                        batch, args.prompt_len, args.new_tokens, args.warmup, args.runs)[mode]
            r.pop("tokens")
            rows.append({"model": name, "impl": f"minialpaca/{mode}", "batch": batch, **r})
            print_row(rows[-1])
    return rows


def bench_hf(name, model, args) -> list:
    """Greedy batch-1 decoding with transformers on the same weights (exported with save_hf)."""
    import transformers  # only here: a separate environment, never a dependency

    device = model.tok_embeddings.weight.device
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, tmp)
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=model.tok_embeddings.weight.dtype)
    hf = hf.to(device).eval()
    prompt = random_prompts(model.args.vocab_size, 1, args.prompt_len)
    ids = torch.tensor(prompt, device=device)

    class Clock:  # transformers calls put() with the prompt, then with each new token as it is made
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def run():
        clock = Clock()
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, do_sample=False, streamer=clock,
                              pad_token_id=0, eos_token_id=None)
        sync(device)
        end = time.perf_counter()
        first = clock.times[1]
        return first - t0, end - first, [out[0, ids.shape[1]:].tolist()]

    impls = {f"transformers {transformers.__version__}": run,
             "minialpaca/eager": lambda: timed_generate(model, prompt, args.new_tokens)}
    if args.compile:
        impls["minialpaca/compile"] = lambda: timed_generate(model, prompt, args.new_tokens, compile=True)
    results = measure(impls, 1, args.prompt_len, args.new_tokens, args.warmup, args.runs)
    hf_name = next(iter(results))
    hf_result = results[hf_name]
    rows = []
    for impl, r in results.items():
        row = {"model": name, "impl": impl + (" (vs HF)" if impl != hf_name else ""), "batch": 1, **r}
        if impl != hf_name:
            same = 0
            for a, b in zip(r["tokens"][0], hf_result["tokens"][0]):
                if a != b:
                    break
                same += 1
            row["speedup_vs_hf"] = r["decode_tok_s"] / hf_result["decode_tok_s"]
            row["same_greedy_tokens"] = f"{same}/{args.new_tokens}"
        rows.append(row)
    for row in rows:
        row.pop("tokens")
        print_row(row)
    return rows


def print_row(r):
    extra = ""
    if "speedup_vs_hf" in r:
        extra = f"  {r['speedup_vs_hf']:.2f}x HF decode, same tokens {r['same_greedy_tokens']}"
    print(f"{r['model']:<12} {r['impl']:<30} {r['batch']:>5} {r['prefill_tok_s']:>12.1f} {r['decode_tok_s']:>11.1f} "
          f"{r['decode_ms_per_step']:>9.2f}{extra}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", default=str(DEFAULT_CKPT) if DEFAULT_CKPT.is_dir() else None,
                   help="a real checkpoint to measure (default: ../shared/data/stories260K/meta if present)")
    p.add_argument("--models", nargs="+", default=["checkpoint", "small-60m"],
                   help="'checkpoint' and/or preset names built with random weights")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also measure with the decode step compiled")
    p.add_argument("--hf", action="store_true", help="compare batch-1 greedy decoding with transformers")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on CUDA, float32 elsewhere")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads (both libraries)")
    p.add_argument("--out", help="results file, .json or .csv (default: benchmarks/results/generate-<time>.json)")
    args = p.parse_args()
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode speed needs steps after the first token)")
    dtype = DTYPES[args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")]
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {args.threads} threads")
    print(f"# {machine}; torch {torch.__version__}; {dtype}; prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new; median of {args.runs}")
    print(f"{'model':<12} {'impl':<30} {'batch':>5} {'prefill tok/s':>12} {'decode tok/s':>11} {'ms/step':>9}")

    results = []
    for name in args.models:
        if name == "checkpoint":
            if args.checkpoint is None:
                print("# no checkpoint given and ../shared/data/stories260K/meta not found: skipped", file=sys.stderr)
                continue
            model = load_model(args.checkpoint, device=device, dtype=dtype)
            path = Path(args.checkpoint).resolve()
            name = path.parent.name if path.name in ("meta", "hf") else path.name  # stories260K/meta -> stories260K
        else:
            model = Transformer(get_preset(name, vocab_size=32000)).to(device=device, dtype=dtype).eval()
            model.reset_rope(device)
        if args.prompt_len + args.new_tokens > model.rope_cos.shape[0]:
            p.error(f"--prompt-len + --new-tokens exceeds {name}'s {model.rope_cos.shape[0]} positions")
        results += bench_ours(name, model, args)
        if args.hf:
            results += bench_hf(name, model, args)

    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"generate-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine, "torch": torch.__version__, "dtype": str(dtype), "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "runs": args.runs}
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    if out.suffix == ".csv":
        keys = list(dict.fromkeys(k for r in results for k in r))
        lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in results]
        tmp.write_text("\n".join(lines) + "\n")
    else:
        tmp.write_text(json.dumps({"setup": meta, "results": results}, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"# wrote {out}")


if __name__ == "__main__":
    main()
