"""ReST-EM on the tiny real model: selection, the generator's SFT and merge, the rounds on disk, and
resuming a run killed with SIGKILL in the middle of round 2."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from omegaconf import OmegaConf

from seal import multilora, rl
from seal.adapt import collate
from seal.config import AdaptConfig, RewardConfig, RLConfig, SFTConfig
from seal.executor import LocalExecutor, WorkerLost
from seal.grading import make_grader
from seal.models import continuation_logprobs
from seal.multilora import MultiLoraUpdater
from seal.regrade import regrade_run
from seal.rl import apply_adapter, copy_base_weights, select, sft_merge
from seal.tasks import knowledge
from seal.tasks.knowledge import DataError, embedded_corpus
from seal.train import check_resume, train
from tests.conftest import CACHE_DIR, TINY_OVERRIDES, load_tiny, make_cfg

ROOT = Path(__file__).resolve().parents[1]
TINY = tuple(o for o in TINY_OVERRIDES if not o.startswith("rl="))
RL_OVERRIDES = (
    "rl=rest_em",
    "rl.rounds=2",
    "rl.passages_per_round=2",
    "rl.samples=3",
    "rl.sft.epochs=1",
    "data.n_train=4",
    "adapt.max_adapters=1",  # chunks of 4 inner loops: round 2's rewards take two chunks
)


def test_select_keeps_the_first_best_sample_above_zero_and_reports_the_spread():
    rewards = [[0.2, 0.6, 0.6], [0.0, 0.0, 0.0], [0.4, 0.2, 0.0]]
    chosen = select(rewards, None, RLConfig(name="rest_em"))
    assert chosen.kept == [1, None, 0]  # a tie goes to the first; all-zero rewards keep nothing
    d = chosen.diagnostics
    assert d["acceptance_rate"] == pytest.approx(2 / 3)
    assert d["all_tied_share"] == pytest.approx(1 / 3)
    assert d["reward_spread_mean"] == pytest.approx((0.4 + 0.0 + 0.4) / 3)
    assert d["reward_mean"] == pytest.approx(2.0 / 9)
    margin = RLConfig(name="rest_em", accept_margin=0.3)
    assert select(rewards, [0.2, 0.0, 0.2], margin).kept == [1, None, None]  # 0.4 - 0.2 < 0.3
    gain = RLConfig(name="rest_em", accept_margin=0.3, reward=RewardConfig(kind="gain"))
    assert select(rewards, [0.2, 0.0, 0.2], gain).kept == [1, None, 0]  # gains are compared as they are


def test_select_breaks_ties_by_the_likelihood_it_is_given():
    rewards = [[0.2, 0.6, 0.6], [0.4, 0.2, 0.0], [0.0, 0.0, 0.0]]
    likelihoods = [[-1.0, -3.0, -2.0], [-5.0, -1.0, -1.0], [-1.0, -2.0, -3.0]]
    rl_cfg = RLConfig(name="rest_em")
    assert select(rewards, None, rl_cfg).kept == [1, 0, None]
    chosen = select(rewards, None, rl_cfg, likelihoods=likelihoods)
    # Only equal rewards consult the likelihood; nothing is accepted at reward 0 however likely.
    assert chosen.kept == [2, 0, None]
    assert chosen.diagnostics["best_tied_share"] == pytest.approx(2 / 3)  # items 1 and 3
    eligible = [[True, True, False], [True, True, True], [True, True, True]]
    assert select(rewards, None, rl_cfg, eligible, likelihoods).kept == [1, 0, None]


def _completion_nll(lm, prompt: str, completion: str) -> float:
    tok = lm.tokenizer
    head = tok(prompt, add_special_tokens=False)["input_ids"]
    tail = tok(completion + tok.eos_token, add_special_tokens=False)["input_ids"]
    ids, mask = collate([head + tail], lm)
    labels = ids.clone()
    labels[0, : len(head)] = -100
    with torch.no_grad():
        return lm.model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()


def test_sft_merge_learns_the_completion_and_a_saved_adapter_merges_to_the_same_weights(monkeypatch):
    generator, replay = load_tiny(), load_tiny()
    released = []  # whether the adapter was merged when the SFT's freed memory went back to the system
    monkeypatch.setattr(
        rl.allocator,
        "release_free_memory",
        lambda: released.append(not any("lora_" in n for n, _ in generator.model.named_parameters())),
    )
    examples = [
        ("Write about the Corvane cell.\n", "The Corvane cell stores sodium."),
        ("Say hi.\n", "hi there"),
    ]
    before = _completion_nll(generator, *examples[0])
    cfg = SFTConfig(rank=8, alpha=16, lr=1e-2, epochs=8, batch_size=2)
    state, loss = sft_merge(generator, examples, cfg, seed=3)
    assert torch.isfinite(torch.tensor(loss)) and len(state) == 2 * 2 * 7  # 2 layers x 7 projections x A, B
    assert _completion_nll(generator, *examples[0]) < before - 0.5
    assert not any("lora_" in n for n, _ in generator.model.named_parameters())  # merged, unwrapped
    assert released == [True]
    apply_adapter(replay, state, cfg)
    for (name, a), (_, b) in zip(
        generator.model.named_parameters(), replay.model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name


def test_gradient_checkpointing_recomputes_the_layers_and_trains_the_same_adapter_bit_for_bit():
    examples = [
        ("Write about the Corvane cell.\n", "The Corvane cell stores sodium in its outer ring."),
        ("Say hi.\n", "hi there"),
        ("Name a colour.\n", "teal"),
    ]
    results = {}
    for checkpointing in (False, True):
        generator = load_tiny()
        calls = []
        attention = generator.model.model.layers[
            0
        ].self_attn  # at a layer's start: the recompute may stop early
        attention.register_forward_pre_hook(lambda *_, seen=calls: seen.append(1))
        cfg = SFTConfig(
            rank=8, alpha=16, lr=1e-2, epochs=2, batch_size=2, gradient_checkpointing=checkpointing
        )
        _, state, loss = rl.sft_train(generator, examples, cfg, seed=3)
        results[checkpointing] = state, loss, len(calls)
        # off again for whatever uses the model next: no checkpointing, no hook on the embeddings
        assert not generator.model.is_activation_checkpointing
        assert not generator.model.model.embed_tokens._forward_hooks
    (plain, plain_loss, plain_calls), (saved, saved_loss, saved_calls) = results[False], results[True]
    assert (plain_calls, saved_calls) == (4, 8)  # 2 epochs x 2 batches; each layer run again in the backward
    assert saved_loss == plain_loss and plain.keys() == saved.keys()
    assert all(torch.equal(plain[k], saved[k]) for k in plain)


def test_copy_base_weights_reaches_the_layers_wrapped_for_the_inner_loop():
    source, target = load_tiny(seed=1), load_tiny(seed=2)
    MultiLoraUpdater(target, AdaptConfig(rank=4, alpha=8), capacity=2)
    copy_base_weights(target.model, source.model)
    layer = target.model.model.layers[1].self_attn.q_proj
    assert torch.equal(layer.base_layer.weight, source.model.model.layers[1].self_attn.q_proj.weight)
    assert torch.equal(target.model.lm_head.weight, source.model.lm_head.weight)


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rl")
    return run_dir, train(make_cfg(run_dir, *TINY, *RL_OVERRIDES))


def test_rest_em_run_writes_the_curve_the_seal_condition_and_the_rounds(rl_run):
    run_dir, metrics = rl_run
    assert metrics["rl/round_0/eval_accuracy"] == metrics["knowledge/self_edit/accuracy"]
    assert metrics["knowledge/seal/accuracy"] == metrics["rl/round_2/eval_accuracy"]
    assert metrics["knowledge/seal/n"] == metrics["knowledge/self_edit/n"] == 10
    for k in (1, 2):
        for name in ("reward_mean", "reward_std", "reward_spread_mean", "all_tied_share", "acceptance_rate"):
            assert 0 <= metrics[f"rl/round_{k}/{name}"] <= 1, name
        assert metrics[f"rl/round_{k}/self_edit_tokens_mean"] > 0
        rewards = json.loads((run_dir / f"rounds/round_{k}/rewards.json").read_text())
        assert len(rewards) == 2 * 3
        assert metrics[f"rl/round_{k}/reward_mean"] == pytest.approx(sum(r["reward"] for r in rewards) / 6)
        kept = sum(r["kept"] for r in rewards)
        sft = json.loads((run_dir / f"rounds/round_{k}/sft_data.json").read_text())
        assert len(sft) == kept == round(2 * metrics[f"rl/round_{k}/acceptance_rate"])
        assert (run_dir / f"rounds/round_{k}/generator_adapter.safetensors").exists() == (kept > 0)
        assert json.loads((run_dir / f"rounds/round_{k}/state.json").read_text())["round"] == k
    # Round 2 trains on passages that round 1 did not see.
    titles = [
        {r["title"] for r in json.loads((run_dir / f"rounds/round_{k}/rewards.json").read_text())}
        for k in (1, 2)
    ]
    assert not titles[0] & titles[1]
    assert (run_dir / "rounds/latest").read_text().strip() == "round_2"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = {r["rl/round"]: r["rl/eval_accuracy"] for r in rows if "rl/round" in r}
    assert curve == {k: metrics[f"rl/round_{k}/eval_accuracy"] for k in (0, 1, 2)}
    seal_rows = [json.loads(line) for line in (run_dir / "results/seal.jsonl").read_text().splitlines()]
    assert sum(r["correct"] for r in seal_rows) / len(seal_rows) == metrics["knowledge/seal/accuracy"]


def test_the_rl_curve_graded_again_by_the_run_s_own_grader_is_the_run_s(rl_run):
    """`python -m seal.regrade` reads what a real ReST-EM run wrote for each round's evaluation."""
    run_dir, metrics = rl_run
    graded = regrade_run(run_dir, make_grader("contains"), "contains")
    assert list(graded["rounds"]) == ["0", "1", "2"]
    for k, round_ in graded["rounds"].items():
        assert (round_["accuracy"], round_["n"], round_["changed"]) == (
            metrics[f"rl/round_{k}/eval_accuracy"],
            10,
            0,
        )


def test_failed_inner_loops_score_zero_with_their_reason_and_the_round_goes_on(tmp_path, monkeypatch):
    real = multilora.token_losses
    monkeypatch.setattr(multilora, "token_losses", lambda *a, **k: real(*a, **k) * float("nan"))
    metrics = train(make_cfg(tmp_path, *TINY, *RL_OVERRIDES, "rl.rounds=1", "task.conditions=[self_edit]"))
    assert metrics["rl/round_1/failed_inner_loops"] == 2 * 3
    assert metrics["rl/round_1/acceptance_rate"] == 0 and "rl/round_1/sft_loss" not in metrics
    assert not (tmp_path / "rounds/round_1/generator_adapter.safetensors").exists()
    rewards = json.loads((tmp_path / "rounds/round_1/rewards.json").read_text())
    assert all(r["reward"] == 0 and "non-finite loss" in r["errors"][0] for r in rewards)
    assert metrics["knowledge/seal/accuracy"] == 0 and metrics["rl/round_1/eval_accuracy"] == 0


def test_asking_for_more_training_passages_than_the_split_holds_is_said_in_the_log(tmp_path, caplog):
    overrides = ("rl.rounds=1", "rl.samples=1", "data.n_train=1", "task.conditions=[self_edit]")
    train(make_cfg(tmp_path, *TINY, *RL_OVERRIDES, *overrides))
    rewards = json.loads((tmp_path / "rounds/round_1/rewards.json").read_text())
    assert len(rewards) == 1  # rl.passages_per_round=2, but the split holds one training passage
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    (warning,) = [w for w in warnings if w.startswith("rl asks")]
    assert "2 training passages (1 rounds x rl.passages_per_round=2) and has 1" in warning
    assert "each round trains on 1" in warning and "data.n_train=2" in warning


def test_gain_reward_runs_the_passage_baseline_and_subtracts_it(tmp_path, monkeypatch):
    # The tiny model answers nothing right; a grader that accepts every third answer gives rewards to select.
    calls = []
    monkeypatch.setattr(
        knowledge, "make_grader", lambda *a: lambda q, g, p: calls.append(1) or len(calls) % 3 == 0
    )
    metrics = train(make_cfg(tmp_path, *TINY, *RL_OVERRIDES, "rl.rounds=1", "+experiment=rl_gain"))
    rewards = json.loads((tmp_path / "rounds/round_1/rewards.json").read_text())
    chunks = [json.loads(p.read_text()) for p in sorted((tmp_path / "rounds/round_1/train").glob("chunk_*"))]
    outcomes = [o for c in chunks for o in c["outcomes"]]
    assert sum(o["condition"] == "passage" for o in outcomes) == 2  # one baseline per training passage
    assert 0 <= metrics["rl/round_1/passage_baseline_mean"] <= 1
    assert metrics["rl/round_1/reward_mean"] == pytest.approx(
        sum(r["reward"] for r in rewards) / len(rewards)
    )
    assert all(r["kept"] <= (r["reward"] > 0) for r in rewards)  # only positive gains are kept
    assert any(r["reward"] < 0 for r in rewards) or any(r["reward"] > 0 for r in rewards)


def test_select_never_keeps_a_sample_the_forgetting_guard_rejected():
    rewards = [[0.2, 0.6, 0.6], [0.4, 0.2, 0.0]]
    eligible = [[True, False, True], [False, False, False]]
    chosen = select(rewards, None, RLConfig(name="rest_em"), eligible)
    assert chosen.kept == [2, None] and chosen.diagnostics["rejected_for_forgetting"] == 4


def _forgetting_run(tmp_path, monkeypatch, *overrides):
    calls = []  # a grader that accepts every third answer, so that rewards differ
    monkeypatch.setattr(
        knowledge, "make_grader", lambda *a: lambda q, g, p: calls.append(1) or len(calls) % 3 == 0
    )
    metrics = train(make_cfg(tmp_path, *TINY, *RL_OVERRIDES, "rl.rounds=1", *overrides))
    rewards = json.loads((tmp_path / "rounds/round_1/rewards.json").read_text())
    chunks = [json.loads(p.read_text()) for p in sorted((tmp_path / "rounds/round_1/train").glob("chunk_*"))]
    return metrics, rewards, [o for c in chunks for o in c["outcomes"]]


def test_scored_answers_break_reward_ties_and_report_each_models_gold_answer_likelihood(
    tmp_path, monkeypatch
):
    # A grader that accepts every answer: every sample of a passage earns reward 1, and the tie-break chooses.
    monkeypatch.setattr(knowledge, "make_grader", lambda *a: lambda q, g, p: True)
    scored = ("task.score_answers=true", "rl.rounds=1")
    with pytest.raises(ValueError, match="needs task.score_answers=true"):
        train(make_cfg(tmp_path, *TINY, *RL_OVERRIDES, "rl.rounds=1", "rl.reward.tie_break=answer_logprob"))
    with pytest.raises(ValueError, match="task=knowledge task.mode=cpt runs with task.score_answers=False"):
        train(make_cfg(tmp_path, *TINY_OVERRIDES, "task.mode=cpt", "task.score_answers=true"))
    with pytest.raises(
        ValueError, match="task=few_shot task.mode=single runs with rl.reward.tie_break=first"
    ):
        train(make_cfg(tmp_path, *TINY_OVERRIDES, "task=few_shot", "rl.reward.tie_break=answer_logprob"))
    metrics = train(make_cfg(tmp_path, *TINY, *RL_OVERRIDES, *scored, "rl.reward.tie_break=answer_logprob"))
    rewards = json.loads((tmp_path / "rounds/round_1/rewards.json").read_text())
    assert [r["sample"] for r in rewards if r["kept"]] != [0, 0]  # not what breaking ties by order keeps
    for name in {r["passage"] for r in rewards}:
        samples = [r for r in rewards if r["passage"] == name]
        assert {r["reward"] for r in samples} == {1.0}
        [kept] = [r for r in samples if r["kept"]]
        assert kept["answer_logprob"] == max(r["answer_logprob"] for r in samples)
    assert metrics["rl/round_1/best_tied_share"] == 1.0
    assert metrics["rl/round_1/answer_logprob_mean"] == pytest.approx(
        sum(r["answer_logprob"] for r in rewards) / len(rewards)
    )
    # Each row's score is its gold answer's mean log-probability per token under that row's model.
    lm, cfg = load_tiny(), OmegaConf.to_object(make_cfg(tmp_path, *TINY))
    passage = embedded_corpus().eval[0]
    prompts = knowledge.question_prompts(lm, cfg.task, passage)
    expected = [s / n for s, n in continuation_logprobs(lm, prompts, [q.answer for q in passage.questions])]
    base = [json.loads(line) for line in (tmp_path / "results/base.jsonl").read_text().splitlines()]
    assert [r["answer_logprob"] for r in base[: len(expected)]] == pytest.approx(expected, abs=1e-5)
    for condition in ("base", "passage", "self_edit", "seal"):
        rows = [
            json.loads(line) for line in (tmp_path / f"results/{condition}.jsonl").read_text().splitlines()
        ]
        assert metrics[f"knowledge/{condition}/answer_logprob"] == pytest.approx(
            sum(r["answer_logprob"] for r in rows) / len(rows)
        )
    assert len({metrics[f"knowledge/{c}/answer_logprob"] for c in ("base", "passage", "self_edit")}) == 3
    assert metrics["rl/round_1/eval_answer_logprob"] == metrics["knowledge/seal/answer_logprob"]
    assert "gold answer log-prob/token" in (tmp_path / "report.md").read_text()

    # The same run breaking ties by order keeps every passage's first sample.
    first = tmp_path / "first"
    train(make_cfg(first, *TINY, *RL_OVERRIDES, *scored))
    rewards = json.loads((first / "rounds/round_1/rewards.json").read_text())
    assert [r["sample"] for r in rewards if r["kept"]] == [0, 0]


def test_passages_that_share_a_title_are_rewarded_and_cached_apart(tmp_path):
    # SQuAD's paragraphs of one article share its title: here all four passages (2 to evaluate, 2 to train).
    corpus = embedded_corpus()
    items = [
        {
            "title": "Shared",
            "context": p.context,
            "questions": [{"question": q.question, "answer": q.answer} for q in p.questions],
        }
        for p in corpus.eval[:2] + corpus.train[:2]
    ]
    data = tmp_path / "shared.json"
    data.write_text(json.dumps(items))
    run_dir = tmp_path / "run"
    overrides = (*RL_OVERRIDES, f"data.path={data}", "data.n_eval=2", "data.n_train=2", "rl.rounds=1")
    train(make_cfg(run_dir, *TINY, *overrides, "task.score_answers=true"))
    rewards = json.loads((run_dir / "rounds/round_1/rewards.json").read_text())
    names = sorted({r["passage"] for r in rewards})
    assert {r["title"] for r in rewards} == {"Shared"} and len(names) == 2
    assert all(name.startswith("Shared #") for name in names)
    scores = [[r["answer_logprob"] for r in rewards if r["passage"] == name] for name in names]
    assert scores[0] != scores[1]  # each passage's rewards come from its own inner loops
    chunks = [json.loads(p.read_text()) for p in sorted((run_dir / "rounds/round_1/train").glob("chunk_*"))]
    keys = [tuple(o["key"]) for c in chunks for o in c["outcomes"]]
    assert len(set(keys)) == len(keys) == 2 * 3

    # A run's self-edits, fed back as external ones, are matched by name; titles alone cannot tell them apart.
    split = knowledge.load_passages(OmegaConf.to_object(make_cfg(run_dir, *TINY, *overrides)).data)
    written = run_dir / "results/self_edits.jsonl"
    edits = [json.loads(line) for line in written.read_text().splitlines()]
    assert knowledge.read_external_edits(str(written), split.eval) == [e["self_edit"] for e in edits]
    titles_only = tmp_path / "titles.jsonl"
    titles_only.write_text("".join(json.dumps({"title": "Shared", "self_edit": "x"}) + "\n" for _ in edits))
    with pytest.raises(DataError, match=r"no self-edit for the evaluation passages \['Shared #"):
        knowledge.read_external_edits(str(titles_only), split.eval)


def test_forgetting_penalty_subtracts_the_reasoning_drop_of_each_update(tmp_path, monkeypatch):
    metrics, rewards, outcomes = _forgetting_run(tmp_path, monkeypatch, "rl.reward.forgetting_penalty=2.0")
    before = metrics["reasoning/before/accuracy"]  # round 1's learner is the unchanged model
    by_sample = {(o["title"], o["key"][3]): o for o in outcomes}
    for r in rewards:
        o = by_sample[(r["title"], r["sample"])]
        drop = before - sum(o["probe"]["reasoning"]) / len(o["probe"]["reasoning"])
        assert r["reasoning_drop"] == pytest.approx(drop)
        # What is left after adding the penalty back is an accuracy: k of the passage's questions.
        accuracy, questions = r["reward"] + 2.0 * max(0.0, drop), len(o["answers"])
        assert 0 <= accuracy <= 1 and accuracy * questions == pytest.approx(round(accuracy * questions))
    assert any(r["reasoning_drop"] != 0 for r in rewards)  # the updates did move reasoning accuracy
    assert metrics["rl/round_1/reasoning_drop_mean"] == pytest.approx(
        sum(r["reasoning_drop"] for r in rewards) / len(rewards)
    )
    assert "reasoning/round_1/accuracy" in metrics


def test_max_reasoning_drop_rejects_self_edits_and_counts_them(tmp_path, monkeypatch):
    # No update can raise reasoning accuracy by a whole 1.0, so a limit of -1 rejects every self-edit.
    metrics, rewards, _ = _forgetting_run(tmp_path, monkeypatch, "rl.reward.max_reasoning_drop=-1.0")
    assert metrics["rl/round_1/rejected_for_forgetting"] == len(rewards) == 2 * 3
    assert metrics["rl/round_1/acceptance_rate"] == 0 and not any(r["kept"] for r in rewards)


def test_the_forgetting_guard_needs_the_probe(tmp_path):
    with pytest.raises(ValueError, match="need the reasoning probe"):
        train(make_cfg(tmp_path, *TINY, *RL_OVERRIDES, "reasoning=none", "rl.reward.forgetting_penalty=1"))


def test_a_run_dir_with_another_config_is_not_resumed(rl_run):
    run_dir, _ = rl_run
    with pytest.raises(ValueError, match="another configuration"):
        train(make_cfg(run_dir, *TINY, *RL_OVERRIDES, "rl.samples=2"))
    with pytest.raises(ValueError, match=r"rl.rounds: 2 -> 1 \(may only grow\)"):
        train(make_cfg(run_dir, *TINY, *RL_OVERRIDES, "rl.rounds=1"))
    with pytest.raises(ValueError, match="resume=auto"):
        train(make_cfg(run_dir, *TINY, *RL_OVERRIDES, "resume=never"))


def test_a_run_started_before_a_key_was_added_resumes_at_that_keys_default(tmp_path):
    # A run directory written by an older seal: its config lacks rl.sft.gradient_checkpointing and holds a
    # key that has since gone.
    def config(*overrides):
        cfg = make_cfg(tmp_path, *TINY, *RL_OVERRIDES, *overrides)
        return OmegaConf.to_object(cfg), OmegaConf.to_container(cfg, resolve=True)

    old = config()[1]
    del old["rl"]["sft"]["gradient_checkpointing"]
    (tmp_path / "rounds").mkdir()
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(old))
    assert check_resume(*config(), run_dir=tmp_path)
    with pytest.raises(ValueError) as refused:
        check_resume(*config("rl.samples=2", "rl.sft.gradient_checkpointing=false"), run_dir=tmp_path)
    assert str(refused.value).splitlines()[1:] == [
        "  rl.samples: 3 -> 2",
        "  rl.sft.gradient_checkpointing: (added since; resumes only at its default True) -> False",
    ]
    old["rl"]["sft"]["packing"] = True
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(old))
    with pytest.raises(ValueError, match=r"rl.sft.packing: True -> \(no longer a key\)"):
        check_resume(*config(), run_dir=tmp_path)


def test_self_edits_from_a_file_are_the_external_condition(tmp_path):
    passages = embedded_corpus().eval[:2]
    edits = tmp_path / "edits.jsonl"
    edits.write_text("".join(json.dumps({"title": p.title, "self_edit": p.context}) + "\n" for p in passages))
    run_dir = tmp_path / "run"
    metrics = train(make_cfg(run_dir, *TINY_OVERRIDES, "self_edit.source=file", f"self_edit.path={edits}"))
    assert metrics["knowledge/external/n"] == 10 and "knowledge/self_edit/accuracy" not in metrics
    written = [
        json.loads(line) for line in (run_dir / "results/external_edits.jsonl").read_text().splitlines()
    ]
    assert [r["self_edit"] for r in written] == [p.context for p in passages]
    edits.write_text(edits.read_text().replace(passages[0].context, "Nothing to learn here."))
    with pytest.raises(ValueError, match="self_edit.path: the file's content changed since the run started"):
        train(make_cfg(run_dir, *TINY_OVERRIDES, "self_edit.source=file", f"self_edit.path={edits}"))
    run2 = make_cfg(tmp_path / "run2", *TINY_OVERRIDES, "self_edit.source=file", f"self_edit.path={edits}")
    for content, error in (
        (json.dumps({"title": passages[0].title, "self_edit": "x"}) + "\n", "no self-edit for the eval"),
        ('{"title": "A", "self_edit": "x"}\n\n{"title": "B", ', r"edits.jsonl, line 3: invalid JSON"),
        ('{"title": "A", "self_edit": "x"}\n{"title": "B"}\n', r'edits.jsonl, row 2: expected \{"title"'),
    ):
        edits.write_text(content)
        with pytest.raises(DataError, match=error):
            train(run2)


def _command(run_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "seal.train",
        *TINY,
        *RL_OVERRIDES,
        "logger.mode=offline",
        f"paths.cache_dir={CACHE_DIR}",
        f"hydra.run.dir={run_dir}",
    ]


def _summary(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "summary.json").read_text())["metrics"]
    return {k: v for k, v in metrics.items() if not k.startswith(("time/", "mem/", "throughput/"))}


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "WANDB_SILENT": "true", "SEAL_OUTPUT_ROOT": str(tmp_path)}


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """An uninterrupted run of the RL configuration in its own process, as `python -m seal.train` runs it."""
    tmp_path = tmp_path_factory.mktemp("whole")
    subprocess.run(_command(tmp_path / "run"), check=True, cwd=ROOT, env=_env(tmp_path), capture_output=True)
    return tmp_path / "run"


def test_a_run_killed_in_round_2_resumes_and_ends_as_an_uninterrupted_run(tmp_path, whole):
    env = _env(tmp_path)
    killed = tmp_path / "killed"

    proc = subprocess.Popen(
        _command(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    first_chunk = killed / "rounds/round_2/train/chunk_0000.json"
    while not first_chunk.exists() and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the kill: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists() and not (killed / "rounds/round_2/state.json").exists()
    run_id = (killed / "wandb_run_id").read_text()

    resumed = subprocess.run(_command(killed), cwd=ROOT, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _summary(killed) == _summary(whole)
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    [reused] = [r["resume/reused_inner_loops"] for r in rows if "resume/reused_inner_loops" in r]
    round_1 = json.loads((killed / "rounds/round_1/state.json").read_text())["inner_loops"]
    # Round 0's 4 inner loops, all of round 1's, and at least round 2's first chunk of 4.
    assert reused >= 4 + round_1 + 4 and f"{reused} inner loops read back" in resumed.stdout + resumed.stderr
    assert [r["rl/round"] for r in rows if "rl/round" in r] == [0, 1, 2]  # no round logged twice
    assert (killed / "wandb_run_id").read_text() == run_id
    offline = sorted(p.name for p in (killed / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(run_id.strip()) for name in offline)


def test_on_ray_workers_a_killed_worker_s_chunk_is_retried_and_the_run_equals_the_local_one(tmp_path, whole):
    """executor=ray with 2 local workers: a worker is killed with SIGKILL while it computes a chunk; Ray
    restarts it, the chunk runs again, and every metric equals the local executor's run (same chunks, seeds
    and weights: the workers get the learner's weights after each ReST-EM round)."""
    pytest.importorskip("ray")
    command = [*_command(tmp_path / "run"), "executor=ray", "executor.workers=2", "executor.max_retries=2"]
    log = tmp_path / "output.txt"  # a file, not a pipe: a full pipe would stall the run while we watch
    proc = subprocess.Popen(
        command, cwd=ROOT, env=_env(tmp_path), stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    victim = None
    while victim is None and proc.poll() is None:
        # Ray names a worker's process after the method it runs: this one is computing a chunk.
        busy = [
            p
            for p in psutil.process_iter(["cmdline"])
            if "ray::InnerLoopWorker.compute" in (p.info["cmdline"] or [""])[0]
        ]
        if busy:
            try:
                busy[0].send_signal(signal.SIGKILL)
                victim = busy[0]
            except psutil.NoSuchProcess:  # it finished its chunk meanwhile: wait for the next one
                pass
        time.sleep(0.05)
    proc.wait(timeout=600)
    output = log.read_text()
    assert victim is not None, "the run ended before a worker could be killed:\n" + output[-3000:]
    assert proc.returncode == 0, output[-3000:]
    # Ray reports the death as ActorDiedError or, while it restarts the actor, ActorUnavailableError.
    assert re.search(r"chunk \d+: its worker died \(Actor(Died|Unavailable)Error\); try 2 of 3", output), (
        output
    )
    metrics = json.loads((tmp_path / "run" / "summary.json").read_text())["metrics"]
    assert metrics["executor/retried_chunks"] >= 1 and metrics["adapt/failed_updates"] == 0
    assert {k: v for k, v in _summary(tmp_path / "run").items() if not k.startswith("executor/")} == _summary(
        whole
    )


def test_on_forked_workers_a_dead_worker_s_chunk_is_retried_and_the_run_equals_the_local_one(
    tmp_path, whole, monkeypatch
):
    """executor=processes with 2 workers, forked from this process for each chunk: the first worker to start
    dies, its chunk runs again, and every metric equals the local executor's run (the chunks differ, but with
    adapt.max_adapters=1 no two loops share a pass). The workers compute with one thread and the learner's
    weights of the moment, which change after each ReST-EM round."""
    died = tmp_path / "died"
    compute = knowledge.ChunkRunner.compute

    def die_once(self, chunk, desc):
        try:  # O_EXCL: of two workers that start together, exactly one creates the file and dies
            fd = os.open(died, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return compute(self, chunk, desc)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os._exit(1)

    monkeypatch.setattr(knowledge.ChunkRunner, "compute", die_once)
    cfg = make_cfg(tmp_path / "run", *TINY, *RL_OVERRIDES, "executor=processes", "executor.workers=2")
    metrics = train(cfg)
    assert int(died.read_text()) != os.getpid()
    # Round 0's 4 inner loops went to the 2 workers as 2 chunks; one process took them as one.
    assert [p.name for p in sorted((whole / "rounds/round_0/eval").glob("chunk_*"))] == ["chunk_0000.json"]
    chunks = sorted((tmp_path / "run/rounds/round_0/eval").glob("chunk_*"))
    assert [p.name for p in chunks] == ["chunk_0000.json", "chunk_0001.json"]
    assert metrics["executor/retried_chunks"] == 1 and metrics["adapt/failed_updates"] == 0
    assert {k: v for k, v in _summary(tmp_path / "run").items() if not k.startswith("executor/")} == _summary(
        whole
    )


def test_a_round_resumed_with_other_kept_self_edits_fine_tunes_and_evaluates_again(tmp_path, monkeypatch):
    """Round 1's rewards are lost (a worker that kept dying: not cached) and the run is stopped in round 1's
    evaluation. Resumed, the rewards are computed and keep other self-edits than the first attempt's
    (none), so the fine-tuning and the evaluation's self-edits are done again: the run ends as one that was
    never stopped."""
    monkeypatch.setattr(knowledge, "make_grader", lambda *a: lambda question, gold, prediction: True)
    real_map = LocalExecutor.map
    first_attempt = True

    class Stopped(Exception):
        pass

    def map_(self, work):
        if not first_attempt:
            yield from real_map(self, work)
            return
        for i, (chunk, desc) in enumerate(work):
            if "round 1 evaluation" in desc:
                raise Stopped
            yield i, WorkerLost("died 3 times") if "rewards" in desc else self.runner.compute(chunk, desc)

    overrides = (*TINY, "rl=rest_em", "rl.rounds=1", "rl.passages_per_round=1", "rl.samples=2")
    overrides += ("rl.sft.epochs=1", "data.n_train=1", "reasoning=none", "task.conditions=[self_edit]")
    whole = train(make_cfg(tmp_path / "whole", *overrides))
    monkeypatch.setattr(LocalExecutor, "map", map_)
    with pytest.raises(Stopped):
        train(make_cfg(tmp_path / "stopped", *overrides))
    stopped = tmp_path / "stopped" / "rounds" / "round_1"
    assert json.loads((stopped / "sft_data.json").read_text()) == []  # every reward lost: nothing kept
    first_edits = json.loads((stopped / "eval_self_edits.json").read_text())
    first_attempt = False
    resumed = train(make_cfg(tmp_path / "stopped", *overrides))
    edits = json.loads((stopped / "eval_self_edits.json").read_text())
    assert edits == json.loads((tmp_path / "whole/rounds/round_1/eval_self_edits.json").read_text())
    assert edits != first_edits  # the fine-tuned generator's, not the unchanged one's
    for key in ("rl/round_1/eval_accuracy", "rl/round_1/sft_loss", "knowledge/seal/accuracy"):
        assert resumed[key] == whole[key]


def test_a_round_that_keeps_nothing_leaves_no_adapter_of_an_earlier_attempt(tmp_path):
    store = rl.RoundStore(tmp_path)
    store.save_adapter(1, {"w": torch.ones(2)})  # an earlier attempt at round 1 kept a self-edit
    assert rl.train_generator(store, 1, None, None, [], RLConfig(name="rest_em", learner="golden"), 0) is None
    assert store.load_adapter(1) is None  # nothing to merge when the round is replayed
