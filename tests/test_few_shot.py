"""The few-shot self-edit: the prompt shows the demonstrations, and the model's JSON configuration is parsed
strictly, resampled a bounded number of times, and recorded when it never parses."""

import json

import pytest

from seal.arc import easy_tasks, grid_text
from seal.tasks.few_shot import ConfigError, TTTConfig, parse_config, sample_config, self_edit_prompt

GOOD = {"augmentations": ["basic", "size"], "loss": "output_tokens", "learning_rate": 1e-4, "epochs": 3}


def test_the_prompt_shows_every_demonstration():
    task = easy_tasks("flip", 1, seed=0)[0]
    prompt = self_edit_prompt(task)
    assert all(grid_text(p.input) in prompt and grid_text(p.output) in prompt for p in task.train)
    assert grid_text(task.test[0].output) not in prompt  # the answer is never shown


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


def test_invalid_replies_are_resampled_a_bounded_number_of_times():
    replies = ["no idea", json.dumps({**GOOD, "loss": "x"}), json.dumps(GOOD)]
    asked = []
    got = sample_config(lambda i: asked.append(i) or replies[i], max_tries=5)
    assert asked == [0, 1, 2] and got.config == parse_config(json.dumps(GOOD)) and len(got.errors) == 2
    never = sample_config(lambda i: asked.append(i) or "still no JSON", max_tries=4)
    assert never.config is None and len(never.replies) == len(never.errors) == 4  # a recorded failure
