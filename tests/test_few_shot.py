"""The few-shot self-edit: the prompt shows the demonstrations; the model's JSON configuration is either
written under constraints (valid by construction, each value drawn from the model's probabilities) or free,
parsed strictly, resampled a bounded number of times, and recorded when it never parses."""

import dataclasses
import json
import random

import pytest

from seal.adapt import UpdateJob, tokenize
from seal.arc import ArcTask, easy_tasks, grid_text
from seal.models import choice_scorer, continuation_logprobs
from seal.tasks import few_shot
from seal.tasks.few_shot import (
    FIELDS,
    ConfigError,
    TTTConfig,
    parse_config,
    sample_configs,
    self_edit_prompt,
    ttt_job,
    write_constrained,
)
from seal.train import train
from tests.conftest import TINY_OVERRIDES, make_cfg

GOOD = {"augmentations": ["basic", "size"], "loss": "output_tokens", "learning_rate": 1e-4, "epochs": 3}


def test_the_prompt_shows_every_demonstration():
    task = easy_tasks("flip", 1, seed=0)[0]
    prompt = self_edit_prompt(task)
    assert all(grid_text(p.input) in prompt and grid_text(p.output) in prompt for p in task.train)
    assert grid_text(task.test[0].output) not in prompt  # the answer is never shown
    # An empty list still gets colour-permuted copies (task.arc.colour_permutations): the prompt says so.
    assert "as they are" not in prompt and "colours swapped" in prompt


def test_a_configuration_is_found_inside_prose_and_code_fences():
    reply = "Sure! {not json} Here:\n```json\n" + json.dumps(GOOD) + "\n```\nGood luck."
    assert parse_config(reply) == TTTConfig(("basic", "size"), "output_tokens", 1e-4, 3)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"augmentations": ["basic", "magic"]}, "augmentations must be a list"),
        ({"loss": "some"}, "loss must be one of"),
        ({"learning_rate": 5.0}, "outside"),
        ({"learning_rate": "fast"}, "must be a number"),
        ({"epochs": 2.5}, "whole number"),
        ({"epochs": True}, "whole number"),
        ({"batch": 4}, "unknown keys"),
    ],
)
def test_an_invalid_configuration_says_what_is_wrong(change, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(json.dumps({**GOOD, **change}))
    with pytest.raises(ConfigError, match="missing keys"):
        parse_config(json.dumps({k: v for k, v in GOOD.items() if k != "epochs"}))
    with pytest.raises(ConfigError, match="no JSON object"):
        parse_config("I would rotate the grids.")


MALFORMED = [
    {"augmentations": [["basic"]]},
    {"augmentations": [{"name": "basic"}]},
    {"augmentations": "basic"},
    {"loss": ["output_tokens"]},
    {"loss": {"output_tokens": 1}},
    {"learning_rate": 10**400},
    {"learning_rate": float("nan")},
    {"learning_rate": [1e-4]},
    {"epochs": 10**400},
    {"epochs": "2"},
]


@pytest.mark.parametrize("change", MALFORMED, ids=lambda c: repr(c)[:40])
def test_a_malformed_reply_of_any_json_type_is_a_config_error(change):
    reply = json.dumps({**GOOD, **change})
    with pytest.raises(ConfigError):
        parse_config(reply)
    # A recorded rejection, never a crash of the run.
    [got] = sample_configs(lambda items, attempt: [reply] * len(items), 1, max_tries=2)
    assert got.config is None and len(got.errors) == 2


def test_json_that_python_cannot_read_is_skipped():
    for text in ('{"learning_rate": 1' + "0" * 5000 + "}", '{"augmentations": ' + "[" * 100_000):
        with pytest.raises(ConfigError, match="no JSON object"):
            parse_config(text)


def test_invalid_replies_are_resampled_a_bounded_number_of_times():
    # Item 0 parses on its third try, item 1 at once, item 2 never.
    replies = {0: ["no idea", json.dumps({**GOOD, "loss": "x"}), json.dumps(GOOD)], 1: [json.dumps(GOOD)]}
    asked = []

    def write(items, attempt):
        asked.append((items, attempt))
        return [replies[i][attempt] if i in replies else "still no JSON" for i in items]

    got = sample_configs(write, 3, max_tries=4)
    assert asked == [([0, 1, 2], 0), ([0, 2], 1), ([0, 2], 2), ([2], 3)]
    assert got[0].config == got[1].config == parse_config(json.dumps(GOOD)) and len(got[0].errors) == 2
    assert got[2].config is None and len(got[2].replies) == len(got[2].errors) == 4  # a recorded failure


FEW_SHOT = (
    *TINY_OVERRIDES,
    "task=few_shot",
    "task.arc.n_eval=2",
    "task.arc.max_examples=6",
    "task.arc.fixed.epochs=1",
)


@pytest.fixture(scope="module")
def few_shot_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("few_shot")
    return run_dir, train(make_cfg(run_dir, *FEW_SHOT))


def test_a_few_shot_run_writes_every_condition(few_shot_run):
    run_dir, metrics = few_shot_run
    records = [json.loads(x) for x in (run_dir / "results" / "few_shot.jsonl").read_text().splitlines()]
    for condition in ("icl", "ttt_fixed", "self_edit"):
        mine = [r for r in records if r["condition"] == condition]
        assert len(mine) == metrics[f"few_shot/{condition}/n"] == 2
        assert metrics[f"few_shot/{condition}/success"] == sum(r["success"] for r in mine) / 2
        assert all(len(r["top2"]) == 1 and len(r["top2"][0]) <= 2 for r in mine if r["error"] is None)
    fixed = [r for r in records if r["condition"] == "ttt_fixed"]
    assert all(r["config"]["augmentations"] == ["basic"] and r["error"] is None for r in fixed)
    assert metrics["few_shot/ttt_fixed/ttt_too_long"] == 0  # the puzzles are small
    # Constrained decoding (the default): every self-edit is a valid configuration at the first try.
    edits = [r for r in records if r["condition"] == "self_edit"]
    written = [json.loads(json.dumps(dataclasses.asdict(parse_config(r["self_edit"])))) for r in edits]
    assert [r["config"] for r in edits] == written and all(r["tries"] == 1 for r in edits)
    assert metrics["few_shot/self_edit/valid_config_rate"] == 1
    assert "few-shot: ARC tasks solved" in (run_dir / "report.md").read_text()
    assert metrics["time/update_s"] > 0 and "mem/peak_update_mb" in metrics
    # the inner loops' throughput: the 4 tasks trained (ttt_fixed and self_edit; icl trains none)
    loops_s = 3600 * 4 / metrics["throughput/self_edits_per_hour"]
    assert 0 < loops_s <= metrics["time/update_s"] + metrics["time/eval_s"]
    assert metrics["throughput/update_tokens_per_s"] > 0
    # The conditions compared task by task: each against each one before it.
    conditions = ("icl", "ttt_fixed", "self_edit")
    solved = {c: [r["success"] for r in records if r["condition"] == c] for c in conditions}
    for first, second in (("ttt_fixed", "icl"), ("self_edit", "icl"), ("self_edit", "ttt_fixed")):
        only_first = sum(a and not b for a, b in zip(solved[first], solved[second], strict=True))
        assert metrics[f"paired/{first}_vs_{second}/only_first"] == only_first
    assert "few-shot: conditions compared on the same tasks" in (run_dir / "report.md").read_text()


def test_a_killed_few_shot_run_resumes_from_its_finished_conditions(tmp_path, monkeypatch, few_shot_run):
    def killed(*args, **kwargs):
        raise RuntimeError("killed while writing self-edits")

    monkeypatch.setattr(few_shot, "write_configs", killed)  # self_edit, the third condition
    with pytest.raises(RuntimeError, match="killed"):
        train(make_cfg(tmp_path, *FEW_SHOT))
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "rounds" / "round_0").iterdir()) == [
        "condition_icl.json",
        "condition_ttt_fixed.json",
    ]
    tried = []
    real = few_shot.attempt
    monkeypatch.setattr(few_shot, "attempt", lambda *a: tried.append(a[6]) or real(*a))  # a[6]: the tag
    metrics = train(make_cfg(tmp_path, *FEW_SHOT))  # resume=auto continues the run in its directory
    assert tried == ["self_edit"]  # icl and ttt_fixed were read back, not recomputed
    # the throughput keys are of what this process computed: the two self_edit tasks' TTT and answers
    loops_s = 3600 * 2 / metrics["throughput/self_edits_per_hour"]
    # within the two phases (time/* rounded to the millisecond), and the bit of Python between them
    assert 0 < loops_s <= metrics["time/update_s"] + metrics["time/eval_s"] + 0.05
    run_dir, uninterrupted = few_shot_run
    assert {k: v for k, v in metrics.items() if k.startswith("few_shot/")} == {
        k: v for k, v in uninterrupted.items() if k.startswith("few_shot/")
    }
    resumed = (tmp_path / "results" / "few_shot.jsonl").read_text()
    assert resumed == (run_dir / "results" / "few_shot.jsonl").read_text()


def test_free_decoding_records_a_failure_after_the_bounded_tries(tmp_path):
    # The tiny random model writes no JSON when free: every self-edit is a recorded failure after 3 tries.
    overrides = ("task.conditions=[self_edit]", "task.arc.decoding=free")
    metrics = train(make_cfg(tmp_path, *FEW_SHOT, *overrides))
    edits = [json.loads(x) for x in (tmp_path / "results" / "few_shot.jsonl").read_text().splitlines()]
    assert all(r["tries"] == 3 and r["error"].startswith("no valid configuration in 3 tries") for r in edits)
    assert all(len(r["rejected"]) == 3 for r in edits)
    assert metrics["few_shot/self_edit/failed"] == 2 and metrics["few_shot/self_edit/valid_config_rate"] == 0


def test_a_constrained_self_edit_takes_the_likeliest_value_of_each_field_at_temperature_0(tiny_lm):
    prompt = tiny_lm.format(self_edit_prompt(easy_tasks("flip", 1, seed=0)[0]))
    reply = "{"
    for n, (key, values) in enumerate(FIELDS):  # the same choice, computed with the plain batched scorer
        reply += f'"{key}":' if n == 0 else f' "{key}":'
        end = "}" if n == len(FIELDS) - 1 else ","
        scores = continuation_logprobs(
            tiny_lm, [prompt] * len(values), [reply + f" {v}{end}" for v in values]
        )
        reply += f" {values[max(range(len(values)), key=lambda i: scores[i][0])]}{end}"
    assert write_constrained(choice_scorer(tiny_lm, prompt), random.Random(0), temperature=0) == reply
    parse_config(reply)  # valid by construction


def test_constrained_self_edits_are_sampled_and_repeat_with_their_seed(tiny_lm):
    prompt = tiny_lm.format(self_edit_prompt(easy_tasks("flip", 1, seed=0)[0]))
    score = choice_scorer(tiny_lm, prompt)  # one read of the prompt serves every sample
    replies = [write_constrained(score, random.Random(s), temperature=1.0) for s in range(6)]
    fresh = [write_constrained(choice_scorer(tiny_lm, prompt), random.Random(s), 1.0) for s in range(6)]
    assert replies == fresh  # the shared prompt cache is left as it was by every sample
    assert len(set(replies)) > 1  # sampled, not the argmax every time
    assert all(isinstance(parse_config(r), TTTConfig) for r in replies)


def test_the_cost_filter_records_a_failure_without_training(tmp_path):
    metrics = train(make_cfg(tmp_path, *FEW_SHOT, "task.conditions=[ttt_fixed]", "task.arc.max_steps=2"))
    records = [json.loads(x) for x in (tmp_path / "results" / "few_shot.jsonl").read_text().splitlines()]
    assert metrics["few_shot/ttt_fixed/failed"] == 2 and metrics["few_shot/ttt_fixed/success"] == 0
    assert all(r["error"].startswith("cost filter: 6 optimiser steps") for r in records)
    assert "time/update_s" not in metrics or metrics["time/update_s"] < 1


def test_unknown_conditions_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown task.conditions"):
        train(make_cfg(tmp_path, *FEW_SHOT, "task.conditions=[base]"))


@pytest.mark.parametrize(
    "override, error, message",
    [
        ("task.arc.fixed.loss=outputs", ConfigError, "task.arc.fixed: loss must be one of"),
        ("task.arc.fixed.augmentations=[basic,magic]", ConfigError, "task.arc.fixed: augmentations"),
        ("task.arc.fixed.learning_rate=5.0", ConfigError, "task.arc.fixed: learning_rate 5.0 is outside"),
        ("task.arc.views=0", ValueError, "task.arc.views must be from 1 to 7"),
        ("task.arc.views=8", ValueError, "task.arc.views must be from 1 to 7"),
        ("task.arc.max_examples=0", ValueError, "task.arc.max_examples must be at least 1"),
    ],
)
def test_bad_hand_chosen_settings_are_refused_before_any_work(
    tmp_path, monkeypatch, override, error, message
):
    monkeypatch.setattr(few_shot, "load_tasks", lambda *a: pytest.fail("the run started"))
    with pytest.raises(error, match=message):
        train(make_cfg(tmp_path, *FEW_SHOT, "task.conditions=[icl]", override))


def test_ttt_examples_longer_than_max_length_are_left_out(tmp_path, tiny_lm):
    task = easy_tasks("flip", 1, seed=0)[0]
    config = TTTConfig(("basic",), "output_tokens", 1e-3, 1)

    def job(max_length: int) -> tuple[UpdateJob | str, int]:
        return ttt_job(
            make_cfg(tmp_path, *FEW_SHOT, f"task.arc.max_length={max_length}"), tiny_lm, task, config, 0
        )

    whole, none_left_out = job(10_000)
    lengths = sorted(len(r.ids) for r in tokenize(tiny_lm, whole.sequences, None, whole.prefixes))
    assert none_left_out == 0 and len(lengths) == 6 and lengths[0] < lengths[-1]
    limit = lengths[-1] - 1  # the longest examples are left out, not all of them
    cut, left_out = job(limit)
    rows = tokenize(tiny_lm, cut.sequences, None, cut.prefixes)
    # Every kept example is whole: its answer grid and EOS, within the limit.
    assert left_out == sum(n > limit for n in lengths) > 0 and len(rows) == 6 - left_out
    assert all(len(r.ids) <= limit and r.ids[-1] == tiny_lm.tokenizer.eos_token_id for r in rows)
    assert job(lengths[0] - 1) == (
        f"all 6 TTT examples are longer than task.arc.max_length={lengths[0] - 1} tokens",
        6,
    )
    # A task of one demonstration has no TTT set: a recorded failure, not an IndexError in the updater.
    alone = ArcTask("alone", task.train[:1], task.test)
    failed, _ = ttt_job(make_cfg(tmp_path, *FEW_SHOT), tiny_lm, alone, config, 0)
    assert failed.startswith("no TTT examples: leave-one-out needs 2 demonstrations, the task has 1")


def test_a_run_whose_examples_are_all_too_long_records_the_failures(tmp_path):
    overrides = ("task.conditions=[icl,ttt_fixed]", "task.arc.max_length=20")
    metrics = train(make_cfg(tmp_path, *FEW_SHOT, *overrides))
    records = [json.loads(x) for x in (tmp_path / "results" / "few_shot.jsonl").read_text().splitlines()]
    fixed = [r for r in records if r["condition"] == "ttt_fixed"]
    assert all("longer than task.arc.max_length=20" in r["error"] for r in fixed)
    assert metrics["few_shot/ttt_fixed/failed"] == 2 and metrics["few_shot/ttt_fixed/ttt_too_long"] == 2 * 6
    assert "few_shot/icl/ttt_too_long" not in metrics  # no TTT set in icl


def test_rest_em_fine_tunes_the_generator_on_configurations_that_solved_their_task(tmp_path, monkeypatch):
    # The tiny model writes no JSON and solves nothing: it is given a valid reply, and every other attempt
    # counts as solved, so that the round keeps some self-edits.
    reply = json.dumps({"augmentations": [], "loss": "all_tokens", "learning_rate": 1e-3, "epochs": 1})
    monkeypatch.setattr(few_shot, "generate", lambda lm, prompts, **kw: [reply] * len(prompts))
    calls = []
    monkeypatch.setattr(few_shot, "pass_at_2", lambda ranked, answers: calls.append(1) or len(calls) % 2 == 1)
    overrides = ("rl=rest_em", "rl.rounds=1", "rl.samples=2", "task.arc.n_train=2", "rl.sft.epochs=1")
    overrides += ("task.arc.decoding=free",)
    metrics = train(make_cfg(tmp_path, *FEW_SHOT, "task.conditions=[icl]", *overrides))
    records = [json.loads(x) for x in (tmp_path / "results" / "few_shot.jsonl").read_text().splitlines()]
    tried = [r for r in records if r["condition"] == "round_1"]
    assert len(tried) == 2 * 2 and {r["config"]["loss"] for r in tried} == {"all_tokens"}
    assert metrics["rl/round_1/kept_self_edits"] == sum(r["success"] for r in tried) == 2
    assert metrics["rl/round_1/reward_mean"] == 0.5 and metrics["rl/round_1/valid_config_rate"] == 1
    assert "rl/round_1/sft_loss" in metrics
    assert metrics["few_shot/seal/n"] == 2 and len([r for r in records if r["condition"] == "seal"]) == 2
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["rl/round"] for r in rows if "rl/round" in r] == [1]
