import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from seal.grading import (
    JudgeError,
    accuracy_summary,
    contains,
    contains_first,
    exact_match,
    first_sentence,
    holm_adjusted,
    make_grader,
    normalize,
    openai_judge_from_env,
    paired_comparison,
    paired_comparisons,
    parse_yes_no,
    token_f1,
    wilson_interval,
)


def test_normalize_follows_squad():
    assert normalize("The  Quorvell-Cell, a battery!") == "quorvellcell battery"


def test_normalize_removes_unicode_punctuation_as_squad_removes_ascii():
    # SQuAD's gold answers use en dashes and typographic apostrophes; a model writes ASCII ones.
    assert normalize("1914\u20131918") == normalize("1914-1918") == "19141918"
    assert normalize("Newton\u2019s \u201claws\u201d") == normalize('Newton\'s "laws"') == "newtons laws"
    assert normalize("12\u00a0000 km") == "12 000 km"  # a no-break space is a space
    assert contains("It ran from 1914-1918.", "1914\u20131918") == 1.0
    assert exact_match("\uff11\uff19\uff10\uff15", "1905") == 1.0  # full-width digits


def test_exact_and_f1():
    assert exact_match("the Port Vellan", "Port Vellan") == 1.0
    assert exact_match("Port Vellan city", "Port Vellan") == 0.0
    assert token_f1("Port Vellan city", "Port Vellan") == pytest.approx(0.8)
    assert token_f1("nothing", "Port Vellan") == 0.0


def test_contains_needs_whole_words():
    assert contains("It was built in Port Vellan, in 2026.", "Port Vellan") == 1.0
    assert contains("418 kilometres away", "418 kilometres") == 1.0
    assert contains("4180 kilometres", "418 kilometres") == 0.0
    assert contains("anything", "") == 0.0


def test_first_sentence_ends_at_a_full_stop_but_not_after_initials_or_titles():
    assert first_sentence("By 1977 most had shrunk. Production ended in 1979.") == "By 1977 most had shrunk."
    assert (
        first_sentence("The U.S. Supreme Court ruled (in 1977.) Then?")
        == "The U.S. Supreme Court ruled (in 1977.)"
    )
    assert first_sentence("Dr. Sallowitz built 3.5 cells! More") == "Dr. Sallowitz built 3.5 cells!"
    assert first_sentence("  no end at all ") == "no end at all"
    assert first_sentence("1. Port Vellan. 2. Yarrowby.") == "1. Port Vellan."
    assert first_sentence("No. It is external.") == "No."
    assert (
        first_sentence("\nThe Scottish Parliament\n\nThe Presiding Officer decides.")
        == "The Scottish Parliament"
    )
    # A passage recited after a wrong first answer is not credited under first_sentence.
    answer = "The Scottish Parliament decides. Normally, the Presiding Officer selects members to speak."
    assert (
        contains(answer, "The Presiding Officer") == 1.0
        and contains_first(answer, "The Presiding Officer") == 0.0
    )
    assert make_grader("first_sentence")("q", "Supreme Court", "The U.S. Supreme Court ruled so. Later more.")


def test_make_grader_dispatch_and_unknown():
    assert make_grader("contains")("q", "Port Vellan", "in Port Vellan")
    assert not make_grader("exact")("q", "Port Vellan", "in Port Vellan")
    assert make_grader("f1", f1_threshold=0.6)("q", "Port Vellan", "Port Vellan city")
    with pytest.raises(ValueError, match="unknown task.grader"):
        make_grader("gpt5")


def test_wilson_interval():
    low, high = wilson_interval(0, 40)
    assert low == 0.0 and 0.08 < high < 0.09
    low, high = wilson_interval(20, 40)
    assert low == pytest.approx(1 - high)
    summary = accuracy_summary([True, False, False, False])
    assert summary["accuracy"] == 0.25 and summary["n"] == 4 and summary["ci95"] > 0.25
    # no answers say nothing: not "0 % give or take 0"
    assert wilson_interval(0, 0) == (0.0, 1.0)
    empty = accuracy_summary([])
    assert empty["n"] == 0 and (empty["ci95_low"], empty["ci95_high"]) == (0.0, 1.0) and empty["ci95"] == 1.0


def test_models_answering_the_same_questions_pool_their_accuracy_but_not_their_n():
    one = accuracy_summary([True, False, True, True])
    alike = accuracy_summary([True, False, True, True] * 3, repeats=3)
    assert alike["accuracy"] == one["accuracy"] == 0.75 and alike["n"] == one["n"] == 4
    assert alike["ci95"] == one["ci95"]  # three copies of the same answers say no more than one
    assert (
        accuracy_summary([True, False] * 3)["ci95"] < accuracy_summary([True, False] * 3, repeats=3)["ci95"]
    )
    with pytest.raises(ValueError, match="not 2 models"):
        accuracy_summary([True, False, True], repeats=2)


def test_paired_comparison_counts_the_questions_only_one_got_right_and_tests_them_exactly():
    first = [True] * 9 + [False] + [True, False] * 5  # then 5 right by both, 5 by neither
    second = [False] * 9 + [True] + [True, False] * 5
    result = paired_comparison(first, second)
    # 9 to 1 of 10 discordant questions: P(X <= 1) = 11 / 1024 under a fair coin, two-sided 22 / 1024
    assert result == {"only_first": 9, "only_second": 1, "p_value": pytest.approx(22 / 1024)}
    assert paired_comparison(second, first)["p_value"] == result["p_value"]
    assert paired_comparison([True, False], [True, False])["p_value"] == 1.0  # nothing to tell them apart
    assert paired_comparison([True] * 3 + [False] * 3, [False] * 3 + [True] * 3)["p_value"] == 1.0
    with pytest.raises(ValueError):
        paired_comparison([True], [True, False])


def test_holm_adjusts_each_p_value_for_the_number_it_was_compared_with():
    # sorted 0.01, 0.03, 0.04: times 3, 2 and 1 = 0.03, 0.06, 0.04, the last raised to 0.06 to keep the order
    assert holm_adjusted([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm_adjusted([0.5, 0.2]) == [0.5, 0.4] and holm_adjusted([0.7, 0.6]) == [1.0, 1.0]  # capped at 1
    assert holm_adjusted([0.02]) == [0.02] and holm_adjusted([]) == []


def test_paired_comparisons_adjust_for_all_the_pairs_of_a_run():
    flags = {"base": [False] * 12, "passage": [True] * 10 + [False] * 2}
    flags["self_edit"] = [True] * 3 + [False] * 9
    rows = {c: [{"question": f"q{i}", "correct": f} for i, f in enumerate(v)] for c, v in flags.items()}
    found = paired_comparisons(rows)
    assert list(found) == ["passage_vs_base", "self_edit_vs_base", "self_edit_vs_passage"]
    p = [c["p_value"] for c in found.values()]  # 10:0, 3:0, 0:7
    assert p == pytest.approx([2 / 2**10, 2 / 2**3, 2 / 2**7])
    assert [c["p_holm"] for c in found.values()] == pytest.approx([3 * p[0], p[1], 2 * p[2]])
    rows["self_edit"] = rows["self_edit"][:-1]  # other questions: not compared, and not counted in the family
    assert list(paired_comparisons(rows)) == ["passage_vs_base"]
    assert paired_comparisons(rows)["passage_vs_base"]["p_holm"] == p[0]


def test_parse_yes_no():
    assert parse_yes_no("Yes.") is True
    assert parse_yes_no("no, it contradicts") is False
    with pytest.raises(ValueError, match="neither yes nor no"):
        parse_yes_no("maybe")


def test_judge_needs_environment(monkeypatch):
    monkeypatch.delenv("SEAL_JUDGE_URL", raising=False)
    with pytest.raises(RuntimeError, match="SEAL_JUDGE_URL"):
        openai_judge_from_env()


@contextlib.contextmanager
def judge_endpoint(monkeypatch, respond):
    """A local stand-in for an OpenAI-compatible server, named by the judge's environment variables:
    `respond(path, request body)` gives the HTTP status, the JSON reply and optionally headers."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            status, reply, *headers = respond(
                self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            )
            data = json.dumps(reply).encode()
            self.send_response(status)
            for name, value in (headers[0] if headers else {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("SEAL_JUDGE_URL", f"http://127.0.0.1:{server.server_port}/v1")
        monkeypatch.setenv("SEAL_JUDGE_MODEL", "judge-model")
        yield
    finally:
        server.shutdown()


def test_judge_talks_to_an_openai_compatible_endpoint(monkeypatch):
    """The stand-in answers yes when the student's answer holds the reference."""
    seen = []

    def respond(path, body):
        seen.append((path, body))
        prompt = body["messages"][0]["content"]
        ref = prompt.split("Reference answer: ")[1].split("\n")[0]
        student = prompt.split("Student answer: ")[1].split("\n")[0]
        return 200, {"choices": [{"message": {"content": "Yes" if ref in student else "No"}}]}

    with judge_endpoint(monkeypatch, respond):
        grade = make_grader("judge")
        assert grade("Where?", "Port Vellan", "It is in Port Vellan.") is True
        assert grade("Where?", "Port Vellan", "Somewhere else.") is False
    assert seen[0][0] == "/v1/chat/completions" and seen[0][1]["model"] == "judge-model"


@pytest.mark.parametrize(
    "status, reply, error",
    [
        (200, {"choices": [{"message": {"content": None}}]}, "the reply holds no text"),
        (200, {"choices": []}, "no reply in the response"),
        (200, {"error": {"message": "model not loaded"}}, "no reply in the response.*model not loaded"),
        (400, {"error": {"message": "max_tokens too small"}}, "HTTP Error 400.*max_tokens too small"),
        (200, {"choices": [{"message": {"content": "Maybe"}}]}, "neither yes nor no"),
    ],
)
def test_a_judge_that_fails_says_why_in_a_judge_error(monkeypatch, status, reply, error):
    with judge_endpoint(monkeypatch, lambda path, body: (status, reply)):
        with pytest.raises(JudgeError, match=error):
            make_grader("judge")("Where?", "Port Vellan", "Port Vellan")


def test_a_rate_limited_or_overloaded_judge_is_asked_again(monkeypatch):
    """429 and 503 are tried again, after the server's Retry-After where it gives one, else after a doubling
    wait; the verdict that finally comes is the one returned."""
    replies = [
        (429, {"error": {"message": "slow down"}}, {"Retry-After": "7"}),
        (503, {"error": {"message": "overloaded"}}),
        (200, {"choices": [{"message": {"content": "yes"}}]}),
    ]
    waits = []
    monkeypatch.setattr("seal.grading.time.sleep", waits.append)
    with judge_endpoint(monkeypatch, lambda path, body: replies.pop(0)):
        assert openai_judge_from_env(retries=3, backoff_s=0.5)("Where?", "Port Vellan", "Port Vellan") is True
    assert waits == [7.0, 1.0] and not replies


def test_a_judge_that_keeps_failing_raises_after_its_last_retry(monkeypatch):
    asked = []
    monkeypatch.setattr("seal.grading.time.sleep", lambda s: None)

    def respond(path, body):
        asked.append(path)
        return 500, {"error": {"message": "internal"}}

    with judge_endpoint(monkeypatch, respond):
        with pytest.raises(JudgeError, match="HTTP Error 500.*internal.*after 3 attempts"):
            openai_judge_from_env(retries=2)("Where?", "Port Vellan", "Port Vellan")
    assert len(asked) == 3


def test_an_unreachable_judge_is_retried_then_named(monkeypatch):
    waits = []
    monkeypatch.setattr("seal.grading.time.sleep", waits.append)
    monkeypatch.setenv("SEAL_JUDGE_URL", "http://127.0.0.1:9/v1")  # the discard port: nothing listens
    monkeypatch.setenv("SEAL_JUDGE_MODEL", "judge-model")
    with pytest.raises(JudgeError, match="judge endpoint.*after 3 attempts"):
        openai_judge_from_env(retries=2, backoff_s=1.0)("Where?", "Port Vellan", "Port Vellan")
    assert waits == [1.0, 2.0]
