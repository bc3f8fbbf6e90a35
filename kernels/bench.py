"""Benchmark the kernels against PyTorch eager and torch.compile over LLaMA sizes.

    python -m kernels.bench                         # every kernel, full sweep (a GPU)
    python -m kernels.bench --kernels rmsnorm rope  # some of them
    python -m kernels.bench --quick                 # small sizes: a CPU finishes in a couple of minutes

For each kernel, hidden size and token count: forward and forward+backward time of each provider (the
Triton kernel, the PyTorch reference in eager mode, the reference under torch.compile), the median of
triton.testing.do_bench on a GPU (of time.perf_counter on a CPU); the achieved bandwidth from an explicit
byte model (each bench function states its own), and its share of the device's peak memory bandwidth; the
peak memory each call allocates on top of its inputs. Every provider is charged the same bytes, the minimum
the operation must move, so GB/s compares like with like and shows how close each gets to the roofline.
Without CUDA there is no Triton to time (the interpreter is a correctness tool), so eager is compared with
compile only.

Flash attention and the fused linear cross-entropy are measured by kernels/bench_fused.py (TFLOP/s with the
causal FLOP count; time and peak memory against eager and compile), run from here too.

Writes <out>/<kernel>.csv and <out>/<kernel>.png (when matplotlib is installed) per kernel.
Another kernel joins by writing a `bench_<name>(setup) -> rows` function built on `run_case` and listing it
in BENCHES.
"""
import argparse
import csv
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from kernels import bench_fused
from kernels.rmsnorm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference
from kernels.rope import apply_rope, rope_reference
from kernels.swiglu import swiglu, swiglu_reference
from minialpaca.model import ModelArgs, rope_tables

# Peak HBM bandwidth in bytes/s, by a substring of torch.cuda.get_device_name(); first match wins, so the
# more specific names come first.
PEAK_BANDWIDTH = [
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100 80GB", 2.0e12),  # PCIe ("NVIDIA A100 80GB PCIe")
    ("A100-SXM4-80GB", 2.0e12),
    ("A100", 1.555e12),  # 40GB, SXM or PCIe
]

FULL_SIZES = dict(hiddens=(4096, 5120, 8192), token_counts=(1024, 2048, 4096, 8192, 16384))
QUICK_SIZES = dict(hiddens=(1024,), token_counts=(256, 1024))
HEAD_DIM = 128  # LLaMA's, at every size above
MODES = ("forward", "forward+backward")
CPU_SECONDS = 1.0  # timing budget per measurement without CUDA (at least 5 runs)


@dataclass
class Setup:
    device: torch.device
    dtype: torch.dtype
    hiddens: tuple
    token_counts: tuple
    providers: tuple  # of "triton", "eager", "compile"
    peak_bandwidth: Optional[float]  # bytes/s; None for an unknown device or a CPU
    device_name: str


def peak_bandwidth(device_name: str) -> Optional[float]:
    for key, bandwidth in PEAK_BANDWIDTH:
        if key in device_name:
            return bandwidth
    return None


# ---------------------------------------------------------------------------------------------- measuring
def median_ms(fn: Callable, device: torch.device, reset: list) -> float:
    """Median wall time of fn in milliseconds. reset: tensors whose .grad is cleared before each call."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, grad_to_none=reset, return_mode="median")
    fn()  # warm-up: compiles, allocates
    fn()
    times = []
    deadline = time.perf_counter() + CPU_SECONDS
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 50):
        for t in reset:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def peak_memory_mb(fn: Callable, device: torch.device) -> Optional[float]:
    """Memory fn allocates at its peak beyond what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def run_case(setup: Setup, kernel: str, hidden: int, tokens: int, fns: dict, inputs: list, bytes_moved: dict) -> list:
    """Time every provider in fns ({provider: function}) on inputs, in both modes; one row per (provider,
    mode). bytes_moved: {mode: bytes} of the byte model. Inputs that require grad get their gradients in
    forward+backward mode, against one fixed random gradient per output."""
    differentiable = [t for t in inputs if t.requires_grad]
    rows = []
    for provider in setup.providers:
        fn = fns[provider]
        with torch.no_grad():
            outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        grads = [torch.randn_like(o) for o in outs]

        def forward():
            with torch.no_grad():
                fn(*inputs)

        def forward_backward():
            outs = fn(*inputs)
            torch.autograd.backward(outs if isinstance(outs, tuple) else (outs,), grads)

        for mode, call in zip(MODES, (forward, forward_backward)):
            ms = median_ms(call, setup.device, differentiable)
            for t in differentiable:
                t.grad = None
            gbps = bytes_moved[mode] / (ms * 1e-3) / 1e9
            rows.append(dict(
                kernel=kernel, hidden=hidden, tokens=tokens, dtype=str(setup.dtype).removeprefix("torch."),
                provider=provider, mode=mode, ms=round(ms, 4), gb_per_s=round(gbps, 1),
                peak_bw_pct=round(100 * gbps * 1e9 / setup.peak_bandwidth, 1) if setup.peak_bandwidth else "",
                peak_mem_mb=_round(peak_memory_mb(call, setup.device)), device=setup.device_name,
            ))
            for t in differentiable:
                t.grad = None
    return rows


def _round(x: Optional[float]):
    return "" if x is None else round(x, 1)


def providers_of(setup: Setup, kernel_fn: Callable, reference: Callable) -> dict:
    """The functions each provider runs. One compiled reference per kernel serves every size; dynamic=False
    gives each size its own specialized code, as a fixed-shape training run would get."""
    fns = {"eager": reference, "compile": torch.compile(reference, dynamic=False)}
    if "triton" in setup.providers:
        fns["triton"] = kernel_fn
    return fns


def randn(shape, setup: Setup, requires_grad=True) -> torch.Tensor:
    return torch.randn(shape, device=setup.device, dtype=setup.dtype, requires_grad=requires_grad)


# ---------------------------------------------------------------------------------------------- kernels
def bench_rmsnorm(setup: Setup) -> list:
    """x (tokens, hidden) and the weight in the run's dtype (as a mixed-precision model computes).
    Bytes: forward reads x, writes y; backward reads dy and x, writes dx (the weight, rstd and the weight
    gradient are O(hidden) or O(tokens): left out)."""
    fns = providers_of(setup, rms_norm, rms_norm_reference)
    rows = []
    for hidden in setup.hiddens:
        weight = torch.ones(hidden, device=setup.device, dtype=setup.dtype, requires_grad=True)
        for tokens in setup.token_counts:
            x = randn((tokens, hidden), setup)
            n = tokens * hidden * x.element_size()
            rows += run_case(setup, "rmsnorm", hidden, tokens, fns, [x, weight],
                             {"forward": 2 * n, "forward+backward": 5 * n})
    return rows


def bench_add_rmsnorm(setup: Setup) -> list:
    """h = x + residual, y = rms_norm(h), all in the run's dtype (a bf16 model's residual stream).
    Bytes: forward reads x and residual, writes h and y; backward reads dy, dh and h, writes dx (which is
    also the residual's gradient)."""
    fns = providers_of(setup, add_rms_norm, add_rms_norm_reference)
    rows = []
    for hidden in setup.hiddens:
        weight = torch.ones(hidden, device=setup.device, dtype=setup.dtype, requires_grad=True)
        for tokens in setup.token_counts:
            x, residual = randn((tokens, hidden), setup), randn((tokens, hidden), setup)
            n, s = tokens * hidden, x.element_size()
            rows += run_case(setup, "add_rmsnorm", hidden, tokens, fns, [x, residual, weight],
                             {"forward": 4 * n * s, "forward+backward": 8 * n * s})
    return rows


def bench_rope(setup: Setup) -> list:
    """q (1, tokens, hidden / 128, 128), cos/sin (1, tokens, 1, 64) fp32 gathered at positions 0..tokens-1.
    Bytes: forward reads q and writes the rotated q, backward the same with the gradient (the tables are
    shared by every head: left out)."""
    fns = providers_of(setup, apply_rope, rope_reference)
    rows = []
    cos_table, sin_table = rope_tables(HEAD_DIM, max(setup.token_counts), 10000.0, setup.device)
    for hidden in setup.hiddens:
        for tokens in setup.token_counts:
            q = randn((1, tokens, hidden // HEAD_DIM, HEAD_DIM), setup)
            cos, sin = cos_table[:tokens][None, :, None], sin_table[:tokens][None, :, None]  # (1, T, 1, D/2)
            n = q.numel() * q.element_size()
            rows += run_case(setup, "rope", hidden, tokens, fns, [q, cos, sin],
                             {"forward": 2 * n, "forward+backward": 4 * n})
    return rows


def bench_swiglu(setup: Setup) -> list:
    """gate and up (tokens, ffn_hidden) with Meta's ffn_hidden for the model size (11008 at 4096).
    Bytes: forward reads gate and up, writes the product; backward reads dy, gate, up, writes their two
    gradients."""
    fns = providers_of(setup, swiglu, swiglu_reference)
    rows = []
    for hidden in setup.hiddens:
        ffn_hidden = ModelArgs(dim=hidden, n_heads=max(1, hidden // HEAD_DIM)).hidden_dim
        for tokens in setup.token_counts:
            gate, up = randn((tokens, ffn_hidden), setup), randn((tokens, ffn_hidden), setup)
            n = tokens * ffn_hidden * gate.element_size()
            rows += run_case(setup, "swiglu", hidden, tokens, fns, [gate, up],
                             {"forward": 3 * n, "forward+backward": 8 * n})
    return rows


BENCHES = {
    "rmsnorm": bench_rmsnorm,
    "add_rmsnorm": bench_add_rmsnorm,
    "rope": bench_rope,
    "swiglu": bench_swiglu,
}
# Compute- and capacity-bound kernels, with their own measures (TFLOP/s, peak memory): kernels/bench_fused.py.
FUSED_BENCHES = {"attention": bench_fused.bench_attention, "cross_entropy": bench_fused.bench_cross_entropy}


# ---------------------------------------------------------------------------------------------- output
def write_csv(rows: list, path: Path):
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def plot(rows: list, path: Path) -> bool:
    """GB/s against tokens, a panel per (mode, hidden), a line per provider. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    hiddens = sorted({r["hidden"] for r in rows})
    fig, axes = plt.subplots(len(MODES), len(hiddens), figsize=(4.5 * len(hiddens), 7), squeeze=False)
    for i, mode in enumerate(MODES):
        for j, hidden in enumerate(hiddens):
            ax = axes[i][j]
            for provider in sorted({r["provider"] for r in rows}):
                points = [(r["tokens"], r["gb_per_s"]) for r in rows
                          if r["mode"] == mode and r["hidden"] == hidden and r["provider"] == provider]
                ax.plot(*zip(*points), marker="o", label=provider)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{rows[0]['kernel']} {mode}, hidden {hidden}")
            ax.set_xlabel("tokens")
            ax.set_ylabel("GB/s (byte model)")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle(f"{rows[0]['device']}, {rows[0]['dtype']}")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def summarize(rows: list, baselines=("compile", "eager")):
    """Per mode: the geometric-mean speedup of the first provider over each other one, and the best share
    of peak bandwidth."""
    first = rows[0]["provider"]
    for mode in MODES:
        by_case = {}
        for r in rows:
            if r["mode"] == mode:
                by_case.setdefault((r["hidden"], r["tokens"]), {})[r["provider"]] = r
        parts = []
        for other in baselines:
            if other != first and all(other in case for case in by_case.values()):
                ratios = [case[other]["ms"] / case[first]["ms"] for case in by_case.values()]
                parts.append(f"{math.exp(statistics.fmean(math.log(x) for x in ratios)):.2f}x the speed of {other}")
        shares = [r["peak_bw_pct"] for r in rows if r["mode"] == mode and r["provider"] == first and r["peak_bw_pct"] != ""]
        if shares:
            parts.append(f"up to {max(shares)}% of peak bandwidth")
        print(f"  {rows[0]['kernel']:<12} {mode:<17} {first}: " + ", ".join(parts))


def print_rows(rows: list):
    header = f"{'kernel':<12}{'hidden':>7}{'tokens':>7}  {'provider':<8}{'mode':<17}{'ms':>9}{'GB/s':>9}{'%peak':>7}{'MB':>8}"
    print(header)
    for r in rows:
        print(f"{r['kernel']:<12}{r['hidden']:>7}{r['tokens']:>7}  {r['provider']:<8}{r['mode']:<17}{r['ms']:>9.3f}"
              f"{r['gb_per_s']:>9.1f}{str(r['peak_bw_pct']):>7}{str(r['peak_mem_mb']):>8}")


# ---------------------------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", nargs="+", choices=list(BENCHES) + list(FUSED_BENCHES),
                        default=list(BENCHES) + list(FUSED_BENCHES))
    parser.add_argument("--quick", action="store_true", help=f"small sizes {QUICK_SIZES} instead of {FULL_SIZES}")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="input dtype (default: bf16 on a GPU, fp32 on a CPU)")
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="torch threads without CUDA (default 1: stable timings on a shared machine)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kernels"))
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    dtype_name = args.dtype or ("bf16" if cuda else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    if cuda:
        device, name = torch.device("cuda"), torch.cuda.get_device_name()
        bandwidth = peak_bandwidth(name)
        providers = ("triton", "eager", "compile")
        note = f"peak bandwidth {bandwidth / 1e12:.3g} TB/s" if bandwidth else "peak bandwidth unknown: no % of peak"
        print(f"{name}: {note}")
    else:
        device, name, bandwidth, providers = torch.device("cpu"), "cpu", None, ("eager", "compile")
        torch.set_num_threads(args.cpu_threads)
        name = f"cpu ({args.cpu_threads} thread{'s' if args.cpu_threads > 1 else ''})"
        print("No CUDA device: Triton kernels are not timed (the interpreter checks correctness, it is not fast); "
              "comparing PyTorch eager with torch.compile on the CPU.")
    # Each size is its own compiled graph (dynamic=False), forward and backward: more than dynamo's default.
    torch._dynamo.config.recompile_limit = 256
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    setup = Setup(device, dtype, sizes["hiddens"], sizes["token_counts"], providers, bandwidth, name)

    args.out.mkdir(parents=True, exist_ok=True)
    summaries = []
    for kernel in args.kernels:
        if kernel in FUSED_BENCHES:
            rows = FUSED_BENCHES[kernel](args)
            bench_fused.print_table(rows)
            if rows:
                write_csv(rows, args.out / f"{kernel}.csv")
            continue
        rows = BENCHES[kernel](setup)
        print_rows(rows)
        write_csv(rows, args.out / f"{kernel}.csv")
        if not plot(rows, args.out / f"{kernel}.png"):
            print(f"matplotlib is not installed: no plot for {kernel} (pip install matplotlib); the CSV has the numbers")
        summaries.append(rows)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\nSummary ({name}, {dtype_name}, geometric mean over sizes); results in {args.out}:")
    for rows in summaries:
        summarize(rows)


if __name__ == "__main__":
    main()
