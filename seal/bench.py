"""`make bench` (`python -m seal.bench`): the inner loop, a naive reference against ours, on the same work.

The work: K self-edits written by the model for a few passages; each is one inner loop, a LoRA update on the
passage plus the self-edit, then the closed-book evaluation of that passage's questions.

- naive: how the original code runs it. For every self-edit a fresh model is loaded and wrapped with PEFT,
  trained in fp32 with a plain loop over padded batches, then asked the questions on its own.
- ours: the configured updater (`adapt.batch_adapters`, autocast where the hardware has fast bf16): all K
  adapters trained together in shared packed passes, all their questions in one generation call. With
  `executor=processes`, the K jobs are split between forked worker processes of one thread each (one per
  physical core by default), each training its share together and then answering its questions.

Both run in this process with the same jobs (sequences, seeds, epochs), in `bench.rounds` rounds that take
turns at going first (ours then naive, naive then ours, ...), so that a slow spell of a shared host falls on
both; each method's figures are those of its median round, every round's kept in the record, and each ratio
of ours to naive is the median of the rounds' own ratios (the two methods' figures of the same round). Peak
memory is measured apart, each figure in a fresh child process, so that none sees another's heap: ours' update
of 1, 4 and K adapters, and the naive reference's update of one (it trains one adapter at a time, on a model
of its own, so one is what it holds for any K). The peaks measured in this process are kept, labelled as such.
Results are printed and written to `bench.results_dir` as JSON, after every round as well (`complete` false
until the last round and the memory probes are done), so a bench stopped part-way keeps its finished rounds.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import hydra
import psutil
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from seal import allocator
from seal.adapt import LoraUpdater, UpdateJob, UpdateResult, make_updater
from seal.config import AdaptConfig, Config, ModelConfig
from seal.executor import ChunkResult, WorkerLost, forked_workers, make_executor
from seal.grading import make_grader
from seal.memory import PhaseMeter
from seal.models import LM, fast_bf16, load_model, resolve_device, setup_runtime
from seal.multilora import balanced
from seal.self_edit import training_sequences
from seal.tasks.knowledge import Passage, answer, derive_seed, load_passages, write_self_edits
from seal.tracking import code_version, write_json_atomic

log = logging.getLogger(__name__)
# SmolLM2-135M's shape, for `model.tiny`: random weights that cost what the real ones cost (the scripts in
# benchmarks/ use it where the weights' values do not matter).
SMOLLM2_SHAPE = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
)
MEMORY_K = 4  # the memory probe compares one adapter with this many too, whatever K (the 1.5x target's K)
# Update FLOPs per trained token. A matmul costs 2 FLOPs per weight per token forward; the base weights are
# frozen, so backward computes the activations' gradient (2 more) but not the weights': 4 per weight. The
# LoRA matrices and attention scores are left out, so the figure slightly undercounts the work done.
FLOP_FORMULA = "update FLOPs = 4 x {params:,} matmul weights (output projection included) x trained tokens"
# What each memory figure of the record is (written into it as `memory_figures`).
MEMORY_FIGURES = {
    "memory.<n>.peak_mb": "ours' update of the first n self-edits together, in a fresh process of its own",
    "memory.naive.peak_mb": (
        "the naive reference's update of the first self-edit (a fresh fp32 PEFT model), in a fresh process "
        "of its own: its peak for any K, as it trains one self-edit at a time on a model of its own"
    ),
    "ratios.peak_mb_update": "memory.<K>.peak_mb / memory.naive.peak_mb",
    "naive.peak_mb, ours.peak_mb": (
        "each phase's peak in the bench's own process, in the method's first round: the naive reference's "
        "includes the bench's model, ours' updater and the heap ours left (ours runs first), so it is no "
        "measure of the naive reference alone"
    ),
}


@dataclass
class BenchConfig:
    passages: int = 2  # evaluation passages of the task's data
    self_edits_per_passage: int = 2  # K = passages x self_edits_per_passage
    # Each method runs this many times, the two taking turns at going first; each one's figures are from its
    # median round (by self-edits per hour; of an even number, the slower middle one). On the 2-core hosts
    # the naive reference's update took 141-211 s from run to run (benchmarks/README.md). 1: once each.
    rounds: int = 3
    # Peak memory of ours' update of 1 vs 4 and K adapters, and of the naive reference's of one, each in a
    # fresh child process: the table's fresh-process peaks and their ratio come from these.
    memory_probe: bool = True
    # The probes' epochs; 0: all of adapt.epochs. With lanes, a whole update peaks higher than its first epoch
    # does, in whichever step the lanes' largest passes meet (the bench's 4 adapters on the AVX2 CPU: 2,375
    # MB against 2,224; one adapter 1,496 against 1,454).
    probe_epochs: int = 0
    peak_matmul_size: int = 4096  # largest square matmul tried when measuring the peak FLOP/s
    results_dir: str = "benchmarks/results"


@dataclass
class BenchRunConfig(Config):
    bench: BenchConfig = field(default_factory=BenchConfig)


ConfigStore.instance().store(name="seal_bench_schema", node=BenchRunConfig)


# ---------------------------------------------------------------- the machine


def matmul_peak(dtype: torch.dtype, device: torch.device, size: int, seconds: float = 1.0) -> float:
    """Achieved FLOP/s of square matmuls in `dtype`, doubling from 256 up to `size` while one takes under
    0.2 s (a dtype the hardware only emulates is measured small instead of for minutes); the best rate."""
    best, n = 0.0, 256
    while n <= size:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b  # warm-up (kernel selection, first-touch allocation)
        took, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            _sync(device)
            start = time.perf_counter()
            a @ b
            _sync(device)
            took = time.perf_counter() - start
            best = max(best, 2 * n**3 / took)
        if took > 0.2:
            break
        n *= 2
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_parameters(lm: LM) -> int:
    """Weights that multiply every token: the base model's linear layers, the output projection included."""
    return sum(
        module.weight.numel()
        for name, module in lm.model.named_modules()
        if isinstance(module, torch.nn.Linear) and "lora_" not in name
    )


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": psutil.cpu_count(logical=False),
        "threads": torch.get_num_threads(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "allocator": allocator.in_use(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ---------------------------------------------------------------- the work


def bench_jobs(cfg: Config, lm: LM) -> tuple[list[Passage], list[UpdateJob]]:
    """The passages and one update job per self-edit (K = passages x self_edits_per_passage)."""
    passages = load_passages(replace(cfg.data, n_eval=cfg.bench.passages, n_train=0)).eval
    per = cfg.bench.self_edits_per_passage
    owners = [p for p in passages for _ in range(per)]
    seeds = [derive_seed(cfg.seed, "bench", p.name, i % per) for i, p in enumerate(owners)]
    edits = write_self_edits(lm, cfg.self_edit, owners, seeds)
    jobs = [
        UpdateJob(
            key=f"{p.name}#{i % per}",
            sequences=training_sequences(
                p.title, p.context, edit, cfg.self_edit.split, include_passage=cfg.adapt.include_passage
            ),
            seed=derive_seed(cfg.seed, "bench-adapter", p.name, i % per),
        )
        for i, (p, edit) in enumerate(zip(owners, edits, strict=True))
    ]
    return owners, jobs


def correct_counts(cfg: Config, owners: list[Passage], answers: list[list[str]]) -> list[int]:
    grade = make_grader(cfg.task.grader, cfg.task.f1_threshold)
    return [
        sum(grade(q.question, q.answer, a) for q, a in zip(p.questions, ans, strict=True))
        for p, ans in zip(owners, answers, strict=True)
    ]


def naive_settings(cfg: Config) -> tuple[ModelConfig, AdaptConfig]:
    """The naive reference's model and updater settings: fp32 weights without autocast, no gradient
    checkpointing."""
    model = replace(cfg.model, autocast=False, dtype="float32")
    return model, replace(cfg.adapt, gradient_checkpointing=False)


def run_naive(cfg: Config, owners: list[Passage], jobs: list[UpdateJob]) -> dict[str, Any]:
    """A fresh fp32 PEFT model per self-edit, trained alone (no gradient checkpointing), then asked its
    questions alone."""
    model_cfg, adapt_cfg = naive_settings(cfg)
    # The device the model is loaded on, from the first phase on: on CUDA every phase's peak is then allocated
    # memory, the first load's included.
    meter = PhaseMeter(resolve_device(model_cfg.device))
    answers: list[list[str]] = []
    results: list[UpdateResult] = []
    for passage, job in zip(owners, jobs, strict=True):
        with meter.phase("load"):
            lm = load_model(model_cfg, cfg.paths.cache_dir, seed=cfg.seed)
            updater = LoraUpdater(lm, adapt_cfg)
        with meter.phase("update"):
            adapters = updater.train([job])
        with meter.phase("eval"):
            answers += answer(lm, cfg.task, [passage], updater=updater, adapters=adapters)
        results += [a.result for a in adapters]
        del lm, updater
    return summarise("naive", cfg, owners, results, answers, dict(meter.seconds), dict(meter.peak_mb))


class OursRunner:
    """A chunk of the bench's inner loops, ours: the configured updater trains the chunk's jobs together, then
    all their questions go to one generation call. Runs in this process or in a forked worker."""

    def __init__(self, cfg: Config, lm: LM, adapt: AdaptConfig | None = None, answers: bool = True):
        self.cfg, self.lm, self.answers = cfg, lm, answers
        self.updater = make_updater(lm, adapt or cfg.adapt)

    def compute(self, chunk: list[tuple[Passage, UpdateJob]], desc: str) -> ChunkResult:
        meter = PhaseMeter(self.lm.device)
        with meter.phase("update"):
            adapters = self.updater.train([job for _, job in chunk])
        failed = [a.key for a in adapters if a.result.error]
        if failed:
            raise RuntimeError(f"updates failed, the comparison would be meaningless: {failed}")
        replies: list[list[str] | None] = [None] * len(chunk)
        if self.answers:
            with meter.phase("eval"):
                replies = answer(
                    self.lm, self.cfg.task, [p for p, _ in chunk], updater=self.updater, adapters=adapters
                )
        outcomes = [{"result": a.result, "answers": r} for a, r in zip(adapters, replies, strict=True)]
        return ChunkResult(outcomes, dict(meter.seconds), dict(meter.peak_mb))


def chunks_for(cfg: Config, jobs: list[UpdateJob]) -> list[list[int]]:
    """Which jobs each chunk holds: all in one with executor=local; with executor=processes one chunk per
    worker (at most one per job), balanced by the jobs' estimated cost (seal.adapt.UpdateJob.cost)."""
    if cfg.executor.name == "local":
        return [list(range(len(jobs)))]
    if cfg.executor.name != "processes":
        raise ValueError(f"the bench runs ours with executor=local or processes, not {cfg.executor.name!r}")
    return balanced([job.cost(cfg.adapt) for job in jobs], min(forked_workers(cfg.executor), len(jobs)))


def map_ours(
    cfg: Config,
    runner: OursRunner,
    owners: list[Passage],
    jobs: list[UpdateJob],
    groups: list[list[int]],
) -> tuple[list[dict[str, Any]], list[ChunkResult]]:
    """Every job's outcome, in the jobs' order, and each chunk's result (its phases' seconds and peaks)."""
    executor = make_executor(cfg.executor, local=lambda: runner, remote=None, weights=None)
    work = [([(owners[i], jobs[i]) for i in group], f"chunk {n}") for n, group in enumerate(groups)]
    outcomes: list[dict[str, Any] | None] = [None] * len(jobs)
    results: list[ChunkResult] = [None] * len(groups)  # type: ignore[list-item]
    for n, result in executor.map(work):
        if isinstance(result, WorkerLost):
            raise RuntimeError(f"ours: a worker was lost: {result}")
        results[n] = result
        for i, out in zip(groups[n], result.outcomes, strict=True):
            outcomes[i] = out
    executor.close()
    return outcomes, results  # type: ignore[return-value]


def run_ours(
    cfg: Config, runner: OursRunner, load: float, owners: list[Passage], jobs: list[UpdateJob]
) -> dict[str, Any]:
    """The configured updater and executor: each chunk's jobs in as few batched passes as
    `adapt.max_adapters` allows; with executor=processes, a chunk per worker process, all at once. `load` is
    the seconds `runner` took to build (its updater on the model: once per run, counted in every round),
    `update` the time until the last chunk finished updating, `eval` the rest."""
    start = time.perf_counter()
    outcomes, chunks = map_ours(cfg, runner, owners, jobs, chunks_for(cfg, jobs))
    wall = time.perf_counter() - start
    update = max(c.seconds["update"] for c in chunks)
    seconds = {"load": load, "update": update, "eval": wall - update}
    # Each chunk's own meter: the peak RSS of the process that computed it (a forked worker's RSS includes
    # the model it shares with this process). The memory probe counts shared memory once.
    peak = {phase: max(c.peak_mb[phase] for c in chunks) for phase in ("update", "eval")}
    results, answers = [o["result"] for o in outcomes], [o["answers"] for o in outcomes]
    record = summarise("ours", cfg, owners, results, answers, seconds, peak)
    record["chunks"] = [
        {"jobs": len(c.outcomes), "seconds": {k: round(v, 2) for k, v in c.seconds.items()}} for c in chunks
    ]
    return record


def summarise(
    name: str,
    cfg: Config,
    owners: list[Passage],
    results: list[UpdateResult],
    answers: list[list[str]],
    seconds: dict[str, float],
    peak_mb: dict[str, float],
) -> dict[str, Any]:
    failed = [r.key for r in results if r.error]
    if failed:
        raise RuntimeError(f"{name}: updates failed, the comparison would be meaningless: {failed}")
    tokens = sum(r.tokens for r in results)
    correct = correct_counts(cfg, owners, answers)
    questions = sum(len(p.questions) for p in owners)
    return {
        "self_edits": len(results),
        "seconds": {phase: round(s, 2) for phase, s in seconds.items()},
        "self_edits_per_hour": 3600 * len(results) / sum(seconds.values()),
        "update_tokens": tokens,
        "update_tokens_per_s": tokens / seconds["update"],
        "peak_mb": {phase: round(mb, 1) for phase, mb in peak_mb.items()},
        "final_losses": [round(r.epoch_losses[-1], 4) for r in results],
        # Each job's update, start to end: ours trains its jobs side by side, so its update lasts about as
        # long as its slowest job's chain of steps (a step cannot start before the job's previous one ends).
        "job_seconds": [round(r.seconds, 2) for r in results],
        "correct": correct,
        "accuracy": sum(correct) / questions,
        "answers": answers,
    }


# ---------------------------------------------------------------- memory of 1 vs K adapters


def probe_config(dict_cfg: dict[str, Any]) -> BenchRunConfig:
    """A probe's config, in its child process, set up as the bench's own."""
    cfg: BenchRunConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BenchRunConfig), dict_cfg))
    setup_runtime(cfg)
    return cfg


def memory_probe(dict_cfg: dict[str, Any], jobs: list[UpdateJob]) -> dict[str, Any]:
    """In a child process: load the model, train `jobs` once as ours does, return the update's peak memory.
    With executor=processes the jobs train in forked workers, and the peak is this process's RSS plus the
    workers' private memory, sampled every 0.25 s."""
    cfg = probe_config(dict_cfg)
    lm = load_model(cfg.model, cfg.paths.cache_dir, seed=cfg.seed)
    forked = cfg.executor.name == "processes"
    meter = PhaseMeter(lm.device, interval_s=0.25 if forked else 0.01, processes=forked)
    groups = chunks_for(cfg, jobs)
    epochs = cfg.bench.probe_epochs or cfg.adapt.epochs
    adapt = replace(cfg.adapt, epochs=epochs, max_adapters=max(map(len, groups)))
    runner = OursRunner(cfg, lm, adapt, answers=False)
    with meter.phase("idle"):  # the model and its empty slots, before training: RSS on CPU, allocated on CUDA
        pass
    with meter.phase("update"):
        map_ours(cfg, runner, [None] * len(jobs), jobs, groups)  # type: ignore[list-item]
    return probe_figures(meter, epochs)


def naive_memory_probe(dict_cfg: dict[str, Any], jobs: list[UpdateJob]) -> dict[str, Any]:
    """In a child process: the naive reference's update of one job as `run_naive` does it, on a fresh fp32
    PEFT model; the same figures as `memory_probe` (`baseline_mb`: the model loaded and wrapped)."""
    [job] = jobs  # the naive reference holds one at a time
    cfg = probe_config(dict_cfg)
    model_cfg, adapt_cfg = naive_settings(cfg)
    epochs = cfg.bench.probe_epochs or cfg.adapt.epochs
    lm = load_model(model_cfg, cfg.paths.cache_dir, seed=cfg.seed)
    updater = LoraUpdater(lm, replace(adapt_cfg, epochs=epochs))
    meter = PhaseMeter(lm.device)
    with meter.phase("idle"):
        pass
    with meter.phase("update"):
        [adapter] = updater.train([job])
    if adapter.result.error:
        raise RuntimeError(
            f"naive: the update failed, the comparison would be meaningless: {adapter.result.error}"
        )
    return probe_figures(meter, epochs)


def probe_figures(meter: PhaseMeter, epochs: int) -> dict[str, Any]:
    """A memory probe's record: the idle and update peaks, the update's seconds and its epochs."""
    return {
        "baseline_mb": meter.peak_mb["idle"],
        "peak_mb": meter.peak_mb["update"],
        "update_s": round(meter.seconds["update"], 2),
        "epochs": epochs,
    }


def probe(
    dict_cfg: DictConfig,
    jobs: list[UpdateJob],
    measure: Callable[[dict[str, Any], list[UpdateJob]], dict[str, Any]] = memory_probe,
) -> dict[str, Any]:
    """`measure` (ours' `memory_probe` or `naive_memory_probe`) in a fresh process (its errors are raised
    here)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(measure, OmegaConf.to_container(dict_cfg, resolve=True), jobs).result()


def memory_probes(dict_cfg: DictConfig, jobs: list[UpdateJob]) -> dict[str, Any]:
    """Peak memory of ours' update of the first 1, `MEMORY_K` and all K jobs, each `probe`d in a fresh
    process, each count's ratio to one adapter's (`ratios`; `ratio` is K's), and under `naive` the naive
    reference's update of the first job, `probe`d the same way: one job is all it holds at once, whatever
    K."""
    counts = sorted({1, min(MEMORY_K, len(jobs)), len(jobs)})
    memory: dict[str, Any] = {str(n): probe(dict_cfg, jobs[:n]) for n in counts}
    memory["ratios"] = {str(n): memory[str(n)]["peak_mb"] / memory["1"]["peak_mb"] for n in counts[1:]}
    memory["ratio"] = memory["ratios"].get(str(len(jobs)), 1.0)
    memory["naive"] = probe(dict_cfg, jobs[:1], naive_memory_probe)
    return memory


# ---------------------------------------------------------------- the benchmark


def median_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's record: its median round by self-edits per hour (of an even number of rounds, the slower
    middle one), with every round's times, rates and peaks under `rounds`, and `repeatable`: whether every
    round trained to the same final losses and gave the same answers. Its in-process peak memory is its first
    round's: later rounds run on the heap the earlier ones left (the probes measure memory apart)."""
    ranked = sorted(runs, key=lambda run: run["self_edits_per_hour"])
    record = dict(ranked[(len(ranked) - 1) // 2], peak_mb=runs[0]["peak_mb"])
    record["rounds"] = [
        {
            key: run[key]
            for key in ("seconds", "self_edits_per_hour", "update_tokens_per_s", "peak_mb", "job_seconds")
        }
        for run in runs
    ]
    record["repeatable"] = all(
        (run["final_losses"], run["answers"]) == (runs[0]["final_losses"], runs[0]["answers"]) for run in runs
    )
    return record


def median_ratio(
    runs: dict[str, list[dict[str, Any]]], figure: Callable[[dict[str, Any]], float]
) -> float | None:
    """Ours / naive of `figure`, each round's ours against the same round's naive reference: the median of the
    rounds' ratios (of an even number, the mean of the middle two), leaving out rounds where the naive
    reference's figure is 0 (a time rounded to 0.00 s); None where none is left."""
    ratios = [figure(a) / figure(b) for a, b in zip(runs["ours"], runs["naive"], strict=True) if figure(b)]
    return statistics.median(ratios) if ratios else None


def bench_ratios(
    runs: dict[str, list[dict[str, Any]]], memory: dict[str, Any] | None, k: int
) -> dict[str, Any]:
    """The table's ratios of ours to naive: those of times and rates by round (`median_ratio`); that of the
    update's peak memory from the fresh processes of the probes (ours' `k` adapters against the naive
    reference's one), None without them."""
    peak = memory[str(k)]["peak_mb"] / memory["naive"]["peak_mb"] if memory else None
    tokens = median_ratio(runs, lambda run: run["update_tokens_per_s"])
    return {
        "self_edits_per_hour": median_ratio(runs, lambda run: run["self_edits_per_hour"]),
        "update_tokens_per_s": tokens,
        "update_flops_per_s": tokens,  # the same FLOPs per token for both
        "seconds": {
            phase: median_ratio(runs, lambda run, phase=phase: run["seconds"][phase])
            for phase in ("load", "update", "eval")
        },
        "slowest_job_update_s": median_ratio(runs, lambda run: max(run["job_seconds"])),
        "peak_mb_update": peak,
    }


def bench_record(
    facts: dict[str, Any],
    runs: dict[str, list[dict[str, Any]]],
    params: int,
    peaks: dict[str, float],
    memory: dict[str, Any] | None,
    complete: bool,
) -> dict[str, Any]:
    """The bench's record from the rounds run so far (`runs`, each method's in order): each method's median
    round with its FLOP/s and MFU against each `peaks` dtype, each round's ratio, the table's ratios
    (`bench_ratios`) and the answers the two share, beside the run's `facts`; `complete` false while rounds or
    the memory probes are still to come."""
    naive, ours = median_round(runs["naive"]), median_round(runs["ours"])
    for result in (naive, ours):
        flops = 4 * params * result["update_tokens_per_s"]
        result["update_flops_per_s"] = flops
        result["mfu"] = {dtype: flops / peak for dtype, peak in peaks.items()}
    ratios = bench_ratios(runs, memory, facts["k"])
    return {
        **facts,
        "complete": complete,
        "naive": naive,
        "ours": ours,
        "rounds": len(runs["ours"]),
        # The headline: the median of the rounds' own ratios (`speedup_by_round`), since 2026-12-07. Before,
        # it was the ratio of the two methods' median rounds, often different rounds; that is kept beside it.
        "speedup_self_edits_per_hour": ratios["self_edits_per_hour"],
        "speedup_definition": "median of speedup_by_round",
        "speedup_of_median_rounds": ours["self_edits_per_hour"] / naive["self_edits_per_hour"],
        # each round's ours against the same round's naive reference
        "speedup_by_round": [
            a["self_edits_per_hour"] / b["self_edits_per_hour"]
            for a, b in zip(runs["ours"], runs["naive"], strict=True)
        ],
        "ratios": ratios,
        "memory_figures": MEMORY_FIGURES,
        "same_answers": sum(
            a == b
            for x, y in zip(naive["answers"], ours["answers"], strict=True)
            for a, b in zip(x, y, strict=True)
        ),
        "memory": memory,
    }


def bench(dict_cfg: DictConfig) -> dict[str, Any]:
    cfg: BenchRunConfig = OmegaConf.to_object(dict_cfg)
    if cfg.bench.probe_epochs < 0:
        raise ValueError(
            f"bench.probe_epochs must be 0 (all of adapt.epochs) or more, got {cfg.bench.probe_epochs}"
        )
    if cfg.bench.rounds < 1:
        raise ValueError(f"bench.rounds must be 1 or more, got {cfg.bench.rounds}")
    for key in ("passages", "self_edits_per_passage"):
        if getattr(cfg.bench, key) < 1:
            raise ValueError(f"bench.{key} must be 1 or more, got {getattr(cfg.bench, key)}")
    setup_runtime(cfg)
    lm = load_model(cfg.model, cfg.paths.cache_dir, seed=cfg.seed)
    device = lm.device
    peaks = {
        str(dtype).removeprefix("torch."): matmul_peak(dtype, device, cfg.bench.peak_matmul_size)
        for dtype in (torch.float32, torch.bfloat16)
    }
    params = matmul_parameters(lm)
    log.info("writing %d x %d self-edits", cfg.bench.passages, cfg.bench.self_edits_per_passage)
    owners, jobs = bench_jobs(cfg, lm)
    start = time.perf_counter()
    runner = OursRunner(cfg, lm)  # the updater's layers stay on the model: built once, for every round
    load = time.perf_counter() - start
    methods = {
        "ours": lambda: run_ours(cfg, runner, load, owners, jobs),
        "naive": lambda: run_naive(cfg, owners, jobs),
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in methods}
    log.info(
        "ours: %d adapters, batch_adapters=%s; naive: %d fresh PEFT models",
        len(jobs),
        cfg.adapt.batch_adapters,
        len(jobs),
    )
    started = datetime.datetime.now()
    path = Path(cfg.bench.results_dir) / f"{started:%Y-%m-%d_%H-%M-%S}_{cfg.model.name}_{device.type}.json"
    facts = {
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "code": code_version(),  # seal's version, commit and whether the checkout had changes
        "model": cfg.model.name,
        "device": str(device),
        "autocast": str(lm.autocast_dtype),
        # what ours' products compute in (autocast's dtype, else the weights': bf16 weights on CUDA); the
        # naive reference's, always float32
        "ours_compute_dtype": str(lm.compute_dtype),
        # where bf16 is emulated, MFU against its peak is meaningless: ours then runs in float32, like naive
        "fast_bf16": fast_bf16(device),
        "k": len(jobs),
        "epochs": cfg.adapt.epochs,
        # ours: in this process (local) or in forked workers of one thread each (processes), as many as it
        # used: one chunk of the jobs each, so never more than K
        "executor": cfg.executor.name,
        "workers": len(chunks_for(cfg, jobs)),
        # what a peak in the table is: peak RSS on CPU, peak allocated memory on CUDA
        "memory_measure": PhaseMeter(device).kind,
        "matmul_peak_flops_per_s": peaks,
        "flop_formula": FLOP_FORMULA.format(params=params),
        "questions": sum(len(p.questions) for p in owners),
        "config": OmegaConf.to_container(dict_cfg, resolve=True),
    }
    # The record is written after every round (`complete` false) and once more after the memory probes, so a
    # bench stopped part-way keeps the rounds it finished.
    for n in range(cfg.bench.rounds):
        for name in ("ours", "naive") if n % 2 == 0 else ("naive", "ours"):
            log.info("round %d of %d: %s", n + 1, cfg.bench.rounds, name)
            runs[name].append(methods[name]())
        write_json_atomic(path, bench_record(facts, runs, params, peaks, None, complete=False))
        log.info("round %d of %d written to %s", n + 1, cfg.bench.rounds, path)
    memory = memory_probes(dict_cfg, jobs) if cfg.bench.memory_probe else None
    record = bench_record(facts, runs, params, peaks, memory, complete=True)
    write_json_atomic(path, record)
    report(record, path)
    return record


def report(record: dict[str, Any], path: Path) -> None:
    console = Console()
    peaks = record["matmul_peak_flops_per_s"]
    console.print(
        f"[bold]{record['machine']['cpu']}[/] · {record['machine'].get('gpu', 'no GPU')} · "
        f"{record['machine']['threads']} threads · autocast {record['autocast']} · "
        f"ours computes in {record['ours_compute_dtype']}, naive in torch.float32 · "
        f"ours on executor={record['executor']} ({record['workers']} process(es))"
    )
    console.print(
        "measured matmul peak: " + ", ".join(f"{d} {v / 1e9:.1f} GFLOP/s" for d, v in peaks.items())
    )
    console.print(record["flop_formula"])
    table = Table(title=f"inner loop: {record['k']} self-edits, {record['epochs']} epochs")
    table.add_column("")
    table.add_column("naive")
    table.add_column("ours")
    table.add_column("ours / naive")
    naive, ours, ratios, memory = record["naive"], record["ours"], record["ratios"], record["memory"]

    def row(label: str, a: float, b: float, fmt: str, ratio: float | None = None) -> None:
        table.add_row(label, format(a, fmt), format(b, fmt), "" if ratio is None else f"{ratio:.2f}x")

    for label, key, scale in (
        ("self-edits per hour", "self_edits_per_hour", 1),
        ("update tokens/s", "update_tokens_per_s", 1),
        ("update GFLOP/s", "update_flops_per_s", 1e9),
    ):
        row(label, naive[key] / scale, ours[key] / scale, ".1f", ratios[key])
    emulated = not record["fast_bf16"]
    for dtype in peaks:
        label = f"MFU vs {dtype} peak" + (" (emulated)" if emulated and dtype == "bfloat16" else "")
        row(label, naive["mfu"][dtype], ours["mfu"][dtype], ".1%")
    for phase in ("load", "update", "eval"):
        row(f"{phase} s", naive["seconds"][phase], ours["seconds"][phase], ".1f", ratios["seconds"][phase])
    slowest = max(naive["job_seconds"]), max(ours["job_seconds"])
    row("slowest job's update s", *slowest, ".1f", ratios["slowest_job_update_s"])
    if memory:
        fresh = memory["naive"]["peak_mb"], memory[str(record["k"])]["peak_mb"]
        row("peak memory, update, fresh process (MB)", *fresh, ".0f", ratios["peak_mb_update"])
    in_bench = naive["peak_mb"]["update"], ours["peak_mb"]["update"]
    row("peak memory, update, bench's process (MB)", *in_bench, ".0f")
    row("accuracy (questions right)", naive["accuracy"], ours["accuracy"], ".3f")
    console.print(table)
    console.print(
        f"ours / naive: the median of the rounds' own ratios ({record['rounds']} round(s), each round's ours "
        "against the same round's naive reference); naive and ours: each method's median round"
    )
    if memory:
        console.print(
            "peak memory, fresh process: naive's update of the first self-edit alone, all it holds at once "
            f"whatever K; ours' of all {record['k']} together"
        )
    console.print(
        "peak memory, bench's process: each method's first round, naive's on top of the bench's model, "
        f"ours' updater and what ours left (no measure of naive alone); peaks are {record['memory_measure']}"
    )
    if emulated:
        console.print(
            "bf16 is emulated on this CPU (neither AVX-512 BF16 nor AMX), so ours keeps float32 unless told "
            "otherwise: read MFU against the float32 peak"
        )
    console.print(
        f"same answer to {record['same_answers']}/{record['questions']} questions; "
        f"correct per self-edit: naive {naive['correct']}, ours {ours['correct']}"
    )
    if record["rounds"] > 1:
        console.print(
            f"{record['rounds']} rounds, the figures above from each method's median one; ours / naive by "
            "round: "
            + ", ".join(f"{r:.2f}x" for r in record["speedup_by_round"])
            + f" (the ratio of the two median rounds: {record['speedup_of_median_rounds']:.2f}x)"
        )
        for name in ("naive", "ours"):
            seconds = "; ".join(
                " / ".join(f"{r['seconds'][phase]:.1f}" for phase in ("load", "update", "eval"))
                for r in record[name]["rounds"]
            )
            console.print(f"  {name}: load / update / eval s by round: {seconds}")
        unrepeated = [name for name in ("naive", "ours") if not record[name]["repeatable"]]
        if unrepeated:
            console.print(f"[red]not the same losses and answers in every round: {', '.join(unrepeated)}[/]")
    if memory:
        others = ", ".join(
            f"{n} adapters {memory[n]['peak_mb']:.0f} MB (ratio {r:.2f})" for n, r in memory["ratios"].items()
        )
        console.print(
            f"peak memory of an update of {memory['1']['epochs']} epoch(s), each in a fresh process: "
            f"ours 1 adapter {memory['1']['peak_mb']:.0f} MB, "
            f"{others} (model loaded, idle: {memory['1']['baseline_mb']:.0f} MB); "
            f"naive 1 adapter {memory['naive']['peak_mb']:.0f} MB "
            f"(fp32 model loaded and wrapped, idle: {memory['naive']['baseline_mb']:.0f} MB)"
        )
    console.print(f"written to {path}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    bench(cfg)


if __name__ == "__main__":
    main()
