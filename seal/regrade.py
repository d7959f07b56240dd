"""`python -m seal.regrade PATH... --grader NAME`: a finished run's answers graded again, nothing retrained.

A run grades each answer as it goes, with `task.grader` (`contains` by default: it needs no network). The
paper graded with GPT-4.1. With a judge at hand (`--grader judge`, the endpoint named by SEAL_JUDGE_URL and
SEAL_JUDGE_MODEL), or to see how much the grader moves a result (`first_sentence`, `exact`, `f1`), the
answers kept in `results/<condition>.jsonl`, and those of each ReST-EM round's evaluation
(`rounds/round_<k>/eval_rows.json`), are graded again here. Each run gets two files in `graded/`:
- `<grader>.jsonl`: one verdict per distinct answer (question, gold answer, prediction), appended as soon
  as it is made. A regrade that stops (a judge that fails, Ctrl-C) keeps its verdicts, and the same command
  continues from them.
- `<grader>.json`: per condition, and per RL round (the curve; round 0 is the self_edit condition), the
  accuracy, n and 95 % Wilson interval under the new grader, the run's own accuracy, and how many verdicts
  differ from the run's; and each pair of conditions compared on the same questions (exact McNemar test).

An answer whose update failed (`update_error`) stays wrong, as in the run. The rewards of ReST-EM rounds were
computed during training and are not graded again: the self-edits each round kept stay those the run's grader
chose.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from seal.grading import accuracy_summary, make_grader, paired_comparisons
from seal.report import (
    PAIRED_HEADER,
    ReportError,
    Rows,
    find_run_dirs,
    paired_row,
    print_tables,
    read_config,
)
from seal.tracking import JSONLError, read_jsonl, write_json_atomic

# The fields of a graded answer in results/<condition>.jsonl (seal.tasks.knowledge.graded_rows).
ANSWER_KEYS = ("question", "gold", "prediction", "correct")
# The knowledge conditions in the order a run records them: each is compared with those before it.
CONDITION_ORDER = ("base", "passage", "self_edit", "external", "seal", "continual")


class RegradeError(Exception):
    """Answers that cannot be graded again, or a grader that failed; the message names the file."""


class NoAnswers(RegradeError):
    """A run without graded answers (it failed, or is a few-shot run): skipped."""


def grader_label(name: str, f1_threshold: float = 0.5) -> str:
    """The grader as its files are named: `f1`'s threshold and `judge`'s model are part of a verdict."""
    if name == "f1":
        return f"f1_{f1_threshold:g}"
    if name == "judge":
        return "judge_" + re.sub(r"[^A-Za-z0-9._-]+", "_", os.environ.get("SEAL_JUDGE_MODEL", ""))
    return name


def read_rows(path: Path) -> list[dict[str, Any]]:
    try:
        return read_jsonl(path)
    except JSONLError as e:
        raise RegradeError(str(e)) from e


def checked(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`rows` read from `path`, each holding the fields of a graded answer."""
    missing = [i for i, row in enumerate(rows, 1) if not all(key in row for key in ANSWER_KEYS)]
    if missing:
        raise RegradeError(f"{path}, row {missing[0]}: expected the fields {', '.join(ANSWER_KEYS)}")
    return rows


def answer_files(run_dir: Path) -> dict[str, tuple[Path, list[dict[str, Any]]]]:
    """The run's graded answers by condition: each results/<condition>.jsonl whose rows hold a question, its
    gold answer, the prediction and the run's verdict (self-edits, probe results and ARC attempts do not)."""
    found = {}
    for path in sorted((run_dir / "results").glob("*.jsonl")):
        rows = read_rows(path)
        if rows and all(key in rows[0] for key in ANSWER_KEYS):
            if all("after_edits" in row for row in rows):  # task.mode=continual: the run's accuracy is
                last = max(row["after_edits"] for row in rows)  # that after its last edit
                rows = [row for row in rows if row["after_edits"] == last]
            found[path.stem] = (path, checked(path, rows))
    return found


def round_files(run_dir: Path) -> dict[int, tuple[Path, list[dict[str, Any]]]]:
    """The answers of each finished ReST-EM round's evaluation (rounds/round_<k>/eval_rows.json), by round."""
    found = {}
    for path in (run_dir / "rounds").glob("round_*/eval_rows.json"):
        if not path.parent.name[len("round_") :].isdigit():
            continue
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RegradeError(f"{path}: invalid JSON ({e.msg})") from e
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise RegradeError(f"{path}: expected a list of JSON objects")
        found[int(path.parent.name[len("round_") :])] = (path, checked(path, rows))
    return dict(sorted(found.items()))


def answer_key(row: dict[str, Any]) -> tuple[str, str, str]:
    """What a verdict depends on: the same answer to the same question is graded once per run."""
    return row["question"], row["gold"], row["prediction"]


def cached_verdicts(path: Path) -> dict[tuple[str, str, str], bool]:
    """Verdicts written by an earlier regrade of the run, by answer. A last line cut short by a kill is
    dropped from the file, so that the next verdict starts a line of its own."""
    if not path.is_file():
        return {}
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        path.write_text(text)
    return {answer_key(row): bool(row["correct"]) for row in checked(path, read_rows(path))}


def regrade_run(
    run_dir: Path, grade: Callable[[str, str, str], bool], label: str, reuse: bool = True
) -> dict[str, Any]:
    """Grade every answer of the run at `run_dir` again, those of its ReST-EM rounds' evaluations included,
    and write graded/<label>.{jsonl,json}; returns the latter's content. With `reuse`, the verdicts an
    earlier regrade wrote to graded/<label>.jsonl are read back instead of asked again (a judge's); without,
    every answer is graded afresh (a rule's verdicts cost nothing, and a changed rule's are not reused)."""
    files = answer_files(run_dir)
    if not files:
        raise NoAnswers(f"{run_dir}: no graded answers in results/ (only the knowledge task's are graded)")
    rounds = round_files(run_dir)
    cache_path = run_dir / "graded" / f"{label}.jsonl"
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    if not reuse:
        cache_path.unlink(missing_ok=True)
    cached = cached_verdicts(cache_path)

    def verdicts(name: str, path: Path, rows: list[dict[str, Any]], cache: TextIO) -> list[bool]:
        found = []
        for index, row in enumerate(rows):
            if "update_error" in row:  # nothing was learnt: wrong as in the run, and no grader's verdict
                found.append(False)
                continue
            question, gold, prediction = key = answer_key(row)
            if key not in cached:
                try:
                    cached[key] = bool(grade(*key))
                except (OSError, ValueError, KeyError) as e:
                    raise RegradeError(
                        f"{path}, row {index + 1}: the grader failed ({e}); the verdicts so far are kept in "
                        f"{cache_path}, and the same command continues"
                    ) from e
                verdict = {
                    "condition": name,
                    "index": index,
                    "question": question,
                    "gold": gold,
                    "prediction": prediction,
                    "correct": cached[key],
                }
                cache.write(json.dumps(verdict, ensure_ascii=False) + "\n")
                cache.flush()
            found.append(cached[key])
        return found

    def summary(new: list[bool], rows: list[dict[str, Any]]) -> dict[str, Any]:
        as_run = [bool(row["correct"]) for row in rows]
        return {
            **accuracy_summary(new),
            "run_accuracy": accuracy_summary(as_run)["accuracy"],
            "changed": sum(a != b for a, b in zip(new, as_run, strict=True)),
        }

    with cache_path.open("a") as cache:
        by_condition = {name: verdicts(name, path, rows, cache) for name, (path, rows) in files.items()}
        by_round = {k: verdicts(f"round_{k}", path, rows, cache) for k, (path, rows) in rounds.items()}
    conditions = {name: summary(by_condition[name], rows) for name, (_, rows) in files.items()}
    graded_rounds = {k: summary(by_round[k], rows) for k, (_, rows) in rounds.items()}
    if graded_rounds and "self_edit" in conditions:  # round 0, before RL, is the self_edit condition
        graded_rounds = {0: conditions["self_edit"], **graded_rounds}
    in_order = sorted(files, key=lambda c: (CONDITION_ORDER.index(c) if c in CONDITION_ORDER else 99, c))
    paired = paired_comparisons(
        {
            c: [
                {"question": row["question"], "correct": v}
                for row, v in zip(files[c][1], by_condition[c], strict=True)
            ]
            for c in in_order
        }
    )
    try:
        run_grader = read_config(run_dir).get("task.grader")
    except ReportError:
        run_grader = None
    graded = {"grader": label, "run_grader": run_grader, "conditions": conditions, "paired": paired}
    if graded_rounds:
        graded["rounds"] = {str(k): s for k, s in graded_rounds.items()}
    write_json_atomic(run_dir / "graded" / f"{label}.json", graded)
    return graded


def graded_table(run_dir: Path, graded: dict[str, Any]) -> Rows:
    """One run's regrade as a console table: per condition, the run's accuracy beside the new grader's."""
    header = ["condition", "n", f"as run ({graded['run_grader']})", graded["grader"], "changed"]
    rows = [
        [
            c,
            str(s["n"]),
            f"{s['run_accuracy']:.3f}",
            f"{s['accuracy']:.3f} ± {s['ci95']:.3f}",
            str(s["changed"]),
        ]
        for c, s in [
            *graded["conditions"].items(),
            *((f"RL round {k}", s) for k, s in graded.get("rounds", {}).items()),
        ]
    ]
    return f"{run_dir}: answers graded again", header, rows


def graded_pairs_table(run_dir: Path, graded: dict[str, Any]) -> Rows | None:
    """The conditions compared question by question under the new grader."""
    accuracy = {c: s["accuracy"] for c, s in graded["conditions"].items()}
    rows = [
        paired_row(f"{first} − {second}", accuracy[first] - accuracy[second], comparison)
        for (first, second), comparison in ((pair.split("_vs_"), c) for pair, c in graded["paired"].items())
    ]
    if not rows:
        return None
    return f"{run_dir}: conditions compared on the same questions, {graded['grader']}", PAIRED_HEADER, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m seal.regrade",
        description="Grade the answers of finished SEAL runs again with another grader; nothing retrains.",
    )
    parser.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH", help="a run directory, a sweep, or any folder of runs"
    )
    parser.add_argument(
        "--grader", required=True, choices=["contains", "first_sentence", "exact", "f1", "judge"]
    )
    parser.add_argument(
        "--f1-threshold", type=float, default=0.5, help="f1: the token F1 that counts as right"
    )
    args = parser.parse_args(argv)
    try:
        grade = make_grader(args.grader, args.f1_threshold)
    except RuntimeError as e:  # judge without its endpoint
        parser.exit(1, f"seal.regrade: error: {e}\n")
    label = grader_label(args.grader, args.f1_threshold)
    run_dirs = []
    for path in args.paths:
        if not (found := find_run_dirs(path) if path.is_dir() else []):
            reason = "holds no run directory (a folder with config.yaml)"
            parser.exit(1, f"seal.regrade: error: {path}: {reason}\n")
        run_dirs += found
    failed = 0
    for run_dir in run_dirs:  # one run's problem stops neither the others nor what they wrote
        try:
            graded = regrade_run(run_dir, grade, label, reuse=args.grader == "judge")
            tables = (graded_table(run_dir, graded), graded_pairs_table(run_dir, graded))
        except NoAnswers as e:  # a failed or few-shot run: nothing to grade
            print(f"seal.regrade: skipped {e}", file=sys.stderr)
            continue
        except (RegradeError, ReportError) as e:
            print(f"seal.regrade: error: {e}", file=sys.stderr)
            failed += 1
            continue
        print_tables([t for t in tables if t])
        print(f"wrote {run_dir / 'graded' / label}.json and .jsonl (a verdict per distinct answer)")
    if failed:
        parser.exit(1, f"seal.regrade: {failed} run{'s' * (failed > 1)} not graded (see above)\n")


if __name__ == "__main__":
    main()
