"""Milliseconds per decoding step of SmolLM2-135M's shape, cold (lengths never seen) and warm.

    .venv/bin/python benchmarks/decode_speed.py [--cudnn-attention] [--rows 8] [--new 96]

Random weights in SmolLM2's shape (30 layers, 576 wide, its tokenizer), the final norm scaled so that the 95 %
nucleus holds tens of tokens, as a trained model's does. bf16 on CUDA, the run's defaults on a CPU. Each
generation is forced to `--new` tokens. The first greedy pass meets every sequence length for the first time;
the second repeats the same lengths. (benchmarks/README.md, "On a GPU, a second look".)
"""

import argparse
import time

import torch

from seal.bench import SMOLLM2_SHAPE
from seal.config import ModelConfig
from seal.models import generate, load_model

parser = argparse.ArgumentParser()
parser.add_argument("--cudnn-attention", action="store_true", help="let SDPA use cuDNN's attention (CUDA)")
parser.add_argument("--rows", type=int, default=8)
parser.add_argument("--new", type=int, default=96)
args = parser.parse_args()

cfg = ModelConfig(name="smollm2_shape", tiny=SMOLLM2_SHAPE, cudnn_attention=args.cudnn_attention)
lm = load_model(cfg, "~/.cache/seal")
lm.model.model.norm.weight.data *= 12
sentence = "The Qirra probe was built by Tessaline Aerospace in Port Vellan. "
prompts = [lm.format(f"Passage {i}: " + sentence * (8 + i)) for i in range(args.rows)]
generate(lm, [lm.format("Hello")], max_new_tokens=2)  # one-off start-up costs, at other lengths
force = lm.model.generate
lm.model.generate = lambda **kw: force(**kw, min_new_tokens=args.new)


def ms_per_step(**sampling) -> float:
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    generate(lm, prompts, max_new_tokens=args.new, batch_size=args.rows, **sampling)
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / args.new * 1000


name = torch.cuda.get_device_name() if lm.device.type == "cuda" else "cpu"
print(
    f"{name}, {lm.model.dtype}, {args.rows} rows x {args.new} tokens, cudnn_attention={args.cudnn_attention}"
)
print(f"greedy, cold: {ms_per_step():.1f} ms per step")
print(f"greedy, warm: {ms_per_step():.1f} ms per step")
seeds = list(range(args.rows))
print(f"sampled (top_p 0.95), warm: {ms_per_step(seeds=seeds, temperature=1.0, top_p=0.95):.1f} ms per step")
