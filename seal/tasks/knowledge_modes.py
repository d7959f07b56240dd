"""Knowledge incorporation beyond one update per passage: SEAL's CPT and continual variants (section 4.1).

  cpt        one adapter per condition, trained on the union of all evaluation passages (and their
             self-edits), evaluated on all their questions: does the update still work at scale?
  continual  the passages are edited one after another, each adapter merged into the base weights before
             the next; after every edit all passages are asked again. The retention matrix shows what later
             edits make the model forget.

Both are built from single mode's pieces in seal/tasks/knowledge.py: data, self-edits, training sequences,
answers and grading.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from seal.adapt import UpdateJob, UpdateResult, make_updater
from seal.config import Config
from seal.forgetting import Probe
from seal.grading import make_grader, paired_metrics
from seal.memory import PhaseMeter
from seal.models import LM
from seal.tasks import knowledge
from seal.tasks.knowledge import (
    CONDITIONS,
    DataError,
    Passage,
    answer,
    condition_metrics,
    derive_seed,
    graded_rows,
    load_passages,
    update_job,
    write_self_edits,
)
from seal.tracking import Tracker, throughput_metrics, write_json_atomic

log = logging.getLogger(__name__)
MODES = ("single", "cpt", "continual")


def run(cfg: Config, lm: LM, tracker: Tracker, meter: PhaseMeter) -> dict[str, Any]:
    """The run of `task.mode`; return the summary metrics."""
    runs = {"single": knowledge.run, "cpt": run_cpt, "continual": run_continual}
    mode = cfg.task.mode
    if mode not in runs:
        raise ValueError(f"unknown task.mode {mode!r}: expected one of {list(MODES)}")
    if mode != "single" and cfg.rl.name != "none":
        raise ValueError(
            f"task.mode={mode} runs no outer loop: add rl=none (the presets +experiment={mode} do)"
        )
    if mode != "single" and cfg.self_edit.source != "model":
        raise ValueError(f"task.mode={mode} has the model write its self-edits: needs self_edit.source=model")
    return runs[mode](cfg, lm, tracker, meter)


# ---------------------------------------------------------------- shared pieces


def _passages(cfg: Config) -> list[Passage]:
    unknown = sorted(set(cfg.task.conditions) - set(CONDITIONS))
    if unknown:
        raise ValueError(f"unknown task.conditions {unknown}: expected some of {list(CONDITIONS)}")
    passages = load_passages(cfg.data).eval
    if not passages:
        raise DataError("no evaluation passages (data.n_eval=0 or an empty file)")
    log.info(
        "knowledge (%s): %d evaluation passages, %d questions",
        cfg.task.mode,
        len(passages),
        sum(len(p.questions) for p in passages),
    )
    return passages


def self_edit_seed(cfg: Config, passage: Passage) -> int:
    """Single mode's seed for a passage's self-edit, so the same model writes the same text in every mode."""
    return derive_seed(cfg.seed, "self_edit", 0, passage.name, 0)


def update_metrics(results: list[UpdateResult], meter: PhaseMeter) -> dict[str, Any]:
    """The updates' keys: mean final loss per condition (an update's key is its condition), failed updates,
    and the throughput keys (an inner loop: each update with the evaluation of its adapter; their time: the
    run's update and eval phases, which here also hold the base model's answers and, in continual mode,
    the questions asked again after each edit)."""
    losses: dict[str, list[float]] = {}
    for result in results:
        if result.error is None:
            losses.setdefault(result.key, []).append(result.epoch_losses[-1])
    metrics: dict[str, Any] = {f"adapt/{c}/final_loss": sum(v) / len(v) for c, v in losses.items()}
    metrics["adapt/failed_updates"] = sum(r.error is not None for r in results)
    seconds = meter.seconds["update"] + meter.seconds["eval"]
    return metrics | throughput_metrics(
        sum(r.tokens for r in results), len(results), meter.seconds["update"], seconds
    )


# ---------------------------------------------------------------- cpt


def run_cpt(cfg: Config, lm: LM, tracker: Tracker, meter: PhaseMeter) -> dict[str, Any]:
    """Conditions as in single mode, but `passage` is one adapter trained on every passage's text and
    `self_edit` one adapter on every passage and its self-edit. Both train together and are evaluated in
    one generation call."""
    conditions = list(cfg.task.conditions)
    passages = _passages(cfg)
    grade = make_grader(cfg.task.grader, cfg.task.f1_threshold)
    rows: dict[str, list[dict[str, Any]]] = {c: [] for c in conditions}

    if "base" in conditions:
        with meter.phase("eval"):
            for passage, answers in zip(
                passages, answer(lm, cfg.task, passages, "base answers"), strict=True
            ):
                rows["base"] += graded_rows("base", passage, answers, grade)

    edits: list[str | None] = [None] * len(passages)
    if "self_edit" in conditions:
        with meter.phase("generate"):
            edits = write_self_edits(lm, cfg.self_edit, passages, [self_edit_seed(cfg, p) for p in passages])
        tracker.results(
            "self_edits",
            [
                {"title": p.title, "passage": p.name, "self_edit": e}
                for p, e in zip(passages, edits, strict=True)
            ],
        )

    metrics: dict[str, Any] = {}
    updated = [c for c in conditions if c != "base"]
    if updated:
        updater = make_updater(lm, cfg.adapt)
        # Each passage contributes the sequences its single-mode update would train on.
        jobs = [
            UpdateJob(
                key=condition,
                sequences=[
                    s
                    for passage, edit in zip(passages, edits, strict=True)
                    for s in update_job(cfg, passage, edit, condition).sequences
                ],
                seed=derive_seed(cfg.seed, "adapter", "cpt", condition),
            )
            for condition in updated
        ]
        with meter.phase("update"):
            adapters = updater.train(jobs, progress=f"cpt updates ({len(passages)} passages)")
        trained = [a for a in adapters if a.result.error is None]
        flat: list[list[str]] = []
        if trained:
            with meter.phase("eval"):
                flat = answer(
                    lm,
                    cfg.task,
                    passages * len(trained),
                    desc="cpt answers",
                    updater=updater,
                    adapters=[a for a in trained for _ in passages],
                )
        at = 0  # where the next trained adapter's answers start in `flat`
        for condition, adapter in zip(updated, adapters, strict=True):
            if adapter.result.error:
                log.warning("cpt update %s failed: %s", condition, adapter.result.error)
                answers: list[list[str] | None] = [None] * len(passages)
            else:
                answers, at = flat[at : at + len(passages)], at + len(passages)
            for passage, answered in zip(passages, answers, strict=True):
                rows[condition] += graded_rows(condition, passage, answered, grade, adapter.result.error)
        metrics.update(update_metrics([a.result for a in adapters], meter))
        metrics.update({f"cpt/{job.key}/train_sequences": len(job.sequences) for job in jobs})
    for condition in conditions:
        tracker.results(condition, rows[condition])
        metrics.update(condition_metrics(condition, rows[condition]))
    metrics.update(paired_metrics(rows))
    return metrics


# ---------------------------------------------------------------- continual


def run_continual(cfg: Config, lm: LM, tracker: Tracker, meter: PhaseMeter) -> dict[str, Any]:
    """Edit the passages in order with one condition, `self_edit` when task.conditions has it, else
    `passage`; each update is single mode's update of that passage, trained on the model as it is after
    the earlier merges. With `self_edit`, each self-edit is written by that same current model, as a
    deployed self-adapting model would write it. Before any edit and after each, every passage's questions
    are answered by the model alone. The reasoning probe and the prior-knowledge questions measure the model
    before the first edit and after the last.

    Records: results/retention.json (the matrix and its summary), results/continual.jsonl (every graded
    question, with `after_edits`), results/self_edits.jsonl, retention.png, and results/base.jsonl with the
    `knowledge/base/*` keys when `base` is a condition (row 0 of the matrix). `knowledge/continual/*` is
    the final model on all questions."""
    conditions = list(cfg.task.conditions)
    passages = _passages(cfg)
    updated = [c for c in CONDITIONS if c != "base" and c in conditions]
    if not updated:
        raise ValueError("task.mode=continual needs passage or self_edit in task.conditions")
    condition = updated[-1]
    if len(updated) > 1:
        log.info("continual: editing with %s only (%s is not run in this mode)", condition, updated[0])
    grade = make_grader(cfg.task.grader, cfg.task.f1_threshold)
    probe = Probe(cfg, lm, grade) if cfg.reasoning.source != "none" else None
    if probe:
        with meter.phase("reasoning"):
            before = probe.before()
    updater = make_updater(lm, cfg.adapt)
    matrix: list[list[float]] = []
    rows: list[dict[str, Any]] = []

    def evaluate(edits_done: int) -> None:
        with meter.phase("eval"):
            answers = answer(lm, cfg.task, passages, f"answers after {edits_done} edits")
        name = condition if edits_done else "base"
        graded = [graded_rows(name, p, a, grade) for p, a in zip(passages, answers, strict=True)]
        matrix.append([sum(r["correct"] for r in g) / len(g) for g in graded])
        flat = [{**r, "after_edits": edits_done} for g in graded for r in g]
        rows.extend(flat)
        tracker.log(
            {
                "continual/after_edits": edits_done,
                "continual/accuracy": sum(r["correct"] for r in flat) / len(flat),
                "continual/first_passage_accuracy": matrix[-1][0],
            }
        )

    evaluate(0)
    edits: list[dict[str, Any]] = []
    results: list[UpdateResult] = []  # the adapters' weights are dropped once merged
    for k, passage in enumerate(passages):
        edit = None
        if condition == "self_edit":
            with meter.phase("generate"):
                [edit] = write_self_edits(lm, cfg.self_edit, [passage], [self_edit_seed(cfg, passage)])
            edits.append(
                {"title": passage.title, "passage": passage.name, "after_edits": k, "self_edit": edit}
            )
        with meter.phase("update"):
            [adapter] = updater.train(
                [update_job(cfg, passage, edit, condition)], progress=f"edit {k + 1}/{len(passages)}"
            )
            if adapter.result.error is None:
                updater.merge(adapter)
            else:
                log.warning(
                    "edit %d (%r) failed, model unchanged: %s", k + 1, passage.name, adapter.result.error
                )
        results.append(adapter.result)
        evaluate(k + 1)

    if edits:
        tracker.results("self_edits", edits)
    tracker.results("continual", rows)
    metrics: dict[str, Any] = {}
    final = {"continual": [r for r in rows if r["after_edits"] == len(passages)]}
    if "base" in conditions:
        final = {"base": [r for r in rows if r["after_edits"] == 0], **final}
        tracker.results("base", final["base"])
    for name, final_rows in final.items():
        metrics.update(condition_metrics(name, final_rows))
    metrics.update(paired_metrics(final))
    metrics.update(update_metrics(results, meter))
    summary = retention_summary(matrix)
    metrics.update({f"retention/{key}": value for key, value in summary.items()})
    if probe:  # after_update: after the whole sequence of merged edits
        with meter.phase("reasoning"):
            after = probe.measure(lm)
        metrics.update(probe.reasoning_metrics("reasoning/before", [before]))
        metrics.update(probe.reasoning_metrics("reasoning/after_update", after))
        metrics["reasoning/forgetting"] = (
            metrics["reasoning/before/accuracy"] - metrics["reasoning/after_update/accuracy"]
        )
        metrics.update(probe.retention_metrics(after))
    write_json_atomic(
        tracker.run_dir / "results" / "retention.json",
        {
            "condition": condition,
            "titles": [p.title for p in passages],
            "passages": [p.name for p in passages],
            "questions": [len(p.questions) for p in passages],
            # accuracy[r][i]: share of passage i's questions answered correctly after the first r edits.
            "accuracy": matrix,
            "update_errors": [r.error for r in results],
            **summary,
        },
    )
    png = draw_retention(matrix, [p.name for p in passages], condition, tracker.run_dir / "retention.png")
    if tracker.wandb_run is not None:
        import wandb

        # Logged at the step of the run's final metrics row, so both land in one history row.
        tracker.wandb_run.log({"retention/heatmap": wandb.Image(str(png))}, step=tracker.step)
    return metrics


def retention_summary(matrix: list[list[float]]) -> dict[str, float]:
    """Figures of a retention matrix R of n + 1 rows and n columns: R[r][i] is the accuracy on passage i
    after the first r edits (row 0: before any edit), and the r-th edit is of passage r - 1.

      first_after_last  R[n][0]: the first passage after all n edits.
      just_edited       the mean over i of R[i + 1][i]: each passage right after its own edit.
      mean_previous     for each edit r >= 2, the mean of R[r][i] over the passages i < r - 1 edited before
                        it; then the mean over those edits. Only when n >= 2 (otherwise no passage comes
                        before an edit)."""
    n = len(matrix) - 1
    if n < 1 or any(len(row) != n for row in matrix):
        raise ValueError(f"a retention matrix has n + 1 rows of n entries, n >= 1; got {len(matrix)} rows")
    summary = {
        "first_after_last": matrix[n][0],
        "just_edited": sum(matrix[i + 1][i] for i in range(n)) / n,
    }
    if n >= 2:
        previous = [sum(matrix[r][: r - 1]) / (r - 1) for r in range(2, n + 1)]
        summary["mean_previous"] = sum(previous) / len(previous)
    return summary


def draw_retention(matrix: list[list[float]], names: list[str], condition: str, path: Path) -> Path:
    """The retention matrix as an annotated heatmap PNG (matplotlib's Agg canvas, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(names)
    fig = Figure(figsize=(2.5 + 0.7 * n, 1.5 + 0.5 * (n + 1)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for r, row in enumerate(matrix):
        for i, value in enumerate(row):
            ax.text(i, r, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.6 else "k")
    labels = [f"{i}: {t if len(t) <= 20 else t[:19] + '…'}" for i, t in enumerate(names)]
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n + 1))
    ax.set_xlabel("passage (in edit order)")
    ax.set_ylabel("edits merged")
    ax.set_title(f"Retention ({condition}): accuracy per passage")
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.savefig(path, dpi=100)
    return path
