"""generation.backend=vllm without vLLM: the adapter-slot bookkeeping against a fake engine that behaves as
vLLM's does, the grouping of rows into engine calls, the PEFT folders the engine would load (checked with
PEFT itself), and the fallback to transformers when vLLM or a GPU is missing."""

import logging

import pytest
from peft import PeftModel

from seal.adapt import UpdateJob
from seal.config import AdaptConfig
from seal.models import LM, continuation_logprobs
from seal.multilora import MultiLoraUpdater
from seal.vllm_engine import AdapterSlots, export_adapter, open_engine, unavailable, waves
from tests.conftest import TINY_OVERRIDES, load_tiny, make_cfg


class Request:
    def __init__(self, name: str, lora_int_id: int, lora_path: str):
        self.lora_name, self.lora_int_id, self.lora_path = name, lora_int_id, lora_path


class FakeEngine:
    """vLLM's LLMEngine as far as adapters go: at most `max_loras` loaded, keyed by their integer id. Adding
    an id that is loaded already would keep serving the old weights, so it is an error here."""

    def __init__(self, max_loras: int):
        self.max_loras, self.adapters, self.ever = max_loras, {}, set()

    def add_lora(self, request: Request) -> bool:
        assert request.lora_int_id not in self.adapters, f"id {request.lora_int_id} is still loaded"
        assert len(self.adapters) < self.max_loras, "the engine's adapter slots are exhausted"
        self.adapters[request.lora_int_id] = request.lora_path
        self.ever.add(request.lora_int_id)
        return True

    def remove_lora(self, lora_id: int) -> bool:
        return self.adapters.pop(lora_id, None) is not None

    def list_loras(self) -> set[int]:
        return set(self.adapters)


def test_a_fixed_pool_of_ids_serves_any_number_of_adapters_without_growing():
    engine = FakeEngine(max_loras=3)
    slots = AdapterSlots(engine, 3, Request)
    for i in range(50):
        request = slots.acquire(f"/adapters/{i}")
        assert engine.adapters[request.lora_int_id] == f"/adapters/{i}"  # served what was asked for
        slots.release(request)
        assert len(engine.list_loras()) <= 3
    assert engine.ever == {1, 2, 3} and slots.loads == 50
    # The three most recent are still loaded: asking again loads nothing.
    again = slots.acquire("/adapters/48")
    assert slots.loads == 50 and engine.adapters[again.lora_int_id] == "/adapters/48"


def test_the_least_recently_used_free_adapter_is_replaced_and_held_ones_never_are():
    engine = FakeEngine(max_loras=2)
    slots = AdapterSlots(engine, 2, Request)
    a, b = slots.acquire("a"), slots.acquire("b")
    slots.release(a)
    slots.release(b)
    slots.release(slots.acquire("a"))  # a is now more recent than b
    c = slots.acquire("c")
    assert c.lora_int_id == b.lora_int_id and set(engine.adapters.values()) == {"a", "c"}
    held = slots.acquire("a")
    with pytest.raises(RuntimeError, match="all 2 adapter slots are held by running requests"):
        slots.acquire("d")
    slots.release(held)
    slots.release(c)
    with pytest.raises(RuntimeError, match="released more often than acquired"):
        slots.release(c)


def test_rows_are_grouped_into_calls_of_at_most_size_distinct_adapters_base_rows_first():
    assert waves(["a", None, "b", "a", "c", None, "d"], 2) == [[0, 1, 2, 3, 5], [4, 6]]
    assert waves([None, None], 2) == [[0, 1]]
    assert waves(["a", "b", "c"], 1) == [[0], [1], [2]]


def test_an_exported_adapter_loads_in_peft_and_scores_as_the_trained_one(tmp_path):
    cfg = AdaptConfig(rank=4, alpha=8, epochs=3, lr=1e-2)
    lm = load_tiny()
    updater = MultiLoraUpdater(lm, cfg, capacity=1)
    [adapter] = updater.train([UpdateJob("job", ["The Corvane cell stores sodium in layered salt."], 1)])
    folder = export_adapter(adapter, cfg, tmp_path / "adapter")

    prompts, continuations = ["The Corvane cell stores"], [" sodium in layered salt."]
    ours = updater.score(prompts, continuations, [adapter])
    base = updater.score(prompts, continuations, [None])
    fresh = load_tiny()
    peft = PeftModel.from_pretrained(fresh.model, folder).eval()
    theirs = continuation_logprobs(
        LM(peft, fresh.tokenizer, fresh.device, "plain", None), prompts, continuations
    )
    assert theirs[0][0] == pytest.approx(ours[0][0], abs=1e-4)
    assert ours[0][0] > base[0][0] + 0.5  # the adapter matters, so a folder PEFT ignored would fail above


def test_vllm_settings_are_checked_at_start_and_a_machine_without_it_falls_back(tmp_path, caplog):
    def cfg(*overrides):
        from omegaconf import OmegaConf

        return OmegaConf.to_object(make_cfg(tmp_path, *TINY_OVERRIDES, *overrides))

    assert open_engine(cfg()) is None  # hf, the default
    with pytest.raises(ValueError, match="unknown generation.backend 'tgi'"):
        open_engine(cfg("generation.backend=tgi"))
    with pytest.raises(ValueError, match="use it with executor=local"):
        open_engine(cfg("generation.backend=vllm", "executor=ray"))
    with pytest.raises(ValueError, match="needs rl.learner=updated"):
        open_engine(cfg("generation.backend=vllm", "rl=rest_em", "rl.learner=golden"))
    reason = unavailable()
    if reason is None:
        pytest.skip("vLLM and a GPU are here: the fallback is not taken")
    with caplog.at_level(logging.WARNING, logger="seal.vllm_engine"):
        assert open_engine(cfg("generation.backend=vllm")) is None
    assert (
        f"generation.backend=vllm: {reason}; generating with transformers (backend hf) instead" in caplog.text
    )
