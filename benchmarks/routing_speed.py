"""The batched update and decoding of 4 adapters, for each way of routing rows to adapters and pass length.

    .venv/bin/python benchmarks/routing_speed.py [--device cuda] [--epochs 2]
        [--variants runs/256,mask/2048/compile] [--peft]

Random weights in SmolLM2's shape (its tokenizer), bf16 on CUDA and fp32 on a CPU, as a run's defaults give.
The jobs are the 4 that `make bench` trained on 2026-11-27 (benchmarks/bench_jobs.json: 4, 6, 12 and 6
sequences, each a passage and the lines of a self-edit the model wrote), so the packing is a real run's.
Each variant trains them once to warm up on two sequences each, then for `--epochs`, then decodes 20 prompts
for 48 tokens with 4 adapters, 5 prompts each. `--peft` adds PEFT in fp32, one job after another (the naive
reference's update). (benchmarks/README.md, "On a GPU, a third look".)
"""

import argparse
import json
import time
from pathlib import Path

import torch

from seal.adapt import LoraUpdater, UpdateJob
from seal.bench import SMOLLM2_SHAPE
from seal.config import AdaptConfig, ModelConfig
from seal.models import load_model
from seal.multilora import MultiLoraUpdater

parser = argparse.ArgumentParser()
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument(
    "--variants", default="runs/256,runs/2048,mask/256,mask/2048", help="routing/pack[/compile],..."
)
parser.add_argument("--peft", action="store_true")
args = parser.parse_args()

device = torch.device(args.device)
torch.use_deterministic_algorithms(True)  # as a run's default `deterministic=true`
jobs = [UpdateJob(**job) for job in json.loads((Path(__file__).parent / "bench_jobs.json").read_text())]
steps = sum(len(job.sequences) for job in jobs) * args.epochs
prompts = [f"Question {i}: what did the report about item {i} say happened next?" for i in range(20)]


def model(dtype: str):
    shape = dict(tiny=SMOLLM2_SHAPE, device=args.device, dtype=dtype, autocast=False)
    return load_model(ModelConfig(name="smollm2_shape", **shape), "~/.cache/seal", seed=0)


def timed(fn):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def adapt(**kwargs) -> AdaptConfig:
    return AdaptConfig(rank=32, alpha=64, epochs=args.epochs, lr=1e-3, batch_size=1, **kwargs)


def batched(variant: str) -> None:
    routing, pack_length, *flags = variant.split("/")
    lm = model("bfloat16" if device.type == "cuda" else "float32")
    settings = dict(lora_routing=routing, pack_length=int(pack_length), compile="compile" in flags)
    updater = MultiLoraUpdater(lm, adapt(**settings), len(jobs))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    updater.train([UpdateJob(job.key, job.sequences[:2], job.seed) for job in jobs])  # warm-up
    seconds, adapters = timed(lambda: updater.train(jobs))
    peak = f", peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MB" if device.type == "cuda" else ""
    losses = [round(a.result.epoch_losses[-1], 4) for a in adapters]
    per_step = 1000 * seconds / steps
    print(f"{variant:18s} update {seconds:6.2f} s, {per_step:6.1f} ms/job-step{peak}, losses {losses}")
    rows = [adapters[i % len(adapters)] for i in range(len(prompts))]
    updater.generate(prompts[:4], rows[:4], max_new_tokens=4)  # warm-up
    seconds, _ = timed(lambda: updater.generate(prompts, rows, max_new_tokens=48, batch_size=32))
    print(f"{variant:18s} decode {seconds:6.2f} s, {1000 * seconds / 48:6.1f} ms per step", flush=True)


print(f"{device}, {len(jobs)} jobs, {args.epochs} epochs, {steps} job-steps", flush=True)
for variant in args.variants.split(","):
    batched(variant)
if args.peft:
    peft = LoraUpdater(model("float32"), adapt())
    peft.train([UpdateJob(jobs[0].key, jobs[0].sequences[:2], jobs[0].seed)])  # warm-up
    seconds, _ = timed(lambda: [peft.train([job]) for job in jobs])
    print(f"peft fp32  update {seconds:6.2f} s, {1000 * seconds / steps:6.1f} ms/job-step")
