import pytest

from seal.self_edit import self_edit_prompt, split_items, training_sequences


def test_prompt_fills_title_and_passage():
    assert self_edit_prompt("T={title} P={passage}", "Cell", "Text.") == "T=Cell P=Text."


def test_lines_drop_markers_fragments_and_duplicates():
    text = (
        "Implications:\n1. The cell stores 412 watt-hours per kilogram.\n- It was built in Port Vellan.\n"
        "* It was built in Port Vellan.\n\n2) **Mass production starts in 2027.**\n"
        "3.5 million cells ship in 2028.\n-40 degrees is the lowest it works at.\n"
        "1.1. Sub-numbered items lose their numbers.\n5.A marker needs no space."
    )
    assert split_items(text) == [
        "The cell stores 412 watt-hours per kilogram.",
        "It was built in Port Vellan.",
        "Mass production starts in 2027.",
        "3.5 million cells ship in 2028.",  # a number, not a list marker
        "-40 degrees is the lowest it works at.",
        "Sub-numbered items lose their numbers.",
        "A marker needs no space.",
    ]


def test_qa_pairs_become_one_item_each():
    text = "Question: Who built it?\nAnswer: Tessaline Aerospace\nQuestion: Where?\nAnswer: In Port Vellan."
    assert split_items(text, "qa") == [
        "Question: Who built it?\nAnswer: Tessaline Aerospace",
        "Question: Where?\nAnswer: In Port Vellan.",
    ]
    # Numbered or bulleted pairs, bold heads; a question without an answer and closing chatter left out.
    text = (
        "1. **Question:** Who built it?\nAnswer: Tessaline Aerospace\n2. Question: Unanswered?\n"
        "- Q: Where?\n- A: In Port Vellan.\n\nI hope these questions help you study!"
    )
    assert split_items(text, "qa") == [
        "Question: Who built it?\nAnswer: Tessaline Aerospace",
        "Question: Where?\nAnswer: In Port Vellan.",
    ]
    # A model that ignored the format still gives its lines.
    assert split_items("The probe was built by Tessaline Aerospace.", "qa") == [
        "The probe was built by Tessaline Aerospace."
    ]
    with pytest.raises(ValueError, match="unknown self_edit.split"):
        split_items("x", "words")


def test_qa_pairs_with_an_empty_question_or_answer_are_left_out():
    """An empty answer line teaches nothing: its pair is left out, and the answer neither runs on into the
    next pair nor past a blank line; a blank question is left out too."""
    paris = ["Question: Where?\nAnswer: Paris"]
    assert split_items("Q: What year?\nA:\n\nQ: Where?\nA: Paris", "qa") == paris
    assert split_items("Q: What year?\nA:\nQ: Where?\nA: Paris", "qa") == paris
    assert split_items("Q: What year?\nA:  \n\nQ: Where?\nA: Paris", "qa") == paris
    assert split_items("Q:  \nA: In 1889.\nQ: Where?\nA: Paris", "qa") == paris
    # No pair with an answer: the lines, as for a model that ignored the format.
    assert split_items("Q: When?\nA:\n\nI hope this helps you!", "qa") == ["I hope this helps you!"]
    # An answer that starts on the line after its head is still an answer.
    assert split_items("Q: What year?\nA:\nIn 1889.", "qa") == ["Question: What year?\nAnswer: In 1889."]
    seqs = training_sequences("Tower", "It is tall.", "Q: What year?\nA:\n\nQ: Where?\nA: Paris", "qa")
    assert seqs == ["Tower\nIt is tall.", "Tower\nQuestion: Where?\nAnswer: Paris"]


def test_passage_always_added_and_title_prefixed():
    seqs = training_sequences("Qirra Probe", "The probe flew.", "- It flew far away.\n- It carried a camera.")
    assert seqs == [
        "Qirra Probe\nThe probe flew.",
        "Qirra Probe\nIt flew far away.",
        "Qirra Probe\nIt carried a camera.",
    ]
    assert training_sequences("Qirra Probe", "The probe flew.", None) == ["Qirra Probe\nThe probe flew."]
    with pytest.raises(ValueError, match="no training sequence"):
        training_sequences("Qirra Probe", "The probe flew.", "", include_passage=False)
