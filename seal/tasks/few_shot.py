"""Few-shot learning on ARC (SEAL section 4.2): the self-edit is a test-time-training configuration.

The model reads a puzzle's demonstrations and answers with a JSON configuration: which augmentation
families to train on, whether the loss covers every token or the outputs only, the learning rate and the
number of epochs. This module holds the text the model reads and writes, and the bounded, recorded parse of
its JSON. (The test-time-training run itself, `task=few_shot`, is not built yet.)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from seal.arc import FAMILIES, ArcTask, Pair, grid_text

LOSSES = ("all_tokens", "output_tokens")
LR_RANGE = (1e-6, 1e-2)
EPOCHS_RANGE = (1, 10)

SELF_EDIT_PROMPT = """You will set up the training of a model that must learn a grid puzzle from examples.
Each grid is written one row per line, one digit (a colour from 0 to 9) per cell.

{examples}

Choose how to train on these examples. Reply with one JSON object and nothing else, with these keys:
"augmentations": a list drawn from "basic" (rotations, flips, transposes, shifts), "size" (grids enlarged
two times in height, width or both), "chain" (a basic change followed by an enlargement), "repeat" (grids
tiled twice across or down); an empty list trains on the examples as they are.
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
            except json.JSONDecodeError:
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
    augmentations = doc["augmentations"]
    if not isinstance(augmentations, list) or not all(a in FAMILIES for a in augmentations):
        raise ConfigError(f"augmentations must be a list drawn from {list(FAMILIES)}, got {augmentations!r}")
    if doc["loss"] not in LOSSES:
        raise ConfigError(f"loss must be one of {list(LOSSES)}, got {doc['loss']!r}")
    lr = doc["learning_rate"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
        raise ConfigError(f"learning_rate must be a number, got {lr!r}")
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

    config: TTTConfig | None
    replies: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def sample_config(write: Callable[[int], str], max_tries: int) -> Sampled:
    """Ask `write(try_number)` for a self-edit until one parses, at most `max_tries` times: an invalid
    reply is resampled, and after the last try the sample is a recorded failure, never an endless loop."""
    if max_tries < 1:
        raise ValueError(f"max_tries must be at least 1, got {max_tries}")
    out = Sampled(None)
    for attempt in range(max_tries):
        reply = write(attempt)
        out.replies.append(reply)
        try:
            out.config = parse_config(reply)
            return out
        except ConfigError as err:
            out.errors.append(str(err))
    return out
