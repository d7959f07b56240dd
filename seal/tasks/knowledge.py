"""Knowledge incorporation (SEAL section 4.1): learn a passage's facts by an update, answer closed-book.

Conditions, all on the same evaluation passages:
  base       no update
  passage    a LoRA update on the passage alone
  self_edit  a LoRA update on the passage plus the model's own self-edit about it
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seal.adapt import TrainedAdapter, UpdateJob, Updater, make_updater
from seal.config import Config, DataConfig, SelfEditConfig, TaskConfig
from seal.grading import accuracy_summary, make_grader
from seal.memory import PhaseMeter
from seal.models import LM, generate
from seal.self_edit import self_edit_prompt, training_sequences
from seal.tracking import Tracker

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


@dataclass(frozen=True)
class Split:
    train: list[Passage]
    eval: list[Passage]


class DataError(ValueError):
    """A data file that does not hold SEAL-format passages; the message names file, item and field."""


# ---------------------------------------------------------------- data


def parse_passages(items: Any, origin: str) -> list[Passage]:
    """Validate SEAL/SQuAD-format passages: [{"title", "context", "questions": [{"question", "answer"}]}]."""
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
        passages.append(Passage(item["title"].strip(), item["context"].strip(), tuple(parsed)))
    return passages


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
) -> list[list[str]]:
    """Greedy answers to every question of `passages` in one batched generation; with `adapters`, passage
    i's questions are answered by base + adapters[i]."""
    prompts = [p for passage in passages for p in question_prompts(lm, task, passage)]
    kwargs = {"max_new_tokens": task.max_new_tokens, "batch_size": task.eval_batch_size, "desc": desc}
    if adapters is None:
        flat = generate(lm, prompts, **kwargs)
    else:
        rows = [a for a, passage in zip(adapters, passages, strict=True) for _ in passage.questions]
        flat = updater.generate(prompts, rows, **kwargs)
    out, at = [], 0
    for passage in passages:
        out.append(flat[at : at + len(passage.questions)])
        at += len(passage.questions)
    return out


def write_self_edits(lm: LM, cfg: SelfEditConfig, passages: list[Passage], seeds: list[int]) -> list[str]:
    prompts = [lm.format(self_edit_prompt(cfg.prompt, p.title, p.context)) for p in passages]
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
    condition: str, passage: Passage, answers: list[str] | None, grade, error: str | None = None
) -> list[dict[str, Any]]:
    """One record per question. A failed update (answers None) counts its questions as wrong."""
    rows = []
    for i, q in enumerate(passage.questions):
        prediction = answers[i] if answers is not None else ""
        rows.append(
            {
                "condition": condition,
                "title": passage.title,
                "question": q.question,
                "gold": q.answer,
                "prediction": prediction,
                "correct": bool(answers is not None and grade(q.question, q.answer, prediction)),
                **({"update_error": error} if error else {}),
            }
        )
    return rows


# ---------------------------------------------------------------- the run


def run(cfg: Config, lm: LM, tracker: Tracker, meter: PhaseMeter) -> dict[str, Any]:
    """Evaluate every configured condition on the evaluation passages; return the summary metrics."""
    if cfg.task.mode != "single":
        from seal.tasks import knowledge_modes  # cpt and continual build on this module's pieces

        return knowledge_modes.run(cfg, lm, tracker, meter)
    conditions = list(cfg.task.conditions)
    unknown = sorted(set(conditions) - set(CONDITIONS))
    if unknown:
        raise ValueError(f"unknown task.conditions {unknown}: expected some of {list(CONDITIONS)}")
    passages = load_passages(cfg.data).eval
    if not passages:
        raise DataError("no evaluation passages (data.n_eval=0 or an empty file)")
    log.info(
        "knowledge: %d evaluation passages, %d questions",
        len(passages),
        sum(len(p.questions) for p in passages),
    )
    grade = make_grader(cfg.task.grader, cfg.task.f1_threshold)
    rows: dict[str, list[dict[str, Any]]] = {c: [] for c in conditions}

    if "base" in conditions:
        with meter.phase("eval"):
            for passage, answers in zip(
                passages, answer(lm, cfg.task, passages, "base answers"), strict=True
            ):
                rows["base"] += graded_rows("base", passage, answers, grade)

    edits: list[str | None] = [None] * len(passages)
    if "self_edit" in conditions:
        seeds = [derive_seed(cfg.seed, "self_edit", 0, p.title, 0) for p in passages]
        with meter.phase("generate"):
            edits = write_self_edits(lm, cfg.self_edit, passages, seeds)
        tracker.results(
            "self_edits", [{"title": p.title, "self_edit": e} for p, e in zip(passages, edits, strict=True)]
        )

    metrics: dict[str, Any] = {}
    updated = [c for c in conditions if c != "base"]
    if updated:
        inner_rows, metrics = inner_loops(cfg, lm, passages, edits, updated, grade, meter)
        rows.update(inner_rows)
    for condition in conditions:
        tracker.results(condition, rows[condition])
        summary = accuracy_summary([r["correct"] for r in rows[condition]])
        for key in ("accuracy", "n", "ci95"):
            metrics[f"knowledge/{condition}/{key}"] = summary[key]
    return metrics


def update_job(cfg: Config, passage: Passage, edit: str | None, condition: str) -> UpdateJob:
    """The update of one condition on one passage: `passage` trains on the passage alone, `self_edit` on the
    passage plus the self-edit's items. The seed depends on (run seed, round, passage, condition) only."""
    return UpdateJob(
        key=condition,
        sequences=training_sequences(
            passage.title,
            passage.context,
            edit if condition == "self_edit" else None,
            cfg.self_edit.split,
            include_passage=cfg.adapt.include_passage or condition == "passage",
        ),
        seed=derive_seed(cfg.seed, "adapter", 0, passage.title, condition),
    )


def inner_loops(
    cfg: Config,
    lm: LM,
    passages: list[Passage],
    edits: list[str | None],
    conditions: list[str],
    grade: Callable[[str, str, str], bool],
    meter: PhaseMeter,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Update and evaluate every (passage, condition): a chunk of jobs trained together (`adapt.max_adapters`
    at a time), then one generation call for all their questions. Returns graded rows and inner-loop
    metrics. A failed update is recorded (its questions count as wrong) and the others go on."""
    updater = make_updater(lm, cfg.adapt)
    rows: dict[str, list[dict[str, Any]]] = {c: [] for c in conditions}
    losses: dict[str, list[float]] = {c: [] for c in conditions}
    tokens, failures = 0, 0
    # Adapters wait on the CPU between their update and their evaluation: a chunk of 4 x max_adapters jobs
    # keeps the slots busy (a finished job's slot takes the next) without holding every adapter at once.
    per_chunk = max(1, 4 * cfg.adapt.max_adapters // len(conditions))
    pairs = list(zip(passages, edits, strict=True))
    start = time.perf_counter()
    for at in range(0, len(pairs), per_chunk):
        todo = [(passage, edit, c) for passage, edit in pairs[at : at + per_chunk] for c in conditions]
        done = f"{at + len(todo) // len(conditions)}/{len(pairs)} passages"
        with meter.phase("update"):
            jobs = [update_job(cfg, passage, edit, c) for passage, edit, c in todo]
            adapters = updater.train(jobs, progress=f"updates ({done})")
        trained = [(p, a) for (p, _, _), a in zip(todo, adapters, strict=True) if a.result.error is None]
        with meter.phase("eval"):
            answers = answer(
                lm,
                cfg.task,
                [p for p, _ in trained],
                desc=f"answers ({done})",
                updater=updater,
                adapters=[a for _, a in trained],
            )
        answers_of = {id(a): ans for (_, a), ans in zip(trained, answers, strict=True)}
        for (passage, _, condition), adapter in zip(todo, adapters, strict=True):
            tokens += adapter.result.tokens
            if adapter.result.error:
                failures += 1
                log.warning("update %s on %r failed: %s", condition, passage.title, adapter.result.error)
            else:
                losses[condition].append(adapter.result.epoch_losses[-1])
            answered = answers_of.get(id(adapter))
            rows[condition] += graded_rows(condition, passage, answered, grade, adapter.result.error)
    seconds = time.perf_counter() - start
    metrics: dict[str, Any] = {f"adapt/{c}/final_loss": sum(v) / len(v) for c, v in losses.items() if v}
    metrics["adapt/failed_updates"] = failures
    metrics["throughput/update_tokens_per_s"] = tokens / max(meter.seconds["update"], 1e-9)
    # An inner loop = one update and the evaluation of its adapter.
    metrics["throughput/self_edits_per_hour"] = 3600 * len(pairs) * len(conditions) / seconds
    return rows, metrics
