import pytest
import torch
from peft.tuners.lora import LoraLayer

from seal.adapt import LoraUpdater, SharedCountAdamW, UpdateJob, batched_adamw, make_updater, tokenize
from seal.config import AdaptConfig
from seal.models import generate, weights_checksum
from seal.multilora import MultiLoraUpdater
from tests.conftest import OUT_OF_MEMORY, load_tiny

SEQS = [
    "Qirra Probe\nThe Qirra probe was built by Tessaline Aerospace in Port Vellan.",
    "Qirra Probe\nIt flew in 2026.",
]


def updater(**overrides) -> LoraUpdater:
    cfg = AdaptConfig(**{"rank": 4, "alpha": 8, "epochs": 2, "lr": 1e-2, **overrides})
    return LoraUpdater(load_tiny(), cfg)


def test_every_adapter_parameter_changes_and_base_weights_do_not():
    up = updater()
    before = weights_checksum(up.lm.model)
    up.reset(seed=7)
    initial = {k: v.detach().cpu().clone() for k, v in up._state().items()}
    [adapter] = up.train([UpdateJob("a", SEQS, seed=7)])
    assert adapter.result.error is None and adapter.result.tokens > 0
    assert len(adapter.result.epoch_losses) == 2
    # 2 layers x 7 projections x (A, B)
    assert set(adapter.state) == set(initial) and len(initial) == 2 * len(up.cfg.target_modules) * 2 == 28
    for key, value in adapter.state.items():
        assert not torch.equal(value, initial[key]), f"{key} did not change"
    assert weights_checksum(up.lm.model) == before  # the golden copy


def test_adapter_is_applied_only_inside_the_block():
    up = updater()
    prompt = [
        "Qirra Probe\nThe Qirra probe was"
    ]  # plain text: the random tiny model prints only newlines in chat
    base = generate(up.lm, prompt, max_new_tokens=8)
    [adapter] = up.train([UpdateJob("a", SEQS * 4, seed=1)])
    with up.applied(adapter):
        adapted = generate(up.lm, prompt, max_new_tokens=8)
    assert adapted != base
    assert generate(up.lm, prompt, max_new_tokens=8) == base
    with up.applied(None):
        assert generate(up.lm, prompt, max_new_tokens=8) == base


def test_same_seed_same_adapter_other_seed_other_adapter():
    up = updater()
    a, b, c = up.train([UpdateJob("a", SEQS, 3), UpdateJob("b", SEQS, 3), UpdateJob("c", SEQS, 4)])
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert not all(torch.equal(a.state[k], c.state[k]) for k in a.state)
    assert a.result.epoch_losses == b.result.epoch_losses


def test_padding_is_masked_out_of_the_loss():
    """Two sequences of different lengths in one batch: padding never counts as a trained token."""
    up = updater(batch_size=2, epochs=1)
    [adapter] = up.train([UpdateJob("a", SEQS, 0)])
    ids = [
        up.lm.tokenizer(s + up.lm.tokenizer.eos_token, add_special_tokens=False)["input_ids"] for s in SEQS
    ]
    assert adapter.result.tokens == sum(len(i) - 1 for i in ids)


def nan_loss(monkeypatch):
    """Every training loss becomes NaN (generation computes no loss, so evaluation is unaffected)."""
    real = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))


def test_non_finite_loss_is_a_recorded_failure(monkeypatch):
    up = updater()
    nan_loss(monkeypatch)
    adapters = up.train([UpdateJob("a", SEQS, 0), UpdateJob("b", SEQS, 1)])
    for adapter in adapters:
        assert adapter.state is None and "non-finite loss" in adapter.result.error
    with pytest.raises(ValueError, match="failed to train"):
        with up.applied(adapters[0]):
            pass


@pytest.mark.parametrize("batched", [False, True], ids=["peft", "multilora"])
def test_a_row_with_nothing_to_learn_within_max_length_is_dropped_not_a_nan(batched):
    """A prefix that alone fills max_length leaves its row no learnt token: alone in a step its loss would
    be 0/0. The row is dropped; a job left with no row fails, saying why."""
    cfg = AdaptConfig(rank=4, alpha=8, epochs=1, lr=1e-3, batch_size=1, max_length=32)
    lm = load_tiny()
    up = MultiLoraUpdater(lm, cfg, capacity=2) if batched else LoraUpdater(lm, cfg)
    long_prefix = "123456789\n" * 40
    jobs = [
        UpdateJob("mixed", ["121\n212"] * 2, 1, prefixes=["short prompt", long_prefix]),
        UpdateJob("long", ["121\n212"], 2, prefixes=[long_prefix]),
        UpdateJob("empty", [], 3),
    ]
    mixed, long, empty = up.train(jobs)
    [short] = tokenize(lm, ["121\n212"], 32, ["short prompt"])
    assert mixed.result.error is None and mixed.result.tokens == short.targets > 0
    for failed in (long, empty):
        assert failed.state is None
        assert failed.result.error == "no training sequence with a token to learn within max_length=32 tokens"


@pytest.mark.parametrize("error", OUT_OF_MEMORY, ids=["cuda", "cpu"])
def test_out_of_memory_in_one_update_does_not_stop_the_others(monkeypatch, error):
    up = updater()
    real_forward, calls = up.peft.forward, []

    def forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise error
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(up.peft, "forward", forward)
    first, second = up.train([UpdateJob("a", SEQS, 0), UpdateJob("b", SEQS, 1)])
    assert first.result.error == "out of memory" and first.state is None
    assert second.result.error is None and second.state is not None


def test_merge_adds_scaled_lora_product_to_base_weights_and_keeps_the_adapted_logits():
    up = updater()
    [adapter] = up.train([UpdateJob("a", SEQS * 4, seed=1)])
    ids = up.lm.tokenizer(SEQS[0], return_tensors="pt")["input_ids"].to(up.lm.device)
    layers = {name: m for name, m in up.peft.named_modules() if isinstance(m, LoraLayer)}
    before = {name: m.get_base_layer().weight.detach().clone() for name, m in layers.items()}
    with torch.no_grad():
        base = up.lm.model(input_ids=ids).logits
        with up.applied(adapter):
            adapted = up.lm.model(input_ids=ids).logits
    assert not torch.allclose(adapted, base, atol=1e-3)  # the adapter matters
    up.merge(adapter)
    scaling = up.cfg.alpha / up.cfg.rank  # 2, so a merge that forgot the scaling fails
    for name, layer in layers.items():
        a, b = (adapter.state[f"{name}.lora_{x}.weight"].to(up.lm.device) for x in "AB")
        change = layer.get_base_layer().weight.detach() - before[name]
        torch.testing.assert_close(change, scaling * b @ a, atol=1e-6, rtol=1e-4, msg=name)
    with torch.no_grad():
        merged = up.lm.model(input_ids=ids).logits  # the model alone: adapters are off outside `applied`
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_shared_count_adamw_takes_the_steps_of_torch_s_fused_adamw_bit_for_bit(weight_decay):
    """The batched updater's AdamW: the same parameters as torch.optim.AdamW(fused=True) after several
    steps, including steps where some tensors have no gradient (their own step counts then fall behind)."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(8, 16), (16, 8), (4, 16), (16, 4), (3,)]
    start = [torch.randn(shape, generator=generator) for shape in shapes]
    ours_params = [torch.nn.Parameter(t.clone()) for t in start]
    torch_params = [torch.nn.Parameter(t.clone()) for t in start]
    ours = batched_adamw(ours_params, 1e-2, weight_decay)
    reference = torch.optim.AdamW(torch_params, lr=1e-2, weight_decay=weight_decay, fused=True)
    assert isinstance(ours, SharedCountAdamW)
    for step in range(6):
        for i, shape in enumerate(shapes):
            grad = None if (step in (1, 2) and i in (1, 4)) or (step == 0 and i == 2) else torch.randn(shape)
            ours_params[i].grad = None if grad is None else grad.clone()
            torch_params[i].grad = None if grad is None else grad.clone()
        ours.step()
        reference.step()
        ours.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in ours_params)
    for mine, theirs, first in zip(ours_params, torch_params, start, strict=True):
        assert not torch.equal(mine, first)
        assert torch.equal(mine, theirs)
    assert ours.steps == [6, 4, 5, 6, 4]


def test_batched_adamw_falls_back_to_torch_s_optimizer_for_mixed_dtypes():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))]
    assert isinstance(batched_adamw(params, 1e-3, 0.0), torch.optim.AdamW)


def test_an_update_without_an_epoch_is_refused_at_start():
    with pytest.raises(ValueError, match="adapt.epochs=0: an update needs at least one epoch"):
        make_updater(load_tiny(), AdaptConfig(epochs=0))
    with pytest.raises(ValueError, match="'a': epochs=0, expected at least 1"):
        UpdateJob("a", SEQS, 0, epochs=0)
