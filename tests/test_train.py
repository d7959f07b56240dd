"""End to end on the tiny real model: the records a run promises, determinism, failures, W&B offline."""

import hashlib
import json
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

from seal import multilora
from seal.config import LoggerConfig
from seal.grading import make_grader
from seal.regrade import regrade_run
from seal.tasks import knowledge
from seal.tracking import Tracker, code_version, read_jsonl, read_offline_run, throughput_metrics
from seal.train import input_digests, record_code, train
from tests.conftest import DEVICE, TINY_OVERRIDES, make_cfg

ROOT = Path(__file__).resolve().parent.parent
KEYS = [f"knowledge/{c}/{m}" for c in ("base", "passage", "self_edit") for m in ("accuracy", "n", "ci95")] + [
    f"{kind}/{p}" for p in ("generate", "update", "eval") for kind in ("time", "mem")
]


def _has(metrics, key):
    kind, phase = key.split("/", 1)
    if kind == "time":
        return f"time/{phase}_s" in metrics
    if kind == "mem":
        return f"mem/peak_{phase}_mb" in metrics
    return key in metrics


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    metrics = train(make_cfg(run_dir, *TINY_OVERRIDES))
    return run_dir, metrics


def test_run_writes_every_record(tiny_run):
    run_dir, metrics = tiny_run
    summary = json.loads((run_dir / "summary.json").read_text())["metrics"]
    assert summary == json.loads(json.dumps(metrics))
    for key in KEYS:
        assert _has(summary, key), key
    assert summary["mem/device"].startswith(DEVICE)
    assert summary["knowledge/base/n"] == 10  # 2 passages x 5 questions
    # the inner loops' throughput (4: each passage's passage and self_edit updates, each with its answers and
    # its adapter's reasoning probe), their time within the run's phases
    assert summary["throughput/update_tokens_per_s"] > 0
    phases = sum(v for k, v in summary.items() if k.startswith("time/") and k.endswith("_s"))
    assert 0 < 3600 * 4 / summary["throughput/self_edits_per_hour"] <= phases
    assert (run_dir / "config.yaml").read_text().count("tiny") >= 1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["knowledge/passage/accuracy"] == summary["knowledge/passage/accuracy"]
    for condition in ("base", "passage", "self_edit"):
        results = [
            json.loads(x) for x in (run_dir / "results" / f"{condition}.jsonl").read_text().splitlines()
        ]
        assert len(results) == 10 and set(results[0]) >= {"question", "gold", "prediction", "correct"}
    edits = (run_dir / "results" / "self_edits.jsonl").read_text().splitlines()
    assert len(edits) == 2


def test_the_conditions_are_compared_question_by_question(tiny_run):
    run_dir, metrics = tiny_run
    rows = {
        c: [json.loads(x)["correct"] for x in (run_dir / "results" / f"{c}.jsonl").read_text().splitlines()]
        for c in ("base", "passage", "self_edit")
    }
    for first, second in (("passage", "base"), ("self_edit", "base"), ("self_edit", "passage")):
        prefix = f"paired/{first}_vs_{second}"
        only_first = sum(a and not b for a, b in zip(rows[first], rows[second], strict=True))
        only_second = sum(b and not a for a, b in zip(rows[first], rows[second], strict=True))
        counted = (metrics[f"{prefix}/only_first"], metrics[f"{prefix}/only_second"])
        assert counted == (only_first, only_second)
        assert 0 < metrics[f"{prefix}/p_value"] <= metrics[f"{prefix}/p_holm"] <= 1
        difference = metrics[f"knowledge/{first}/accuracy"] - metrics[f"knowledge/{second}/accuracy"]
        assert difference == pytest.approx((only_first - only_second) / 10)
    assert "passage − base" in (run_dir / "report.md").read_text()


def test_a_run_s_answers_graded_again_by_its_own_grader_give_its_accuracies(tiny_run):
    """`python -m seal.regrade` on the answers a real run wrote: under the run's grader no verdict changes;
    a grader that accepts everything is asked about every answer, none left out."""
    run_dir, metrics = tiny_run
    own = regrade_run(run_dir, make_grader("contains"), "contains")
    assert own["run_grader"] == "contains" and set(own["conditions"]) == {"base", "passage", "self_edit"}
    for condition, graded in own["conditions"].items():
        assert graded["changed"] == 0
        assert (graded["accuracy"], graded["n"]) == (
            metrics[f"knowledge/{condition}/accuracy"],
            metrics[f"knowledge/{condition}/n"],
        )
    lenient = regrade_run(run_dir, lambda question, gold, prediction: True, "lenient")["conditions"]
    assert all(graded["accuracy"] == 1.0 and graded["n"] == 10 for graded in lenient.values())


def test_same_seed_repeats_exactly(tiny_run, tmp_path):
    _, first = tiny_run
    again = train(make_cfg(tmp_path, *TINY_OVERRIDES))
    deterministic = {k: v for k, v in first.items() if not k.startswith(("time/", "mem/", "throughput/"))}
    assert deterministic == {k: again[k] for k in deterministic}
    for name in ("self_edits", "self_edit", "passage"):
        a = (tiny_run[0] / "results" / f"{name}.jsonl").read_text()
        assert a == (tmp_path / "results" / f"{name}.jsonl").read_text()


def test_nan_loss_is_recorded_and_the_run_finishes(tmp_path, monkeypatch):
    real = multilora.token_losses  # the batched updater's loss (the default inner loop)
    monkeypatch.setattr(multilora, "token_losses", lambda *a, **k: real(*a, **k) * float("nan"))
    metrics = train(make_cfg(tmp_path, *TINY_OVERRIDES, "task.conditions=[passage]"))
    assert metrics["adapt/failed_updates"] == 2
    assert metrics["knowledge/passage/accuracy"] == 0.0
    rows = [json.loads(x) for x in (tmp_path / "results" / "passage.jsonl").read_text().splitlines()]
    assert all("non-finite loss" in r["update_error"] for r in rows)


@pytest.mark.parametrize(
    "override, error",
    [
        ("task.conditions=[base,magic]", "unknown task.conditions"),
        ("rl.learner=gold", r"unknown rl.learner 'gold': expected one of \['updated', 'golden'\]"),
        ("rl.reward.kind=gains", "unknown rl.reward.kind 'gains'"),
        ("rl.sft.launcher=slurm", "unknown rl.sft.launcher 'slurm'"),
    ],
)
def test_unknown_options_are_clear_errors(tmp_path, override, error):
    with pytest.raises(ValueError, match=error):
        train(make_cfg(tmp_path, *TINY_OVERRIDES, override))


def test_wandb_offline_run_holds_the_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    metrics = train(make_cfg(tmp_path, *TINY_OVERRIDES, "logger=wandb", "task.conditions=[base]"))
    [run_file] = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    stored = read_offline_run(run_file)
    summary = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    assert summary == json.loads(json.dumps(metrics))
    for key, value in summary.items():
        assert stored["summary"][key] == (pytest.approx(value) if isinstance(value, float) else value), key
        assert stored["history"][-1][key] == (pytest.approx(value) if isinstance(value, float) else value), (
            key
        )


def test_batched_and_one_at_a_time_runs_agree(tiny_run, tmp_path):
    """adapt.batch_adapters=false (PEFT, one adapter at a time) reproduces the batched default's results."""
    run_dir, batched = tiny_run
    sequential = train(make_cfg(tmp_path, *TINY_OVERRIDES, "adapt.batch_adapters=false"))
    for condition in ("passage", "self_edit"):
        assert sequential[f"knowledge/{condition}/accuracy"] == batched[f"knowledge/{condition}/accuracy"]
        loss = sequential[f"adapt/{condition}/final_loss"]
        assert loss == pytest.approx(batched[f"adapt/{condition}/final_loss"], abs=1e-3)
        a = [
            json.loads(x)["prediction"]
            for x in (run_dir / "results" / f"{condition}.jsonl").read_text().splitlines()
        ]
        b = [
            json.loads(x)["prediction"]
            for x in (tmp_path / "results" / f"{condition}.jsonl").read_text().splitlines()
        ]
        assert a == b


def test_gold_answer_scores_agree_between_batched_and_one_at_a_time_adapters(tmp_path):
    """task.score_answers: each row's score comes from its own adapter, through either updater."""
    scores = {}
    for name, path in (("batched", "true"), ("sequential", "false")):
        run_dir = tmp_path / name
        train(make_cfg(run_dir, *TINY_OVERRIDES, "task.score_answers=true", f"adapt.batch_adapters={path}"))
        scores[name] = {
            condition: [
                json.loads(x)["answer_logprob"]
                for x in (run_dir / "results" / f"{condition}.jsonl").read_text().splitlines()
            ]
            for condition in ("base", "passage", "self_edit")
        }
    for condition, batched in scores["batched"].items():
        assert scores["sequential"][condition] == pytest.approx(batched, abs=1e-4), condition
    # The updates moved the scores, each passage's by its own update.
    assert scores["batched"]["passage"] != pytest.approx(scores["batched"]["base"], abs=1e-4)
    assert scores["batched"]["self_edit"] != pytest.approx(scores["batched"]["passage"], abs=1e-4)


def test_run_measures_reasoning_and_prior_knowledge_before_and_after_and_reports_them(tmp_path, monkeypatch):
    # The tiny model knows no general knowledge; a grader that accepts every other answer gives it some.
    calls = []
    monkeypatch.setattr(
        knowledge, "make_grader", lambda *a: lambda q, g, p: calls.append(1) or len(calls) % 2 == 0
    )
    metrics = train(make_cfg(tmp_path, *TINY_OVERRIDES, "reasoning.after_update=2"))
    rows = [json.loads(x) for x in (tmp_path / "results" / "reasoning.jsonl").read_text().splitlines()]
    before, after = rows[0], rows[1:]
    assert before["model"] == "before" and len(after) == 2 and {r["model"] for r in after} == {"after_update"}
    assert metrics["reasoning/before/n"] == len(before["reasoning"]) == 6 * 2  # reasoning.per_task=2 in tests
    assert metrics["reasoning/before/accuracy"] == sum(before["reasoning"]) / 12
    flags = [ok for r in after for ok in r["reasoning"]]
    assert metrics["reasoning/after_update/accuracy"] == sum(flags) / len(flags)
    assert metrics["reasoning/after_update/n"] == 12  # two adapters answered each item: counted once
    assert metrics["reasoning/forgetting"] == pytest.approx(
        metrics["reasoning/before/accuracy"] - metrics["reasoning/after_update/accuracy"]
    )
    assert 0 < metrics["reasoning/before/chance"] < 1
    known = before["prior_known"]
    assert metrics["retention/prior_known"] == len(known) > 0 and metrics["retention/prior_asked"] == 40
    prior = [ok for r in after for ok in r["prior"]]
    assert len(prior) == 2 * len(known) and metrics["retention/prior_knowledge"] == sum(prior) / len(prior)
    report = (tmp_path / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| measure"))
    assert "| before | after update |" in header
    row = next(line for line in report.splitlines() if line.startswith("| reasoning accuracy"))
    assert f"{metrics['reasoning/before/accuracy']:.3f}" in row
    assert f"{metrics['reasoning/after_update/accuracy']:.3f}" in row
    assert f"{metrics['retention/prior_knowledge']:.3f}" in report


def test_reasoning_none_leaves_the_probe_out(tmp_path):
    metrics = train(make_cfg(tmp_path, *TINY_OVERRIDES, "reasoning=none"))
    assert not [k for k in metrics if k.startswith(("reasoning/", "retention/"))]
    assert "what the updates cost" not in (tmp_path / "report.md").read_text()


def test_reasoning_from_bigbench_files_in_a_run(tmp_path):
    task = {
        "name": "parity",
        "examples": [
            {"input": f"Is {n} even?", "target_scores": {"yes": int(n % 2 == 0), "no": int(n % 2 == 1)}}
            for n in range(7)
        ],
    }
    path = tmp_path / "parity.json"
    path.write_text(json.dumps(task))
    overrides = (
        "reasoning=bigbench",
        f"reasoning.paths=[{path}]",
        "reasoning.per_task=5",
        "task.conditions=[base]",
    )
    metrics = train(make_cfg(tmp_path / "run", *TINY_OVERRIDES, *overrides))
    assert metrics["reasoning/before/n"] == 5 and metrics["reasoning/before/chance"] == 0.5


def test_a_history_line_cut_short_by_a_kill_loses_no_later_row(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "a": 1}\n{"step": 1, "a"')
    tracker = Tracker(tmp_path, LoggerConfig(name="none"), {}, "run", resume=True)
    tracker.log({"rl/round": 1})
    assert tracker.rows() == [
        {"step": 0, "a": 1},
        {"step": 1, "time": tracker.rows()[1]["time"], "rl/round": 1},
    ]
    assert tracker.has_row("rl/round", 1)


def test_a_resumed_run_holds_a_summary_only_once_it_finishes_again(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, *TINY_OVERRIDES, "task.conditions=[base]", "reasoning=none")
    train(cfg)
    assert (tmp_path / "summary.json").is_file()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(knowledge, "answer", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)  # started again in the same folder, and stopped before it finished
    assert not (tmp_path / "summary.json").exists()


def test_a_run_records_which_code_ran_each_start(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    [start] = read_jsonl(run_dir / "code.jsonl")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert start["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert start["seal"] == metadata.version("seal")
    path = tmp_path / "code.jsonl"
    path.write_text('{"started": "earlier"}\n')
    record_code(path, resume=True)  # a resumed run keeps the lines of the starts before it
    assert [row["started"] for row in read_jsonl(path)][0] == "earlier" and len(read_jsonl(path)) == 2
    record_code(path, resume=False)  # a run started afresh in the folder is a new run
    assert len(read_jsonl(path)) == 1 and read_jsonl(path)[0]["started"] != "earlier"


def test_throughput_is_of_the_inner_loops_computed_and_absent_when_none_was():
    assert throughput_metrics(tokens=500, loops=3, update_s=2.0, loops_s=6.0) == {
        "throughput/update_tokens_per_s": 250.0,
        "throughput/self_edits_per_hour": 1800.0,
    }
    assert throughput_metrics(tokens=0, loops=0, update_s=0.0, loops_s=0.0) == {}  # all read back


def _git(repo, *args):
    identity = ["-c", "user.name=seal", "-c", "user.email=seal@example.org", "-c", "commit.gpgsign=false"]
    command = ["git", "-C", str(repo), *identity, *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_code_version_names_the_checkout_s_commit_and_changes_and_nothing_outside_one(tmp_path, monkeypatch):
    repo = tmp_path / "seal"
    (repo / "sub").mkdir(parents=True)
    _git(repo, "init", "-q")
    assert code_version(repo)["commit"] is None  # a work tree without a commit
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "a.py")
    _git(repo, "commit", "-q", "-m", "first")
    assert code_version(repo) | {"seal": None} == {
        "seal": None,
        "commit": _git(repo, "rev-parse", "HEAD"),
        "dirty": False,
    }
    (repo / "new.py").write_text("")  # untracked: not a change to the code that ran
    assert code_version(repo)["dirty"] is False
    (repo / "a.py").write_text("x = 2\n")
    assert code_version(repo)["dirty"] is True
    # a folder inside some other checkout (a wheel installed in a venv there) is not that checkout's code
    assert code_version(repo / "sub")["commit"] is None
    # git's variables of the calling environment (a git hook's GIT_DIR) do not point it at another checkout
    monkeypatch.setenv("GIT_DIR", str(ROOT / ".git"))
    assert code_version(repo)["commit"] == _git(repo, "--git-dir", str(repo / ".git"), "rev-parse", "HEAD")
    outside = tmp_path / "plain"
    outside.mkdir()
    assert (code_version(outside)["commit"], code_version(outside)["dirty"]) == (None, None)


@pytest.mark.parametrize(
    "override",
    ["rl.reward.kind=gain", "rl.reward.forgetting_penalty=1", "rl.reward.max_reasoning_drop=0.1"]
    + ["rl.accept_margin=0.1", "rl.repeats=3"],
)
def test_knowledge_only_reward_settings_are_refused_for_few_shot_not_ignored(tmp_path, override):
    with pytest.raises(
        ValueError, match=f"{override.split('=')[0]}=.* serves the inner loops of task=knowledge"
    ):
        train(make_cfg(tmp_path, *TINY_OVERRIDES, "task=few_shot", override))


def test_input_files_are_fingerprinted_and_text_is_not_taken_for_a_path(tmp_path):
    data = tmp_path / "passages.json"
    data.write_text("[]")
    config = {
        "data": {"path": str(data), "n_eval": 5},
        "reasoning": {"paths": [str(data), str(tmp_path / "gone.json")]},
        "self_edit": {"prompt": "x" * 300, "template": "Write about {title}\nnow."},
        "paths": {"output_dir": str(data)},  # where a run writes: not an input
    }
    digests = input_digests(config)
    assert sorted(digests) == ["data.path", "reasoning.paths[0]"]
    assert digests["data.path"] == hashlib.sha256(b"[]").hexdigest()
