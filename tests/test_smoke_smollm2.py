"""The real bundled model, once, on one passage: the default configuration works end to end."""

import json

import pytest

from seal.train import train
from tests.conftest import make_cfg


@pytest.mark.slow
def test_smollm2_one_passage_end_to_end(tmp_path):
    cfg = make_cfg(
        tmp_path,
        "rl=none",  # the outer loop is tested on the tiny model (tests/test_rl.py) and in experiments/
        "data.n_eval=1",
        "self_edit.max_new_tokens=96",
        "adapt.epochs=3",
        # The probe runs on the real model too, small: its precision is not this test's business.
        "reasoning.per_task=2",
        "reasoning.after_update=1",
    )
    metrics = train(cfg)
    assert metrics["knowledge/base/n"] == 5
    for condition in ("base", "passage", "self_edit"):
        assert 0.0 <= metrics[f"knowledge/{condition}/accuracy"] <= 1.0
    # The instruct model answers in words, and its self-edit has something to train on.
    rows = [json.loads(x) for x in (tmp_path / "results" / "base.jsonl").read_text().splitlines()]
    assert all(r["prediction"].strip() for r in rows)
    [edit] = [json.loads(x) for x in (tmp_path / "results" / "self_edits.jsonl").read_text().splitlines()]
    assert len(edit["self_edit"].split()) > 10
    # The update changed what the model says about the passage.
    passage = [json.loads(x) for x in (tmp_path / "results" / "passage.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in passage] != [r["prediction"] for r in rows]
