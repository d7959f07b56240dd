"""Knowledge incorporation (SEAL section 4.1): learn a passage's facts by an update, answer closed-book.

Conditions, all on the same evaluation passages:
  base       no update
  passage    a LoRA update on the passage alone
  self_edit  a LoRA update on the passage plus the model's own self-edit about it
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import importlib.resources
import json
import logging
import math
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seal.adapt import TrainedAdapter, UpdateJob, Updater, make_updater
from seal.config import AdaptConfig, Config, DataConfig, SelfEditConfig, TaskConfig
from seal.executor import ChunkResult, WorkerLost, make_executor
from seal.forgetting import Probe
from seal.grading import accuracy_summary, make_grader, paired_metrics
from seal.memory import PhaseMeter
from seal.models import LM, continuation_logprobs, generate, load_model, save_folder, setup_runtime
from seal.rl import (
    RoundStore,
    base_weights,
    copy_base_weights,
    replay_round,
    rng_state,
    select,
    set_rng_state,
    train_generator,
)
from seal.self_edit import self_edit_prompt, training_sequences
from seal.tracking import JSONLError, Tracker, read_jsonl, throughput_metrics
from seal.vllm_engine import VLLMEngine, export_adapter, open_engine

log = logging.getLogger(__name__)
CONDITIONS = ("base", "passage", "self_edit")


@dataclass(frozen=True)
class Question:
    question: str
    answer: str


@dataclass(frozen=True)
class Passage:
    title: str
    context: str
    questions: tuple[Question, ...]
    # Unique in its corpus: the title, or "title #n" (the n-th in file order) where passages share a title, as
    # SQuAD's paragraphs of one article do ("title #n (passage i)", i its index in the file, should another
    # passage's title be "title #n"). Seeds, inner-loop keys and the cache name a passage by it.
    name: str


@dataclass(frozen=True)
class Split:
    train: list[Passage]
    eval: list[Passage]


class DataError(ValueError):
    """A data file that does not hold SEAL-format passages; the message names file, item and field."""


# ---------------------------------------------------------------- data


def parse_passages(items: Any, origin: str) -> list[Passage]:
    """Validate SEAL/SQuAD-format passages: [{"title", "context", "questions": [{"question", "answer"}]}], and
    name each uniquely (`Passage.name`)."""
    if not isinstance(items, list):
        raise DataError(f"{origin}: expected a JSON list of passages, got {type(items).__name__}")
    passages = []
    for i, item in enumerate(items):
        where = f"{origin}: passage {i}"
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected an object, got {type(item).__name__}")
        for key in ("title", "context"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise DataError(f"{where}: field {key!r} is missing or empty")
        where = f"{origin}: passage {i} ({item['title']!r})"
        questions = item.get("questions")
        if not isinstance(questions, list) or not questions:
            raise DataError(f"{where}: field 'questions' is missing or empty")
        parsed = []
        for j, q in enumerate(questions):
            for key in ("question", "answer"):
                if not isinstance(q, dict) or not isinstance(q.get(key), str) or not q[key].strip():
                    raise DataError(f"{where}: question {j}: field {key!r} is missing or empty")
            parsed.append(Question(q["question"].strip(), q["answer"].strip()))
        passages.append((item["title"].strip(), item["context"].strip(), tuple(parsed)))
    counts = collections.Counter(t for t, _, _ in passages)
    taken = {t for t, n in counts.items() if n == 1}  # unique titles name their passages
    seen: collections.Counter[str] = collections.Counter()
    named = []
    for i, (title, context, questions) in enumerate(passages):
        seen[title] += 1
        name = title if counts[title] == 1 else f"{title} #{seen[title]}"
        if counts[title] > 1 and name in taken:  # "X #2" is also another passage's own title
            name = f"{name} (passage {i})"
        taken.add(name)
        named.append(Passage(title, context, questions, name))
    return named


def load_json_file(path: str | Path) -> list[Passage]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such data file (data.path)")
    try:
        items = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
    return parse_passages(items, str(path))


def embedded_corpus() -> Split:
    """The corpus shipped with the package: invented 2026 news, fixed train/eval split."""
    resource = importlib.resources.files("seal") / "data" / "knowledge_corpus.json"
    doc = json.loads(resource.read_text())
    origin = "seal/data/knowledge_corpus.json"
    return Split(
        parse_passages(doc["train"], origin + "#train"), parse_passages(doc["eval"], origin + "#eval")
    )


def load_hf_squad(name: str, split: str) -> list[Passage]:
    """SQuAD from the Hugging Face Hub, grouped into passages (one gold answer kept per question)."""
    import datasets

    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as err:  # the Hub client raises many kinds of errors when offline
        raise DataError(
            f"could not load {name!r} ({split}) from the Hugging Face Hub: {type(err).__name__}: {err}. "
            "Offline? Pass a local SEAL-format file with data.path=FILE instead."
        ) from err
    grouped: dict[tuple[str, str], list[dict[str, str]]] = {}
    for row in rows:
        answer = row["answers"]["text"][0] if row["answers"]["text"] else ""
        grouped.setdefault((row["title"], row["context"]), []).append(
            {"question": row["question"], "answer": answer}
        )
    items = [{"title": t, "context": c, "questions": qs} for (t, c), qs in grouped.items()]
    return parse_passages(items, f"hf:{name}/{split}")


def seal_split(passages: list[Passage], n_eval: int, n_train: int, seed: int) -> Split:
    """SEAL's rule: shuffle with Python's random.seed(seed), evaluation passages first, then training ones."""
    shuffled = list(passages)
    random.seed(seed)
    random.shuffle(shuffled)
    return Split(train=shuffled[n_eval : n_eval + n_train], eval=shuffled[:n_eval])


def load_passages(cfg: DataConfig) -> Split:
    source = cfg.source if cfg.source != "auto" else ("file" if cfg.path else "embedded")
    if source == "embedded":
        corpus = embedded_corpus()
        return Split(corpus.train[: cfg.n_train], corpus.eval[: cfg.n_eval])
    if source == "file":
        if not cfg.path:
            raise DataError("data.source=file needs data.path=FILE")
        passages = load_json_file(cfg.path)
    elif source == "hf":
        passages = load_hf_squad(cfg.hf_dataset, cfg.hf_split)
    else:
        raise DataError(f"unknown data.source {cfg.source!r}: expected auto, embedded, file or hf")
    return seal_split(passages, cfg.n_eval, cfg.n_train, cfg.shuffle_seed)


# ---------------------------------------------------------------- pieces of a run


def derive_seed(seed: int, *parts: object) -> int:
    """A seed for one piece of work (a self-edit sample, an adapter), so any piece can be recomputed alone."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def question_prompts(lm: LM, task: TaskConfig, passage: Passage) -> list[str]:
    """Closed-book prompts: the title as topic, never the passage."""
    return [
        lm.format(task.question_template.format(title=passage.title, question=q.question))
        for q in passage.questions
    ]


def answer(
    lm: LM,
    task: TaskConfig,
    passages: list[Passage],
    desc: str | None = None,
    updater: Updater | None = None,
    adapters: list[TrainedAdapter] | None = None,
    engine: VLLMEngine | None = None,
    adapt: AdaptConfig | None = None,
) -> list[list[str]]:
    """Greedy answers to every question of `passages` in one batched generation; with `adapters`, passage
    i's questions are answered by base + adapters[i]. With a vLLM `engine` (serving the weights of `lm`), the
    adapters are written as PEFT folders (`adapt` describes them) and served as runtime adapters."""
    prompts = [p for passage in passages for p in question_prompts(lm, task, passage)]
    kwargs = {"max_new_tokens": task.max_new_tokens, "batch_size": task.eval_batch_size, "desc": desc}
    if engine is not None:
        with tempfile.TemporaryDirectory(prefix="seal-adapters-") as tmp:
            folders = [export_adapter(a, adapt, Path(tmp) / str(i)) for i, a in enumerate(adapters or [])]
            rows = [f for f, passage in zip(folders, passages, strict=True) for _ in passage.questions]
            flat = engine.generate(prompts, max_new_tokens=task.max_new_tokens, adapters=rows or None)
    elif adapters is None:
        flat = generate(lm, prompts, **kwargs)
    else:
        rows = [a for a, passage in zip(adapters, passages, strict=True) for _ in passage.questions]
        flat = updater.generate(prompts, rows, **kwargs)
    return by_passage(flat, passages)


def answer_logprobs(
    lm: LM,
    task: TaskConfig,
    passages: list[Passage],
    updater: Updater | None = None,
    adapters: list[TrainedAdapter] | None = None,
) -> list[list[float]]:
    """Per passage, per question: the mean log-probability per token of its gold answer after the closed-book
    prompt (teacher-forced), under base + adapters[i] for passage i (no adapters: `lm` as it is)."""
    prompts = [p for passage in passages for p in question_prompts(lm, task, passage)]
    golds = [q.answer for passage in passages for q in passage.questions]
    if adapters is None:
        scores = continuation_logprobs(lm, prompts, golds, batch_size=task.eval_batch_size)
    else:
        rows = [a for a, passage in zip(adapters, passages, strict=True) for _ in passage.questions]
        scores = updater.score(prompts, golds, rows, batch_size=task.eval_batch_size)
    return by_passage([total / n for total, n in scores], passages)


def by_passage(flat: list, passages: list[Passage]) -> list[list]:
    """A flat list over all of `passages`' questions, cut into one list per passage."""
    out, at = [], 0
    for passage in passages:
        out.append(flat[at : at + len(passage.questions)])
        at += len(passage.questions)
    return out


def self_edit_prompts(lm: LM, cfg: SelfEditConfig, passages: list[Passage]) -> list[str]:
    """What the generator reads to write a self-edit (also the prompt of its SFT examples)."""
    return [lm.format(self_edit_prompt(cfg.prompt, p.title, p.context)) for p in passages]


def write_self_edits(
    lm: LM, cfg: SelfEditConfig, passages: list[Passage], seeds: list[int], engine: VLLMEngine | None = None
) -> list[str]:
    """One sampled self-edit per passage, seeds[i] for passage i (by `engine`, when given: the same model)."""
    prompts = self_edit_prompts(lm, cfg, passages)
    if engine is not None:
        return engine.generate(
            prompts,
            max_new_tokens=cfg.max_new_tokens,
            seeds=seeds,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
        )
    return generate(
        lm,
        prompts,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        seeds=seeds,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        desc="self-edits",
    )


def graded_rows(
    condition: str,
    passage: Passage,
    answers: list[str] | None,
    grade,
    error: str | None = None,
    logprobs: list[float] | None = None,
) -> list[dict[str, Any]]:
    """One record per question (with `logprobs`, its gold answer's `answer_logprob`). A failed update
    (answers None) counts its questions as wrong."""
    rows = []
    for i, q in enumerate(passage.questions):
        prediction = answers[i] if answers is not None else ""
        rows.append(
            {
                "condition": condition,
                "title": passage.title,
                "passage": passage.name,
                "question": q.question,
                "gold": q.answer,
                "prediction": prediction,
                "correct": bool(answers is not None and grade(q.question, q.answer, prediction)),
                **({"update_error": error} if error else {}),
                **({"answer_logprob": logprobs[i]} if logprobs is not None else {}),
            }
        )
    return rows


def read_external_edits(path: str | None, passages: list[Passage]) -> list[str]:
    """Self-edits written elsewhere (`self_edit.source=file`): JSONL rows {"title", "self_edit"}, one per
    evaluation passage, matched by title, or by `passage` (its unique name, as a run's
    results/self_edits.jsonl gives it) where the row has one. A title that several evaluation passages share
    (SQuAD's paragraphs of one article) is matched only by name."""
    if not path:
        raise DataError("self_edit.source=file needs self_edit.path=FILE (JSONL of title and self_edit)")
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"{file}: no such self-edit file (self_edit.path)")
    try:
        rows = read_jsonl(file)
    except JSONLError as err:
        raise DataError(str(err)) from err
    by_key: dict[str, str] = {}
    for n, row in enumerate(rows, 1):
        if not all(isinstance(row.get(k), str) for k in ("title", "self_edit")):
            raise DataError(f'{file}, row {n}: expected {{"title": str, "self_edit": str}}')
        by_key[row["passage"] if isinstance(row.get("passage"), str) else row["title"].strip()] = row[
            "self_edit"
        ]
    shared = {t for t, n in collections.Counter(p.title for p in passages).items() if n > 1}
    keys = [p.name if p.name in by_key or p.title in shared else p.title for p in passages]
    missing = [key for key in keys if key not in by_key]
    if missing:
        raise DataError(f"{file}: no self-edit for the evaluation passages {missing}")
    return [by_key[key] for key in keys]


# ---------------------------------------------------------------- inner loops


@dataclass(frozen=True)
class InnerLoop:
    """One update and the evaluation of its adapter on its passage's questions."""

    passage: Passage
    condition: str  # passage (the passage alone) | self_edit | external (the passage plus `edit`)
    edit: str | None
    key: tuple  # (round, title, condition[, sample, repeat]): seeds the adapter and names the cached result
    probe: bool = False  # also measure the adapted model's reasoning and prior knowledge (seal/forgetting.py)


def update_job(
    cfg: Config, passage: Passage, edit: str | None, condition: str, key: tuple | None = None
) -> UpdateJob:
    """The update of one condition on one passage: `passage` trains on the passage alone, the others on the
    passage plus the self-edit's items. The seed depends on the key only (default: round 0, passage,
    condition), so a result does not depend on what else ran."""
    return UpdateJob(
        key=condition,
        sequences=training_sequences(
            passage.title,
            passage.context,
            edit if condition != "passage" else None,
            cfg.self_edit.split,
            include_passage=cfg.adapt.include_passage or condition == "passage",
        ),
        seed=derive_seed(cfg.seed, "adapter", *(key or (0, passage.name, condition))),
    )


class ChunkRunner:
    """Computes a chunk of inner loops on one model: the chunk's updates together (a finished job's slot takes
    the next), then one generation call for all their questions, then the forgetting probe of the probed
    ones. It runs in this process (executor=local), in a worker forked from it (executor=processes) or in
    every Ray worker (seal/executor.py)."""

    def __init__(self, cfg: Config, lm: LM, probe: Probe | None, engine: VLLMEngine | None = None):
        self.cfg, self.lm, self.probe, self.engine = cfg, lm, probe, engine
        self.updater = make_updater(lm, cfg.adapt)

    def load_weights(self, weights: dict) -> None:
        copy_base_weights(self.lm.model, weights)

    def compute(self, chunk: list[InnerLoop], desc: str) -> ChunkResult:
        meter = PhaseMeter(self.lm.device)
        with meter.phase("update"):
            jobs = [update_job(self.cfg, x.passage, x.edit, x.condition, x.key) for x in chunk]
            adapters = self.updater.train(jobs, progress=f"updates {desc}")
        trained = [(x, a) for x, a in zip(chunk, adapters, strict=True) if a.result.error is None]
        with meter.phase("eval"):
            answers = answer(
                self.lm,
                self.cfg.task,
                [x.passage for x, _ in trained],
                desc=f"answers {desc}",
                updater=self.updater,
                adapters=[a for _, a in trained],
                engine=self.engine,
                adapt=self.cfg.adapt,
            )
        answers_of = {id(a): ans for (_, a), ans in zip(trained, answers, strict=True)}
        logprobs_of = {}
        if self.cfg.task.score_answers and trained:
            with meter.phase("eval"):
                scored = answer_logprobs(
                    self.lm,
                    self.cfg.task,
                    [x.passage for x, _ in trained],
                    self.updater,
                    [a for _, a in trained],
                )
            logprobs_of = {id(a): s for (_, a), s in zip(trained, scored, strict=True)}
        probed = [a for x, a in trained if x.probe and self.probe is not None]
        probe_of = {}
        if probed:
            with meter.phase("reasoning"):
                measured = self.probe.measure(self.lm, self.updater, probed)
            probe_of = {id(a): m for a, m in zip(probed, measured, strict=True)}
        outcomes = []
        for loop, adapter in zip(chunk, adapters, strict=True):
            result = adapter.result
            if result.error:
                log.warning("update %s on %r failed: %s", loop.condition, loop.passage.name, result.error)
            outcomes.append(
                outcome(
                    loop,
                    answers=answers_of.get(id(adapter)),
                    loss=result.epoch_losses[-1] if result.error is None else None,
                    tokens=result.tokens,
                    error=result.error,
                    probe=probe_of.get(id(adapter)),
                    logprobs=logprobs_of.get(id(adapter)),
                )
            )
        return ChunkResult(outcomes, dict(meter.seconds), dict(meter.peak_mb))


def outcome(
    loop: InnerLoop, answers=None, loss=None, tokens=0, error=None, probe=None, logprobs=None
) -> dict[str, Any]:
    """An inner loop's record: {key, title, condition, answers (None if the update failed), loss, tokens,
    error, probe (the forgetting probe's results for a probed loop, else None), answer_logprobs (per
    question, with task.score_answers and a successful update, else None)}."""
    return {
        "key": list(loop.key),
        "title": loop.passage.title,
        "condition": loop.condition,
        "answers": answers,
        "loss": loss,
        "tokens": tokens,
        "error": error,
        "probe": probe,
        "answer_logprobs": logprobs,
    }


def worker_runner(cfg: Config, known: list | None) -> ChunkRunner:
    """The runner of a Ray worker: its own replica of the model (the driver sends the learner's weights before
    the first chunk) and, when the run probes forgetting, a probe that knows what the driver's knew."""
    setup_runtime(cfg, threads=cfg.executor.cpus_per_worker)
    lm = load_model(cfg.model, cfg.paths.cache_dir, seed=cfg.seed)
    probe = None
    if known is not None:
        probe = Probe(cfg, lm, make_grader(cfg.task.grader, cfg.task.f1_threshold))
        probe.known = known
    return ChunkRunner(cfg, lm, probe)


class InnerLoops:
    """Runs inner loops in chunks of at most `4 x adapt.max_adapters` jobs (fewer when there would be fewer
    chunks than workers), on the configured executor (in this process, in forked worker processes, or on
    Ray workers). Each chunk's outcome is cached in the round's directory as soon as it is computed, so a
    resumed run reads finished chunks back instead of recomputing them (a chunk is recomputed whole, with the
    same company, so its numbers repeat exactly)."""

    def __init__(
        self,
        cfg: Config,
        lm: LM,
        meter: PhaseMeter,
        store: RoundStore,
        probe: Probe | None,
        engine: VLLMEngine | None = None,
    ):
        self.cfg, self.lm, self.meter, self.store, self.probe = cfg, lm, meter, store, probe
        self.engine = engine
        self.executor = make_executor(
            cfg.executor,
            local=lambda: ChunkRunner(cfg, lm, probe, engine),
            remote=functools.partial(worker_runner, cfg, probe.known if probe else None),
            weights=lambda: base_weights(lm.model),
        )
        self.tokens, self.computed, self.seconds = 0, 0, 0.0

    def run(self, loops: list[InnerLoop], round_: int, phase: str, desc: str) -> list[dict[str, Any]]:
        """One outcome per loop (see `outcome`). A failed update (non-finite loss, out of memory) or a chunk
        whose worker kept dying is recorded as failed, and the others go on."""
        # A chunk is at most 4 x max_adapters loops, fewer when that would leave workers without one.
        per_chunk = max(1, min(4 * self.cfg.adapt.max_adapters, -(-len(loops) // self.executor.workers)))
        chunks = [loops[at : at + per_chunk] for at in range(0, len(loops), per_chunk)]
        keys = [[list(loop.key) for loop in chunk] for chunk in chunks]
        outcomes: list[list[dict[str, Any]] | None] = [
            self.store.cached_chunk(round_, phase, i, keys[i]) for i in range(len(chunks))
        ]
        todo = [i for i, cached in enumerate(outcomes) if cached is None]
        work = [(chunks[i], f"{desc} ({i * per_chunk + len(chunks[i])}/{len(loops)})") for i in todo]
        start = time.perf_counter()
        for j, result in self.executor.map(work):
            i = todo[j]
            if isinstance(result, WorkerLost):  # not cached: a resumed run tries again
                outcomes[i] = [outcome(loop, error=str(result)) for loop in chunks[i]]
                continue
            self.store.cache_chunk(round_, phase, i, keys[i], result.outcomes)
            outcomes[i] = result.outcomes
            self.meter.add(result.seconds, result.peak_mb)
            self.tokens += sum(o["tokens"] for o in result.outcomes)
            self.computed += len(chunks[i])
        self.seconds += time.perf_counter() - start
        return [o for chunk_outcomes in outcomes for o in chunk_outcomes]

    def throughput(self) -> dict[str, float]:
        """Of the inner loops computed in this run's process or its workers (not those read back from the
        cache). With Ray workers, update seconds add up over the workers: tokens/s is per worker."""
        metrics: dict[str, float] = {}
        if self.executor.retries:
            metrics["executor/retried_chunks"] = self.executor.retries
        return metrics | throughput_metrics(
            self.tokens, self.computed, self.meter.seconds["update"], self.seconds
        )

    def close(self) -> None:
        self.executor.close()
        if self.engine is not None:
            self.engine.close()


def outcome_rows(loop: InnerLoop, outcome: dict[str, Any], grade) -> list[dict[str, Any]]:
    logprobs = outcome.get("answer_logprobs")  # absent from chunks cached before task.score_answers existed
    return graded_rows(loop.condition, loop.passage, outcome["answers"], grade, outcome["error"], logprobs)


def accuracy_of(rows: list[dict[str, Any]]) -> float:
    return sum(r["correct"] for r in rows) / len(rows) if rows else 0.0


def answer_logprob_of(rows: list[dict[str, Any]]) -> float | None:
    """The mean gold-answer score of the rows that have one (task.score_answers; a failed update has none)."""
    scored = [r["answer_logprob"] for r in rows if "answer_logprob" in r]
    return statistics.fmean(scored) if scored else None


def condition_metrics(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy, n and its 95 % interval; with task.score_answers, the mean gold-answer log-probability per
    token over the questions whose update succeeded."""
    summary = accuracy_summary([r["correct"] for r in rows])
    metrics = {f"knowledge/{name}/{key}": summary[key] for key in ("accuracy", "n", "ci95")}
    if (score := answer_logprob_of(rows)) is not None:
        metrics[f"knowledge/{name}/answer_logprob"] = score
        scored = [r["answer_logprob"] for r in rows if "answer_logprob" in r]
        if len(scored) > 1:  # the normal 95 % interval of the mean over questions
            metrics[f"knowledge/{name}/answer_logprob_ci95"] = (
                1.96 * statistics.stdev(scored) / len(scored) ** 0.5
            )
    return metrics


def cached_self_edits(
    store: RoundStore,
    round_: int,
    name: str,
    lm: LM,
    cfg: SelfEditConfig,
    passages: list[Passage],
    seeds,
    engine: VLLMEngine | None = None,
) -> list[str]:
    """`write_self_edits`, saved in the round's directory and read back on resume."""
    saved = store.read(round_, name)
    if saved is not None and [r["seed"] for r in saved] == list(seeds):
        return [r["self_edit"] for r in saved]
    edits = write_self_edits(lm, cfg, passages, seeds, engine)
    rows = [
        {"passage": p.name, "seed": s, "self_edit": e} for p, s, e in zip(passages, seeds, edits, strict=True)
    ]
    store.write(round_, name, rows)
    return edits


# ---------------------------------------------------------------- the run


def run(cfg: Config, lm: LM, tracker: Tracker, meter: PhaseMeter) -> dict[str, Any]:
    """Evaluate every configured condition on the evaluation passages (round 0); with `rl=rest_em`, then run
    the outer loop's rounds and evaluate the trained generator's self-edits (condition `seal`)."""
    if cfg.rl.reward.tie_break not in ("first", "answer_logprob"):
        raise ValueError(
            f"unknown rl.reward.tie_break {cfg.rl.reward.tie_break!r}: expected first or answer_logprob"
        )
    if cfg.rl.reward.tie_break == "answer_logprob" and not cfg.task.score_answers:
        raise ValueError("rl.reward.tie_break=answer_logprob needs task.score_answers=true")
    if cfg.task.mode != "single":
        from seal.tasks import knowledge_modes  # cpt and continual build on this module's pieces

        return knowledge_modes.run(cfg, lm, tracker, meter)
    conditions = list(cfg.task.conditions)
    unknown = sorted(set(conditions) - set(CONDITIONS))
    if unknown:
        raise ValueError(f"unknown task.conditions {unknown}: expected some of {list(CONDITIONS)}")
    if cfg.rl.name not in ("none", "rest_em"):
        raise ValueError(f"unknown rl {cfg.rl.name!r}: expected none or rest_em")
    if cfg.self_edit.source not in ("model", "file"):
        raise ValueError(f"unknown self_edit.source {cfg.self_edit.source!r}: expected model or file")
    rl = cfg.rl.name == "rest_em"
    reward = cfg.rl.reward
    guard = rl and (reward.forgetting_penalty > 0 or reward.max_reasoning_drop is not None)
    if guard and cfg.reasoning.source == "none":
        raise ValueError(
            "rl.reward.forgetting_penalty and max_reasoning_drop need the reasoning probe (reasoning)"
        )
    if rl and ("self_edit" not in conditions or cfg.self_edit.source != "model"):
        raise ValueError(
            "rl=rest_em trains the model's own self-edits: needs the self_edit condition and "
            "self_edit.source=model"
        )
    engine = open_engine(cfg)  # None unless generation.backend=vllm can run here
    split = load_passages(cfg.data)
    passages = split.eval
    if not passages:
        raise DataError("no evaluation passages (data.n_eval=0 or an empty file)")
    if rl and not split.train:
        raise DataError("rl=rest_em needs training passages (data.n_train > 0)")
    if rl and len(split.train) < (wanted := cfg.rl.rounds * cfg.rl.passages_per_round):
        log.warning(
            "rl asks for %d training passages (%d rounds x rl.passages_per_round=%d) and has %d "
            "(data.n_train=%d): rounds reuse passages%s; set data.n_train=%d for new ones every round",
            wanted,
            cfg.rl.rounds,
            cfg.rl.passages_per_round,
            len(split.train),
            cfg.data.n_train,
            f", and each round trains on {len(split.train)}"
            if len(split.train) < cfg.rl.passages_per_round
            else "",
            wanted,
        )
    log.info(
        "knowledge: %d evaluation passages, %d questions",
        len(passages),
        sum(len(p.questions) for p in passages),
    )
    store = RoundStore(tracker.run_dir)
    grade = make_grader(cfg.task.grader, cfg.task.f1_threshold)
    # The generator writes self-edits; the learner (lm) is updated by the inner loops. Before RL they are
    # the same weights; ReST-EM fine-tunes a copy, the generator (by default copied into the learner too).
    generator = load_model(cfg.model, cfg.paths.cache_dir, seed=cfg.seed) if rl else lm
    rows: dict[str, list[dict[str, Any]]] = {}
    metrics: dict[str, Any] = {}
    probe = None
    if cfg.reasoning.source != "none":
        probe = Probe(cfg, lm, grade)
        with meter.phase("reasoning"):
            before = probe.before()
        metrics.update(probe.reasoning_metrics("reasoning/before", [before]))
    # The executor may hold workers (executor=ray, processes): closed however the run ends.
    with contextlib.closing(InnerLoops(cfg, lm, meter, store, probe, engine)) as loops:
        if "base" in conditions:
            with meter.phase("eval"):
                answers = answer(lm, cfg.task, passages, "base answers", engine=loops.engine)
                scored = answer_logprobs(lm, cfg.task, passages) if cfg.task.score_answers else None
            rows["base"] = [
                r
                for i, (p, a) in enumerate(zip(passages, answers, strict=True))
                for r in graded_rows("base", p, a, grade, logprobs=scored[i] if scored else None)
            ]

        label = "external" if cfg.self_edit.source == "file" else "self_edit"
        edits: list[str | None] = [None] * len(passages)
        if "self_edit" in conditions:
            if label == "external":
                edits = read_external_edits(cfg.self_edit.path, passages)
            else:
                seeds = [derive_seed(cfg.seed, "self_edit", 0, p.name, 0) for p in passages]
                with meter.phase("generate"):
                    edits = cached_self_edits(
                        store,
                        0,
                        "eval_self_edits.json",
                        generator,
                        cfg.self_edit,
                        passages,
                        seeds,
                        loops.engine,
                    )
            tracker.results(
                "self_edits" if label == "self_edit" else "external_edits",
                [
                    {"title": p.title, "passage": p.name, "self_edit": e}
                    for p, e in zip(passages, edits, strict=True)
                ],
            )
        updated = [c for c in conditions if c != "base"]
        # The forgetting probe measures a seeded sample of the self-edit updates (else of the passage ones).
        probed_condition = "self_edit" if "self_edit" in updated else "passage"
        n_probed = min(cfg.reasoning.after_update, len(passages)) if probe else 0
        probed = {p.name for p in random.Random(derive_seed(cfg.seed, "probe")).sample(passages, n_probed)}
        todo = [
            InnerLoop(
                p,
                label if c == "self_edit" else c,
                e if c == "self_edit" else None,
                (0, p.name, c),
                probe=c == probed_condition and p.name in probed,
            )
            for p, e in zip(passages, edits, strict=True)
            for c in updated
        ]
        outcomes = loops.run(todo, 0, "eval", "round 0")
        if probe:
            after = [o["probe"] for o in outcomes if o["probe"] is not None]
            tracker.results(
                "reasoning",
                [
                    {
                        "model": "before",
                        "reasoning": before["reasoning"],
                        "prior_known": [q.question for q in probe.known],
                    }
                ]
                + [
                    {"model": "after_update", "title": o["title"], "passage": o["key"][1], **o["probe"]}
                    for o in outcomes
                    if o["probe"] is not None
                ],
            )
            if after:
                metrics.update(probe.reasoning_metrics("reasoning/after_update", after))
                metrics["reasoning/forgetting"] = (
                    metrics["reasoning/before/accuracy"] - metrics["reasoning/after_update/accuracy"]
                )
            metrics.update(probe.retention_metrics(after))
        for loop, outcome in zip(todo, outcomes, strict=True):
            rows.setdefault(loop.condition, []).extend(outcome_rows(loop, outcome, grade))
        for name in (c for c in dict.fromkeys([*conditions, label]) if c in rows):
            tracker.results(name, rows[name])
            metrics.update(condition_metrics(name, rows[name]))
        losses: dict[str, list[float]] = {}
        for outcome in outcomes:
            if outcome["loss"] is not None:
                losses.setdefault(outcome["condition"], []).append(outcome["loss"])
        metrics.update({f"adapt/{c}/final_loss": sum(v) / len(v) for c, v in losses.items()})
        metrics["adapt/failed_updates"] = sum(o["error"] is not None for o in outcomes)

        if rl:
            metrics["rl/round_0/eval_accuracy"] = metrics["knowledge/self_edit/accuracy"]
            metrics["rl/round_0/eval_ci95"] = metrics["knowledge/self_edit/ci95"]
            row = {"rl/eval_accuracy": metrics["rl/round_0/eval_accuracy"]}
            if "knowledge/self_edit/answer_logprob" in metrics:
                metrics["rl/round_0/eval_answer_logprob"] = metrics["knowledge/self_edit/answer_logprob"]
                row["rl/eval_answer_logprob"] = metrics["rl/round_0/eval_answer_logprob"]
            log_round(tracker, 0, row)
            seal_rows: list[dict[str, Any]] = []
            # The reasoning accuracy of the learner: what the forgetting guard compares to.
            learner_reasoning = metrics.get("reasoning/before/accuracy")
            for k in range(1, cfg.rl.rounds + 1):
                round_metrics, seal_rows = rest_em_round(
                    k, cfg, generator, loops, split, grade, tracker, learner_reasoning
                )
                metrics.update(round_metrics)
                if cfg.rl.learner == "updated" and probe:
                    learner_reasoning = round_metrics[f"reasoning/round_{k}/accuracy"]
            if seal_rows:
                tracker.results("seal", seal_rows)
                metrics.update(condition_metrics("seal", seal_rows))
                rows["seal"] = seal_rows
        if store.reused:
            log.info("resumed: %d inner loops read back from %s", store.reused, store.root)
            tracker.log({"resume/reused_inner_loops": store.reused})
        metrics.update(paired_metrics(rows))
        metrics.update(loops.throughput())
        return metrics


# ---------------------------------------------------------------- the outer loop


def finite(value: float) -> float | None:
    """A value for JSON: None for -inf (a failed update)."""
    return value if math.isfinite(value) else None


def round_passages(train: list[Passage], k: int, n: int) -> list[Passage]:
    """Round k's training passages: [(k-1)*n, k*n) of the training split, wrapping around."""
    return [train[((k - 1) * n + j) % len(train)] for j in range(min(n, len(train)))]


def log_round(tracker: Tracker, k: int, row: dict[str, Any]) -> None:
    """A history row for round k (the RL curve), unless a run that was stopped and resumed logged it."""
    if not tracker.has_row("rl/round", k):
        tracker.log({"rl/round": k, **row})


def rest_em_round(
    k: int,
    cfg: Config,
    generator: LM,
    loops: InnerLoops,
    split: Split,
    grade,
    tracker: Tracker,
    learner_reasoning: float | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Round k of ReST-EM: K self-edits per training passage, rewarded by their inner loops (less the
    forgetting penalty, when set); the best kept; the generator fine-tuned on them and merged, and its
    reasoning measured; then the new generator's self-edits evaluated on the evaluation passages. A finished
    round (its state.json) is replayed from disk instead."""
    rl, prefix, reward = cfg.rl, f"rl/round_{k}", cfg.rl.reward
    learner, store, probe, engine = loops.lm, loops.store, loops.probe, loops.engine
    guard = reward.forgetting_penalty > 0 or reward.max_reasoning_drop is not None
    state = store.finished(k)
    if state is not None:
        replay_round(store, k, generator, learner, rl)
        if engine is not None and store.load_adapter(k) is not None:
            engine.restart(save_folder(generator, store.dir(k) / "generator"))
        set_rng_state(state["rng"])
        store.reused += state["inner_loops"]
        log_round(tracker, k, state["row"])
        return state["metrics"], store.read(k, "eval_rows.json")

    train = round_passages(split.train, k, rl.passages_per_round)
    owners = [p for p in train for _ in range(rl.samples)]
    seeds = [derive_seed(cfg.seed, "self_edit", k, p.name, s) for p in train for s in range(rl.samples)]
    with loops.meter.phase("generate"):
        edits = cached_self_edits(
            store, k, "train_self_edits.json", generator, cfg.self_edit, owners, seeds, engine
        )
    todo = [
        InnerLoop(p, "self_edit", edits[i * rl.samples + s], (k, p.name, "self_edit", s, r), probe=guard)
        for i, p in enumerate(train)
        for s in range(rl.samples)
        for r in range(rl.repeats)
    ]
    if reward.kind == "gain" or rl.accept_margin is not None:
        todo += [InnerLoop(p, "passage", None, (k, p.name, "passage")) for p in train]
    outcomes = loops.run(todo, k, "train", f"round {k} rewards")
    inner_loops = len(todo)
    accuracy = {
        tuple(o["key"]): accuracy_of(outcome_rows(x, o, grade)) for x, o in zip(todo, outcomes, strict=True)
    }
    # How much each update lowered the learner's reasoning accuracy (0 for a failed update: nothing changed).
    drop = {
        tuple(o["key"]): learner_reasoning - statistics.fmean(o["probe"]["reasoning"]) if o["probe"] else 0.0
        for o in outcomes
        if guard
    }
    baselines = [accuracy.get((k, p.name, "passage"), 0.0) for p in train]
    # The mean gold-answer log-probability after each update (task.score_answers; -inf: the update failed).
    likelihood = {
        tuple(o["key"]): statistics.fmean(o["answer_logprobs"]) if o.get("answer_logprobs") else -math.inf
        for o in outcomes
        if cfg.task.score_answers
    }

    def mean_over_repeats(values: dict[tuple, float], name: str, s: int) -> float:
        return statistics.fmean(values.get((k, name, "self_edit", s, r), 0.0) for r in range(rl.repeats))

    drops = [[mean_over_repeats(drop, p.name, s) for s in range(rl.samples)] for p in train]
    rewards = [
        [
            mean_over_repeats(accuracy, p.name, s)
            - (baselines[i] if reward.kind == "gain" else 0.0)
            - reward.forgetting_penalty * max(0.0, drops[i][s])
            for s in range(rl.samples)
        ]
        for i, p in enumerate(train)
    ]
    eligible = None
    if reward.max_reasoning_drop is not None:
        eligible = [[d <= reward.max_reasoning_drop for d in row] for row in drops]
    likelihoods = None
    if cfg.task.score_answers:
        likelihoods = [[mean_over_repeats(likelihood, p.name, s) for s in range(rl.samples)] for p in train]
    chosen = select(
        rewards,
        baselines if rl.accept_margin is not None else None,
        rl,
        eligible,
        likelihoods if reward.tie_break == "answer_logprob" else None,
    )
    prompts = self_edit_prompts(generator, cfg.self_edit, train)
    examples = [(prompts[i], edits[i * rl.samples + s]) for i, s in enumerate(chosen.kept) if s is not None]
    errors: dict[tuple, list[str]] = {}
    for loop, outcome in zip(todo, outcomes, strict=True):
        if outcome["error"]:  # a failed inner loop scores 0; its reason stays on record
            errors.setdefault(loop.key[1:4], []).append(outcome["error"])
    store.write(
        k,
        "rewards.json",
        [
            {
                "title": p.title,
                "passage": p.name,
                "sample": s,
                "reward": rewards[i][s],
                "kept": chosen.kept[i] == s,
                **({"reasoning_drop": drops[i][s]} if guard else {}),
                **({"answer_logprob": finite(likelihoods[i][s])} if likelihoods else {}),
                "errors": errors.get((p.name, "self_edit", s), []),
            }
            for i, p in enumerate(train)
            for s in range(rl.samples)
        ],
    )
    sft_data = [{"prompt": a, "completion": b} for a, b in examples]
    if store.read(k, "sft_data.json") not in (None, sft_data):
        # An earlier attempt at this round kept other self-edits (an inner loop that failed then was
        # computed again): what it wrote after the fine-tuning came from another generator.
        store.discard(k, "eval_self_edits.json", "eval")
    store.write(k, "sft_data.json", sft_data)
    diagnostics = dict(chosen.diagnostics)
    diagnostics["self_edit_tokens_mean"] = statistics.fmean(
        len(generator.tokenizer(e, add_special_tokens=False)["input_ids"]) for e in edits
    )
    diagnostics["failed_inner_loops"] = sum(o["error"] is not None for o in outcomes)
    if guard:
        diagnostics["reasoning_drop_mean"] = statistics.fmean(d for row in drops for d in row)
    if likelihoods and (scored := [v for row in likelihoods for v in row if math.isfinite(v)]):
        diagnostics["answer_logprob_mean"] = statistics.fmean(scored)
    if reward.kind == "gain" or rl.accept_margin is not None:
        diagnostics["passage_baseline_mean"] = statistics.fmean(baselines)
    with loops.meter.phase("sft") if examples else contextlib.nullcontext():  # no phase if nothing kept
        loss = train_generator(store, k, generator, learner, examples, rl, derive_seed(cfg.seed, "sft", k))
    if loss is None:
        log.warning("round %d: no self-edit was accepted; the generator is unchanged", k)
    else:
        diagnostics["sft_loss"] = loss
        if engine is not None:  # the engine serves the new generator (and learner) from here on
            engine.restart(save_folder(generator, store.dir(k) / "generator"))
    reasoning: dict[str, float] = {}
    if probe:
        with loops.meter.phase("reasoning"):
            reasoning = probe.reasoning_metrics(f"reasoning/round_{k}", probe.measure(generator, prior=False))

    passages = split.eval
    seeds = [derive_seed(cfg.seed, "self_edit", k, p.name, 0) for p in passages]
    with loops.meter.phase("generate"):
        edits = cached_self_edits(
            store, k, "eval_self_edits.json", generator, cfg.self_edit, passages, seeds, engine
        )
    todo = [InnerLoop(p, "seal", e, (k, p.name, "self_edit")) for p, e in zip(passages, edits, strict=True)]
    outcomes = loops.run(todo, k, "eval", f"round {k} evaluation")
    inner_loops += len(todo)
    eval_rows = [r for x, o in zip(todo, outcomes, strict=True) for r in outcome_rows(x, o, grade)]
    store.write(k, "eval_rows.json", eval_rows)
    summary = accuracy_summary([r["correct"] for r in eval_rows])
    metrics = {f"{prefix}/eval_accuracy": summary["accuracy"], f"{prefix}/eval_ci95": summary["ci95"]}
    if (score := answer_logprob_of(eval_rows)) is not None:
        metrics[f"{prefix}/eval_answer_logprob"] = score
    metrics.update({f"{prefix}/{name}": value for name, value in diagnostics.items()})
    metrics.update(reasoning)
    row = {"rl/eval_accuracy": summary["accuracy"], **{f"rl/{n}": v for n, v in diagnostics.items()}}
    if f"{prefix}/eval_answer_logprob" in metrics:
        row["rl/eval_answer_logprob"] = metrics[f"{prefix}/eval_answer_logprob"]
    if reasoning:
        row["rl/reasoning_accuracy"] = reasoning[f"reasoning/round_{k}/accuracy"]
    log.info("round %d: eval accuracy %.3f, %s", k, summary["accuracy"], diagnostics)
    log_round(tracker, k, row)
    state = {"round": k, "metrics": metrics, "row": row, "inner_loops": inner_loops, "rng": rng_state()}
    store.finish(k, {**state, "wandb_run_id": tracker.run_id})
    return metrics, eval_rows
