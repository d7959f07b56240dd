"""What an update costs: reasoning accuracy and prior knowledge, measured before and after.

SEAL measures only whether a model learnt the new passage. `Probe` also measures, on the same model with or
without an adapter,
  reasoning  the multiple-choice suite of seal/reasoning.py (log-likelihood scoring)
  prior      general-knowledge questions (seal/data/general_knowledge.json) that the model answered right
             before any update, asked again: the share still answered right is `retention/prior_knowledge`
"""

from __future__ import annotations

import importlib.resources
import json
from dataclasses import dataclass
from typing import Any

from seal.adapt import TrainedAdapter, Updater
from seal.config import Config
from seal.grading import accuracy_summary
from seal.models import LM, continuation_logprobs, generate
from seal.reasoning import Item, choice_pairs, judged, load_items, summary

PRIOR_MAX_NEW_TOKENS = 16  # the answers are a word or two


@dataclass(frozen=True)
class Known:
    topic: str
    question: str
    answers: tuple[str, ...]  # any of them counts


def general_knowledge() -> list[Known]:
    doc = json.loads((importlib.resources.files("seal") / "data" / "general_knowledge.json").read_text())
    return [Known(d["topic"], d["question"], tuple(d["answers"])) for d in doc]


class Probe:
    def __init__(self, cfg: Config, lm: LM, grade):
        """`lm`: the model before any update; `grade`: the knowledge task's grader."""
        self.cfg, self.lm, self.grade = cfg, lm, grade
        self.items: list[Item] = load_items(cfg.reasoning)
        self.questions = general_knowledge() if cfg.reasoning.prior_knowledge else []
        self.known: list[Known] = []  # set by `before`: the questions the unchanged model answers right

    def before(self) -> dict[str, Any]:
        """Measure the model before any update; remember which prior-knowledge questions it knows."""
        [result] = self.measure(self.lm)
        [graded] = self._graded(self.lm, self.questions, None, [None])
        self.known = [q for q, ok in zip(self.questions, graded, strict=True) if ok]
        return result

    def measure(
        self,
        lm: LM,
        updater: Updater | None = None,
        adapters: list[TrainedAdapter] | None = None,
        prior: bool = True,
    ) -> list[dict[str, Any]]:
        """Per adapter, applied to `lm` through `updater` (no adapters: `lm` as it is): {"reasoning": [right?]
        per item, "prior": [still right?] per known question (empty when not `prior`)}. All the adapters'
        rows go to one scoring and one generation call, which a batched updater routes row by row."""
        models: list[TrainedAdapter | None] = list(adapters) if adapters else [None]
        size = self.cfg.reasoning.batch_size
        prompts, continuations = choice_pairs(self.items)
        n = len(prompts)
        if adapters:
            rows = [a for a in models for _ in range(n)]
            scores = updater.score(prompts * len(models), continuations * len(models), rows, batch_size=size)
        else:
            scores = continuation_logprobs(lm, prompts, continuations, batch_size=size)
        known = self._graded(lm, self.known if prior else [], updater, models)
        normalize = self.cfg.reasoning.normalize
        return [
            {"reasoning": judged(self.items, scores[k * n : (k + 1) * n], normalize), "prior": known[k]}
            for k in range(len(models))
        ]

    def _graded(
        self,
        lm: LM,
        questions: list[Known],
        updater: Updater | None,
        models: list[TrainedAdapter | None],
    ) -> list[list[bool]]:
        """Per model (an adapter through `updater`, or None for `lm` as it is), whether it answers each of
        `questions` right."""
        if not questions:
            return [[] for _ in models]
        task = self.cfg.task
        prompts = [
            lm.format(task.question_template.format(title=q.topic, question=q.question)) for q in questions
        ]
        kwargs = {"max_new_tokens": PRIOR_MAX_NEW_TOKENS, "batch_size": task.eval_batch_size}
        if all(m is None for m in models):
            answers = generate(lm, prompts, **kwargs)
        else:
            answers = updater.generate(prompts * len(models), [m for m in models for _ in prompts], **kwargs)
        graded = [
            any(self.grade(q.question, gold, a) for gold in q.answers)
            for q, a in zip(questions * len(models), answers, strict=True)
        ]
        return [graded[k * len(questions) : (k + 1) * len(questions)] for k in range(len(models))]

    def reasoning_metrics(self, prefix: str, results: list[dict[str, Any]]) -> dict[str, float]:
        """`prefix`/accuracy, n, ci95 and chance, pooled over the measured models (n: each item once)."""
        flags = [ok for r in results for ok in r["reasoning"]]
        s = summary(self.items, flags, repeats=len(results))
        return {f"{prefix}/{k}": s[k] for k in ("accuracy", "n", "ci95", "chance")}

    def retention_metrics(self, results: list[dict[str, Any]]) -> dict[str, float]:
        """retention/prior_knowledge: the share of the known questions still answered right, pooled over
        the measured adapters, each question counted once in the interval (absent when the model knew none
        of them)."""
        metrics: dict[str, float] = {
            "retention/prior_known": len(self.known),
            "retention/prior_asked": len(self.questions),
        }
        flags = [ok for r in results for ok in r["prior"]]
        if flags:
            s = accuracy_summary(flags, repeats=len(results))
            metrics.update(
                {"retention/prior_knowledge": s["accuracy"], "retention/prior_knowledge_ci95": s["ci95"]}
            )
        return metrics
