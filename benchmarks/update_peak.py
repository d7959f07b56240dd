"""Update time and peak memory of the configured updater on `make bench`'s own jobs, over all epochs.

    .venv/bin/python benchmarks/update_peak.py [HYDRA OVERRIDES, e.g. adapt.pack_length=512]

A whole update peaks in whichever step draws the most passages at once, so this trains the bench's K jobs
together for all `adapt.epochs`, in a fresh process, as the bench's probe does (CPU: peak RSS sampled every
10 ms; CUDA: peak allocated), without the rest of the bench. The self-edits are written first, as `make
bench` writes them (same seeds). (benchmarks/README.md, "The memory ratio met".)
"""

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from seal.bench import bench_jobs, probe
from seal.models import load_model, setup_runtime

if __name__ == "__main__":  # the probe's child process imports this file again
    with initialize_config_dir(
        config_dir=str(Path(__file__).parents[1].resolve() / "conf"), version_base=None
    ):
        dict_cfg = compose("bench", overrides=["paths.output_dir=outputs/update_peak", *sys.argv[1:]])
    cfg = OmegaConf.to_object(dict_cfg)
    setup_runtime(cfg)
    _, jobs = bench_jobs(cfg, load_model(cfg.model, cfg.paths.cache_dir, seed=cfg.seed))
    result = probe(dict_cfg, jobs)
    print(
        f"{len(jobs)} adapters together, {cfg.adapt.epochs} epochs, "
        f"pack_length {cfg.adapt.pack_length or 'auto'}: "
        f"update {result['update_s']:.1f} s, peak {result['peak_mb']:.0f} MB "
        f"(idle {result['baseline_mb']:.0f} MB)"
    )
