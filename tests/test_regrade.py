"""`python -m seal.regrade`: a finished run's answers graded again by another grader, resumably."""

import json

import pytest
import yaml

from seal.grading import make_grader
from seal.regrade import RegradeError, grader_label, main, regrade_run
from seal.report import ReportError, compare, rl_curves
from seal.tracking import write_jsonl

GOLD = "Port Vellan"
# (prediction, the run's verdict under `contains`). Under `exact` only the second is right; under `f1` >= 0.5
# the first three (token F1 0.57, 1 and 0.67). The last row's update failed.
ANSWERS = [("It is in Port Vellan.", True), ("Port Vellan", True), ("Vellan", False), ("", False)]


@pytest.fixture
def run_dir(tmp_path):
    """A run's records as seal.train writes them: its config, graded answers, and other results files."""
    run = tmp_path / "run"
    (run / "results").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"task": {"name": "knowledge", "grader": "contains"}}))
    rows = [
        {
            "condition": "passage",
            "title": "T",
            "question": "Where?",
            "gold": GOLD,
            "prediction": p,
            "correct": c,
        }
        for p, c in ANSWERS
    ]
    rows[-1]["update_error"] = "non-finite loss"
    write_jsonl(run / "results" / "passage.jsonl", rows)
    write_jsonl(run / "results" / "self_edits.jsonl", [{"title": "T", "self_edit": "Port Vellan is a port."}])
    summary = {"knowledge/passage/accuracy": 0.5, "knowledge/passage/n": 4, "knowledge/passage/ci95": 0.43}
    (run / "summary.json").write_text(json.dumps({"metrics": summary}))
    return run


def test_another_grader_gives_its_own_verdicts_and_counts_the_changes(run_dir):
    graded = regrade_run(run_dir, make_grader("exact"), "exact")
    assert list(graded["conditions"]) == ["passage"]  # self_edits.jsonl holds no answers
    passage = graded["conditions"]["passage"]
    assert (passage["n"], passage["accuracy"], passage["run_accuracy"], passage["changed"]) == (
        4,
        0.25,
        0.5,
        1,
    )
    assert graded["run_grader"] == "contains"
    assert json.loads((run_dir / "graded" / "exact.json").read_text()) == json.loads(json.dumps(graded))
    verdicts = [json.loads(line) for line in (run_dir / "graded" / "exact.jsonl").read_text().splitlines()]
    assert [v["correct"] for v in verdicts] == [False, True, False]  # the failed update's is no verdict
    assert [v["prediction"] for v in verdicts] == [p for p, _ in ANSWERS[:3]]


def test_f1_counts_partial_answers_but_a_failed_update_stays_wrong(run_dir):
    always = regrade_run(run_dir, lambda q, gold, pred: True, "always")["conditions"]["passage"]
    assert always["accuracy"] == 0.75  # the row with update_error is not asked
    f1 = regrade_run(run_dir, make_grader("f1", 0.5), grader_label("f1", 0.5))["conditions"]["passage"]
    assert f1["accuracy"] == 0.75 and (run_dir / "graded" / "f1_0.5.json").is_file()


def test_a_regrade_stopped_by_its_grader_keeps_its_verdicts_and_continues(run_dir):
    asked = []

    def flaky(question, gold, prediction):
        asked.append(prediction)
        if len(asked) == 3:
            raise OSError("connection reset by the judge")
        return gold in prediction

    with pytest.raises(RegradeError, match=r"passage.jsonl, row 3: the grader failed \(connection reset"):
        regrade_run(run_dir, flaky, "judge_x")
    assert len((run_dir / "graded" / "judge_x.jsonl").read_text().splitlines()) == 2
    assert not (run_dir / "graded" / "judge_x.json").exists()
    with (run_dir / "graded" / "judge_x.jsonl").open("a") as f:
        f.write('{"condition": "passage", "ind')  # a kill in the middle of a line
    asked.clear()
    graded = regrade_run(run_dir, lambda q, gold, pred: asked.append(pred) or gold in pred, "judge_x")
    assert asked == ["Vellan"]  # only the row not graded before; the failed update's is not asked
    uninterrupted = regrade_run(run_dir, make_grader("contains"), "contains")
    assert graded["conditions"] == uninterrupted["conditions"]
    assert graded["conditions"]["passage"]["changed"] == 0


def test_changed_answers_are_graded_again_not_read_from_the_earlier_verdicts(run_dir):
    regrade_run(run_dir, make_grader("exact"), "exact")
    path = run_dir / "results" / "passage.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["prediction"] = GOLD  # e.g. the run was resumed and its answers written again
    write_jsonl(path, rows)
    assert regrade_run(run_dir, make_grader("exact"), "exact")["conditions"]["passage"]["accuracy"] == 0.5


def test_malformed_answers_are_a_clear_error(run_dir):
    path = run_dir / "results" / "passage.jsonl"
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(RegradeError, match=r"passage.jsonl, line 5: invalid JSON"):
        regrade_run(run_dir, make_grader("exact"), "exact")
    write_jsonl(path, [{"question": "Q", "gold": "a", "prediction": "a", "correct": True}, {"question": "Q"}])
    with pytest.raises(RegradeError, match=r"passage.jsonl, row 2: expected the fields"):
        regrade_run(run_dir, make_grader("exact"), "exact")


def test_command_line_grades_every_run_below_a_folder_and_fails_clearly(
    run_dir, tmp_path, capsys, monkeypatch
):
    main([str(tmp_path), "--grader", "f1", "--f1-threshold", "0.9"])
    out = capsys.readouterr().out
    assert "as run (contains)" in out and "0.500" in out and "0.250 ±" in out and "f1_0.9" in out
    assert (
        json.loads((run_dir / "graded" / "f1_0.9.json").read_text())["conditions"]["passage"]["accuracy"]
        == 0.25
    )
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "nothing"), "--grader", "exact"])
    assert exit_.value.code == 1 and "holds no run directory" in capsys.readouterr().err
    monkeypatch.delenv("SEAL_JUDGE_URL", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), "--grader", "judge"])
    assert exit_.value.code == 1 and "SEAL_JUDGE_URL" in capsys.readouterr().err


def test_the_comparison_report_shows_the_answers_graded_again_beside_the_run_s_own(run_dir, tmp_path):
    regrade_run(run_dir, make_grader("exact"), "exact")
    regrade_run(run_dir, make_grader("contains"), "contains")
    (runs,), written = compare([run_dir], tmp_path / "report")
    assert runs.metrics["graded/exact/passage/accuracy"] == 0.25
    table = (tmp_path / "report" / "report.md").read_text()
    header = next(line for line in table.splitlines() if "knowledge/passage" in line)
    assert (
        header.index("knowledge/passage")
        < header.index("graded/contains/passage")
        < header.index("graded/exact")
    )
    assert "0.250 ±" in table and "0.500 ± 0.430" in table
    assert "graded/exact/passage/accuracy" in (tmp_path / "report" / "summary.csv").read_text()
    (run_dir / "graded" / "exact.json").write_text('{"grader": "exact", "conditions": {"passage": {}}}')
    with pytest.raises(ReportError, match="exact.json: condition 'passage' lacks its accuracy"):
        compare([run_dir], tmp_path / "report")


def answer(condition, prediction):
    return {
        "condition": condition,
        "title": "T",
        "question": "Where?",
        "gold": GOLD,
        "prediction": prediction,
    }


def test_the_rl_curve_is_graded_again_round_by_round_each_answer_once(run_dir, tmp_path, capsys, monkeypatch):
    """A ReST-EM run: round 0 is the self_edit condition, each later round's evaluation answers lie in
    rounds/round_<k>/eval_rows.json, and the last round's are also the seal condition's."""
    rows = {
        "self_edit": [("Vellan", False), ("Port Vellan", True)],
        "round_1": [("It is in Port Vellan.", True), ("Vellan", False)],
        "seal": [("Port Vellan", True), ("Port Vellan", True)],
    }
    rows = {c: [{**answer(c, p), "correct": v} for p, v in r] for c, r in rows.items()}
    write_jsonl(run_dir / "results" / "self_edit.jsonl", rows["self_edit"])
    write_jsonl(run_dir / "results" / "seal.jsonl", rows["seal"])
    for k, name in ((1, "round_1"), (2, "seal")):
        (run_dir / "rounds" / f"round_{k}").mkdir(parents=True)
        (run_dir / "rounds" / f"round_{k}" / "eval_rows.json").write_text(json.dumps(rows[name]))
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["metrics"].update({f"rl/round_{k}/eval_accuracy": a for k, a in enumerate([0.5, 0.5, 1.0])})
    (run_dir / "summary.json").write_text(json.dumps(summary))

    asked = []
    exact = make_grader("exact")
    graded = regrade_run(run_dir, lambda q, gold, pred: asked.append(pred) or exact(q, gold, pred), "exact")
    assert sorted(asked) == ["It is in Port Vellan.", "Port Vellan", "Vellan"]  # each distinct answer once
    assert {k: (s["accuracy"], s["run_accuracy"], s["changed"]) for k, s in graded["rounds"].items()} == {
        "0": (0.5, 0.5, 0),
        "1": (0.0, 0.5, 1),
        "2": (1.0, 1.0, 0),
    }
    assert graded["rounds"]["0"] == graded["conditions"]["self_edit"]
    # Paired where two conditions answered the same questions (passage's are 4 others), in the run's order.
    assert graded["paired"] == {
        "seal_vs_self_edit": {"only_first": 1, "only_second": 0, "p_value": 1.0, "p_holm": 1.0}
    }
    monkeypatch.setenv("COLUMNS", "200")  # the console tables' cells on one line each
    main([str(run_dir), "--grader", "exact"])
    out = capsys.readouterr().out
    assert "RL round 1" in out and "seal − self_edit" in out

    (runs,), written = compare([run_dir], tmp_path / "report")
    curves = rl_curves([runs])
    assert [[a for _, a, _ in points] for points in curves.values()] == [[0.5, 0.5, 1.0], [0.5, 0.0, 1.0]]
    assert list(curves) == [f"{runs.label}, as run (contains)", f"{runs.label}, graded exact"]
    assert tmp_path / "report" / "rl_curve.png" in written

    (run_dir / "rounds" / "round_1" / "eval_rows.json").write_text('[{"question": "Where?"}]')
    with pytest.raises(RegradeError, match=r"round_1/eval_rows.json, row 1: expected the fields"):
        regrade_run(run_dir, exact, "exact")
    (run_dir / "graded" / "exact.json").write_text(
        json.dumps({"grader": "exact", "conditions": {}, "rounds": {"1": {"accuracy": 0.5}}})
    )
    with pytest.raises(ReportError, match="exact.json: RL round 1 lacks its accuracy and ci95"):
        compare([run_dir], tmp_path / "report")


def test_runs_without_answers_are_skipped_and_a_broken_run_stops_no_other(run_dir, tmp_path, capsys):
    """A failed or few-shot run holds no graded answers: skipped. A run with a malformed file is an error
    named at the end, and the runs after it are graded all the same."""
    for name in ("a_failed", "b_broken"):
        (tmp_path / name / "results").mkdir(parents=True)
        (tmp_path / name / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    (tmp_path / "b_broken" / "results" / "passage.jsonl").write_text(
        json.dumps({"question": "Q", "gold": "G", "prediction": "P", "correct": True}) + "\n{cut"
    )
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), "--grader", "exact"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "1 run not graded" in err
    assert "skipped" in err and "a_failed: no graded answers" in err and "b_broken" in err
    assert (run_dir / "graded" / "exact.json").is_file()  # "run" sorts after both


def test_a_continual_run_is_graded_after_its_last_edit(tmp_path):
    """results/continual.jsonl holds every stage of the edit sequence; the run's accuracy is the last's."""
    run = tmp_path / "run"
    (run / "results").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"task": {"name": "knowledge", "grader": "contains"}}))
    rows = [
        {
            "after_edits": k,
            "question": f"Q{i}",
            "gold": GOLD,
            "prediction": GOLD if k == 2 else "",
            "correct": k == 2,
        }
        for k in range(3)
        for i in range(4)
    ]
    write_jsonl(run / "results" / "continual.jsonl", rows)
    continual = regrade_run(run, make_grader("contains"), "contains")["conditions"]["continual"]
    assert (continual["n"], continual["accuracy"], continual["run_accuracy"]) == (4, 1.0, 1.0)


def test_a_rule_based_grader_grades_afresh_and_a_judge_s_verdicts_are_read_back(run_dir):
    """A verdict left in graded/exact.jsonl (say, by an earlier version of the rule) is not read back."""
    stale = {"question": "Where?", "gold": GOLD, "prediction": "Vellan", "correct": True}
    (run_dir / "graded").mkdir()
    (run_dir / "graded" / "exact.jsonl").write_text(json.dumps(stale) + "\n")
    main([str(run_dir), "--grader", "exact"])
    assert (
        json.loads((run_dir / "graded" / "exact.json").read_text())["conditions"]["passage"]["accuracy"]
        == 0.25
    )
    # With reuse (the judge's way), the same line is read back and counts.
    (run_dir / "graded" / "exact.jsonl").write_text(json.dumps(stale) + "\n")
    assert regrade_run(run_dir, make_grader("exact"), "exact")["conditions"]["passage"]["accuracy"] == 0.5
