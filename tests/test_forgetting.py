"""The probe of what an update costs (seal/forgetting.py) on the tiny real model."""

from omegaconf import OmegaConf

from seal.adapt import UpdateJob
from seal.config import AdaptConfig
from seal.forgetting import PRIOR_MAX_NEW_TOKENS, Probe
from seal.multilora import MultiLoraUpdater
from tests.conftest import TINY_OVERRIDES, load_tiny, make_cfg


def test_adapters_measured_together_score_as_each_measured_alone(tmp_path, monkeypatch):
    """Probe.measure sends all the adapters' rows to one scoring and one generation call of the batched
    updater; each adapter's results must be those of measuring it alone, in the adapters' order."""
    cfg = OmegaConf.to_object(make_cfg(tmp_path, *TINY_OVERRIDES))
    lm = load_tiny()
    updater = MultiLoraUpdater(lm, AdaptConfig(rank=8, alpha=16, epochs=8, lr=5e-2), capacity=2)
    adapters = updater.train(
        [
            UpdateJob("a", ["The Qirra probe was built by Tessaline Aerospace in Port Vellan."], 1),
            UpdateJob("b", ["Corvane cells store energy in molten sodium, designed in Lurith."], 2),
        ]
    )
    probe = Probe(cfg, lm, grade=None)
    probe.known = probe.questions[:8]
    # "Right" means: what adapter a answers alone. So a is right on every question, and b only where it
    # happens to answer as a does: the two adapters' results cannot be swapped unnoticed.
    prompts = [
        lm.format(cfg.task.question_template.format(title=q.topic, question=q.question)) for q in probe.known
    ]
    own = updater.generate(prompts, [adapters[0]] * len(prompts), max_new_tokens=PRIOR_MAX_NEW_TOKENS)
    answer_of_a = {q.question: a for q, a in zip(probe.known, own, strict=True)}
    probe.grade = lambda question, gold, answer: answer == answer_of_a[question]

    calls = []
    for name in ("score", "generate"):
        real = getattr(updater, name)
        monkeypatch.setattr(
            updater, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k)
        )
    together = probe.measure(lm, updater, adapters)
    assert calls == ["score", "generate"]
    alone = [probe.measure(lm, updater, [adapter])[0] for adapter in adapters]
    assert together == alone
    assert all(alone[0]["prior"]) and not all(alone[1]["prior"])
    assert len(together[0]["reasoning"]) == len(probe.items) == 6 * 2  # reasoning.per_task=2 in tests
