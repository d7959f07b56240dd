"""fp32 matmul rate at SmolLM2-135M's own shapes on this machine: the ceiling of any update path here.

    .venv/bin/python benchmarks/matmul_shapes.py

Prints GFLOP/s for [M, k] x [k, n], best of 0.5 s of repeats, for the MLP's up and down projections and the
output projection, at M = 50 ... 3,200 rows (benchmarks/README.md, "The ceiling on this machine").
"""

import time

import torch

SHAPES = [(576, 1536), (1536, 576), (576, 49152)]  # MLP up, MLP down, output projection

torch.manual_seed(0)
print("rows  " + "  ".join(f"{k}->{n}" for k, n in SHAPES) + "   (GFLOP/s, float32)")
for m in (50, 200, 800, 3200):
    rates = []
    for k, n in SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(2):
            a @ b
        start, repeats = time.perf_counter(), 0
        while time.perf_counter() - start < 0.5:
            a @ b
            repeats += 1
        rates.append(2 * m * k * n * repeats / (time.perf_counter() - start) / 1e9)
    print(f"{m:>5} " + "  ".join(f"{r:>9.0f}" for r in rates))
