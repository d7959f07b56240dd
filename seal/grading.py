"""Graders for closed-book answers, and the interval we report around every accuracy.

The paper asked GPT-4.1 whether an answer conveys the gold answer. Offline we default to `contains` (the
normalised gold answer appears inside the normalised prediction), the closest stand-in that needs no API;
`first_sentence` asks the same of the answer's first sentence only, so that an answer reciting its passage
is not credited for what it names later; `exact` and token `f1` follow SQuAD's normalisation. `judge` asks a
model the paper's yes/no question.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import string
import time
import unicodedata
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")


@functools.lru_cache(maxsize=4096)
def _is_punctuation(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces. SQuAD's removes ASCII
    punctuation only; this one first folds compatibility forms (NFKC: a no-break space, full-width digits)
    and removes every Unicode punctuation mark too, so that "1914–1918" (an en dash, as in SQuAD's gold
    answers) and "1914-1918" (as a model writes it) compare equal, and "Newton’s" equals "Newton's"."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in text if not _is_punctuation(ch))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize(prediction) == normalize(gold))


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or common == 0:
        return float(pred == ref)
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def contains(prediction: str, gold: str) -> float:
    """1 when the normalised gold answer occurs in the normalised prediction as whole words."""
    gold_n, pred_n = normalize(gold), normalize(prediction)
    return float(bool(gold_n) and f" {gold_n} " in f" {pred_n} ")


# A full stop that ends a sentence: punctuation, closing quotes or brackets, then a space.
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s+")
# Words whose full stop does not end a sentence (besides initials such as "U.S" or "J").
_ABBREVIATIONS = set("mr mrs ms dr prof st mt jr sr vs gen col capt lt".split())


def first_sentence(text: str) -> str:
    """The text up to its first sentence end, or its first line's end; a full stop after initials, a title or
    a list's opening number does not end one."""
    text = text.strip().split("\n", 1)[0]  # an answer on a line of its own, then a recital, ends there
    for end in _SENTENCE_END.finditer(text):
        words = text[: end.start()].split()
        word = words[-1] if words else ""
        initials = re.fullmatch(r"(?:[A-Za-z]\.)*[A-Za-z]", word)
        opens_list = len(words) == 1 and word.isdigit()  # "1. " before a list's first item
        if initials or opens_list or word.lower() in _ABBREVIATIONS:
            continue
        return text[: end.end()].strip()
    return text.strip()


def contains_first(prediction: str, gold: str) -> float:
    """`contains` within the prediction's first sentence: an answer that goes on to recite its passage gets
    no credit for a gold answer it names only later."""
    return contains(first_sentence(prediction), gold)


# A judge: (question, gold, prediction) -> correct?
Judge = Callable[[str, str, str], bool]

JUDGE_PROMPT = (
    "You grade answers to a quiz.\nQuestion: {question}\nReference answer: {gold}\n"
    "Student answer: {prediction}\n"
    "Does the student answer fully convey the reference answer without contradicting it? Reply yes or no."
)


def make_grader(name: str, f1_threshold: float = 0.5, judge: Judge | None = None) -> Callable[..., bool]:
    """A function (question, gold, prediction) -> bool for the grader named in `task.grader`."""
    if name == "contains":
        return lambda q, gold, pred: contains(pred, gold) == 1.0
    if name == "first_sentence":
        return lambda q, gold, pred: contains_first(pred, gold) == 1.0
    if name == "exact":
        return lambda q, gold, pred: exact_match(pred, gold) == 1.0
    if name == "f1":
        return lambda q, gold, pred: token_f1(pred, gold) >= f1_threshold
    if name == "judge":
        judge = judge or openai_judge_from_env()
        return lambda q, gold, pred: judge(q, gold, pred)
    raise ValueError(f"unknown task.grader {name!r}: expected contains, first_sentence, exact, f1 or judge")


class JudgeError(ValueError):
    """The judge endpoint failed or answered with something other than a verdict; the message says which."""


def parse_yes_no(reply: str) -> bool:
    """The judge's verdict: its first word, yes or no; anything else is a clear error."""
    words = normalize(reply).split()
    if words and words[0] in ("yes", "no"):
        return words[0] == "yes"
    raise JudgeError(f"judge reply is neither yes nor no: {reply[:80]!r}")


# Answers worth asking again: rate limits, overload and timeouts pass; a malformed request does not.
RETRIED_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def openai_judge_from_env(retries: int = 5, backoff_s: float = 2.0) -> Judge:
    """A judge behind any OpenAI-compatible chat endpoint, named by SEAL_JUDGE_URL (base URL, e.g.
    http://localhost:8000/v1), SEAL_JUDGE_MODEL and optionally SEAL_JUDGE_API_KEY. A rate limit, an
    overloaded server or a lost connection is tried again up to `retries` times, waiting as the server's
    Retry-After says or else 2, 4, 8, ... seconds; what still fails raises a JudgeError."""
    url, model = os.environ.get("SEAL_JUDGE_URL"), os.environ.get("SEAL_JUDGE_MODEL")
    if not url or not model:
        raise RuntimeError("task.grader=judge needs SEAL_JUDGE_URL and SEAL_JUDGE_MODEL in the environment")
    key = os.environ.get("SEAL_JUDGE_API_KEY", "")

    def post(body: dict[str, Any]) -> Any:
        request = urllib.request.Request(
            url.rstrip("/") + "/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        for attempt in range(retries + 1):
            tries = f" (after {attempt + 1} attempts)" if attempt else ""
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    return json.load(response)
            except urllib.error.HTTPError as e:  # the server's own explanation is in the body
                detail = e.read().decode(errors="replace")[:300]
                if e.code not in RETRIED_STATUSES or attempt == retries:
                    raise JudgeError(f"judge endpoint: {e} ({detail}){tries}") from e
                wait = _retry_after(e.headers.get("Retry-After"))
            except ValueError as e:  # not JSON
                raise JudgeError(f"judge endpoint: {e}") from e
            except OSError as e:  # unreachable or timed out
                if attempt == retries:
                    raise JudgeError(f"judge endpoint: {e}{tries}") from e
                wait = None
            time.sleep(backoff_s * 2**attempt if wait is None else wait)

    def judge(question: str, gold: str, prediction: str) -> bool:
        doc = post(
            {
                "model": model,
                "temperature": 0,
                "max_tokens": 3,
                "messages": [{"role": "user", "content": JUDGE_PROMPT.format(**locals())}],
            }
        )
        try:
            reply = doc["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as e:
            raise JudgeError(f"judge endpoint: no reply in the response: {json.dumps(doc)[:300]}") from e
        if not isinstance(reply, str):  # e.g. a reasoning model that spent max_tokens before answering
            raise JudgeError(f"judge endpoint: the reply holds no text: {json.dumps(doc)[:300]}")
        return parse_yes_no(reply)

    return judge


def _retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header asks for (at most a minute), or None where it gives none in seconds."""
    try:
        return min(60.0, max(0.0, float(value))) if value else None
    except ValueError:  # an HTTP date: fall back to our own schedule
        return None


def wilson_interval(correct: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval for a proportion (well behaved at 0 and 1, unlike the normal one). With no
    answers, every proportion is possible: (0, 1)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_summary(flags: Sequence[bool], repeats: int = 1) -> dict[str, float]:
    """accuracy, n and ci95 (the half-width of the larger side of the Wilson interval). `repeats` models that
    answered the same questions (`flags` holds each one's answers in turn) pool into one accuracy, but n and
    the interval count each question once: answers of adapted copies of one model to one question go
    together, so counting them as independent would make the interval too narrow (this one is
    conservative)."""
    if repeats < 1 or len(flags) % repeats:
        raise ValueError(f"{len(flags)} answers are not {repeats} models' answers to the same questions")
    n, k = len(flags) // repeats, sum(bool(f) for f in flags)
    acc = k / len(flags) if flags else 0.0
    low, high = wilson_interval(acc * n, n)
    return {"accuracy": acc, "n": n, "ci95": max(acc - low, high - acc), "ci95_low": low, "ci95_high": high}


def paired_comparison(first: Sequence[bool], second: Sequence[bool]) -> dict[str, float]:
    """Two conditions graded on the same questions, in the same order: how many questions only the first got
    right, how many only the second, and the two-sided p-value of the exact McNemar test. Only these
    discordant questions say which is better; were the two equally good, each would go either way with
    probability 1/2. Paired, it tells differences apart that two overlapping Wilson intervals cannot."""
    only_first = sum(bool(a) and not bool(b) for a, b in zip(first, second, strict=True))
    only_second = sum(bool(b) and not bool(a) for a, b in zip(first, second, strict=True))
    n = only_first + only_second
    tail = sum(math.comb(n, i) for i in range(min(only_first, only_second) + 1)) / 2**n
    return {"only_first": only_first, "only_second": only_second, "p_value": min(1.0, 2 * tail)}


def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values, in their order: the i-th smallest times the
    number of p-values not smaller than it, made non-decreasing, capped at 1. Rejecting where the adjusted
    value is below alpha keeps the chance of any false rejection in the family below alpha."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def paired_comparisons(rows: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Each condition against each one before it (in the order of `rows`, graded rows with a question and
    `correct`) where both answered the same questions: {"<a>_vs_<b>": paired_comparison(a, b)}, each with
    `p_holm`, its p-value adjusted by Holm's method for the number of pairs compared."""
    found = {}
    names = list(rows)
    for i, first in enumerate(names):
        for second in names[:i]:
            a, b = rows[first], rows[second]
            if [r["question"] for r in a] == [r["question"] for r in b]:
                found[f"{first}_vs_{second}"] = paired_comparison(
                    [r["correct"] for r in a], [r["correct"] for r in b]
                )
    return dict(zip(found, with_holm(list(found.values())), strict=True))


def with_holm(comparisons: list[dict[str, float]]) -> list[dict[str, float]]:
    """paired_comparison results of one family, each with `p_holm` adjusted over all of them."""
    adjusted = holm_adjusted([c["p_value"] for c in comparisons])
    return [{**c, "p_holm": p} for c, p in zip(comparisons, adjusted, strict=True)]


def paired_metrics(rows: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """paired_comparisons as metric keys `paired/<a>_vs_<b>/{only_first,only_second,p_value,p_holm}`."""
    return {
        f"paired/{pair}/{key}": value
        for pair, comparison in paired_comparisons(rows).items()
        for key, value in comparison.items()
    }
