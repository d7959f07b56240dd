"""Reports of SEAL runs.

One run: `seal.train` calls `report(metrics, run_dir)` at its end. It prints the run's summary metrics as
tables and writes them to `run_dir/report.md`:

  knowledge   accuracy of each condition (and the RL curve's rounds)
  few-shot    ARC tasks solved by each condition
  cost        what the updates cost: reasoning accuracy and prior knowledge, before and after, side by side
  phases      time and peak memory of each phase

Many runs: `python -m seal.report PATH… --out DIR [--wandb]` compares runs (a run directory, a Hydra sweep
directory or any folder holding run directories). Each run is named by the config keys that differ between
the runs. It writes to DIR:

  report.md     runs × measures with the paper's numbers, then the runs that differ only by seed pooled
  summary.csv   one row per run with every numeric summary key, for spreadsheets
  *.png         the figures drawn by seal/plots.py, each only when the runs hold its data

With --wandb it also saves the same comparison as a W&B Report.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from seal.grading import paired_comparison, with_holm
from seal.sweep import LedgerError, read_ledger
from seal.tracking import JSONLError, read_jsonl

if TYPE_CHECKING:
    import wandb_workspaces.reports.v2 as wr

    from seal import plots

Rows = tuple[str, list[str], list[list[str]]]  # title, header, rows


# ---------------------------------------------------------------- one run


def _ci(metrics: dict[str, Any], prefix: str) -> str:
    """`prefix`/accuracy ± its ci95 (retention/prior_knowledge has no /accuracy: it is the value itself)."""
    value, ci = (
        (f"{prefix}/accuracy", f"{prefix}/ci95")
        if f"{prefix}/accuracy" in metrics
        else (prefix, f"{prefix}_ci95")
    )
    if value not in metrics:
        return "–"
    return f"{metrics[value]:.3f} ± {metrics[ci]:.3f}"


def _is_round(key: str, head: str, tail: str) -> bool:
    """`key` is head + round_<k> + tail."""
    return key.startswith(head + "round_") and key.endswith(tail) and key.count("/") == 2


def knowledge_table(metrics: dict[str, Any]) -> Rows | None:
    """Each condition's accuracy and the RL curve; with task.score_answers, a column of the gold answers'
    mean log-probability per token."""
    scored = any(k.endswith("answer_logprob") for k in metrics)

    def logprob(key: str) -> list[str]:
        return [f"{metrics[key]:.3f}" if key in metrics else "–"] if scored else []

    rows = []
    for key in (k for k in metrics if k.startswith("knowledge/") and k.endswith("/accuracy")):
        prefix = key[: -len("/accuracy")]
        rows.append(
            [prefix.split("/", 1)[1], _ci(metrics, prefix), str(metrics[f"{prefix}/n"])]
            + logprob(f"{prefix}/answer_logprob")
        )
    for k in sorted(int(key.split("/")[1][6:]) for key in metrics if _is_round(key, "rl/", "/eval_accuracy")):
        prefix = f"rl/round_{k}"
        value = f"{metrics[f'{prefix}/eval_accuracy']:.3f} ± {metrics[f'{prefix}/eval_ci95']:.3f}"
        rows.append([f"RL round {k}", value, ""] + logprob(f"{prefix}/eval_answer_logprob"))
    if not rows:
        return None
    return (
        "knowledge: accuracy on the evaluation passages' questions",
        ["condition", "accuracy ± 95% CI", "n"] + (["gold answer log-prob/token"] if scored else []),
        rows,
    )


P_COLUMNS = ["p (exact McNemar)", "p, Holm"]
PAIRED_HEADER = ["pair", "difference", "only first right", "only second right", *P_COLUMNS]


def p_text(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else "< 0.001"


def paired_row(name: str, difference: float, comparison: dict[str, float]) -> list[str]:
    """One row of a paired table; `comparison` is seal.grading.paired_comparison's with `p_holm` added, its
    p-value adjusted for the pairs of the same table (seal.grading.with_holm)."""
    return [
        name,
        f"{difference:+.3f}",
        str(comparison["only_first"]),
        str(comparison["only_second"]),
        p_text(comparison["p_value"]),
        p_text(comparison["p_holm"]),
    ]


def paired_table(metrics: dict[str, Any]) -> Rows | None:
    """The conditions compared question by question, or ARC task by task (`paired/<a>_vs_<b>/*`)."""
    few_shot = any(k.startswith("few_shot/") for k in metrics)

    def measure(condition: str) -> float:
        return metrics[f"few_shot/{condition}/success" if few_shot else f"knowledge/{condition}/accuracy"]

    pairs, comparisons = [], []
    for key in (k for k in metrics if k.startswith("paired/") and k.endswith("/p_value")):
        prefix = key[: -len("/p_value")]
        pairs.append(prefix.split("/")[1].split("_vs_"))
        comparisons.append({k: metrics[f"{prefix}/{k}"] for k in ("only_first", "only_second", "p_value")})
    if not pairs:
        return None
    rows = [  # Holm recomputed from the p-values: runs made before `p_holm` was recorded have none
        paired_row(f"{first} − {second}", measure(first) - measure(second), comparison)
        for (first, second), comparison in zip(pairs, with_holm(comparisons), strict=True)
    ]
    if few_shot:
        return "few-shot: conditions compared on the same tasks", PAIRED_HEADER, rows
    return "knowledge: conditions compared on the same questions", PAIRED_HEADER, rows


def few_shot_table(metrics: dict[str, Any]) -> Rows | None:
    rows = []
    for key in (k for k in metrics if k.startswith("few_shot/") and k.endswith("/success")):
        prefix = key[: -len("/success")]
        rows.append(
            [
                prefix.split("/", 1)[1],
                f"{metrics[key]:.3f} ± {metrics[f'{prefix}/ci95']:.3f}",
                str(metrics[f"{prefix}/n"]),
                str(metrics[f"{prefix}/failed"]),
            ]
        )
    if not rows:
        return None
    header = [
        "condition",
        "solved (pass@2) ± 95% CI",
        "tasks",
        "not run (no valid configuration, cost, update)",
    ]
    return "few-shot: ARC tasks solved", header, rows


def cost_table(metrics: dict[str, Any]) -> Rows | None:
    """Reasoning accuracy and prior knowledge before any update and after, side by side."""
    if "reasoning/before/accuracy" not in metrics:
        return None
    rounds = sorted(int(k.split("/")[1][6:]) for k in metrics if _is_round(k, "reasoning/", "/accuracy"))
    header = ["measure", "before", "after update", *[f"after RL round {k}" for k in rounds], "chance"]
    reasoning = [
        "reasoning accuracy",
        _ci(metrics, "reasoning/before"),
        _ci(metrics, "reasoning/after_update"),
        *[_ci(metrics, f"reasoning/round_{k}") for k in rounds],
        f"{metrics['reasoning/before/chance']:.3f}",
    ]
    known, asked = metrics.get("retention/prior_known"), metrics.get("retention/prior_asked")
    prior = [
        "prior knowledge retained",
        f"{1 if known else '–'} ({known} of {asked} known)" if known is not None else "–",
        _ci(metrics, "retention/prior_knowledge"),
        *["–" for _ in rounds],
        "",
    ]
    # After update: a sample of round 0's adapters; in task.mode=continual, the model after all its edits.
    title = "what the updates cost: reasoning and prior knowledge before and after"
    if "reasoning/forgetting" in metrics:
        title += f" · forgetting = {metrics['reasoning/forgetting']:+.3f}"
    return title, header, [reasoning, prior]


def phases_table(metrics: dict[str, Any]) -> Rows:
    rows = []
    total = sum(metrics[k] for k in metrics if k.startswith("time/"))
    for key in sorted(k for k in metrics if k.startswith("time/")):
        phase = key[len("time/") : -len("_s")]
        rows.append(
            [
                phase,
                f"{metrics[key]:.1f}",
                f"{100 * metrics[key] / max(total, 1e-9):.0f} %",
                f"{metrics.get(f'mem/peak_{phase}_mb', 0):.0f}",
            ]
        )
    return (
        f"phases · memory: {metrics.get('mem/device')}",
        ["phase", "time (s)", "share", "peak memory (MB)"],
        rows,
    )


def tables(metrics: dict[str, Any]) -> list[Rows]:
    found = (
        knowledge_table(metrics),
        few_shot_table(metrics),
        paired_table(metrics),
        cost_table(metrics),
        phases_table(metrics),
    )
    return [t for t in found if t is not None]


def table_lines(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table under a `##` title (a `|` inside a cell is escaped, so it cannot split the cell)."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [f"## {title}", "", line(header), "|" + "---|" * len(header), *map(line, rows), ""]


def markdown(run_dir: Path, metrics: dict[str, Any]) -> str:
    lines = [f"# SEAL run · {run_dir}", ""]
    for table in tables(metrics):
        lines += table_lines(*table)
    return "\n".join(lines)


def print_tables(found: list[Rows]) -> None:
    console = Console()
    for title, header, rows in found:
        table = Table(title=title)
        for column in header:
            table.add_column(column)
        for row in rows:
            table.add_row(*map(escape, row))  # a config value such as [base, passage] is not markup
        console.print(table)


def report(metrics: dict[str, Any], run_dir: Path) -> Path:
    """Print the tables and write them to `run_dir/report.md`."""
    print_tables(tables(metrics))
    path = run_dir / "report.md"
    path.write_text(markdown(run_dir, metrics))
    return path


# ---------------------------------------------------------------- many runs: finding and reading them

IGNORED = ("paths.", "hydra.", "logger.")  # where outputs go and how they are logged: never what a run tests


class ReportError(Exception):
    """Inputs that cannot be compared; the message names the file."""


@dataclass
class Run:
    """One run directory. `metrics` is {} when the run left no summary.json."""

    path: Path
    config: dict[str, Any]  # the resolved config, flattened to dotted keys
    metrics: dict[str, Any]
    error: str | None  # why the run failed; None when it finished
    wandb_id: str | None
    label: str = ""  # the config keys that set it apart, e.g. "self_edit.name=rewrite seed=1"
    group: str = ""  # the same without the seed: the runs of one group repeat one configuration
    _results: dict[str, list[dict[str, Any]] | None] = field(default_factory=dict, repr=False, compare=False)

    def results(self, name: str) -> list[dict[str, Any]] | None:
        """results/<name>.jsonl, read once (None when the run has no such file)."""
        if name not in self._results:
            path = self.path / "results" / f"{name}.jsonl"
            try:
                self._results[name] = read_jsonl(path) if path.is_file() else None
            except JSONLError as e:
                raise ReportError(str(e)) from e
        return self._results[name]

    @property
    def status(self) -> str:
        return "ok" if self.error is None else f"failed: {self.error}"


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: malformed JSON ({e})") from e


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's config.yaml, or Hydra's copy when the job failed before seal.train wrote it."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        path = run_dir / ".hydra" / "config.yaml"
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ReportError(f"{path}: malformed YAML ({e})") from e
    if not isinstance(tree, dict):
        raise ReportError(f"{path}: expected a mapping of config keys")
    return flatten(tree)


def is_run_dir(path: Path) -> bool:
    """seal.train writes config.yaml first. A sweep's job that failed before that still has Hydra's
    .hydra/config.yaml, beside the sweep's multirun.yaml."""
    hydra_job = (path.parent / "multirun.yaml").is_file() and (path / ".hydra" / "config.yaml").is_file()
    return (path / "config.yaml").is_file() or hydra_job


def _natural(path: Path) -> tuple[int, int, str]:
    """Sweep jobs 0, 1, …, 10 in numeric order, then named folders."""
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def find_run_dirs(path: Path) -> list[Path]:
    """The run directories at or below `path`. The search stops at a run directory: its wandb/ folder holds
    config.yaml files of its own. Hidden folders (.hydra) are skipped."""
    if is_run_dir(path):
        return [path]
    subdirs = sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_natural)
    return [run_dir for sub in subdirs for run_dir in find_run_dirs(sub)]


def jobs_by_run_dir(sweep_dir: Path) -> dict[Path, dict[str, Any]]:
    """The sweep's ledger (seal.sweep, optional), keyed by each job's resolved run directory: a line names
    it by `run_dir`, by `num` (the job's folder in the sweep), or both. A later line of a job wins."""
    try:
        ledger = read_ledger(sweep_dir)
    except LedgerError as e:
        raise ReportError(str(e)) from e
    jobs: dict[Path, dict[str, Any]] = {}
    for job in ledger:
        if "num" in job:
            jobs[(sweep_dir / str(job["num"])).resolve()] = job
        if "run_dir" in job:
            jobs[Path(job["run_dir"]).resolve()] = job
    return jobs


def load_run(run_dir: Path, ledger: dict[Path, dict[str, Any]]) -> Run:
    """A run without summary.json failed, was killed or is still running; the ledger may say why."""
    job = ledger.get(run_dir.resolve(), {})
    summary = run_dir / "summary.json"
    metrics, error = {}, None
    if summary.is_file():
        content = read_json(summary)
        if not isinstance(content, dict) or not isinstance(content.get("metrics"), dict):
            raise ReportError(f'{summary}: expected {{"metrics": {{...}}}}')
        metrics = content["metrics"]
        if str(job.get("status", "")).upper() == "FAILED":
            error = job.get("error") or "marked FAILED in jobs.jsonl"
    else:
        error = job.get("error") or "no summary.json (the job failed, was killed or is still running)"
    metrics.update(regraded(run_dir))
    id_path = run_dir / "wandb_run_id"
    wandb_id = id_path.read_text().strip() if id_path.is_file() else None
    return Run(run_dir, read_config(run_dir), metrics, error, wandb_id)


def regraded(run_dir: Path) -> dict[str, float]:
    """The run's answers graded again by `python -m seal.regrade` (graded/<grader>.json), as keys
    `graded/<grader>/<condition>/{accuracy,ci95}` beside the run's own, and its RL curve as
    `graded/<grader>/rl/round_<k>/{eval_accuracy,eval_ci95}`."""
    keys = {}
    for path in sorted((run_dir / "graded").glob("*.json")):
        content = read_json(path)
        if not isinstance(content, dict) or not isinstance(content.get("conditions"), dict):
            raise ReportError(f'{path}: expected {{"grader", "conditions": {{...}}}} (seal.regrade)')
        rounds = content.get("rounds", {})
        if not isinstance(rounds, dict):
            raise ReportError(
                f'{path}: expected "rounds" to map each RL round to its accuracy (seal.regrade)'
            )
        found = [
            *((f"condition {c!r}", f"{c}/", graded) for c, graded in content["conditions"].items()),
            *((f"RL round {k}", f"rl/round_{k}/eval_", graded) for k, graded in rounds.items()),
        ]
        for name, prefix, graded in found:
            if not isinstance(graded, dict) or not {"accuracy", "ci95"} <= set(graded):
                raise ReportError(f"{path}: {name} lacks its accuracy and ci95")
            for measure in ("accuracy", "ci95"):
                keys[f"graded/{path.stem}/{prefix}{measure}"] = graded[measure]
    return keys


def load_runs(paths: list[Path]) -> list[Run]:
    """Every run under `paths` (each once), labelled by what sets it apart."""
    runs: list[Run] = []
    ledgers: dict[Path, dict[Path, dict[str, Any]]] = {}
    for path in paths:
        if not path.is_dir():
            raise ReportError(f"{path}: not a directory")
        found = find_run_dirs(path)
        if not found:
            raise ReportError(f"{path}: holds no run directory (a folder with config.yaml)")
        for run_dir in found:
            if any(run.path.resolve() == run_dir.resolve() for run in runs):
                continue
            if run_dir.parent not in ledgers:
                ledgers[run_dir.parent] = jobs_by_run_dir(run_dir.parent)
            runs.append(load_run(run_dir, ledgers[run_dir.parent]))
    label_runs(runs)
    return runs


# ---------------------------------------------------------------- many runs: naming them


def _decided_by_name(key: str, configs: list[dict[str, Any]]) -> bool:
    """`key` lies in a config group whose `name` alone fixes its value: `self_edit.prompt` follows from
    `self_edit.name`, so it adds nothing to a run's label."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        name = ".".join(parts[:i]) + ".name"
        if name == key:
            continue
        values: dict[str, set[str]] = {}
        for config in configs:
            values.setdefault(repr(config.get(name)), set()).add(repr(config.get(key)))
        if len(values) > 1 and all(len(v) == 1 for v in values.values()):
            return True
    return False


def varying_keys(configs: list[dict[str, Any]]) -> list[str]:
    """The config keys whose values differ between the runs, less paths, hydra and logger keys and less
    the keys a varying group name decides."""
    keys = dict.fromkeys(k for config in configs for k in config if not k.startswith(IGNORED))
    varying = [k for k in keys if len({repr(config.get(k)) for config in configs}) > 1]
    return [k for k in varying if not _decided_by_name(k, configs)]


LABEL_KEYS = 4  # the most varying keys a run's label shows


def short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 24 else text[:23] + "…"


def describe(config: dict[str, Any], keys: list[str]) -> str:
    return " ".join(f"{k}={short(config.get(k))}" for k in keys)


def label_runs(runs: list[Run]) -> None:
    """Label each run by its varying keys and group it with the runs that differ from it only by seed.
    When nothing varies, or too much for a table cell, the directory's name stands in; a group is then
    named by its runs' labels."""
    keys = varying_keys([run.config for run in runs])
    for run in runs:
        run.label = describe(run.config, keys if len(keys) <= LABEL_KEYS else []) or run.path.name
    repeated = Counter(run.label for run in runs)
    for run in runs:
        if repeated[run.label] > 1:  # the same config in several folders, e.g. a run repeated by hand
            run.label += f" ({run.path})"
    grouped = [k for k in keys if k != "seed"]
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:  # by the full values: two long values may share their shortened form
        groups.setdefault(tuple(repr(run.config.get(k)) for k in grouped), []).append(run)
    names = {
        values: describe(members[0].config, grouped) or "all runs"
        if len(grouped) <= LABEL_KEYS
        else " + ".join(run.label for run in members)
        for values, members in groups.items()
    }
    shared = Counter(names.values())
    for values, members in groups.items():
        name = names[values]
        if shared[name] > 1:  # values that differ only past their shortened form: named in full
            name = " ".join(f"{k}={members[0].config.get(k)}" for k in grouped)
        for run in members:
            run.group = name


# ---------------------------------------------------------------- many runs: the tables

Column = tuple[str, str, str]  # header, value key, ci95 key
Estimate = tuple[float, float | None]  # value, half-width of its 95 % interval (None when unknown)

# The 97.5th percentile of Student's t for 1 to 30 degrees of freedom; beyond, the normal's 1.96.
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
       2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
       2.045, 2.042)  # fmt: skip

# SEAL paper (Zweiger et al. 2025), in %: (task.name, task.mode) -> (row title, our condition -> (paper's
# name, value)). Knowledge incorporation: Qwen2.5-7B; few-shot: ARC with Llama-3.2-1B-Instruct.
PAPER: dict[tuple[str, str | None], tuple[str, dict[str, tuple[str, float]]]] = {
    ("knowledge", "single"): (
        "paper: single passage, Qwen2.5-7B",
        {
            "base": ("base model", 32.7),
            "passage": ("passage only", 33.5),
            "self_edit": ("passage + synthetic implications without RL", 39.7),
            "seal": ("SEAL", 47.0),
        },
    ),
    # SEAL_METHOD.md's "CPT n=200 (LoRA)" column, as our CPT trains a LoRA adapter (the paper's other
    # n = 200 CPT figures are 32.7, 36.0, 50.6 and 58.2).
    ("knowledge", "cpt"): (
        "paper: CPT n = 200 (LoRA), Qwen2.5-7B",
        {
            "base": ("base model", 32.6),
            "passage": ("train on passage", 32.2),
            "self_edit": ("train on passage + synthetic implications", 41.0),
            "seal": ("SEAL", 43.8),
        },
    ),
    ("few_shot", None): (
        "paper: ARC, Llama-3.2-1B-Instruct",
        {
            "icl": ("ICL", 0.0),
            "self_edit": ("TTT + self-edit without RL", 20.0),
            "seal": ("SEAL", 72.5),
            "ttt_fixed": ("oracle TTT", 100.0),
        },
    ),
}
PAPER_NOTES = {
    "knowledge": "The paper's passage + GPT-4.1 synthetic data (46.3 % single passage, 39.4 % CPT with "
    "LoRA) has no condition here.",
    "few_shot": "Our `ttt_fixed` is one hand-fixed TTT configuration, not the paper's oracle TTT, which "
    "picks the best configuration per task.",
}


def measure_columns(runs: list[Run]) -> list[Column]:
    """The measures some run holds, in reading order: knowledge conditions, few-shot conditions, the
    knowledge conditions graded again (seal.regrade), the gold answers' log-probability per condition
    (task.score_answers), reasoning before and after the updates, prior knowledge retained."""
    keys = dict.fromkeys(k for run in runs for k in run.metrics)
    columns = [
        (k[: -len("/accuracy")], k, k[: -len("accuracy")] + "ci95")
        for k in keys
        if re.fullmatch(r"knowledge/[^/]+/accuracy", k)
    ]
    columns += [
        (k[: -len("/success")], k, k[: -len("success")] + "ci95")
        for k in keys
        if re.fullmatch(r"few_shot/[^/]+/success", k)
    ]
    conditions = [header.split("/")[1] for header, _, _ in columns if header.startswith("knowledge/")]

    def grader_then_condition(key: str) -> tuple[str, int, str]:
        _, grader, condition, _ = key.split("/")
        return grader, conditions.index(condition) if condition in conditions else len(conditions), condition

    graded = sorted(
        (k for k in keys if re.fullmatch(r"graded/[^/]+/[^/]+/accuracy", k)), key=grader_then_condition
    )
    columns += [(k[: -len("/accuracy")], k, k[: -len("accuracy")] + "ci95") for k in graded]
    columns += [
        (f"answer_logprob/{c}", f"knowledge/{c}/answer_logprob", f"knowledge/{c}/answer_logprob_ci95")
        for c in conditions
        if f"knowledge/{c}/answer_logprob" in keys
    ]
    columns += [
        (f"reasoning/{when}", f"reasoning/{when}/accuracy", f"reasoning/{when}/ci95")
        for when in ("before", "after_update")
        if f"reasoning/{when}/accuracy" in keys
    ]
    if "retention/prior_knowledge" in keys:
        columns.append(
            ("retention/prior_knowledge", "retention/prior_knowledge", "retention/prior_knowledge_ci95")
        )
    return columns


def interval(values: list[float]) -> float:
    """Half-width of the 95 % t-interval of the mean of `values` (two or more)."""
    n = len(values)
    t = T95[n - 2] if n - 1 <= len(T95) else 1.96
    return t * statistics.stdev(values) / math.sqrt(n)


def pooled(runs: list[Run], key: str, ci_key: str) -> Estimate | None:
    """The mean of `key` over the runs that hold it, ± the 95 % interval across them; for a single run, its
    own value ± its own ci95."""
    holders = [run for run in runs if key in run.metrics]
    if not holders:
        return None
    if len(holders) == 1:
        return holders[0].metrics[key], holders[0].metrics.get(ci_key)
    values = [run.metrics[key] for run in holders]
    return statistics.fmean(values), interval(values)


def cell(estimate: Estimate | None) -> str:
    if estimate is None:
        return "–"
    value, ci = estimate
    return f"{value:.3f}" if ci is None else f"{value:.3f} ± {ci:.3f}"


def peak_memory(run: Run) -> str:
    peaks = [v for k, v in run.metrics.items() if k.startswith("mem/peak_") and k.endswith("_mb")]
    return f"{max(peaks):.0f}" if peaks else "–"


def total_time(run: Run) -> str:
    times = [v for k, v in run.metrics.items() if k.startswith("time/") and k.endswith("_s")]
    return f"{sum(times):.1f}" if times else "–"


def references(runs: list[Run]) -> list[tuple[str, str | None]]:
    """The paper's settings these runs match: its knowledge numbers per task.mode, its ARC numbers."""
    found = {
        (task, run.config.get("task.mode") if task == "knowledge" else None)
        for run in runs
        if (task := run.config.get("task.name"))
    }
    return [setting for setting in PAPER if setting in found]


def paper_cells(setting: tuple[str, str | None], columns: list[Column]) -> list[str]:
    """The paper's value (as a fraction, like ours) under each column of a condition it reports."""
    task, _ = setting
    values = PAPER[setting][1]
    cells = []
    for header, _, _ in columns:
        family, _, condition = header.partition("/")
        cells.append(f"{values[condition][1] / 100:.3f}" if family == task and condition in values else "")
    return cells


def paper_note(runs: list[Run]) -> list[str]:
    """How our conditions map to the paper's, for each paper row shown."""
    settings = references(runs)
    if not settings:
        return []
    lines = ["Paper rows: SEAL (Zweiger et al. 2025), given there in % and here as fractions, like ours.", ""]
    for task, mode in settings:
        title, values = PAPER[task, mode]
        pairs = ", ".join(f"`{task}/{c}` = {name} ({v} %)" for c, (name, v) in values.items())
        lines.append(f"- {title}: {pairs}.")
    lines += [f"- {PAPER_NOTES[task]}" for task in dict.fromkeys(task for task, _ in settings)]
    return [*lines, ""]


def runs_table(runs: list[Run]) -> Rows:
    columns = measure_columns(runs)
    header = ["run", *[h for h, _, _ in columns], "peak memory (MB)", "time (s)", "status"]
    rows = [
        [
            run.label,
            *[cell(pooled([run], key, ci)) for _, key, ci in columns],
            peak_memory(run),
            total_time(run),
            run.status,
        ]
        for run in runs
    ]
    rows += [[PAPER[s][0], *paper_cells(s, columns), "", "", "reference"] for s in references(runs)]
    return "runs: measure ± 95 % CI", header, rows


def seed_groups(runs: list[Run]) -> dict[str, list[Run]]:
    """The runs of each configuration, one per seed: of runs that repeat a seed (the same configuration run
    twice), the last finished one, since pooling repeats as if they were seeds would narrow the interval."""
    groups: dict[str, dict[Any, Run]] = {}
    for run in runs:
        by_seed = groups.setdefault(run.group, {})
        seed = repr(run.config.get("seed"))
        if seed not in by_seed or run.error is None or by_seed[seed].error is not None:
            by_seed[seed] = run
    return {name: list(by_seed.values()) for name, by_seed in groups.items()}


def seed_table(runs: list[Run]) -> Rows | None:
    """The runs that differ only by seed, pooled: mean ± the 95 % t-interval across seeds (a group of
    one run keeps its own ci95). None when no group has two finished runs."""
    groups = seed_groups(runs)
    if all(sum(run.error is None for run in members) < 2 for members in groups.values()):
        return None
    columns = measure_columns(runs)
    rows = []
    for name, members in groups.items():
        finished = [run for run in members if run.error is None]
        seeds = f"{len(finished)}: " + ", ".join(str(run.config.get("seed")) for run in finished)
        if len(finished) < len(members):
            seeds += f" ({len(members) - len(finished)} failed)"
        if repeats := sum(run.group == name for run in runs) - len(members):
            seeds += f" ({repeats} repeated seed{'s' * (repeats > 1)} left out)"
        rows.append([name, seeds, *[cell(pooled(finished, key, ci)) for _, key, ci in columns]])
    rows += [[PAPER[s][0], "", *paper_cells(s, columns)] for s in references(runs)]
    header = ["configuration", "seeds", *[h for h, _, _ in columns]]
    return "runs that differ only by seed: mean ± 95 % interval across seeds", header, rows


def graded_flags(run: Run, family: str, condition: str) -> tuple[list[str], list[bool]] | None:
    """What a finished run was asked in a condition and whether it got each right: the questions of
    results/<condition>.jsonl (knowledge), or the ARC tasks of results/few_shot.jsonl (few-shot)."""
    name, asked, right = (
        ("few_shot", "task", "success") if family == "few_shot" else (condition, "question", "correct")
    )
    rows = run.results(name) if run.error is None else None
    if rows is None:
        return None
    if family == "few_shot":
        rows = [row for row in rows if row.get("condition") == condition]
    if not all(asked in row and right in row for row in rows):
        raise ReportError(f"{run.path / 'results' / name}.jsonl: expected graded answers ({asked}, {right})")
    return [row[asked] for row in rows], [bool(row[right]) for row in rows]


def best_run_tables(runs: list[Run]) -> list[Rows]:
    """Per condition that two or more finished runs answered on the same questions (ARC tasks): the run with
    the highest accuracy (success) against each other one, question by question (exact McNemar test). A
    condition whose runs agree on every question (base and passage across a template sweep) has no table."""
    found = []
    for header, _, _ in measure_columns(runs):
        family, condition = header.split("/")[0], header.split("/")[1]
        if family not in ("knowledge", "few_shot"):
            continue
        # Only runs asked the same questions compare: one table per question set (runs on the embedded
        # corpus and on SQuAD under one folder make two).
        by_questions: dict[tuple[str, ...], dict[str, list[bool]]] = {}
        for run in runs:
            if flags := graded_flags(run, family, condition):
                by_questions.setdefault(tuple(flags[0]), {})[run.label] = flags[1]
        sets = [answered for answered in by_questions.values() if len(answered) > 1]
        for answered in sets:
            best = max(answered, key=lambda label: sum(answered[label]))  # the first on a tie
            labels = [label for label in answered if label != best]
            compared = with_holm([paired_comparison(answered[best], answered[label]) for label in labels])
            if not any(c["only_first"] + c["only_second"] for c in compared):
                continue
            n = len(answered[best])
            rows = [
                paired_row(label, (c["only_first"] - c["only_second"]) / n, c)
                for label, c in zip(labels, compared, strict=True)
            ]
            columns = ["run", "best − run", "only best right", "only run right", *P_COLUMNS]
            asked = f" ({n} {'tasks' if family == 'few_shot' else 'questions'})" if len(sets) > 1 else ""
            found.append((f"{header}{asked}: the best run, {best}, against each other", columns, rows))
    return found


def comparison_markdown(runs: list[Run]) -> str:
    failed = sum(run.error is not None for run in runs)
    lines = [
        "# SEAL runs compared",
        "",
        f"{len(runs)} runs, {failed} failed. Knowledge, reasoning and retention cells are the share of "
        "questions answered right; few-shot cells are the share of ARC tasks solved (pass@2). Each is "
        "± its 95 % confidence interval. Memory is the largest phase peak; time is the sum of all phases."
        + (
            " An answer_logprob cell is the gold answers' mean log-probability per token "
            "(task.score_answers)."
            if any(k.endswith("/answer_logprob") for run in runs for k in run.metrics)
            else ""
        ),
        "",
        *table_lines(*runs_table(runs)),
    ]
    for table in best_run_tables(runs):
        lines += table_lines(*table)
    keys = varying_keys([run.config for run in runs])
    if len(keys) > LABEL_KEYS:
        lines += ["## what differs between the runs", ""]
        lines += [f"- {run.label}: {describe(run.config, keys)}" for run in runs]
        lines.append("")
    grouped = seed_table(runs)
    if grouped:
        lines += [
            *table_lines(*grouped),
            "Across seeds, ± is the 95 % t-interval of the mean (wide with few seeds); a configuration "
            "with one finished run keeps that run's own 95 % CI.",
            "",
        ]
    return "\n".join([*lines, *paper_note(runs)])


def write_csv(runs: list[Run], path: Path) -> Path:
    """One row per run with every numeric summary key (empty where a run lacks it)."""
    keys = list(
        dict.fromkeys(k for run in runs for k, v in run.metrics.items() if isinstance(v, (int, float)))
    )
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "directory", "status", *keys])
        for run in runs:
            writer.writerow([run.label, run.path, run.status, *[run.metrics.get(k, "") for k in keys]])
    return path


# ---------------------------------------------------------------- many runs: the figures' data


def condition_bars(runs: list[Run], family: str) -> tuple[plots.Bars, str] | None:
    """Per configuration, per condition: the `family` measure (knowledge accuracy, few-shot success) pooled
    over seeds, and the x axis's title. A configuration is named by the keys that vary among these runs,
    less the seed: by the template alone when only `self_edit.name` varies. Where two configurations' values
    share their shortened form, each is named by its group (`label_runs`), so that no bar replaces another."""
    columns = [c for c in measure_columns(runs) if c[0].startswith(family + "/")]
    members = [run for run in runs if run.error is None and any(key in run.metrics for _, key, _ in columns)]
    if not members:
        return None
    keys = [k for k in varying_keys([run.config for run in members]) if k != "seed"]
    groups = seed_groups(members)
    names = {}
    for group, repeats in groups.items():
        if len(keys) == 1:
            names[group] = short(repeats[0].config.get(keys[0]))
        else:
            names[group] = describe(repeats[0].config, keys) if 1 < len(keys) <= LABEL_KEYS else group
    if len(set(names.values())) < len(names):  # group names are distinct (`label_runs`)
        names = {group: group for group in groups}
    bars: plots.Bars = {}
    for group, repeats in groups.items():
        bars[names[group]] = {h.split("/")[1]: e for h, key, ci in columns if (e := pooled(repeats, key, ci))}
    if len(keys) == 1:
        return bars, keys[0]
    return bars, "configuration" if keys else "one configuration"


def rl_curves(runs: list[Run]) -> dict[str, list[tuple[int, float, float]]]:
    """Per run with RL rounds: (round, eval accuracy, its ci95); round 0 is before RL. A run whose answers
    were graded again (seal.regrade) has a curve per grader too."""
    curves = {}
    for run in runs:
        series: dict[str, list[int]] = {}  # key head (rl/round_, graded/<grader>/rl/round_) -> rounds
        for key in run.metrics:
            if match := re.fullmatch(r"((?:graded/[^/]+/)?rl/round_)(\d+)/eval_accuracy", key):
                series.setdefault(match[1], []).append(int(match[2]))
        own = f"{run.label}, as run ({run.config.get('task.grader')})" if len(series) > 1 else run.label
        for head in sorted(series, key=lambda h: (h != "rl/round_", h)):  # the run's own curve first
            label = own if head == "rl/round_" else f"{run.label}, graded {head.split('/')[1]}"
            curves[label] = [
                (k, run.metrics[f"{head}{k}/eval_accuracy"], run.metrics.get(f"{head}{k}/eval_ci95", 0.0))
                for k in sorted(series[head])
            ]
    return curves


def retention_matrices(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """results/retention.json of each continual run (its matrix `accuracy` has n + 1 rows and n columns)."""
    found = {run.label: run.path / "results" / "retention.json" for run in runs}
    return {label: read_json(path) for label, path in found.items() if path.is_file()}


RETENTION_MEASURES = {
    "reasoning before": "reasoning/before/accuracy",
    "reasoning after update": "reasoning/after_update/accuracy",
    "prior knowledge retained": "retention/prior_knowledge",
}


def retention_rows(runs: list[Run]) -> dict[str, list[float | None]]:
    """Per run that measured any of them: the RETENTION_MEASURES (None where missing)."""
    return {
        run.label: [run.metrics.get(k) for k in RETENTION_MEASURES.values()]
        for run in runs
        if any(k in run.metrics for k in RETENTION_MEASURES.values())
    }


def phase_costs(runs: list[Run]) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Per run: seconds per phase (`time/<phase>_s`) and peak MB per phase (`mem/peak_<phase>_mb`)."""
    times, memory = {}, {}
    for run in runs:
        m = run.metrics
        if t := {k[5:-2]: v for k, v in m.items() if k.startswith("time/") and k.endswith("_s")}:
            times[run.label] = t
        if p := {k[9:-3]: v for k, v in m.items() if k.startswith("mem/peak_") and k.endswith("_mb")}:
            memory[run.label] = p
    return times, memory


BAR_FIGURES = (  # family, file, title, y axis
    ("knowledge", "accuracy_by_template.png", "Knowledge incorporation: accuracy", "share answered right"),
    ("few_shot", "success_by_template.png", "Few-shot ARC: success", "share of tasks solved (pass@2)"),
)


def draw_plots(runs: list[Run], out: Path) -> list[Path]:
    """Each figure whose data some run holds."""
    # matplotlib takes a second to import: not for seal.train, which draws nothing here.
    from seal import plots

    written = []
    for family, name, title, ylabel in BAR_FIGURES:
        if found := condition_bars(runs, family):
            bars, xlabel = found
            written.append(plots.condition_bars(bars, xlabel, ylabel, title, out / name))
    if curves := rl_curves(runs):
        written.append(plots.rl_curves(curves, out / "rl_curve.png"))
    if matrices := retention_matrices(runs):
        written.append(plots.retention_matrices(matrices, out / "retention.png"))
    elif rows := retention_rows(runs):
        written.append(plots.retention_summary(rows, list(RETENTION_MEASURES), out / "retention.png"))
    times, memory = phase_costs(runs)
    if times or memory:
        written.append(plots.costs(times, memory, out / "cost.png"))
    return written


# ---------------------------------------------------------------- many runs: a W&B Report


def _workspaces() -> Any:
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError as e:
        raise ReportError("--wandb needs the wandb-workspaces package: pip install wandb-workspaces") from e
    return wr


def wandb_report(runs: list[Run], project: str, entity: str) -> wr.Report:
    """The comparison as a W&B Report: the tables as Markdown, then a panel grid over exactly these runs
    (filtered by their W&B ids) with the same measures. Built offline; only `save` needs the network."""
    wr = _workspaces()
    from wandb_workspaces import expr

    ids = [run.wandb_id for run in runs if run.wandb_id]
    if not ids:
        raise ReportError("none of the runs has a wandb_run_id file")
    columns = measure_columns(runs)
    keys = dict.fromkeys(k for run in runs for k in run.metrics)
    wanted = {
        "knowledge: accuracy by condition": [k for h, k, _ in columns if h.startswith("knowledge/")],
        "few-shot: success by condition": [k for h, k, _ in columns if h.startswith("few_shot/")],
        "reasoning and prior knowledge": [
            k for h, k, _ in columns if h.startswith(("reasoning/", "retention/"))
        ],
        "knowledge: gold answer log-prob per token by condition": [
            k for h, k, _ in columns if h.startswith("answer_logprob/")
        ],
        "conditions compared question by question: p, Holm": [
            k for k in keys if k.startswith("paired/") and k.endswith("/p_holm")
        ],
        "time per phase (s)": [k for k in keys if k.startswith("time/") and k.endswith("_s")],
        "peak memory per phase (MB)": [k for k in keys if k.startswith("mem/peak_") and k.endswith("_mb")],
    }
    panels: list[Any] = [
        wr.BarPlot(title=title, metrics=metrics) for title, metrics in wanted.items() if metrics
    ]
    if rl_curves(runs):  # the history rows of seal.tasks.knowledge.log_round
        panels.append(wr.LinePlot(title="RL: eval accuracy per round", x="rl/round", y=["rl/eval_accuracy"]))
    if any(k.startswith("rl/round_") and k.endswith("/eval_answer_logprob") for k in keys):
        panels.append(
            wr.LinePlot(
                title="RL: gold answer log-prob per token per round",
                x="rl/round",
                y=["rl/eval_answer_logprob"],
            )
        )
    runset = wr.Runset(
        entity=entity, project=project, name="compared runs", filters=expr.And(expr.Metric("ID").isin(ids))
    )
    return wr.Report(
        project=project,
        entity=entity,
        title=f"SEAL: {len(runs)} runs compared",
        description=", ".join(run.label for run in runs),
        blocks=[
            wr.MarkdownBlock(text=comparison_markdown(runs)),
            wr.PanelGrid(runsets=[runset], panels=panels),
        ],
    )


def common_value(runs: list[Run], key: str) -> Any:
    """The runs' shared value of a config key (None when none sets it)."""
    values = {run.config.get(key) for run in runs} - {None}
    if len(values) > 1:
        raise ReportError(
            f"the runs differ in {key} ({sorted(map(str, values))}): choose one with --{key.split('.')[-1]}"
        )
    return next(iter(values), None)


def save_wandb_report(runs: list[Run], project: str | None, entity: str | None) -> str:
    """Save the report to W&B (needs a login) and return its URL. Project and entity default to the runs'
    logger.project and logger.entity, then to the login's default entity."""
    _workspaces()
    import wandb

    project = project or common_value(runs, "logger.project")
    if not project:
        raise ReportError("no W&B project: pass --project")
    try:
        api = wandb.Api()  # checks the login
        report = wandb_report(
            runs, project, entity or common_value(runs, "logger.entity") or api.default_entity
        )
        report.save()
    except wandb.errors.UsageError as e:
        raise ReportError(f"--wandb needs a W&B login: run `wandb login` or set WANDB_API_KEY ({e})") from e
    except wandb.errors.Error as e:
        raise ReportError(f"--wandb: W&B could not be reached or refused the login ({e})") from e
    return report.url


# ---------------------------------------------------------------- the command line


def compare(paths: list[Path], out: Path) -> tuple[list[Run], list[Path]]:
    """Read the runs under `paths`; write report.md, summary.csv and the figures to `out`."""
    runs = load_runs(paths)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    md.write_text(comparison_markdown(runs))
    return runs, [md, write_csv(runs, out / "summary.csv"), *draw_plots(runs, out)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m seal.report",
        description="Compare SEAL runs: tables (report.md, summary.csv), figures, optionally a W&B Report.",
    )
    parser.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH", help="a run directory, a sweep, or any folder of runs"
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="folder for report.md, summary.csv, *.png"
    )
    parser.add_argument("--wandb", action="store_true", help="also save a W&B Report (needs a W&B login)")
    parser.add_argument("--project", help="W&B project of the runs (default: their logger.project)")
    parser.add_argument("--entity", help="W&B entity (default: their logger.entity, else your default)")
    args = parser.parse_args(argv)
    try:
        runs, written = compare(args.paths, args.out)
        print_tables([runs_table(runs), *best_run_tables(runs)])
        for path in written:
            print(f"wrote {path}")
        if args.wandb:
            print(f"W&B report: {save_wandb_report(runs, args.project, args.entity)}")
    except ReportError as e:
        parser.exit(1, f"seal.report: error: {e}\n")


if __name__ == "__main__":
    main()
