"""One SmolLM2-135M layer's attention over a packed pass, forward and backward, bf16, one thread: torch's
scaled_dot_product_attention (on a CPU, its flash kernel) against seal.attention's batched products.

    LD_PRELOAD=$(ls .venv/tcmalloc/usr/lib/*/libtcmalloc_minimal.so.4) \
        .venv/bin/python benchmarks/attention_speed.py

(TCMalloc as runs have it, seal/allocator.py: with glibc's malloc both columns are slower and spread more.)

Heads and widths from seal.bench.SMOLLM2_SHAPE (9 query heads sharing 3 key/value heads, width 64). Each pass
holds 2 rows end to end under a block-diagonal causal mask, as a batched training pass does. Prints the best
of 5 rounds of 10 calls, in ms, and the largest difference from SDPA in float32.
(benchmarks/README.md, "Attention as batched products".)
"""

import time

import torch
import torch.nn.functional as F

from seal.attention import block_causal_mask, packed_attention_forward
from seal.bench import SMOLLM2_SHAPE

HEADS, KV_HEADS = SMOLLM2_SHAPE["num_attention_heads"], SMOLLM2_SHAPE["num_key_value_heads"]
WIDTH = SMOLLM2_SHAPE["hidden_size"] // HEADS


class Layer(torch.nn.Module):
    num_key_value_groups = HEADS // KV_HEADS
    is_causal = True


def inputs(length: int, dtype: torch.dtype):
    q, k, v = (
        torch.randn(1, heads, length, WIDTH).to(dtype).requires_grad_()
        for heads in (HEADS, KV_HEADS, KV_HEADS)
    )
    row = torch.arange(length) * 2 // length
    return q, k, v, block_causal_mask(row)


def sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)


def ours(q, k, v, mask):
    return packed_attention_forward(Layer(), q, k, v, mask)[0]


def milliseconds(attend, length: int) -> float:
    q, k, v, mask = inputs(length, torch.bfloat16)
    upstream = torch.randn(1, length, HEADS, WIDTH).bfloat16()
    for _ in range(3):
        attend(q, k, v, mask).backward(upstream)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(10):
            attend(q, k, v, mask).backward(upstream)
        best = min(best, (time.perf_counter() - start) / 10 * 1000)
    return best


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"{'tokens':>6} {'SDPA ms':>8} {'ours ms':>8} {'speed-up':>8}")
    for length in (13, 41, 96, 160, 192, 224, 256):
        slow, fast = milliseconds(sdpa, length), milliseconds(ours, length)
        print(f"{length:>6} {slow:>8.2f} {fast:>8.2f} {slow / fast:>7.2f}x")
    q, k, v, mask = inputs(200, torch.float32)
    difference = (ours(q, k, v, mask) - sdpa(q, k, v, mask)).abs().max()
    print(f"largest difference from SDPA, float32, 200 tokens: {difference:.1e}")
