"""The reasoning probe: does an update cost the model general ability?

Multiple-choice items are scored by log-likelihood: each choice's log-probability as a continuation of the
item's prompt (optionally per token), the highest wins. No generation and no parsing, so a 135 M model and a
7 B model are measured by the same code. Two sources of items:
  builtin   a suite generated here from a seed (six kinds of small reasoning problems with computed answers)
  bigbench  BIG-bench JSON tasks (`examples[].input`, `examples[].target_scores`)

`python -m seal.reasoning FILE... [model=...] [reasoning.per_task=N]` scores a model on BIG-bench files (a
seeded sample of 50 examples per file; reasoning.per_task=0 takes them all).
"""

from __future__ import annotations

import datetime
import json
import math
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from seal.config import ReasoningConfig
from seal.grading import accuracy_summary
from seal.models import continuation_logprobs

ScoreFn = Callable[[list[str], list[str]], list[tuple[float, int]]]


@dataclass(frozen=True)
class Item:
    task: str
    prompt: str  # the model reads this ...
    choices: tuple[str, ...]  # ... and each choice is scored as its continuation
    correct: frozenset[int]  # indices of the right choices

    @property
    def chance(self) -> float:
        return len(self.correct) / len(self.choices)


class ReasoningDataError(ValueError):
    """Reasoning items that cannot be had: a task file that cannot be read (the message names the file and
    the example), or settings that would give the probe no items."""


# ---------------------------------------------------------------- the built-in suite

NAMES = ("Ada", "Ben", "Cleo", "Dev", "Eun", "Femi", "Gus", "Hana")
WORDS = ("apple", "river", "candle", "zebra", "mirror", "oyster", "lantern", "basket", "quartz", "violin")
OBJECTS = {
    "apples": "fruit",
    "pears": "fruit",
    "plums": "fruit",
    "carrots": "vegetable",
    "onions": "vegetable",
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four")


def _mc(task: str, question: str, right: str, wrong: list[str], rng: random.Random) -> Item:
    """An item with the right answer among distinct wrong ones, in a random order."""
    choices = [right, *dict.fromkeys(w for w in wrong if w != right)]
    rng.shuffle(choices)
    return Item(
        task,
        f"Question: {question}\nAnswer:",
        tuple(f" {c}" for c in choices),
        frozenset([choices.index(right)]),
    )


def boolean_expression(rng: random.Random) -> Item:
    def expr(depth: int) -> tuple[str, bool]:
        if depth == 0:
            value = rng.random() < 0.5
            return str(value), value
        op = rng.choice(["and", "or", "not"])
        text, value = expr(depth - 1)
        if op == "not":
            return f"not {text}", not value
        other, other_value = expr(depth - 1)
        return f"( {text} {op} {other} )", (value and other_value) if op == "and" else (value or other_value)

    text, value = expr(2)
    return _mc("boolean_expressions", f"What is the value of {text}?", str(value), [str(not value)], rng)


def arithmetic(rng: random.Random) -> Item:
    a, b, c, d = (rng.randint(2, 9) for _ in range(4))
    plus = rng.random() < 0.5
    first = a + b if plus else a - b
    op = rng.choice("+-*")
    value = {"+": first + c + d, "-": first - (c + d), "*": first * (c + d)}[op]
    text = f"({a} {'+' if plus else '-'} {b}) {op} ({c} + {d})"
    wrong = [value + 1, value - 1, value + 10]
    return _mc("multistep_arithmetic", f"{text} =", str(value), [str(w) for w in wrong], rng)


def date_arithmetic(rng: random.Random) -> Item:
    start = datetime.date(2024, 1, 1) + datetime.timedelta(days=rng.randint(0, 360))
    days = rng.randint(2, 40)
    later = start + datetime.timedelta(days=days)
    wrong = [later + datetime.timedelta(days=x) for x in (1, -1, 7)]
    return _mc(
        "date_arithmetic",
        f"Today is {start:%B %d, %Y}. What is the date {days} days from today?",
        f"{later:%B %d, %Y}",
        [f"{w:%B %d, %Y}" for w in wrong],
        rng,
    )


def object_counting(rng: random.Random) -> Item:
    kinds = rng.sample(sorted(OBJECTS), 3)
    counts = [rng.randint(2, 4) for _ in kinds]
    target = rng.choice(["fruit", "vegetable"])
    have = ", ".join(f"{NUMBER_WORDS[n]} {k}" for n, k in zip(counts, kinds, strict=True))
    value = sum(n for n, k in zip(counts, kinds, strict=True) if OBJECTS[k] == target)
    plural = "pieces of fruit" if target == "fruit" else "vegetables"
    wrong = [sum(counts), value + 1, max(0, value - 1), value + 2]
    return _mc(
        "object_counting",
        f"I have {have}. How many {plural} do I have?",
        str(value),
        [str(w) for w in wrong],
        rng,
    )


def ordering(rng: random.Random) -> Item:
    people = rng.sample(NAMES, 4)  # tallest first
    facts = [f"{people[i]} is taller than {people[i + 1]}." for i in range(3)]
    rng.shuffle(facts)
    ask_tallest = rng.random() < 0.5
    right = people[0] if ask_tallest else people[-1]
    question = f"{' '.join(facts)} Who is the {'tallest' if ask_tallest else 'shortest'}?"
    return _mc("logical_ordering", question, right, [p for p in people if p != right], rng)


def word_sorting(rng: random.Random) -> Item:
    words = rng.sample(WORDS, 4)
    right = sorted(words)
    wrong = []
    while len(wrong) < 3:
        candidate = rng.sample(words, 4)
        if candidate != right and candidate not in wrong:
            wrong.append(candidate)
    return _mc(
        "word_sorting",
        f"Sort these words alphabetically: {', '.join(words)}.",
        " ".join(right),
        [" ".join(w) for w in wrong],
        rng,
    )


BUILTIN_TASKS = (boolean_expression, arithmetic, date_arithmetic, object_counting, ordering, word_sorting)


def builtin_suite(per_task: int, seed: int) -> list[Item]:
    """`per_task` items of each kind; the same seed gives the same items on every machine."""
    rng = random.Random(seed)
    return [make(rng) for make in BUILTIN_TASKS for _ in range(per_task)]


# ---------------------------------------------------------------- BIG-bench


def load_bigbench(path: str | Path, limit: int = 0, seed: int = 0) -> list[Item]:
    """The multiple-choice examples of a BIG-bench JSON task. The prompt is task_prefix +
    example_input_prefix + input + example_output_prefix (BIG-bench's defaults: "", "\\nQ: ", "\\nA: "); the
    right choices are those with the highest target score. `limit` > 0 keeps a seeded sample of that many,
    in file order."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ReasoningDataError(f"{path}: no such BIG-bench task file")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ReasoningDataError(f"{path}: not UTF-8 text (byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise ReasoningDataError(
            f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from err
    if not isinstance(doc, dict) or not isinstance(doc.get("examples"), list):
        raise ReasoningDataError(f"{path}: expected a BIG-bench task object with an 'examples' list")
    name = str(doc.get("name") or path.stem)
    prefixes = {"task_prefix": "", "example_input_prefix": "\nQ: ", "example_output_prefix": "\nA: "}
    for key, default in prefixes.items():
        prefixes[key] = doc.get(key, default)
        if not isinstance(prefixes[key], str):
            raise ReasoningDataError(f"{path}: {key!r} must be a string, got {prefixes[key]!r}")
    before = prefixes["task_prefix"] + prefixes["example_input_prefix"]
    after = prefixes["example_output_prefix"]
    items = []
    for i, ex in enumerate(doc["examples"]):
        scores = ex.get("target_scores") if isinstance(ex, dict) else None
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
            raise ReasoningDataError(f"{path}: example {i}: field 'input' is missing or not a string")
        if not isinstance(scores, dict) or len(scores) < 2:
            raise ReasoningDataError(f"{path}: example {i}: 'target_scores' needs at least two choices")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in scores.values()):
            raise ReasoningDataError(f"{path}: example {i}: target scores must be finite numbers")
        if max(scores.values()) <= min(scores.values()):
            raise ReasoningDataError(f"{path}: example {i}: every choice has the same target score")
        prompt = (before + ex["input"] + after).lstrip("\n")
        # Spaces that end the prompt belong to the answer's first token, as the model read them in training.
        stripped = prompt.rstrip(" ")
        space = " " if stripped != prompt or not stripped.endswith("\n") else ""
        choices = tuple(scores)
        best = max(scores.values())
        correct = frozenset(j for j, c in enumerate(choices) if scores[c] == best)
        items.append(Item(name, stripped, tuple(space + c for c in choices), correct))
    if not items:
        raise ReasoningDataError(f"{path}: no examples")
    if 0 < limit < len(items):
        keep = sorted(random.Random(seed).sample(range(len(items)), limit))
        items = [items[i] for i in keep]
    return items


def load_items(cfg: ReasoningConfig) -> list[Item]:
    """The probe's items as `cfg` sets them; never none (ReasoningDataError), as the probe's accuracies and
    the forgetting penalty average over them."""
    if cfg.source == "builtin":
        if cfg.per_task < 1:  # 0 means every example only for BIG-bench files
            raise ReasoningDataError(
                f"reasoning.per_task must be >= 1 for the builtin suite (items of each kind), "
                f"got {cfg.per_task}"
            )
        return builtin_suite(cfg.per_task, cfg.seed)
    if cfg.source == "bigbench":
        if not cfg.paths:
            raise ReasoningDataError("reasoning.source=bigbench needs reasoning.paths=[FILE,...]")
        return [item for p in cfg.paths for item in load_bigbench(p, cfg.per_task, cfg.seed)]
    raise ValueError(f"unknown reasoning.source {cfg.source!r}: expected builtin, bigbench or none")


# ---------------------------------------------------------------- scoring


def choose(items: list[Item], scores: list[tuple[float, int]], normalize: bool) -> list[int]:
    """The chosen choice of each item from the flat (log-prob, tokens) list, one entry per choice."""
    chosen, at = [], 0
    for item in items:
        row = scores[at : at + len(item.choices)]
        values = [lp / max(n, 1) if normalize else lp for lp, n in row]
        chosen.append(max(range(len(values)), key=lambda j: (values[j], -j)))
        at += len(item.choices)
    return chosen


def evaluate(items: list[Item], score: ScoreFn, normalize: bool) -> list[bool]:
    """Whether each item's highest-scoring choice is right. `score(prompts, continuations)` returns the
    summed log-probability and token count of each continuation."""
    return judged(items, score(*choice_pairs(items)), normalize)


def choice_pairs(items: list[Item]) -> tuple[list[str], list[str]]:
    """The prompts and continuations to score: each item's prompt with each of its choices, in order."""
    return [item.prompt for item in items for _ in item.choices], [c for item in items for c in item.choices]


def judged(items: list[Item], scores: list[tuple[float, int]], normalize: bool) -> list[bool]:
    """Whether each item's highest-scoring choice is right, from its choices' (log-prob, tokens) in order."""
    chosen = choose(items, scores, normalize)
    return [c in item.correct for c, item in zip(chosen, items, strict=True)]


def summary(items: list[Item], correct: list[bool], repeats: int = 1) -> dict[str, float]:
    """accuracy, n, ci95 (Wilson) and chance (the expected accuracy of a uniform guess); `repeats`: models
    that answered the same items, pooled (grading.accuracy_summary)."""
    out = accuracy_summary(correct, repeats)
    out["chance"] = sum(item.chance for item in items) / len(items) if items else 0.0
    return out


# ---------------------------------------------------------------- command line


USAGE = """usage: python -m seal.reasoning FILE... [Hydra overrides, e.g. model=tiny reasoning.per_task=0]
Scores the model (default: the bundled SmolLM2) on BIG-bench JSON task files: accuracy, n, 95 % interval and
chance level per file. reasoning.per_task=N: a seeded sample of N examples per file (default 50, 0 = all)."""


def main(argv: list[str]) -> int:
    """`python -m seal.reasoning FILE... [hydra overrides]`: accuracy, n, interval and chance per file."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from rich.console import Console
    from rich.table import Table

    from seal.config import Config, register_configs
    from seal.models import load_model, setup_runtime

    files = [a for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    if not files or any(f in ("-h", "--help") for f in files):
        print(USAGE)
        return 2
    register_configs()
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg: Config = OmegaConf.to_object(
            # conf/reasoning/bigbench.yaml: a seeded sample of 50 examples per file (reasoning.per_task)
            compose(
                config_name="config",
                overrides=["paths.output_dir=.", "logger=none", "reasoning=bigbench", *overrides],
            )
        )
    setup_runtime(cfg)
    per_file = [(f, load_bigbench(f, cfg.reasoning.per_task, cfg.reasoning.seed)) for f in files]
    lm = load_model(cfg.model, cfg.paths.cache_dir, seed=cfg.seed)
    size = cfg.reasoning.batch_size
    table = Table(
        title=f"{cfg.model.name} · {'per-token' if cfg.reasoning.normalize else 'total'} log-likelihood"
    )
    table.add_column("task file", no_wrap=True, min_width=max(len(Path(f).name) for f in files))
    for column in ("accuracy", "n", "95% interval", "chance"):
        table.add_column(column)
    for file, items in per_file:
        name = Path(file).name
        scorer: ScoreFn = lambda p, c: continuation_logprobs(lm, p, c, batch_size=size, desc=name)  # noqa: E731,B023
        s = summary(items, evaluate(items, scorer, cfg.reasoning.normalize))
        table.add_row(
            name,
            f"{s['accuracy']:.3f}",
            str(s["n"]),
            f"[{s['ci95_low']:.3f}, {s['ci95_high']:.3f}]",
            f"{s['chance']:.3f}",
        )
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
