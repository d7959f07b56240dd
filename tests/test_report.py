"""The run comparison (`python -m seal.report`) on fake run directories with known numbers."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from matplotlib.image import imread

from seal import plots, report
from seal.tracking import write_jsonl

PROMPTS = {
    "implications": "Write the implications of: {passage}",
    "rewrite": "Rewrite: {passage}",
    "self_qa": "Questions and answers on: {passage}",
}


def write_run(
    run_dir: Path,
    task: dict[str, Any],
    template: str,
    seed: int,
    metrics: dict[str, Any] | None,
    wandb_id: str | None,
) -> Path:
    """A run directory as seal.train leaves it; `metrics=None` leaves no summary.json (a failed job)."""
    run_dir.mkdir(parents=True)
    config = {
        "task": task,
        "self_edit": {"name": template, "prompt": PROMPTS[template]},
        "logger": {"name": "wandb", "project": "seal", "entity": None},
        "paths": {"output_dir": str(run_dir)},
        "seed": seed,
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 0, **(metrics or {})}) + "\n")
    if metrics is not None:
        (run_dir / "summary.json").write_text(json.dumps({"metrics": metrics}))
    if wandb_id:
        (run_dir / "wandb_run_id").write_text(wandb_id + "\n")
    return run_dir


KNOWLEDGE = {"name": "knowledge", "mode": "single", "conditions": ["base", "passage", "self_edit"]}
COST = {"time/load_s": 1.5, "time/update_s": 20.0, "mem/peak_load_mb": 400.0, "mem/peak_update_mb": 2100.0}


def knowledge_metrics(passage: float, self_edit: float, rl: bool = False) -> dict[str, Any]:
    metrics = {
        "knowledge/base/accuracy": 0.1,
        "knowledge/base/ci95": 0.13,
        "knowledge/base/n": 20,
        "knowledge/passage/accuracy": passage,
        "knowledge/passage/ci95": 0.2,
        "knowledge/passage/n": 20,
        "knowledge/self_edit/accuracy": self_edit,
        "knowledge/self_edit/ci95": 0.21,
        "knowledge/self_edit/n": 20,
        **COST,
        "mem/device": "cpu (peak process RSS)",
    }
    if rl:
        metrics |= {
            "rl/round_0/eval_accuracy": self_edit,
            "rl/round_0/eval_ci95": 0.21,
            "rl/round_1/eval_accuracy": 0.45,
            "rl/round_1/eval_ci95": 0.22,
        }
    return metrics


FEW_SHOT = {
    "few_shot/icl/success": 0.0,
    "few_shot/icl/ci95": 0.49,
    "few_shot/icl/n": 4,
    "few_shot/ttt_fixed/success": 0.5,
    "few_shot/ttt_fixed/ci95": 0.4,
    "few_shot/ttt_fixed/n": 4,
    "few_shot/self_edit/success": 0.25,
    "few_shot/self_edit/ci95": 0.35,
    "few_shot/self_edit/n": 4,
    "reasoning/before/accuracy": 0.6,
    "reasoning/before/ci95": 0.1,
    "reasoning/after_update/accuracy": 0.55,
    "reasoning/after_update/ci95": 0.1,
    "retention/prior_knowledge": 0.9,
    "retention/prior_knowledge_ci95": 0.05,
    **COST,
}
KN = "task.name=knowledge self_edit.name="


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    """A knowledge sweep (2 templates × 2 seeds, and a third rewrite seed whose job failed) and a few-shot
    run beside it."""
    sweep = tmp_path / "runs" / "sweep"
    write_run(sweep / "0", KNOWLEDGE, "implications", 0, knowledge_metrics(0.30, 0.40, rl=True), "id-0")
    write_run(sweep / "1", KNOWLEDGE, "implications", 1, knowledge_metrics(0.35, 0.50), "id-1")
    write_run(sweep / "2", KNOWLEDGE, "rewrite", 0, knowledge_metrics(0.30, 0.60), "id-2")
    write_run(sweep / "3", KNOWLEDGE, "rewrite", 1, knowledge_metrics(0.35, 0.70), "id-3")
    write_run(sweep / "4", KNOWLEDGE, "rewrite", 2, None, None)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    jobs = [
        {"num": 0, "run_dir": str(sweep / "0"), "status": "COMPLETED"},
        {"num": 4, "run_dir": str(sweep / "4"), "status": "FAILED", "error": "ValueError: no passages"},
    ]
    (sweep / "jobs.jsonl").write_text("".join(json.dumps(job) + "\n" for job in jobs))
    few_shot = {"name": "few_shot", "conditions": ["icl", "ttt_fixed", "self_edit"]}
    write_run(tmp_path / "runs" / "arc", few_shot, "implications", 0, FEW_SHOT, "id-arc")
    return tmp_path / "runs"


def md_tables(text: str) -> list[list[dict[str, str]]]:
    """Each Markdown table of `text` as a list of rows, each a dict from header to cell."""
    tables, header = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if header is None:
            header = cells
            tables.append([])
        elif not line.startswith("|---"):
            tables[-1].append(dict(zip(header, cells, strict=True)))
    return tables


def by_first_column(table: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {next(iter(row.values())): row for row in table}


def test_compare_writes_tables_with_every_run_the_seed_means_and_the_paper(runs_dir, tmp_path, capsys):
    out = tmp_path / "out"
    report.main([str(runs_dir), "--out", str(out)])
    printed = capsys.readouterr().out

    text = (out / "report.md").read_text()
    runs_table, seeds_table = md_tables(text)
    runs = by_first_column(runs_table)
    assert len(runs) == 6 + 2  # every run, then the paper's single-passage and ARC rows
    assert "self_edit.prompt" not in text and "output_dir" not in text  # decided by the template; a path

    row = runs[f"{KN}rewrite seed=1"]
    assert row["knowledge/self_edit"] == "0.700 ± 0.210"
    assert row["knowledge/passage"] == "0.350 ± 0.200"
    assert row["peak memory (MB)"] == "2100" and row["time (s)"] == "21.5" and row["status"] == "ok"
    assert runs[f"{KN}implications seed=0"]["knowledge/self_edit"] == "0.400 ± 0.210"
    assert runs[f"{KN}implications seed=1"]["knowledge/self_edit"] == "0.500 ± 0.210"
    assert runs[f"{KN}rewrite seed=0"]["knowledge/self_edit"] == "0.600 ± 0.210"
    failed = runs[f"{KN}rewrite seed=2"]
    assert failed["status"] == "failed: ValueError: no passages"
    assert failed["knowledge/self_edit"] == "–" and failed["time (s)"] == "–"
    arc = runs["task.name=few_shot self_edit.name=implications seed=0"]
    assert arc["few_shot/ttt_fixed"] == "0.500 ± 0.400" and arc["knowledge/base"] == "–"
    assert arc["reasoning/after_update"] == "0.550 ± 0.100"
    assert arc["retention/prior_knowledge"] == "0.900 ± 0.050"

    paper = runs["paper: single passage, Qwen2.5-7B"]
    assert (paper["knowledge/base"], paper["knowledge/passage"], paper["knowledge/self_edit"]) == (
        "0.327",
        "0.335",
        "0.397",
    )
    arc_paper = runs["paper: ARC, Llama-3.2-1B-Instruct"]
    assert (arc_paper["few_shot/icl"], arc_paper["few_shot/self_edit"], arc_paper["few_shot/ttt_fixed"]) == (
        "0.000",
        "0.200",
        "1.000",
    )
    assert "paper: CPT" not in text  # no run has task.mode=cpt
    assert "answer_logprob" not in text  # no run scored its gold answers
    assert "not the paper's oracle TTT" in text

    # Seeds pooled: the mean ± t(0.975, 1 dof) * stdev / sqrt(2) = 12.706 * 0.0707107 / 1.4142136 = 0.635.
    seeds = by_first_column(seeds_table)
    implications = seeds[f"{KN}implications"]
    assert implications["seeds"] == "2: 0, 1"
    assert implications["knowledge/self_edit"] == "0.450 ± 0.635"
    assert implications["knowledge/passage"] == "0.325 ± 0.318"  # 12.706 * 0.0353553 / 1.4142136
    assert implications["knowledge/base"] == "0.100 ± 0.000"
    rewrite = seeds[f"{KN}rewrite"]
    assert rewrite["seeds"] == "2: 0, 1 (1 failed)" and rewrite["knowledge/self_edit"] == "0.650 ± 0.635"
    assert seeds["task.name=few_shot self_edit.name=implications"]["few_shot/self_edit"] == "0.250 ± 0.350"

    with (out / "summary.csv").open() as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    assert len(rows) == 6
    assert float(rows[f"{KN}rewrite seed=1"]["knowledge/self_edit/accuracy"]) == 0.7
    assert rows[f"{KN}rewrite seed=2"]["status"] == "failed: ValueError: no passages"
    assert "mem/device" not in rows[f"{KN}rewrite seed=1"]  # not a number

    for name in ("accuracy_by_template", "success_by_template", "rl_curve", "retention", "cost"):
        image = imread(out / f"{name}.png")
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0, name
        assert f"wrote {out / name}.png" in printed


def test_bars_are_grouped_by_template_and_name_the_winner(runs_dir):
    runs = report.load_runs([runs_dir])
    bars, xlabel = report.condition_bars(runs, "knowledge")
    assert xlabel == "self_edit.name" and list(bars) == ["implications", "rewrite"]
    assert bars["rewrite"]["self_edit"] == pytest.approx((0.65, 12.706 * 0.05))
    note, best = plots.best_note(bars)
    assert note == "best self_edit: rewrite 0.65, +0.20 over implications" and best == (
        "rewrite",
        "self_edit",
    )
    [arc] = report.condition_bars(runs, "few_shot")[0].values()
    assert plots.best_note({"one": arc})[0] == "best condition: ttt_fixed 0.50, +0.25 over self_edit"
    assert report.rl_curves(runs) == {f"{KN}implications seed=0": [(0, 0.4, 0.21), (1, 0.45, 0.22)]}


def test_continual_runs_get_their_retention_matrices_and_no_empty_figures(tmp_path):
    run_dir = write_run(
        tmp_path / "continual", KNOWLEDGE | {"mode": "continual"}, "implications", 0, COST, None
    )
    (run_dir / "results").mkdir()
    matrix = [[0.0, 0.0], [0.8, 0.0], [0.4, 0.6]]
    (run_dir / "results" / "retention.json").write_text(
        json.dumps({"condition": "self_edit", "accuracy": matrix})
    )
    out = tmp_path / "out"
    runs, written = report.compare([run_dir], out)

    assert [run.label for run in runs] == ["continual"]  # nothing varies: the directory's name
    assert {path.name for path in written} == {"report.md", "summary.csv", "retention.png", "cost.png"}
    assert imread(out / "retention.png").shape[0] > 100
    assert "paper:" not in (out / "report.md").read_text()  # the paper gives no continual numbers here


def test_sweep_jobs_are_found_and_failed_ones_say_why(tmp_path):
    sweep = tmp_path / "sweep"
    done = write_run(sweep / "0", KNOWLEDGE, "implications", 0, knowledge_metrics(0.3, 0.4), "id-0")
    (done / "wandb" / "run-1" / "files").mkdir(parents=True)  # W&B's own config.yaml: not a run
    (done / "wandb" / "run-1" / "files" / "config.yaml").write_text("seed: {value: 0}\n")
    killed = write_run(sweep / "1", KNOWLEDGE, "implications", 1, None, None)
    (sweep / "2" / ".hydra").mkdir(parents=True)  # failed before seal.train wrote config.yaml
    (sweep / "2" / ".hydra" / "config.yaml").write_text("seed: 2\ntask: {name: knowledge}\n")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (sweep / "jobs.jsonl").write_text(
        json.dumps({"num": 2, "status": "FAILED", "error": "KeyError: rl"}) + "\n"
    )

    runs = report.load_runs([tmp_path])
    assert [run.path for run in runs] == [done, killed, sweep / "2"]
    assert [run.status for run in runs] == [
        "ok",
        "failed: no summary.json (the job failed, was killed or is still running)",
        "failed: KeyError: rl",
    ]
    # This Hydra copy holds two keys, so the others vary too; self_edit.prompt follows from self_edit.name.
    assert runs[2].label == "task.mode=None task.conditions=None self_edit.name=None seed=2"
    assert report.seed_table(runs) is None  # no configuration has two finished seeds


def test_malformed_summary_is_an_error_naming_the_file(runs_dir, tmp_path, capsys):
    broken = runs_dir / "sweep" / "1" / "summary.json"
    broken.write_text('{"metrics": {"knowledge/base/accuracy": 0.1,')
    with pytest.raises(SystemExit) as stop:
        report.main([str(runs_dir), "--out", str(tmp_path / "out")])
    assert stop.value.code == 1
    assert f"{broken}: malformed JSON" in capsys.readouterr().err
    broken.unlink()
    ledger = runs_dir / "sweep" / "jobs.jsonl"
    ledger.write_text('{"num": 0, "status": "COMPLETED"}\n\n{"num": 1, "stat\n')  # e.g. a disk that filled up
    with pytest.raises(SystemExit) as stop:
        report.main([str(runs_dir), "--out", str(tmp_path / "out")])
    assert stop.value.code == 1 and f"{ledger}, line 3: invalid JSON" in capsys.readouterr().err


def test_scored_runs_get_a_gold_answer_log_probability_column_per_condition(tmp_path):
    for seed, logprob in ((0, -4.0), (1, -3.0)):
        scored = {
            "knowledge/passage/answer_logprob": logprob - 1,
            "knowledge/self_edit/answer_logprob": logprob,
        }
        write_run(
            tmp_path / str(seed), KNOWLEDGE, "implications", seed, knowledge_metrics(0.3, 0.4) | scored, None
        )
    text = report.comparison_markdown(report.load_runs([tmp_path]))
    assert "An answer_logprob cell is the gold answers' mean log-probability per token" in text
    runs_table, seeds_table = md_tables(text)
    row = by_first_column(runs_table)["seed=1"]
    assert (row["answer_logprob/passage"], row["answer_logprob/self_edit"]) == ("-4.000", "-3.000")
    assert "answer_logprob/base" not in row  # no run scored the base model
    # Two seeds: the mean ± 12.706 * stdev / sqrt(2) = 12.706 * 0.7071068 / 1.4142136 = 6.353.
    assert by_first_column(seeds_table)["all runs"]["answer_logprob/self_edit"] == "-3.500 ± 6.353"


def test_wandb_report_shows_exactly_these_runs(runs_dir):
    pytest.importorskip("wandb_workspaces.reports.v2")
    from wandb_workspaces import expr

    summary = runs_dir / "sweep" / "0" / "summary.json"
    metrics = json.loads(summary.read_text())["metrics"]
    paired = {"paired/self_edit_vs_passage/p_value": 0.02, "paired/self_edit_vs_passage/p_holm": 0.06}
    scored = {"knowledge/self_edit/answer_logprob": -4.2, "rl/round_1/eval_answer_logprob": -4.1}
    summary.write_text(json.dumps({"metrics": metrics | paired | scored}))
    runs = report.load_runs([runs_dir])
    built = report.wandb_report(runs, "seal", "someone")
    markdown, grid = built.blocks
    assert (built.project, built.entity) == ("seal", "someone")
    assert "0.450 ± 0.635" in markdown.text
    [runset] = grid.runsets
    selected = expr.expr_to_filters(runset.filters)
    assert (selected.op, selected.key.name) == ("IN", "name")  # W&B's name for a run's id
    assert set(selected.value) == {"id-0", "id-1", "id-2", "id-3", "id-arc"}
    titles = {panel.title: panel for panel in grid.panels}
    assert "knowledge/self_edit/accuracy" in titles["knowledge: accuracy by condition"].metrics
    assert "few_shot/ttt_fixed/success" in titles["few-shot: success by condition"].metrics
    assert titles["RL: eval accuracy per round"].y == ["rl/eval_accuracy"]
    assert titles["RL: gold answer log-prob per token per round"].y == ["rl/eval_answer_logprob"]
    assert titles["knowledge: gold answer log-prob per token by condition"].metrics == [
        "knowledge/self_edit/answer_logprob"
    ]
    assert titles["time per phase (s)"].metrics == ["time/load_s", "time/update_s"]
    assert titles["conditions compared question by question: p, Holm"].metrics == [
        "paired/self_edit_vs_passage/p_holm"
    ]
    assert titles["reasoning and prior knowledge"].metrics == [
        "reasoning/before/accuracy",
        "reasoning/after_update/accuracy",
        "retention/prior_knowledge",
    ]


def test_the_best_run_of_each_condition_is_compared_with_each_other_question_by_question(tmp_path, capsys):
    """Three templates answer the same 20 questions; they agree on every base answer: no table for base."""
    verdicts = {
        "implications": [True] * 3 + [False] * 17,
        "rewrite": [True] * 12 + [False] * 8,
        "self_qa": [False] * 2 + [True] * 9 + [False] * 9,
    }
    for number, (template, flags) in enumerate(verdicts.items()):
        run = write_run(tmp_path / "runs" / str(number), KNOWLEDGE, template, 0, None, None)
        metrics = knowledge_metrics(0.5, sum(flags) / 20)
        (run / "summary.json").write_text(json.dumps({"metrics": metrics}))
        for condition, right in (("base", [False] * 20), ("self_edit", flags)):
            rows = [{"question": f"Q{i}", "correct": c} for i, c in enumerate(right)]
            write_jsonl(run / "results" / f"{condition}.jsonl", rows)

    runs = report.load_runs([tmp_path / "runs"])
    (table,) = report.best_run_tables(runs)
    title, _, rows = table
    assert title == "knowledge/self_edit: the best run, self_edit.name=rewrite, against each other"
    # rewrite is right on Q0-Q11, implications on Q0-Q2 (9 to 0: p = 2 / 2**9), self_qa on Q2-Q10 (3 to 0:
    # p = 2 / 2**3); Holm doubles the smaller of the two
    assert rows == [
        ["self_edit.name=implications", "+0.450", "9", "0", "0.004", "0.008"],
        ["self_edit.name=self_qa", "+0.150", "3", "0", "0.250", "0.250"],
    ]
    report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| self_edit.name=self_qa | +0.150 | 3 | 0 | 0.250 | 0.250 |" in markdown
    assert "the best run" in capsys.readouterr().out

    (tmp_path / "runs" / "2" / "results" / "self_edit.jsonl").write_text('{"question": "Q0"}\n')
    with pytest.raises(report.ReportError, match=r"2/results/self_edit.jsonl: expected graded answers"):
        report.best_run_tables(report.load_runs([tmp_path / "runs"]))


def test_few_shot_runs_are_compared_task_by_task(tmp_path):
    """Two few-shot runs on the same 4 ARC tasks (their records share results/few_shot.jsonl); in-context
    learning solves none in either, so only self_edit gets a table."""
    task = {"name": "few_shot", "conditions": ["icl", "self_edit"]}
    for number, solved in enumerate(([True, True, False, False], [False] * 4)):
        run = write_run(tmp_path / "runs" / str(number), task, list(PROMPTS)[number], 0, None, None)
        metrics = {f"few_shot/{c}/{k}": 0.0 for c in ("icl", "self_edit") for k in ("success", "ci95")}
        metrics["few_shot/self_edit/success"] = sum(solved) / 4
        (run / "summary.json").write_text(json.dumps({"metrics": metrics}))
        records = [{"condition": "icl", "task": f"t{i}", "success": False} for i in range(4)]
        records += [{"condition": "self_edit", "task": f"t{i}", "success": s} for i, s in enumerate(solved)]
        write_jsonl(run / "results" / "few_shot.jsonl", records)
    (table,) = report.best_run_tables(report.load_runs([tmp_path / "runs"]))
    title, _, rows = table
    assert title == "few_shot/self_edit: the best run, self_edit.name=implications, against each other"
    assert rows == [["self_edit.name=rewrite", "+0.500", "2", "0", "0.500", "0.500"]]  # 2 to 0: p = 2 / 2**2


def test_a_run_s_paired_table_adjusts_its_p_values_for_the_pairs_it_holds():
    """Holm's adjustment comes from the p-values themselves, so runs recorded before `p_holm` get it too."""
    metrics = knowledge_metrics(0.5, 0.2)
    for pair, (only_first, only_second, p) in {
        "passage_vs_base": (9, 1, 22 / 1024),
        "self_edit_vs_base": (3, 1, 0.625),
        "self_edit_vs_passage": (1, 7, 0.0703125),
    }.items():
        metrics |= {f"paired/{pair}/only_first": only_first, f"paired/{pair}/only_second": only_second}
        metrics[f"paired/{pair}/p_value"] = p
    title, header, rows = report.paired_table(metrics)
    assert header[-2:] == ["p (exact McNemar)", "p, Holm"]
    assert [(row[0], row[-1]) for row in rows] == [
        ("passage − base", f"{3 * 22 / 1024:.3f}"),
        ("self_edit − base", "0.625"),
        ("self_edit − passage", f"{2 * 0.0703125:.3f}"),
    ]


def test_configurations_are_pooled_only_with_their_own_seeds(tmp_path):
    """Two data files whose paths share their first 24 characters are two configurations, not one; and a
    seed run twice counts once."""
    accuracies = {("A", 0): 0.1, ("A", 1): 0.2, ("B", 0): 0.8, ("B", 1): 0.9}
    for number, ((subset, seed), accuracy) in enumerate(accuracies.items()):
        run = write_run(tmp_path / "runs" / str(number), KNOWLEDGE, "implications", seed, None, None)
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["data"] = {"path": f"/data/squad/squad_eval_subset_{subset}.json"}
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        (run / "summary.json").write_text(json.dumps({"metrics": knowledge_metrics(0.5, accuracy)}))
    again = write_run(tmp_path / "runs" / "4", KNOWLEDGE, "implications", 1, None, None)  # B, seed 1 again
    (again / "config.yaml").write_text((tmp_path / "runs" / "3" / "config.yaml").read_text())
    (again / "summary.json").write_text(json.dumps({"metrics": knowledge_metrics(0.5, 0.9)}))

    runs = report.load_runs([tmp_path / "runs"])
    title, header, rows = report.seed_table(runs)
    by_name = {row[0]: row for row in rows if not row[0].startswith("paper")}
    assert set(by_name) == {f"data.path=/data/squad/squad_eval_subset_{s}.json" for s in "AB"}
    column = header.index("knowledge/self_edit")
    a, b = (by_name[f"data.path=/data/squad/squad_eval_subset_{s}.json"] for s in "AB")
    assert a[1] == "2: 0, 1" and a[column].startswith("0.150 ± ")
    assert b[1] == "2: 0, 1 (1 repeated seed left out)" and b[column].startswith("0.850 ± ")


def test_configurations_whose_values_differ_only_past_their_shortened_form_get_a_bar_each(tmp_path):
    """Two data files whose paths share their first 24 characters: a bar each, named by its group (the path
    in full), where their shortened paths would name both bars alike and one would replace the other."""
    for number, (subset, accuracy) in enumerate([("A", 0.2), ("B", 0.8)]):
        run = write_run(tmp_path / "runs" / str(number), KNOWLEDGE, "implications", 0, None, None)
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["data"] = {"path": f"/data/squad/squad_eval_subset_{subset}.json"}
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        (run / "summary.json").write_text(json.dumps({"metrics": knowledge_metrics(0.5, accuracy)}))

    bars, xlabel = report.condition_bars(report.load_runs([tmp_path / "runs"]), "knowledge")
    names = [f"data.path=/data/squad/squad_eval_subset_{s}.json" for s in "AB"]
    assert xlabel == "data.path" and list(bars) == names
    assert [bars[name]["self_edit"] for name in names] == [(0.2, 0.21), (0.8, 0.21)]


def test_runs_asked_other_questions_get_their_own_best_run_table(tmp_path):
    """Runs on two question sets under one folder: the best is picked within each set, by accuracy."""
    sets = {  # label -> (questions, right)
        "embedded_a": (25, [True] * 22 + [False] * 3),
        "embedded_b": (25, [True] * 5 + [False] * 20),
        "squad_a": (88, [True] * 30 + [False] * 58),
        "squad_b": (88, [True] * 10 + [False] * 78),
    }
    for number, (name, (n, right)) in enumerate(sets.items()):
        run = write_run(tmp_path / "runs" / name, KNOWLEDGE, "implications", number, None, None)
        (run / "summary.json").write_text(json.dumps({"metrics": knowledge_metrics(0.5, sum(right) / n)}))
        prefix = name.split("_")[0]
        rows = [{"question": f"{prefix} Q{i}", "correct": c} for i, c in enumerate(right)]
        write_jsonl(run / "results" / "self_edit.jsonl", rows)
    tables = report.best_run_tables(report.load_runs([tmp_path / "runs"]))
    titles = {title: rows for title, _, rows in tables}
    assert set(titles) == {
        "knowledge/self_edit (25 questions): the best run, seed=0, against each other",
        "knowledge/self_edit (88 questions): the best run, seed=2, against each other",
    }
    assert titles["knowledge/self_edit (25 questions): the best run, seed=0, against each other"][0][:4] == [
        "seed=1",
        "+0.680",
        "17",
        "0",
    ]
