"""The reasoning probe: log-likelihood scoring checked by hand, the built-in suite's answers checked
independently, BIG-bench files read (and refused when malformed), and the command line."""

import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seal import models
from seal.config import ReasoningConfig
from seal.models import continuation_logprobs
from seal.reasoning import (
    Item,
    ReasoningDataError,
    builtin_suite,
    choose,
    evaluate,
    load_bigbench,
    load_items,
    summary,
)
from tests.conftest import CACHE_DIR, DEVICE, SHARED_DATA, load_tiny_granite

ROOT = Path(__file__).resolve().parents[1]
BIGBENCH = sorted((SHARED_DATA / "bigbench").glob("*.json"))


def by_hand(lm, prompt: str, continuation: str) -> float:
    """log p(continuation | prompt), one sequence alone, token by token from the full logits."""
    tok = lm.tokenizer
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c], device=lm.device)
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits[0].double()
    total = 0.0
    for j, token in enumerate(c):
        row = logits[len(p) + j - 1]
        total += float(row[token] - torch.logsumexp(row, dim=0))
    return total


@pytest.mark.parametrize(
    "reading", ["a prompt's choices in one row", "the model's own head everywhere", "a pair a row, 2-D mask"]
)
def test_a_choice_scores_its_log_likelihood_computed_by_hand(tiny_lm, reading, monkeypatch):
    if reading == "the model's own head everywhere":  # as for a model with soft-capped or scaled logits
        monkeypatch.setattr(models, "output_projection", lambda model: None)
    elif reading == "a pair a row, 2-D mask":  # as for flash attention, which takes no 4-D mask
        monkeypatch.setattr(models, "PACKABLE_ATTENTION", ())
    else:
        assert models.output_projection(tiny_lm.model) is tiny_lm.model.get_output_embeddings()
    item = Item(
        "hand", "Question: What is 2 + 3?\nAnswer:", (" 5", " six", " 23 and more words"), frozenset([0])
    )
    # Scored among rows of other lengths, so padding and length sorting are exercised too.
    prompts = [item.prompt] * 3 + ["Q: a much longer prompt that pads the batch a great deal more\nA:"]
    conts = [*item.choices, " yes"]
    scores = continuation_logprobs(tiny_lm, prompts, conts, batch_size=4)
    for (logp, n), cont in zip(scores[:3], item.choices, strict=True):
        assert logp == pytest.approx(by_hand(tiny_lm, item.prompt, cont), abs=1e-4)
        assert n == len(tiny_lm.tokenizer(cont, add_special_tokens=False)["input_ids"])
    hand = [by_hand(tiny_lm, item.prompt, c) for c in item.choices]
    assert choose([item], scores[:3], normalize=False) == [max(range(3), key=hand.__getitem__)]
    per_token = [h / n for h, (_, n) in zip(hand, scores, strict=False)]
    assert choose([item], scores[:3], normalize=True) == [max(range(3), key=per_token.__getitem__)]


def test_a_model_that_scales_its_logits_is_scored_through_its_own_head():
    """Granite divides its logits by `logits_scaling` after the projection: projecting the hidden state alone
    would score it wrongly, so such a model keeps its own head."""
    granite = load_tiny_granite()
    assert models.output_projection(granite.model) is None
    prompts, conts = ["Question: What is 2 + 3?\nAnswer:"] * 2, [" 5", " six"]
    for (logp, _), prompt, cont in zip(
        continuation_logprobs(granite, prompts, conts), prompts, conts, strict=True
    ):
        assert logp == pytest.approx(by_hand(granite, prompt, cont), abs=1e-4)


def test_the_builtin_suite_is_fixed_by_its_seed_and_its_answers_are_right():
    items = builtin_suite(per_task=10, seed=7)
    assert items == builtin_suite(per_task=10, seed=7) and items != builtin_suite(per_task=10, seed=8)
    assert len({i.task for i in items}) == 6 and len(items) == 60
    for item in items:
        assert len(item.correct) == 1 and len(set(item.choices)) == len(item.choices) >= 2
        question = item.prompt.removeprefix("Question: ").removesuffix("\nAnswer:")
        right = item.choices[next(iter(item.correct))].strip()
        # Each kind's answer recomputed here another way.
        if item.task in ("boolean_expressions", "multistep_arithmetic"):
            expression = question.removeprefix("What is the value of ").rstrip("?=").strip()
            assert str(eval(expression, {"__builtins__": {}})) == right, question
        elif item.task == "date_arithmetic":
            start, days = re.match(r"Today is (.+)\. What is the date (\d+) days", question).groups()
            later = datetime.datetime.strptime(start, "%B %d, %Y") + datetime.timedelta(days=int(days))
            assert later.strftime("%B %d, %Y") == right
        elif item.task == "word_sorting":
            words = question.removeprefix("Sort these words alphabetically: ").rstrip(".").split(", ")
            assert " ".join(sorted(words)) == right
        elif item.task == "logical_ordering":
            pairs = re.findall(r"(\w+) is taller than (\w+)", question)
            shorter = {b for _, b in pairs}
            taller = {a for a, _ in pairs}
            want = (taller - shorter) if "tallest" in question else (shorter - taller)
            assert want == {right}
        elif item.task == "object_counting":
            words = {"one": 1, "two": 2, "three": 3, "four": 4}
            have = re.findall(r"(one|two|three|four) (\w+)", question)
            fruit = {"apples", "pears", "plums"}
            want_fruit = "fruit" in question
            assert sum(words[n] for n, k in have if (k in fruit) == want_fruit) == int(right)
        else:
            raise AssertionError(f"unknown task {item.task}")


def test_summary_reports_accuracy_interval_and_chance():
    items = [
        Item("t", "p", (" a", " b"), frozenset([0])),
        Item("t", "p", (" a", " b", " c", " d"), frozenset([1])),
    ]
    s = summary(items, [True, False])
    assert s["accuracy"] == 0.5 and s["n"] == 2 and s["chance"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert 0 < s["ci95_low"] < 0.5 < s["ci95_high"] < 1


@pytest.mark.skipif(not BIGBENCH, reason="../shared/data/bigbench is absent")
def test_bigbench_files_load_with_their_prefixes_and_right_choices():
    for path in BIGBENCH:
        doc = json.loads(path.read_text())
        items = load_bigbench(path)
        assert len(items) == len(doc["examples"])
        for item, ex in zip(items[:20], doc["examples"][:20], strict=True):
            assert ex["input"] in item.prompt and not item.prompt.endswith(" ")
            best = max(ex["target_scores"].values())
            assert {item.choices[j].strip() for j in item.correct} == {
                c for c, v in ex["target_scores"].items() if v == best
            }
    sports = load_bigbench(SHARED_DATA / "bigbench" / "sports_understanding.json", limit=5, seed=3)
    assert len(sports) == 5 and sports == load_bigbench(
        SHARED_DATA / "bigbench" / "sports_understanding.json", 5, 3
    )
    assert sports[0].prompt.startswith("Determine whether") and sports[0].prompt.endswith(
        "Plausible/implausible?"
    )
    assert sports[0].choices[0].startswith(" ")  # the prefix's trailing space moved onto the answer


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "invalid JSON at line 1"),
        ('{"name": "x"}', "'examples' list"),
        (
            '{"examples": [{"input": "q", "target_scores": {"a": 1}}]}',
            "example 0: 'target_scores' needs at least two",
        ),
        ('{"examples": [{"target_scores": {"a": 1, "b": 0}}]}', "example 0: field 'input'"),
        ('{"examples": [{"input": "q", "target_scores": {"a": "yes", "b": 0}}]}', "must be finite numbers"),
        ('{"examples": [{"input": "q", "target_scores": {"a": NaN, "b": 0}}]}', "must be finite numbers"),
        ('{"examples": [{"input": "q", "target_scores": {"a": 0, "b": 0}}]}', "the same target score"),
        ('{"task_prefix": null, "examples": []}', "'task_prefix' must be a string, got None"),
        (b'{"examples": [{"input": "caf\xe9"}]}', "not UTF-8 text (byte 28)"),
    ],
)
def test_a_malformed_bigbench_file_is_a_clear_error(tmp_path, text, message):
    path = tmp_path / "task.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ReasoningDataError, match=re.escape(message)):
        load_bigbench(path)


@pytest.mark.parametrize("per_task", [0, -1])
def test_a_builtin_suite_of_no_items_is_a_clear_error(per_task):
    """reasoning.per_task=0 means every example of a BIG-bench file, but would give the builtin suite no
    items (and the forgetting penalty a mean of nothing): refused with the setting named."""
    message = "reasoning.per_task must be >= 1 for the builtin suite"
    with pytest.raises(ReasoningDataError, match=re.escape(message)):
        load_items(ReasoningConfig(source="builtin", per_task=per_task))
    assert len(load_items(ReasoningConfig(source="builtin", per_task=1))) == 6


def test_evaluate_marks_the_highest_scoring_choice(tiny_lm):
    items = builtin_suite(per_task=1, seed=0)
    scores = {}

    def score(prompts, conts):
        out = continuation_logprobs(tiny_lm, prompts, conts)
        scores["flat"] = out
        return out

    flags = evaluate(items, score, normalize=False)
    assert flags == [
        c in item.correct for c, item in zip(choose(items, scores["flat"], False), items, strict=True)
    ]


def test_command_line_scores_bigbench_files(tmp_path):
    task = {
        "name": "made_up",
        "examples": [
            {"input": f"Is {n} even?", "target_scores": {"yes": int(n % 2 == 0), "no": int(n % 2 == 1)}}
            for n in range(6)
        ],
    }
    path = tmp_path / "made_up.json"
    path.write_text(json.dumps(task))
    files = [str(path), *[str(p) for p in BIGBENCH[:1]]]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "seal.reasoning",
            *files,
            "model=tiny",
            f"model.device={DEVICE}",
            "reasoning.per_task=4",
            f"paths.cache_dir={CACHE_DIR}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    assert "accuracy" in out and "chance" in out and "95% interval" in out
    row = next(line for line in out.splitlines() if "made_up.json" in line)
    accuracy, n, low, high, chance = re.findall(r"\d+\.\d+|\d+", row.split("made_up.json")[1])[:5]
    assert n == "4" and chance == "0.500" and float(low) <= float(accuracy) <= float(high)
    assert all(p.name in out for p in BIGBENCH[:1])
