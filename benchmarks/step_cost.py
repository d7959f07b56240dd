"""What one optimiser step of one adapter costs on this machine, as a fixed part plus a part per token.

    .venv/bin/python benchmarks/step_cost.py [HYDRA OVERRIDES, e.g. model.autocast=false]

SEAL's inner loop takes steps of one sequence (batch size 1). This trains one adapter of the bundled model,
with `make bench`'s settings (bf16 autocast where the CPU has fast bf16), in one lane on one thread, on
sequences of 2 to about 200 tokens, and prints the best time per step at each length and the least-squares
line through them: milliseconds per step = fixed + per token x tokens. Then one step of the shortest
sequence under `torch.profiler`, split into the base model's products (each weight read from memory once
forward and once for the input's gradient), the output projection's, the LoRA products, AdamW and
everything else. (benchmarks/README.md, "What a step costs".)
"""

import collections
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile

import seal.bench  # noqa: F401  (registers the schema of conf/bench.yaml)
from seal.adapt import UpdateJob, make_updater
from seal.models import load_model, setup_runtime

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly box jam".split()
LENGTHS = (2, 8, 30, 60, 120, 200)  # words; the tokenizer makes about as many tokens
STEPS = 6  # steps timed per call (one epoch of STEPS copies of the sequence)


def sequence(words: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(words))


def epoch(text: str) -> UpdateJob:
    """One epoch of STEPS one-sequence steps on `text`."""
    return UpdateJob("step", [text] * STEPS, 0)


def step_ms(updater, text: str, repeats: int = 3) -> float:
    """The best of `repeats` epochs of STEPS one-sequence steps, per step, after one untimed epoch."""
    job = epoch(text)
    updater.train([job])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        updater.train([job])
        best = min(best, (time.perf_counter() - start) / STEPS)
    return best * 1e3


def product_kind(shapes: list[list[int]], rank: int, vocabulary: int) -> str:
    """Which product a [rows, inner] @ [inner, columns] is. Only the LoRA products have the rank as a
    dimension (as rows, only the A matrices' gradient), as long as no sequence is `rank` tokens long."""
    (rows, inner), (_, columns) = shapes[0][:2], shapes[1][:2]
    if vocabulary in (inner, columns):
        return "output projection"
    return "LoRA products" if rank in (rows, inner, columns) else "base products"


def split(updater, text: str, vocabulary: int) -> dict[str, float]:
    """Milliseconds per step of each kind of work, from one profiled epoch."""
    job = epoch(text)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        updater.train([job])
    parts: dict[str, float] = collections.defaultdict(float)
    for event in prof.events():
        if event.name == "aten::_fused_adamw_":
            parts["AdamW"] += event.self_cpu_time_total
        elif event.name == "aten::mm":
            parts[product_kind(event.input_shapes, updater.cfg.rank, vocabulary)] += event.self_cpu_time_total
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    parts["everything else"] = total - sum(parts.values())
    return {name: us / 1e3 / STEPS for name, us in parts.items()}


if __name__ == "__main__":
    with initialize_config_dir(
        config_dir=str(Path(__file__).parents[1].resolve() / "conf"), version_base=None
    ):
        dict_cfg = compose("bench", overrides=["paths.output_dir=outputs/step_cost", *sys.argv[1:]])
    cfg = OmegaConf.to_object(dict_cfg)
    setup_runtime(cfg)
    torch.set_num_threads(1)
    lm = load_model(cfg.model, cfg.paths.cache_dir, seed=cfg.seed)
    updater = make_updater(lm, dataclasses.replace(cfg.adapt, epochs=1, lanes=1, max_adapters=1))
    print(f"one adapter, one thread, autocast {lm.autocast_dtype}, {torch.backends.cpu.get_cpu_capability()}")
    points = []
    for words in LENGTHS:
        text = sequence(words)
        tokens = len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
        points.append((tokens, step_ms(updater, text)))
        print(f"{tokens:4d} tokens: {points[-1][1]:7.1f} ms a step", flush=True)
    slope, fixed = statistics.linear_regression(*zip(*points, strict=True))
    print(f"fit: {fixed:.0f} ms a step + {slope:.2f} ms a token")
    vocabulary = lm.model.get_output_embeddings().weight.shape[0]
    parts = split(updater, sequence(LENGTHS[0]), vocabulary)
    shares = ", ".join(f"{name} {ms:.0f}" for name, ms in parts.items())
    print(f"one step of {points[0][0]} tokens, profiled, ms: {shares}")
