"""Benchmarks of flash attention and the fused linear cross-entropy, run by `python -m kernels.bench`.

These two are compute- and memory-capacity-bound rather than bandwidth-bound, so they report TFLOP/s and
peak memory instead of bench.py's GB/s. Each `bench_*(args)` returns a list of dict rows; args needs only
`quick` (bool).

CUDA: attention TFLOP/s against scaled_dot_product_attention; cross-entropy ms and peak memory against eager
and torch.compile, at LLaMA sizes. CPU: the chunked PyTorch cross-entropy against eager at N=8192, dim=256,
V=32000 (time with 2 threads; peak memory as the RSS high-water mark of a fresh subprocess).
"""
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.cross_entropy import _linear_cross_entropy, default_chunk_size, linear_cross_entropy
from kernels.flash_attention import flash_attention

CPU_CE_SHAPE = (8192, 256, 32000)  # N tokens, dim, vocab
CPU_THREADS = 2


# ---------------------------------------------------------------------------------------------- attention
def attention_flops(B, H, T, D, causal=True):
    """Forward matmul FLOPs: QK^T and PV, 2 * 2 * B * H * T * T * D, halved when causal (4*B*H*T*T*D/2).
    The backward does 2.5x this (five T x T matmuls to the forward's two)."""
    return 4 * B * H * T * T * D / (2 if causal else 1)


def bench_attention(args):
    """bf16 causal attention at LLaMA shapes (16K tokens per batch, D=128; H_kv = H and a GQA 4:1 case)."""
    if not torch.cuda.is_available():
        print("bench_attention: no CUDA device; the interpreter's speed means nothing, skipped")
        return []
    from triton.testing import do_bench

    rows = []
    seqs = (1024, 4096) if args.quick else (512, 1024, 2048, 4096, 8192)
    heads = ((32, 32),) if args.quick else ((32, 32), (32, 8))
    D = 128
    for H, H_kv in heads:
        for T in seqs:
            B = max(1, 16384 // T)
            gen = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True)
            k = torch.randn(B, T, H_kv, D, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True)
            v = torch.randn(B, T, H_kv, D, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True)
            do = torch.randn_like(q)

            def sdpa(q, k, v):  # the model's torch path: (B, T, H, D) views transposed to (B, H, T, D)
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     is_causal=True, enable_gqa=H_kv != H)
                return out.transpose(1, 2)

            impls = {"triton": lambda q, k, v: flash_attention(q, k, v, causal=True), "sdpa": sdpa}
            # Agreement with SDPA, since these kernels were written without a GPU at hand.
            outs = {}
            for name, fn in impls.items():
                out = fn(q, k, v)
                out.backward(do)
                outs[name] = [out.detach().float()] + [x.grad.float() for x in (q, k, v)]
                q.grad = k.grad = v.grad = None
            err = max((a - b).abs().max().item() for a, b in zip(outs["triton"], outs["sdpa"]))

            flops = attention_flops(B, H, T, D)
            for name, fn in impls.items():
                fwd_ms = do_bench(lambda: fn(q, k, v))
                out = fn(q, k, v)
                bwd_ms = do_bench(lambda: out.backward(do, retain_graph=True), grad_to_none=[q, k, v])
                for direction, ms, f in (("fwd", fwd_ms, flops), ("bwd", bwd_ms, 2.5 * flops)):
                    rows.append(dict(bench="attention", impl=name, direction=direction, B=B, T=T, H=H, H_kv=H_kv, D=D,
                                     dtype="bf16", ms=round(ms, 3), tflops=round(f / ms / 1e9, 1),
                                     max_abs_err_vs_sdpa=err))
    return rows


# ---------------------------------------------------------------------------------------------- cross-entropy
def _eager_ce(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.T).float(), targets)


def _cuda_peak_mb(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _bench_cross_entropy_cuda(args):
    from triton.testing import do_bench

    rows = []
    compiled = torch.compile(_eager_ce)
    dim = 4096
    seqs = (2048, 8192) if args.quick else (512, 1024, 2048, 4096, 8192)
    for V in (32000, 128256):
        for N in seqs:
            gen = torch.Generator(device="cuda").manual_seed(0)
            hidden = torch.randn(N, dim, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True)
            weight = (torch.randn(V, dim, device="cuda", generator=gen) / math.sqrt(dim)).bfloat16().requires_grad_()
            targets = torch.randint(0, V, (N,), device="cuda", generator=gen)
            for name, fn in (("eager", _eager_ce), ("torch.compile", compiled), ("fused", linear_cross_entropy)):
                step = lambda: fn(hidden, weight, targets).backward()  # noqa: E731
                step()  # compile / warm up
                hidden.grad = weight.grad = None
                peak = _cuda_peak_mb(step)
                hidden.grad = weight.grad = None
                ms = do_bench(step, grad_to_none=[hidden, weight])
                rows.append(dict(bench="cross_entropy", impl=name, device="cuda", N=N, dim=dim, V=V, dtype="bf16",
                                 ms=round(ms, 3), peak_extra_mb=round(peak, 1)))
    return rows


def _cpu_ce_step(impl, hidden, weight, targets):
    """impl: 'eager' or 'chunk=<rows>' (the chunked PyTorch path, forced even under TRITON_INTERPRET)."""
    if impl == "eager":
        loss = _eager_ce(hidden, weight, targets)
    else:
        loss = _linear_cross_entropy(hidden, weight, targets, -100, "mean", int(impl.split("=")[1]), False)
    loss.backward()


def _cpu_ce_inputs():
    N, dim, V = CPU_CE_SHAPE
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, dim, generator=gen, requires_grad=True)
    weight = (torch.randn(V, dim, generator=gen) / math.sqrt(dim)).requires_grad_()
    return hidden, weight, torch.randint(0, V, (N,), generator=gen)


def _peak_rss_mb():
    """This process's resident-set high-water mark (Linux VmHWM). Not getrusage's ru_maxrss: that one
    carries the parent's peak across fork + exec, so a child of a big benchmark process would read it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory is measured on Linux only")


def _cpu_ce_peak_child(impl):
    """Run in a fresh process: one loss + backward; print how far it raised the RSS high-water mark, MiB."""
    torch.set_num_threads(CPU_THREADS)
    inputs = _cpu_ce_inputs()
    base = _peak_rss_mb()
    _cpu_ce_step(impl, *inputs)
    print(_peak_rss_mb() - base)


def _cpu_ce_peak_mb(impl):
    module = f"kernels.{Path(__file__).stem}"
    code = f"import {module} as m; m._cpu_ce_peak_child({impl!r})"
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS=str(CPU_THREADS))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _bench_cross_entropy_cpu(args):
    N, dim, V = CPU_CE_SHAPE
    torch.set_num_threads(CPU_THREADS)
    default = default_chunk_size(N, dim, V)
    chunks = [default, 512] if args.quick else sorted({64, default, 256, 512, 1024, 2048})
    impls = ["eager"] + [f"chunk={c}" for c in chunks]
    reps = 2 if args.quick else 5
    inputs = _cpu_ce_inputs()
    times = {impl: [] for impl in impls}
    for impl in impls:  # warm up
        _cpu_ce_step(impl, *inputs)
    # Interleaved repetitions, so load from other processes on a shared machine hits every impl alike;
    # the minimum is the least disturbed run.
    for _ in range(reps):
        for impl in impls:
            inputs[0].grad = inputs[1].grad = None
            start = time.perf_counter()
            _cpu_ce_step(impl, *inputs)
            times[impl].append((time.perf_counter() - start) * 1e3)
    peaks = {impl: _cpu_ce_peak_mb(impl) for impl in impls}
    rows = []
    for impl in impls:
        rows.append(dict(bench="cross_entropy", impl=impl if impl == "eager" else f"chunked-torch {impl}",
                         device=f"cpu x{CPU_THREADS} threads", N=N, dim=dim, V=V, dtype="fp32",
                         ms=round(min(times[impl]), 1), ms_median=round(statistics.median(times[impl]), 1),
                         peak_extra_mb=round(peaks[impl], 1),
                         time_vs_eager=round(min(times[impl]) / min(times["eager"]), 2),
                         memory_saving_vs_eager=round(peaks["eager"] / max(peaks[impl], 1e-9), 1)))
    return rows


def bench_cross_entropy(args):
    """Loss + backward: fused (chunked) against eager (and torch.compile on CUDA)."""
    return _bench_cross_entropy_cuda(args) if torch.cuda.is_available() else _bench_cross_entropy_cpu(args)


def print_table(rows):
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    widths = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(str(r.get(k, "")).ljust(widths[k]) for k in keys))
