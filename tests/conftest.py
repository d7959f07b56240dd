"""Shared fixtures: Hydra-composed configs pointed at tmp_path, and one tiny real model per session."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from transformers import GraniteConfig, GraniteForCausalLM

from seal.config import ModelConfig, register_configs
from seal.models import LM, load_model

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CACHE_DIR = os.environ.get("SEAL_CACHE_DIR", str(Path.home() / ".cache" / "seal"))
# `SEAL_TEST_DEVICE=cuda pytest` runs the same tests on a GPU, in fp32 without autocast so that the
# equivalence tolerances keep their meaning.
DEVICE = os.environ.get("SEAL_TEST_DEVICE", "cpu")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # as seal.models.setup_runtime sets it
# Intel's MKL splits a float32 product with a long inner dimension between threads (the output projection's
# input gradient sums over the 49,152-token vocabulary), so on an Intel CPU the last digits of a run depend on
# its thread count. The executor tests compare a run on 2 threads with workers on one each, digit for digit.
# Strict conditional numerical reproducibility (read by MKL at its first call; child processes inherit it)
# makes those products independent of the thread count. Runs leave it to the user (README, "Scaling out").
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

# A GPU's allocator raises OutOfMemoryError; a CPU's that cannot allocate raises a plain RuntimeError.
OUT_OF_MEMORY = [
    torch.OutOfMemoryError("simulated"),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 140737488355328 bytes."),
]


register_configs()
torch.set_num_threads(max(1, os.cpu_count() or 1))


def make_cfg(tmp_path: Path, *overrides: str) -> DictConfig:
    """The project's config as `python -m seal.train` would compose it, with outputs in tmp_path."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                f"paths.output_dir={tmp_path}",
                f"paths.cache_dir={CACHE_DIR}",
                "logger=none",
                *overrides,
            ],
        )
    OmegaConf.set_struct(cfg, True)
    return cfg


TINY_OVERRIDES = (
    "model=tiny",
    "rl=none",  # tests of the outer loop (tests/test_rl.py) swap this for rl=rest_em
    "data.n_eval=2",
    "adapt.epochs=2",
    "self_edit.max_new_tokens=24",
    "task.max_new_tokens=8",
    f"model.device={DEVICE}",
    "model.dtype=float32",
    "model.autocast=false",
    "reasoning.per_task=2",  # 12 items: the probe's code, not its precision
)


def load_tiny(seed: int = 0) -> LM:
    shape = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model_cfg = ModelConfig(name="tiny", tiny=shape, device=DEVICE, dtype="float32", autocast=False)
    return load_model(model_cfg, CACHE_DIR, seed=seed)


def load_tiny_granite() -> LM:
    """A tiny random Granite with the tiny model's tokenizer, float32, no autocast: a model whose logits are
    more than its output projection (it divides them by `logits_scaling`)."""
    lm = load_tiny()
    config = GraniteConfig(
        vocab_size=len(lm.tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        logits_scaling=8.0,
    )
    torch.manual_seed(0)
    return dataclasses.replace(lm, model=GraniteForCausalLM(config).to(lm.device).eval(), autocast_dtype=None)


@pytest.fixture(scope="session")
def tiny_lm() -> LM:
    """Shared, never wrapped with adapters (tests that train load their own with `load_tiny`)."""
    return load_tiny()
