"""task.mode=cpt and task.mode=continual on the tiny real model: the records they promise, and that their
figures agree with the graded rows they come from."""

import itertools
import json
from collections import defaultdict

import matplotlib.image
import pytest
import torch

from seal import multilora
from seal.adapt import LoraUpdater
from seal.grading import accuracy_summary
from seal.models import weights_checksum
from seal.multilora import MultiLoraUpdater
from seal.tasks import knowledge_modes
from seal.tasks.knowledge_modes import retention_summary
from seal.tracking import read_offline_run
from seal.train import train
from tests.conftest import TINY_OVERRIDES, make_cfg

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def cycling_grader(monkeypatch):
    """The tiny model answers nothing a real grader accepts, so every accuracy would be 0 and any mix-up of
    rows would go unseen. This grader marks one question in three correct, in grading order."""
    pattern = itertools.cycle([True, False, False])
    monkeypatch.setattr(knowledge_modes, "make_grader", lambda *a, **k: lambda q, gold, pred: next(pattern))


@pytest.fixture(scope="module")
def cpt_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cpt")
    jobs = []
    real_train = MultiLoraUpdater.train

    def spy(self, todo, progress=None):
        jobs.append(todo)
        return real_train(self, todo, progress)

    with pytest.MonkeyPatch.context() as mp:
        cycling_grader(mp)
        mp.setattr(MultiLoraUpdater, "train", spy)
        metrics = train(make_cfg(run_dir, *TINY_OVERRIDES, "task.mode=cpt"))
    return run_dir, metrics, jobs


def test_cpt_trains_one_adapter_per_condition_on_all_passages(cpt_run):
    run_dir, metrics, calls = cpt_run
    [jobs] = calls  # one call: both conditions train together
    assert [job.key for job in jobs] == ["passage", "self_edit"]
    passage, self_edit = (job.sequences for job in jobs)
    titles = [r["title"] for r in read_jsonl(run_dir / "results" / "self_edits.jsonl")]
    assert len(titles) == 2 and len(passage) == 2  # data.n_eval=2: each passage's text, once
    assert [s.split("\n", 1)[0] for s in passage] == titles
    assert set(passage) < set(self_edit)  # the passages and their self-edits' items
    assert metrics["cpt/passage/train_sequences"] == 2
    assert metrics["cpt/self_edit/train_sequences"] == len(self_edit)
    assert metrics["adapt/failed_updates"] == 0
    # two inner loops (each adapter's update and its answers), within the update and eval phases
    assert (
        0
        < 3600 * 2 / metrics["throughput/self_edits_per_hour"]
        <= metrics["time/update_s"] + metrics["time/eval_s"] + 0.002  # time/* is rounded to the millisecond
    )
    assert metrics["throughput/update_tokens_per_s"] > 0


def test_cpt_reports_each_condition_as_single_mode_does(cpt_run):
    run_dir, metrics, _ = cpt_run
    summary = json.loads((run_dir / "summary.json").read_text())["metrics"]
    assert summary == json.loads(json.dumps(metrics))
    for condition in ("base", "passage", "self_edit"):
        rows = read_jsonl(run_dir / "results" / f"{condition}.jsonl")
        assert len(rows) == 10 and {r["condition"] for r in rows} == {condition}  # 2 passages x 5 questions
        expected = accuracy_summary([r["correct"] for r in rows])
        assert 0 < expected["accuracy"] < 1
        for key in ("accuracy", "n", "ci95"):
            assert summary[f"knowledge/{condition}/{key}"] == pytest.approx(expected[key]), (condition, key)
    assert {k.rsplit("/", 1)[0] for k in summary if k.startswith("paired/")} == {
        "paired/passage_vs_base",
        "paired/self_edit_vs_base",
        "paired/self_edit_vs_passage",
    }


N_CONTINUAL = 3


@pytest.fixture(scope="module")
def continual_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("continual")
    checksums = []
    real_merge = MultiLoraUpdater.merge

    def spy(self, adapter):
        before = weights_checksum(self.lm.model)
        real_merge(self, adapter)
        checksums.append((before, weights_checksum(self.lm.model)))

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_SILENT", "true")
        cycling_grader(mp)
        mp.setattr(MultiLoraUpdater, "merge", spy)
        overrides = ("task.mode=continual", f"data.n_eval={N_CONTINUAL}", "logger=wandb")
        metrics = train(make_cfg(run_dir, *TINY_OVERRIDES, *overrides))
    return run_dir, metrics, checksums


def test_continual_merges_every_edit_into_the_base_weights(continual_run):
    run_dir, metrics, checksums = continual_run
    assert len(checksums) == N_CONTINUAL
    assert all(before != after for before, after in checksums)
    assert metrics["adapt/failed_updates"] == 0
    assert metrics["throughput/update_tokens_per_s"] > 0 and metrics["throughput/self_edits_per_hour"] > 0
    edits = read_jsonl(run_dir / "results" / "self_edits.jsonl")
    assert [e["after_edits"] for e in edits] == list(range(N_CONTINUAL))


def test_retention_matrix_agrees_with_the_graded_rows(continual_run):
    run_dir, metrics, _ = continual_run
    n = N_CONTINUAL
    retention = json.loads((run_dir / "results" / "retention.json").read_text())
    matrix = retention["accuracy"]
    assert len(matrix) == n + 1 and all(len(row) == n for row in matrix)
    assert retention["condition"] == "self_edit" and retention["update_errors"] == [None] * n
    rows = read_jsonl(run_dir / "results" / "continual.jsonl")
    assert len(rows) == (n + 1) * 5 * n
    flags = defaultdict(list)
    for r in rows:
        flags[r["after_edits"], r["passage"]].append(r["correct"])
    for k, row in enumerate(matrix):
        for name, value in zip(retention["passages"], row, strict=True):
            assert 0.0 <= value <= 1.0
            assert value == pytest.approx(sum(flags[k, name]) / 5), (k, name)
    assert len({v for row in matrix for v in row}) > 1  # the cycling grader makes the entries differ

    assert metrics["retention/first_after_last"] == matrix[n][0]
    just_edited = sum(matrix[i + 1][i] for i in range(n)) / n
    assert metrics["retention/just_edited"] == pytest.approx(just_edited)
    previous = [matrix[2][0], (matrix[3][0] + matrix[3][1]) / 2]  # after edits 2 and 3, n = 3
    assert metrics["retention/mean_previous"] == pytest.approx(sum(previous) / 2)
    assert retention["mean_previous"] == metrics["retention/mean_previous"]

    for name, k in (("base", 0), ("continual", n)):
        expected = accuracy_summary([r["correct"] for r in rows if r["after_edits"] == k])
        assert metrics[f"knowledge/{name}/accuracy"] == pytest.approx(expected["accuracy"])
        assert metrics[f"knowledge/{name}/n"] == 5 * n
    assert read_jsonl(run_dir / "results" / "base.jsonl") == [r for r in rows if r["after_edits"] == 0]
    first, last = ([r["correct"] for r in rows if r["after_edits"] == k] for k in (0, n))
    only_last = sum(b and not a for a, b in zip(first, last, strict=True))
    only_first = sum(a and not b for a, b in zip(first, last, strict=True))
    paired = {k: metrics[f"paired/continual_vs_base/{k}"] for k in ("only_first", "only_second")}
    assert paired == {"only_first": only_last, "only_second": only_first}
    assert only_last - only_first == sum(last) - sum(first)
    history = read_jsonl(run_dir / "metrics.jsonl")
    assert [h["continual/after_edits"] for h in history[:-1]] == list(range(n + 1))
    assert [h["continual/first_passage_accuracy"] for h in history[:-1]] == [row[0] for row in matrix]


def test_continual_measures_reasoning_before_the_first_edit_and_after_the_last(continual_run):
    _, metrics, _ = continual_run
    assert metrics["reasoning/before/n"] == metrics["reasoning/after_update/n"] == 12  # per_task=2, 6 kinds
    assert metrics["reasoning/forgetting"] == pytest.approx(
        metrics["reasoning/before/accuracy"] - metrics["reasoning/after_update/accuracy"]
    )
    assert metrics["retention/prior_asked"] == 40 and "retention/prior_known" in metrics


def test_retention_heatmap_is_a_png_and_goes_to_wandb(continual_run):
    run_dir, _, _ = continual_run
    png = run_dir / "retention.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    height, width, _ = matplotlib.image.imread(png).shape
    assert height > 100 and width > 100
    [run_file] = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    stored = read_offline_run(run_file)
    assert stored["history"][-1]["retention/heatmap/_type"] == "image-file"
    summary = json.loads((run_dir / "summary.json").read_text())["metrics"]
    for key, value in summary.items():
        assert stored["summary"][key] == (pytest.approx(value) if isinstance(value, float) else value), key


def test_continual_with_failed_updates_keeps_the_model_and_finishes(tmp_path, monkeypatch):
    real = multilora.token_losses
    monkeypatch.setattr(multilora, "token_losses", lambda *a, **k: real(*a, **k) * float("nan"))
    merges = []
    monkeypatch.setattr(MultiLoraUpdater, "merge", lambda self, adapter: merges.append(adapter))
    overrides = ("task.mode=continual", "task.conditions=[passage]")
    metrics = train(make_cfg(tmp_path, *TINY_OVERRIDES, *overrides))
    assert merges == [] and metrics["adapt/failed_updates"] == 2
    retention = json.loads((tmp_path / "results" / "retention.json").read_text())
    assert retention["condition"] == "passage"
    assert all("non-finite loss" in error for error in retention["update_errors"])
    assert "knowledge/base/accuracy" not in metrics and "retention/mean_previous" in metrics
    assert not (tmp_path / "results" / "self_edits.jsonl").exists()


def test_retention_summary_of_a_hand_made_matrix():
    matrix = [[0.2, 0.0, 0.0], [0.8, 0.2, 0.0], [0.6, 1.0, 0.4], [0.4, 0.6, 0.6]]
    summary = retention_summary(matrix)
    assert summary["first_after_last"] == 0.4
    assert summary["just_edited"] == pytest.approx((0.8 + 1.0 + 0.6) / 3)
    assert summary["mean_previous"] == pytest.approx((0.6 + (0.4 + 0.6) / 2) / 2)
    assert "mean_previous" not in retention_summary([[0.0], [1.0]])  # one edit: nothing before it
    with pytest.raises(ValueError, match="n \\+ 1 rows"):
        retention_summary([[0.0, 1.0]])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ("task.mode=magic",),
            r"unknown task.mode 'magic': expected one of \['single', 'cpt', 'continual'\]",
        ),
        (("task.mode=continual", "task.conditions=[base]"), "continual needs passage or self_edit"),
        (("task.mode=cpt", "task.conditions=[base,magic]"), "unknown task.conditions"),
        (("task.mode=cpt", "rl=rest_em"), "task.mode=cpt runs no outer loop: add rl=none"),
        (("task.mode=continual", "self_edit.source=file"), "needs self_edit.source=model"),
    ],
)
def test_bad_mode_or_conditions_are_clear_errors(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(make_cfg(tmp_path, *TINY_OVERRIDES, *overrides))


def test_continual_merges_with_the_one_at_a_time_updater_too(tmp_path, monkeypatch):
    checksums = []
    real_merge = LoraUpdater.merge

    def spy(self, adapter):
        before = weights_checksum(self.lm.model)
        real_merge(self, adapter)
        checksums.append((before, weights_checksum(self.lm.model)))

    monkeypatch.setattr(LoraUpdater, "merge", spy)
    overrides = ("task.mode=continual", "adapt.batch_adapters=false")
    metrics = train(make_cfg(tmp_path, *TINY_OVERRIDES, *overrides))
    assert len(checksums) == 2 and all(before != after for before, after in checksums)
    assert metrics["adapt/failed_updates"] == 0 and metrics["knowledge/continual/n"] == 10


def test_cpt_with_one_failed_update_grades_the_other_adapter(tmp_path, monkeypatch):
    """The self_edit job (slot 1, with one lane) fails: its questions count as wrong, passage keeps its own
    answers."""
    real = multilora.adapter_losses

    def poisoned(losses, slots, counts):
        out = real(losses, slots, counts)
        return out + torch.tensor([0.0, float("nan")] + [0.0] * (len(counts) - 2), device=out.device)

    monkeypatch.setattr(multilora, "adapter_losses", poisoned)
    cycling_grader(monkeypatch)
    metrics = train(
        make_cfg(
            tmp_path, *TINY_OVERRIDES, "task.mode=cpt", "task.conditions=[passage,self_edit]", "adapt.lanes=1"
        )
    )
    assert metrics["adapt/failed_updates"] == 1
    failed = read_jsonl(tmp_path / "results" / "self_edit.jsonl")
    assert len(failed) == 10 and all(
        "non-finite loss" in r["update_error"] and not r["correct"] for r in failed
    )
    passage = read_jsonl(tmp_path / "results" / "passage.jsonl")
    assert len(passage) == 10 and not any("update_error" in r for r in passage)
    assert metrics["knowledge/passage/accuracy"] == pytest.approx(sum(r["correct"] for r in passage) / 10)
    assert metrics["knowledge/passage/accuracy"] > 0 and metrics["knowledge/self_edit/accuracy"] == 0
