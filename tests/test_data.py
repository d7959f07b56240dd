import json
import re

import pytest

from seal.config import DataConfig
from seal.tasks.knowledge import DataError, embedded_corpus, load_json_file, load_passages, seal_split
from tests.conftest import SHARED_DATA

SQUAD = SHARED_DATA / "squad" / "squad_val_seal.json"


def test_embedded_corpus_meets_its_contract():
    corpus = embedded_corpus()
    passages = corpus.train + corpus.eval
    assert len(passages) >= 48 and len(corpus.eval) >= 8
    assert len({p.title for p in passages}) == len(passages)
    raw = json.loads(
        (
            __import__("importlib.resources").resources.files("seal") / "data" / "knowledge_corpus.json"
        ).read_text()
    )
    for p, item in zip(passages, raw["train"] + raw["eval"], strict=True):
        assert 90 <= len(p.context.split()) <= 160, p.title
        assert "2026" in p.context, p.title
        assert len(p.questions) == 5, p.title
        assert sum(q["hops"] == 2 for q in item["questions"]) >= 2, p.title
        for q in p.questions:
            assert q.answer.lower() in p.context.lower(), (p.title, q.answer)
            assert q.answer.lower() not in q.question.lower(), (p.title, q.answer)
            # paraphrased: no run of 6 passage words copied into the question
            words = re.findall(r"\w+", q.question.lower())
            context = " ".join(re.findall(r"\w+", p.context.lower()))
            assert not any(" ".join(words[i : i + 6]) in context for i in range(len(words) - 5)), q.question


def test_embedded_split_is_fixed_and_sized():
    split = load_passages(DataConfig(n_train=3, n_eval=2))
    corpus = embedded_corpus()
    assert split.train == corpus.train[:3] and split.eval == corpus.eval[:2]


def _write(tmp_path, payload, raw=False):
    path = tmp_path / "data.json"
    path.write_text(payload if raw else json.dumps(payload))
    return path


def test_file_loader_reads_seal_format_and_applies_seal_split(tmp_path):
    items = [
        {"title": f"T{i}", "context": f"C{i}", "questions": [{"question": "q?", "answer": "a"}]}
        for i in range(5)
    ]
    path = _write(tmp_path, items)
    split = load_passages(DataConfig(path=str(path), n_eval=2, n_train=2, shuffle_seed=42))
    import random

    expected = list(range(5))
    random.seed(42)
    random.shuffle(expected)
    assert [p.title for p in split.eval] == [f"T{i}" for i in expected[:2]]
    assert [p.title for p in split.train] == [f"T{i}" for i in expected[2:4]]


@pytest.mark.parametrize(
    "payload, message",
    [
        ('[{"title": "A", ', "invalid JSON at line 1"),
        ({"title": "A"}, "expected a JSON list"),
        (
            [{"title": "A", "context": "x", "questions": []}],
            r"passage 0 \('A'\): field 'questions' is missing",
        ),
        (
            [{"title": "A", "context": "x", "questions": [{"question": "q", "answer": " "}]}],
            r"question 0: field 'answer'",
        ),
        ([{"title": "", "context": "x", "questions": []}], "passage 0: field 'title'"),
    ],
)
def test_file_loader_errors_name_file_item_and_field(tmp_path, payload, message):
    path = _write(tmp_path, payload, raw=isinstance(payload, str))
    with pytest.raises(DataError, match=message) as err:
        load_json_file(path)
    assert str(path) in str(err.value)


def test_missing_file_and_unknown_source(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        load_passages(DataConfig(path=str(tmp_path / "nope.json")))
    with pytest.raises(DataError, match="unknown data.source"):
        load_passages(DataConfig(source="ftp"))


def test_hf_source_fails_clearly_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(DataError, match="could not load 'rajpurkar/squad'.*data.path=FILE"):
        load_passages(DataConfig(source="hf"))


@pytest.mark.skipif(not SQUAD.exists(), reason="shared SQuAD data absent")
def test_shared_squad_and_seal_evaluation_subset():
    passages = load_json_file(SQUAD)
    assert len(passages) == 2067 and sum(len(p.questions) for p in passages) == 10570
    split = seal_split(passages, n_eval=200, n_train=50, seed=42)
    assert split.eval[0].title == "Genghis_Khan" or split.eval[0].title.replace("_", " ") == "Genghis Khan"
    assert sum(len(p.questions) for p in split.eval) == 974
    assert not {p.context for p in split.train} & {p.context for p in split.eval}
    # 48 articles: most titles name several paragraphs, each paragraph its own passage with its own name.
    assert len({p.title for p in passages}) == 48 and len({p.name for p in passages}) == 2067
    chloroplast = [p for p in passages if p.title == "Chloroplast"]
    assert [p.name for p in chloroplast[:2]] == ["Chloroplast #1", "Chloroplast #2"]


def test_passages_that_share_a_title_get_names_of_their_own(tmp_path):
    items = [
        {"title": title, "context": f"Passage {i}.", "questions": [{"question": "Q?", "answer": "A"}]}
        for i, title in enumerate(["Tide", "Moon", "Tide", "Tide"])
    ]
    path = tmp_path / "passages.json"
    path.write_text(json.dumps(items))
    assert [p.name for p in load_json_file(path)] == ["Tide #1", "Moon", "Tide #2", "Tide #3"]
    items[1]["title"] = "Tide #2"  # a title that is also the name another passage would get
    path.write_text(json.dumps(items))
    assert [p.name for p in load_json_file(path)] == ["Tide #1", "Tide #2", "Tide #2 (passage 2)", "Tide #3"]
    assert [p.name for p in embedded_corpus().eval] == [p.title for p in embedded_corpus().eval]
