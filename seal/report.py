"""A run's report: its summary metrics as tables, printed to the console and written to `report.md`.

knowledge   accuracy of each condition (and the RL curve's rounds)
cost        what the updates cost: reasoning accuracy and prior knowledge, before and after, side by side
phases      time and peak memory of each phase
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

Rows = tuple[str, list[str], list[list[str]]]  # title, header, rows


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
    rows = []
    for key in (k for k in metrics if k.startswith("knowledge/") and k.endswith("/accuracy")):
        prefix = key[: -len("/accuracy")]
        rows.append([prefix.split("/", 1)[1], _ci(metrics, prefix), str(metrics[f"{prefix}/n"])])
    for k in sorted(int(key.split("/")[1][6:]) for key in metrics if _is_round(key, "rl/", "/eval_accuracy")):
        prefix = f"rl/round_{k}"
        value = f"{metrics[f'{prefix}/eval_accuracy']:.3f} ± {metrics[f'{prefix}/eval_ci95']:.3f}"
        rows.append([f"RL round {k}", value, ""])
    if not rows:
        return None
    return (
        "knowledge: accuracy on the evaluation passages' questions",
        ["condition", "accuracy ± 95% CI", "n"],
        rows,
    )


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
    found = (knowledge_table(metrics), few_shot_table(metrics), cost_table(metrics), phases_table(metrics))
    return [t for t in found if t is not None]


def markdown(run_dir: Path, metrics: dict[str, Any]) -> str:
    lines = [f"# SEAL run · {run_dir}", ""]
    for title, header, rows in tables(metrics):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def report(metrics: dict[str, Any], run_dir: Path) -> Path:
    """Print the tables and write them to `run_dir/report.md`."""
    console = Console()
    for title, header, rows in tables(metrics):
        table = Table(title=title)
        for column in header:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    path = run_dir / "report.md"
    path.write_text(markdown(run_dir, metrics))
    return path
