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
