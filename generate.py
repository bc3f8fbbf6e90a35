"""Generate text with a LLaMA checkpoint: a raw completion, an Alpaca instruction, a chat-like loop, or a
whole file of instructions written out in AlpacaEval's format.

    python generate.py --checkpoint out/tiny --prompt "Once upon a time"
    python generate.py --checkpoint out/tiny --instruction "Name three colors."
    python generate.py --checkpoint out/tiny --interactive
    python generate.py --checkpoint out/tiny --prompts-file alpaca_eval.json --out model_outputs.json

Text goes to stdout as it is made; speed and progress go to stderr, so stdout can be piped as it is.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from minialpaca.checkpoint import CheckpointError, check_tokenizer, find_tokenizer, load_model
from minialpaca.data import format_prompt
from minialpaca.generation import generate
from minialpaca.model import KERNEL_CHOICES
from minialpaca.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="Meta dir, Hugging Face dir, llama2.c .bin, or our own dir")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the tokenizer.model beside the checkpoint)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="raw text to continue (BOS + text); the prompt is echoed")
    what.add_argument("--instruction", help="an instruction, answered with the Alpaca template")
    what.add_argument("--interactive", action="store_true", help="read instructions from stdin, one per line")
    what.add_argument("--prompts-file", help="JSON list or JSON Lines of {instruction, input?} records")
    p.add_argument("--input", default="", help="the optional input of --instruction")
    p.add_argument("--out", help="where --prompts-file writes its outputs (AlpacaEval's JSON format)")
    p.add_argument("--generator", help="the `generator` name in --out (default: the checkpoint's name)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together with --prompts-file")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on CUDA, float32 elsewhere")
    p.add_argument("--kernels", choices=KERNEL_CHOICES, default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the one-token decode step")
    args = p.parse_args(argv)
    if args.input and args.instruction is None:
        p.error("--input goes with --instruction")
    if args.prompts_file and not args.out:
        p.error("--prompts-file needs --out")
    if args.out and not args.prompts_file:
        p.error("--out goes with --prompts-file")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


def read_records(path) -> list:
    """Alpaca records from a JSON list or JSON Lines file, every one checked before any is generated."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts file {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"prompts file {path}: not valid JSON ({e})") from None
    else:  # JSON Lines: one record per line
        records = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"prompts file {path}, line {n}: not valid JSON ({e})") from None
    if not records:
        raise ValueError(f"prompts file {path} holds no records")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"prompts file {path}, record {i}: expected an object, got {type(r).__name__}")
        if not isinstance(r.get("instruction"), str) or not r["instruction"].strip():
            raise ValueError(f"prompts file {path}, record {i}: 'instruction' must be a non-empty string")
        if r.get("input") is not None and not isinstance(r["input"], str):
            raise ValueError(f"prompts file {path}, record {i}: 'input' must be a string")
    return records


def load(args):
    tokenizer_path = args.tokenizer or find_tokenizer(args.checkpoint)
    if tokenizer_path is None:
        raise CheckpointError(f"no tokenizer.model beside checkpoint {args.checkpoint}; pass --tokenizer")
    tokenizer = Tokenizer(tokenizer_path)
    t0 = time.perf_counter()
    model = load_model(args.checkpoint, device=args.device, dtype=DTYPES[args.dtype], kernels=args.kernels)
    check_tokenizer(model, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"loaded {args.checkpoint} ({n_params / 1e6:.2f}M params, {args.dtype}, {args.device}) "
        f"in {time.perf_counter() - t0:.1f}s")
    return model, tokenizer


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def sampling(args) -> dict:
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                compile=args.compile)


def stream(model, tokenizer, prompt_ids, args, echo_prompt: bool):
    """Generate for one prompt, printing text as it comes, then speed on stderr.

    Each new token decodes the whole sequence and prints what was added: SentencePiece decides a piece's
    leading space from its neighbours, so decoding tokens one by one would glue or split words."""
    shown = tokenizer.decode(prompt_ids)
    if echo_prompt:
        sys.stdout.write(shown)
    started = echo_prompt  # an answer's leading whitespace is dropped
    new, times = [], []

    def show(text):
        nonlocal shown, started
        piece, shown = text[len(shown):], text
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()

    def on_token(row, token_id):
        times.append(time.perf_counter())
        new.append(token_id)
        text = tokenizer.decode(prompt_ids + new)
        if not text.endswith("\ufffd"):  # else half of a multi-byte character: wait for the rest of it
            show(text)

    t0 = time.perf_counter()
    generate(model, [prompt_ids], args.max_new_tokens, eos_id=tokenizer.eos_id, on_token=on_token, **sampling(args))
    end = time.perf_counter()
    show(tokenizer.decode(prompt_ids + new) + "\n")
    report_speed(len(prompt_ids), len(new), len(new) < args.max_new_tokens, t0, times[0] if times else end, end)


def report_speed(n_prompt, n_new, hit_eos, t0, t_first, end):
    """Prefill = until the first token is known; decode = each later step (the EOS step included)."""
    steps = n_new + hit_eos - 1
    decode = f"{steps / (end - t_first):.1f} tok/s" if steps > 0 and end > t_first else "n/a"
    log(f"[{n_new} tokens{' (EOS)' if hit_eos else ''}; prefill {n_prompt} tokens at "
        f"{n_prompt / (t_first - t0):.1f} tok/s; decode {decode}]")


def run_file(model, tokenizer, records, args):
    """Answer every record in batches (shortest prompts together, to pad little) and write AlpacaEval's format."""
    prompts = [tokenizer.encode(format_prompt(r["instruction"], r.get("input") or "")) for r in records]
    limit = model.rope_cos.shape[0]
    for i, p in enumerate(prompts):
        if len(p) + args.max_new_tokens > limit:
            raise ValueError(f"prompts file {args.prompts_file}, record {i}: its prompt ({len(p)} tokens) plus "
                             f"--max-new-tokens {args.max_new_tokens} exceeds the model's {limit} positions")
    generator = args.generator or Path(args.checkpoint).resolve().name.removesuffix(".bin")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [None] * len(prompts)
    t0, n_tokens = time.perf_counter(), 0
    for b in range(0, len(order), args.batch_size):
        rows = order[b : b + args.batch_size]
        outs = generate(model, [prompts[i] for i in rows], args.max_new_tokens, eos_id=tokenizer.eos_id,
                        **sampling(args))
        for i, ids in zip(rows, outs):
            answers[i] = tokenizer.decode(ids).strip()
            n_tokens += len(ids)
        log(f"[{min(b + args.batch_size, len(order))}/{len(order)} records, "
            f"{n_tokens / (time.perf_counter() - t0):.1f} tok/s]")

    results = []
    for r, answer in zip(records, answers):
        out = {"instruction": r["instruction"], "input": r.get("input") or "", "output": answer, "generator": generator}
        if "dataset" in r:  # AlpacaEval's records carry it; keep it for its leaderboard breakdown
            out["dataset"] = r["dataset"]
        results.append(out)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out_path)
    log(f"wrote {len(results)} outputs to {out_path}")


def main(argv=None):
    args = parse_args(argv)
    records = read_records(args.prompts_file) if args.prompts_file else None  # fail before the slow load
    model, tokenizer = load(args)

    if args.prompt is not None:
        stream(model, tokenizer, tokenizer.encode(args.prompt), args, echo_prompt=True)
    elif args.instruction is not None:
        stream(model, tokenizer, tokenizer.encode(format_prompt(args.instruction, args.input)), args, echo_prompt=False)
    elif args.interactive:
        while True:
            print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line.strip():  # an empty line or end of input
                break
            stream(model, tokenizer, tokenizer.encode(format_prompt(line.strip())), args, echo_prompt=False)
    else:
        run_file(model, tokenizer, records, args)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad input: one sentence, no traceback
        sys.exit(f"generate.py: error: {e}")
