"""Self-edits: the prompt that asks the model for one, and the parse that turns it into training data.

In the knowledge task a self-edit is free text about a passage. As in the paper, every item of it becomes its
own training sequence, prefixed with the passage title, and the passage itself is always added.
"""

from __future__ import annotations

import re

# Bullets, numbers ("1.", "2)") and headings that start a list item; not the start of a number ("3.5 million",
# "-40 degrees").
_ITEM_MARKER = re.compile(r"^\s*(?:[-*\u2022]+(?!\d)|\(?\d{1,3}(?:\.\d{1,3})*[.)](?!\d)|#+)\s*")
# A question or answer line's head: an optional bullet or number, optional bold, "Q"/"Question" (or "A"/
# "Answer"), an optional number, then ":" or ".".
_BULLET = r"[ \t]*(?:(?:[-*\u2022]|\(?\d{1,3}[.)])[ \t]+)?(?:\*\*)?"
_Q_HEAD = _BULLET + r"(?:Q|Question)[ \t]*\d*[ \t]*[:.](?:\*\*)?[ \t]*"
_A_HEAD = _BULLET + r"(?:A|Answer)[ \t]*\d*[ \t]*[:.](?:\*\*)?[ \t]*"
# A pair: a one-line question, its answer up to the next question, a blank line or the end. The answer
# crosses neither: after an empty answer line it is not the next pair, nor what follows a blank line. Both
# are stripped after the match: trailing blanks matched here would make a long run of them quadratic.
_END = rf"\n{_Q_HEAD}|\n[ \t]*\n"
_QA = re.compile(
    rf"(?:^|\n){_Q_HEAD}(?P<q>[^\n]+)\n{_A_HEAD}(?P<a>(?:(?!{_END}).)+?)(?={_END}|\Z)",
    re.IGNORECASE | re.DOTALL,
)
MIN_ITEM_WORDS = 3  # shorter lines are headings or fragments ("Implications:") and teach nothing


def self_edit_prompt(template: str, title: str, passage: str) -> str:
    """The instruction given to the model (before any chat formatting)."""
    return template.format(title=title, passage=passage)


def split_items(text: str, split: str = "lines") -> list[str]:
    """The items of a self-edit: its lines (list markers removed; lines under MIN_ITEM_WORDS words dropped) or
    its question-answer pairs (those with an empty question or answer left out: nothing to learn)."""
    if split == "qa":
        found = [(m["q"].strip(), m["a"].strip()) for m in _QA.finditer(text)]
        pairs = [f"Question: {q}\nAnswer: {a}" for q, a in found if q and a]
        if pairs:
            return _unique(pairs)
        # A model that ignored the format still wrote something: fall back to its lines.
    elif split != "lines":
        raise ValueError(f"unknown self_edit.split {split!r}: expected 'lines' or 'qa'")
    items = []
    for line in text.splitlines():
        item = _ITEM_MARKER.sub("", line).strip().strip("*").strip()
        if len(item.split()) >= MIN_ITEM_WORDS:
            items.append(item)
    return _unique(items)


def training_sequences(
    title: str, passage: str, self_edit: str | None, split: str = "lines", include_passage: bool = True
) -> list[str]:
    """Training sequences of one update: the passage (always, unless disabled) then one per self-edit item."""
    sequences = [f"{title}\n{passage}"] if include_passage else []
    if self_edit:
        sequences += [f"{title}\n{item}" for item in split_items(self_edit, split)]
    if not sequences:
        raise ValueError(
            f"no training sequence for passage {title!r}: empty self-edit and include_passage=false"
        )
    return sequences


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
