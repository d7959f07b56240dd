"""`accelerate launch [--config_file conf/accelerate/ddp.yaml] -m seal.sft RUN_DIR ROUND SEED` (or `torchrun
--nproc_per_node N -m seal.sft ...`): the SFT of a ReST-EM round's generator in several processes, one per GPU
(the 7B case; `rl.sft.launcher=accelerate` or `torchrun` starts it and waits). On CPU the processes use gloo.

Each process rebuilds the generator as it was before round ROUND: the run's model (from RUN_DIR/config.yaml)
with the adapters of the earlier rounds merged, as a resumed run does. It then fine-tunes a fresh adapter on
RUN_DIR/rounds/round_ROUND/sft_data.json with `seal.rl.sft_train`, each process taking its share of every
batch, weighted by its completion tokens so that the processes train the adapter one process would (up to
rounding) however the rows divide among them. The first process saves the adapter there
(generator_adapter.safetensors) with the last epoch's mean loss (sft_result.json). The run's process merges
it, as it merges an adapter it trained itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from seal.config import Config
from seal.models import load_model, resolve_device, setup_runtime
from seal.rl import RoundStore, apply_adapter, sft_train

USAGE = "usage: accelerate launch [options] -m seal.sft RUN_DIR ROUND SEED (or torchrun [options] -m ...)"


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(USAGE, file=sys.stderr)
        return 2
    from accelerate import Accelerator

    run_dir, k, seed = Path(argv[0]), int(argv[1]), int(argv[2])
    cfg: Config = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(run_dir / "config.yaml"))
    )
    accelerator = Accelerator(cpu=resolve_device(cfg.model.device).type == "cpu")
    cfg.model.device = str(accelerator.device)  # this process's GPU (or the CPU)
    setup_runtime(cfg)
    store = RoundStore(run_dir)
    examples = [(e["prompt"], e["completion"]) for e in store.read(k, "sft_data.json")]
    generator = load_model(cfg.model, cfg.paths.cache_dir, seed=cfg.seed)
    for earlier in range(1, k):
        adapter = store.load_adapter(earlier)
        if adapter is not None:
            apply_adapter(generator, adapter, cfg.rl.sft)
    _, state, loss = sft_train(generator, examples, cfg.rl.sft, seed, accelerator)
    if accelerator.is_main_process:
        store.save_adapter(k, state)
        store.write(k, "sft_result.json", {"loss": loss, "processes": accelerator.num_processes})
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
