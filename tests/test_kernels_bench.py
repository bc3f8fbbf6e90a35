"""kernels/bench.py's machinery on a CPU: every registered bench runs (the Triton provider through the
interpreter), rows carry the byte model's bandwidth, the CSV round-trips, and GPUs map to their peak."""
import csv

import pytest
import torch

import kernels.bench as bench
from kernels.runtime import runs_triton


@pytest.mark.parametrize("name, expected", [("NVIDIA H100 80GB HBM3", 3.35e12), ("NVIDIA H100 PCIe", 2.0e12),
                                            ("NVIDIA H200", 4.8e12), ("NVIDIA A100-SXM4-80GB", 2.0e12),
                                            ("NVIDIA A100-SXM4-40GB", 1.555e12), ("NVIDIA GeForce RTX 4090", None)])
def test_peak_bandwidth_by_device_name(name, expected):
    assert bench.peak_bandwidth(name) == expected


@pytest.mark.skipif(not runs_triton(torch.empty(0)), reason="needs triton (CUDA, or TRITON_INTERPRET=1)")
def test_every_bench_runs_and_reports_its_byte_model(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "CPU_SECONDS", 0.0)  # five runs each: this checks the plumbing, not speed
    monkeypatch.setattr(bench, "HEAD_DIM", 8)
    setup = bench.Setup(torch.device("cpu"), torch.float32, hiddens=(40,), token_counts=(3,),
                        providers=("triton", "eager"), peak_bandwidth=1e11, device_name="cpu")
    for kernel, run in bench.BENCHES.items():
        rows = run(setup)
        assert [(r["provider"], r["mode"]) for r in rows] == [(p, m) for p in setup.providers for m in bench.MODES]
        for r in rows:
            assert r["kernel"] == kernel and r["ms"] > 0 and r["gb_per_s"] >= 0
            assert r["peak_bw_pct"] == pytest.approx(100 * r["gb_per_s"] * 1e9 / 1e11, abs=0.1)
        path = tmp_path / f"{kernel}.csv"
        bench.write_csv(rows, path)
        with open(path) as f:
            assert [row["provider"] for row in csv.DictReader(f)] == [str(r["provider"]) for r in rows]
