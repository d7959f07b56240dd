"""`python -m seal.train task=knowledge`: one SEAL run, read top to bottom.

config → model (loaded once, frozen) → task (conditions, inner loops, outer loop) → records.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from seal import allocator
from seal.config import Config, register_configs
from seal.memory import PhaseMeter
from seal.models import load_model, resolve_device, setup_runtime
from seal.report import report
from seal.tasks import few_shot, knowledge
from seal.tracking import Tracker, code_version, read_jsonl, write_json_atomic, write_jsonl

log = logging.getLogger(__name__)
TASKS = {"knowledge": knowledge.run, "few_shot": few_shot.run}
register_configs()


# What may change when a stopped run is continued: where things go, how they are logged and where the inner
# loops run, and the number of RL rounds (a finished run can be extended).
RESUMABLE_CHANGES = ("paths", "logger", "resume", "num_threads", "executor", "hydra", "rl.rounds")


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys and leaf values (a list is a leaf)."""
    if isinstance(tree, dict) and tree:
        return {key: leaf for k, v in tree.items() for key, leaf in flat(v, f"{prefix}{k}.").items()}
    return {prefix.removesuffix("."): tree}


def config_changes(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Why a run recorded with config `before` cannot continue under config `now`, one line per key: a value
    changed, a key gone, or a key added since the run started (by a newer version of seal) and set to other
    than its schema default. An added key at its default is no change: it resumes."""

    def relevant(config: dict[str, Any]) -> dict[str, Any]:
        return {
            k: v
            for k, v in flat(config).items()
            if not any(k == r or k.startswith(r + ".") for r in RESUMABLE_CHANGES)
        }

    before, now = relevant(before), relevant(now)
    defaults = flat(OmegaConf.to_container(OmegaConf.structured(Config)))
    lines = [
        f"{k}: {before[k]!r} -> {now[k]!r}" for k in sorted(before.keys() & now.keys()) if before[k] != now[k]
    ]
    lines += [f"{k}: {before[k]!r} -> (no longer a key)" for k in sorted(before.keys() - now.keys())]
    lines += [
        f"{k}: (added since; resumes only at its default {defaults.get(k, '(none)')!r}) -> {now[k]!r}"
        for k in sorted(now.keys() - before.keys())
        if k not in defaults or defaults[k] != now[k]
    ]
    return lines


def input_digests(config: dict[str, Any]) -> dict[str, str]:
    """The sha256 of every input file the configuration names (data, external self-edits, BIG-bench tasks,
    ARC files), by key: a run is continued only on the files it started with."""
    digests = {}
    for key, value in flat(config).items():
        if key.startswith(("paths.", "hydra.")):
            continue
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if names_a_file(item):
                name = f"{key}[{i}]" if isinstance(value, list) else key
                digests[name] = hashlib.sha256(Path(item).read_bytes()).hexdigest()
    return digests


def names_a_file(value: Any) -> bool:
    """Whether a config value is the path of an existing file (a prompt template is text, not a path)."""
    if not isinstance(value, str) or not value or "\n" in value:
        return False
    try:
        return Path(value).is_file()
    except OSError:  # e.g. a name longer than the file system allows
        return False


def check_resume(cfg: Config, config: dict[str, Any], run_dir: Path) -> bool:
    """True when `run_dir` holds a stopped (or finished) run to continue: cached inner loops and finished
    rounds are read back. Only a run of the same configuration may be continued (`config_changes`)."""
    if cfg.resume not in ("auto", "never"):
        raise ValueError(f"unknown resume {cfg.resume!r}: expected auto or never")
    if not (run_dir / "rounds").is_dir():
        return False
    if cfg.resume == "never":
        raise ValueError(
            f"{run_dir} holds an earlier run; continue it with resume=auto or choose another directory"
        )
    before = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    changes = config_changes(before, config)
    rounds = flat(before).get("rl.rounds")
    if isinstance(rounds, int) and cfg.rl.rounds < rounds:
        changes.append(f"rl.rounds: {rounds} -> {cfg.rl.rounds} (may only grow)")
    if (recorded := run_dir / "inputs.json").is_file():  # absent from runs started before it was written
        digests = input_digests(config)
        changes += [
            f"{key}: the file's content changed since the run started"
            for key, digest in json.loads(recorded.read_text()).items()
            if digests.get(key) != digest
        ]
    if changes:
        raise ValueError(
            f"{run_dir} holds a run with another configuration (choose another hydra.run.dir):\n  "
            + "\n  ".join(changes)
        )
    log.info("resuming the run in %s", run_dir)
    return True


def record_code(path: Path, resume: bool) -> None:
    """One line per start of the run in `path`: when, and which code (`code_version`). A resumed run keeps
    the lines before it, so a run continued on other code shows which code ran which part."""
    row = {"started": datetime.datetime.now().isoformat(timespec="seconds"), **code_version()}
    earlier = read_jsonl(path) if resume and path.is_file() else []
    write_jsonl(path, earlier + [row])


def run_name(cfg: Config) -> str:
    return f"{cfg.task.name}-{cfg.model.name}-{cfg.self_edit.name}-rl_{cfg.rl.name}-seed{cfg.seed}"


def sweep_job() -> tuple[str, str] | None:
    """In a sweep (`-m`): the sweep's name (its folder, which W&B groups by) and this job's overrides."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hc = HydraConfig.get()
    return Path(hc.sweep.dir).name, hc.job.override_dirname


def train(dict_cfg: DictConfig) -> dict[str, Any]:
    """Run the configured task and return its summary metrics (also in `summary.json` and W&B)."""
    sweep = sweep_job()
    if sweep and dict_cfg.logger.group is None:
        dict_cfg.logger.group = f"{dict_cfg.task.name}-{sweep[0]}"  # every job of a sweep in one W&B group
    cfg: Config = OmegaConf.to_object(dict_cfg)  # checked against the schema in seal/config.py
    if cfg.task.name not in TASKS:
        raise ValueError(f"unknown task {cfg.task.name!r}: expected one of {sorted(TASKS)}")
    for key, value, known in (
        ("rl.sft.launcher", cfg.rl.sft.launcher, ("local", "accelerate", "torchrun")),
        ("rl.learner", cfg.rl.learner, ("updated", "golden")),
        ("rl.reward.kind", cfg.rl.reward.kind, ("accuracy", "gain")),
    ):
        if value not in known:
            raise ValueError(f"unknown {key} {value!r}: expected one of {list(known)}")
    if (cfg.task.name, cfg.task.mode) != ("knowledge", "single"):
        # Settings only the knowledge task's single mode reads: refused elsewhere rather than ignored.
        for key, value, default in (
            ("executor", cfg.executor.name, "local"),
            ("generation.backend", cfg.generation.backend, "hf"),
            ("task.score_answers", cfg.task.score_answers, False),
            ("rl.reward.tie_break", cfg.rl.reward.tie_break, "first"),
            ("rl.reward.kind", cfg.rl.reward.kind, "accuracy"),
            ("rl.reward.forgetting_penalty", cfg.rl.reward.forgetting_penalty, 0.0),
            ("rl.reward.max_reasoning_drop", cfg.rl.reward.max_reasoning_drop, None),
            ("rl.accept_margin", cfg.rl.accept_margin, None),
            ("rl.repeats", cfg.rl.repeats, 1),
        ):
            if value != default:
                raise ValueError(
                    f"{key}={value} serves the inner loops of task=knowledge (task.mode=single); "
                    f"task={cfg.task.name} task.mode={cfg.task.mode} runs with {key}={default}"
                )
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(dict_cfg, resolve=True)
    resume = check_resume(cfg, config, run_dir)
    # summary.json marks a finished run: one resumed (perhaps extended by rl.rounds) has not finished yet.
    (run_dir / "summary.json").unlink(missing_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(dict_cfg, resolve=True))
    write_json_atomic(run_dir / "inputs.json", input_digests(config))
    record_code(run_dir / "code.jsonl", resume)
    setup_runtime(cfg)
    name = run_name(cfg) + (f" [{sweep[1]}]" if sweep else "")
    tracker = Tracker(run_dir, cfg.logger, config, name, resume=resume)
    failed = True
    try:
        meter = PhaseMeter(resolve_device(cfg.model.device))  # auto: the load is metered where it lands
        with meter.phase("load"):
            lm = load_model(cfg.model, cfg.paths.cache_dir, seed=cfg.seed)
        meter.device = lm.device
        metrics = TASKS[cfg.task.name](cfg, lm, tracker, meter)
        metrics.update(meter.metrics())
        metrics["mem/device"] = meter.kind
        metrics["mem/allocator"] = allocator.in_use()
        tracker.log(metrics)
        tracker.summary(metrics)
        report(metrics, run_dir)
        failed = False
        return metrics
    finally:
        tracker.finish(failed)  # also after an exception, so one failed job does not break a sweep


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train(cfg)


if __name__ == "__main__":
    main()
