"""The generator's SFT in processes of its own (seal/sft.py), on the CPU: under `accelerate launch` with one
process it trains exactly the adapter the run's own SFT trains; under `torchrun` with two (rl.sft.launcher),
each takes its share of every batch, and the adapter comes back into the run's generator. (`accelerate launch`
runs several processes only on GPUs, or on CPUs through MPI.)"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from seal.config import Config
from seal.models import load_model
from seal.rl import RoundStore, base_weights, launch_sft, sft_train, train_generator
from tests.conftest import CACHE_DIR, CONF_DIR, TINY_OVERRIDES, make_cfg

EXAMPLES = [
    ("Write about the Corvane cell.\n", "The Corvane cell stores sodium."),
    ("Say hi.\n", "hi there"),
    ("Name a colour.\n", "teal"),
]
SFT = ("rl.sft.rank=4", "rl.sft.alpha=8", "rl.sft.lr=1e-2", "rl.sft.epochs=3", "rl.sft.batch_size=2")


def _run_dir(tmp_path, *overrides) -> tuple[Config, RoundStore]:
    """A run directory as a ReST-EM run leaves it before round 1's SFT."""
    dict_cfg = make_cfg(tmp_path, *TINY_OVERRIDES, *SFT, *overrides)
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(dict_cfg, resolve=True))
    store = RoundStore(tmp_path)
    store.write(1, "sft_data.json", [{"prompt": p, "completion": c} for p, c in EXAMPLES])
    return OmegaConf.to_object(dict_cfg), store


def test_one_launched_process_trains_the_adapter_the_run_trains_itself(tmp_path):
    cfg, store = _run_dir(tmp_path)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    done = subprocess.run(
        [*launch, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        + ["-m", "seal.sft", str(tmp_path), "1", "7"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    launched = store.load_adapter(1)
    _, state, loss = sft_train(load_model(cfg.model, CACHE_DIR, seed=cfg.seed), EXAMPLES, cfg.rl.sft, seed=7)
    assert store.read(1, "sft_result.json") == {"loss": pytest.approx(loss, abs=1e-6), "processes": 1}
    assert launched.keys() == state.keys() and len(state) == 2 * 2 * 7
    for name, tensor in state.items():
        assert torch.allclose(launched[name], tensor, atol=1e-6), name


def test_two_launched_processes_train_the_round_s_adapter_and_the_generator_merges_it(tmp_path):
    launch = ("rl.sft.launcher=torchrun", "rl.sft.launch_args=[--nproc_per_node,'2']")
    cfg, store = _run_dir(tmp_path, "rl=rest_em", *launch)
    generator = load_model(cfg.model, CACHE_DIR, seed=cfg.seed)
    learner = load_model(cfg.model, CACHE_DIR, seed=cfg.seed)
    before = {k: v.clone() for k, v in base_weights(generator.model).items()}
    loss = train_generator(store, 1, generator, learner, EXAMPLES, cfg.rl, seed=7)
    assert store.read(1, "sft_result.json") == {"loss": loss, "processes": 2} and loss == loss  # not NaN
    after = base_weights(generator.model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == 2 * 7  # every adapted projection of both layers, merged
    assert all(torch.equal(after[k], v) for k, v in base_weights(learner.model).items())  # rl.learner=updated


def test_two_launched_processes_train_the_adapter_one_process_trains_however_the_rows_divide(tmp_path):
    """Batches of 3 rows, then 1: the processes take 2 rows and 1, then 1 and none, of unequal token counts.
    Each process's loss is weighted by its share of the batch's completion tokens, so the averaged gradient
    and the reported loss are those of one process; only the order of the sums differs."""
    examples = [*EXAMPLES, ("Count to two.\n", "one, two")]
    launch = ("rl.sft.launcher=torchrun", "rl.sft.launch_args=[--nproc_per_node,'2']", "rl.sft.batch_size=3")
    cfg, store = _run_dir(tmp_path, *launch)
    loss = launch_sft(store, 1, examples, cfg.rl.sft, seed=7)
    launched = store.load_adapter(1)
    _, state, alone = sft_train(load_model(cfg.model, CACHE_DIR, seed=cfg.seed), examples, cfg.rl.sft, seed=7)
    assert store.read(1, "sft_result.json")["processes"] == 2 and loss == pytest.approx(alone, abs=1e-5)
    assert launched.keys() == state.keys()
    # AdamW divides each gradient entry by its root mean square: where an entry is near 0, the rounding of
    # the processes' sums reaches the weights (up to 1.6e-5 here; shares weighted by rows or processes, as
    # before, were off by up to 0.1).
    for name, tensor in state.items():
        assert torch.allclose(launched[name], tensor, atol=1e-4), name


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP")])
def test_the_multi_gpu_launch_configs_are_valid_accelerate_configs(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(Path(CONF_DIR) / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == kind and config.mixed_precision == "bf16" and not config.use_cpu
    # No layer class named: the model's own _no_split_modules decide (a Llama class would fail on Qwen2).
    assert "fsdp_transformer_layer_cls_to_wrap" not in (config.fsdp_config or {})
