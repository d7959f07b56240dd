"""bf16 products at SmolLM2-135M's projection shapes, one thread, as a training pass meets them.

    .venv/bin/python benchmarks/cold_products.py [--packed]

A pass multiplies by each of the 210 projection matrices (30 layers x 7, shapes from
seal.bench.SMOLLM2_SHAPE) once forward and once for the input's gradient, so each weight comes from memory,
not from cache. This cycles through 210 such matrices (random, bf16) and prints GFLOP/s forward (x @ W.T)
and for the gradient (g @ W) at a few row counts, next to one matrix multiplied again and again (warm).
`--packed` adds the same products with each weight laid out once by oneDNN beforehand
(`torch.ops.mkldnn._reorder_linear_weight`), which gives the very same results.
(benchmarks/README.md, "Five self-edits a passage, and more leads that did not pay".)
"""

import argparse
import time

import torch

from seal.bench import SMOLLM2_SHAPE

WIDTH, INNER = SMOLLM2_SHAPE["hidden_size"], SMOLLM2_SHAPE["intermediate_size"]
KV = WIDTH // SMOLLM2_SHAPE["num_attention_heads"] * SMOLLM2_SHAPE["num_key_value_heads"]
# q, k, v, o, gate, up, down, each [out, in]
ATTENTION = [(WIDTH, WIDTH), (KV, WIDTH), (KV, WIDTH), (WIDTH, WIDTH)]
LAYER = ATTENTION + [(INNER, WIDTH), (INNER, WIDTH), (WIDTH, INNER)]
GATE = 4  # the index in LAYER of the matrix the warm column multiplies by again and again

parser = argparse.ArgumentParser()
parser.add_argument("--packed", action="store_true")
args = parser.parse_args()

torch.set_num_threads(1)
torch.manual_seed(0)
layers = SMOLLM2_SHAPE["num_hidden_layers"]
weights = [torch.randn(out, width).bfloat16() for _ in range(layers) for out, width in LAYER]
total = sum(w.numel() for w in weights)


def pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w, None)


def packed_product(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


if args.packed:
    packed_forward = [pack(w) for w in weights]
    packed_backward = [pack(w.t().contiguous()) for w in weights]


def best_seconds(fn, repeats: int = 4) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


columns = ["forward", "gradient", "warm"] + (["forward packed", "gradient packed"] if args.packed else [])


def rates(rows: int) -> list[float]:
    """GFLOP/s of each column at `rows` rows."""
    inputs = {width: torch.randn(rows, width).bfloat16() for width in {w.shape[1] for w in weights}}
    grads = {out: torch.randn(rows, out).bfloat16() for out in {w.shape[0] for w in weights}}
    warm = weights[GATE]
    runs = {
        "forward": lambda: [torch.nn.functional.linear(inputs[w.shape[1]], w) for w in weights],
        "gradient": lambda: [grads[w.shape[0]] @ w for w in weights],
        "warm": lambda: [torch.nn.functional.linear(inputs[warm.shape[1]], warm) for _ in weights],
    }
    if args.packed:
        pairs = list(zip(weights, packed_forward, packed_backward, strict=True))
        runs["forward packed"] = lambda: [packed_product(inputs[w.shape[1]], p) for w, p, _ in pairs]
        runs["gradient packed"] = lambda: [packed_product(grads[w.shape[0]], p) for w, _, p in pairs]
    flops = {name: 2 * rows * total for name in columns} | {"warm": 2 * rows * warm.numel() * len(weights)}
    return [flops[name] / best_seconds(runs[name]) / 1e9 for name in columns]


print("rows  " + "  ".join(f"{c:>15}" for c in columns) + "   (GFLOP/s, bf16, one thread)")
for rows in (11, 40, 128, 256):
    print(f"{rows:>4}  " + "  ".join(f"{r:>15.0f}" for r in rates(rows)))
if args.packed:
    w = weights[GATE]
    x, g = torch.randn(40, w.shape[1]).bfloat16(), torch.randn(40, w.shape[0]).bfloat16()
    forward_same = torch.equal(packed_product(x, packed_forward[GATE]), torch.nn.functional.linear(x, w))
    gradient_same = torch.equal(packed_product(g, packed_backward[GATE]), g @ w)
    print("packed products equal to the plain ones bit for bit:", forward_same and gradient_same)
